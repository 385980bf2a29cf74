"""The journal's on-disk form and replay, on a memory volume (no hosts)."""

from __future__ import annotations

import itertools

import pytest
from conftest import make_volume

from sharedfs import format as fmt
from sharedfs import journal as j
from sharedfs.errors import CorruptVolume
from sharedfs.volume import read_superblock

BS = 4096


def meta(btype: fmt.BlockType, block: int, version: int, fill: dict[int, bytes]) -> bytearray:
    data = bytearray(BS)
    for off, chunk in fill.items():
        data[fmt.HDR_SIZE + off : fmt.HDR_SIZE + off + len(chunk)] = chunk
    fmt.seal(data, btype, block, version)
    return data


def test_diff_finds_changed_ranges_and_merges_close_ones():
    before = bytearray(BS)
    after = bytearray(BS)
    after[fmt.HDR_SIZE + 10 : fmt.HDR_SIZE + 12] = b"ab"
    after[fmt.HDR_SIZE + 15] = 1  # within the merge gap of the first
    after[fmt.HDR_SIZE + 3000 : fmt.HDR_SIZE + 3004] = b"wxyz"
    after[5] = 9  # the block header is not logged
    assert j.diff(before, after) == [(10, b"ab\0\0\0\x01"), (3000, b"wxyz")]
    assert j.diff(after, after) == []


