"""The directory spread over the hosts (spread.py), without FUSE: every host
masters the partitions the hash over the live hosts names it for, a host
that joins takes its share over, and the partitions of a host that dies
move to the survivors with nothing fsync'd lost."""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from conftest import CTX, ROOT, make_volume
from mount_util import Mount, fsck_ok, mkfs, needs_fuse, public_dir, sharedfs, wait_for
from t5_faults import fsck_clean
from t5_recovery import content, put

from sharedfs.debug import task_tree
from sharedfs.fs import FileSystem
from sharedfs.host import open_cluster_host
from sharedfs.link import LocalLink
from sharedfs.master import MasterService
from sharedfs.protocol import LockRequest, partition_of
from sharedfs.spread import Spread, SpreadAgent, owner, served
from sharedfs.status import ask_spread, merge_spread, render_master, spread_listeners
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import claim_slot, read_slot, read_superblock, write_slot

log = logging.getLogger(__name__)

PARTS = 16
LEASE = 3.0


class SpreadCluster:
    """Hosts on one MemoryStorage, each with its Spread; their slots beat
    while they live (as a mount's heartbeat does)."""

    def __init__(self, vol: MemoryStorage, nursery: trio.Nursery) -> None:
        self.vol, self.sb = vol, read_superblock(vol)
        self.nursery = nursery
        self.hosts: dict[int, FileSystem] = {}
        self.spreads: dict[int, Spread] = {}
        self.requests: dict[tuple[int, int], list[LockRequest]] = {}  # (host, part) -> seen
        self._scopes: dict[int, trio.CancelScope] = {}

    def agent(self, node: int) -> SpreadAgent:
        agent = self.hosts[node].cache.agent
        assert isinstance(agent, SpreadAgent)
        return agent

    def mastered(self, node: int) -> set[int]:
        return set(self.spreads[node].port.services)

    async def start(self, node: int) -> FileSystem:
        claim_slot(self.vol, self.sb, node)
        fs = open_cluster_host(self.vol, self.sb, node=node, partitions=PARTS)
        agent = fs.cache.agent
        assert isinstance(agent, SpreadAgent)
        agent.master_wait = 2 * LEASE

        def make_service(k: int, dead: frozenset[int], expect: frozenset[int]) -> MasterService:
            service = MasterService(
                self.sb.cluster_key,
                host_slots=self.sb.host_slots,
                lease=LEASE,
                node=node,
                dead=dead,
                volume_blocks=self.sb.volume_blocks,
                partition=(k, PARTS),
                expect=expect,
            )
            service.on_minority = agent.fence
            real = service.directory.on_lock_request
            seen = self.requests.setdefault((node, k), [])

            def spy(n: int, msg: LockRequest):  # type: ignore[no-untyped-def]
                seen.append(msg)
                return real(n, msg)

            service.directory.on_lock_request = spy  # type: ignore[method-assign]
            return service

        async def publish(addr: str) -> None:
            slot = read_slot(self.vol, self.sb, node)
            write_slot(self.vol, self.sb, node, replace(slot, master=addr))

        spread = Spread(
            agent,
            self.vol,
            self.sb,
            key=self.sb.cluster_key,
            tls=None,
            make_service=make_service,
            publish=publish,
            timeout=1.0,
        )
        self.hosts[node], self.spreads[node] = fs, spread
        self._scopes[node] = await self.nursery.start(self._run, node, spread)
        return fs

    async def _run(self, node: int, spread: Spread, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                n.start_soon(self._beat, node)
                await n.start(spread.run, ("127.0.0.1", 0), "127.0.0.1")
                task_status.started(scope)

    async def _beat(self, node: int) -> None:
        while True:
            await trio.sleep(0.1)
            slot = read_slot(self.vol, self.sb, node)
            write_slot(self.vol, self.sb, node, replace(slot, heartbeat_ns=slot.heartbeat_ns + 1))

    def kill(self, node: int) -> None:
        """kill -9: it stops mid-whatever; the volume shows its slot dead
        (as a local process that is gone is, at once)."""
        self.hosts[node].cache.fence("killed by the test")
        self._scopes.pop(node).cancel()
        slot = read_slot(self.vol, self.sb, node)
        write_slot(self.vol, self.sb, node, replace(slot, in_use=False))
        del self.hosts[node]

    def dump(self) -> None:
        """What every task waits on, and each host's protocol state."""
        lines = task_tree()
        for node, spread in self.spreads.items():
            lines.append(f"host {node} masters {sorted(spread.port.services)}")
            for service in spread.port.services.values():
                lines += [f"host {node}: {x}" for x in service.describe()]
        for line in lines:
            log.warning("state: %s", line)

    async def stop_all(self) -> None:
        for fs in self.hosts.values():
            await fs.destroy()
        for scope in self._scopes.values():
            scope.cancel()


@asynccontextmanager
async def spread_cluster(vol: MemoryStorage, n: int) -> AsyncIterator[SpreadCluster]:
    async with trio.open_nursery() as nursery:
        c = SpreadCluster(vol, nursery)
        for node in range(n):
            await c.start(node)
        try:
            with trio.fail_after(120):
                yield c
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(60):
                await c.stop_all()


def spy_closing(agent: SpreadAgent) -> tuple[list[int], list[int]]:
    """The partitions whose closing recovery round reaches `agent`, and
    the dead hosts whose mark its journal then clears."""
    closing: list[int] = []
    closes: list[int] = []
    journal, part_round = agent._journal_recover, agent._recover
    assert journal is not None

    async def close(dead: int, blocks: list[int], report, follow, sweep, only=None):  # type: ignore[no-untyped-def]
        if not blocks and not sweep:
            closes.append(dead)
        await journal(dead, blocks, report, follow, sweep, only)

    async def round_(k: int, dead: int, blocks: list[int], report, follow, sweep):  # type: ignore[no-untyped-def]
        if not blocks and not sweep:
            closing.append(k)
        await part_round(k, dead, blocks, report, follow, sweep)

    agent._journal_recover = close
    for k, part in enumerate(agent.parts):
        part.on_recover = functools.partial(round_, k)
    return closing, closes


def expected_masters(hosts: list[int]) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {h: set() for h in hosts}
    for k in range(PARTS):
        out[owner(k, hosts)].add(k)
    return out


async def wait_for_masters(c: SpreadCluster, want: dict[int, set[int]]) -> None:
    try:
        with trio.fail_after(30):
            while {h: c.mastered(h) for h in want} != want:  # noqa: ASYNC110
                await trio.sleep(0.05)
    except trio.TooSlowError:
        c.dump()
        raise


async def test_every_host_masters_its_share_and_asks_its_own_without_the_network():
    vol = await make_volume(128 << 20)
    async with spread_cluster(vol, 3) as c:
        want = expected_masters([0, 1, 2])
        assert all(want.values()), "each of 3 hosts masters some of the partitions"
        await wait_for_masters(c, want)
        dirs = [(await fs.mkdir(ROOT, b"d%d" % n, 0o755, CTX)).ino for n, fs in c.hosts.items()]
        for n, fs in c.hosts.items():
            for i in range(5):
                await put(fs, dirs[n], b"f%d" % i, b"host %d file %d" % (n, i))
        for fs in c.hosts.values():
            for m in range(3):
                assert await content(fs, dirs[m], b"f4") == b"host %d file 4" % m
        with trio.fail_after(30):
            while any(part._master is None for n in range(3) for part in c.agent(n).parts):  # noqa: ASYNC110
                await trio.sleep(0.05)
        for node in range(3):
            for k, part in enumerate(c.agent(node).parts):
                # Its own partitions by a LocalLink, the others' by TCP.
                assert isinstance(part._master, LocalLink) == (k in want[node]), (node, k)
        for (_, k), seen in c.requests.items():
            assert all(partition_of(b, PARTS) == k for msg in seen for b in msg.blocks)
        served = {k for (_, k), seen in c.requests.items() if seen}
        assert len(served) > 1, "the requests went to more than one master"
    await fsck_clean(vol)


async def test_a_host_that_joins_takes_its_share_over():
    vol = await make_volume(128 << 20)
    async with spread_cluster(vol, 1) as c:
        assert c.mastered(0) == set(range(PARTS))
        d = (await c.hosts[0].mkdir(ROOT, b"d", 0o755, CTX)).ino
        for i in range(10):
            await put(c.hosts[0], d, b"f%d" % i, b"before %d" % i)
        fs1 = await c.start(1)
        want = expected_masters([0, 1])
        assert want[1], "the hash names host 1 for some partitions"
        await wait_for_masters(c, want)
        for i in range(10):
            assert await content(fs1, d, b"f%d" % i) == b"before %d" % i
            await put(fs1, d, b"g%d" % i, b"after %d" % i)
        for i in range(10):
            assert await content(c.hosts[0], d, b"g%d" % i) == b"after %d" % i
    await fsck_clean(vol)


async def test_the_slot_ends_with_every_partition_mastered_when_two_start_at_once():
    """Two masters started at once each publish their host's mask; the
    writes run in threads and may land in either order.  The first one's
    write lands last here: had its mask been taken before the second's
    landed, the slot would hide the second partition for good (a torture
    run: a host then looked for that partition's master until fenced)."""
    delays = iter([0.2, 0.0])
    published: list[str] = []

    async def publish(mask: str) -> None:
        await trio.sleep(next(delays))  # the thread of the first is slower
        published.append(mask)

    agent = SpreadAgent(0, b"k" * 32, PARTS, coherence="fusion", tls=None)
    # Only the publishing is used: no volume, no masters.
    spread = Spread(agent, None, None, key=b"", tls=None, make_service=None, publish=publish)
    spread.address = ("127.0.0.1", 7)
    async with trio.open_nursery() as nursery:
        spread.port.services[3] = None
        nursery.start_soon(spread._publish_served)
        await trio.sleep(0.01)
        spread.port.services[15] = None
        nursery.start_soon(spread._publish_served)
    assert len(published) == 2
    assert served(published[-1]) == {3, 15}


@pytest.mark.parametrize("dead", [0, 2])  # the host that bootstrapped the cluster, and another
async def test_the_partitions_of_a_killed_host_move_and_nothing_fsynced_is_lost(dead: int):
    vol = await make_volume(128 << 20)
    async with spread_cluster(vol, 3) as c:
        await wait_for_masters(c, expected_masters([0, 1, 2]))
        dirs = [(await fs.mkdir(ROOT, b"d%d" % n, 0o755, CTX)).ino for n, fs in c.hosts.items()]
        for n, fs in c.hosts.items():
            for i in range(5):
                await put(fs, dirs[n], b"f%d" % i, b"host %d file %d" % (n, i))
        assert expected_masters([0, 1, 2])[dead], "it masters some partitions"
        survivors = sorted({0, 1, 2} - {dead})
        recoverer = survivors[0]  # the lowest live host
        closing, closes = spy_closing(c.agent(recoverer))
        c.kill(dead)
        await wait_for_masters(c, expected_masters(survivors))
        with trio.fail_after(30):
            while not closes:  # noqa: ASYNC110
                await trio.sleep(0.05)
        # Every partition closed its recovery of the dead host with the
        # lowest live host; the log's mark went once, after the last.
        assert sorted(closing) == list(range(PARTS))
        assert closes == [dead]
        for fs in c.hosts.values():
            for m in range(3):
                for i in range(5):
                    assert await content(fs, dirs[m], b"f%d" % i) == b"host %d file %d" % (m, i)
            await put(fs, dirs[fs.host], b"later", b"after the kill")
        a, b = (c.hosts[n] for n in survivors)
        assert await content(a, dirs[b.host], b"later") == b"after the kill"
    await fsck_clean(vol)


async def test_status_merges_every_hosts_partitions_into_one_view():
    """`sharedfs status` on a spread directory: it finds every host's
    listener by the volume's slots, asks them all, and shows each partition
    once, with the locks held summed over every partition's directory."""
    vol = await make_volume(128 << 20)
    async with spread_cluster(vol, 3) as c:
        await wait_for_masters(c, expected_masters([0, 1, 2]))
        for n, fs in c.hosts.items():
            d = (await fs.mkdir(ROOT, b"d%d" % n, 0o755, CTX)).ino
            for i in range(4):
                await put(fs, d, b"f%d" % i, b"%d" % n * 5000)

        def locks() -> dict[int, tuple[int, int]]:
            """Per host, its S and X locks, from every directory itself."""
            out: dict[int, tuple[int, int]] = {}
            for spread in c.spreads.values():
                for service in spread.port.services.values():
                    for h, held in service.directory.summary()["held"].items():  # type: ignore[attr-defined]
                        s, x = out.get(h, (0, 0))
                        out[h] = (s + held["S"], x + held["X"])
            return out

        listeners = spread_listeners(vol, c.sb)
        assert set(listeners) == {0, 1, 2}
        for _ in range(10):  # until no lock moved while we asked
            before = locks()
            view = merge_spread(await ask_spread(c.sb.cluster_key, listeners))
            if locks() == before:
                break
        assert {h: (held["S"], held["X"]) for h, held in view["held"].items()} == before
        assert sum(x for _, x in before.values()) > 0
        assert {k: part["master"] for k, part in view["partitions"].items()} == {
            k: n for n in c.hosts for k in c.mastered(n)
        }
        assert set(view["partitions"]) == set(range(PARTS))
        assert all(part["hosts"] == [0, 1, 2] for part in view["partitions"].values())
        assert set(view["hosts"]) == {0, 1, 2} and view["unanswered"] == {}
        lines = render_master(view)
        shares = ", ".join(f"host {n} masters {len(c.mastered(n))}" for n in sorted(c.hosts))
        assert f"directory in {PARTS} partitions: {shares}" in lines[1]


def published_masks(vol: Path) -> dict[int, set[int]]:
    """Per live host, the partitions its slot says it masters."""
    st = json.loads(sharedfs("status", str(vol), "--json").stdout)
    return {h["node"]: served(h["runs_master"]) for h in st["hosts"] if h["live"]}


@needs_fuse
@pytest.mark.fuse
def test_three_mounts_spread_the_directory_and_a_killed_one_loses_nothing() -> None:
    """Three mounts with --spread and no --master: each masters the share
    the hash names it for, and what one writes the others read.  kill -9
    of a host that masters some partitions: the two others take them over
    and go on, with all that was fsync'd there; then both unmount cleanly
    (no host fenced) and fsck is clean."""
    work = public_dir()
    vol = work / "vol.img"
    mkfs(vol)
    args = ("--spread", str(PARTS), "--lease", "3")
    mounts = []
    try:
        for n in range(3):
            mounts.append(Mount(vol, work / f"h{n}", "--node", str(n), *args))
        wait_for(lambda: published_masks(vol) == expected_masters([0, 1, 2]), what="the shares")
        for n, m in enumerate(mounts):
            (m.mnt / f"d{n}").mkdir()
            for i in range(3):
                with open(m.mnt / f"d{n}" / f"f{i}", "wb") as f:
                    f.write(b"%d" % n * (3000 * (i + 1)))
                    os.fsync(f.fileno())
        for m in mounts:
            for n in range(3):
                assert (m.mnt / f"d{n}" / "f2").read_bytes() == b"%d" % n * 9000
        # status, with no --master: every host's partitions, in one view.
        view = json.loads(sharedfs("status", str(vol), "--json").stdout)["master"]
        masters = {int(k): part["master"] for k, part in view["partitions"].items()}
        assert masters == {k: n for n, ks in expected_masters([0, 1, 2]).items() for k in ks}
        assert sorted(view["hosts"]) == ["0", "1", "2"]
        assert all(view["held"][n]["X"] > 0 for n in ("0", "1", "2")), view["held"]
        assert (
            f"directory in {PARTS} partitions: host 0 masters"
            in sharedfs("status", str(vol)).stdout
        )
        h2 = mounts.pop()
        h2.proc.kill()
        h2.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(h2.mnt)], capture_output=True)
        wait_for(lambda: published_masks(vol) == expected_masters([0, 1]), what="the takeover")
        for m in mounts:
            for n in range(3):
                for i in range(3):
                    got = (m.mnt / f"d{n}" / f"f{i}").read_bytes()
                    assert got == b"%d" % n * (3000 * (i + 1))
        (mounts[0].mnt / "d0" / "after").write_text("goes on")
        assert (mounts[1].mnt / "d0" / "after").read_text() == "goes on"
        h0, h1 = mounts
        assert "host 2, is dead: taking it" in h0.log.read_text() + h1.log.read_text()
        for m in mounts:
            assert "fenced" not in m.log.read_text(), m.log.read_text()
        # h1 takes the partitions of h0, which unmounted: not of a dead host.
        h0.umount()
        mounts.remove(h0)
        left = "partition {}'s master, host 0, has left (its slot is free): taking it"
        want = {left.format(k) for k in expected_masters([0, 1])[0]}
        wait_for(lambda: all(w in h1.log.read_text() for w in want), what="h1 to take over")
        assert "host 0, is dead" not in h1.log.read_text()
        h1.umount()
        mounts.remove(h1)
    finally:
        for m in mounts:
            m.kill()
    fsck_ok(vol)


