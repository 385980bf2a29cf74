"""Commits of hosts that do not hold the LLOL, appended for them by the host
that does (LogAppend, host to host), without FUSE: the master's messages,
who writes the log's pages, whose records they hold, the header's marks,
and what happens when the holder dies with an append of another host's
on its way."""

from __future__ import annotations

import pytest
import trio
from cluster_util import cluster
from conftest import CTX, ROOT, make_volume
from t5_faults import FaultyStorage, fsck_clean
from t5_recovery import content, put

from sharedfs import agent as agent_module
from sharedfs import journal as j
from sharedfs.protocol import LockRequest, Mode
from sharedfs.storage import Storage
from sharedfs.volume import read_superblock


class Recorder(FaultyStorage):
    """A host's view of the volume that notes the log pages it writes,
    and can hold them back (`gate` not set)."""

    def __init__(self, inner: Storage, log_area: range) -> None:
        super().__init__(inner)
        self.log_area = log_area
        self.log_writes = 0
        self.gate = trio.Event()
        self.gate.set()
        self.at_gate = trio.Event()

    async def write(self, offset: int, data, *, fua: bool = False) -> None:  # type: ignore[no-untyped-def]
        if offset in self.log_area:
            self.log_writes += 1
            if not self.gate.is_set():
                self.at_gate.set()
                await self.gate.wait()
        await super().write(offset, data, fua=fua)


def recorders(vol, seen: dict[int, Recorder]):  # type: ignore[no-untyped-def]
    """cluster()'s `wrap`: a Recorder per host, in `seen` by node."""
    sb = read_superblock(vol)
    area = j.Area.of(sb)
    log_area = range(area.first * sb.block_size, (area.first + area.count) * sb.block_size)

    def wrap(node: int, storage: Storage) -> Storage:
        seen[node] = Recorder(storage, log_area)
        return seen[node]

    return wrap


def count_log_requests(c) -> list[int]:  # type: ignore[no-untyped-def]
    """Nodes of the lock requests for the log's header the master gets."""
    asked: list[int] = []
    d = c.master.directory
    real = d.on_lock_request

    def spy(node: int, msg: LockRequest):  # type: ignore[no-untyped-def]
        if c.hosts[0].log.area.header in msg.blocks:
            asked.append(node)
        return real(node, msg)

    d.on_lock_request = spy
    return asked


async def first_commits(c) -> tuple[list[int], int]:  # type: ignore[no-untyped-def]
    """A directory per host and a first fsync'd file in each (each host's
    first commit: the LLOL moves); the directories, and the LLOL's holder."""
    dirs = [(await fs.mkdir(ROOT, b"d%d" % n, 0o755, CTX)).ino for n, fs in enumerate(c.hosts)]
    for n, fs in enumerate(c.hosts):
        await put(fs, dirs[n], b"first", b"1")
    return dirs, holder_of_llol(c)


def holder_of_llol(c) -> int:  # type: ignore[no-untyped-def]
    [holder] = [
        n
        for n, fs in enumerate(c.hosts)
        if n in c._scopes and fs.cache.holding(fs.log.area.header, Mode.X)  # alive
    ]
    return holder


async def test_the_llol_stays_put_and_its_holder_appends_the_others_commits():
    """Three hosts create and fsync files in directories of their own.
    Once the LLOL has settled, every commit of the others reaches the log
    through its holder: the master gets no request for the log's header,
    only the holder writes log pages, the pages hold each host's records
    under its own id, the header marks each host, and a host killed then is
    recovered from those records."""
    vol = await make_volume(256 << 20)
    rec: dict[int, Recorder] = {}
    async with cluster(vol, 3, checkpoint_every=None, wrap=recorders(vol, rec)) as c:
        dirs, holder = await first_commits(c)
        asked = count_log_requests(c)
        before = {n: r.log_writes for n, r in rec.items()}
        acked: dict[tuple[int, bytes], bytes] = {}

        async def commits(n: int) -> None:
            for i in range(15):
                data = b"%d-%d " % (n, i) * 300
                await put(c.hosts[n], dirs[n], b"f%d" % i, data)
                acked[(dirs[n], b"f%d" % i)] = data

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(commits, n)
        assert holder_of_llol(c) == holder
        assert asked == [], "the LLOL moved"
        others = [n for n in range(3) if n != holder]
        for n in others:
            assert c.hosts[n].log.shipped >= 15
            assert rec[n].log_writes == before[n], f"host {n} wrote log pages"
        assert c.hosts[holder].log.appended_for >= 30
        assert rec[holder].log_writes > before[holder]
        _, pages = await j.read_log(vol, c.sb)
        assert {r.host for page in pages for r in page.records} == {0, 1, 2}
        hfs = c.hosts[holder]
        hbuf = hfs.cache.holding(hfs.log.area.header, Mode.X)
        header = j.unpack_header(hbuf.data, hfs.log.area.header)  # the LLOL's value
        assert all(header.low[n] for n in range(3))
        victim = others[0]
        c.kill(victim)
        await c.wait_recovered(victim)
        reader = c.hosts[others[1]]
        for (parent, name), data in acked.items():
            assert await content(reader, parent, name) == data, name
    await fsck_clean(vol)


