"""`sharedfs inspect`: look inside a volume without mounting it.

    sharedfs inspect VOLUME superblock     geometry, areas, free space, the log
    sharedfs inspect VOLUME inode N        an inode, its block map, its entries
    sharedfs inspect VOLUME path P         the same, found through directories
    sharedfs inspect VOLUME block N        what a block is, whose, and its bytes

It reads what is on storage, through the same code a host uses (format.py
for structures, the filesystem core for directories, fsck's block walk to
find who owns a block) and never writes: the volume sits behind a
wrapper that refuses writes.  While hosts have it mounted, storage may lag what they have cached.
"""

from __future__ import annotations

import argparse
import errno
import stat
import sys
import time
from collections.abc import Iterator
from typing import TypeVar

import trio

from . import format as fmt
from . import journal
from .cli_util import Parser, run_tool
from .errors import CorruptVolume, FsError, QuietError, StorageError
from .format import BlockType, Inode
from .fs import FileSystem
from .fsck import Fsck
from .host import open_host
from .storage import Storage, open_volume
from .volume import describe_slot, live_slots, open_superblock, read_slot

T = TypeVar("T")

#: Lines of a listing (extents, entries) shown unless --all.
SHOWN = 40
#: Bytes of a block dumped unless --all.
DUMP_BYTES = 512

