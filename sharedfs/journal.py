"""The shared journal: log pages, redo records, scanning and replay (seed 003).

Layout (docs/FORMAT.md): the journal area's first block is the journal
header, the rest a circular log of pages.  Every page and the header are
metadata blocks of type JOURNAL (common header: magic, block number, version
= the page timestamp PTS, checksum).  A page's payload starts with its page
number (one more than the page before it, across laps of the circle), the
block of the next page, and how many bytes of records it holds.

A redo record names one metadata block, the version (SCN) it brings the
block to, and byte ranges of the block's payload with their new contents;
a FULL record starts from a zeroed block (a block allocated by the
transaction), a DELTA record from the block as it was.  A transaction is its
records followed by a COMMIT; replay applies only committed transactions,
and a record only to a copy older than it.  A durable page is never written
again (a torn rewrite would lose records an fsync returned for), so every
flush of the log starts a new page.

This module does no locking: the LLOL holder appends (see the cache), and
replay runs while nobody else writes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from . import format as fmt
from .errors import CorruptVolume
from .storage import Storage

_JHDR = struct.Struct("<4sQQQ")  # magic, checkpoint page number, its block, next page number
JHDR_MAGIC = b"SFJH"
_PAGE = struct.Struct("<QQI")  # page number, next block, bytes of records
PAGE_HDR = fmt.HDR_SIZE + _PAGE.size
_REC = struct.Struct("<BBHQQH")  # kind, btype, host, block, version, ranges
_RANGE = struct.Struct("<HH")  # offset in the payload, length
#: Ranges of a diff closer than this merge (a range costs 4 bytes of header).
_GAP = 8


class Kind(enum.IntEnum):
    DELTA = 1
    FULL = 2
    COMMIT = 3


@dataclass(slots=True)
class Record:
    kind: Kind
    btype: int
    host: int
    block: int
    version: int
    ranges: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return _REC.size + sum(_RANGE.size + len(d) for _, d in self.ranges)


@dataclass(slots=True)
class JournalHeader:
    """checkpoint_seq/block: replay starts at this page; next_seq: the page
    number the next new page gets (as of the last header write)."""

    checkpoint_seq: int
    checkpoint_block: int
    next_seq: int


@dataclass(slots=True)
class Page:
    block: int
    seq: int
    next: int
    pts: int
    records: list[Record]


# --------------------------------------------------------------------------
# Diffs


def diff(before: bytes | bytearray | None, after: bytes | bytearray) -> list[tuple[int, bytes]]:
    """Byte ranges of the payload (past the block header) where `after`
    differs from `before` (None: from zeroes)."""
    a = memoryview(after)[fmt.HDR_SIZE :]
    b = memoryview(before)[fmt.HDR_SIZE :] if before is not None else memoryview(bytes(len(a)))
    out: list[tuple[int, int]] = []
    step = 64
    for chunk in range(0, len(a), step):
        if a[chunk : chunk + step] == b[chunk : chunk + step]:
            continue
        end = min(chunk + step, len(a))
        lo = next(i for i in range(chunk, end) if a[i] != b[i])
        hi = next(i for i in range(end - 1, lo - 1, -1) if a[i] != b[i]) + 1
        if out and lo - out[-1][1] <= _GAP:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return [(lo, bytes(a[lo:hi])) for lo, hi in out]


def block_records(
    host: int,
    block: int,
    btype: int,
    version: int,
    before: bytes | bytearray | None,
    after: bytes | bytearray,
    room: int,
) -> list[Record]:
    """The records that bring `block` from `before` to `after`, each at most
    `room` bytes (a record never spans pages).  None as `before`: a fresh
    block, FULL."""
    kind = Kind.FULL if before is None else Kind.DELTA
    ranges = diff(before, after)
    if not ranges and kind is Kind.DELTA:
        return []
    out = [Record(kind, btype, host, block, version)]
    for off, data in ranges:
        while data:
            free = room - out[-1].size - _RANGE.size
            if free <= 0:
                out.append(Record(Kind.DELTA, btype, host, block, version))
                continue
            out[-1].ranges.append((off, data[:free]))
            off, data = off + free, data[free:]
    return out


# --------------------------------------------------------------------------
# Pages


def page_room(block_size: int) -> int:
    return block_size - PAGE_HDR


def encode_page(
    block_size: int, block: int, seq: int, nxt: int, pts: int, records: list[Record]
) -> bytearray:
    buf = bytearray(block_size)
    pos = PAGE_HDR
    for r in records:
        _REC.pack_into(buf, pos, r.kind, r.btype, r.host, r.block, r.version, len(r.ranges))
        pos += _REC.size
        for off, data in r.ranges:
            _RANGE.pack_into(buf, pos, off, len(data))
            pos += _RANGE.size
            buf[pos : pos + len(data)] = data
            pos += len(data)
    if pos > block_size:
        raise ValueError("records overflow the page")
    _PAGE.pack_into(buf, fmt.HDR_SIZE, seq, nxt, pos - PAGE_HDR)
    fmt.seal(buf, fmt.BlockType.JOURNAL, block, pts)
    return buf


def decode_page(data: bytes | bytearray, block: int) -> Page:
    """A log page read from `block`; CorruptVolume if it is not a whole,
    valid page (the end of the log, or damage)."""
    hdr = fmt.verify(data, fmt.BlockType.JOURNAL, block)
    seq, nxt, used = _PAGE.unpack_from(data, fmt.HDR_SIZE)
    end = PAGE_HDR + used
    if end > len(data):
        raise CorruptVolume(f"log page {block}: record bytes run past the page")
    records = []
    pos = PAGE_HDR
    try:
        while pos < end:
            kind, btype, host, blk, version, n = _REC.unpack_from(data, pos)
            pos += _REC.size
            r = Record(Kind(kind), btype, host, blk, version)
            for _ in range(n):
                off, length = _RANGE.unpack_from(data, pos)
                pos += _RANGE.size
                r.ranges.append((off, bytes(data[pos : pos + length])))
                pos += length
            records.append(r)
    except (struct.error, ValueError) as e:
        raise CorruptVolume(f"log page {block}: malformed record: {e}") from None
    if pos != end:
        raise CorruptVolume(f"log page {block}: records end past their length")
    return Page(block, seq, nxt, hdr.version, records)


def encode_header(block_size: int, block: int, h: JournalHeader) -> bytearray:
    buf = bytearray(block_size)
    _JHDR.pack_into(buf, fmt.HDR_SIZE, JHDR_MAGIC, h.checkpoint_seq, h.checkpoint_block, h.next_seq)
    fmt.seal(buf, fmt.BlockType.JOURNAL, block, h.next_seq)
    return buf


def decode_header(data: bytes | bytearray, block: int, first_page: int) -> JournalHeader:
    """The journal header; a zeroed block (as mkfs leaves it) is an empty log
    starting at the first page."""
    if not any(data):
        return JournalHeader(1, first_page, 1)
    fmt.verify(data, fmt.BlockType.JOURNAL, block)
    magic, cseq, cblock, nseq = _JHDR.unpack_from(data, fmt.HDR_SIZE)
    if magic != JHDR_MAGIC:
        raise CorruptVolume(f"journal header {block}: bad magic")
    return JournalHeader(cseq, cblock, nseq)


# --------------------------------------------------------------------------
# Scanning and replay


@dataclass(slots=True)
class Area:
    """Where the log lives: the header block, then pages in a circle."""

    header: int
    first: int
    count: int

    @classmethod
    def of(cls, sb: fmt.Superblock) -> Area:
        return cls(sb.journal_start, sb.journal_start + 1, sb.journal_blocks - 1)

    def after(self, block: int) -> int:
        return self.first + (block - self.first + 1) % self.count


def transactions(pages: list[Page]) -> Iterator[list[Record]]:
    """The committed transactions in these pages, in log order; records after
    the last COMMIT belong to a transaction that never finished."""
    tx: list[Record] = []
    for page in pages:
        for r in page.records:
            if r.kind is Kind.COMMIT:
                yield tx
                tx = []
            else:
                tx.append(r)


@dataclass(slots=True)
class _Image:
    data: bytearray
    base: int  # the version storage had (-1: no valid block)
    version: int
    btype: int


class Replay:
    """Applies committed transactions onto block images, each record only
    to a copy older than it; the images it changed are then written back."""

    def __init__(self, block_size: int) -> None:
        self.bs = block_size
        self._images: dict[int, _Image] = {}
        self.applied = 0
        self.skipped = 0

    def need(self, tx: list[Record]) -> list[int]:
        """Blocks of `tx` to load from storage first."""
        return sorted({r.block for r in tx} - set(self._images))

    def load(self, block: int, data: bytes | bytearray) -> None:
        try:
            hdr = fmt.read_header(data)
            valid = hdr.blockno == block and hdr.checksum == fmt.checksum(data)
        except CorruptVolume:
            valid = False
        version = hdr.version if valid else -1
        self._images[block] = _Image(bytearray(data), version, version, 0)

    def apply(self, tx: list[Record]) -> None:
        for r in tx:
            img = self._images[r.block]
            if r.version <= img.base:
                self.skipped += 1  # storage already has it
                continue
            if r.kind is Kind.FULL:
                img.data[:] = bytes(self.bs)
            for off, data in r.ranges:
                start = fmt.HDR_SIZE + off
                if start + len(data) > self.bs:
                    raise CorruptVolume(f"log record for block {r.block} runs past the block")
                img.data[start : start + len(data)] = data
            img.version = max(img.version, r.version)
            img.btype = r.btype
            self.applied += 1

    def results(self) -> list[tuple[int, bytearray]]:
        """The blocks records changed, sealed with their new versions."""
        out = []
        for b, img in sorted(self._images.items()):
            if img.version > img.base:
                fmt.seal(img.data, fmt.BlockType(img.btype), b, img.version)
                out.append((b, img.data))
        return out


async def read_log(storage: Storage, sb: fmt.Superblock) -> tuple[JournalHeader, list[Page]]:
    """The header and the pages from the checkpoint to the end of the log:
    the first page that is not the next one in the chain (an older lap, a
    torn or never written page) ends it."""
    area, bs = Area.of(sb), sb.block_size
    header = decode_header(await storage.read(area.header * bs, bs), area.header, area.first)
    pages: list[Page] = []
    seq, block = header.checkpoint_seq, header.checkpoint_block
    for _ in range(area.count):
        try:
            page = decode_page(await storage.read(block * bs, bs), block)
        except CorruptVolume:
            break
        if page.seq != seq:
            break
        pages.append(page)
        seq, block = seq + 1, page.next
    return header, pages


@dataclass(slots=True)
class ReplayResult:
    pages: int
    transactions: int
    applied: int
    skipped: int
    blocks_written: int


async def replay(storage: Storage, sb: fmt.Superblock) -> ReplayResult:
    """Bring storage up to the end of the log, then empty the log (the
    checkpoint moves past its last page).  Run with no host mounted."""
    bs = sb.block_size
    header, pages = await read_log(storage, sb)
    rp = Replay(bs)
    txs = 0
    for tx in transactions(pages):
        for b in rp.need(tx):
            rp.load(b, await storage.read(b * bs, bs))
        rp.apply(tx)
        txs += 1
    written = rp.results()
    for b, data in written:
        await storage.write(b * bs, data)
    await storage.flush()
    if pages:
        area = Area.of(sb)
        last = pages[-1]
        end = JournalHeader(last.seq + 1, last.next, max(header.next_seq, last.seq + 1))
        await storage.write(area.header * bs, encode_header(bs, area.header, end))
        await storage.flush()
    return ReplayResult(len(pages), txs, rp.applied, rp.skipped, len(written))