@pytest.mark.parametrize("with_master", [False, True], ids=["holder", "holder-and-master"])
async def test_a_holder_that_dies_with_anothers_append_on_its_way(monkeypatch, with_master):
    """The holder's log write is held back, with another host's commit in
    it, and the holder dies (with the master, the master it embedded, say,
    then no PeerDown comes): the asker stops waiting as the holder's link
    closes, takes the LLOL itself (resuming with a new master first), and
    its fsync returns; what it fsync'd is there.  The answer's timeout is
    out of the way: only the closed link can end the wait."""
    monkeypatch.setattr(agent_module, "LOG_ASK_LEASES", 10_000)
    vol = await make_volume(256 << 20)
    rec: dict[int, Recorder] = {}
    async with cluster(vol, 3, checkpoint_every=None, wrap=recorders(vol, rec), lease=1.5) as c:
        dirs, holder = await first_commits(c)
        asker = (holder + 1) % 3
        rec[holder].gate = trio.Event()
        shipped = c.hosts[asker].log.shipped
        result: list[int] = []

        async def commit() -> None:
            result.append(await put(c.hosts[asker], dirs[asker], b"late", b"L" * 3000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            with trio.fail_after(10):
                await rec[holder].at_gate.wait()
            assert c.hosts[asker].cache.agent._log_asks  # its commit is in that write
            c.kill(holder)
            if with_master:
                c.stop_master()
                await c.restart_master()
            with c.watchdog(30):
                while not result:  # noqa: ASYNC110
                    await trio.sleep(0.05)
        assert c.hosts[asker].log.shipped == shipped  # it appended them itself
        assert holder_of_llol(c) == asker
        await c.wait_recovered(holder)
        third = c.hosts[3 - holder - asker]
        assert await content(third, dirs[asker], b"late") == b"L" * 3000
    await fsck_clean(vol)


async def test_a_commit_whose_ship_is_cancelled_still_reaches_the_log():
    """The task that ships a host's commit to the holder is cancelled while
    the holder's write of it is held back (an unmount cancels the
    write-back task, say).  The records must stay the asker's to append:
    its next force leaves nothing pending, a write of the blocks they
    changed goes through (it waited forever on records nobody had), and
    the file is there after the asker dies."""
    vol = await make_volume(256 << 20)
    rec: dict[int, Recorder] = {}
    async with cluster(vol, 3, checkpoint_every=None, wrap=recorders(vol, rec)) as c:
        dirs, holder = await first_commits(c)
        asker = (holder + 1) % 3
        fs = c.hosts[asker]
        ino = (await fs.create(dirs[asker], b"cut", 0o644, CTX)).ino
        await fs.write(ino, 0, b"C" * 3000)
        assert fs.log.pending
        rec[holder].gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.log.force)
            with trio.fail_after(10):
                await rec[holder].at_gate.wait()
            assert fs.cache.agent._log_asks
            nursery.cancel_scope.cancel()
        rec[holder].gate.set()
        with c.watchdog(20):
            await fs.log.force()
            assert not fs.log.pending
            await fs.cache.flush()
        c.kill(asker)
        await c.wait_recovered(asker)
        third = c.hosts[3 - holder - asker]
        assert await content(third, dirs[asker], b"cut") == b"C" * 3000
    await fsck_clean(vol)


async def test_records_that_land_after_the_recovery_read_the_log_are_followed(monkeypatch):
    """The asker's commit (a file big enough for an indirect block, which
    only the asker knows of) is in the holder's log write, held back; the
    asker dies.  Its recovery reads the log before that write lands, and
    the write lands before the rebuild takes the LLOL: the rebuild must
    read the log again, follow the indirect block the late records
    allocated, and rebuild it, or the inode would point at a block that
    was never written (fsck: bad magic)."""
    vol = await make_volume(256 << 20)
    rec: dict[int, Recorder] = {}
    first_reads: list[int] = []
    real_read_log = j.read_log

    async def read_log(storage, sb):  # type: ignore[no-untyped-def]
        out = await real_read_log(storage, sb)
        first_reads.append(len([r for page in out[1] for r in page.records]))
        return out

    async with cluster(vol, 3, checkpoint_every=None, wrap=recorders(vol, rec)) as c:
        dirs, holder = await first_commits(c)
        asker = (holder + 1) % 3
        fs = c.hosts[asker]
        ino = (await fs.create(dirs[asker], b"big", 0o644, CTX)).ino
        await fs.write(ino, 0, b"B" * (64 * c.sb.block_size))  # past the direct blocks
        private = set(fs.cache._private)
        assert private, "the file's new metadata blocks are private to its host"
        rec[holder].gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.log.force)
            with trio.fail_after(10):
                await rec[holder].at_gate.wait()
            assert fs.cache.agent._log_asks  # its commit is in the held-back write
            monkeypatch.setattr(j, "read_log", read_log)
            c.kill(asker)
            nursery.cancel_scope.cancel()  # the dead host's task goes with it
        with c.watchdog(20):
            while not first_reads:  # noqa: ASYNC110 - the recovery read the log
                await trio.sleep(0.01)
        rec[holder].gate.set()  # the asker's records land now
        await c.wait_recovered(asker)
        _, pages = await real_read_log(vol, c.sb)
        late = {r.block for page in pages for r in page.records if r.host == asker} & private
        assert late, "the late records name the blocks the asker allocated"
        # Never fsync'd: its data may not be there, but its block map must.
        survivor = c.hosts[3 - holder - asker]
        assert len(await content(survivor, dirs[asker], b"big")) == 64 * c.sb.block_size
    await fsck_clean(vol)


