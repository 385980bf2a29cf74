"""Metadata changes through the log: write-ahead, group commit, and a crash
at any storage write replayed to a consistent volume."""

from __future__ import annotations

import contextlib
import random

import pytest
import trio
from cluster_util import cluster
from conftest import CTX, ROOT, host, make_volume

from sharedfs import journal
from sharedfs.fsck import run_fsck
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock


class CrashPoints(MemoryStorage):
    """Keeps a copy of the volume as it stood before every k-th write: each
    is what storage holds if every host dies at that moment."""

    def __init__(self, base: MemoryStorage, every: int) -> None:
        super().__init__(base.size)
        self._data[:] = base._data
        self.every = every
        self.images: list[bytes] = []

    async def write(self, offset: int, data, *, fua: bool = False) -> None:  # type: ignore[no-untyped-def]
        if (self.writes + 1) % self.every == 0:
            self.images.append(bytes(self._data))
        await super().write(offset, data, fua=fua)


async def replay_and_check(image: bytes) -> journal.ReplayResult:
    """Replay, then fsck: the only thing a crash may leave is inodes unlinked
    while open (orphans, as on ext4 without its orphan list), which fsck -y
    frees; after that the volume is clean."""
    vol = MemoryStorage(len(image))
    vol._data[:] = image
    done = await journal.replay(vol, read_superblock(vol))
    f = await run_fsck(vol, repair=False, force=True, progress=False)
    others = [p for p in f.problems if "unlinked but still allocated" not in p]
    assert others == [], others
    if f.found_errors:
        await run_fsck(vol, repair=True, force=True, progress=False)
        f = await run_fsck(vol, repair=False, force=True, progress=False)
        assert f.found_errors == 0, f.problems
    return done