_TYPES = {
    stat.S_IFREG: "regular file",
    stat.S_IFDIR: "directory",
    stat.S_IFLNK: "symbolic link",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


class ReadOnly(Storage):
    """A volume whose every write fails: inspect's guarantee."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.name = inner.name
        self.size = inner.size

    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    def read_sync(self, offset: int, length: int) -> bytes:
        return self.inner.read_sync(offset, length)

    async def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.write_sync(offset, data)

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise StorageError(f"{self.name}: sharedfs inspect never writes (a write at {offset})")

    async def flush(self) -> None:
        pass

    def close(self) -> None:
        self.inner.close()


class Volume:
    """A volume opened for reading only: its superblock, and a filesystem
    core over it whose every write would fail."""

    def __init__(self, storage: Storage) -> None:
        self.storage = ReadOnly(storage)
        self.sb = open_superblock(self.storage)
        self.bs = self.sb.block_size
        self.fs: FileSystem = open_host(self.storage, self.sb)

    def read(self, blockno: int) -> bytes:
        return self.storage.read_sync(blockno * self.bs, self.bs)

    def in_use_note(self) -> list[str]:
        live = live_slots(self.storage, self.sb, watch=0)
        if not live:
            return []
        who = ", ".join(describe_slot(n, s) for n, s in sorted(live.items()))
        return [f"note: mounted by {who}; storage may lag what the hosts have cached"]


# -- superblock ------------------------------------------------------------------


async def show_superblock(vol: Volume) -> list[str]:
    sb = vol.sb
    statfs = await vol.fs.statfs()
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sb.created_ns / 1e9))
    out = [
        f"superblock: sharedfs format v{sb.version}, label {sb.label!r}, uuid {sb.uuid.hex()}",
        f"  created {created}, block size {sb.block_size}, {sb.volume_blocks} blocks "
        f"({sb.volume_blocks * sb.block_size} bytes), {sb.host_slots} host slots",
        f"  mirrored to {sb.mirror_secondary}" if sb.mirror_secondary else "  not mirrored",
        "  layout:",
        _area(0, 1, f"superblock (backup in block {sb.backup_blockno})"),
        _area(sb.hosts_start, sb.host_slots, "host slots"),
        _area(
            sb.journal_start,
            sb.journal_blocks,
            f"journal (header, then {sb.journal_blocks - 1} log pages)",
        ),
        _area(
            sb.mirror_start,
            sb.mirror_blocks,
            f"mirror indicators ({sb.mirror_region_blocks} blocks per region)",
        ),
        _area(
            sb.groups_start,
            sb.backup_blockno - sb.groups_start,
            f"{sb.group_count} allocation groups of {sb.blocks_per_group} blocks (bitmap, "
            f"inode bitmap, {sb.itable_blocks} inode table blocks, data)",
        ),
        f"  space: {statfs.free_blocks} of {statfs.blocks} data blocks free, "
        f"{statfs.free_files} of {statfs.files} inodes free",
    ]
    j = journal.usage(vol.storage, sb)
    if "error" in j:
        out.append(f"  journal: header damaged: {j['error']}")
    else:
        out.append(
            f"  journal: pages {j['checkpoint']} to {j['end']} in use ({j['in_use']} of "
            f"{j['pages']}, {j['percent']}%)"
        )
    return out


def _area(first: int, count: int, what: str) -> str:
    span = f"blocks {first}-{first + count - 1}" if count > 1 else f"block {first}"
    return f"    {span:<24}{what}"


# -- inodes ----------------------------------------------------------------------


async def find_path(vol: Volume, path: str) -> int:
    """The inode `path` names, found a name at a time from the root."""
    ino, walked = fmt.ROOT_INO, ""
    for name in filter(None, path.split("/")):
        try:
            attr = await vol.fs.lookup(ino, name.encode())
        except FsError as e:
            where = walked or "/"
            if e.errno == errno.ENOENT:
                raise QuietError(f"{path}: no {name!r} in {where}", 1) from None
            if e.errno == errno.ENOTDIR:
                raise QuietError(f"{path}: {where} is not a directory", 1) from None
            raise QuietError(f"{path}: {where}: {e}", 1) from None
        ino, walked = attr.ino, f"{walked}/{name}"
    return ino


async def read_inode(vol: Volume, ino: int) -> Inode:
    """Inode `ino` as storage has it; one line if it is out of range or free."""
    sb = vol.sb
    if not sb.valid_ino(ino):
        raise QuietError(f"inode {ino} is out of range: this volume has inodes 1-{sb.inode_count}")
    try:
        await vol.fs.getattr(ino)  # free, or in a table never formatted?
    except FsError:
        raise QuietError(f"inode {ino} is free (not in use)") from None
    blockno, off = sb.inode_location(ino)
    buf = vol.read(blockno)
    fmt.verify(buf, BlockType.INODES, blockno)
    return Inode.unpack_from(ino, buf, off)


async def show_inode(vol: Volume, inode: Inode, every: bool) -> list[str]:
    sb = vol.sb
    kind = _TYPES.get(stat.S_IFMT(inode.mode), f"type {stat.S_IFMT(inode.mode):#o}")
    blockno, off = sb.inode_location(inode.ino)
    out = [
        f"inode {inode.ino}: {kind}, mode {stat.filemode(inode.mode)} ({inode.mode:#o}), "
        f"uid {inode.uid}, gid {inode.gid}, {inode.nlink} links",
        f"  size {inode.size}, {inode.blocks} blocks, generation {inode.generation}, "
        f"flags {inode.flags:#x}",
        f"  atime {_when(inode.atime_ns)}, mtime {_when(inode.mtime_ns)}, "
        f"ctime {_when(inode.ctime_ns)}",
        f"  stored in block {blockno} (inode table of group {sb.group_of_inode(inode.ino)}), "
        f"offset {off}",
    ]
    if stat.S_ISDIR(inode.mode):
        out.append(f"  parent directory: inode {inode.parent}")
    if stat.S_ISCHR(inode.mode) or stat.S_ISBLK(inode.mode):
        out.append(f"  device {inode.rdev >> 8}:{inode.rdev & 0xFF}")
    if stat.S_ISLNK(inode.mode):
        target = await vol.fs.readlink(inode.ino)
        out.append(f"  target: {target.decode(errors='replace')}")
    out += await _show_xattrs(vol, inode)
    out += _show_map(vol, inode, every)
    if stat.S_ISDIR(inode.mode):
        out += await _show_entries(vol, inode.ino, every)
    return out


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) + f".{ns % 10**9:09d}"


async def _show_xattrs(vol: Volume, inode: Inode) -> list[str]:
    if not inode.xattr_block:
        return []
    names = await vol.fs.listxattr(inode.ino)
    out = [f"  extended attributes (block {inode.xattr_block}):"]
    for name in names:
        value = await vol.fs.getxattr(inode.ino, name)
        out.append(f"    {name.decode(errors='replace')} = {value[:64]!r}")
    return out


def block_map(vol: Volume, inode: Inode) -> tuple[list[tuple[int, int]], list[int]]:
    """(logical block, block) for each mapped block of `inode`, in logical
    order, and its indirect blocks."""
    ptrs = fmt.ptrs_per_block(vol.bs)
    data: list[tuple[int, int]] = []
    indirect: list[int] = []

    def walk(p: int, level: int, base: int) -> None:
        if level == 0:
            data.append((base, p))
            return
        buf = vol.read(p)
        fmt.verify(buf, BlockType.INDIRECT, p)
        indirect.append(p)
        span = ptrs ** (level - 1)
        for i, c in enumerate(fmt.all_ptrs(buf, vol.bs)):
            if c:
                walk(c, level - 1, base + i * span)

    for i, p in enumerate(inode.roots):
        if p:
            walk(p, inode.height, i * ptrs**inode.height)
    return data, indirect


def extents(mapped: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """(first logical block, first block, count) runs of a block map."""
    run: list[int] = []
    for lbn, pbn in mapped:
        if run and lbn == run[0] + run[2] and pbn == run[1] + run[2]:
            run[2] += 1
            continue
        if run:
            yield run[0], run[1], run[2]
        run = [lbn, pbn, 1]
    if run:
        yield run[0], run[1], run[2]


def _show_map(vol: Volume, inode: Inode, every: bool) -> list[str]:
    mapped, indirect = block_map(vol, inode)
    runs = list(extents(mapped))
    out = [
        f"  block map: height {inode.height}, {len(mapped)} blocks mapped in {len(runs)} "
        f"extents, {len(indirect)} indirect blocks"
        + (f" ({', '.join(map(str, indirect[:8]))}{', ...' if len(indirect) > 8 else ''})")
        * bool(indirect)
    ]
    for lbn, pbn, n in _limit(runs, every):
        span = f"{lbn}-{lbn + n - 1}" if n > 1 else str(lbn)
        blocks = f"blocks {pbn}-{pbn + n - 1}" if n > 1 else f"block {pbn}"
        out.append(f"    logical {span} -> {blocks}")
    return out + _more(runs, every)


async def _show_entries(vol: Volume, ino: int, every: bool) -> list[str]:
    entries = []
    after = 0
    while True:
        try:
            batch = await vol.fs.readdir(ino, after)
        except FsError as e:
            # What was shown above is what there is to see of it.
            return [f"  entries: unreadable past {len(entries)}: {e}"]
        if not batch:
            break
        entries += batch
        after = batch[-1][0].cookie
    out = [f"  entries ({len(entries)}):"]
    width = min(max((len(e.name) for e, _ in entries), default=1), 40)
    for e, attr in _limit(entries, every):
        kind = _TYPES.get(stat.S_IFMT(attr.mode), "?")
        out.append(f"    {e.name.decode(errors='replace'):{width}}  inode {e.ino}  {kind}")
    return out + _more(entries, every)


def _limit(items: list[T], every: bool) -> list[T]:
    """The first SHOWN items (all with --all)."""
    return items if every else items[:SHOWN]


def _more(items: list[T], every: bool) -> list[str]:
    """The line that says _limit left some out."""
    if every or len(items) <= SHOWN:
        return []
    return [f"    ... {len(items) - SHOWN} more ({len(items)} in all; --all shows every one)"]


# -- blocks ----------------------------------------------------------------------


def what_block(vol: Volume, blockno: int) -> list[str]:
    """What the layout makes block `blockno`, and what it holds."""
    sb = vol.sb
    if blockno == 0:
        return ["the superblock"]
    if blockno == sb.backup_blockno:
        return ["the backup superblock"]
    if blockno < sb.journal_start:
        node = blockno - sb.hosts_start
        slot = read_slot(vol.storage, sb, node)
        state = f"in use by pid {slot.pid} on {slot.hostname}" if slot.in_use else "free"
        return [f"host slot of node {node}: {state}, mounted {slot.mount_count} times"]
    if blockno < sb.mirror_start:
        return [_journal_block(vol, blockno)]
    if blockno < sb.groups_start:
        node, i = divmod(blockno - sb.mirror_start, sb.indicator_run_blocks)
        return [f"mirror indicator block {i} of node {node} (sharedfs mirror status counts them)"]
    g = sb.group_of_block(blockno)
    if g >= sb.group_count:
        return ["unused tail of the volume (too short for a group)"]
    k = blockno - sb.group_start(g)
    if k == 0:
        return [f"block bitmap of group {g}"]
    if k == 1:
        return [f"inode bitmap of group {g}"]
    if k < sb.group_overhead():
        return [_itable_block(vol, blockno, g, k - 2)]
    return _data_block(vol, blockno, g, k)


def _itable_block(vol: Volume, blockno: int, g: int, k: int) -> str:
    sb = vol.sb
    first = g * sb.inodes_per_group + k * sb.inodes_per_block + 1
    what = f"inode table block {k} of group {g}: inodes {first}-{first + sb.inodes_per_block - 1}"
    buf = vol.read(blockno)
    try:
        fmt.verify(buf, BlockType.INODES, blockno)
    except CorruptVolume:
        return what + ", not formatted yet"
    offsets = (sb.inode_location(first + i)[1] for i in range(sb.inodes_per_block))
    used = sum(1 for i, off in enumerate(offsets) if Inode.unpack_from(first + i, buf, off).mode)
    return what + f", {used} in use"


def _journal_block(vol: Volume, blockno: int) -> str:
    area = journal.Area.of(vol.sb)
    if blockno == area.header:
        j = journal.usage(vol.storage, vol.sb)
        if "error" in j:
            return f"the journal header, damaged: {j['error']}"
        return (
            f"the journal header (the last log object lock's value): checkpoint at page "
            f"{j['checkpoint']}, log ends before page {j['end']}"
        )
    try:
        page = journal.decode_page(vol.read(blockno), blockno)
    except CorruptVolume:
        return f"log page slot {blockno - area.first}: never written (or torn)"
    return (
        f"log page slot {blockno - area.first}: page {page.seq}, {len(page.records)} records, "
        f"{page.used} bytes used, next page in block {page.next}"
    )


def _data_block(vol: Volume, blockno: int, g: int, k: int) -> list[str]:
    sb = vol.sb
    bitmap = vol.read(sb.bitmap_block(g))
    allocated = fmt.bit_test(bitmap, k)
    out = [f"data area of group {g}: {'allocated' if allocated else 'free'} in the block bitmap"]
    data = vol.read(blockno)
    try:
        hdr = fmt.read_header(data)
        valid = hdr.blockno == blockno and hdr.checksum == fmt.checksum(data)
        kind = _type_name(hdr.btype)
        out.append(
            f"metadata block: {kind}, version {hdr.version}"
            + ("" if valid else " (header does not check out: stale or damaged)")
        )
    except CorruptVolume:
        out.append("no metadata header: " + ("file data" if allocated else "unused"))
    out.append(_owner(vol, blockno))
    return out


def _type_name(btype: int) -> str:
    try:
        return BlockType(btype).name
    except ValueError:
        return f"unknown type {btype}"


def _owner(vol: Volume, blockno: int) -> str:
    """Who points at the block, by fsck's walk of every block map."""
    checker = Fsck(vol.storage, force=True, progress=False, report=False)
    checker.check_superblock()
    checker.check_geometry()
    checker.check_inode_tables()
    checker.check_block_maps()
    ino = checker.owner[blockno]
    note = f" (fsck -n finds {checker.found_errors} problems)" if checker.found_errors else ""
    if not ino:
        return "owner: none (no inode points at it)" + note
    mapped, indirect = block_map(vol, checker.inodes[ino])
    where = next((f"logical block {lbn}" for lbn, p in mapped if p == blockno), None)
    if where is None:
        where = "an indirect block" if blockno in indirect else "its extended attributes"
    return f"owner: inode {ino}, {where}" + note


def hexdump(data: bytes, every: bool) -> list[str]:
    """As `hexdump -C`: offset, 16 bytes in hex and as text, '*' for
    repeated lines, and the offset of the end."""
    shown = data if every else data[:DUMP_BYTES]
    out: list[str] = []
    prev = None
    for off in range(0, len(shown), 16):
        row = shown[off : off + 16]
        if row == prev:
            if out[-1] != "*":
                out.append("*")
            continue
        prev = row
        hexes = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        out.append(f"{off:08x}  {hexes[:23]:<23}  {hexes[24:]:<23}  |{text}|")
    out.append(f"{len(shown):08x}")
    if len(shown) < len(data):
        out.append(f"({len(data) - len(shown)} more bytes; --all shows the whole block)")
    return out


# -- the command -----------------------------------------------------------------


def _number(what: str, arg: str | None) -> int:
    if arg is None:
        raise QuietError(f"{what}: which one? (sharedfs inspect VOLUME {what} N)", 2)
    if not arg.isdigit():
        raise QuietError(f"{what} {arg!r}: not a number (sharedfs inspect VOLUME {what} N)", 2)
    return int(arg)


async def report(vol: Volume, args: argparse.Namespace) -> list[str]:
    out = vol.in_use_note()
    if args.what == "superblock":
        return out + await show_superblock(vol)
    if args.what in ("inode", "path"):
        ino = _number("inode", args.arg) if args.what == "inode" else await find_path(vol, args.arg)
        return out + await show_inode(vol, await read_inode(vol, ino), args.all)
    blockno = _number("block", args.arg)
    if blockno >= vol.sb.volume_blocks:
        raise QuietError(
            f"block {blockno} is out of range: this volume has blocks 0-{vol.sb.volume_blocks - 1}"
        )
    out.append(f"block {blockno}:")
    out += ["  " + line for line in what_block(vol, blockno)]
    return out + hexdump(vol.read(blockno), args.all)


def inspect(args: argparse.Namespace) -> None:
    if args.what == "path" and not args.arg:
        raise QuietError("path: give a path inside the volume (sharedfs inspect VOLUME path P)", 2)
    if args.what == "superblock" and args.arg:
        raise QuietError(f"superblock takes no argument, not {args.arg!r}", 2)
    storage = open_volume(args.volume)
    try:
        vol = Volume(storage)
        out = trio.run(report, vol, args)
    except CorruptVolume as e:
        raise QuietError(f"{args.volume}: {e}; 'sharedfs fsck -n' tells more", 4) from None
    finally:
        storage.close()
    print("\n".join(out))


def main(argv: list[str] | None = None) -> None:
    ap = Parser(
        prog="sharedfs inspect",
        description="Look inside a volume without mounting it (read only).",
    )
    ap.add_argument("volume")
    ap.add_argument("what", choices=("superblock", "inode", "path", "block"))
    ap.add_argument("arg", nargs="?", metavar="N|P", help="inode or block number, or a path")
    ap.add_argument("--all", action="store_true", help="every extent, entry and byte")
    run_tool(inspect, ap.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