def test_records_never_exceed_the_room_of_a_page():
    after = bytearray(range(256)) * (BS // 256)
    recs = j.block_records(3, 77, fmt.BlockType.INODES, 9, None, after, j.page_room(BS))
    assert [r.kind for r in recs] == [j.Kind.FULL, j.Kind.DELTA]
    assert all(r.size <= j.page_room(BS) for r in recs)
    rebuilt = bytearray(BS)
    for r in recs:
        for off, d in r.ranges:
            rebuilt[fmt.HDR_SIZE + off : fmt.HDR_SIZE + off + len(d)] = d
    assert rebuilt[fmt.HDR_SIZE :] == after[fmt.HDR_SIZE :]


def test_page_round_trip_and_damage_is_caught():
    recs = [
        j.Record(j.Kind.DELTA, int(fmt.BlockType.INODES), 2, 500, 41, [(8, b"hello")]),
        j.Record(j.Kind.COMMIT, 0, 2, 0, 41),
    ]
    page = j.new_page(BS, 20, 7, 21)
    used = j.add_group(page, j.PAGE_HDR, 41, recs)
    got = j.decode_page(page, 20)
    assert (got.seq, got.next, got.pts, got.used) == (7, 21, 41, used)
    assert got.records == recs
    with pytest.raises(CorruptVolume):
        j.decode_page(page, 21)  # written for another place
    page[100] ^= 1
    with pytest.raises(CorruptVolume):
        j.decode_page(page, 20)  # its only group is damaged: no records


def test_a_torn_append_loses_only_the_group_being_added():
    first = [j.Record(j.Kind.COMMIT, 0, 1, 0, 5)]
    page = j.new_page(BS, 20, 7, 21)
    used = j.add_group(page, j.PAGE_HDR, 5, first)
    before = bytes(page)
    second = [j.Record(j.Kind.DELTA, 9, 1, 77, 6, [(0, b"x" * 600)])]
    j.add_group(page, used, 6, second)
    assert len(j.decode_page(page, 20).records) == 2
    torn = bytearray(before[:512]) + page[512:]  # only the first sector made it
    torn[:512] = page[:512]
    torn[used + 300 :] = before[used + 300 :]  # the new group's tail never did
    assert j.decode_page(torn, 20).records == first


def test_a_group_left_by_an_older_lap_is_not_taken_for_ours():
    old = j.new_page(BS, 20, 7 - 4, 21)
    j.add_group(old, j.PAGE_HDR, 3, [j.Record(j.Kind.COMMIT, 0, 1, 0, 3)] * 4)
    new = bytearray(old)
    new[: j.PAGE_HDR] = j.new_page(BS, 20, 7, 21)[: j.PAGE_HDR]
    with pytest.raises(CorruptVolume):
        j.decode_page(new, 20)


async def write_log(vol, sb, txs: list[list[j.Record]], per_page: int = 2) -> None:  # type: ignore[no-untyped-def]
    area = j.Area.of(sb)
    header = j.decode_header(vol.read_sync(area.header * BS, BS), area.header)
    seq = header.checkpoint_seq
    block = area.block_of(seq)
    flat = [r for tx in txs for r in tx]
    for i in range(0, len(flat), per_page):
        chunk = flat[i : i + per_page]
        nxt = area.block_of(seq + 1)
        page = j.new_page(BS, block, seq, nxt)
        j.add_group(page, j.PAGE_HDR, max(r.version for r in chunk), chunk)
        vol.write_sync(block * BS, page)
        seq, block = seq + 1, nxt


def tx(block: int, version: int, ranges, kind=j.Kind.DELTA, btype=fmt.BlockType.INDIRECT):  # type: ignore[no-untyped-def]
    return [
        j.Record(kind, int(btype), 0, block, version, ranges),
        j.Record(j.Kind.COMMIT, 0, 0, 0, version),
    ]


async def test_replay_applies_committed_records_newer_than_storage_only():
    vol = await make_volume()
    sb = read_superblock(vol)
    b1, b2, b3 = sb.groups_start + 4000, sb.groups_start + 4001, sb.groups_start + 4002
    vol.write_sync(b1 * BS, meta(fmt.BlockType.INDIRECT, b1, 10, {0: b"old1"}))
    vol.write_sync(b2 * BS, meta(fmt.BlockType.INDIRECT, b2, 50, {0: b"new2"}))
    vol.write_sync(b3 * BS, b"\xee" * BS)  # garbage: a block the log allocates
    txs = [
        tx(b1, 20, [(0, b"mid1")]),
        tx(b2, 30, [(0, b"stale")]),  # storage already has version 50
        tx(b3, 25, [(4, b"fresh")], kind=j.Kind.FULL),
        tx(b1, 40, [(2, b"W")]),
        [j.Record(j.Kind.DELTA, int(fmt.BlockType.INDIRECT), 0, b2, 60, [(0, b"lost")])],
    ]
    await write_log(vol, sb, txs, per_page=3)
    result = await j.replay(vol, sb)
    assert result.transactions == 4 and result.blocks_written == 2
    assert result.skipped == 1
    assert fmt.verify(vol.read_sync(b1 * BS, BS), fmt.BlockType.INDIRECT, b1).version == 40
    assert vol.read_sync(b1 * BS + fmt.HDR_SIZE, 4) == b"miW1"
    # The uncommitted transaction left storage's newer copy alone.
    assert vol.read_sync(b2 * BS + fmt.HDR_SIZE, 4) == b"new2"
    fresh = vol.read_sync(b3 * BS, BS)
    assert fmt.verify(fresh, fmt.BlockType.INDIRECT, b3).version == 25
    assert fresh[fmt.HDR_SIZE : fmt.HDR_SIZE + 9] == b"\0\0\0\0fresh"
    # The log is empty now: a second replay finds nothing to do.
    again = await j.replay(vol, sb)
    assert again.pages == 0 and again.applied == 0


async def test_a_transaction_appended_twice_never_undoes_a_later_one():
    """A host asks the LLOL's holder to append its transaction, hears
    nothing, and appends it itself: the log may hold it twice, the second
    copy after a later change of the same block.  Replay skips the copy
    older than what the block has reached."""
    vol = await make_volume()
    sb = read_superblock(vol)
    b = sb.groups_start + 4000
    vol.write_sync(b * BS, meta(fmt.BlockType.INDIRECT, b, 10, {0: b"base"}))
    first = tx(b, 20, [(0, b"tx20")])
    txs = [first, tx(b, 30, [(0, b"tx30")]), first]
    await write_log(vol, sb, txs, per_page=2)
    result = await j.replay(vol, sb)
    assert result.transactions == 3 and result.skipped == 1
    assert fmt.verify(vol.read_sync(b * BS, BS), fmt.BlockType.INDIRECT, b).version == 30
    assert vol.read_sync(b * BS + fmt.HDR_SIZE, 4) == b"tx30"


async def test_the_log_ends_at_a_page_of_an_older_lap_or_a_torn_one():
    vol = await make_volume()
    sb = read_superblock(vol)
    blk = sb.groups_start + 4000
    vol.write_sync(blk * BS, meta(fmt.BlockType.INDIRECT, blk, 1, {}))
    await write_log(vol, sb, [tx(blk, 5, [(0, b"a")]), tx(blk, 6, [(0, b"b")])], per_page=2)
    area = j.Area.of(sb)
    header, pages = await j.read_log(vol, sb)
    assert [p.seq for p in pages] == [header.checkpoint_seq, header.checkpoint_seq + 1]
    # Tear the second page: the log ends after the first transaction.
    second = pages[1].block
    torn = bytearray(vol.read_sync(second * BS, BS))
    torn[40:] = b"\xaa" * (BS - 40)  # only the fixed header made it
    vol.write_sync(second * BS, torn)
    _, pages = await j.read_log(vol, sb)
    assert len(pages) == 1
    assert area.block_of(area.count - 1) + 1 == area.first + area.count  # the circle closes
    assert area.block_of(area.count) == area.first
    result = await j.replay(vol, sb)
    assert result.transactions == 1
    assert vol.read_sync(blk * BS + fmt.HDR_SIZE, 1) == b"a"


async def test_mkfs_starts_an_empty_log_at_a_random_page_number():
    a, b = await make_volume(), await make_volume()
    heads = []
    for vol in (a, b):
        sb = read_superblock(vol)
        header, pages = await j.read_log(vol, sb)
        assert pages == [] and header.next_seq == header.checkpoint_seq
        assert not any(header.low) and len(header.low) == sb.host_slots
        heads.append(header.checkpoint_seq)
    assert heads[0] != heads[1]


def test_diff_rebuilds_any_change():
    import random

    rng = random.Random(7)
    for _ in range(300):
        before = bytearray(rng.randbytes(BS))
        after = bytearray(before)
        for _ in range(rng.randrange(0, 6)):
            at = rng.randrange(fmt.HDR_SIZE, BS)
            n = rng.randrange(1, 300)
            after[at : at + n] = rng.randbytes(len(after[at : at + n]))
        rebuilt = bytearray(before)
        ranges = j.diff(before, after)
        for off, d in ranges:
            rebuilt[fmt.HDR_SIZE + off : fmt.HDR_SIZE + off + len(d)] = d
        assert rebuilt == after
        # Tight: each range starts and ends on a changed byte, holds no run
        # of more than _GAP unchanged ones, and the next starts past one.
        changed = [before[i] != after[i] for i in range(fmt.HDR_SIZE, BS)]
        for off, d in ranges:
            assert changed[off] and changed[off + len(d) - 1]
            assert "." * (j._GAP + 1) not in "".join(
                "x" if c else "." for c in changed[off : off + len(d)]
            )
        assert all(o2 - (o1 + len(d1)) > j._GAP for (o1, d1), (o2, _) in itertools.pairwise(ranges))
