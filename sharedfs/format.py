"""On-disk format v1: every structure's layout, packing and checksums; no I/O.

The volume is an array of fixed-size blocks (4096 bytes by default):

    block 0                   superblock
    1 .. host_slots           one host slot block per host (heartbeat, pid)
    journal area              reserved for the shared log (LLOL journal)
    mirror-indicator area     reserved for per-region "unsynchronized" bits
    allocation groups         [block bitmap][inode bitmap][inode table][data ...]
    last block                backup superblock

Every metadata block starts with a 32-byte header naming its type, its own
block number, a version (the change number stamped by the cache when it was
last dirtied) and an xxh3-64 checksum of the whole block with the checksum
field zeroed.  Data blocks of regular files and symlinks are raw bytes.

docs/FORMAT.md describes the same layout in prose; keep them in step.
"""

from __future__ import annotations

import enum
import struct
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import xxhash

from .errors import CorruptVolume

FORMAT_VERSION = 1
SB_MAGIC = b"SHAREDFS"
BLOCK_MAGIC = b"SFMB"
DEFAULT_BLOCK_SIZE = 4096
ROOT_INO = 1
INODE_SIZE = 256
#: Bytes per mirror region (the granularity of the "unsynchronized" bits).
MIRROR_REGION_BYTES = 1 << 20
DEFAULT_BYTES_PER_INODE = 16384
#: The radix block map keeps this many pointers in the inode.
N_ROOTS = 12
MAX_NAME = 255


class BlockType(enum.IntEnum):
    SUPER = 1
    HOST = 2
    BITMAP = 3
    IBITMAP = 4
    INODES = 5
    INDIRECT = 6
    DIRHDR = 7
    DIRTABLE = 8
    DIRBUCKET = 9
    XATTR = 10
    JOURNAL = 11
    MIRROR = 12  # mirror indicators


# magic, type, flags, blockno, version, checksum
_HDR = struct.Struct("<4sHHQQQ")
HDR_SIZE = _HDR.size  # 32
_CSUM_OFF = 24


def payload_size(block_size: int) -> int:
    return block_size - HDR_SIZE


def checksum(block: bytes | bytearray | memoryview) -> int:
    """xxh3-64 over the block with the checksum field taken as zero."""
    h = xxhash.xxh3_64()
    mv = memoryview(block)
    h.update(mv[:_CSUM_OFF])
    h.update(b"\0" * 8)
    h.update(mv[_CSUM_OFF + 8 :])
    return h.intdigest()


def seal(block: bytearray, btype: BlockType, blockno: int, version: int) -> None:
    """Write the header of a metadata block in place, checksum last."""
    _HDR.pack_into(block, 0, BLOCK_MAGIC, btype, 0, blockno, version, 0)
    struct.pack_into("<Q", block, _CSUM_OFF, checksum(block))


@dataclass(frozen=True, slots=True)
class BlockHeader:
    btype: int
    blockno: int
    version: int
    checksum: int


def read_header(block: bytes | bytearray) -> BlockHeader:
    magic, btype, _flags, blockno, version, csum = _HDR.unpack_from(block, 0)
    if magic != BLOCK_MAGIC:
        raise CorruptVolume("bad block magic")
    return BlockHeader(btype, blockno, version, csum)


def stored_version(block: bytes | bytearray, blockno: int) -> int:
    """The version of a metadata block as read from storage at `blockno`,
    whatever its type; -1 if it is not a valid block there."""
    try:
        hdr = read_header(block)
    except CorruptVolume:
        return -1
    return hdr.version if hdr.blockno == blockno and hdr.checksum == checksum(block) else -1


def verify(block: bytes | bytearray, btype: BlockType, blockno: int) -> BlockHeader:
    """Check a metadata block read from storage; raise CorruptVolume if it is not
    a valid block of type `btype` living at `blockno`."""
    try:
        hdr = read_header(block)
    except CorruptVolume:
        raise CorruptVolume(f"block {blockno}: not a metadata block (bad magic)") from None
    if hdr.checksum != checksum(block):
        raise CorruptVolume(f"block {blockno}: checksum mismatch")
    if hdr.blockno != blockno:
        raise CorruptVolume(f"block {blockno}: header names block {hdr.blockno}")
    if hdr.btype != btype:
        raise CorruptVolume(f"block {blockno}: expected {btype.name} block, found type {hdr.btype}")
    return hdr