async def churn(fs, tag: bytes, rounds: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    top = await fs.mkdir(ROOT, b"top-" + tag, 0o755, CTX)
    for i in range(rounds):
        d = await fs.mkdir(top.ino, b"d%d" % i, 0o755, CTX)
        for k in range(rng.randrange(1, 6)):
            f = await fs.create(d.ino, b"f%d" % k, 0o644, CTX)
            await fs.write(f.ino, 0, b"%d" % k * rng.randrange(1, 9000))
        if rng.random() < 0.4:
            await fs.rename(top.ino, b"d%d" % i, top.ino, b"r%d" % i)
        elif rng.random() < 0.4:
            for k in range(6):
                with contextlib.suppress(Exception):
                    await fs.unlink(d.ino, b"f%d" % k)
            await fs.rmdir(top.ino, b"d%d" % i)


async def test_a_transaction_is_logged_before_its_blocks_reach_storage():
    vol = await make_volume()
    fs = host(vol)
    f = await fs.create(ROOT, b"a", 0o644, CTX)
    assert fs.log.commits == 1 and fs.log.pending and fs.log.pages_written == 0
    sb = fs.sb
    log_area = range(sb.journal_start * 4096, (sb.journal_start + sb.journal_blocks) * 4096)
    mark = len(vol.write_log)
    await fs.cache.flush()
    writes = vol.write_log[mark:]
    first_block = next(i for i, (off, _) in enumerate(writes) if off not in log_area)
    assert any(off in log_area for off, _ in writes[:first_block]), "a block went before its log"
    assert not fs.log.pending
    # One force carried the whole transaction: group commit.
    await fs.write(f.ino, 0, b"x")
    await fs.mkdir(ROOT, b"b", 0o755, CTX)
    await fs.mkdir(ROOT, b"c", 0o755, CTX)
    forces = fs.log.forces
    await fs.fsync(f.ino)
    assert fs.log.forces == forces + 1 and not fs.log.plc


async def test_a_block_waits_for_an_append_already_under_way():
    """While one task's append is taking the records to storage, a write-back
    of the block they describe must wait for it, not slip in before."""
    vol = await make_volume()
    fs = host(vol)
    await fs.create(ROOT, b"a", 0o644, CTX)
    sb = fs.sb
    log_area = range(sb.journal_start * 4096, (sb.journal_start + sb.journal_blocks) * 4096)
    gate, at_gate = trio.Event(), trio.Event()
    real_write = vol.write

    async def gated_write(offset: int, data: bytes) -> None:
        if offset in log_area and not gate.is_set():
            at_gate.set()
            await gate.wait()
        await real_write(offset, data)

    vol.write = gated_write  # type: ignore[method-assign]
    mark = len(vol.write_log)
    async with trio.open_nursery() as n:
        n.start_soon(fs.log.force)
        await at_gate.wait()  # the log page is on its way
        n.start_soon(fs.cache.flush)
        await trio.sleep(0.05)
        assert vol.write_log[mark:] == [], "a block reached storage before its records"
        gate.set()
    writes = vol.write_log[mark:]
    assert writes[0][0] in log_area and any(off not in log_area for off, _ in writes)
    assert not fs.log.pending


async def test_fsync_survives_a_crash_of_the_host():
    vol = await make_volume()
    fs = host(vol)
    await fs.mkdir(ROOT, b"dir", 0o755, CTX)
    f = await fs.create(ROOT, b"kept", 0o644, CTX)
    await fs.write(f.ino, 0, b"durable bytes")
    await fs.fsync(f.ino)
    await fs.create(ROOT, b"maybe", 0o644, CTX)  # not fsync'd: may be lost
    image = bytes(vol._data)  # the host dies here: nothing more reaches storage
    done = await replay_and_check(image)
    assert done.transactions >= 3
    vol2 = MemoryStorage(len(image))
    vol2._data[:] = image
    await journal.replay(vol2, read_superblock(vol2))
    after = host(vol2)
    a = await after.lookup(ROOT, b"kept")
    assert await after.read(a.ino, 0, 100) == b"durable bytes"
    assert (await after.lookup(ROOT, b"dir")).ino


async def test_a_crash_at_any_storage_write_replays_to_a_clean_volume():
    base = await make_volume()
    vol = CrashPoints(base, every=1)
    fs = host(vol, cache_bytes=256 * 4096)  # a small cache: write-back mid-run
    await churn(fs, b"h0", 25, seed=1)
    assert len(vol.images) > 10
    for image in vol.images[:: max(1, len(vol.images) // 40)]:
        await replay_and_check(image)


async def test_a_crash_of_every_host_in_a_cluster_replays_to_a_clean_volume():
    base = await make_volume()
    vol = CrashPoints(base, every=3)
    async with cluster(vol, 3) as c:
        async with trio.open_nursery() as n:
            for h, fs in enumerate(c.hosts):
                n.start_soon(churn, fs, b"h%d" % h, 10, h)
        assert sum(fs.log.pages_written for fs in c.hosts) > 0
        # Every host appended under the one LLOL: its block moved between them.
        assert c.directory.counters.transfers > 0
    assert len(vol.images) > 10
    for image in vol.images[:: max(1, len(vol.images) // 40)]:
        await replay_and_check(image)


async def test_fsck_replays_a_log_left_by_a_crash_and_says_when_one_is_needed():
    vol = await make_volume()
    fs = host(vol)
    f = await fs.create(ROOT, b"kept", 0o644, CTX)
    await fs.write(f.ino, 0, b"bytes")
    await fs.fsync(f.ino)
    await fs.mkdir(ROOT, b"logged", 0o755, CTX)
    await fs.log.force()  # in the log, not yet in its blocks
    image = bytes(vol._data)  # the host dies here
    crashed = MemoryStorage(len(image))
    crashed._data[:] = image
    check = await run_fsck(crashed, repair=False, force=True, progress=False)
    assert any("a replay is needed" in p for p in check.problems)
    assert bytes(crashed._data) == image  # -n changed nothing
    fixed = await run_fsck(crashed, repair=True, force=True, progress=False)
    assert any("not yet on the volume" in p for p in fixed.problems)
    again = await run_fsck(crashed, repair=False, force=True, progress=False)
    assert again.found_errors == 0, again.problems
    after = host(crashed)
    a = await after.lookup(ROOT, b"kept")
    assert await after.read(a.ino, 0, 10) == b"bytes"
    assert (await after.lookup(ROOT, b"logged")).ino


def test_journal_command_shows_the_log(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    img = tmp_path / "v.img"
    vol = trio.run(make_volume)
    fs_ops = []

    async def work() -> None:
        fs = host(vol)
        f = await fs.create(ROOT, b"x", 0o644, CTX)
        await fs.write(f.ino, 0, b"y")
        await fs.fsync(f.ino)
        fs_ops.append(fs.log.commits)

    trio.run(work)
    img.write_bytes(bytes(vol._data))
    with pytest.raises(SystemExit) as exit_:
        journal.main([str(img), "--records"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"committed transactions past the checkpoint (host 0: {fs_ops[0]})" in out
    assert "DELTA" in out and "COMMIT" in out


async def _blocks_of(fs, ino: int, n: int) -> set[int]:  # type: ignore[no-untyped-def]
    """The physical blocks under the first `n` logical blocks of `ino`."""
    fs.cache.begin_op()
    try:
        inode = await fs._iget(ino)
        return set((await fs._map(inode, 0, n))[0]) - {0}
    finally:
        fs.cache.end_op()


async def test_a_freed_directory_block_reused_for_data_survives_replay():
    """A directory's buckets are in the log; the directory goes, and a
    file's data (never logged) lands in those blocks.  After a crash the
    replay must not write the old buckets over the file: the free revoked
    their records, as jbd2's revoke records do."""
    vol = await make_volume()
    fs = host(vol)
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    e = await fs.mkdir(ROOT, b"e", 0o755, CTX)  # the same group as d: its files' data too
    names = [b"entry-%04d-%s" % (i, b"x" * 40) for i in range(400)]
    for name in names:
        await fs.create(d.ino, name, 0o644, CTX)
    buckets = await _blocks_of(fs, d.ino, 64)
    assert len(buckets) > 2  # a directory of several buckets
    marker = await fs.create(ROOT, b"marker", 0o644, CTX)
    await fs.fsync(marker.ino)  # the buckets' records are on storage
    for name in names:
        await fs.unlink(d.ino, name)
    await fs.rmdir(ROOT, b"d")
    await fs.forget([(d.ino, fs.lookups[d.ino])])  # the kernel lets go: it is freed
    f = await fs.create(e.ino, b"data", 0o644, CTX)
    payload = bytes(range(256)) * (16 * 4096 // 256)
    for off in range(0, len(payload) * 8, 4096):  # a block at a time: first fit
        await fs.write(f.ino, off, (payload * 8)[off : off + 4096])
    await fs.fsync(f.ino)
    assert buckets & await _blocks_of(fs, f.ino, 128), "the file did not reuse the buckets"
    image = bytes(vol._data)  # the host dies here
    await replay_and_check(image)
    vol2 = MemoryStorage(len(image))
    vol2._data[:] = image
    await journal.replay(vol2, read_superblock(vol2))
    after = host(vol2)
    a = await after.lookup((await after.lookup(ROOT, b"e")).ino, b"data")
    assert await after.read(a.ino, 0, len(payload) * 8) == payload * 8
