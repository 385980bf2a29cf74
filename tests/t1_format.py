"""On-disk format: packing, checksums, geometry and the block-level helpers."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from sharedfs import format as fmt
from sharedfs.errors import CorruptVolume
from sharedfs.format import BlockType, DirEntry, Inode

BS = fmt.DEFAULT_BLOCK_SIZE


@pytest.fixture
def sb() -> fmt.Superblock:
    return fmt.make_geometry(
        64 << 20, label="testvol", created_ns=1_700_000_000_123, cluster_key=bytes(range(32))
    )


# --------------------------------------------------------------------------
# Superblock


def test_superblock_round_trip(sb):
    buf = sb.pack()
    assert len(buf) == BS
    assert fmt.Superblock.unpack(buf) == sb
    assert fmt.Superblock.unpack(bytes(buf)).label == "testvol"


def test_superblock_backup_copy_names_its_own_block(sb):
    buf = sb.pack(sb.backup_blockno)
    assert fmt.Superblock.unpack(buf, sb.backup_blockno) == sb
    with pytest.raises(CorruptVolume):
        fmt.Superblock.unpack(buf, 0)  # the header says it lives elsewhere


def test_superblock_bad_magic(sb):
    buf = sb.pack()
    buf[fmt.HDR_SIZE] ^= 0x01
    with pytest.raises(CorruptVolume, match="magic"):
        fmt.Superblock.unpack(buf)


def test_superblock_zero_block_is_not_a_volume():
    with pytest.raises(CorruptVolume):
        fmt.Superblock.unpack(bytes(BS))


@pytest.mark.parametrize("where", [fmt.HDR_SIZE + 40, fmt.HDR_SIZE + 100, BS - 1, 5])
def test_superblock_flipped_byte_fails_checksum(sb, where):
    buf = sb.pack()
    buf[where] ^= 0x40
    with pytest.raises(CorruptVolume):
        fmt.Superblock.unpack(buf)


def test_superblock_flipped_checksum_byte(sb):
    buf = sb.pack()
    buf[fmt._CSUM_OFF] ^= 0xFF
    with pytest.raises(CorruptVolume, match="checksum"):
        fmt.Superblock.unpack(buf)


def test_superblock_wrong_version(sb):
    buf = replace(sb, version=fmt.FORMAT_VERSION + 1).pack()
    with pytest.raises(CorruptVolume, match="version"):
        fmt.Superblock.unpack(buf)


@pytest.mark.parametrize(
    "change",
    [
        {"journal_start": 1},  # journal overlaps the host slots
        {"hosts_start": 0},
        {"host_slots": 0},
        {"group_count": 0},
        {"itable_blocks": 3},  # no longer matches inodes_per_group
        {"blocks_per_group": fmt.bitmap_capacity(BS) + 1},
    ],
)
def test_superblock_inconsistent_geometry(sb, change):
    buf = replace(sb, **change).pack()
    with pytest.raises(CorruptVolume, match="geometry"):
        fmt.Superblock.unpack(buf)


def test_superblock_groups_past_the_end(sb):
    # The last group's metadata would reach past the backup superblock.
    bad = replace(sb, volume_blocks=sb.groups_start + sb.group_overhead())
    with pytest.raises(CorruptVolume, match="geometry"):
        fmt.Superblock.unpack(bad.pack())


def test_superblock_bad_block_size_field(sb):
    buf = sb.pack()
    # block_size follows magic (8) and version (4).
    struct.pack_into("<I", buf, fmt.HDR_SIZE + 12, 3000)
    with pytest.raises(CorruptVolume, match="block size"):
        fmt.Superblock.unpack(buf)


# --------------------------------------------------------------------------
# Geometry


def _check_layout(sb: fmt.Superblock, volume_bytes: int) -> None:
    assert sb.volume_blocks == volume_bytes // sb.block_size
    assert sb.backup_blockno == sb.volume_blocks - 1
    areas = [
        (0, 1),
        (sb.hosts_start, sb.hosts_start + sb.host_slots),
        (sb.journal_start, sb.journal_start + sb.journal_blocks),
        (sb.mirror_start, sb.mirror_start + sb.mirror_blocks),
    ]
    for g in range(sb.group_count):
        areas.append((sb.group_start(g), sb.group_start(g) + sb.group_blocks(g)))
    areas.append((sb.backup_blockno, sb.backup_blockno + 1))
    for (_, end), (start, _) in zip(areas[:-2], areas[1:-1], strict=True):
        assert end == start, "areas must be adjacent and ordered, never overlapping"
    # A tail too short for a group may be left unused before the backup.
    tail = sb.backup_blockno - areas[-2][1]
    assert 0 <= tail < sb.group_overhead() + 16
    for a, b in areas:
        assert a < b
    # Every group holds its metadata plus some data.
    for g in range(sb.group_count):
        assert sb.group_blocks(g) > sb.group_overhead()
        assert sb.group_blocks(g) <= sb.blocks_per_group <= fmt.bitmap_capacity(sb.block_size)
    assert sb.inodes_per_group <= fmt.bitmap_capacity(sb.block_size)
    assert sb.itable_blocks * sb.inodes_per_block == sb.inodes_per_group
    # Inode tables live inside their group, before its data.
    last_ino = sb.inode_count
    blk, off = sb.inode_location(last_ino)
    g = sb.group_count - 1
    assert sb.itable_start(g) <= blk < sb.group_start(g) + sb.group_overhead()
    assert off + fmt.INODE_SIZE <= sb.block_size
    assert not sb.is_data_block(sb.itable_start(0))
    assert sb.is_data_block(sb.group_start(0) + sb.group_overhead())
    assert not sb.is_data_block(sb.backup_blockno)
    sb.check_geometry()


def test_geometry_64m(sb):
    _check_layout(sb, 64 << 20)
    # Small volumes still get several groups, so hosts can allocate apart.
    assert sb.group_count == 8
    assert sb.blocks_per_group == 2048
    assert sb.host_slots == 8
    assert sb.data_blocks > 15000


def test_geometry_3g():
    sb = fmt.make_geometry(3 << 30)
    _check_layout(sb, 3 << 30)
    # 786432 blocks, about four groups per host slot: groups of 24576 blocks.
    assert sb.blocks_per_group == 786432 // 32
    assert sb.group_count == 32
    assert sb.group_blocks(31) < sb.blocks_per_group
    assert sb.data_blocks > 0.9 * sb.volume_blocks


def test_geometry_1t():
    sb = fmt.make_geometry(1 << 40)
    _check_layout(sb, 1 << 40)
    assert 8000 < sb.group_count < 8500
    assert sb.journal_blocks == 65536  # capped
    # One mirror-indicator run per host slot, enough bits for every region.
    regions = -(-sb.volume_blocks // sb.mirror_region_blocks)
    per_host = sb.mirror_blocks // sb.host_slots
    assert per_host * fmt.bitmap_capacity(BS) >= regions
    assert sb.inode_count > 60_000_000


def test_geometry_round_trips_through_pack():
    sb = fmt.make_geometry(3 << 30, host_slots=3, label="x")
    assert fmt.Superblock.unpack(sb.pack()) == sb


@pytest.mark.parametrize("bs", [1024, 2048, 8192])
def test_geometry_other_block_sizes(bs):
    sb = fmt.make_geometry(1 << 30, block_size=bs)
    _check_layout(sb, 1 << 30)
    assert fmt.Superblock.unpack(sb.pack()) == sb


@pytest.mark.parametrize("bs", [16384, 65536])
def test_geometry_large_block_sizes(bs):
    sb = fmt.make_geometry(4 << 30, block_size=bs)
    _check_layout(sb, 4 << 30)


def test_geometry_dense_inodes_are_capped_by_the_bitmap():
    sb = fmt.make_geometry(64 << 20, bytes_per_inode=4096)
    _check_layout(sb, 64 << 20)


def test_geometry_too_small():
    with pytest.raises(ValueError, match="too small"):
        fmt.make_geometry(1 << 20)


@pytest.mark.parametrize("bs", [512, 3000, 4095, 131072])
def test_geometry_bad_block_size(bs):
    with pytest.raises(ValueError, match="block size"):
        fmt.make_geometry(64 << 20, block_size=bs)


def test_geometry_bad_host_slots_and_label():
    with pytest.raises(ValueError):
        fmt.make_geometry(64 << 20, host_slots=0)
    with pytest.raises(ValueError):
        fmt.make_geometry(64 << 20, label="x" * 65)


def test_geometry_smallest_volume_that_fits():
    fmt.make_geometry(8 << 20)
    with pytest.raises(ValueError):
        fmt.make_geometry(1 << 20)


# --------------------------------------------------------------------------
# Block headers


def _sealed(btype=BlockType.INDIRECT, blockno=42, version=7) -> bytearray:
    buf = bytearray(BS)
    buf[fmt.HDR_SIZE :] = bytes(range(256)) * ((BS - fmt.HDR_SIZE) // 256) + bytes(
        (BS - fmt.HDR_SIZE) % 256
    )
    fmt.seal(buf, btype, blockno, version)
    return buf


def test_seal_verify_ok():
    hdr = fmt.verify(_sealed(), BlockType.INDIRECT, 42)
    assert (hdr.btype, hdr.blockno, hdr.version) == (BlockType.INDIRECT, 42, 7)
    assert hdr.checksum == fmt.checksum(_sealed())


def test_verify_wrong_type():
    with pytest.raises(CorruptVolume, match="expected DIRHDR"):
        fmt.verify(_sealed(), BlockType.DIRHDR, 42)


def test_verify_wrong_self_block_number():
    with pytest.raises(CorruptVolume, match="names block 42"):
        fmt.verify(_sealed(), BlockType.INDIRECT, 43)


def test_verify_flipped_payload_byte():
    buf = _sealed()
    buf[1000] ^= 1
    with pytest.raises(CorruptVolume, match="checksum"):
        fmt.verify(buf, BlockType.INDIRECT, 42)


def test_verify_zeroed_block():
    with pytest.raises(CorruptVolume, match="magic"):
        fmt.verify(bytes(BS), BlockType.INDIRECT, 42)


def test_reseal_after_change_verifies():
    buf = _sealed()
    buf[2000] ^= 0xFF
    fmt.seal(buf, BlockType.INDIRECT, 42, 8)
    assert fmt.verify(buf, BlockType.INDIRECT, 42).version == 8


# --------------------------------------------------------------------------
# Bitmaps


def _bitmap(set_bits=()) -> bytearray:
    buf = bytearray(BS)
    for i in set_bits:
        fmt.bit_set(buf, i)
    return buf


def test_bit_set_test_clear():
    buf = _bitmap([0, 7, 8, 1000])
    assert [i for i in range(1100) if fmt.bit_test(buf, i)] == [0, 7, 8, 1000]
    fmt.bit_clear(buf, 7)
    assert not fmt.bit_test(buf, 7) and fmt.bit_test(buf, 8)


def test_find_clear_bit_from_zero():
    assert fmt.find_clear_bit(_bitmap(), 100) == 0
    assert fmt.find_clear_bit(_bitmap(range(10)), 100) == 10
    assert fmt.find_clear_bit(_bitmap(range(77)), 100) == 77


def test_find_clear_bit_skips_full_bytes():
    assert fmt.find_clear_bit(_bitmap(range(8 * 500 + 3)), 32000) == 8 * 500 + 3


def test_find_clear_bit_with_start():
    buf = _bitmap(range(10))
    assert fmt.find_clear_bit(buf, 100, 5) == 10
    assert fmt.find_clear_bit(buf, 100, 13) == 13  # start in the middle of a byte
    buf = _bitmap([13, 14, 15, 16])
    assert fmt.find_clear_bit(buf, 100, 13) == 17


def test_find_clear_bit_wraps_around():
    buf = _bitmap(list(range(10)) + list(range(50, 100)))
    assert fmt.find_clear_bit(buf, 100, 60) == 10
    assert fmt.find_clear_bit(buf, 100, 99) == 10


def test_find_clear_bit_full_and_limit():
    assert fmt.find_clear_bit(_bitmap(range(100)), 100) == -1
    assert fmt.find_clear_bit(_bitmap(range(100)), 100, 50) == -1
    # Bit 100 is clear but lies past nbits.
    assert fmt.find_clear_bit(_bitmap(range(100)), 100) == -1
    assert fmt.find_clear_bit(_bitmap(range(100)), 101) == 100
    assert fmt.find_clear_bit(_bitmap(range(5)), 5, 3) == -1


def test_find_clear_run():
    buf = _bitmap(set(range(200)) - set(range(20, 25)))
    assert fmt.find_clear_run(buf, 200, 0, 10) == (20, 5)
    assert fmt.find_clear_run(buf, 200, 0, 3) == (20, 3)
    assert fmt.find_clear_run(buf, 200, 22, 10) == (22, 3)
    assert fmt.find_clear_run(buf, 200, 100, 10) == (20, 5)  # wraps
    assert fmt.find_clear_run(_bitmap(range(200)), 200, 0, 4) == (-1, 0)


def test_find_clear_run_stops_at_nbits():
    buf = _bitmap(range(95))
    assert fmt.find_clear_run(buf, 100, 0, 50) == (95, 5)


def test_free_counters_are_independent_of_bits():
    buf = _bitmap()
    fmt.set_bitmap_free_count(buf, 12345)
    fmt.set_itable_initialized(buf, 77)
    assert fmt.bitmap_free_count(buf) == 12345
    assert fmt.itable_initialized(buf) == 77
    assert fmt.find_clear_bit(buf, 100) == 0  # counters are not bits
    fmt.bit_set(buf, 0)
    fmt.bit_set(buf, fmt.bitmap_capacity(BS) - 1)
    assert fmt.bitmap_free_count(buf) == 12345
    assert fmt.itable_initialized(buf) == 77
    fmt.set_bitmap_free_count(buf, 0)
    assert fmt.itable_initialized(buf) == 77


def test_bitmap_capacity_fits_in_block():
    cap = fmt.bitmap_capacity(BS)
    buf = _bitmap([cap - 1])
    assert buf[BS - 1] == 0x80


# --------------------------------------------------------------------------
# Inodes and block maps


def test_inode_round_trip():
    ino = Inode(
        1234,
        mode=0o100644,
        uid=1000,
        gid=2000,
        nlink=3,
        size=(5 << 30) + 17,
        blocks=99,
        atime_ns=1,
        mtime_ns=-2,
        ctime_ns=1_700_000_000_000_000_000,
        generation=5,
        flags=6,
        rdev=0x0801,
        parent=7,
        xattr_block=8888,
        height=2,
        roots=list(range(100, 100 + fmt.N_ROOTS)),
    )
    buf = bytearray(BS)
    off = fmt.HDR_SIZE + 3 * fmt.INODE_SIZE
    ino.pack_into(buf, off)
    assert Inode.unpack_from(1234, buf, off) == ino
    # Nothing spills into the neighbouring slots.
    assert not any(buf[:off])
    assert not any(buf[off + fmt.INODE_SIZE :])


def test_free_inode_slot_unpacks_as_free():
    assert Inode.unpack_from(9, bytes(BS), fmt.HDR_SIZE).mode == 0


def test_inode_location(sb):
    assert sb.inode_location(1) == (sb.itable_start(0), fmt.HDR_SIZE)
    ipb = sb.inodes_per_block
    assert sb.inode_location(ipb + 1) == (sb.itable_start(0) + 1, fmt.HDR_SIZE)
    assert sb.inode_location(ipb) == (sb.itable_start(0), fmt.HDR_SIZE + (ipb - 1) * 256)


def test_ptrs():
    buf = bytearray(BS)
    n = fmt.ptrs_per_block(BS)
    fmt.set_ptr(buf, 0, 11)
    fmt.set_ptr(buf, n - 1, 2**40)
    assert fmt.get_ptr(buf, 0) == 11
    ptrs = fmt.all_ptrs(buf, BS)
    assert len(ptrs) == n and ptrs[-1] == 2**40 and sum(ptrs[1:-1]) == 0


def test_map_capacity():
    assert fmt.map_capacity(BS, 0) == fmt.N_ROOTS
    assert fmt.map_capacity(BS, 1) == fmt.N_ROOTS * 508
    assert fmt.map_capacity(BS, 3) * BS >= 1 << 40
    assert fmt.map_capacity(BS, 2) * BS >= 5 << 30


# --------------------------------------------------------------------------
# Directory buckets and tables


def _bucket() -> bytearray:
    buf = bytearray(BS)
    fmt.pack_bucket(buf, 3, [])
    return buf


def test_bucket_append_until_full():
    buf = _bucket()
    name = lambda i: b"%04d" % i + b"n" * 96  # noqa: E731
    n = 0
    while fmt.bucket_append(buf, DirEntry((n + 1) << 16 | 1, 1000 + n, 8, name(n))):
        n += 1
    # 20-byte heads plus 100-byte names after the 40 bytes of headers.
    assert fmt._EH.size == 20 and fmt._EH_OFF == 40
    assert n == (BS - 40) // 120
    before = bytes(buf)
    assert not fmt.bucket_append(buf, DirEntry(1 << 40, 5, 8, b"x" * 100))
    assert bytes(buf) == before  # a refused append changes nothing
    depth, entries = fmt.unpack_bucket(buf)
    assert depth == 3
    assert [e.name for e in entries] == [name(i) for i in range(n)]
    assert [e.ino for e in entries] == [1000 + i for i in range(n)]
    # A short name may still fit where a long one did not.
    assert fmt.bucket_append(buf, DirEntry(1 << 40, 5, 8, b"x"))


def test_bucket_find():
    buf = _bucket()
    h1, h2 = fmt.name_hash(b"alpha"), fmt.name_hash(b"beta")
    fmt.bucket_append(buf, DirEntry(h1 << 16 | 1, 10, 8, b"alpha"))
    fmt.bucket_append(buf, DirEntry(h2 << 16 | 1, 20, 4, b"beta"))
    assert fmt.bucket_find(buf, h1, b"alpha") == DirEntry(h1 << 16 | 1, 10, 8, b"alpha")
    assert fmt.bucket_find(buf, h2, b"beta").ino == 20
    assert fmt.bucket_find(buf, h1, b"beta") is None  # wrong hash
    assert fmt.bucket_find(buf, fmt.name_hash(b"gamma"), b"gamma") is None


def test_bucket_colliding_hashes():
    h = 0x1234_5678_9AB
    buf = _bucket()
    assert fmt.bucket_next_seq(buf, h) == 1
    # Three names sharing one hash (built by hand: real collisions are rare).
    fmt.bucket_append(buf, DirEntry(h << 16 | 1, 10, 8, b"one"))
    assert fmt.bucket_next_seq(buf, h) == 2
    fmt.bucket_append(buf, DirEntry(h << 16 | 2, 11, 8, b"two"))
    fmt.bucket_append(buf, DirEntry(h << 16 | 4, 12, 8, b"four"))
    fmt.bucket_append(buf, DirEntry((h + 1) << 16 | 3, 13, 8, b"other"))
    assert fmt.bucket_next_seq(buf, h) == 3  # the smallest unused
    assert fmt.bucket_next_seq(buf, h + 1) == 1
    assert fmt.bucket_next_seq(buf, h - 1) == 1
    assert fmt.bucket_find(buf, h, b"two").ino == 11
    assert fmt.bucket_find(buf, h, b"four").cookie == h << 16 | 4
    assert fmt.bucket_find(buf, h, b"other") is None
    assert fmt.bucket_find(buf, h, b"thre") is None


def test_unpack_bucket_sorts_by_cookie():
    buf = _bucket()
    cookies = [900 << 16 | 1, 5 << 16 | 2, 5 << 16 | 1, 70 << 16 | 1]
    for i, c in enumerate(cookies):
        fmt.bucket_append(buf, DirEntry(c, i + 1, 8, b"name%d" % i))
    _, entries = fmt.unpack_bucket(buf)
    assert [e.cookie for e in entries] == sorted(cookies)
    assert [e.name for e in entries] == [b"name2", b"name1", b"name3", b"name0"]
    assert entries[0].hash == 5


def test_pack_bucket_rewrites():
    buf = _bucket()
    for i in range(5):
        fmt.bucket_append(buf, DirEntry(i + 1, i, 8, b"e%d" % i))
    _, entries = fmt.unpack_bucket(buf)
    fmt.pack_bucket(buf, 4, entries[1:4])
    depth, again = fmt.unpack_bucket(buf)
    assert depth == 4 and again == entries[1:4]
    with pytest.raises(ValueError):
        fmt.pack_bucket(buf, 0, [DirEntry(i, i, 8, b"y" * 200) for i in range(30)])


def test_unpack_bucket_overlapping_tables():
    buf = _bucket()
    fmt.bucket_append(buf, DirEntry(1, 1, 8, b"n" * 200))
    # Claim far more heads than fit before the names.
    struct.pack_into("<H", buf, fmt.HDR_SIZE + 2, 200)
    with pytest.raises(CorruptVolume, match="overlaps"):
        fmt.unpack_bucket(buf, 77)
    with pytest.raises(CorruptVolume):
        fmt.bucket_find(buf, 0, b"n")
    with pytest.raises(CorruptVolume):
        fmt.bucket_next_seq(buf, 0)
    with pytest.raises(CorruptVolume):
        fmt.bucket_append(buf, DirEntry(2, 2, 8, b"m"))


def test_unpack_bucket_names_start_past_block():
    buf = _bucket()
    struct.pack_into("<I", buf, fmt.HDR_SIZE + 4, BS + 1)
    with pytest.raises(CorruptVolume):
        fmt.unpack_bucket(buf)


def test_unpack_bucket_malformed_entry():
    buf = _bucket()
    fmt.bucket_append(buf, DirEntry(1, 1, 8, b"abc"))
    # name length 0
    struct.pack_into("<B", buf, fmt._EH_OFF + 17, 0)
    with pytest.raises(CorruptVolume, match="malformed"):
        fmt.unpack_bucket(buf)


def test_dirhdr_round_trip():
    buf = bytearray(BS)
    fmt.write_dirhdr(buf, 9, 345, 20000)
    assert fmt.read_dirhdr(buf) == (9, 345, 20000)


def test_table_slot_location():
    k0 = fmt.hdr_table_slots(BS)
    per = fmt.table_slots_per_block(BS)
    assert fmt.table_slot_location(BS, 0) == (0, fmt.HDR_SIZE + 16)
    assert fmt.table_slot_location(BS, k0 - 1) == (0, BS - 4 - (BS - fmt.HDR_SIZE - 16) % 4)
    assert fmt.table_slot_location(BS, k0) == (fmt.TABLE_BASE, fmt.HDR_SIZE)
    assert fmt.table_slot_location(BS, k0 + per - 1) == (fmt.TABLE_BASE, BS - 4)
    assert fmt.table_slot_location(BS, k0 + per) == (fmt.TABLE_BASE + 1, fmt.HDR_SIZE)
    # Every slot of a 2**12 table has its own 4 bytes inside a block.
    locs = [fmt.table_slot_location(BS, i) for i in range(1 << 12)]
    assert len(set(locs)) == len(locs)
    assert all(off >= fmt.HDR_SIZE and off + 4 <= BS for _, off in locs)
    # The header's slots do not overlap the DIRHDR fields.
    buf = bytearray(BS)
    fmt.write_dirhdr(buf, 0xFFFFFFFF, 0xFFFFFFFF, 2**64 - 1)
    for i in range(k0):
        assert fmt.get_u32(buf, fmt.table_slot_location(BS, i)[1]) == 0


def test_name_hash_fits_cookie():
    h = fmt.name_hash(b"some name")
    assert 0 <= h < 1 << fmt.HASH_BITS
    assert (h << 16 | 0xFFFF) < 1 << 63


# --------------------------------------------------------------------------
# Extended attributes


def test_xattr_round_trip():
    xs = {b"user.a": b"", b"user.bb": b"\0\1\2" * 100, b"trusted.z": b"v"}
    buf = bytearray(BS)
    buf[:] = b"\xee" * BS  # leftovers from an earlier, larger set
    fmt.pack_xattrs(buf, xs)
    assert fmt.unpack_xattrs(buf) == xs
    assert fmt.xattrs_size(xs) == 4 + sum(3 + len(k) + len(v) for k, v in xs.items())
    assert not any(buf[fmt.HDR_SIZE + fmt.xattrs_size(xs) :])


def test_xattr_empty():
    buf = bytearray(BS)
    fmt.pack_xattrs(buf, {})
    assert fmt.unpack_xattrs(buf) == {}


def test_xattr_corrupt_count():
    buf = bytearray(BS)
    fmt.pack_xattrs(buf, {b"user.a": b"1"})
    struct.pack_into("<I", buf, fmt.HDR_SIZE, 1000)
    with pytest.raises(CorruptVolume):
        fmt.unpack_xattrs(buf, 5)


def test_xattr_value_past_block():
    buf = bytearray(BS)
    fmt.pack_xattrs(buf, {b"user.a": b"1"})
    struct.pack_into("<H", buf, fmt.HDR_SIZE + 5, 60000)  # value length
    with pytest.raises(CorruptVolume, match="malformed"):
        fmt.unpack_xattrs(buf)


# --------------------------------------------------------------------------
# Host slots


def test_host_slot_round_trip():
    slot = fmt.HostSlot(True, 4321, 9, 123456789, 111, "node-a")
    buf = slot.pack(BS, 3)
    assert fmt.verify(buf, BlockType.HOST, 3)
    assert fmt.HostSlot.unpack(buf) == slot


def test_bucket_lookups_match_a_hash_only_in_a_cookie():
    """Lookups find a hash's entries by its bytes in the entry table: the
    same bytes laid out in an inode number are no match."""
    h = 0x1234_5678_9AB
    buf = _bucket()
    fmt.bucket_append(buf, DirEntry(7 << 16 | 1, h << 16, 8, b"ino"))  # ino laid out as a cookie
    fmt.bucket_append(buf, DirEntry(h << 16 | 2, 30, 8, b"real"))
    assert fmt.bucket_find(buf, h, b"ino") is None
    assert fmt.bucket_find(buf, h, b"real").ino == 30
    assert fmt.bucket_next_seq(buf, h) == 1
    assert fmt.bucket_next_seq(buf, 7) == 2
