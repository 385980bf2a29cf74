"""The master goes away and comes back (no FUSE): hosts hold their writes,
resume with a master that knows nothing, which rebuilds its directory from
their reports (Join.resume); and a host the master declared dead is refused
its resume and fenced.  Protocol tests check the directory rebuilt and the
messages, not only the bytes."""

from __future__ import annotations

import os
import random

import pytest
import trio
from cluster_util import cluster
from conftest import CTX, ROOT, make_volume
from t5_recovery import _workload, content

from sharedfs import journal
from sharedfs.fsck import run_fsck
from sharedfs.protocol import Mode
from sharedfs.volume import read_superblock


async def fsck_clean(storage) -> None:  # type: ignore[no-untyped-def]
    f = await run_fsck(storage, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems


async def resumed(c, nodes: list[int], count: int = 1) -> None:  # type: ignore[no-untyped-def]
    with c.watchdog(20):
        while not all(c.hosts[n].cache.agent.stats.resumes >= count for n in nodes):  # noqa: ASYNC110
            await trio.sleep(0.02)
        while not c.master._rebuilt.is_set():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def test_a_restarted_master_is_rebuilt_from_the_hosts_and_they_carry_on():
    vol = await make_volume()
    async with cluster(vol, 3) as c:
        a, b, h = c.hosts
        top = await a.mkdir(ROOT, b"d", 0o755, CTX)
        synced = await a.create(top.ino, b"synced", 0o644, CTX)
        await a.write(synced.ino, 0, b"x" * 5000)
        await a.fsync(synced.ino)
        # Changed on b only, in b's cache: the restart must not lose it.
        unsynced = await b.create(ROOT, b"unsynced", 0o644, CTX)
        await b.write(unsynced.ino, 0, b"y" * 3000)
        assert await h.read(synced.ino, 0, 5000) == b"x" * 5000
        with c.watchdog(5):
            while any(st.acks or st.queue for st in c.directory.blocks.values()):  # noqa: ASYNC110
                await trio.sleep(0.01)
        held = b.cache.holdings().values()
        dirty_at_b = [blk for blk, m, _, dirty in held if dirty and m == Mode.X]
        assert dirty_at_b
        made_meanwhile: list[int] = []

        async def create_while_it_is_down() -> None:
            await trio.sleep(0.1)
            made_meanwhile.append((await h.create(top.ino, b"meanwhile", 0o644, CTX)).ino)

        async with trio.open_nursery() as n:
            n.start_soon(create_while_it_is_down)
            new = await c.restart_master(down=0.5)
            await resumed(c, [0, 1, 2])
        assert made_meanwhile
        assert not any(fs.fenced for fs in c.hosts)
        # The directory was rebuilt from the reports: b's dirty blocks are
        # b's, held in X, before anyone asks for them.
        for blk in dirty_at_b:
            st = new.directory.blocks.get(blk)
            if b.cache.holding(blk, Mode.X) is not None:
                assert st is not None and st.holders.get(1) is Mode.X and st.owner == 1
        # Carry on: b's unsynced change travels host to host, through the new master.
        transfers = h.cache.agent.stats.transfers_received
        assert await h.read(unsynced.ino, 0, 3000) == b"y" * 3000
        assert h.cache.agent.stats.transfers_received > transfers
        await a.write(synced.ino, 5000, b"z" * 100)
        assert await b.read(synced.ino, 5000, 100) == b"z" * 100
        for fs in c.hosts:
            names = {e.name for e, _ in await fs.readdir(top.ino, 0)}
            assert {b"synced", b"meanwhile"} <= names
        assert [fs.cache.agent.stats.resumes for fs in c.hosts] == [1, 1, 1]
    await fsck_clean(vol)


async def test_a_restart_that_loses_a_host_too_refuses_to_guess_its_locks():
    """Host 2 dies as the master restarts: what it held in X, and changed,
    is in no report, only in the log.  The new master serves nobody; the
    hosts that resumed are fenced; a host that mounts after the log is
    replayed (it saw no slot live) brings the cluster back."""
    vol = await make_volume()
    async with cluster(vol, 3, lease=2.0) as c:
        acked = {}
        for n, fs in enumerate(c.hosts):
            f = await fs.create(ROOT, b"f%d" % n, 0o644, CTX)
            await fs.write(f.ino, 0, b"%d" % n * 1000)
            await fs.fsync(f.ino)
            acked[b"f%d" % n] = b"%d" % n * 1000
        c.kill(2)
        new = await c.restart_master()
        with c.watchdog(20):
            while not (c.hosts[0].fenced and c.hosts[1].fenced):  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert "node(s) 2 held locks" in new.halted
        for fs in c.hosts[:2]:
            # Resumed, then cut off when the window closed without host 2.
            assert fs.cache.agent.stats.resumes == 1
            assert "refused: node(s) 2 held locks" in fs.cache.fenced
        c.forget(0)
        c.forget(1)
        # The operator unmounts every host; the first mount replays the log.
        await journal.replay(vol, read_superblock(vol))
        fs = await c.start(2)
        assert not new.halted
        for name, data in acked.items():
            assert await fs.read((await fs.lookup(ROOT, name)).ino, 0, 1000) == data
    await fsck_clean(vol)


async def test_a_restart_after_a_host_was_recovered_goes_on_without_it():
    """Host 2 died and was recovered (its mark cleared in the log header
    the LLOL's holder caches; storage may still show it): the hosts that
    resume name it neither as a peer nor, by the newest header, as having
    records, so the master need not wait for it."""
    vol = await make_volume()
    async with cluster(vol, 3) as c:
        for n, fs in enumerate(c.hosts):
            f = await fs.create(ROOT, b"f%d" % n, 0o644, CTX)
            await fs.write(f.ino, 0, b"%d" % n * 3000)
            await fs.fsync(f.ino)
        c.kill(2)
        await c.wait_recovered(2)
        new = await c.restart_master()
        await resumed(c, [0, 1])
        assert not new.halted and not c.hosts[0].fenced and not c.hosts[1].fenced
        for n in range(3):
            assert await content(c.hosts[1], ROOT, b"f%d" % n) == b"%d" % n * 3000
        await c.hosts[0].create(ROOT, b"after", 0o644, CTX)
        await c.hosts[1].lookup(ROOT, b"after")
        fs = await c.start(2)
        assert await content(fs, ROOT, b"f0") == b"0" * 3000
    await fsck_clean(vol)


async def test_a_host_the_master_declared_dead_is_refused_its_resume():
    vol = await make_volume()
    async with cluster(vol, 3) as c:
        f = await c.hosts[2].create(ROOT, b"two", 0o644, CTX)
        await c.hosts[2].write(f.ino, 0, b"2" * 4096)
        await c.hosts[2].fsync(f.ino)
        link = c.hosts[2].cache.agent._master
        assert link is not None
        await link.aclose()  # the master sees host 2 go without a Bye
        with c.watchdog(20):
            while not c.hosts[2].fenced:  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert "refused" in c.hosts[2].cache.fenced
        await c.wait_recovered(2)
        assert c.directory.counters.hosts_failed == 1
        assert await c.hosts[0].read(f.ino, 0, 4096) == b"2" * 4096
        c.forget(2)
    await fsck_clean(vol)


@pytest.mark.parametrize("seed", [int(os.environ.get("SHAREDFS_SEED", "1")), 2])
async def test_master_restarts_at_random_moments_lose_nothing(seed: int):
    """Three hosts write, overwrite and fsync in shared and own directories
    while the master is killed and restarted at random moments (mid-ping,
    mid-write, mid-checkpoint): no host is fenced, every acknowledged byte
    reads back on every host, and the volume is clean."""
    await _restarts(seed, restarts=6)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(10, 20))
async def test_master_restarts_soak(seed: int):
    await _restarts(seed, restarts=20)


async def _restarts(seed: int, restarts: int) -> None:
    rng = random.Random(seed)
    vol = await make_volume(256 << 20)
    acked: dict[tuple[int, bytes], set[bytes]] = {}
    async with cluster(vol, 3, checkpoint_every=0.2, hang_after=40) as c:
        shared = (await c.hosts[0].mkdir(ROOT, b"shared", 0o755, CTX)).ino
        stop = trio.Event()
        async with trio.open_nursery() as n:
            for node, fs in enumerate(c.hosts):
                n.start_soon(_workload, fs, node, shared, acked, rng, stop)
            for i in range(restarts):
                await trio.sleep(rng.uniform(0.05, 0.5))
                await c.restart_master(down=rng.uniform(0, 0.3))
                await resumed(c, [0, 1, 2], i + 1)
            await trio.sleep(0.2)
            stop.set()
        assert not any(fs.fenced for fs in c.hosts)
        for fs in c.hosts:
            for (parent, name), data in acked.items():
                assert await content(fs, parent, name) in data, name
    await fsck_clean(vol)
