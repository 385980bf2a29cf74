"""`sharedfs fsck`: check a volume and repair it.

This module owns the volume-wide consistency rules that no single host can
see: the superblock and its backup, the host slots, the allocation bitmaps and
their free counters, the inode tables, every block map, every directory's hash
table, the directory tree (parents, link counts, cycles) and the orphans a dead
host leaves behind.  Its shape follows e2fsck's passes and s3ql's fsck: a
`Fsck` object whose `check()` runs named `check_*` phases in dependency order,
counting what it found (`found_errors`), what it put right (`corrected`) and
what it had to leave (`uncorrectable`).

The volume is read directly, in large contiguous requests (a group's inode
table at once, the blocks of many directories at once), into an in-memory
model.  Every phase reports a problem in one line and changes the model as the
repair would, so later phases judge the repaired volume: under -n nothing is
ever written, under -y the changed blocks (kept in an overlay) are sealed and
written back, and then the filesystem core does the work that needs the
directory code (rebuilding a damaged directory, creating /lost+found, linking
orphans into it).  A final read-only pass checks the result.

Exit codes are e2fsck's: 0 clean, 1 errors corrected, 4 errors left
uncorrected (every error found under -n), 8 operational error, 16 usage error.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import stat
import struct
import sys
import time
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

from . import format as fmt
from . import journal
from .cli_util import Parser, run_tool, setup_logging
from .errors import CorruptVolume, FsError, QuietError, StorageError
from .format import BlockType, DirEntry, Inode
from .fs import MAX_DIR_DEPTH, MAX_HEIGHT, Ctx, FileSystem
from .host import open_host
from .mirror import marking_only
from .progress import Progress
from .protocol import Mode
from .storage import Storage, open_volume
from .volume import (
    describe_slot,
    live_slots,
    read_backup_superblock,
    read_superblock,
    slot_is_live,
)

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_CORRECTED = 1
EXIT_UNCORRECTED = 4
EXIT_OPERATIONAL = 8
EXIT_USAGE = 16

ROOT = fmt.ROOT_INO
LOST_FOUND = b"lost+found"
_VALID_TYPES = frozenset(
    {
        stat.S_IFREG,
        stat.S_IFDIR,
        stat.S_IFLNK,
        stat.S_IFCHR,
        stat.S_IFBLK,
        stat.S_IFIFO,
        stat.S_IFSOCK,
    }
)
#: owner[] value of blocks outside every group's data area (never claimable).
_META = 0xFFFFFFFF
#: parent_of[] values for directories fsck links into /lost+found.
_TO_LOST_FOUND = -1
_STRANDED = -2  # an orphan with nowhere to go (/lost+found is not a directory)
#: Read requests: join blocks less than this far apart, up to this many blocks.
_READ_GAP = 16
_READ_MAX = 1024
#: Problem lines shown per bitmap before summarizing the rest.
_MAX_RANGES = 8
_MODE_U32 = struct.Struct("<I")

# A pointer's home, so a repair can rewrite it: ("root", ino, i) for the
# inode's roots, ("xattr", ino, 0) for its xattr pointer, ("ind", blockno, i)
# for slot i of an indirect block.
Ref = tuple[str, int, int]


@dataclass(slots=True)
class Entry:
    """A directory entry as found on disk, and what fsck decided about it."""

    dir: int
    name: bytes
    ino: int
    dtype: int
    cookie: int
    lbn: int  # the logical block of the bucket holding it
    removed: bool = False
    changed: bool = False  # dtype corrected


@dataclass(slots=True)
class DirState:
    """One directory: its entries and how its blocks must be repaired.

    `rebuild` means the hash table is beyond in-place repair: fsck frees all
    its blocks and the filesystem core re-adds the surviving entries.
    """

    ino: int
    entries: list[Entry] = field(default_factory=list)
    rebuild: bool = False
    count: int = 0  # entry count in the header
    hdr_pbn: int = 0
    buckets: dict[int, tuple[int, int]] = field(default_factory=dict)  # lbn -> (pbn, depth)

    def kept(self) -> Iterator[Entry]:
        return (e for e in self.entries if not e.removed)


def _dtype(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


def _is_dir(inode: Inode) -> bool:
    return stat.S_ISDIR(inode.mode)


def _valid_name(name: bytes) -> bool:
    return (
        0 < len(name) <= fmt.MAX_NAME
        and b"/" not in name
        and b"\0" not in name
        and name
        not in (
            b".",
            b"..",
        )
    )


def _runs(
    blocks: Sequence[int], gap: int = _READ_GAP, limit: int = _READ_MAX
) -> Iterator[tuple[int, int]]:
    """(start, count) read requests covering the sorted `blocks`: neighbours
    closer than `gap` share a request (one large read beats many small ones),
    and no request exceeds `limit` blocks."""
    i = 0
    while i < len(blocks):
        start = end = blocks[i]
        i += 1
        while i < len(blocks) and blocks[i] - end <= gap and blocks[i] - start < limit:
            end = blocks[i]
            i += 1
        yield start, end - start + 1


def _pack_bits(flags: bytes | bytearray, nbytes: int) -> bytes:
    """A bitmap (bit i in byte i>>3, lowest bit first) from one 0/1 byte per bit.

    Each stride-8 slice holds bit j of every byte; as an integer its bytes are
    0 or 1, so shifting it left by j < 8 never carries into the next byte.
    """
    padded = bytes(flags) + bytes(nbytes * 8 - len(flags))
    acc = 0
    for j in range(8):
        acc |= int.from_bytes(padded[j::8], "little") << j
    return acc.to_bytes(nbytes, "little")


def _bit_ranges(diff: int, nbits: int) -> Iterator[tuple[int, int]]:
    """Runs [first, last] of set bits in `diff`."""
    raw = diff.to_bytes((max(nbits, diff.bit_length()) + 7) // 8, "little")
    start = prev = -1
    for k, byte in enumerate(raw):
        if not byte:
            continue
        for j in range(8):
            if byte >> j & 1:
                i = k * 8 + j
                if i != prev + 1:
                    if start >= 0:
                        yield start, prev
                    start = i
                prev = i
    if start >= 0:
        yield start, prev


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


class Fsck:
    """One check of one volume.

    Attributes:
        repair: change the volume (-y/-p); otherwise only report (-n).
        found_errors, corrected, uncorrectable: problem counts.
        problems: every problem line, in order (for tests and callers).
        files, directories, blocks_used: what the (repaired) volume holds.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        repair: bool = False,
        force: bool = False,
        progress: bool = True,
        report: bool = True,
    ) -> None:
        self.storage = storage
        self.repair = repair
        self.force = force
        self.show_progress = progress
        self.report = report
        self.found_errors = 0
        self.corrected = 0
        self.uncorrectable = 0
        self.problems: list[str] = []
        self.files = self.directories = self.blocks_used = 0
        self.sb: fmt.Superblock
        # Blocks to write back: blockno -> (contents, type to seal with or None).
        self._overlay: dict[int, tuple[bytearray, BlockType | None]] = {}
        self.inodes: dict[int, Inode] = {}
        self._dirty_inodes: set[int] = set()
        self._freed: dict[int, int] = {}  # ino -> generation, written as free records
        self._release: set[int] = set()  # inodes whose blocks go back to the free pool
        self._rebuild: set[int] = set()  # directories the core rebuilds
        self.dirs: dict[int, DirState] = {}
        self.dirmaps: dict[int, dict[int, int]] = {}  # dir ino -> {lbn: pbn}
        self.nblocks: dict[int, int] = {}
        self.last_lbn: dict[int, int] = {}  # the highest mapped logical block
        self._dups: list[tuple[int, int, Ref]] = []
        self.parent_of: dict[int, int] = {}
        self.lost_found = 0  # its inode, 0 if it must be created
        self.lost_found_moves: list[tuple[int, bytes]] = []
        self._lf_names: set[bytes] = set()
        self._file_refs: dict[int, int] = {}
        self._stranded: set[int] = set()
        self._new_root = False

    # ==================================================================
    # Reporting

    def _info(self, msg: str, *args: object) -> None:
        if self.report:
            log.info(msg, *args)

    def _error(self, problem: str, action: str = "", *, fixable: bool = True) -> None:
        """Count and report one problem.  The caller changes the model as the
        repair would; under -y that change is written back."""
        self.found_errors += 1
        self.problems.append(problem)
        if self.repair and fixable:
            self.corrected += 1
            line = f"{problem}: {action}" if action else problem
        else:
            self.uncorrectable += 1
            line = problem if fixable else f"{problem} (cannot repair)"
        if self.report:
            log.warning("%s", line)

    def _progress(self, what: str, total: int) -> Progress:
        p = Progress(f"fsck: {what}", total)
        if not (self.show_progress and self.report):
            p.enabled = False
        return p

    @property
    def exit_code(self) -> int:
        if self.uncorrectable:
            return EXIT_UNCORRECTED
        return EXIT_CORRECTED if self.corrected else EXIT_CLEAN

    def summary(self) -> str:
        name = self.storage.name
        if not self.found_errors:
            total = self.sb.data_blocks
            return (
                f"sharedfs fsck: {name}: clean, {self.files} files, {self.directories} "
                f"directories, {self.blocks_used} blocks used of {total}"
            )
        s = f"sharedfs fsck: {name}: {self.found_errors} errors found, {self.corrected} corrected"
        if self.uncorrectable and self.repair:
            s += f", {self.uncorrectable} left"
        elif self.uncorrectable:
            s += "; run 'sharedfs fsck -y' to repair"
        return s

    # ==================================================================
    # Block access

    @property
    def bs(self) -> int:
        return self.sb.block_size

    def _read(self, blockno: int, count: int = 1) -> bytes:
        return self.storage.read_sync(blockno * self.bs, count * self.bs)

    def _read_blocks(self, blocknos: Iterable[int]) -> dict[int, bytes]:
        """Blocks by number (the overlay's version where fsck changed one), read
        in as few storage requests as their spread allows."""
        bs = self.bs
        out: dict[int, bytes] = {}
        todo = []
        for b in sorted(set(blocknos)):
            if b in self._overlay:
                out[b] = bytes(self._overlay[b][0])
            else:
                todo.append(b)
        k = 0
        for start, count in _runs(todo):
            data = self._read(start, count)
            while k < len(todo) and todo[k] < start + count:
                off = (todo[k] - start) * bs
                out[todo[k]] = data[off : off + bs]
                k += 1
        return out

    def _modify(self, blockno: int, btype: BlockType | None) -> bytearray:
        """The block to change in place (read on first use), written back sealed."""
        if blockno not in self._overlay:
            self._overlay[blockno] = (bytearray(self._read(blockno)), btype)
        return self._overlay[blockno][0]

    def _put(self, blockno: int, data: bytearray, btype: BlockType | None) -> None:
        self._overlay[blockno] = (data, btype)

    def _itable_block(self, blockno: int) -> bytearray:
        if blockno in self._overlay:
            return self._overlay[blockno][0]
        g = self.sb.group_of_block(blockno)
        if blockno - self.sb.itable_start(g) >= self._disk_init[g]:
            buf = bytearray(self.bs)  # never formatted: whatever is there is garbage
        else:
            buf = bytearray(self._read(blockno))
        self._put(blockno, buf, BlockType.INODES)
        return buf

    def _touch_inode(self, inode: Inode) -> None:
        self._dirty_inodes.add(inode.ino)

    def _set_ref(self, ref: Ref, value: int) -> None:
        kind, where, i = ref
        if kind == "root":
            self.inodes[where].roots[i] = value
            self._dirty_inodes.add(where)
        elif kind == "xattr":
            self.inodes[where].xattr_block = value
            self._dirty_inodes.add(where)
        else:
            fmt.set_ptr(self._modify(where, BlockType.INDIRECT), i, value)

    def _free_inode(self, ino: int) -> None:
        """Plan an inode's release: a free record, its blocks back in the pool."""
        inode = self.inodes.pop(ino)
        self._freed[ino] = inode.generation
        self._release.add(ino)
        self._rebuild.discard(ino)
        self.dirs.pop(ino, None)
        self._dirty_inodes.discard(ino)

    # ==================================================================
    # The check

    def check(self) -> None:
        """Run every phase; each depends on the ones before it."""
        self.check_superblock()
        self.check_geometry()
        self.check_host_slots()
        self.check_inode_tables()
        self.check_block_maps()
        self.check_directories()
        self.check_directory_tree()
        self.check_orphans()
        self.check_parents()
        self.check_link_counts()
        self.check_block_counts()
        self.check_bitmaps()

    # -- superblock -----------------------------------------------------

    def check_superblock(self) -> None:
        primary = backup = None
        perr = berr = ""
        try:
            primary = read_superblock(self.storage)
        except CorruptVolume as e:
            perr = str(e)
        try:
            backup = self._find_backup() if primary is None else self._read_backup_at(primary)
        except CorruptVolume as e:
            berr = str(e)
        if primary is None and backup is None:
            why = perr.removeprefix("not a sharedfs volume (").removesuffix(")")
            raise QuietError(
                f"{self.storage.name}: not a sharedfs volume ({why}; no usable backup "
                "superblock either)",
                EXIT_OPERATIONAL,
            )
        self.sb = sb = primary or backup  # type: ignore[assignment]
        # Before any finding: a live host changes the volume under us.  And
        # before any output: refusing to check is one line, nothing else.
        self._check_live()
        self._info("Checking superblock and backup...")
        if primary is None:
            assert backup is not None
            self._error(
                f"primary superblock is damaged ({perr})",
                f"restored from the backup in block {backup.backup_blockno}",
            )
            self._put(0, sb.pack(0), None)
        elif backup is None:
            self._error(
                f"backup superblock (block {sb.backup_blockno}) is damaged ({berr})",
                "rewritten from the primary",
            )
            self._put(sb.backup_blockno, sb.pack(sb.backup_blockno), None)
        elif backup != primary:
            self._error(
                f"backup superblock (block {sb.backup_blockno}) differs from the primary",
                "rewritten from the primary",
            )
            self._put(sb.backup_blockno, sb.pack(sb.backup_blockno), None)

    def _find_backup(self) -> fmt.Superblock:
        """The backup, for a damaged primary: in the device's last block, or
        where the damaged primary's size field puts it (a volume smaller than
        its device keeps its backup at its own end)."""
        try:
            return read_backup_superblock(self.storage)
        except CorruptVolume:
            pass
        raw = self.storage.read_sync(0, min(self.storage.size, 1024))
        if len(raw) < fmt.HDR_SIZE + 104 or raw[fmt.HDR_SIZE : fmt.HDR_SIZE + 8] != fmt.SB_MAGIC:
            raise CorruptVolume(f"{self.storage.name}: no valid backup superblock")
        # magic, version, block size, uuid, label, volume_blocks: see format._SB.
        bs, vb = struct.unpack_from("<I16s64sQ", raw, fmt.HDR_SIZE + 12)[::3]
        if bs not in (1024, 2048, 4096, 8192, 16384, 32768, 65536) or not (
            vb >= 2 and vb * bs <= self.storage.size
        ):
            raise CorruptVolume(f"{self.storage.name}: no valid backup superblock")
        buf = self.storage.read_sync((vb - 1) * bs, bs)
        backup = fmt.Superblock.unpack(buf, vb - 1)
        if backup.backup_blockno != vb - 1:
            raise CorruptVolume(f"{self.storage.name}: no valid backup superblock")
        return backup

    def _read_backup_at(self, sb: fmt.Superblock) -> fmt.Superblock:
        b = sb.backup_blockno
        buf = self.storage.read_sync(b * sb.block_size, sb.block_size)
        backup = fmt.Superblock.unpack(buf, b)
        if backup.backup_blockno != b:
            raise CorruptVolume(f"block {b}: backup superblock describes another volume size")
        return backup

    def _check_live(self) -> None:
        live = live_slots(self.storage, self.sb)
        if not live:
            return
        n = min(live)
        if not self.force:
            raise QuietError(
                f"{self.storage.name}: in use by {describe_slot(n, live[n])}; unmount it "
                "everywhere first (or use --force)",
                EXIT_OPERATIONAL,
            )
        if self.report:
            log.warning(
                "%s is in use by %s: checking anyway (--force); findings may be wrong",
                self.storage.name,
                describe_slot(n, live[n]),
            )

    # -- geometry --------------------------------------------------------

    def check_geometry(self) -> None:
        """The superblock's own checks passed; these need the device too."""
        self._info("Checking geometry...")
        sb = self.sb
        try:
            sb.check_geometry()
        except CorruptVolume as e:
            raise QuietError(f"{self.storage.name}: {e}", EXIT_OPERATIONAL) from None
        if sb.volume_blocks * sb.block_size > self.storage.size:
            raise QuietError(
                f"{self.storage.name}: the volume is {self.storage.size} bytes but its superblock "
                f"says {sb.volume_blocks * sb.block_size}; it was truncated",
                EXIT_OPERATIONAL,
            )
        if sb.inode_count >= _META:
            raise QuietError(f"{self.storage.name}: too many inodes for fsck", EXIT_OPERATIONAL)
        log.debug(
            "geometry: %d blocks of %d, %d groups of %d blocks, %d inodes per group",
            sb.volume_blocks,
            sb.block_size,
            sb.group_count,
            sb.blocks_per_group,
            sb.inodes_per_group,
        )

    # -- host slots --------------------------------------------------------

    def check_host_slots(self) -> None:
        self._info("Checking host slots...")
        sb = self.sb
        data = self._read(sb.hosts_start, sb.host_slots)
        now = time.time_ns()
        for node in range(sb.host_slots):
            b = sb.hosts_start + node
            buf = data[node * self.bs : (node + 1) * self.bs]
            try:
                fmt.verify(buf, BlockType.HOST, b)
            except CorruptVolume as e:
                self._error(f"host slot {node} (block {b}) is damaged ({e})", "cleared it")
                self._put(b, fmt.HostSlot().pack(self.bs, b), None)
                continue
            slot = fmt.HostSlot.unpack(buf)
            if slot.in_use and not slot_is_live(slot, now):
                # A host that died: not an error in itself (its orphans are).
                self._info("%s died without unmounting", describe_slot(node, slot))

    # -- inode tables ------------------------------------------------------

    def check_inode_tables(self) -> None:
        """Bitmap blocks and the formatted part of each inode table.

        Inode table blocks at index >= the inode bitmap's initialized counter
        were never formatted (mkfs leaves them): every inode there is free.
        """
        self._info("Checking inode tables...")
        sb = self.sb
        n = sb.group_count
        self.bbm: list[bytes | None] = [None] * n
        self.ibm: list[bytes | None] = [None] * n
        self.itable_init = [0] * n
        self._disk_init = [0] * n
        progress = self._progress("inode tables", n)
        for g in range(n):
            self._load_group(g)
            progress.update(g + 1)
        progress.close()

    def _load_group(self, g: int) -> None:
        sb, bs = self.sb, self.bs
        raw = self._read(sb.bitmap_block(g), 2)
        for k, (btype, what) in enumerate(
            ((BlockType.BITMAP, "block bitmap"), (BlockType.IBITMAP, "inode bitmap"))
        ):
            blockno = sb.bitmap_block(g) + k
            buf = raw[k * bs : (k + 1) * bs]
            try:
                fmt.verify(buf, btype, blockno)
            except CorruptVolume as e:
                self._error(f"group {g}: {what} (block {blockno}) is damaged ({e})", "rebuilt it")
                continue
            (self.bbm if k == 0 else self.ibm)[g] = buf
        ibm = self.ibm[g]
        init: int | None = None
        if ibm is not None:
            init = fmt.itable_initialized(ibm)
            if init > sb.itable_blocks:
                self._error(
                    f"group {g}: inode bitmap says {init} inode table blocks are initialized, "
                    f"the group has {sb.itable_blocks}",
                    "corrected",
                )
                init = sb.itable_blocks
        # Without a trustworthy counter, read the whole table: the formatted
        # part ends at the last block that is a valid inode table block.
        nread = sb.itable_blocks if init is None else init
        start = sb.itable_start(g)
        data = self._read(start, nread) if nread else b""
        damaged: list[tuple[int, bytes, str]] = []
        last_good = -1
        for k in range(nread):
            blk = data[k * bs : (k + 1) * bs]
            try:
                fmt.verify(blk, BlockType.INODES, start + k)
            except CorruptVolume as e:
                damaged.append((k, blk, str(e)))
                continue
            last_good = k
            self._parse_inodes(g, k, blk)
        if init is None:
            init = last_good + 1
        self.itable_init[g] = self._disk_init[g] = init
        for k, blk, why in damaged:
            if k < init:
                self._salvage_itable_block(g, k, blk, why)

    def _slot_inodes(self, g: int, k: int, blk: bytes) -> Iterator[tuple[int, Inode]]:
        """(ino, record) for the used slots of one inode table block."""
        ipb = self.sb.inodes_per_block
        first = g * self.sb.inodes_per_group + k * ipb + 1
        for s in range(ipb):
            off = fmt.HDR_SIZE + s * fmt.INODE_SIZE
            ino = first + s
            if _MODE_U32.unpack_from(blk, off)[0] == 0:
                continue
            yield ino, Inode.unpack_from(ino, blk, off)

    def _parse_inodes(self, g: int, k: int, blk: bytes) -> None:
        for ino, inode in self._slot_inodes(g, k, blk):
            why = self._inode_problem(inode, strict=False)
            if why:
                self._error(f"inode {ino}: {why}", "cleared it")
                self.inodes[ino] = inode
                self._free_inode(ino)
                self._release.discard(ino)  # its pointers are not trusted
            else:
                self.inodes[ino] = inode

    def _salvage_itable_block(self, g: int, k: int, blk: bytes, why: str) -> None:
        """Keep the records of a damaged table block that still look like
        inodes, and rewrite the block sealed around them."""
        blockno = self.sb.itable_start(g) + k
        buf = bytearray(self.bs)
        kept = dropped = 0
        lost = []
        for ino, inode in self._slot_inodes(g, k, blk):
            if self._inode_problem(inode, strict=True) is None:
                self.inodes[ino] = inode
                inode.pack_into(buf, self.sb.inode_location(ino)[1])
                kept += 1
            else:
                dropped += 1
                lost.append(ino)
        self._put(blockno, buf, BlockType.INODES)
        action = f"rewrote it keeping {kept} inodes"
        if dropped:
            action += f", dropping {dropped} that are not valid ({', '.join(map(str, lost))})"
        self._error(f"inode table block {blockno} (group {g}) is damaged ({why})", action)

    def _inode_problem(self, inode: Inode, *, strict: bool) -> str | None:
        """Why a used inode record cannot be trusted, or None.

        `strict` applies to records from a block whose checksum failed: then
        every field that could send fsck astray must be plausible."""
        sb = self.sb
        if stat.S_IFMT(inode.mode) not in _VALID_TYPES:
            return f"invalid file type in mode {inode.mode:#o}"
        if inode.height > MAX_HEIGHT:
            return f"block map height {inode.height} is invalid"
        if stat.S_ISLNK(inode.mode) and inode.size >= sb.block_size:
            return f"symlink target length {inode.size} is invalid"
        if not strict:
            return None
        ptrs = [p for p in (*inode.roots, inode.xattr_block) if p]
        if any(not sb.is_data_block(p) for p in ptrs):
            return "block pointers out of range"
        if _is_dir(inode) and not sb.valid_ino(inode.parent):
            return "parent out of range"
        if inode.nlink > 1 << 20 or inode.blocks > sb.volume_blocks:
            return "implausible counters"
        if inode.size > fmt.map_capacity(sb.block_size, MAX_HEIGHT) * sb.block_size:
            return "implausible size"
        return None

    # -- block maps ----------------------------------------------------------

    def check_block_maps(self) -> None:
        """Claim every block each inode points at, first come first served:
        out-of-range pointers are cleared, a block claimed twice goes to the
        first claimant, damaged indirect and xattr blocks are dropped.

        Directory blocks are claimed before xattr blocks and those before file
        data, so that a stray file pointer never takes metadata away."""
        self._info("Checking block maps...")
        sb = self.sb
        vb = sb.volume_blocks
        self.used = bytearray(b"\x01") * vb
        self.owner = array("I", [_META]) * vb
        # Blocks whose allocation fsck itself changes: their bitmap bits are
        # part of that repair, not findings of their own.
        self.touched = bytearray(vb)
        for g in range(sb.group_count):
            lo = sb.group_start(g) + sb.group_overhead()
            hi = sb.group_start(g) + sb.group_blocks(g)
            self.used[lo:hi] = bytes(hi - lo)
            self.owner[lo:hi] = array("I", bytes(4 * (hi - lo)))
        dirs = sorted(ino for ino, i in self.inodes.items() if _is_dir(i))
        files = sorted(ino for ino, i in self.inodes.items() if not _is_dir(i))
        for d in dirs:
            self.dirmaps[d] = {}
        progress = self._progress("block maps", 3)
        self._walk(dirs, "directory block")
        progress.update(1)
        self._check_xattrs()
        progress.update(2)
        self._walk(files, "block")
        self._copy_duplicates()
        progress.update(3)
        progress.close()

    def _claim(self, ino: int, p: int, ref: Ref, what: str) -> bool:
        if p < len(self.used) and not self.used[p]:
            self.used[p] = 1
            self.owner[p] = ino
            self.nblocks[ino] = self.nblocks.get(ino, 0) + 1
            return True
        if p >= len(self.used) or self.owner[p] == _META:
            self._error(f"inode {ino}: {what} pointer {p} is out of range", "cleared it")
            self._set_ref(ref, 0)
            return False
        first = self.owner[p]
        who = "twice by inode" if first == ino else f"by inode {first} and inode"
        if what == "block":
            # File data: resolved once every claim is known (copies need free blocks).
            self._dups.append((ino, p, ref))
            return False
        self._error(f"{what} {p} is claimed {who} {ino}", f"dropped it from inode {ino}")
        self._set_ref(ref, 0)
        return False

    def _unclaim(self, ino: int, p: int) -> None:
        self.used[p] = 0
        self.owner[p] = 0
        self.touched[p] = 1
        self.nblocks[ino] -= 1

    def _walk(self, inos: list[int], what: str) -> None:
        """Claim the blocks of these inodes' block maps, a tree level at a
        time from the top, so each level's indirect blocks come in one batch
        of large reads."""
        ptrs = fmt.ptrs_per_block(self.bs)
        levels: list[list[tuple[int, int, Ref, int]]] = [[] for _ in range(MAX_HEIGHT + 1)]
        for ino in inos:
            inode = self.inodes[ino]
            span = ptrs**inode.height
            for i, p in enumerate(inode.roots):
                if p:
                    levels[inode.height].append((ino, p, ("root", ino, i), i * span))
        record = what == "directory block"
        for level in range(MAX_HEIGHT, 0, -1):
            nodes, levels[level] = levels[level], []
            for k in range(0, len(nodes), 4096):
                chunk = [
                    n
                    for n in nodes[k : k + 4096]
                    if self._claim(n[0], n[1], n[2], "indirect block")
                ]
                data = self._read_blocks(n[1] for n in chunk)
                for ino, p, ref, base in chunk:
                    children = self._indirect(ino, p, ref, data[p])
                    if children is None:
                        continue
                    if level == 1 and not record:
                        self._claim_data(ino, p, children, base)
                        continue
                    span = ptrs ** (level - 1)
                    below = levels[level - 1]
                    for i, c in enumerate(children):
                        if c:
                            below.append((ino, c, ("ind", p, i), base + i * span))
        for ino, p, ref, lbn in levels[0]:
            if self._claim(ino, p, ref, what):
                if record:
                    self.dirmaps[ino][lbn] = p
                self._mapped_to(ino, lbn)

    def _mapped_to(self, ino: int, lbn: int) -> None:
        if lbn > self.last_lbn.get(ino, -1):
            self.last_lbn[ino] = lbn

    def _indirect(self, ino: int, p: int, ref: Ref, blk: bytes) -> tuple[int, ...] | None:
        try:
            fmt.verify(blk, BlockType.INDIRECT, p)
        except CorruptVolume as e:
            self._error(
                f"inode {ino}: indirect block {p} is damaged ({e})",
                "dropped it; the blocks below it are lost",
            )
            self._set_ref(ref, 0)
            self._unclaim(ino, p)
            return None
        return fmt.all_ptrs(blk, self.bs)

    def _claim_data(self, ino: int, p: int, children: tuple[int, ...], base: int) -> None:
        """The data pointers of one bottom-level indirect block: the common
        case inline, for volumes with hundreds of thousands of them."""
        used, owner = self.used, self.owner
        vb = len(used)
        n = 0
        last = -1
        for i, c in enumerate(children):
            if not c:
                continue
            last = i
            if c < vb and not used[c]:
                used[c] = 1
                owner[c] = ino
                n += 1
            else:
                self._claim(ino, c, ("ind", p, i), "block")
        self.nblocks[ino] = self.nblocks.get(ino, 0) + n
        if last >= 0:
            self._mapped_to(ino, base + last)

    def _check_xattrs(self) -> None:
        claimed = [
            (ino, inode.xattr_block)
            for ino, inode in sorted(self.inodes.items())
            if inode.xattr_block
            and self._claim(ino, inode.xattr_block, ("xattr", ino, 0), "xattr block")
        ]
        data = self._read_blocks(p for _, p in claimed)
        for ino, p in claimed:
            try:
                fmt.verify(data[p], BlockType.XATTR, p)
                fmt.unpack_xattrs(data[p], p)
            except CorruptVolume as e:
                self._error(
                    f"inode {ino}: xattr block {p} is damaged ({e})",
                    "dropped its extended attributes",
                )
                self._set_ref(("xattr", ino, 0), 0)
                self._unclaim(ino, p)

    def _copy_duplicates(self) -> None:
        """Give each later claimant of a data block its own copy."""
        hint = self.sb.groups_start
        for ino, p, ref in self._dups:
            if ino not in self.inodes:
                continue
            if not self.used[p]:
                # The first claimant was damaged metadata, dropped since.
                self._claim(ino, p, ref, "block")
                continue
            first = self.owner[p]
            who = "twice by inode" if first == ino else f"by inode {first} and inode"
            new = self.used.find(0, hint)
            if new < 0:
                new = self.used.find(0)
            problem = f"block {p} is claimed {who} {ino}"
            if new < 0:
                self._error(problem, f"no free block for a copy: cleared inode {ino}'s pointer")
                self._set_ref(ref, 0)
                continue
            hint = new + 1
            self._put(new, bytearray(self._read_blocks([p])[p]), None)
            self._set_ref(ref, new)
            self.used[new] = 1
            self.owner[new] = ino
            self.touched[new] = 1
            self.nblocks[ino] = self.nblocks.get(ino, 0) + 1
            self._error(problem, f"gave inode {ino} its own copy in block {new}")

    # -- directories -----------------------------------------------------------

    def check_directories(self) -> None:
        """Each directory's header, hash table, buckets and entries."""
        self._info("Checking directories...")
        dirs = sorted(self.dirmaps)
        progress = self._progress("directories", len(dirs))
        batch: list[int] = []
        size = 0
        for k, d in enumerate(dirs):
            batch.append(d)
            size += len(self.dirmaps[d])
            if size >= 4096 or k == len(dirs) - 1:
                data = self._read_blocks(p for b in batch for p in self.dirmaps[b].values())
                for b in batch:
                    self.dirs[b] = self._check_dir(b, data)
                batch, size = [], 0
                progress.update(k + 1)
        progress.close()

    def _check_dir(self, ino: int, data: dict[int, bytes]) -> DirState:
        st = DirState(ino)
        blocks: dict[int, bytes] = {}
        for lbn, pbn in sorted(self.dirmaps[ino].items()):
            btype, what = _dir_block_kind(lbn)
            try:
                fmt.verify(data[pbn], btype, pbn)
            except CorruptVolume as e:
                lose = (
                    "; its entries' inodes go to /lost+found"
                    if btype is BlockType.DIRBUCKET
                    else ""
                )
                self._error(
                    f"directory {ino}: {what} block {pbn} (logical block {lbn}) is damaged ({e})",
                    f"dropped it{lose}",
                )
                st.rebuild = True
                continue
            blocks[lbn] = data[pbn]
        if not st.rebuild:
            reasons = self._dir_structure(st, blocks)
            if reasons:
                more = f" (and {len(reasons) - 1} more problems)" if len(reasons) > 1 else ""
                self._error(f"directory {ino}: {reasons[0]}{more}", "rebuilt the directory")
                st.rebuild = True
        if st.rebuild:
            st.entries = self._salvage_entries(ino, blocks)
            self._plan_rebuild(ino)
        self._check_names(st)
        if not st.rebuild and st.count != len(st.entries):
            self._error(
                f"directory {ino}: entry count {st.count}, should be {len(st.entries)}", "corrected"
            )
        return st

    def _dir_structure(self, st: DirState, blocks: dict[int, bytes]) -> list[str]:
        """Problems with a directory's hash table that need a rebuild; fills
        `st` with its entries when there are none."""
        hdr = blocks.get(0)
        if hdr is None:
            return ["header block missing"]
        depth, nb, count = fmt.read_dirhdr(hdr)
        if depth > MAX_DIR_DEPTH:
            return [f"hash table depth {depth} is invalid"]
        if not 2 <= nb <= fmt.TABLE_BASE:
            return [f"next bucket number {nb} is invalid"]
        table = self._dir_table(hdr, blocks, depth)
        if table is None:
            return ["hash table block missing"]
        reasons: list[str] = []
        slots: dict[int, list[int]] = {}
        for i, v in enumerate(table):
            slots.setdefault(v, []).append(i)
        buckets: dict[int, tuple[int, list[DirEntry]]] = {}
        for v in sorted(slots):
            if not 1 <= v < nb:
                reasons.append(f"hash table names bucket {v}, outside 1..{nb - 1}")
            elif v not in blocks:
                reasons.append(f"bucket at logical block {v} is missing")
            else:
                try:
                    buckets[v] = fmt.unpack_bucket(blocks[v], self.dirmaps[st.ino][v])
                except CorruptVolume as e:
                    reasons.append(str(e))
        if reasons:
            return reasons
        for v, (ld, entries) in buckets.items():
            reasons += _bucket_problems(v, ld, entries, slots[v], table, depth)
        for lbn, blk in blocks.items():
            if 1 <= lbn < fmt.TABLE_BASE and lbn not in buckets:
                try:
                    _, stray = fmt.unpack_bucket(blk)
                except CorruptVolume:
                    stray = [DirEntry(0, 0, 0, b"?")]
                if stray:
                    reasons.append(
                        f"bucket at logical block {lbn} holds entries but is not in the hash table"
                    )
        if reasons:
            return reasons
        st.count = count
        st.hdr_pbn = self.dirmaps[st.ino][0]
        for v, (ld, entries) in sorted(buckets.items()):
            st.buckets[v] = (self.dirmaps[st.ino][v], ld)
            st.entries += [Entry(st.ino, e.name, e.ino, e.dtype, e.cookie, v) for e in entries]
        st.entries.sort(key=lambda e: e.cookie)
        return []

    def _dir_table(self, hdr: bytes, blocks: dict[int, bytes], depth: int) -> list[int] | None:
        """The 2**depth bucket-table slots, from the header and DIRTABLE blocks."""
        bs = self.bs
        n = 1 << depth
        k0 = fmt.hdr_table_slots(bs)
        first = min(n, k0)
        off = fmt.table_slot_location(bs, 0)[1]
        table = list(struct.unpack_from(f"<{first}I", hdr, off))
        per = fmt.table_slots_per_block(bs)
        lbn = fmt.TABLE_BASE
        while len(table) < n:
            blk = blocks.get(lbn)
            if blk is None:
                return None
            take = min(per, n - len(table))
            table += struct.unpack_from(f"<{take}I", blk, fmt.HDR_SIZE)
            lbn += 1
        return table

    def _salvage_entries(self, ino: int, blocks: dict[int, bytes]) -> list[Entry]:
        """Every readable entry of a directory being rebuilt, from whichever
        of its bucket blocks survived, one per name."""
        out: dict[bytes, Entry] = {}
        for lbn, blk in sorted(blocks.items()):
            if not 1 <= lbn < fmt.TABLE_BASE:
                continue
            try:
                _, entries = fmt.unpack_bucket(blk)
            except CorruptVolume:
                continue
            for e in entries:
                out.setdefault(e.name, Entry(ino, e.name, e.ino, e.dtype, e.cookie, lbn))
        return sorted(out.values(), key=lambda e: (fmt.name_hash(e.name), e.name))

    def _plan_rebuild(self, ino: int) -> None:
        """Free all the directory's blocks (but its xattr block); the core
        lays out a fresh hash table after the raw repairs are written."""
        inode = self.inodes[ino]
        inode.roots = [0] * fmt.N_ROOTS
        inode.height = 0
        inode.size = 0
        inode.blocks = 1 if inode.xattr_block else 0
        self._touch_inode(inode)
        self._rebuild.add(ino)
        self._release.add(ino)

    def _check_names(self, st: DirState) -> None:
        seen: set[bytes] = set()
        for e in st.entries:
            if not _valid_name(e.name):
                self._error(
                    f"directory {st.ino}: entry {e.name!r} has an invalid name", "removed it"
                )
                e.removed = True
            elif e.name in seen:
                self._error(f"directory {st.ino}: duplicate entry {e.name!r}", "removed it")
                e.removed = True
            seen.add(e.name)

    # -- the directory tree ----------------------------------------------------

    def check_directory_tree(self) -> None:
        """Entries must name live inodes with the right type; every directory
        hangs from exactly one entry, on a path from the root."""
        self._info("Checking directory tree...")
        self._check_root()
        for d in sorted(self.dirs):
            for e in self.dirs[d].kept():
                self._check_entry(e)
        self._namers: dict[int, list[int]] = {}
        for d, st in self.dirs.items():
            for e in st.kept():
                if e.ino in self.dirs:
                    self._namers.setdefault(e.ino, []).append(d)
        self.parent_of = {ROOT: ROOT}
        self._attach([ROOT])

    def _check_root(self) -> None:
        root = self.inodes.get(ROOT)
        if root is not None and _is_dir(root):
            return
        why = "missing" if root is None else "not a directory"
        self._error(f"root directory (inode {ROOT}) is {why}", "made a new, empty one")
        gen = 0
        if root is not None:
            gen = root.generation
            self._free_inode(ROOT)
        gen = self._freed.pop(ROOT, gen)
        now = time.time_ns()
        new = Inode(
            ROOT,
            mode=stat.S_IFDIR | 0o755,
            nlink=2,
            parent=ROOT,
            generation=gen + 1,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        self.inodes[ROOT] = new
        self._new_root = True
        self._touch_inode(new)
        self.dirs[ROOT] = DirState(ROOT, rebuild=True)
        self._rebuild.add(ROOT)
        # Inode 1 lives in the group's first table block, formatted if need be.
        self.itable_init[0] = max(self.itable_init[0], 1)

    def _check_entry(self, e: Entry) -> None:
        t = self.inodes.get(e.ino)
        where = f"directory {e.dir}: entry {e.name!r}"
        if t is None:
            state = "free" if self.sb.valid_ino(e.ino) else "invalid"
            self._error(f"{where} names {state} inode {e.ino}", "removed it")
            e.removed = True
        elif e.ino == ROOT:
            self._error(f"{where} names the root directory", "removed it")
            e.removed = True
        elif e.ino == e.dir:
            self._error(f"{where} names the directory itself", "removed it")
            e.removed = True
        elif e.dtype != _dtype(t.mode):
            self._error(
                f"{where} has file type {e.dtype}, inode {e.ino} is of type {_dtype(t.mode)}",
                "corrected",
            )
            e.dtype = _dtype(t.mode)
            e.changed = True

    def _attach(self, start: list[int]) -> None:
        """Breadth-first from `start` (already attached): each directory met
        for the first time hangs from the entry that led there; later entries
        naming it are removed.  A directory named more than once waits for the
        directory its parent field names, if that one names it too."""
        queue = deque(start)
        deferred: list[Entry] = []
        while True:
            while queue:
                d = queue.popleft()
                for e in self.dirs[d].kept():
                    t = e.ino
                    if t not in self.dirs:
                        continue
                    if t in self.parent_of:
                        self._extra_name(e)
                    elif self._waits(t, d):
                        deferred.append(e)
                    else:
                        self.parent_of[t] = d
                        queue.append(t)
            progressed = False
            waiting, deferred = deferred, []
            for e in waiting:
                if e.removed:
                    continue
                if e.ino in self.parent_of:
                    self._extra_name(e)
                elif not progressed:
                    self.parent_of[e.ino] = e.dir
                    queue.append(e.ino)
                    progressed = True
                else:
                    deferred.append(e)
            if not progressed:
                return

    def _waits(self, t: int, d: int) -> bool:
        p = self.inodes[t].parent
        names = self._namers.get(t, ())
        return len(names) > 1 and p != d and p in names

    def _extra_name(self, e: Entry) -> None:
        where = self.parent_of[e.ino]
        at = "/lost+found" if where < 0 else f"directory {where}"
        self._error(
            f"directory {e.ino} is also named {e.name!r} in directory {e.dir} (it is in {at})",
            "removed that entry",
        )
        e.removed = True

    # -- orphans ---------------------------------------------------------------

    def check_orphans(self) -> None:
        """Inodes in use but not reachable from the root: unlinked ones (a
        host died with them open) are freed, the others go to /lost+found."""
        self._info("Checking for orphan inodes...")
        self._find_lost_found()
        loose = sorted(d for d in self.dirs if d not in self.parent_of)
        while loose:
            # Reconnect each disconnected tree by its top: a directory no
            # other disconnected directory names (in a cycle, the lowest).
            inside = {e.ino for d in loose for e in self.dirs[d].kept()}
            tops = [d for d in loose if d not in inside]
            for top in tops or loose[:1]:
                self._reconnect_dir(top, in_cycle=not tops)
            loose = [d for d in loose if d in self.dirs and d not in self.parent_of]
        refs = self._file_refs = {}
        for d in self.dirs:
            for e in self.dirs[d].kept():
                if e.ino not in self.dirs:
                    refs[e.ino] = refs.get(e.ino, 0) + 1
        for ino in sorted(self.inodes):
            inode = self.inodes[ino]
            if _is_dir(inode) or refs.get(ino):
                continue
            if inode.nlink == 0:
                self._error(
                    f"inode {ino}: unlinked but still allocated (orphan with link count 0)",
                    "freed it",
                )
                self._free_inode(ino)
            elif self._to_lost_found(ino, f"inode {ino}: not reachable from the root (orphan)"):
                refs[ino] = 1

    def _find_lost_found(self) -> None:
        for e in self.dirs[ROOT].kept():
            if e.name == LOST_FOUND:
                if e.ino in self.dirs and self.parent_of.get(e.ino) == ROOT:
                    self.lost_found = e.ino
                    self._lf_names = {x.name for x in self.dirs[e.ino].kept()}
                else:
                    self.lost_found = -1  # taken by something else
                return

    def _reconnect_dir(self, top: int, *, in_cycle: bool) -> None:
        """Free an unlinked, empty directory; link any other into /lost+found."""
        st = self.dirs[top]
        if not in_cycle and self.inodes[top].nlink == 0 and not any(st.kept()):
            self._error(
                f"inode {top}: unlinked but still allocated (orphan directory with link count 0)",
                "freed it",
            )
            self._free_inode(top)
            return
        if in_cycle:
            problem = f"directory {top}: in a cycle of directories unreachable from the root"
        else:
            problem = f"directory {top}: not reachable from the root (orphan)"
        if self._to_lost_found(top, problem):
            self.parent_of[top] = _TO_LOST_FOUND
        else:
            self.parent_of[top] = _STRANDED
        self._attach([top])

    def _to_lost_found(self, ino: int, problem: str) -> bool:
        if self.lost_found < 0:
            self._error(f"{problem}; /lost+found is not a directory", fixable=False)
            self._stranded.add(ino)
            return False
        name = b"#%d" % ino
        k = 0
        while name in self._lf_names:
            k += 1
            name = b"#%d.%d" % (ino, k)
        self._lf_names.add(name)
        self.lost_found_moves.append((ino, name))
        self._error(problem, f"moved it to /lost+found/{name.decode()}")
        return True

    # -- parents, link counts, block counts --------------------------------------

    def check_parents(self) -> None:
        """A directory's parent field names the directory holding its entry."""
        self._info("Checking parent pointers...")
        for d in sorted(self.dirs):
            want = self.parent_of.get(d, _STRANDED)
            if want < 0:
                continue  # set when it is linked into /lost+found
            inode = self.inodes[d]
            if inode.parent != want:
                self._error(f"directory {d}: parent {inode.parent}, should be {want}", "corrected")
                inode.parent = want
                self._touch_inode(inode)

    def check_link_counts(self) -> None:
        """Files: one link per entry.  Directories: 2 + subdirectories (the
        core adds the links of what it puts into /lost+found itself)."""
        self._info("Checking link counts...")
        subdirs: dict[int, int] = {}
        for d, p in self.parent_of.items():
            if d != ROOT and p > 0:
                subdirs[p] = subdirs.get(p, 0) + 1
        for ino in sorted(self.inodes):
            inode = self.inodes[ino]
            if ino in self._stranded:
                continue
            want = 2 + subdirs.get(ino, 0) if _is_dir(inode) else self._file_refs.get(ino, 0)
            if inode.nlink != want:
                self._error(f"inode {ino}: link count {inode.nlink}, should be {want}", "corrected")
                inode.nlink = want
                self._touch_inode(inode)

    def check_block_counts(self) -> None:
        """An inode's blocks counter: data, indirect, directory and xattr
        blocks; and a file's size, which its block map must be able to reach."""
        self._info("Checking block counters and sizes...")
        largest = fmt.map_capacity(self.bs, MAX_HEIGHT) * self.bs
        for ino in sorted(self.inodes):
            if ino in self._rebuild:
                continue  # the core counts the blocks it lays out
            inode = self.inodes[ino]
            if stat.S_ISREG(inode.mode) and inode.size > largest:
                want = (self.last_lbn.get(ino, -1) + 1) * self.bs
                self._error(
                    f"inode {ino}: size {inode.size} is beyond the largest possible file",
                    f"set to {want}, the end of its last block",
                )
                inode.size = want
                self._touch_inode(inode)
            want = self.nblocks.get(ino, 0)
            if inode.blocks != want:
                self._error(
                    f"inode {ino}: blocks counter {inode.blocks}, should be {want}", "corrected"
                )
                inode.blocks = want
                self._touch_inode(inode)

    # -- allocation bitmaps ------------------------------------------------------

    def check_bitmaps(self) -> None:
        """Bitmaps against what the (repaired) inodes own, counters against bits."""
        self._info("Checking allocation bitmaps...")
        self._release_blocks()
        sb = self.sb
        in_use = bytearray(sb.inode_count + 1)
        for ino in self.inodes:
            in_use[ino] = 1
        freed = bytearray(sb.inode_count + 1)
        for ino in self._freed:
            freed[ino] = 1
        if self._new_root:
            freed[ROOT] = 1
        for g in range(sb.group_count):
            self._check_block_bitmap(g)
            self._check_inode_bitmap(g, in_use, freed)
        self.files = sum(1 for i in self.inodes.values() if not _is_dir(i))
        self.directories = len(self.inodes) - self.files
        self.blocks_used = 0
        for g in range(sb.group_count):
            lo = sb.group_start(g) + sb.group_overhead()
            self.blocks_used += self.used.count(1, lo, sb.group_start(g) + sb.group_blocks(g))

    def _release_blocks(self) -> None:
        """Blocks of freed inodes and of rebuilt directories go back to the pool."""
        rel = self._release
        if not rel:
            return
        keep = {self.inodes[i].xattr_block for i in self._rebuild if i in self.inodes}
        owner, used, touched = self.owner, self.used, self.touched
        for b, o in enumerate(owner):
            if o in rel and b not in keep:
                used[b] = 0
                owner[b] = 0
                touched[b] = 1

    def _check_block_bitmap(self, g: int) -> None:
        sb = self.sb
        gs, nbits = sb.group_start(g), sb.group_blocks(g)
        nbytes = fmt.bitmap_capacity(self.bs) // 8
        want = _pack_bits(self.used[gs : gs + nbits], nbytes)
        mine = _pack_bits(self.touched[gs : gs + nbits], nbytes)
        block = sb.bitmap_block(g)
        self._check_bitmap(g, self.bbm[g], want, mine, nbits, gs, BlockType.BITMAP, block)

    def _check_inode_bitmap(self, g: int, in_use: bytearray, freed: bytearray) -> None:
        sb = self.sb
        ipg = sb.inodes_per_group
        first = g * ipg + 1
        nbytes = fmt.bitmap_capacity(self.bs) // 8
        want = _pack_bits(in_use[first : first + ipg], nbytes)
        mine = _pack_bits(freed[first : first + ipg], nbytes)
        block = sb.ibitmap_block(g)
        self._check_bitmap(g, self.ibm[g], want, mine, ipg, first, BlockType.IBITMAP, block)

    def _check_bitmap(
        self,
        g: int,
        disk: bytes | None,
        want: bytes,
        mine: bytes,
        nbits: int,
        base: int,
        btype: BlockType,
        blockno: int,
    ) -> None:
        """Compare one bitmap block with the bits it should hold; rewrite it
        if they, its free counter or its initialized counter are wrong.  Bits
        in `mine` changed with a repair reported already."""
        what = "blocks" if btype is BlockType.BITMAP else "inodes"
        want_free = nbits - int.from_bytes(want, "little").bit_count()
        rewrite = disk is None
        if disk is not None:
            bits = disk[fmt.BITMAP_BITS_OFF : fmt.BITMAP_BITS_OFF + len(want)]
            have = int.from_bytes(bits, "little")
            diff = have ^ int.from_bytes(want, "little")
            if diff:
                found = diff & ~int.from_bytes(mine, "little")
                if found:
                    self._report_bits(g, what, have, found, nbits, base)
                rewrite = True
            have_free = nbits - (have & ((1 << nbits) - 1)).bit_count()
            counter = fmt.bitmap_free_count(disk)
            if counter != have_free:
                kind = "block" if btype is BlockType.BITMAP else "inode"
                self._error(
                    f"group {g}: {kind} bitmap free count {counter}, should be {want_free}",
                    "corrected",
                )
                rewrite = True
            if btype is BlockType.IBITMAP and fmt.itable_initialized(disk) != self.itable_init[g]:
                rewrite = True  # reported when read, or raised by fsck itself
        if not rewrite:
            return
        buf = bytearray(self.bs)
        buf[fmt.BITMAP_BITS_OFF : fmt.BITMAP_BITS_OFF + len(want)] = want
        fmt.set_bitmap_free_count(buf, want_free)
        if btype is BlockType.IBITMAP:
            fmt.set_itable_initialized(buf, self.itable_init[g])
        if disk is not None:
            buf[: fmt.HDR_SIZE] = disk[: fmt.HDR_SIZE]  # keeps its version for the seal
        self._put(blockno, buf, btype)

    def _report_bits(self, g: int, what: str, have: int, diff: int, nbits: int, base: int) -> None:
        lines = []
        for first, last in _bit_ranges(diff, nbits):
            if first >= nbits:
                lines.append(f"group {g}: bitmap bits past the end of the group are set")
                break
            last = min(last, nbits - 1)
            # Split a differing run where its kind changes (in use vs. free).
            i = first
            while i <= last:
                marked = bool(have >> i & 1)
                j = i
                while j < last and bool(have >> (j + 1) & 1) == marked:
                    j += 1
                lines.append(self._bits_line(g, what, base + i, base + j, marked))
                i = j + 1
        for line in lines[:_MAX_RANGES]:
            self._error(line, "corrected the bitmap")
        if len(lines) > _MAX_RANGES:
            self._error(
                f"group {g}: {len(lines) - _MAX_RANGES} more {what} ranges wrong in the bitmap",
                "corrected the bitmap",
            )

    def _bits_line(self, g: int, what: str, first: int, last: int, marked: bool) -> str:
        if not marked:
            return f"group {g}: {what} {_span(first, last)} in use but marked free"
        if what == "inodes":
            idx = (first - 1) % self.sb.inodes_per_group
            if idx // self.sb.inodes_per_block >= self.itable_init[g]:
                return (
                    f"group {g}: inodes {_span(first, last)} marked in use but their inode "
                    "table block is not initialized"
                )
        return f"group {g}: {what} {_span(first, last)} free but marked in use"

    # ==================================================================
    # Repair

    def write_repairs(self) -> None:
        """Write every changed block back, sealed; superblocks last, so an
        interrupted repair leaves the old ones to start again from."""
        self._info("Writing repairs...")
        for ino in sorted(self._dirty_inodes | set(self._freed)):
            blk, off = self.sb.inode_location(ino)
            rec = self.inodes.get(ino) or Inode(ino, generation=self._freed.get(ino, 0))
            rec.pack_into(self._itable_block(blk), off)
        for st in self.dirs.values():
            if not st.rebuild:
                self._write_dir_edits(st)
        supers = {0, self.sb.backup_blockno}
        order = sorted(b for b in self._overlay if b not in supers)
        order += sorted(b for b in self._overlay if b in supers)
        for b in order:
            buf, btype = self._overlay[b]
            if btype is not None:
                fmt.seal(buf, btype, b, _next_version(buf))
        # Adjacent blocks in one request.
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and order[j] == order[j - 1] + 1 and order[j] not in supers:
                j += 1
            chunk = b"".join(bytes(self._overlay[b][0]) for b in order[i:j])
            self.storage.write_sync(order[i] * self.bs, chunk)
            i = j

    def _write_dir_edits(self, st: DirState) -> None:
        """Rewrite the buckets whose entries changed and the header's count."""
        kept = [e for e in st.entries if not e.removed]
        touched = {e.lbn for e in st.entries if e.removed or e.changed}
        if not touched and st.count == len(kept):
            return
        for lbn in sorted(touched):
            pbn, ld = st.buckets[lbn]
            entries = [DirEntry(e.cookie, e.ino, e.dtype, e.name) for e in kept if e.lbn == lbn]
            fmt.pack_bucket(self._modify(pbn, BlockType.DIRBUCKET), ld, entries)
        hdr = self._modify(st.hdr_pbn, BlockType.DIRHDR)
        depth, nb, _ = fmt.read_dirhdr(hdr)
        fmt.write_dirhdr(hdr, depth, nb, len(kept))

    async def repair_namespace(self) -> None:
        """What needs the directory code: rebuilt directories, /lost+found."""
        if not (self._rebuild or self.lost_found_moves):
            return
        self._info("Rebuilding directories and reconnecting orphans...")
        fs = open_host(self.storage, self.sb)
        try:
            await self._as_operation(fs)
        except (FsError, CorruptVolume) as e:
            # The verification pass below reports what this left undone.
            log.error("repair failed: %s", e)
            self.uncorrectable += 1
        await fs.destroy()  # on storage, and the log empty again

    async def _as_operation(self, fs: FileSystem) -> None:
        """The namespace repairs as one core operation (which stores the
        inodes it changed); through FileSystem.run where the core has it."""
        run = getattr(fs, "run", None)
        if run is not None:
            await run(self._namespace_work, fs)
            return
        async with fs._op:
            try:
                await self._namespace_work(fs)
            finally:
                store = getattr(fs, "_store_inodes", None)
                if store is not None:
                    await store()

    async def _namespace_work(self, fs: FileSystem) -> None:
        for ino in sorted(self._rebuild):
            await self._rebuild_dir(fs, ino)
        if self.lost_found_moves:
            await self._fill_lost_found(fs)

    async def _rebuild_dir(self, fs: FileSystem, ino: int) -> None:
        dino = await fs._iget(ino, Mode.X)
        await fs._dir_init(dino)
        for e in self.dirs[ino].kept():
            await fs._dir_add(dino, e.name, e.ino, self.inodes[e.ino].mode)
        await fs._iput(dino)

    async def _fill_lost_found(self, fs: FileSystem) -> None:
        if self.lost_found:
            lf = await fs._iget(self.lost_found, Mode.X)
        else:
            self._info("Creating /lost+found")
            made = await fs._new_node(ROOT, LOST_FOUND, stat.S_IFDIR | 0o700, Ctx(0, 0))
            lf = await fs._iget(made.ino, Mode.X)
        for ino, name in self.lost_found_moves:
            inode = await fs._iget(ino, Mode.X)
            await fs._dir_add(lf, name, ino, inode.mode)
            if _is_dir(inode):
                inode.parent = lf.ino
                lf.nlink += 1
                await fs._iput(inode)
        await fs._iput(lf)

    async def verify(self) -> None:
        """Check the repaired volume again, read-only; what is still wrong
        was not corrected."""
        self._info("Verifying repairs...")
        again = Fsck(self.storage, force=True, progress=False, report=False)
        again.check()
        for p in again.problems:
            log.error("still wrong after repair: %s", p)
        self.uncorrectable = max(self.uncorrectable, len(again.problems))
        self.corrected = max(0, min(self.corrected, self.found_errors - self.uncorrectable))
        self.files, self.directories = again.files, again.directories
        self.blocks_used = again.blocks_used


def _next_version(buf: bytearray) -> int:
    try:
        return fmt.read_header(buf).version + 1
    except CorruptVolume:
        return 1


def _dir_block_kind(lbn: int) -> tuple[BlockType, str]:
    if lbn == 0:
        return BlockType.DIRHDR, "header"
    if lbn < fmt.TABLE_BASE:
        return BlockType.DIRBUCKET, "bucket"
    return BlockType.DIRTABLE, "hash table"


def _bucket_problems(
    lbn: int, ld: int, entries: list[DirEntry], slots: list[int], table: list[int], depth: int
) -> list[str]:
    """A bucket of local depth ld serves an aligned run of 2**(depth-ld)
    slots, and holds only names whose hash leads to it."""
    where = f"bucket at logical block {lbn}"
    if ld > depth:
        return [f"{where} has local depth {ld}, more than the table's {depth}"]
    width = 1 << (depth - ld)
    lo = slots[0]
    if len(slots) != width or lo % width or slots[-1] != lo + width - 1:
        return [f"{where} has local depth {ld} but {len(slots)} hash table slots lead to it"]
    out = []
    cookies: set[int] = set()
    for e in entries:
        h = fmt.name_hash(e.name)
        if e.cookie >> 16 != h:
            out.append(f"entry {e.name!r} carries a wrong hash")
        elif table[h >> (fmt.HASH_BITS - depth) if depth else 0] != lbn:
            out.append(f"entry {e.name!r} is in the wrong bucket")
        elif e.cookie & 0xFFFF == 0 or e.cookie in cookies:
            out.append(f"entry {e.name!r} has an invalid cookie")
        cookies.add(e.cookie)
    return out


# ======================================================================
# Entry points


async def run_fsck(
    storage: Storage, repair: bool = False, *, force: bool = False, progress: bool = True
) -> Fsck:
    """Check `storage` (and repair it with `repair`); the Fsck says what it found.

    Raises QuietError (exit code 8) when the volume cannot be checked: not a
    sharedfs volume, or in use by a live host without `force`."""
    if repair:
        storage = _marking_mirror(storage)
    f = Fsck(storage, repair=repair, force=force, progress=progress)
    log_checked = await _check_journal(f, storage, force)
    f.check()
    if repair and f.found_errors:
        f.write_repairs()
        await storage.flush()
        if not log_checked:
            # The superblock that locates the log was restored just now.
            await _check_journal(f, storage, force)
        await f.repair_namespace()
        await f.verify()
    return f


def _marking_mirror(storage: Storage) -> Storage:
    """Repairs of a mirrored volume mark the regions they write, for the
    next `sharedfs mirror resync` (no host ships them: none is mounted)."""
    for reader in (read_superblock, read_backup_superblock):
        try:
            return marking_only(storage, reader(storage))
        except CorruptVolume:
            continue
    return storage


async def _check_journal(f: Fsck, storage: Storage, force: bool) -> bool:
    """Committed transactions still in the log: replayed under -y (then the
    volume is checked as the replay left it); under -n, said to need it.  A
    volume in use is left to its hosts (and to the checks that refuse it).
    False if the superblock that locates the log could not be read."""
    try:
        sb = read_superblock(storage)
        if live_slots(storage, sb) and not force:
            return True
    except CorruptVolume:
        return False  # the superblock checks say what is wrong
    try:
        plan = await journal.replay(storage, sb, dry_run=True)
    except CorruptVolume as e:
        await _restart_journal(f, storage, sb, e)
        return True
    if not plan.blocks_written:
        return True  # what the log holds is on the volume already
    problem = (
        f"the log holds changes to {plan.blocks_written} blocks not yet on the volume"
        f" ({plan.transactions} transactions)"
    )
    if f.repair:
        done = await journal.replay(storage, sb)
        f._error(problem, f"replayed them ({done.blocks_written} blocks written)")
    else:
        f._error(problem + "; a replay is needed (fsck -y, or mount)")
    return True


async def _restart_journal(f: Fsck, storage: Storage, sb: fmt.Superblock, e: CorruptVolume) -> None:
    """The log header is damaged: what the log holds cannot be read, and no
    host could mount (each appends to it), nor could the repairs that go
    through the filesystem core.  An empty log, as mkfs makes one, loses
    only what was already unreadable."""
    problem = f"the log cannot be read ({e})"
    if not f.repair:
        f._error(problem + "; fsck -y starts an empty log")
        return
    bs = sb.block_size
    area = journal.Area.of(sb)
    # Page numbers start afresh at random, as mkfs's: an old page left in
    # the log area never passes for one of the new log's.
    start = secrets.randbits(40) + 1
    empty = journal.JournalHeader(start, start, [0] * sb.host_slots)
    await storage.write(area.header * bs, journal.encode_header(bs, area.header, empty), fua=True)
    f._error(problem, "started an empty log (what it held was unreadable)")


def fsck(storage: Storage, repair: bool = False, *, force: bool = False) -> Fsck:
    """run_fsck for callers outside trio."""
    return trio.run(partial(run_fsck, storage, repair, force=force, progress=False))


def open_storage(path: str, *, writable: bool) -> Storage:
    """The volume, opened read-only unless fsck is to repair it."""
    try:
        return open_volume(path, writable=writable)
    except QuietError as e:
        raise QuietError(str(e), EXIT_OPERATIONAL) from None


class _Parser(Parser):
    usage_exit = EXIT_USAGE  # as e2fsck's


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sharedfs fsck",
        description="Check a sharedfs volume and repair it. Exit status: 0 clean, 1 errors "
        "corrected, 4 errors left, 8 operational error, 16 usage error.",
    )
    p.add_argument("volume", help="image file, block device or NBD URI")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "-n", dest="mode", action="store_const", const="n", help="check only; never write"
    )
    mode.add_argument("-y", dest="mode", action="store_const", const="y", help="repair everything")
    mode.add_argument(
        "-p", dest="mode", action="store_const", const="p", help="repair what is safe (as -y)"
    )
    p.add_argument(
        "-f", "--force", action="store_true", help="check even while a host has it mounted"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only problems and errors")
    p.add_argument("--debug", action="store_true")
    return p


def fsck_command(args: argparse.Namespace) -> int:
    repair = args.mode in ("y", "p")
    storage = open_storage(args.volume, writable=repair)
    try:
        try:
            checker = trio.run(
                partial(run_fsck, storage, repair, force=args.force, progress=not args.quiet)
            )
        except (QuietError, StorageError, KeyboardInterrupt):
            raise
        except Exception as e:
            # Whatever the volume holds, the user gets one line, not a traceback.
            log.debug("fsck failed", exc_info=True)
            raise QuietError(
                f"{args.volume}: fsck failed: {type(e).__name__}: {e}", EXIT_OPERATIONAL
            ) from None
    finally:
        storage.close()
    if checker.found_errors or not args.quiet:
        print(checker.summary())
    if args.mode is None and checker.found_errors:
        print(
            "sharedfs fsck: checked without -n/-y/-p, so nothing was changed; "
            "re-run with -y to repair"
        )
    return checker.exit_code


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug)
    if args.quiet and not args.debug:
        logging.getLogger().setLevel(logging.WARNING)
    run_tool(fsck_command, args)


if __name__ == "__main__":
    main()