# --------------------------------------------------------------------------
# Superblock

_SB = struct.Struct(
    "<8sII16s64sQI"  # magic, version, block_size, uuid, label, volume_blocks, host_slots
    "QQQQQI"  # hosts_start, journal_start, journal_blocks, mirror_start, mirror_blocks, region
    "QIIII"  # groups_start, blocks_per_group, group_count, inodes_per_group, itable_blocks
    "q32s"  # created_ns, cluster_key
    "256s"  # mirror_secondary
)
#: Longest secondary address a superblock holds (UTF-8 bytes).
MAX_SECONDARY = 256


@dataclass(frozen=True, slots=True)
class Superblock:
    block_size: int
    volume_blocks: int
    host_slots: int
    hosts_start: int
    journal_start: int
    journal_blocks: int
    mirror_start: int
    mirror_blocks: int
    mirror_region_blocks: int
    groups_start: int
    blocks_per_group: int
    group_count: int
    inodes_per_group: int
    itable_blocks: int
    uuid: bytes = field(default=b"\0" * 16)
    label: str = ""
    created_ns: int = 0
    cluster_key: bytes = field(default=b"\0" * 32)
    #: Where the volume is mirrored to (a path or an NBD URI); "" for none.
    #: Volumes made before mirroring existed have zeros here: no mirror.
    mirror_secondary: str = ""
    version: int = FORMAT_VERSION

    # -- derived geometry -------------------------------------------------
    @property
    def inodes_per_block(self) -> int:
        return payload_size(self.block_size) // INODE_SIZE

    @property
    def backup_blockno(self) -> int:
        return self.volume_blocks - 1

    @property
    def inode_count(self) -> int:
        return self.group_count * self.inodes_per_group

    def group_start(self, g: int) -> int:
        return self.groups_start + g * self.blocks_per_group

    def group_blocks(self, g: int) -> int:
        """Blocks in group g (the last group may be short)."""
        end = min(self.group_start(g) + self.blocks_per_group, self.backup_blockno)
        return end - self.group_start(g)

    def bitmap_block(self, g: int) -> int:
        return self.group_start(g)

    def ibitmap_block(self, g: int) -> int:
        return self.group_start(g) + 1

    def itable_start(self, g: int) -> int:
        return self.group_start(g) + 2

    def group_overhead(self) -> int:
        return 2 + self.itable_blocks

    def group_of_block(self, blockno: int) -> int:
        return (blockno - self.groups_start) // self.blocks_per_group

    def inode_location(self, ino: int) -> tuple[int, int]:
        """(block number, byte offset) of inode `ino`."""
        g, idx = divmod(ino - 1, self.inodes_per_group)
        blk, slot = divmod(idx, self.inodes_per_block)
        return self.itable_start(g) + blk, HDR_SIZE + slot * INODE_SIZE

    def group_of_inode(self, ino: int) -> int:
        return (ino - 1) // self.inodes_per_group

    def valid_ino(self, ino: int) -> bool:
        return 1 <= ino <= self.inode_count

    def is_data_block(self, blockno: int) -> bool:
        """True if `blockno` lies in some group's data area."""
        if not self.groups_start <= blockno < self.backup_blockno:
            return False
        g = self.group_of_block(blockno)
        return g < self.group_count and blockno - self.group_start(g) >= self.group_overhead()

    # -- mirror regions ----------------------------------------------------
    @property
    def region_count(self) -> int:
        return -(-self.volume_blocks // self.mirror_region_blocks)

    @property
    def indicator_run_blocks(self) -> int:
        """Indicator blocks per host slot."""
        return self.mirror_blocks // self.host_slots

    def indicator_block(self, node: int, region: int) -> tuple[int, int]:
        """(block number, bit) of host `node`'s indicator for `region`."""
        i, bit = divmod(region, bitmap_capacity(self.block_size))
        return self.mirror_start + node * self.indicator_run_blocks + i, bit

    def region_range(self, region: int) -> tuple[int, int]:
        """(first block, block count) of `region`; the last one may be short."""
        first = region * self.mirror_region_blocks
        return first, min(self.mirror_region_blocks, self.volume_blocks - first)

    @property
    def data_blocks(self) -> int:
        return sum(self.group_blocks(g) - self.group_overhead() for g in range(self.group_count))

    # -- pack / unpack ------------------------------------------------------
    def pack(self, blockno: int = 0) -> bytearray:
        buf = bytearray(self.block_size)
        _SB.pack_into(
            buf,
            HDR_SIZE,
            SB_MAGIC,
            self.version,
            self.block_size,
            self.uuid,
            self.label.encode()[:64],
            self.volume_blocks,
            self.host_slots,
            self.hosts_start,
            self.journal_start,
            self.journal_blocks,
            self.mirror_start,
            self.mirror_blocks,
            self.mirror_region_blocks,
            self.groups_start,
            self.blocks_per_group,
            self.group_count,
            self.inodes_per_group,
            self.itable_blocks,
            self.created_ns,
            self.cluster_key,
            self.mirror_secondary.encode(),
        )
        seal(buf, BlockType.SUPER, blockno, 0)
        return buf

    @classmethod
    def unpack(cls, buf: bytes | bytearray, blockno: int = 0) -> Superblock:
        if len(buf) < HDR_SIZE + _SB.size or buf[HDR_SIZE : HDR_SIZE + 8] != SB_MAGIC:
            raise CorruptVolume("not a sharedfs volume (no superblock magic)")
        f = _SB.unpack_from(buf, HDR_SIZE)
        bs = f[2]
        if bs not in (1024, 2048, 4096, 8192, 16384, 32768, 65536) or len(buf) < bs:
            raise CorruptVolume(f"superblock: bad block size {bs}")
        verify(bytes(buf[:bs]), BlockType.SUPER, blockno)
        if f[1] != FORMAT_VERSION:
            raise CorruptVolume(f"unsupported format version {f[1]} (this sharedfs reads v1)")
        sb = cls(
            version=f[1],
            block_size=bs,
            uuid=f[3],
            label=f[4].rstrip(b"\0").decode(errors="replace"),
            volume_blocks=f[5],
            host_slots=f[6],
            hosts_start=f[7],
            journal_start=f[8],
            journal_blocks=f[9],
            mirror_start=f[10],
            mirror_blocks=f[11],
            mirror_region_blocks=f[12],
            groups_start=f[13],
            blocks_per_group=f[14],
            group_count=f[15],
            inodes_per_group=f[16],
            itable_blocks=f[17],
            created_ns=f[18],
            cluster_key=f[19],
            mirror_secondary=f[20].rstrip(b"\0").decode(errors="replace"),
        )
        sb.check_geometry()
        return sb

    def check_geometry(self) -> None:
        """Refuse superblocks whose areas overlap or fall off the volume."""
        ok = (
            self.host_slots >= 1
            and self.hosts_start == 1
            and self.journal_start == self.hosts_start + self.host_slots
            and self.mirror_start == self.journal_start + self.journal_blocks
            and self.groups_start == self.mirror_start + self.mirror_blocks
            and self.group_count >= 1
            and self.blocks_per_group <= bitmap_capacity(self.block_size)
            and self.inodes_per_group <= bitmap_capacity(self.block_size)
            and self.itable_blocks * self.inodes_per_block == self.inodes_per_group
            and self.group_start(self.group_count - 1) + self.group_overhead() < self.backup_blockno
        )
        if not ok:
            raise CorruptVolume("superblock: inconsistent geometry")

    def with_label(self, label: str) -> Superblock:
        return replace(self, label=label)

    def with_secondary(self, secondary: str) -> Superblock:
        if len(secondary.encode()) > MAX_SECONDARY:
            raise ValueError(f"secondary address is longer than {MAX_SECONDARY} bytes")
        return replace(self, mirror_secondary=secondary)


def bitmap_capacity(block_size: int) -> int:
    """Bits in a bitmap block after its header and 8-byte counter."""
    return (payload_size(block_size) - 8) * 8


def make_geometry(
    volume_bytes: int,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    host_slots: int = 8,
    label: str = "",
    bytes_per_inode: int = DEFAULT_BYTES_PER_INODE,
    created_ns: int = 0,
    cluster_key: bytes = b"\0" * 32,
) -> Superblock:
    """Lay out a fresh volume of `volume_bytes`; raise ValueError if too small."""
    if block_size not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
        raise ValueError(f"block size must be a power of two from 1024 to 65536, not {block_size}")
    if not 1 <= host_slots <= 1024:
        raise ValueError("--nodes must be between 1 and 1024")
    if len(label.encode()) > 64:
        raise ValueError("label is longer than 64 bytes")
    volume_blocks = volume_bytes // block_size
    journal_blocks = min(max(256, volume_blocks // 256), 65536)
    region_blocks = max(1, MIRROR_REGION_BYTES // block_size)
    regions = -(-volume_blocks // region_blocks)
    # One indicator block run per host slot, so hosts never share a block.
    mirror_blocks = -(-regions // bitmap_capacity(block_size)) * host_slots
    groups_start = 1 + host_slots + journal_blocks + mirror_blocks
    # Groups small enough that each host slot can have a few of its own to
    # allocate from (hosts then rarely fight over a bitmap block), but never
    # more bits than a bitmap block holds.
    bpg = min(bitmap_capacity(block_size), max(volume_blocks // (4 * host_slots), 2048))
    ipb = payload_size(block_size) // INODE_SIZE
    itable = -(-(bpg * block_size // bytes_per_inode) // ipb)
    # The inode bitmap has one bit per inode: never more inodes than that.
    itable = min(itable, bitmap_capacity(block_size) // ipb)
    ipg = itable * ipb
    usable = volume_blocks - 1 - groups_start  # minus the backup superblock
    overhead = 2 + itable
    min_group = overhead + 16
    if usable < min_group:
        need = (groups_start + 1 + min_group) * block_size
        raise ValueError(f"volume too small: need at least {need} bytes")
    group_count = -(-usable // bpg)
    if usable - (group_count - 1) * bpg < min_group:
        group_count -= 1  # a tail too short to hold a group is left unused
    sb = Superblock(
        block_size=block_size,
        volume_blocks=volume_blocks,
        host_slots=host_slots,
        hosts_start=1,
        journal_start=1 + host_slots,
        journal_blocks=journal_blocks,
        mirror_start=1 + host_slots + journal_blocks,
        mirror_blocks=mirror_blocks,
        mirror_region_blocks=region_blocks,
        groups_start=groups_start,
        blocks_per_group=bpg,
        group_count=group_count,
        inodes_per_group=ipg,
        itable_blocks=itable,
        uuid=uuid_mod.uuid4().bytes,
        label=label,
        created_ns=created_ns,
        cluster_key=cluster_key,
    )
    sb.check_geometry()
    return sb


# --------------------------------------------------------------------------
# Host slots: one block per host, written only by the host that holds it.

# in_use, pid, mount_count, heartbeat_ns, since_ns, hostname, mountpoint
_HOST = struct.Struct("<IIQqq64s512s64s")


@dataclass(frozen=True, slots=True)
class HostSlot:
    in_use: bool = False
    pid: int = 0
    mount_count: int = 0
    heartbeat_ns: int = 0
    since_ns: int = 0
    hostname: str = ""
    mountpoint: str = ""
    #: "host:port" of the lock master this host runs, "" if none: how the
    #: other hosts find it, and a successor after a failover (failover.py).
    master: str = ""

    def pack(self, block_size: int, blockno: int) -> bytearray:
        buf = bytearray(block_size)
        _HOST.pack_into(
            buf,
            HDR_SIZE,
            int(self.in_use),
            self.pid,
            self.mount_count,
            self.heartbeat_ns,
            self.since_ns,
            self.hostname.encode()[:64],
            self.mountpoint.encode()[:512],
            self.master.encode()[:64],
        )
        seal(buf, BlockType.HOST, blockno, 0)
        return buf

    @classmethod
    def unpack(cls, buf: bytes | bytearray) -> HostSlot:
        in_use, pid, count, hb, since, name, mnt, master = _HOST.unpack_from(buf, HDR_SIZE)
        return cls(
            bool(in_use),
            pid,
            count,
            hb,
            since,
            name.rstrip(b"\0").decode(errors="replace"),
            mnt.rstrip(b"\0").decode(errors="replace"),
            master.rstrip(b"\0").decode(errors="replace"),
        )


# --------------------------------------------------------------------------
# Bitmaps (block and inode): a free counter and, for inode bitmaps, how many
# of the group's inode table blocks have been initialized (mkfs leaves them
# unwritten so that formatting a large volume stays fast; the first inode
# allocated in a table block formats it), then one bit per block/inode.

_BITMAP_COUNT = struct.Struct("<II")
BITMAP_BITS_OFF = HDR_SIZE + _BITMAP_COUNT.size


def bitmap_free_count(buf: bytes | bytearray) -> int:
    return _BITMAP_COUNT.unpack_from(buf, HDR_SIZE)[0]


def set_bitmap_free_count(buf: bytearray, n: int) -> None:
    struct.pack_into("<I", buf, HDR_SIZE, n)


def itable_initialized(buf: bytes | bytearray) -> int:
    """Inode bitmaps: inode table blocks of the group formatted so far."""
    return _BITMAP_COUNT.unpack_from(buf, HDR_SIZE)[1]


def set_itable_initialized(buf: bytearray, n: int) -> None:
    struct.pack_into("<I", buf, HDR_SIZE + 4, n)


def bit_test(buf: bytes | bytearray, i: int) -> bool:
    return bool(buf[BITMAP_BITS_OFF + (i >> 3)] & (1 << (i & 7)))


def bit_set(buf: bytearray, i: int) -> None:
    buf[BITMAP_BITS_OFF + (i >> 3)] |= 1 << (i & 7)


def bit_clear(buf: bytearray, i: int) -> None:
    buf[BITMAP_BITS_OFF + (i >> 3)] &= ~(1 << (i & 7)) & 0xFF


def find_clear_bit(buf: bytes | bytearray, nbits: int, start: int = 0) -> int:
    """First clear bit at or after `start` (wrapping once), or -1."""
    bits = bytes(memoryview(buf)[BITMAP_BITS_OFF : BITMAP_BITS_OFF + (nbits + 7) // 8])
    for lo in (start, 0):
        i = lo >> 3
        while i < len(bits):
            # Skip runs of full bytes in C rather than bit by bit.
            rest = bits[i:]
            i += len(rest) - len(rest.lstrip(b"\xff"))
            if i >= len(bits):
                break
            b = bits[i]
            for j in range(8):
                n = (i << 3) | j
                if not b & (1 << j) and lo <= n < nbits:
                    return n
            i += 1
    return -1


def find_clear_run(buf: bytes | bytearray, nbits: int, start: int, want: int) -> tuple[int, int]:
    """A run of clear bits beginning at the first clear bit at or after `start`
    (wrapping once): (first, length), length <= want; (-1, 0) if none is clear."""
    first = find_clear_bit(buf, nbits, start)
    if first < 0:
        return -1, 0
    n = 1
    while n < want and first + n < nbits and not bit_test(buf, first + n):
        n += 1
    return first, n


# --------------------------------------------------------------------------
# Mirror indicators (seed 004): one bit per region of the volume, set while
# the region may differ on the secondary.  A block has the bitmap layout:
# a u32 count of set bits, a u32 zero, then the bits.  An all-zero block (as
# mkfs and `mirror resync` leave it) has no header and marks nothing.


def seal_indicators(buf: bytearray, blockno: int) -> bytes:
    """A copy of indicator block `buf` ready for storage: counted and sealed."""
    out = bytearray(buf)
    count = int.from_bytes(out[BITMAP_BITS_OFF:], "little").bit_count()
    struct.pack_into("<II", out, HDR_SIZE, count, 0)
    seal(out, BlockType.MIRROR, blockno, 0)
    return bytes(out)


def read_indicators(buf: bytes | bytearray, blockno: int) -> bytearray | None:
    """Indicator block `blockno` as read from storage (bits via bit_test);
    None when it is damaged, so the caller must take every region it covers
    as marked."""
    if not any(buf):
        return bytearray(len(buf))
    try:
        verify(buf, BlockType.MIRROR, blockno)
    except CorruptVolume:
        return None
    return bytearray(buf)


# --------------------------------------------------------------------------
# Inodes

_INODE = struct.Struct("<IIIIQQqqqIIQQQB7x12Q")


@dataclass(slots=True)
class Inode:
    """One inode record.  mode == 0 marks a free slot.

    `roots` and `height` form the radix block map: at height 0 the roots point
    at data blocks 0..11; at height h each root covers PTRS**h blocks through h
    levels of INDIRECT blocks.  A zero pointer is a hole.
    """

    ino: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    nlink: int = 0
    size: int = 0
    blocks: int = 0  # blocks owned (data, indirect, directory, xattr), for st_blocks
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    generation: int = 0
    flags: int = 0
    rdev: int = 0
    parent: int = 0  # directories: the parent directory (root: itself)
    xattr_block: int = 0
    height: int = 0
    roots: list[int] = field(default_factory=lambda: [0] * N_ROOTS)

    def pack_into(self, buf: bytearray, off: int) -> None:
        _INODE.pack_into(
            buf,
            off,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.size,
            self.blocks,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            self.generation,
            self.flags,
            self.rdev,
            self.parent,
            self.xattr_block,
            self.height,
            *self.roots,
        )

    @classmethod
    def unpack_from(cls, ino: int, buf: bytes | bytearray, off: int) -> Inode:
        f = _INODE.unpack_from(buf, off)
        return cls(ino, *f[:15], roots=list(f[15:]))


def ptrs_per_block(block_size: int) -> int:
    return payload_size(block_size) // 8


def map_capacity(block_size: int, height: int) -> int:
    """Logical blocks addressable by a block map of this height."""
    return N_ROOTS * ptrs_per_block(block_size) ** height


def get_ptr(buf: bytes | bytearray, i: int) -> int:
    return struct.unpack_from("<Q", buf, HDR_SIZE + 8 * i)[0]


def set_ptr(buf: bytearray, i: int, v: int) -> None:
    struct.pack_into("<Q", buf, HDR_SIZE + 8 * i, v)


def all_ptrs(buf: bytes | bytearray, block_size: int) -> tuple[int, ...]:
    n = ptrs_per_block(block_size)
    return struct.unpack_from(f"<{n}Q", buf, HDR_SIZE)


# --------------------------------------------------------------------------
# Directories: an extendible hash table kept in the directory's own blocks.
#
#   lbn 0                 DIRHDR: depth, counts, first part of the bucket table
#   lbn 1 .. TABLE_BASE-1 DIRBUCKET blocks, handed out in order
#   lbn TABLE_BASE ..     DIRTABLE blocks: the rest of the bucket table
#
# The table has 2**depth slots, indexed by the top `depth` bits of a name's
# 47-bit hash; each slot holds the lbn of a bucket.  An entry's readdir cookie
# is (hash << 16 | seq) with seq >= 1 chosen to be unique among names sharing
# a hash, so cookies stay valid while the directory changes and readdir walks
# entries in cookie order.  Cookies 1 and 2 stand for "." and "..".

HASH_BITS = 47
TABLE_BASE = 1 << 24
_DIRHDR = struct.Struct("<IIQ")  # depth, next_bucket_lbn, entry_count
# A bucket is a slotted page: fixed-size entry heads grow from the front,
# names grow from the back; `names_start` is the lowest name byte in use.
_BUCKET = struct.Struct("<HHI")  # local depth, entry count, names_start
_EH = struct.Struct("<QQBBH")  # cookie, ino, dtype, name length, name offset
_EH_OFF = HDR_SIZE + _BUCKET.size


def name_hash(name: bytes) -> int:
    # Never 0, so every cookie is > 0xFFFF and readdir can use 1 and 2 for "." and "..".
    return max(xxhash.xxh3_64_intdigest(name) >> (64 - HASH_BITS), 1)


def hdr_table_slots(block_size: int) -> int:
    return (payload_size(block_size) - _DIRHDR.size) // 4


def table_slots_per_block(block_size: int) -> int:
    return payload_size(block_size) // 4


def table_slot_location(block_size: int, i: int) -> tuple[int, int]:
    """(lbn, byte offset) of bucket-table slot i."""
    k0 = hdr_table_slots(block_size)
    if i < k0:
        return 0, HDR_SIZE + _DIRHDR.size + 4 * i
    blk, slot = divmod(i - k0, table_slots_per_block(block_size))
    return TABLE_BASE + blk, HDR_SIZE + 4 * slot


def read_dirhdr(buf: bytes | bytearray) -> tuple[int, int, int]:
    return _DIRHDR.unpack_from(buf, HDR_SIZE)


def write_dirhdr(buf: bytearray, depth: int, next_bucket: int, count: int) -> None:
    _DIRHDR.pack_into(buf, HDR_SIZE, depth, next_bucket, count)


def get_u32(buf: bytes | bytearray, off: int) -> int:
    return struct.unpack_from("<I", buf, off)[0]


def set_u32(buf: bytearray, off: int, v: int) -> None:
    struct.pack_into("<I", buf, off, v)


class DirEntry(NamedTuple):
    cookie: int
    ino: int
    dtype: int
    name: bytes

    @property
    def hash(self) -> int:
        return self.cookie >> 16

    def size(self) -> int:
        return _EH.size + len(self.name)


def _bucket_heads(buf: bytes | bytearray, blockno: int) -> tuple[int, int, int]:
    depth, count, names_start = _BUCKET.unpack_from(buf, HDR_SIZE)
    end = _EH_OFF + count * _EH.size
    if end > names_start or names_start > len(buf):
        raise CorruptVolume(f"directory block {blockno}: entry table overlaps names")
    return depth, count, names_start


def _iter_heads(buf: bytes | bytearray, count: int) -> Iterator[tuple[int, int, int, int, int]]:
    return _EH.iter_unpack(memoryview(buf)[_EH_OFF : _EH_OFF + count * _EH.size])


def unpack_bucket(buf: bytes | bytearray, blockno: int = -1) -> tuple[int, list[DirEntry]]:
    """(local depth, entries in cookie order)."""
    depth, count, names_start = _bucket_heads(buf, blockno)
    entries = []
    for cookie, ino, dtype, n, off in _iter_heads(buf, count):
        if n == 0 or off < names_start or off + n > len(buf):
            raise CorruptVolume(f"directory block {blockno}: malformed entry")
        entries.append(DirEntry(cookie, ino, dtype, bytes(buf[off : off + n])))
    entries.sort()
    return depth, entries


def _heads_hashed(
    buf: bytes | bytearray, count: int, h: int
) -> Iterator[tuple[int, int, int, int, int]]:
    """The entry heads whose name hashes to h.  Every lookup and create
    asks, so they are found at C speed rather than unpacked one by one: a
    cookie is stored little-endian, its hash in the 6 bytes past its
    16-bit sequence number."""
    key = h.to_bytes(6, "little")
    end = _EH_OFF + count * _EH.size
    at = buf.find(key, _EH_OFF + 2, end)
    while at >= 0:
        if (at - _EH_OFF - 2) % _EH.size == 0:  # not bytes of another field
            yield _EH.unpack_from(buf, at - 2)
        at = buf.find(key, at + 1, end)


def bucket_find(buf: bytes | bytearray, h: int, name: bytes, blockno: int = -1) -> DirEntry | None:
    """The entry called `name` (whose hash is h), without decoding the rest."""
    _, count, _ = _bucket_heads(buf, blockno)
    n = len(name)
    for cookie, ino, dtype, nl, off in _heads_hashed(buf, count, h):
        if nl == n and buf[off : off + n] == name:
            return DirEntry(cookie, ino, dtype, name)
    return None


def bucket_next_seq(buf: bytes | bytearray, h: int, blockno: int = -1) -> int:
    """The smallest cookie sequence number >= 1 unused among names hashing to h."""
    _, count, _ = _bucket_heads(buf, blockno)
    used = {c & 0xFFFF for c, *_ in _heads_hashed(buf, count, h)}
    return next(s for s in range(1, 0x10000) if s not in used)


def bucket_append(buf: bytearray, e: DirEntry, blockno: int = -1) -> bool:
    """Add an entry in place; False if the bucket has no room for it."""
    depth, count, names_start = _bucket_heads(buf, blockno)
    head_end = _EH_OFF + (count + 1) * _EH.size
    off = names_start - len(e.name)
    if off < head_end:
        return False
    buf[off:names_start] = e.name
    _EH.pack_into(buf, _EH_OFF + count * _EH.size, e.cookie, e.ino, e.dtype, len(e.name), off)
    _BUCKET.pack_into(buf, HDR_SIZE, depth, count + 1, off)
    return True


def bucket_capacity(block_size: int) -> int:
    return block_size - _EH_OFF


def pack_bucket(buf: bytearray, depth: int, entries: list[DirEntry]) -> None:
    """Rewrite a bucket from scratch; the caller checks the entries fit."""
    buf[HDR_SIZE:] = bytes(len(buf) - HDR_SIZE)
    _BUCKET.pack_into(buf, HDR_SIZE, depth, 0, len(buf))
    for e in entries:
        if not bucket_append(buf, e):
            raise ValueError("directory entries do not fit in one bucket")


# --------------------------------------------------------------------------
# Extended attributes: one XATTR block per inode holds them all.

_XATTR_COUNT = struct.Struct("<I")
_XATTR_ENTRY = struct.Struct("<BH")


def unpack_xattrs(buf: bytes | bytearray, blockno: int = -1) -> dict[bytes, bytes]:
    (count,) = _XATTR_COUNT.unpack_from(buf, HDR_SIZE)
    off = HDR_SIZE + _XATTR_COUNT.size
    out: dict[bytes, bytes] = {}
    for _ in range(count):
        if off + _XATTR_ENTRY.size > len(buf):
            raise CorruptVolume(f"xattr block {blockno}: entries run past the block")
        nlen, vlen = _XATTR_ENTRY.unpack_from(buf, off)
        off += _XATTR_ENTRY.size
        if off + nlen + vlen > len(buf) or nlen == 0:
            raise CorruptVolume(f"xattr block {blockno}: malformed entry")
        out[bytes(buf[off : off + nlen])] = bytes(buf[off + nlen : off + nlen + vlen])
        off += nlen + vlen
    return out


def xattrs_size(xattrs: dict[bytes, bytes]) -> int:
    return _XATTR_COUNT.size + sum(_XATTR_ENTRY.size + len(k) + len(v) for k, v in xattrs.items())


def pack_xattrs(buf: bytearray, xattrs: dict[bytes, bytes]) -> None:
    _XATTR_COUNT.pack_into(buf, HDR_SIZE, len(xattrs))
    off = HDR_SIZE + _XATTR_COUNT.size
    for k, v in sorted(xattrs.items()):
        _XATTR_ENTRY.pack_into(buf, off, len(k), len(v))
        off += _XATTR_ENTRY.size
        buf[off : off + len(k)] = k
        off += len(k)
        buf[off : off + len(v)] = v
        off += len(v)
    buf[off:] = bytes(len(buf) - off)
