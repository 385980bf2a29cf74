"""POSIX semantics of the filesystem core (no FUSE), on memory volumes."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
from collections.abc import Iterator

import pytest
import trio
from conftest import CTX, ROOT, host, make_volume

from sharedfs import format as fmt
from sharedfs import journal
from sharedfs.errors import FsError
from sharedfs.format import BlockType
from sharedfs.fs import DOT_COOKIE, DOTDOT_COOKIE, RENAME_EXCHANGE, RENAME_NOREPLACE, Ctx
from sharedfs.protocol import Mode
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock

BS = 4096
GiB = 1 << 30


# --------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def raises(code: int) -> Iterator[pytest.ExceptionInfo[FsError]]:
    """pytest.raises(FsError) that also checks the errno."""
    with pytest.raises(FsError) as info:
        yield info
    got = info.value.errno
    assert got == code, f"expected {errno.errorcode[code]}, got {errno.errorcode.get(got, got)}"


def data_of(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


async def mkfile(fs, name: bytes, data: bytes = b"", parent: int = ROOT, mode: int = 0o644):
    a = await fs.create(parent, name, mode, CTX)
    if data:
        await fs.write(a.ino, 0, data)
    return await fs.getattr(a.ino)


async def free_blocks(fs) -> int:
    return (await fs.statfs()).free_blocks


async def listdir(fs, ino: int, page: int = 256) -> dict[bytes, int]:
    """name -> cookie, walking readdir page by page ("." and ".." left out)."""
    out: dict[bytes, int] = {}
    after = 0
    while True:
        got = await fs.readdir(ino, after, page)
        if not got:
            return out
        for e, _ in got:
            if e.name in (b".", b".."):
                assert e.cookie == (DOT_COOKIE if e.name == b"." else DOTDOT_COOKIE)
                continue
            assert e.name not in out, f"{e.name!r} returned twice"
            assert e.cookie > DOTDOT_COOKIE
            out[e.name] = e.cookie
        after = got[-1][0].cookie


async def listdir_after(fs, d: int, after: int) -> list[bytes]:
    """Names with cookies above `after`, in readdir order."""
    out = []
    while True:
        page = await fs.readdir(d, after, 50)
        if not page:
            return out
        out += [e.name for e, _ in page]
        after = page[-1][0].cookie


async def release(fs, ino: int) -> None:
    """Drop every kernel reference the tests took on `ino`."""
    n = fs.lookups.get(ino, 0)
    if n:
        await fs.forget([(ino, n)])


async def read_inode(fs, ino: int) -> fmt.Inode:
    """The inode as its table block holds it (outside any operation)."""
    blk, off = fs.sb.inode_location(ino)
    buf = await fs.cache.get(blk, Mode.S, BlockType.INODES)
    return fmt.Inode.unpack_from(ino, buf.data, off)


async def physical_blocks(fs, ino: int, first: int, n: int) -> list[int]:
    pbns, _ = await fs._map(await read_inode(fs, ino), first, n)
    return pbns


async def dirhdr(fs, ino: int) -> tuple[int, int, int]:
    """(depth, next bucket lbn, entry count) from the directory's DIRHDR block."""
    (p,) = await physical_blocks(fs, ino, 0, 1)
    buf = await fs.cache.get(p, Mode.S, BlockType.DIRHDR)
    return fmt.read_dirhdr(buf.data)


async def remount(fs, volume):
    await fs.destroy()
    return host(volume)


# --------------------------------------------------------------------------
# Files: write, read, append