async def test_the_holder_does_not_append_records_of_a_host_the_master_said_is_down():
    """The asker's LogAppend waits at the holder behind the holder's own
    log write (held back); the asker dies, and the master says so before
    that write is done.  Its records must not reach the log: its recovery
    may have read the log already, and would not follow what they name."""
    vol = await make_volume(256 << 20)
    rec: dict[int, Recorder] = {}
    async with cluster(vol, 3, checkpoint_every=None, wrap=recorders(vol, rec)) as c:
        dirs, holder = await first_commits(c)
        asker = (holder + 1) % 3
        hfs, afs = c.hosts[holder], c.hosts[asker]
        _, pages = await j.read_log(vol, c.sb)
        before = sum(r.host == asker for page in pages for r in page.records)
        served = hfs.log.appended_for
        await hfs.create(dirs[holder], b"mine", 0o644, CTX)
        await afs.create(dirs[asker], b"lost", 0o644, CTX)
        # Its log pages held back (the recorder's area holds only pages,
        # never the header, which the write-back writes).
        rec[holder].gate = trio.Event()
        async with trio.open_nursery() as holding:
            holding.start_soon(hfs.log.force)  # the holder's write, held back
            with trio.fail_after(10):
                await rec[holder].at_gate.wait()
            async with trio.open_nursery() as asking:
                asking.start_soon(afs.log.force)  # its LogAppend waits behind it
                with c.watchdog(10):
                    while not hfs.log._foreign:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                c.kill(asker)
                asking.cancel_scope.cancel()  # the dead host's task goes with it
            with c.watchdog(20):
                while asker in hfs.cache.agent.live_nodes():  # noqa: ASYNC110 - PeerDown
                    await trio.sleep(0.01)
            rec[holder].gate.set()
        await c.wait_recovered(asker)
        _, pages = await j.read_log(vol, c.sb)
        after = sum(r.host == asker for page in pages for r in page.records)
        assert after == before, "the dead host's records were appended after it was down"
        assert hfs.log.appended_for == served
        survivor = c.hosts[3 - holder - asker]
        names = {e.name for e, _ in await survivor.readdir(dirs[asker], 0)}
        assert names - {b".", b".."} == {b"first"}  # "lost" was never fsync'd
    await fsck_clean(vol)


async def test_a_host_whose_own_log_append_waits_refuses_anothers_at_once():
    """Two hosts that each have a LogAppend out to the other would wait
    on each other (each holds its append semaphore) until both give up: a
    host whose own LogAppend waits for an answer refuses others at once."""
    vol = await make_volume(256 << 20)
    async with cluster(vol, 2, checkpoint_every=None) as c:
        dirs, holder = await first_commits(c)
        hfs, afs = c.hosts[holder], c.hosts[1 - holder]
        answers: list[tuple[bool, bool]] = []
        real = hfs.log.append_for

        async def spy(host: int, body: bytes):  # type: ignore[no-untyped-def]
            reply = await real(host, body)
            answers.append((hfs.log.append_lock.locked(), reply.ok))
            return reply

        hfs.cache.agent.on_log_append = spy
        await afs.create(dirs[1 - holder], b"late", 0o644, CTX)
        with c.watchdog(10):
            # Held as in _ship, while asking another host.
            async with trio.open_nursery() as nursery, hfs.log.append_lock:
                hfs.log._asking = True
                nursery.start_soon(afs.log.force)
                while not answers:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                hfs.log._asking = False
        assert answers == [(True, False)]  # refused while its own ask was out
        # The asker took the LLOL and appended its commit itself.
        assert afs.cache.holding(afs.log.area.header, Mode.X) is not None
    await fsck_clean(vol)
