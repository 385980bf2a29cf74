"""fsck: clean volumes stay clean; each kind of damage is reported by -n
(which writes nothing), repaired by -y, and a second -n finds nothing."""

from __future__ import annotations

import hashlib
import logging
import random
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
from conftest import CTX, ROOT, host, make_volume

from sharedfs import format as fmt
from sharedfs import fsck as fsck_module
from sharedfs.errors import FsError, QuietError
from sharedfs.format import BlockType, Inode
from sharedfs.fs import FileSystem
from sharedfs.fsck import Fsck, fsck, run_fsck
from sharedfs.mkfs import format_volume
from sharedfs.protocol import Mode
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock, write_slot

DATA = bytes(range(256)) * 64  # four 4 KiB blocks
BIG = bytes((i * 7 + i // 4096) % 251 for i in range(20 * 4096))  # needs an indirect block
MANY = 300  # entries enough for several buckets


# --------------------------------------------------------------------------
# Building and damaging volumes


async def populate(storage: MemoryStorage) -> dict[str, int]:
    """A small tree of every kind of inode; returns name -> inode number."""
    fs = host(storage)
    a = await fs.mkdir(ROOT, b"a", 0o755, CTX)
    b = await fs.mkdir(a.ino, b"b", 0o755, CTX)
    f = await fs.create(ROOT, b"f", 0o644, CTX)
    await fs.write(f.ino, 0, DATA)
    await fs.setxattr(f.ino, b"user.colour", b"blue")
    await fs.link(f.ino, b.ino, b"f2")
    big = await fs.create(a.ino, b"big", 0o644, CTX)
    await fs.write(big.ino, 0, BIG)
    s = await fs.symlink(ROOT, b"s", b"a/big", CTX)
    many = await fs.mkdir(ROOT, b"many", 0o755, CTX)
    for i in range(MANY):
        n = await fs.create(many.ino, b"n%d" % i, 0o644, CTX)
        await fs.write(n.ino, 0, b"file %d" % i)
    g = await fs.create(ROOT, b"g", 0o600, CTX)
    await fs.write(g.ino, 0, b"G" * 4096)
    await fs.destroy()
    return {
        "a": a.ino,
        "b": b.ino,
        "f": f.ino,
        "big": big.ino,
        "s": s.ino,
        "many": many.ino,
        "g": g.ino,
    }


_POPULATED: list[tuple[MemoryStorage, dict[str, int]]] = []


@pytest.fixture
async def vol() -> tuple[MemoryStorage, dict[str, int]]:
    """A fresh copy of one populated volume (built once: it takes a while)."""
    if not _POPULATED:
        storage = await make_volume()
        _POPULATED.append((storage, await populate(storage)))
    master, inos = _POPULATED[0]
    storage = MemoryStorage(master.size)
    storage._data[:] = master._data
    return storage, dict(inos)


def sb_of(storage: MemoryStorage) -> fmt.Superblock:
    return read_superblock(storage)


def read_block(storage: MemoryStorage, b: int) -> bytearray:
    bs = sb_of(storage).block_size
    return bytearray(storage.read_sync(b * bs, bs))


def write_block(storage: MemoryStorage, b: int, buf: bytes | bytearray) -> None:
    storage.write_sync(b * len(buf), buf)


def edit_block(
    storage: MemoryStorage, b: int, btype: BlockType, change: Callable[[bytearray], None]
) -> None:
    """Change a metadata block and seal it again: wrong, but checksum-valid."""
    buf = read_block(storage, b)
    change(buf)
    fmt.seal(buf, btype, b, fmt.read_header(buf).version)
    write_block(storage, b, buf)


def flip(storage: MemoryStorage, b: int, off: int) -> None:
    """Damage a block without resealing it (a checksum failure)."""
    buf = read_block(storage, b)
    buf[off] ^= 0x5A
    write_block(storage, b, buf)


def live_slot(pid: int, hostname: str) -> fmt.HostSlot:
    now = time.time_ns()
    return fmt.HostSlot(
        in_use=True, pid=pid, mount_count=1, heartbeat_ns=now, since_ns=now, hostname=hostname
    )


def get_inode(storage: MemoryStorage, ino: int) -> Inode:
    blk, off = sb_of(storage).inode_location(ino)
    return Inode.unpack_from(ino, read_block(storage, blk), off)


def edit_inode(storage: MemoryStorage, ino: int, **changes: object) -> None:
    blk, off = sb_of(storage).inode_location(ino)

    def change(buf: bytearray) -> None:
        inode = Inode.unpack_from(ino, buf, off)
        for k, v in changes.items():
            setattr(inode, k, v)
        inode.pack_into(buf, off)

    edit_block(storage, blk, BlockType.INODES, change)


async def core(storage: MemoryStorage, work: Callable[[FileSystem], Awaitable[None]]) -> None:
    """Run raw core steps as one operation (to make damage the API refuses to)."""
    fs = host(storage)
    run = getattr(fs, "run", None)
    if run is not None:
        await run(work, fs)
    else:
        async with fs._op:
            await work(fs)
            store = getattr(fs, "_store_inodes", None)
            if store is not None:
                await store()
    await fs.cache.sync()


async def add_entry(storage: MemoryStorage, parent: int, name: bytes, ino: int, mode: int) -> None:
    async def work(fs: FileSystem) -> None:
        d = await fs._dir(parent, Mode.X)
        await fs._dir_add(d, name, ino, mode)
        await fs._iput(d)

    await core(storage, work)


async def remove_entry(storage: MemoryStorage, parent: int, name: bytes) -> None:
    """Remove a name without touching the link count of what it named."""

    async def work(fs: FileSystem) -> None:
        d = await fs._dir(parent, Mode.X)
        await fs._dir_remove(d, name)
        await fs._iput(d)

    await core(storage, work)


def bitmap_edit(storage: MemoryStorage, blockno: int, bit: int, value: bool, counter: int) -> None:
    """Set or clear a bitmap bit and move the free counter by `counter`."""

    def change(buf: bytearray) -> None:
        (fmt.bit_set if value else fmt.bit_clear)(buf, bit)
        fmt.set_bitmap_free_count(buf, fmt.bitmap_free_count(buf) + counter)

    btype = BlockType.BITMAP if blockno == sb_of(storage).bitmap_block(0) else BlockType.IBITMAP
    edit_block(storage, blockno, btype, change)


def map_lbn(storage: MemoryStorage, ino: int, lbn: int) -> int:
    """The physical block of logical block `lbn` of an inode (0: a hole)."""
    inode = get_inode(storage, ino)
    ptrs = fmt.ptrs_per_block(sb_of(storage).block_size)
    span = ptrs**inode.height
    p = inode.roots[lbn // span]
    lbn %= span
    while span > 1 and p:
        span //= ptrs
        p = fmt.get_ptr(read_block(storage, p), lbn // span)
        lbn %= span
    return p


def dir_blocks(storage: MemoryStorage, ino: int) -> list[int]:
    """A small directory's blocks by logical number (height-0 block map)."""
    inode = get_inode(storage, ino)
    assert inode.height == 0
    return inode.roots


# --------------------------------------------------------------------------
# Checking


async def assert_repaired(storage: MemoryStorage, *needles: str) -> Fsck:
    """-n reports every needle and writes nothing; -y repairs (exit 1); a
    second -n is clean."""
    writes = storage.writes
    found = await run_fsck(storage, repair=False)
    assert storage.writes == writes, "fsck -n wrote to the volume"
    assert found.exit_code == 4 and found.found_errors, found.problems
    for needle in needles:
        assert any(needle in p for p in found.problems), (needle, found.problems)
    fixed = await run_fsck(storage, repair=True)
    assert fixed.exit_code == 1, fixed.problems
    assert fixed.corrected == fixed.found_errors
    again = await run_fsck(storage, repair=False)
    assert again.exit_code == 0, again.problems
    return fixed


async def read_path(fs: FileSystem, *names: bytes) -> bytes:
    ino = ROOT
    for n in names:
        ino = (await fs.lookup(ino, n)).ino
    attr = await fs.getattr(ino)
    return await fs.read(ino, 0, attr.size)


async def listing(fs: FileSystem, ino: int) -> dict[bytes, int]:
    """A directory's names (without the . and .. that readdir may add)."""
    out = {}
    after = 0
    while batch := await fs.readdir(ino, after, 1000):
        out.update((e.name, e.ino) for e, _ in batch if e.name not in (b".", b".."))
        after = batch[-1][0].cookie
    return out


async def assert_tree_intact(
    storage: MemoryStorage, *, many: bool = True, symlink: bool = True
) -> None:
    fs = host(storage)
    assert await read_path(fs, b"f") == DATA
    assert await read_path(fs, b"a", b"b", b"f2") == DATA
    assert await read_path(fs, b"a", b"big") == BIG
    if symlink:
        assert await fs.readlink((await fs.lookup(ROOT, b"s")).ino) == b"a/big"
    assert await fs.getxattr((await fs.lookup(ROOT, b"f")).ino, b"user.colour") == b"blue"
    if many:
        m = (await fs.lookup(ROOT, b"many")).ino
        for i in (0, 150, MANY - 1):
            assert await read_path(fs, b"many", b"n%d" % i) == b"file %d" % i
        assert len(await listing(fs, m)) == MANY


# --------------------------------------------------------------------------
# Clean volumes


async def test_fresh_volume_is_clean():
    storage = await make_volume()
    r = await run_fsck(storage)
    assert r.exit_code == 0 and not r.problems
    assert r.files == 0 and r.directories == 1
    assert "clean" in r.summary()
    writes = storage.writes
    r = await run_fsck(storage, repair=True)
    assert r.exit_code == 0 and storage.writes == writes


@pytest.mark.parametrize("geometry", [{}, {"size": 16 << 20, "block_size": 1024}])
async def test_populated_volume_is_clean(geometry):
    storage = await make_volume(**geometry)
    if geometry:
        assert sb_of(storage).group_count > 1
    inos = await populate(storage)
    r = await run_fsck(storage)
    assert r.exit_code == 0, r.problems
    assert r.directories == 4 and r.files == MANY + 4
    await assert_tree_intact(storage)
    assert inos["a"] != inos["b"]


async def test_volume_after_unlinks_and_renames_is_clean(vol):
    storage, inos = vol
    fs = host(storage)
    await fs.unlink(inos["many"], b"n7")
    await fs.rename(ROOT, b"g", inos["b"], b"g-moved")
    await fs.rename(inos["a"], b"b", ROOT, b"b-moved")
    await fs.removexattr(inos["f"], b"user.colour")
    await fs.setattr(inos["big"], size=5000)
    await fs.destroy()
    r = await run_fsck(storage)
    assert r.exit_code == 0, r.problems


# --------------------------------------------------------------------------
# Superblocks and host slots


async def test_sync_entry_point(vol):
    storage, inos = vol
    edit_inode(storage, inos["g"], nlink=3)
    found = await trio.to_thread.run_sync(fsck, storage)
    assert found.exit_code == 4 and found.problems == [
        f"inode {inos['g']}: link count 3, should be 1"
    ]
    fixed = await trio.to_thread.run_sync(partial(fsck, storage, repair=True))
    assert fixed.exit_code == 1 and get_inode(storage, inos["g"]).nlink == 1


async def test_damaged_primary_superblock(vol):
    storage, _ = vol
    flip(storage, 0, fmt.HDR_SIZE + 40)
    await assert_repaired(storage, "primary superblock is damaged")
    assert sb_of(storage).volume_blocks * 4096 == storage.size
    await assert_tree_intact(storage)


async def test_damaged_backup_superblock(vol):
    storage, _ = vol
    flip(storage, sb_of(storage).backup_blockno, 100)
    await assert_repaired(storage, "backup superblock")


async def test_damaged_primary_of_a_volume_smaller_than_its_device():
    """The backup is at the volume's end, not the device's: found anyway."""
    storage = MemoryStorage(24 << 20)
    await format_volume(storage, fmt.make_geometry(16 << 20))
    flip(storage, 0, fmt.HDR_SIZE + 40)
    await assert_repaired(storage, "primary superblock is damaged")
    assert sb_of(storage).volume_blocks == (16 << 20) // 4096


async def test_no_superblock_at_all_is_an_operational_error():
    storage = MemoryStorage(4 << 20)
    with pytest.raises(QuietError) as e:
        await run_fsck(storage)
    assert e.value.exitcode == 8 and "not a sharedfs volume" in str(e.value)


async def test_damaged_host_slot(vol):
    storage, _ = vol
    flip(storage, sb_of(storage).hosts_start + 3, 50)
    await assert_repaired(storage, "host slot 3")


async def test_live_host_refuses_unless_forced(vol):
    storage, _ = vol
    sb = sb_of(storage)
    write_slot(storage, sb, 2, live_slot(4242, "elsewhere"))
    with pytest.raises(QuietError) as e:
        await run_fsck(storage)
    assert e.value.exitcode == 8 and "pid 4242" in str(e.value)
    r = await run_fsck(storage, force=True)
    assert r.exit_code == 0, r.problems


# --------------------------------------------------------------------------
# Bitmaps and counters


@pytest.mark.parametrize("which", ["block", "inode"])
async def test_damaged_bitmap_block_is_rebuilt(vol, which):
    storage, _ = vol
    sb = sb_of(storage)
    b = sb.bitmap_block(0) if which == "block" else sb.ibitmap_block(0)
    before = read_block(storage, b)
    flip(storage, b, 2000)
    await assert_repaired(storage, f"group 0: {which} bitmap (block {b}) is damaged")
    after = read_block(storage, b)
    assert after[fmt.HDR_SIZE :] == before[fmt.HDR_SIZE :]  # bits and both counters
    await assert_tree_intact(storage)


async def test_used_block_marked_free(vol):
    storage, inos = vol
    sb = sb_of(storage)
    p = get_inode(storage, inos["f"]).roots[1]
    bitmap_edit(storage, sb.bitmap_block(0), p - sb.group_start(0), False, +1)
    await assert_repaired(storage, f"blocks {p} in use but marked free")
    await assert_tree_intact(storage)


async def test_free_block_marked_used(vol):
    storage, _ = vol
    sb = sb_of(storage)
    last = sb.group_blocks(0) - 1
    bitmap_edit(storage, sb.bitmap_block(0), last, True, -1)
    await assert_repaired(storage, f"blocks {sb.group_start(0) + last} free but marked in use")


async def test_inode_marked_free_while_in_use(vol):
    storage, inos = vol
    sb = sb_of(storage)
    bitmap_edit(storage, sb.ibitmap_block(0), inos["g"] - 1, False, +1)
    await assert_repaired(storage, f"inodes {inos['g']} in use but marked free")


async def test_inode_bit_set_in_uninitialized_inode_table_block(vol):
    storage, _ = vol
    sb = sb_of(storage)
    idx = sb.inodes_per_group - 1  # the table's last block: never formatted here
    bitmap_edit(storage, sb.ibitmap_block(0), idx, True, -1)
    await assert_repaired(storage, "inode table block is not initialized")


@pytest.mark.parametrize("which", ["block", "inode"])
async def test_wrong_free_counter(vol, which):
    storage, _ = vol
    sb = sb_of(storage)
    b = sb.bitmap_block(0) if which == "block" else sb.ibitmap_block(0)
    have = fmt.bitmap_free_count(read_block(storage, b))
    btype = BlockType.BITMAP if which == "block" else BlockType.IBITMAP
    edit_block(storage, b, btype, lambda buf: fmt.set_bitmap_free_count(buf, have + 5))
    await assert_repaired(storage, f"{which} bitmap free count {have + 5}, should be {have}")


async def test_wrong_link_counts(vol):
    storage, inos = vol
    edit_inode(storage, inos["f"], nlink=5)
    edit_inode(storage, inos["a"], nlink=7)
    await assert_repaired(
        storage,
        f"inode {inos['f']}: link count 5, should be 2",
        f"inode {inos['a']}: link count 7, should be 3",
    )
    fs = host(storage)
    assert (await fs.getattr(inos["f"])).nlink == 2
    assert (await fs.getattr(inos["a"])).nlink == 3


async def test_wrong_blocks_counter(vol):
    storage, inos = vol
    have = get_inode(storage, inos["big"]).blocks
    assert have == 21  # 20 data blocks and the indirect block
    edit_inode(storage, inos["big"], blocks=have + 3)
    await assert_repaired(
        storage, f"inode {inos['big']}: blocks counter {have + 3}, should be {have}"
    )


# --------------------------------------------------------------------------
# Directory entries and the tree


async def test_dangling_entries(vol):
    storage, inos = vol
    await add_entry(storage, ROOT, b"ghost", 4000, stat.S_IFREG)
    await add_entry(storage, inos["a"], b"nowhere", 10**9, stat.S_IFREG)
    await assert_repaired(
        storage,
        "directory 1: entry b'ghost' names free inode 4000",
        f"directory {inos['a']}: entry b'nowhere' names invalid inode {10**9}",
    )
    fs = host(storage)
    with pytest.raises(FsError):
        await fs.lookup(ROOT, b"ghost")
    await assert_tree_intact(storage)


async def test_entry_with_wrong_file_type(vol):
    storage, inos = vol
    await add_entry(storage, inos["b"], b"alias", inos["g"], stat.S_IFDIR)
    edit_inode(storage, inos["g"], nlink=2)
    fixed = await assert_repaired(storage, "entry b'alias' has file type 4")
    assert fixed.found_errors == 1
    fs = host(storage)
    assert await read_path(fs, b"a", b"b", b"alias") == b"G" * 4096


async def test_orphan_unlinked_while_open_is_freed(vol):
    storage, _ = vol
    fs = host(storage)
    before = (await fs.statfs()).free_blocks
    h = await fs.create(ROOT, b"h", 0o644, CTX)  # create holds a lookup, as open does
    await fs.write(h.ino, 0, DATA)
    await fs.unlink(ROOT, b"h")
    await fs.cache.sync()  # the host dies here: no forget, no destroy
    await assert_repaired(storage, f"inode {h.ino}: unlinked but still allocated")
    fs = host(storage)
    with pytest.raises(FsError):
        await fs.getattr(h.ino)
    assert (await fs.statfs()).free_blocks == before
    assert get_inode(storage, h.ino).mode == 0


async def test_orphan_directory_removed_while_open_is_freed(vol):
    storage, _ = vol
    fs = host(storage)
    d = await fs.mkdir(ROOT, b"gone", 0o755, CTX)  # mkdir holds a lookup, as an open cwd does
    await fs.rmdir(ROOT, b"gone")
    await fs.cache.sync()
    await assert_repaired(storage, f"inode {d.ino}: unlinked but still allocated")
    assert get_inode(storage, d.ino).mode == 0
    await assert_tree_intact(storage)


async def test_orphans_with_links_go_to_lost_and_found(vol):
    storage, inos = vol
    await remove_entry(storage, ROOT, b"g")  # a file, link count still 1
    await remove_entry(storage, ROOT, b"a")  # a directory tree
    fixed = await assert_repaired(
        storage,
        f"inode {inos['g']}: not reachable from the root",
        f"directory {inos['a']}: not reachable from the root",
    )
    assert "link count 4, should be 3" in " ".join(fixed.problems)  # root lost a subdirectory
    fs = host(storage)
    lf = await fs.lookup(ROOT, b"lost+found")
    assert stat.S_ISDIR(lf.mode) and lf.nlink == 3
    assert await read_path(fs, b"lost+found", b"#%d" % inos["g"]) == b"G" * 4096
    a = b"#%d" % inos["a"]
    assert await read_path(fs, b"lost+found", a, b"big") == BIG
    assert await read_path(fs, b"lost+found", a, b"b", b"f2") == DATA
    assert (await fs.lookup((await fs.lookup(lf.ino, a)).ino, b"..")).ino == lf.ino
    # A second orphan goes into the /lost+found that is now there.
    await remove_entry(storage, ROOT, b"s")
    await assert_repaired(storage, f"inode {inos['s']}: not reachable")
    fs = host(storage)
    link = await fs.lookup(lf.ino, b"#%d" % inos["s"])
    assert await fs.readlink(link.ino) == b"a/big"


async def test_directory_with_wrong_parent(vol):
    storage, inos = vol
    edit_inode(storage, inos["b"], parent=ROOT)
    await assert_repaired(storage, f"directory {inos['b']}: parent 1, should be {inos['a']}")
    assert get_inode(storage, inos["b"]).parent == inos["a"]


async def test_directory_with_two_names(vol):
    storage, inos = vol
    await add_entry(storage, ROOT, b"b-again", inos["b"], stat.S_IFDIR)
    await assert_repaired(storage, f"directory {inos['b']} is also named b'b-again'")
    fs = host(storage)
    with pytest.raises(FsError):
        await fs.lookup(ROOT, b"b-again")
    await assert_tree_intact(storage)


async def test_second_name_kept_where_parent_points(vol):
    """Of two entries naming a directory, the one in its parent field's
    directory stays, even if the other is met first."""
    storage, inos = vol
    await add_entry(storage, ROOT, b"b-first", inos["b"], stat.S_IFDIR)
    await assert_repaired(storage, "b'b-first'")
    fs = host(storage)
    assert await read_path(fs, b"a", b"b", b"f2") == DATA


async def test_directory_cycle(vol):
    storage, _ = vol
    fs = host(storage)
    x = await fs.mkdir(ROOT, b"x", 0o755, CTX)
    y = await fs.mkdir(x.ino, b"y", 0o755, CTX)
    z = await fs.create(y.ino, b"z", 0o644, CTX)
    await fs.write(z.ino, 0, b"zzz")
    await fs.destroy()
    await add_entry(storage, y.ino, b"back", x.ino, stat.S_IFDIR)  # y/back -> x
    await remove_entry(storage, ROOT, b"x")  # x and y now only name each other
    await assert_repaired(
        storage,
        f"directory {x.ino}: in a cycle of directories unreachable from the root",
        f"directory {x.ino} is also named b'back' in directory {y.ino}",
    )
    fs = host(storage)
    assert await read_path(fs, b"lost+found", b"#%d" % x.ino, b"y", b"z") == b"zzz"
    with pytest.raises(FsError):
        await fs.lookup(y.ino, b"back")
    await assert_tree_intact(storage)


async def test_root_not_a_directory(vol):
    storage, inos = vol
    edit_inode(storage, ROOT, mode=stat.S_IFREG | 0o644)
    await assert_repaired(storage, "root directory (inode 1) is not a directory")
    fs = host(storage)
    a = b"#%d" % inos["a"]
    assert await read_path(fs, b"lost+found", a, b"big") == BIG
    assert await read_path(fs, b"lost+found", b"#%d" % inos["g"]) == b"G" * 4096


# --------------------------------------------------------------------------
# Block maps


async def test_double_allocated_block(vol):
    storage, inos = vol
    f = get_inode(storage, inos["f"])
    old = get_inode(storage, inos["g"]).roots[0]
    edit_inode(storage, inos["g"], roots=[f.roots[1]] + [0] * 11)
    await assert_repaired(
        storage,
        f"block {f.roots[1]} is claimed by inode {inos['f']} and inode {inos['g']}",
    )
    g = get_inode(storage, inos["g"])
    assert g.roots[0] not in (0, f.roots[1])
    assert g.roots[0] == old  # g's own block was free for the copy
    fs = host(storage)
    assert await fs.read(inos["g"], 0, 4096) == DATA[4096:8192]
    await assert_tree_intact(storage)


async def test_block_claimed_as_data_and_directory(vol):
    """A stray data pointer never takes a directory's block away."""
    storage, inos = vol
    hdr = dir_blocks(storage, inos["b"])[0]
    edit_inode(storage, inos["g"], roots=[hdr] + [0] * 11)
    await assert_repaired(
        storage, f"block {hdr} is claimed by inode {inos['b']} and inode {inos['g']}"
    )
    await assert_tree_intact(storage)


async def test_out_of_range_pointers(vol):
    storage, inos = vol
    sb = sb_of(storage)
    f = get_inode(storage, inos["f"])
    roots = list(f.roots)
    lost = roots[2]
    roots[2] = sb.volume_blocks + 7
    roots[3] = sb.itable_start(0)  # metadata is never file data
    edit_inode(storage, inos["f"], roots=roots)
    await assert_repaired(
        storage,
        f"inode {inos['f']}: block pointer {sb.volume_blocks + 7} is out of range",
        f"inode {inos['f']}: block pointer {sb.itable_start(0)} is out of range",
        f"inode {inos['f']}: blocks counter 5, should be 3",  # 4 data + xattr before
        f"blocks {lost}",
    )
    fs = host(storage)
    got = await fs.read(inos["f"], 0, len(DATA))
    assert got[:8192] == DATA[:8192] and got[8192:] == bytes(8192)


@pytest.mark.parametrize("how", ["checksum", "misdirected"])
async def test_damaged_indirect_block(vol, how):
    storage, inos = vol
    ind = get_inode(storage, inos["big"]).roots[0]
    if how == "checksum":
        flip(storage, ind, 1000)
    else:  # a valid block of another kind written in its place
        write_block(storage, ind, read_block(storage, get_inode(storage, inos["f"]).xattr_block))
    await assert_repaired(storage, f"indirect block {ind} is damaged")
    fs = host(storage)
    assert await read_path(fs, b"a", b"big") == bytes(len(BIG))  # a hole now
    assert (await fs.getattr(inos["big"])).blocks == 0


async def test_damaged_xattr_block(vol):
    storage, inos = vol
    xb = get_inode(storage, inos["f"]).xattr_block
    flip(storage, xb, 200)
    await assert_repaired(storage, f"inode {inos['f']}: xattr block {xb} is damaged")
    fs = host(storage)
    assert await fs.listxattr(inos["f"]) == []
    assert await read_path(fs, b"f") == DATA


async def test_impossible_file_size_and_symlink_length(vol):
    storage, inos = vol
    edit_inode(storage, inos["big"], size=1 << 62)
    edit_inode(storage, inos["s"], size=5000)
    await assert_repaired(
        storage,
        f"inode {inos['big']}: size {1 << 62} is beyond the largest possible file",
        f"inode {inos['s']}: symlink target length 5000 is invalid",
    )
    fs = host(storage)
    assert (await fs.getattr(inos["big"])).size == len(BIG)
    with pytest.raises(FsError):
        await fs.lookup(ROOT, b"s")


# --------------------------------------------------------------------------
# Damaged metadata blocks


async def test_inode_table_block_bad_checksum_keeps_its_inodes(vol):
    storage, inos = vol
    sb = sb_of(storage)
    blk, _ = sb.inode_location(inos["f"])
    flip(storage, blk, sb.block_size - 3)  # the unused tail: every inode survives
    await assert_repaired(storage, f"inode table block {blk} (group 0) is damaged")
    await assert_tree_intact(storage)


async def test_inode_table_block_with_a_garbled_inode(vol):
    storage, inos = vol
    sb = sb_of(storage)
    blk, off = sb.inode_location(inos["s"])
    assert blk == sb.inode_location(inos["f"])[0]
    buf = read_block(storage, blk)
    buf[off + 100 : off + 108] = b"\xff" * 8  # s's first block pointer: far off the volume
    write_block(storage, blk, buf)
    await assert_repaired(
        storage,
        f"inode table block {blk} (group 0) is damaged",
        f"directory 1: entry b's' names free inode {inos['s']}",
    )
    fs = host(storage)
    with pytest.raises(FsError):
        await fs.lookup(ROOT, b"s")
    await assert_tree_intact(storage, symlink=False)


async def test_directory_bucket_bad_checksum(vol):
    storage, inos = vol
    fs = host(storage)
    before = await listing(fs, inos["many"])
    bucket = dir_blocks(storage, inos["many"])[1]
    flip(storage, bucket, 3000)
    await assert_repaired(storage, f"directory {inos['many']}: bucket block {bucket}")
    fs = host(storage)
    kept = await listing(fs, inos["many"])
    lf = (await fs.lookup(ROOT, b"lost+found")).ino
    found = set((await listing(fs, lf)).values())
    assert 0 < len(kept) < MANY and len(kept) + len(found) == MANY
    assert found == set(before.values()) - set(kept.values())
    for name, ino in before.items():
        where = (b"many", name) if name in kept else (b"lost+found", b"#%d" % ino)
        assert await read_path(fs, *where) == b"file %s" % name[1:]
    await assert_tree_intact(storage, many=False)


async def test_directory_header_bad_checksum_loses_nothing(vol):
    storage, inos = vol
    hdr = dir_blocks(storage, inos["many"])[0]
    flip(storage, hdr, 200)
    await assert_repaired(storage, f"directory {inos['many']}: header block {hdr}")
    await assert_tree_intact(storage)


@pytest.mark.parametrize("damage", ["checksum", "sealed"])
async def test_large_directory_hash_table_block(damage):
    """A directory big enough that its bucket table spills into DIRTABLE
    blocks (logical block TABLE_BASE on, under a height-3 block map)."""
    storage = await make_volume(16 << 20, block_size=1024)
    fs = host(storage)
    d = await fs.mkdir(ROOT, b"d", 0o755, CTX)
    f = await fs.create(ROOT, b"target", 0o644, CTX)
    names = [b"x" * 200 + b"%05d" % i for i in range(700)]
    for name in names:
        await fs.link(f.ino, d.ino, name)
    await fs.destroy()
    assert get_inode(storage, d.ino).height == 3
    assert (await run_fsck(storage)).exit_code == 0
    table = map_lbn(storage, d.ino, fmt.TABLE_BASE)
    assert fmt.read_header(read_block(storage, table)).btype == BlockType.DIRTABLE
    if damage == "checksum":
        flip(storage, table, 300)
        needle = f"directory {d.ino}: hash table block {table} (logical block {fmt.TABLE_BASE})"
    else:
        edit_block(storage, table, BlockType.DIRTABLE, lambda buf: fmt.set_u32(buf, 40, 9999))
        needle = f"directory {d.ino}: hash table names bucket 9999"
    await assert_repaired(storage, needle)
    fs = host(storage)
    assert sorted(await listing(fs, d.ino)) == names
    assert (await fs.getattr(f.ino)).nlink == 701


async def test_directory_entry_count_and_misplaced_entry(vol):
    storage, inos = vol
    blocks = dir_blocks(storage, inos["b"])

    def count(buf: bytearray) -> None:
        depth, nb, n = fmt.read_dirhdr(buf)
        fmt.write_dirhdr(buf, depth, nb, n + 2)

    edit_block(storage, blocks[0], BlockType.DIRHDR, count)
    await assert_repaired(storage, f"directory {inos['b']}: entry count 3, should be 1")
    await assert_tree_intact(storage)


async def test_directory_entry_with_wrong_hash_rebuilds(vol):
    storage, inos = vol
    bucket = dir_blocks(storage, inos["a"])[1]

    def rename(buf: bytearray) -> None:
        depth, entries = fmt.unpack_bucket(buf)
        entries = [e._replace(name=b"BIG") if e.name == b"big" else e for e in entries]
        fmt.pack_bucket(buf, depth, entries)

    edit_block(storage, bucket, BlockType.DIRBUCKET, rename)
    await assert_repaired(storage, f"directory {inos['a']}: entry b'BIG' carries a wrong hash")
    fs = host(storage)
    assert await read_path(fs, b"a", b"BIG") == BIG


# --------------------------------------------------------------------------
# Robustness: random damage never raises, and -y always ends clean


@pytest.mark.parametrize("seed", range(6))
async def test_random_metadata_damage(seed):
    rng = random.Random(seed)
    storage = await make_volume(16 << 20, block_size=1024)
    await populate(storage)
    sb = sb_of(storage)
    metadata = [sb.bitmap_block(g) for g in range(sb.group_count)]
    metadata += [sb.ibitmap_block(g) for g in range(sb.group_count)]
    metadata += [sb.itable_start(0) + k for k in range(4)]
    used = [
        b
        for b in range(sb.groups_start, sb.backup_blockno)
        if storage.read_sync(b * sb.block_size, 4) == fmt.BLOCK_MAGIC
    ]
    for b in rng.sample(sorted(set(metadata + used)), 6):
        buf = read_block(storage, b)
        for _ in range(rng.randrange(1, 20)):
            buf[rng.randrange(fmt.HDR_SIZE, len(buf))] = rng.randrange(256)
        if rng.random() < 0.5:  # structurally wrong but checksum-valid
            fmt.seal(buf, BlockType(fmt.read_header(buf).btype), b, 1)
        write_block(storage, b, buf)
    first = await run_fsck(storage, repair=True)
    assert first.exit_code in (0, 1), first.problems
    again = await run_fsck(storage, repair=False)
    assert again.exit_code == 0, again.problems
    fs = host(storage)
    await fs.readdir(ROOT, 0, 1000)
    await fs.statfs()


# --------------------------------------------------------------------------
# The command line on an image file


def image(
    tmp_path: Path, change: Callable[[MemoryStorage, dict[str, int]], None] | None = None
) -> Path:
    """A populated volume as an image file, changed first by `change`."""

    async def build() -> tuple[MemoryStorage, dict[str, int]]:
        storage = await make_volume()
        return storage, await populate(storage)

    storage, inos = trio.run(build)
    if change is not None:
        change(storage, inos)
    img = tmp_path / "v.img"
    img.write_bytes(storage._data)
    return img


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cli(capsys, caplog, monkeypatch) -> Callable[..., tuple[int, str, str]]:
    """Run `sharedfs fsck ARGS` in this process: (exit code, stdout, stderr and log)."""
    monkeypatch.setattr(fsck_module, "setup_logging", lambda debug=False: None)

    def run(*args: str) -> tuple[int, str, str]:
        caplog.clear()
        caplog.set_level(logging.INFO)
        with pytest.raises(SystemExit) as e:
            fsck_module.main(list(args))
        out, err = capsys.readouterr()
        return e.value.code, out, err + caplog.text

    return run


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real thing: `python -m sharedfs.fsck ARGS`."""
    return subprocess.run(
        [sys.executable, "-m", "sharedfs.fsck", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_clean_damaged_repaired(tmp_path, cli):
    inos: dict[str, int] = {}

    def damage(storage: MemoryStorage, names: dict[str, int]) -> None:
        inos.update(names)
        edit_inode(storage, names["f"], nlink=9)

    img = image(tmp_path, damage)
    before = digest(img)
    code, out, err = cli("-n", str(img))
    assert code == 4, err
    assert f"inode {inos['f']}: link count 9, should be 2" in err
    assert "Checking inode tables..." in err
    assert "1 errors found, 0 corrected" in out and digest(img) == before
    code, out, err = cli(str(img))  # neither -n nor -y: report only, and say so
    assert code == 4 and "re-run with -y" in out and digest(img) == before
    code, out, err = cli("-y", str(img))
    assert code == 1 and "1 errors found, 1 corrected" in out, err
    assert "link count 9, should be 2: corrected" in err
    code, out, err = cli("-n", "-q", str(img))
    assert code == 0 and out == "" and "WARNING" not in err
    code, out, err = cli("-p", str(img))
    assert code == 0 and "clean" in out


def test_cli_never_opens_the_volume_for_writing_under_n(tmp_path):
    img = image(tmp_path, lambda storage, inos: edit_inode(storage, inos["g"], nlink=2))
    img.chmod(0o444)
    before = digest(img)
    r = run_cli("-n", str(img))
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr
    assert "link count 2, should be 1" in r.stderr and digest(img) == before
    img.chmod(0o644)
    assert run_cli("-y", str(img)).returncode == 1
    r = run_cli("-n", str(img))
    assert r.returncode == 0 and "clean" in r.stdout


def test_cli_operational_errors(tmp_path, cli):
    junk = tmp_path / "junk.img"
    junk.write_bytes(bytes(range(256)) * 4096)
    r = run_cli("-n", str(junk))
    assert r.returncode == 8 and "not a sharedfs volume" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    code, out, err = cli("-y", str(tmp_path / "missing.img"))
    assert code == 8 and "no such file" in err.lower() and out == ""

    def live(storage: MemoryStorage, inos: dict[str, int]) -> None:
        write_slot(storage, sb_of(storage), 1, live_slot(777, "h1"))

    img = image(tmp_path, live)
    code, out, err = cli("-y", str(img))
    assert code == 8 and out == ""
    assert (
        err.strip() == f"sharedfs: {img}: in use by node 1 (pid 777 on h1); unmount it "
        "everywhere first (or use --force)"
    )
    code, out, err = cli("-n", "--force", str(img))
    assert code == 0 and "checking anyway" in err


@pytest.mark.parametrize("args", [["-n", "-y", "v.img"], [], ["--bogus", "v.img"]])
def test_cli_usage_errors(cli, args):
    code, out, err = cli(*args)
    assert code == 16 and len(err.strip().splitlines()) == 1 and "--help" in err