async def test_a_sequential_reader_is_read_ahead_and_a_random_one_is_not(fs, volume):
    """Read in 128 KiB requests from the start, a cold host asks for the
    blocks and reads them from storage a MiB at a time, not a request at a
    time; reads at random offsets get only what they ask for."""
    data = random.Random(3).randbytes(4 << 20)
    f = await fs.create(ROOT, b"big", 0o644, CTX)
    await fs.write(f.ino, 0, data)
    fs = await remount(fs, volume)
    step = 128 << 10
    got = b"".join([await fs.read(f.ino, off, step) for off in range(0, len(data), step)])
    assert got == data
    st = fs.cache.stats
    # 32 requests: without read-ahead, a lock request and a storage read
    # each; with it, one per MiB, plus the first request's and those of the
    # inode and its map blocks.
    assert st.lock_requests <= 12 and st.storage_reads <= 12, (st.lock_requests, st.storage_reads)
    fs = await remount(fs, volume)
    rng = random.Random(4)
    offs = [rng.randrange(0, len(data) - BS) // BS * BS for _ in range(20)]
    for off in offs:
        assert await fs.read(f.ino, off, BS) == data[off : off + BS]
    # The 20 blocks asked, the inode's and its map blocks: no window of 256.
    assert fs.cache.stats.misses <= 30, fs.cache.stats.misses


async def test_create_write_read(fs):
    a = await fs.create(ROOT, b"hello", 0o644, CTX)
    assert stat.S_ISREG(a.mode) and stat.S_IMODE(a.mode) == 0o644
    assert a.size == 0 and a.nlink == 1
    assert await fs.write(a.ino, 0, b"hello world") == 11
    assert await fs.read(a.ino, 0, 100) == b"hello world"
    assert await fs.read(a.ino, 6, 3) == b"wor"
    assert (await fs.lookup(ROOT, b"hello")).size == 11
    assert (await fs.lookup(ROOT, b"hello")).ino == a.ino


async def test_read_at_or_past_eof_is_empty(fs):
    a = await mkfile(fs, b"f", b"abc")
    assert await fs.read(a.ino, 3, 10) == b""
    assert await fs.read(a.ino, 1000, 10) == b""
    assert await fs.read(a.ino, 0, 0) == b""


async def test_multi_block_unaligned_write(fs):
    payload = data_of(3 * BS + 1234)
    a = await mkfile(fs, b"f")
    await fs.write(a.ino, 100, payload)
    assert (await fs.getattr(a.ino)).size == 100 + len(payload)
    assert await fs.read(a.ino, 0, 100) == bytes(100)
    assert await fs.read(a.ino, 100, len(payload)) == payload
    assert await fs.read(a.ino, 100 + BS, 10) == payload[BS : BS + 10]


async def test_overwrite_inside_a_block_keeps_neighbours(fs):
    a = await mkfile(fs, b"f", b"a" * (2 * BS))
    await fs.write(a.ino, BS - 2, b"XYZW")
    got = await fs.read(a.ino, 0, 2 * BS)
    assert got == b"a" * (BS - 2) + b"XYZW" + b"a" * (BS - 2)
    # A whole-block overwrite of an existing block.
    await fs.write(a.ino, BS, b"b" * BS)
    assert await fs.read(a.ino, BS - 2, 4) == b"XYbb"
    assert (await fs.getattr(a.ino)).size == 2 * BS


async def test_append_writes_at_end(fs):
    a = await mkfile(fs, b"log", b"one\n")
    assert await fs.write(a.ino, 0, b"two\n", append=True) == 4
    await fs.write(a.ino, 999, b"three\n", append=True)  # the offset is ignored
    assert await fs.read(a.ino, 0, 100) == b"one\ntwo\nthree\n"
    assert (await fs.getattr(a.ino)).size == 14


async def test_write_updates_mtime_and_ctime(fs):
    a = await mkfile(fs, b"f")
    await fs.setattr(a.ino, mtime_ns=1, ctime_ns=1)
    await fs.write(a.ino, 0, b"x")
    after = await fs.getattr(a.ino)
    assert after.mtime_ns > 1 and after.ctime_ns > 1


async def test_create_updates_parent_mtime(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    await fs.setattr(d.ino, mtime_ns=5)
    await mkfile(fs, b"f", parent=d.ino)
    assert (await fs.getattr(d.ino)).mtime_ns > 5


async def test_st_blocks_counts_data(fs):
    a = await mkfile(fs, b"f", data_of(3 * BS))
    assert (await fs.getattr(a.ino)).blocks == 3 * BS // 512


async def test_write_past_max_size_is_efbig(fs):
    a = await mkfile(fs, b"f")
    with raises(errno.EFBIG):
        await fs.write(a.ino, 1 << 62, b"x")
    with raises(errno.EFBIG):
        await fs.setattr(a.ino, size=1 << 62)
    assert (await fs.getattr(a.ino)).size == 0


async def test_concurrent_operations_are_serialized(fs):
    async def one(i: int) -> None:
        a = await fs.create(ROOT, b"c%d" % i, 0o644, CTX)
        await fs.write(a.ino, 0, data_of(BS + i, seed=i))

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
    for i in range(20):
        a = await fs.lookup(ROOT, b"c%d" % i)
        assert await fs.read(a.ino, 0, 2 * BS) == data_of(BS + i, seed=i)


# --------------------------------------------------------------------------
# Sparse files


async def test_holes_read_as_zeros(fs):
    a = await mkfile(fs, b"sparse")
    await fs.write(a.ino, 1 << 20, b"end")
    attr = await fs.getattr(a.ino)
    assert attr.size == (1 << 20) + 3
    assert attr.blocks <= 2 * BS // 512  # one data block and at most one indirect
    assert await fs.read(a.ino, 0, 1 << 20) == bytes(1 << 20)
    assert await fs.read(a.ino, (1 << 20) - 2, 10) == b"\0\0end"


async def test_write_at_5_gib_on_small_volume(fs):
    before = await free_blocks(fs)
    a = await mkfile(fs, b"huge")
    off = 5 * GiB + 12345
    await fs.write(a.ino, off, b"far away")
    attr = await fs.getattr(a.ino)
    assert attr.size == off + 8
    assert attr.blocks <= 4 * BS // 512
    assert before - await free_blocks(fs) <= 4
    assert await fs.read(a.ino, off, 100) == b"far away"
    assert await fs.read(a.ino, 3 * GiB, 4096) == bytes(4096)
    assert await fs.read(a.ino, off - 5, 7) == b"\0" * 5 + b"fa"


async def test_fill_hole_below_eof(fs):
    a = await mkfile(fs, b"f")
    await fs.write(a.ino, 100 * BS, b"tail")
    await fs.write(a.ino, 50 * BS + 7, b"middle")
    assert await fs.read(a.ino, 50 * BS, 20) == b"\0" * 7 + b"middle" + b"\0" * 7
    assert (await fs.getattr(a.ino)).size == 100 * BS + 4


async def test_extend_by_truncate_is_sparse(fs):
    a = await mkfile(fs, b"f", b"abc")
    before = await free_blocks(fs)
    await fs.setattr(a.ino, size=10 * GiB)
    assert (await fs.getattr(a.ino)).size == 10 * GiB
    assert await free_blocks(fs) == before
    assert await fs.read(a.ino, 0, 5) == b"abc\0\0"
    assert await fs.read(a.ino, 10 * GiB - 3, 10) == bytes(3)


# --------------------------------------------------------------------------
# Truncate


async def test_truncate_shrink_then_extend_reads_zeros_in_same_block(fs):
    a = await mkfile(fs, b"f", b"x" * 100)
    await fs.setattr(a.ino, size=50)
    await fs.setattr(a.ino, size=100)
    assert await fs.read(a.ino, 0, 200) == b"x" * 50 + bytes(50)


async def test_truncate_shrink_then_write_past_end_reads_zeros(fs):
    a = await mkfile(fs, b"f", b"y" * 3000)
    await fs.setattr(a.ino, size=1000)
    await fs.write(a.ino, 2000, b"z")
    assert await fs.read(a.ino, 0, 3000) == b"y" * 1000 + bytes(1000) + b"z"


async def test_truncate_across_blocks_then_extend(fs, volume):
    payload = data_of(5 * BS)
    a = await mkfile(fs, b"f", payload)
    await fs.setattr(a.ino, size=2 * BS + 10)
    assert (await fs.getattr(a.ino)).blocks == 3 * BS // 512
    await fs.setattr(a.ino, size=5 * BS)
    want = payload[: 2 * BS + 10] + bytes(3 * BS - 10)
    assert await fs.read(a.ino, 0, 5 * BS) == want
    # The zeroed tail reached storage too.
    fs2 = await remount(fs, volume)
    assert await fs2.read(a.ino, 0, 5 * BS) == want


async def test_truncate_frees_blocks(fs):
    start = await free_blocks(fs)
    a = await mkfile(fs, b"f", data_of(300 * BS))  # needs an indirect block
    used = start - await free_blocks(fs)
    assert used == 301
    assert (await fs.getattr(a.ino)).blocks == 301 * BS // 512
    await fs.setattr(a.ino, size=100 * BS)
    assert await free_blocks(fs) == start - 101
    await fs.setattr(a.ino, size=0)
    assert await free_blocks(fs) == start
    attr = await fs.getattr(a.ino)
    assert attr.size == 0 and attr.blocks == 0
    assert await fs.read(a.ino, 0, 10) == b""


async def test_truncate_of_far_sparse_file_frees_indirects(fs):
    start = await free_blocks(fs)
    a = await mkfile(fs, b"f", b"head")
    await fs.write(a.ino, 5 * GiB, b"tail")
    await fs.setattr(a.ino, size=2)
    assert await fs.read(a.ino, 0, 10) == b"he"
    await fs.setattr(a.ino, size=0)
    assert await free_blocks(fs) == start
    assert (await fs.getattr(a.ino)).blocks == 0
    await fs.write(a.ino, 0, b"again")  # the map still works after shrinking
    assert await fs.read(a.ino, 0, 10) == b"again"


async def test_truncate_directory_is_eisdir(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    with raises(errno.EISDIR):
        await fs.setattr(d.ino, size=0)


# --------------------------------------------------------------------------
# Unlink and the lookup count


async def test_unlinked_file_lives_until_forget(fs):
    start = await free_blocks(fs)
    files0 = (await fs.statfs()).free_files
    payload = data_of(10 * BS)
    a = await mkfile(fs, b"f", payload)
    assert fs.lookups[a.ino] == 1
    await fs.unlink(ROOT, b"f")
    with raises(errno.ENOENT):
        await fs.lookup(ROOT, b"f")
    # Still open: data readable, blocks still used.
    assert await fs.read(a.ino, 0, len(payload)) == payload
    assert (await fs.getattr(a.ino)).nlink == 0
    assert await free_blocks(fs) == start - 10
    await fs.write(a.ino, 0, b"still writable")
    await fs.forget([(a.ino, 1)])
    with raises(errno.ENOENT):
        await fs.getattr(a.ino)
    assert await free_blocks(fs) == start
    assert (await fs.statfs()).free_files == files0


async def test_forget_counts_down(fs):
    a = await mkfile(fs, b"f", b"data")
    await fs.lookup(ROOT, b"f")
    await fs.lookup(ROOT, b"f")
    assert fs.lookups[a.ino] == 3
    await fs.unlink(ROOT, b"f")
    await fs.forget([(a.ino, 2)])
    assert await fs.read(a.ino, 0, 10) == b"data"
    await fs.forget([(a.ino, 1)])
    with raises(errno.ENOENT):
        await fs.getattr(a.ino)


async def test_unlink_of_unreferenced_file_frees_at_once(fs):
    start = await free_blocks(fs)
    a = await mkfile(fs, b"f", data_of(5 * BS))
    await release(fs, a.ino)
    assert await fs.read(a.ino, 0, 4) == data_of(4)  # forget of a linked file keeps it
    await fs.unlink(ROOT, b"f")
    assert await free_blocks(fs) == start
    with raises(errno.ENOENT):
        await fs.getattr(a.ino)


async def test_forget_of_linked_file_keeps_it(fs):
    a = await mkfile(fs, b"f", b"keep")
    await release(fs, a.ino)
    assert (await fs.lookup(ROOT, b"f")).ino == a.ino
    assert await fs.read(a.ino, 0, 10) == b"keep"


async def test_destroy_frees_unlinked_open_files(fs, volume):
    start = await free_blocks(fs)
    a = await mkfile(fs, b"f", data_of(20 * BS))
    await fs.unlink(ROOT, b"f")
    fs2 = await remount(fs, volume)
    assert await free_blocks(fs2) == start
    with raises(errno.ENOENT):
        await fs2.getattr(a.ino)


async def test_freed_inode_is_reused_with_new_generation(fs):
    a = await mkfile(fs, b"f")
    await release(fs, a.ino)
    await fs.unlink(ROOT, b"f")
    b = await mkfile(fs, b"g")
    assert b.ino == a.ino
    assert b.generation == a.generation + 1


# --------------------------------------------------------------------------
# Directories


async def test_mkdir_rmdir_and_nlink(fs):
    root0 = (await fs.getattr(ROOT)).nlink
    assert root0 == 2
    d = await fs.mkdir(ROOT, b"d", 0o750, CTX)
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o750 and d.nlink == 2
    assert (await fs.getattr(ROOT)).nlink == 3
    await fs.mkdir(d.ino, b"s1", 0o755, CTX)
    await fs.mkdir(d.ino, b"s2", 0o755, CTX)
    await mkfile(fs, b"file", parent=d.ino)  # files do not count
    assert (await fs.getattr(d.ino)).nlink == 4
    assert (await fs.lookup(d.ino, b"..")).ino == ROOT
    assert (await fs.lookup(d.ino, b".")).ino == d.ino
    assert (await fs.lookup(ROOT, b"..")).ino == ROOT
    await fs.rmdir(d.ino, b"s1")
    assert (await fs.getattr(d.ino)).nlink == 3
    with raises(errno.ENOENT):
        await fs.lookup(d.ino, b"s1")


async def test_rmdir_not_empty(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    await mkfile(fs, b"f", parent=d.ino)
    with raises(errno.ENOTEMPTY):
        await fs.rmdir(ROOT, b"d")
    await fs.unlink(d.ino, b"f")
    await fs.rmdir(ROOT, b"d")
    assert (await fs.getattr(ROOT)).nlink == 2


async def test_rmdir_frees_directory(fs):
    start = await free_blocks(fs)
    files0 = (await fs.statfs()).free_files
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    assert await free_blocks(fs) < start
    await fs.rmdir(ROOT, b"d")
    assert (await fs.getattr(d.ino)).nlink == 0  # still referenced
    await release(fs, d.ino)
    assert await free_blocks(fs) == start
    assert (await fs.statfs()).free_files == files0


async def test_type_mismatches(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    f = await mkfile(fs, b"f")
    with raises(errno.ENOTDIR):
        await fs.rmdir(ROOT, b"f")
    with raises(errno.EISDIR):
        await fs.unlink(ROOT, b"d")
    with raises(errno.ENOTDIR):
        await fs.lookup(f.ino, b"x")
    with raises(errno.ENOTDIR):
        await fs.create(f.ino, b"x", 0o644, CTX)
    with raises(errno.ENOTDIR):
        await fs.readdir(f.ino, 0)
    with raises(errno.EINVAL):
        await fs.readlink(f.ino)
    # Nothing changed.
    assert set(await listdir(fs, ROOT)) == {b"d", b"f"}
    assert (await fs.getattr(d.ino)).nlink == 2


async def test_readdir_entries_carry_type_and_attrs(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    f = await mkfile(fs, b"f", b"12345")
    s = await fs.symlink(ROOT, b"s", b"f", CTX)
    got = {e.name: (e, a) for e, a in await fs.readdir(ROOT, 0)}
    assert set(got) == {b".", b"..", b"d", b"f", b"s"}
    assert got[b"d"][0].ino == d.ino and got[b"d"][0].dtype == stat.S_IFDIR >> 12
    assert got[b"f"][0].dtype == stat.S_IFREG >> 12 and got[b"f"][1].size == 5
    assert got[b"s"][0].dtype == stat.S_IFLNK >> 12 and got[b"s"][1].ino == s.ino
    assert got[b"f"][1] == await fs.getattr(f.ino)
    cookies = [e.cookie for e, _ in await fs.readdir(ROOT, 0)]
    assert cookies[:2] == [DOT_COOKIE, DOTDOT_COOKIE]
    assert cookies == sorted(cookies) and len(set(cookies)) == 5


async def test_readdir_dot_and_dotdot(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    sub = await fs.mkdir(d.ino, b"sub", 0o755, CTX)
    page = await fs.readdir(sub.ino, 0)
    assert [(e.name, e.cookie, e.ino) for e, _ in page] == [
        (b".", DOT_COOKIE, sub.ino),
        (b"..", DOTDOT_COOKIE, d.ino),
    ]
    assert page[0][0].dtype == stat.S_IFDIR >> 12
    assert page[1][1] == await fs.getattr(d.ino)
    root = await fs.readdir(ROOT, 0)
    assert [(e.name, e.ino) for e, _ in root] == [(b".", ROOT), (b"..", ROOT), (b"d", d.ino)]
    # Resuming after "." gives ".." and then the entries.
    rest = await fs.readdir(ROOT, DOT_COOKIE)
    assert [e.name for e, _ in rest] == [b"..", b"d"]
    assert [e.name for e, _ in await fs.readdir(ROOT, DOTDOT_COOKIE)] == [b"d"]


async def test_readdir_limit_and_after(fs):
    for i in range(30):
        await mkfile(fs, b"f%02d" % i)
    first = await fs.readdir(ROOT, DOTDOT_COOKIE, 10)
    assert len(first) == 10
    rest = await fs.readdir(ROOT, first[-1][0].cookie, 1000)
    assert len(rest) == 20
    assert {e.name for e, _ in first} | {e.name for e, _ in rest} == {
        b"f%02d" % i for i in range(30)
    }
    assert await fs.readdir(ROOT, rest[-1][0].cookie) == []


async def test_readdir_exactly_once_while_changing(fs):
    d = (await fs.mkdir(ROOT, b"d", 0o755, CTX)).ino
    originals = [b"orig-%04d" % i for i in range(300)]
    target = (await mkfile(fs, b"target")).ino
    for n in originals:
        await fs.link(target, d, n)
    depth0 = (await dirhdr(fs, d))[0]
    seen: list[bytes] = []
    removed_unseen: set[bytes] = set()
    removed: set[bytes] = set()
    added: set[bytes] = set()
    after, step = 0, 0
    while True:
        page = await fs.readdir(d, after, 40)
        if not page:
            break
        seen += [e.name for e, _ in page if e.cookie > DOTDOT_COOKIE]
        after = page[-1][0].cookie
        # Change the directory between calls: add names (forcing splits) and
        # remove some already returned and some not yet returned.
        for k in range(80):
            name = b"new-%02d-%03d" % (step, k)
            await fs.link(target, d, name)
            added.add(name)
        seen_set = set(seen)
        unseen = sorted(n for n in originals if n not in seen_set and n not in removed)
        done = sorted(n for n in originals if n in seen_set and n not in removed)
        for n in unseen[:5]:
            removed_unseen.add(n)
        for n in unseen[:5] + done[:5]:
            await fs.unlink(d, n)
            removed.add(n)
        step += 1
    assert (await dirhdr(fs, d))[0] > depth0, "the directory split while being read"
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    kept = set(originals) - removed
    assert kept <= set(seen), "an entry present throughout was skipped"
    assert not set(seen) & removed_unseen, "an entry removed before being reached came back"
    assert set(seen) <= set(originals) | added
    final = await listdir(fs, d)
    assert set(final) == (set(originals) - removed) | added
    assert (await dirhdr(fs, d))[2] == len(final)


async def test_readdir_cookies_stay_valid(fs):
    d = (await fs.mkdir(ROOT, b"d", 0o755, CTX)).ino
    t = (await mkfile(fs, b"t")).ino
    for i in range(60):
        await fs.link(t, d, b"first-%03d" % i)
    before = await listdir(fs, d)
    order = sorted(before, key=before.get)
    mark = before[order[20]]
    depth0 = (await dirhdr(fs, d))[0]
    for i in range(1500):
        await fs.link(t, d, b"second-%04d" % i)
    assert (await dirhdr(fs, d))[0] > depth0
    now = await listdir(fs, d, page=97)
    # Splits moved entries between buckets but never changed a cookie.
    assert {n: now[n] for n in before} == before
    # Resuming from an old cookie gives exactly the entries after it.
    got = await listdir_after(fs, d, mark)
    assert got == sorted((n for n in now if now[n] > mark), key=now.get)
    # Even when the entry the cookie belonged to is gone.
    await fs.unlink(d, order[20])
    assert await listdir_after(fs, d, mark) == got


@pytest.mark.slow
async def test_directory_with_20000_entries(volume):
    fs = host(volume)
    d = (await fs.mkdir(ROOT, b"big", 0o755, CTX)).ino
    assert await dirhdr(fs, d) == (0, 2, 0)
    # 4000 inodes (the 64 MiB volume has 4200) and 16000 more hard links.
    inos = []
    for i in range(20000):
        name = b"entry-%05d" % i
        if i < 4000:
            inos.append((await fs.create(d, name, 0o644, CTX)).ino)
        else:
            await fs.link(inos[i % 4000], d, name)
    depth, next_bucket, count = await dirhdr(fs, d)
    assert count == 20000
    assert depth >= 7 and next_bucket > 100
    assert len(await listdir(fs, d)) == 20000
    fs2 = await remount(fs, volume)
    for i in range(20000):
        assert (await fs2.lookup(d, b"entry-%05d" % i)).ino == inos[i % 4000]
    with raises(errno.ENOENT):
        await fs2.lookup(d, b"entry-20000")
    assert (await fs2.getattr(inos[0])).nlink == 5
    assert (await fs2.getattr(inos[3999])).nlink == 5


async def test_directory_table_past_the_header_block(volume):
    """Long names: enough buckets that the bucket table spills out of DIRHDR
    into DIRTABLE blocks; then empty the directory and remove it."""
    fs = host(volume)
    start = await free_blocks(fs)
    d = (await fs.mkdir(ROOT, b"d", 0o755, CTX)).ino
    t = (await mkfile(fs, b"t")).ino
    names = [(b"%06d" % i) * 42 for i in range(4000)]  # 252 bytes each
    for n in names:
        await fs.link(t, d, n)
    depth, _, count = await dirhdr(fs, d)
    assert count == 4000
    assert 1 << depth > fmt.hdr_table_slots(BS)
    fs = await remount(fs, volume)
    assert set(await listdir(fs, d)) == set(names)
    for n in names[::3]:
        assert (await fs.lookup(d, n)).ino == t
    for n in names:
        await fs.unlink(d, n)
    assert await listdir(fs, d) == {}
    await fs.rmdir(ROOT, b"d")
    await fs.unlink(ROOT, b"t")
    await release(fs, d)
    await release(fs, t)
    assert await free_blocks(fs) == start


async def test_directory_reuses_names(fs):
    d = (await fs.mkdir(ROOT, b"d", 0o755, CTX)).ino
    for round_ in range(3):
        for i in range(200):
            await mkfile(fs, b"n%d" % i, bytes([round_]), parent=d)
        for i in range(200):
            a = await fs.lookup(d, b"n%d" % i)
            assert await fs.read(a.ino, 0, 1) == bytes([round_])
            await fs.unlink(d, b"n%d" % i)
            await release(fs, a.ino)
    assert (await dirhdr(fs, d))[2] == 0
    await fs.rmdir(ROOT, b"d")


# --------------------------------------------------------------------------
# Rename


async def test_rename_within_directory(fs):
    a = await mkfile(fs, b"a", b"content")
    await fs.rename(ROOT, b"a", ROOT, b"b")
    with raises(errno.ENOENT):
        await fs.lookup(ROOT, b"a")
    b = await fs.lookup(ROOT, b"b")
    assert b.ino == a.ino and await fs.read(b.ino, 0, 100) == b"content"
    assert set(await listdir(fs, ROOT)) == {b"b"}


async def test_rename_file_across_directories(fs):
    d1 = await fs.mkdir(ROOT, b"d1", 0o755, CTX)
    d2 = await fs.mkdir(ROOT, b"d2", 0o755, CTX)
    f = await mkfile(fs, b"f", b"x", parent=d1.ino)
    await fs.rename(d1.ino, b"f", d2.ino, b"g")
    assert (await fs.lookup(d2.ino, b"g")).ino == f.ino
    assert await listdir(fs, d1.ino) == {}
    assert (await fs.getattr(d1.ino)).nlink == 2
    assert (await fs.getattr(d2.ino)).nlink == 2
    assert (await dirhdr(fs, d1.ino))[2] == 0
    assert (await dirhdr(fs, d2.ino))[2] == 1


async def test_rename_directory_across_directories(fs):
    d1 = await fs.mkdir(ROOT, b"d1", 0o755, CTX)
    d2 = await fs.mkdir(ROOT, b"d2", 0o755, CTX)
    sub = await fs.mkdir(d1.ino, b"sub", 0o755, CTX)
    await mkfile(fs, b"inner", b"i", parent=sub.ino)
    assert (await fs.getattr(d1.ino)).nlink == 3
    await fs.rename(d1.ino, b"sub", d2.ino, b"moved")
    assert (await fs.getattr(d1.ino)).nlink == 2
    assert (await fs.getattr(d2.ino)).nlink == 3
    assert (await fs.getattr(ROOT)).nlink == 4
    assert (await fs.lookup(sub.ino, b"..")).ino == d2.ino
    assert (await fs.lookup(d2.ino, b"moved")).ino == sub.ino
    assert (await fs.lookup(sub.ino, b"inner")).size == 1
    # The old parent can now be removed; the new one cannot.
    with raises(errno.ENOTEMPTY):
        await fs.rmdir(ROOT, b"d2")
    await fs.rmdir(ROOT, b"d1")


async def test_rename_replaces_file_and_frees_it(fs):
    start = await free_blocks(fs)
    a = await mkfile(fs, b"a", b"new data")
    b = await mkfile(fs, b"b", data_of(8 * BS))
    await release(fs, b.ino)
    await fs.rename(ROOT, b"a", ROOT, b"b")
    assert (await fs.lookup(ROOT, b"b")).ino == a.ino
    assert await fs.read(a.ino, 0, 100) == b"new data"
    assert set(await listdir(fs, ROOT)) == {b"b"}
    with raises(errno.ENOENT):
        await fs.getattr(b.ino)
    assert await free_blocks(fs) == start - 1


async def test_rename_replaced_open_file_lives_until_forget(fs):
    await mkfile(fs, b"a", b"A")
    b = await mkfile(fs, b"b", b"B" * BS)
    await fs.rename(ROOT, b"a", ROOT, b"b")
    assert await fs.read(b.ino, 0, 2) == b"BB"
    assert (await fs.getattr(b.ino)).nlink == 0
    before = await free_blocks(fs)
    await release(fs, b.ino)
    assert await free_blocks(fs) == before + 1


async def test_rename_replaces_hard_linked_file(fs):
    a = await mkfile(fs, b"a", b"A")
    b = await mkfile(fs, b"b", b"B")
    await fs.link(b.ino, ROOT, b"b2")
    await fs.rename(ROOT, b"a", ROOT, b"b")
    assert (await fs.getattr(b.ino)).nlink == 1
    assert (await fs.lookup(ROOT, b"b2")).ino == b.ino
    assert (await fs.lookup(ROOT, b"b")).ino == a.ino


async def test_rename_replaces_empty_directory(fs):
    d1 = await fs.mkdir(ROOT, b"d1", 0o755, CTX)
    d2 = await fs.mkdir(ROOT, b"d2", 0o755, CTX)
    await fs.mkdir(d1.ino, b"x", 0o755, CTX)
    x = await fs.lookup(d1.ino, b"x")
    empty = await fs.mkdir(d2.ino, b"y", 0o755, CTX)
    await release(fs, empty.ino)
    assert (await fs.getattr(d2.ino)).nlink == 3
    await fs.rename(d1.ino, b"x", d2.ino, b"y")
    assert (await fs.lookup(d2.ino, b"y")).ino == x.ino
    assert (await fs.getattr(d1.ino)).nlink == 2
    assert (await fs.getattr(d2.ino)).nlink == 3
    assert (await fs.lookup(x.ino, b"..")).ino == d2.ino
    with raises(errno.ENOENT):
        await fs.getattr(empty.ino)


async def test_rename_replaces_empty_directory_in_same_parent(fs):
    await fs.mkdir(ROOT, b"a", 0o755, CTX)
    await fs.mkdir(ROOT, b"b", 0o755, CTX)
    assert (await fs.getattr(ROOT)).nlink == 4
    await fs.rename(ROOT, b"a", ROOT, b"b")
    assert (await fs.getattr(ROOT)).nlink == 3
    assert set(await listdir(fs, ROOT)) == {b"b"}


async def test_rename_onto_non_empty_directory(fs):
    await fs.mkdir(ROOT, b"a", 0o755, CTX)
    b = await fs.mkdir(ROOT, b"b", 0o755, CTX)
    await mkfile(fs, b"f", parent=b.ino)
    with raises(errno.ENOTEMPTY):
        await fs.rename(ROOT, b"a", ROOT, b"b")
    assert set(await listdir(fs, ROOT)) == {b"a", b"b"}


async def test_rename_type_mismatches(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    f = await mkfile(fs, b"f")
    with raises(errno.EISDIR):
        await fs.rename(ROOT, b"f", ROOT, b"d")
    with raises(errno.ENOTDIR):
        await fs.rename(ROOT, b"d", ROOT, b"f")
    assert (await fs.lookup(ROOT, b"d")).ino == d.ino
    assert (await fs.lookup(ROOT, b"f")).ino == f.ino


async def test_rename_directory_into_itself_or_below(fs):
    a = await fs.mkdir(ROOT, b"a", 0o755, CTX)
    b = await fs.mkdir(a.ino, b"b", 0o755, CTX)
    c = await fs.mkdir(b.ino, b"c", 0o755, CTX)
    with raises(errno.EINVAL):
        await fs.rename(ROOT, b"a", a.ino, b"x")
    with raises(errno.EINVAL):
        await fs.rename(ROOT, b"a", c.ino, b"x")
    with raises(errno.EINVAL):
        await fs.rename(a.ino, b"b", c.ino, b"x")
    # Tree unchanged.
    assert (await fs.lookup(ROOT, b"a")).ino == a.ino
    assert set(await listdir(fs, c.ino)) == set()
    assert (await fs.getattr(a.ino)).nlink == 3
    # Moving up is fine.
    await fs.rename(b.ino, b"c", ROOT, b"c")
    assert (await fs.lookup(c.ino, b"..")).ino == ROOT


async def test_rename_noreplace(fs):
    await mkfile(fs, b"a", b"A")
    b = await mkfile(fs, b"b", b"B")
    with raises(errno.EEXIST):
        await fs.rename(ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)
    assert (await fs.lookup(ROOT, b"b")).ino == b.ino
    await fs.rename(ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
    assert set(await listdir(fs, ROOT)) == {b"b", b"c"}


async def test_rename_exchange_is_refused(fs):
    await mkfile(fs, b"a")
    await mkfile(fs, b"b")
    with raises(errno.EINVAL):
        await fs.rename(ROOT, b"a", ROOT, b"b", RENAME_EXCHANGE)


async def test_rename_onto_another_link_of_same_inode_is_noop(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    a = await mkfile(fs, b"a", b"A")
    await fs.link(a.ino, d.ino, b"a2")
    await fs.rename(ROOT, b"a", d.ino, b"a2")
    assert (await fs.lookup(ROOT, b"a")).ino == a.ino
    assert (await fs.lookup(d.ino, b"a2")).ino == a.ino
    assert (await fs.getattr(a.ino)).nlink == 2
    await fs.rename(ROOT, b"a", ROOT, b"a")  # onto itself
    assert (await fs.lookup(ROOT, b"a")).ino == a.ino


async def test_rename_missing_source(fs):
    with raises(errno.ENOENT):
        await fs.rename(ROOT, b"nope", ROOT, b"x")


async def test_rename_keeps_data_across_remount(fs, volume):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    f = await mkfile(fs, b"f", data_of(3 * BS))
    await fs.rename(ROOT, b"f", d.ino, b"g")
    await fs.rename(ROOT, b"d", ROOT, b"e")
    fs2 = await remount(fs, volume)
    e = await fs2.lookup(ROOT, b"e")
    g = await fs2.lookup(e.ino, b"g")
    assert g.ino == f.ino and await fs2.read(g.ino, 0, 3 * BS) == data_of(3 * BS)
    assert set(await listdir(fs2, ROOT)) == {b"e"}


# --------------------------------------------------------------------------
# Links, symlinks, special files


async def test_hard_links(fs):
    a = await mkfile(fs, b"a", b"shared")
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    l1 = await fs.link(a.ino, d.ino, b"b")
    assert l1.ino == a.ino and l1.nlink == 2
    await fs.link(a.ino, ROOT, b"c")
    assert (await fs.getattr(a.ino)).nlink == 3
    await fs.write(a.ino, 0, b"SH")
    assert await fs.read((await fs.lookup(d.ino, b"b")).ino, 0, 10) == b"SHared"
    await fs.unlink(ROOT, b"a")
    assert (await fs.getattr(a.ino)).nlink == 2
    await fs.unlink(ROOT, b"c")
    await release(fs, a.ino)
    assert await fs.read(a.ino, 0, 10) == b"SHared"  # one name left
    await fs.unlink(d.ino, b"b")
    with raises(errno.ENOENT):
        await fs.getattr(a.ino)


async def test_link_errors(fs):
    a = await mkfile(fs, b"a")
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    with raises(errno.EPERM):
        await fs.link(d.ino, ROOT, b"dirlink")
    with raises(errno.EEXIST):
        await fs.link(a.ino, ROOT, b"d")
    with raises(errno.ENOTDIR):
        await fs.link(a.ino, a.ino, b"x")
    assert (await fs.getattr(a.ino)).nlink == 1


async def test_symlink_readlink(fs):
    s = await fs.symlink(ROOT, b"s", b"../some/where", CTX)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"../some/where")
    assert await fs.readlink(s.ino) == b"../some/where"
    assert (await fs.lookup(ROOT, b"s")).ino == s.ino
    long = b"t" * (BS - 1)
    s2 = await fs.symlink(ROOT, b"long", long, CTX)
    assert await fs.readlink(s2.ino) == long
    with raises(errno.ENAMETOOLONG):
        await fs.symlink(ROOT, b"toolong", b"t" * BS, CTX)
    with raises(errno.ENOENT):
        await fs.lookup(ROOT, b"toolong")


async def test_mknod_fifo_and_device(fs, volume):
    p = await fs.mknod(ROOT, b"pipe", stat.S_IFIFO | 0o640, 0, CTX)
    assert stat.S_ISFIFO(p.mode) and stat.S_IMODE(p.mode) == 0o640 and p.size == 0
    dev = os.makedev(8, 1)
    c = await fs.mknod(ROOT, b"dev", stat.S_IFBLK | 0o600, dev, CTX)
    assert stat.S_ISBLK(c.mode) and c.rdev == dev
    fs2 = await remount(fs, volume)
    assert stat.S_ISFIFO((await fs2.lookup(ROOT, b"pipe")).mode)
    assert (await fs2.lookup(ROOT, b"dev")).rdev == dev
    kinds = {e.name: e.dtype for e, _ in await fs2.readdir(ROOT, DOTDOT_COOKIE)}
    assert kinds == {b"pipe": stat.S_IFIFO >> 12, b"dev": stat.S_IFBLK >> 12}


# --------------------------------------------------------------------------
# Attributes


async def test_setattr_chmod_chown_utimens(fs):
    a = await mkfile(fs, b"f")
    r = await fs.setattr(a.ino, mode=0o4751)
    assert r.mode == stat.S_IFREG | 0o4751
    r = await fs.setattr(a.ino, mode=stat.S_IFDIR | 0o600)  # the type never changes
    assert r.mode == stat.S_IFREG | 0o600
    r = await fs.setattr(a.ino, uid=1234, gid=5678)
    assert (r.uid, r.gid) == (1234, 5678)
    r = await fs.setattr(a.ino, atime_ns=111_000_000_007, mtime_ns=222_000_000_009)
    assert (r.atime_ns, r.mtime_ns) == (111_000_000_007, 222_000_000_009)
    assert r.ctime_ns > 222_000_000_009  # now
    r = await fs.setattr(a.ino, ctime_ns=42)
    assert r.ctime_ns == 42
    got = await fs.getattr(a.ino)
    assert (got.mode, got.uid, got.gid, got.atime_ns, got.mtime_ns, got.ctime_ns) == (
        stat.S_IFREG | 0o600,
        1234,
        5678,
        111_000_000_007,
        222_000_000_009,
        42,
    )


async def test_new_nodes_take_caller_ids(fs):
    ctx = Ctx(1000, 2000)
    a = await fs.create(ROOT, b"f", 0o600, ctx)
    d = await fs.mkdir(ROOT, b"d", 0o700, ctx)
    assert (a.uid, a.gid, d.uid, d.gid) == (1000, 2000, 1000, 2000)


async def test_setgid_directory_inheritance(fs):
    d = await fs.mkdir(ROOT, b"shared", 0o755, CTX)
    await fs.setattr(d.ino, gid=300, mode=stat.S_ISGID | 0o775)
    ctx = Ctx(1000, 2000)
    f = await fs.create(d.ino, b"f", 0o644, ctx)
    assert (f.uid, f.gid) == (1000, 300)
    assert not f.mode & stat.S_ISGID
    sub = await fs.mkdir(d.ino, b"sub", 0o755, ctx)
    assert sub.gid == 300 and sub.mode & stat.S_ISGID
    g = await fs.create(sub.ino, b"g", 0o644, ctx)
    assert g.gid == 300  # inherited two levels down
    plain = await fs.mkdir(ROOT, b"plain", 0o755, ctx)
    assert plain.gid == 2000 and not plain.mode & stat.S_ISGID


# --------------------------------------------------------------------------
# Extended attributes


async def test_xattrs_set_get_list_remove(fs):
    a = await mkfile(fs, b"f")
    assert await fs.listxattr(a.ino) == []
    with raises(errno.ENODATA):
        await fs.getxattr(a.ino, b"user.x")
    with raises(errno.ENODATA):
        await fs.removexattr(a.ino, b"user.x")
    await fs.setxattr(a.ino, b"user.b", b"2")
    await fs.setxattr(a.ino, b"user.a", b"\0binary\xff")
    await fs.setxattr(a.ino, b"user.e", b"")
    assert sorted(await fs.listxattr(a.ino)) == [b"user.a", b"user.b", b"user.e"]
    assert await fs.getxattr(a.ino, b"user.a") == b"\0binary\xff"
    assert await fs.getxattr(a.ino, b"user.e") == b""
    await fs.setxattr(a.ino, b"user.b", b"replaced")
    assert await fs.getxattr(a.ino, b"user.b") == b"replaced"
    await fs.removexattr(a.ino, b"user.a")
    assert sorted(await fs.listxattr(a.ino)) == [b"user.b", b"user.e"]
    with raises(errno.ENODATA):
        await fs.getxattr(a.ino, b"user.a")


async def test_xattr_block_is_allocated_and_freed(fs):
    start = await free_blocks(fs)
    a = await mkfile(fs, b"f")
    await fs.setxattr(a.ino, b"user.k", b"v")
    assert await free_blocks(fs) == start - 1
    assert (await fs.getattr(a.ino)).blocks == BS // 512
    await fs.removexattr(a.ino, b"user.k")
    assert await free_blocks(fs) == start
    assert (await fs.getattr(a.ino)).blocks == 0
    await fs.setxattr(a.ino, b"user.k", b"v")
    await release(fs, a.ino)
    await fs.unlink(ROOT, b"f")
    assert await free_blocks(fs) == start


async def test_xattr_too_big_is_enospc(fs):
    a = await mkfile(fs, b"f")
    await fs.setxattr(a.ino, b"user.small", b"s")
    with raises(errno.ENOSPC):
        await fs.setxattr(a.ino, b"user.big", b"x" * BS)
    assert await fs.listxattr(a.ino) == [b"user.small"]
    # Exactly filling the block is allowed.
    room = fmt.payload_size(BS) - fmt.xattrs_size({b"user.small": b"s"}) - 3 - len(b"user.big")
    await fs.setxattr(a.ino, b"user.big", b"y" * room)
    assert await fs.getxattr(a.ino, b"user.big") == b"y" * room
    with raises(errno.ENOSPC):
        await fs.setxattr(a.ino, b"user.c", b"")


async def test_xattr_bad_names(fs):
    a = await mkfile(fs, b"f")
    with raises(errno.ERANGE):
        await fs.setxattr(a.ino, b"", b"v")
    with raises(errno.ERANGE):
        await fs.setxattr(a.ino, b"u" * 256, b"v")


async def test_xattrs_on_directory_persist(fs, volume):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    await fs.setxattr(d.ino, b"trusted.t", b"dirval")
    await fs.setxattr(ROOT, b"user.root", b"r")
    fs2 = await remount(fs, volume)
    assert await fs2.getxattr(d.ino, b"trusted.t") == b"dirval"
    assert await fs2.getxattr(ROOT, b"user.root") == b"r"


# --------------------------------------------------------------------------
# statfs and a full volume


async def test_statfs_counts(fs):
    s = await fs.statfs()
    assert s.block_size == BS and s.namemax == 255
    assert s.blocks == fs.sb.data_blocks
    assert s.files == fs.sb.inode_count
    assert s.free_files == s.files - 1  # the root
    assert s.free_blocks == s.blocks - 2  # the root's header and first bucket
    a = await mkfile(fs, b"f", data_of(3 * BS))
    s2 = await fs.statfs()
    assert s2.free_files == s.free_files - 1
    assert s2.free_blocks == s.free_blocks - 3
    await fs.mkdir(ROOT, b"d", 0o755, CTX)
    s3 = await fs.statfs()
    assert s3.free_files == s.free_files - 2
    assert s3.free_blocks == s.free_blocks - 5
    await fs.unlink(ROOT, b"f")
    await release(fs, a.ino)
    assert (await fs.statfs()).free_blocks == s.free_blocks - 2


async def test_full_volume_enospc_then_recovers():
    volume = await make_volume(8 << 20)
    fs = host(volume)
    start = await free_blocks(fs)
    a = await mkfile(fs, b"big")
    chunk = b"\xa5" * (64 << 10)
    off, short = 0, 0
    with raises(errno.ENOSPC):
        while True:
            assert off < 2 * start * BS, "never ran out of space"
            n = await fs.write(a.ino, off, chunk)
            assert 0 < n <= len(chunk)
            short += n < len(chunk)
            off += n
    # The last write that got anything in was short; then nothing fit.
    assert short == 1
    assert off > 4 << 20
    assert await free_blocks(fs) == 0
    attr = await fs.getattr(a.ino)
    assert attr.size == off
    assert attr.blocks // (BS // 512) == start  # data and indirect blocks
    assert await fs.read(a.ino, off - 3, 10) == b"\xa5" * 3
    # Overwriting in place needs no space.
    assert await fs.write(a.ino, 0, b"Z" * BS) == BS
    with raises(errno.ENOSPC):  # a new file's first byte does not fit
        await mkfile(fs, b"another", b"x")
    # Deleting gives every block back and the volume works again.
    await fs.unlink(ROOT, b"big")
    await release(fs, a.ino)
    assert await free_blocks(fs) == start
    b = await mkfile(fs, b"again", data_of(100 * BS))
    assert await fs.read(b.ino, 0, 100 * BS) == data_of(100 * BS)
    fs2 = await remount(fs, volume)
    assert await free_blocks(fs2) == start - 101
    assert await fs2.read(b.ino, 0, 100 * BS) == data_of(100 * BS)


async def test_a_write_on_a_full_volume_waits_for_the_kernel_to_forget_an_unlinked_file():
    """`rm big; cp other .`: the kernel forgets big's inode on its own time
    after the unlink, and only then are its blocks free.  A write that
    finds the volume full meanwhile waits for that, then succeeds."""
    volume = await make_volume(8 << 20)
    fs = host(volume)
    a = await mkfile(fs, b"big")
    chunk = b"\xa5" * (64 << 10)
    off = 0
    with raises(errno.ENOSPC):
        while True:
            off += await fs.write(a.ino, off, chunk)
    b = await mkfile(fs, b"other")
    await fs.unlink(ROOT, b"big")  # the kernel still holds a lookup of it

    async def forget_later() -> None:
        await trio.sleep(0.1)  # its FORGET comes a moment after the unlink
        await release(fs, a.ino)

    async with trio.open_nursery() as n:
        n.start_soon(forget_later)
        assert await fs.write(b.ino, 0, chunk) == len(chunk)
    assert await fs.read(b.ino, 0, len(chunk)) == chunk


async def _fill_until(fs, leave: int) -> None:
    """Use up the volume's free space with a filler file until `leave` blocks remain."""
    filler = await mkfile(fs, b"filler")
    need = await free_blocks(fs) - leave
    # Leave room for the filler's own indirect blocks.
    await fs.write(filler.ino, 0, bytes((need - 24) * BS))
    while await free_blocks(fs) > leave + 10:
        await fs.write(filler.ino, 0, bytes(BS), append=True)
    # The last few go to a small file, which needs no indirect block: one
    # block per append, so we land exactly.
    last = await mkfile(fs, b"filler2")
    while await free_blocks(fs) > leave:
        await fs.write(last.ino, 0, bytes(BS), append=True)
    assert await free_blocks(fs) == leave


async def test_write_that_runs_out_midway_is_short_and_leaks_nothing():
    volume = await make_volume(8 << 20)
    fs = host(volume)
    start = await free_blocks(fs)
    b = await mkfile(fs, b"b", b"x")  # height 0: one data block
    await _fill_until(fs, 60)
    # Needs a new root node (height 0 -> 1), 8 blocks under root 0, a node
    # for root 1 and 92 blocks under it: only part of it fits.
    n = await fs.write(b.ino, 500 * BS, b"y" * (100 * BS))
    assert 0 < n < 100 * BS and n % BS == 0
    assert await free_blocks(fs) == 0
    attr = await fs.getattr(b.ino)
    assert attr.size == 500 * BS + n
    assert await fs.read(b.ino, 500 * BS + n - 2, 10) == b"yy"
    # Every allocated block is accounted to the file: st_blocks covers the
    # data, the two indirect blocks and the first block.
    assert attr.blocks // (BS // 512) == n // BS + 3
    fs = await remount(fs, volume)
    assert (await fs.getattr(b.ino)).blocks == attr.blocks
    for name in (b"b", b"filler", b"filler2"):
        await fs.unlink(ROOT, name)
    assert await free_blocks(fs) == start


async def _failed_write_over_hole(fs, off: int):
    """A sparse file whose hole at block 900 is written from `off` until the
    volume runs out; the free blocks hold a deleted file's bytes."""
    old = await mkfile(fs, b"old", b"SECRET!!" * (1220 * BS // 8))
    await fs.fsync(old.ino)
    await fs.unlink(ROOT, b"old")
    await release(fs, old.ino)
    b = await mkfile(fs, b"b")
    await fs.write(b.ino, 1000 * BS, b"z")
    await fs.write(b.ino, 1500 * BS, b"z")
    await _fill_until(fs, 147)
    # The holes under root 1 fit, then root 2's do not: a short write.
    n = await fs.write(b.ino, off, b"y" * (200 * BS))
    assert 100 * BS < n < 200 * BS
    return b


async def test_short_write_over_hole_reads_back():
    volume = await make_volume(8 << 20)
    fs = host(volume)
    b = await _failed_write_over_hole(fs, 900 * BS)
    assert (await fs.getattr(b.ino)).size == 1500 * BS + 1
    assert await fs.read(b.ino, 900 * BS, 16) == b"y" * 16
    assert await fs.read(b.ino, 1500 * BS, 2) == b"z"
    await fs.setattr(b.ino, size=0)
    assert (await fs.getattr(b.ino)).blocks == 0


async def test_short_write_from_mid_block_never_exposes_old_data():
    volume = await make_volume(8 << 20)
    fs = host(volume)
    b = await _failed_write_over_hole(fs, 900 * BS + 100)
    assert await fs.read(b.ino, 900 * BS + 100, 4) == b"yyyy"
    # The 100 bytes before the write were a hole: zeros, not SECRET!!...
    assert await fs.read(b.ino, 900 * BS, 100) == bytes(100)


# --------------------------------------------------------------------------
# Locks taken by operations


async def test_read_only_operations_take_only_shared_locks():
    volume = await make_volume()
    fs = host(volume)
    f = await mkfile(fs, b"f", b"data")
    await fs.mkdir(ROOT, b"d", 0o755, CTX)
    fs2 = await remount(fs, volume)  # a host holding nothing yet
    await fs2.lookup(ROOT, b"f")
    await fs2.getattr(f.ino)
    await fs2.read(f.ino, 0, 10)
    await fs2.readdir(ROOT, 0)
    await fs2.statfs()
    master = fs2.cache.agent.master
    assert master.holders, "reads took locks"
    modes = {res: held[fs2.host] for res, held in master.holders.items()}
    assert set(modes.values()) == {Mode.S}, modes


async def test_readdir_never_returns_more_than_limit():
    fs = host(await make_volume())
    for i in range(5):
        await mkfile(fs, b"f%d" % i)
    assert len(await fs.readdir(ROOT, DOTDOT_COOKIE, 3)) == 3
    assert len(await fs.readdir(ROOT, DOT_COOKIE, 2)) == 2
    assert len(await fs.readdir(ROOT, 0, 2)) == 2


async def test_writes_take_exclusive_locks(fs, volume):
    f = await mkfile(fs, b"f", b"data")
    fs2 = await remount(fs, volume)
    await fs2.write(f.ino, 0, b"DATA")
    master = fs2.cache.agent.master
    blk, _ = fs2.sb.inode_location(f.ino)
    assert master.holders[("block", blk)] == {fs2.host: Mode.X}


# --------------------------------------------------------------------------
# Names and errors


async def test_name_too_long(fs):
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    a = await mkfile(fs, b"a")
    n255, n256 = b"n" * 255, b"n" * 256
    for call in (
        lambda n: fs.create(ROOT, n, 0o644, CTX),
        lambda n: fs.mkdir(ROOT, n, 0o755, CTX),
        lambda n: fs.mknod(ROOT, n, stat.S_IFIFO | 0o644, 0, CTX),
        lambda n: fs.symlink(ROOT, n, b"x", CTX),
        lambda n: fs.link(a.ino, d.ino, n),
        lambda n: fs.rename(ROOT, b"a", d.ino, n),
    ):
        with raises(errno.ENAMETOOLONG):
            await call(n256)
    await mkfile(fs, n255)
    assert (await fs.lookup(ROOT, n255)).size == 0
    assert n255 in await listdir(fs, ROOT)
    await fs.rename(ROOT, b"a", d.ino, b"m" * 255)


async def test_invalid_names(fs):
    for bad in (b"", b".", b"..", b"a/b", b"a\0b"):
        with raises(errno.EINVAL):
            await fs.create(ROOT, bad, 0o644, CTX)
    assert await listdir(fs, ROOT) == {}


async def test_eexist(fs):
    await mkfile(fs, b"f")
    await fs.mkdir(ROOT, b"d", 0o755, CTX)
    for name in (b"f", b"d"):
        with raises(errno.EEXIST):
            await fs.create(ROOT, name, 0o644, CTX)
        with raises(errno.EEXIST):
            await fs.mkdir(ROOT, name, 0o755, CTX)
        with raises(errno.EEXIST):
            await fs.mknod(ROOT, name, stat.S_IFIFO | 0o644, 0, CTX)
        with raises(errno.EEXIST):
            await fs.symlink(ROOT, name, b"t", CTX)
    assert set(await listdir(fs, ROOT)) == {b"f", b"d"}
    assert (await fs.statfs()).free_files == fs.sb.inode_count - 3


async def test_enoent(fs):
    with raises(errno.ENOENT):
        await fs.lookup(ROOT, b"missing")
    with raises(errno.ENOENT):
        await fs.unlink(ROOT, b"missing")
    with raises(errno.ENOENT):
        await fs.rmdir(ROOT, b"missing")
    with raises(errno.ENOENT):
        await fs.getattr(2)  # never allocated
    with raises(errno.ENOENT):
        await fs.getattr(fs.sb.inode_count)  # in an unformatted inode table block
    with raises(errno.ENOENT):
        await fs.getattr(fs.sb.inode_count + 1)  # past the last inode
    with raises(errno.ENOENT):
        await fs.getattr(0)
    with raises(errno.ENOENT):
        await fs.create(12345, b"x", 0o644, CTX)


# --------------------------------------------------------------------------
# Persistence: everything reaches storage


async def test_tree_survives_remount(fs, volume):
    d = await fs.mkdir(ROOT, b"dir", 0o750, Ctx(1000, 100))
    sub = await fs.mkdir(d.ino, b"sub", 0o700, CTX)
    f = await mkfile(fs, b"file", data_of(3 * BS + 77, seed=7), parent=d.ino)
    await fs.link(f.ino, ROOT, b"hardlink")
    s = await fs.symlink(ROOT, b"sym", b"dir/file", CTX)
    p = await fs.mknod(sub.ino, b"fifo", stat.S_IFIFO | 0o600, 0, CTX)
    await fs.setxattr(f.ino, b"user.note", b"hello")
    await fs.setattr(f.ino, atime_ns=10, mtime_ns=20)
    inos = [ROOT, d.ino, sub.ino, f.ino, s.ino, p.ino]
    attrs = {i: await fs.getattr(i) for i in inos}
    tree = {i: await listdir(fs, i) for i in (ROOT, d.ino, sub.ino)}

    fs2 = await remount(fs, volume)
    assert {i: await fs2.getattr(i) for i in inos} == attrs
    assert {i: await listdir(fs2, i) for i in (ROOT, d.ino, sub.ino)} == tree
    assert set(tree[ROOT]) == {b"dir", b"hardlink", b"sym"}
    assert await fs2.read(f.ino, 0, 10 * BS) == data_of(3 * BS + 77, seed=7)
    assert await fs2.readlink(s.ino) == b"dir/file"
    assert await fs2.getxattr(f.ino, b"user.note") == b"hello"
    assert (await fs2.lookup(sub.ino, b"..")).ino == d.ino
    assert attrs[f.ino].nlink == 2
    # The new host can keep working on the tree.
    await fs2.unlink(ROOT, b"hardlink")
    assert (await fs2.getattr(f.ino)).nlink == 1
    g = await mkfile(fs2, b"g", b"new", parent=sub.ino)
    assert g.ino not in inos


async def test_fsync_reaches_storage_without_unmount(fs, volume):
    """fsync: the data in place, the metadata in the log.  A crash right
    after it (the volume as it is now, the host gone) loses neither."""
    a = await mkfile(fs, b"f", b"synced")
    await fs.fsync(a.ino)
    crashed = MemoryStorage(volume.size)
    crashed.write_sync(0, volume.read_sync(0, volume.size))
    await journal.replay(crashed, read_superblock(crashed))
    other = host(crashed)
    got = await other.lookup(ROOT, b"f")
    assert await other.read(got.ino, 0, 10) == b"synced"


async def test_file_past_4_gib_after_remount(fs, volume):
    a = await mkfile(fs, b"big")
    off = 4 * GiB + 1000
    await fs.write(a.ino, 100, b"low")
    await fs.write(a.ino, off, b"high" * 2000)
    fs2 = await remount(fs, volume)
    attr = await fs2.getattr(a.ino)
    assert attr.size == off + 8000
    assert await fs2.read(a.ino, off, 8000) == b"high" * 2000
    assert await fs2.read(a.ino, 100, 3) == b"low"
    assert await fs2.read(a.ino, 2 * GiB, 10) == bytes(10)
    assert await fs2.read(a.ino, off - 4, 8) == b"\0\0\0\0high"


async def test_data_blocks_on_storage_are_the_bytes_written(fs, volume):
    payload = data_of(4 * BS, seed=3)
    a = await mkfile(fs, b"f", payload)
    fs2 = await remount(fs, volume)
    assert await fs2.read(a.ino, 0, 4 * BS) == payload
    # Data blocks hold the raw bytes: no header, nothing else.
    pbns = await physical_blocks(fs2, a.ino, 0, 4)
    assert all(pbns) and pbns == list(range(pbns[0], pbns[0] + 4))  # adjacent
    for k, p in enumerate(pbns):
        assert volume.read_sync(p * BS, BS) == payload[k * BS : (k + 1) * BS]


# --------------------------------------------------------------------------
# Another geometry: 1 KiB blocks, several allocation groups


async def test_small_blocks_several_groups():
    volume = await make_volume(32 << 20, block_size=1024)
    fs = host(volume)
    sb = fs.sb
    assert sb.block_size == 1024 and sb.group_count >= 4
    start = await free_blocks(fs)
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    assert sb.group_of_inode(d.ino) != sb.group_of_inode(ROOT)  # directories spread
    f = await fs.create(d.ino, b"big", 0o644, CTX)
    assert sb.group_of_inode(f.ino) == sb.group_of_inode(d.ino)  # files stay near
    payload = data_of(12 << 20, seed=5)
    assert await fs.write(f.ino, 0, payload) == len(payload)
    pbns = await physical_blocks(fs, f.ino, 0, len(payload) // 1024)
    groups = [sb.group_of_block(p) for p in pbns]
    assert groups[0] == sb.group_of_inode(f.ino)
    assert len(set(groups)) >= 2  # more than a group's worth of data
    assert all(sb.is_data_block(p) for p in pbns) and len(set(pbns)) == len(pbns)
    fs = await remount(fs, volume)
    assert await fs.read(f.ino, 0, len(payload)) == payload
    assert await fs.read(f.ino, 5_000_001, 7) == payload[5_000_001:5_000_008]
    await fs.unlink(d.ino, b"big")
    await fs.rmdir(ROOT, b"d")
    assert await free_blocks(fs) == start