async def test_a_rebuild_window_waits_for_no_host_the_volume_says_is_dead():
    """A partition's new master waits for the hosts joined to the old one
    to resume.  One that is killed meanwhile never will: once the volume
    says it is dead (the Spread's watch), the window closes at once and
    the dead host's records are swept, rather than two leases later."""
    service = MasterService(
        b"k" * 32, lease=LEASE, node=0, partition=(3, PARTS), expect=frozenset({1, 2})
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.alive_on_volume({0, 1, 2})
        assert not service._rebuilt.is_set()  # all alive: it waits
        await service.alive_on_volume({0, 1})
        assert not service._rebuilt.is_set()  # 1 may still resume
        await service.alive_on_volume({0})
        assert service._rebuilt.is_set()
        assert {n for n, rec in service.directory.recoveries.items() if rec.sweep} == {1, 2}
        nursery.cancel_scope.cancel()


async def test_a_sweep_round_rebuilds_only_its_own_partitions_blocks():
    """A partition's sweep of a dead host takes only the blocks of that
    partition: what it keeps of another's (a clean copy it held, newer
    than the records) it would report to a master that knows nothing of
    the block, and no master would have it written (a torture run left
    indirect blocks on no storage this way)."""
    agent = SpreadAgent(0, b"k" * 32, PARTS, coherence="fusion", tls=None)
    calls = []

    async def journal(dead, blocks, report, follow, sweep, only=None):  # type: ignore[no-untyped-def]
        calls.append((dead, sweep, only))

    agent.on_recover = journal
    await agent.parts[3].on_recover(2, [], _nothing, False, True)
    [(dead, sweep, only)] = calls
    blocks = range(0, 64 * 256, 64)
    assert dead == 2 and sweep
    assert {b for b in blocks if only(b)} == {b for b in blocks if partition_of(b, PARTS) == 3}


async def _nothing(blocks, installed, kept):  # type: ignore[no-untyped-def]
    pass
