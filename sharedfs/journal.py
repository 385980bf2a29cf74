"""The shared journal: log pages, redo records, scanning and replay (seed 003).

Layout (docs/FORMAT.md): the journal area's first block is the journal
header (a metadata block of type JOURNAL: the value of the LLOL), the rest a
circle of log pages.  A page starts with a fixed header (magic, type, its
block, its page number, the block of the next page); page numbers grow by
one from page to page across laps of the circle.  Then come groups of
records, one per append: length, checksum, and the page timestamp (PTS,
the newest version in it).

A redo record names one metadata block, the version (SCN) it brings the
block to, and byte ranges of the block's payload with their new contents;
a FULL record starts from a zeroed block (a block allocated by the
transaction), a DELTA record from the block as it was.  A transaction is its
records followed by a COMMIT; every append of a host's private log cache
starts with a BEGIN, so records a torn append left without their COMMIT are
never taken for part of the next transaction.  Replay applies only committed
transactions, and a record only to a copy older than it.  The last page is appended to
in place; since the bytes already there are written again unchanged and
each group has its own checksum, a torn write can only lose the group being
added, never one an fsync returned for.

Replay runs while no host has the volume mounted; `Log` is a mounted host's
side: its private log cache, the appends under the LLOL, its checkpoints,
and the recovery of a dead host's blocks while the others run.
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
import xxhash

from . import format as fmt
from . import protocol as p
from .errors import CorruptVolume, StorageError
from .protocol import Mode
from .storage import Storage

if TYPE_CHECKING:
    from .agent import Report
    from .cache import BlockCache, Buffer

log = logging.getLogger(__name__)

_JHDR = struct.Struct("<4sQQIH")  # magic, checkpoint, next page number, last page used, slots
JHDR_MAGIC = b"SFJH"
_PAGE = struct.Struct("<4sHQQQ2x")  # magic, type, block, page number, next block
PAGE_HDR = _PAGE.size
PAGE_MAGIC = b"SFLP"
_GROUP = struct.Struct("<IIQ")  # record bytes, checksum, PTS
_GROUP_KEY = struct.Struct("<QQQ")
_REC = struct.Struct("<BBHQQH")  # kind, btype, host, block, version, ranges
_RANGE = struct.Struct("<HH")  # offset in the payload, length
#: Ranges of a diff closer than this merge (a range costs 4 bytes of header).
_GAP = 8
_SPLIT = bytes(_GAP + 1)  # a run of equal bytes this long splits two ranges


class Kind(enum.IntEnum):
    DELTA = 1
    FULL = 2
    COMMIT = 3
    BEGIN = 4
    #: The transaction freed this metadata block: its records up to this
    #: version describe nothing any more (it may hold a file's data now).
    REVOKE = 5


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
    """The value of the last log object lock (LLOL): it travels with the
    lock from host to host.

    checkpoint_seq: replay starts at this page; pages before it may be
        reused.
    next_seq: the page number the next new page gets: the end of the log.
    low: per host slot, the oldest page that may hold records of that
        host's changes not yet on storage (0: none).  The checkpoint is the
        lowest of them.
    """

    checkpoint_seq: int
    next_seq: int
    low: list[int]
    llp_used: int = 0  # bytes of page next_seq - 1 in use (0: start a new page)

    def advance(self) -> bool:
        """Move the checkpoint as far as every host allows; True if it moved."""
        marks = [x for x in self.low if x]
        new = min(marks) if marks else self.next_seq
        new = min(new, self.next_seq)
        if new > self.checkpoint_seq:
            self.checkpoint_seq = new
            return True
        return False


@dataclass(slots=True)
class Page:
    """pts: the page timestamp, the newest version in it; used: bytes of
    the page its whole groups fill."""

    block: int
    seq: int
    next: int
    pts: int
    records: list[Record]
    used: int


# --------------------------------------------------------------------------
# Diffs


def diff(before: bytes | bytearray | None, after: bytes | bytearray) -> list[tuple[int, bytes]]:
    """Byte ranges of the payload (past the block header) where `after`
    differs from `before` (None: from zeroes); ranges closer than _GAP
    are one.

    Every operation's commit diffs each block it changed, so this runs at C
    speed: the payloads XORed as integers (big-endian: the highest set bit
    lies in the first differing byte, the lowest in the last), and gaps
    looked for in the XOR's bytes only when the changes span more than one
    short range."""
    a = memoryview(after)[fmt.HDR_SIZE :]
    n = len(a)
    x = int.from_bytes(a, "big")
    if before is not None:
        x ^= int.from_bytes(memoryview(before)[fmt.HDR_SIZE :], "big")
    if not x:
        return []
    lo = n - 1 - (x.bit_length() - 1) // 8
    hi = n - ((x & -x).bit_length() - 1) // 8
    if hi - lo <= 2 * _GAP + 2:  # no room for a gap that splits
        return [(lo, bytes(a[lo:hi]))]
    same = x.to_bytes(n, "big")  # zero where the payloads agree
    out: list[tuple[int, bytes]] = []
    while (cut := same.find(_SPLIT, lo, hi)) >= 0:
        out.append((lo, bytes(a[lo:cut])))
        lo = hi - len(same[cut:hi].lstrip(b"\0"))
    out.append((lo, bytes(a[lo:hi])))
    return out


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
    """Record bytes one group can hold in an empty page."""
    return block_size - PAGE_HDR - _GROUP.size


def new_page(block_size: int, block: int, seq: int, nxt: int) -> bytearray:
    """An empty page: only its fixed header, which never changes after."""
    buf = bytearray(block_size)
    _PAGE.pack_into(buf, 0, PAGE_MAGIC, fmt.BlockType.JOURNAL, block, seq, nxt)
    return buf


def _group_sum(seq: int, block: int, pts: int, body: bytes | bytearray | memoryview) -> int:
    # The page number and place are in it: a group an older lap left past
    # the end of this one never passes for ours.
    return xxhash.xxh32_intdigest(_GROUP_KEY.pack(seq, block, pts) + bytes(body))


def _pack_records(records: list[Record]) -> bytearray:
    out = bytearray()
    for r in records:
        out += _REC.pack(r.kind, r.btype, r.host, r.block, r.version, len(r.ranges))
        for off, data in r.ranges:
            out += _RANGE.pack(off, len(data)) + data
    return out


def add_group(page: bytearray, used: int, pts: int, records: list[Record]) -> int:
    """Append a group of records to `page` after its first `used` bytes;
    return the new used length.  ValueError if they do not fit."""
    _, _, block, seq, _ = _PAGE.unpack_from(page, 0)
    body = _pack_records(records)
    pos = max(used, PAGE_HDR)
    end = pos + _GROUP.size + len(body)
    if end > len(page):
        raise ValueError("records overflow the page")
    _GROUP.pack_into(page, pos, len(body), _group_sum(seq, block, pts, body), pts)
    page[pos + _GROUP.size : end] = body
    return end


def decode_page(data: bytes | bytearray, block: int) -> Page:
    """A log page read from `block`: its groups up to the first that is not
    whole (never written, or torn).  CorruptVolume if it is no page of ours
    or holds no group."""
    magic, btype, blk, seq, nxt = _PAGE.unpack_from(data, 0)
    if magic != PAGE_MAGIC or btype != fmt.BlockType.JOURNAL or blk != block:
        raise CorruptVolume(f"log page {block}: not a log page")
    records: list[Record] = []
    pts = 0
    pos = PAGE_HDR
    groups = 0
    while pos + _GROUP.size <= len(data):
        length, csum, gpts = _GROUP.unpack_from(data, pos)
        body = memoryview(data)[pos + _GROUP.size : pos + _GROUP.size + length]
        if not length or len(body) != length or csum != _group_sum(seq, block, gpts, body):
            break
        records += _unpack_records(body, block)
        pts, groups, pos = gpts, groups + 1, pos + _GROUP.size + length
    if not groups:
        raise CorruptVolume(f"log page {block}: no records")
    return Page(block, seq, nxt, pts, records, pos)


def _unpack_records(body: memoryview, block: int) -> list[Record]:
    records = []
    pos = 0
    try:
        while pos < len(body):
            kind, btype, host, blk, version, n = _REC.unpack_from(body, pos)
            pos += _REC.size
            r = Record(Kind(kind), btype, host, blk, version)
            for _ in range(n):
                off, length = _RANGE.unpack_from(body, pos)
                pos += _RANGE.size
                if pos + length > len(body):
                    raise ValueError("range past the group")
                r.ranges.append((off, bytes(body[pos : pos + length])))
                pos += length
            records.append(r)
    except (struct.error, ValueError) as e:
        raise CorruptVolume(f"log page {block}: malformed record: {e}") from None
    return records


def pack_header(buf: bytearray, h: JournalHeader) -> None:
    """Into the payload of the header block (the cache seals it on write)."""
    _JHDR.pack_into(
        buf, fmt.HDR_SIZE, JHDR_MAGIC, h.checkpoint_seq, h.next_seq, h.llp_used, len(h.low)
    )
    struct.pack_into(f"<{len(h.low)}Q", buf, fmt.HDR_SIZE + _JHDR.size, *h.low)


def unpack_header(data: bytes | bytearray, block: int) -> JournalHeader:
    magic, cseq, nseq, used, slots = _JHDR.unpack_from(data, fmt.HDR_SIZE)
    if magic != JHDR_MAGIC or fmt.HDR_SIZE + _JHDR.size + 8 * slots > len(data):
        raise CorruptVolume(f"journal header {block}: bad magic")
    low = list(struct.unpack_from(f"<{slots}Q", data, fmt.HDR_SIZE + _JHDR.size))
    return JournalHeader(cseq, nseq, low, used)


def encode_header(block_size: int, block: int, h: JournalHeader, version: int = 0) -> bytearray:
    buf = bytearray(block_size)
    pack_header(buf, h)
    fmt.seal(buf, fmt.BlockType.JOURNAL, block, version)
    return buf


def decode_header(data: bytes | bytearray, block: int) -> JournalHeader:
    fmt.verify(data, fmt.BlockType.JOURNAL, block)
    return unpack_header(data, block)


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

    def block_of(self, seq: int) -> int:
        """Pages go round the circle in page-number order."""
        return self.first + seq % self.count


def _last_changed_by(pages: list[Page], host: int) -> set[int]:
    """Blocks whose last record in `pages` is a change by `host` (not one
    freed since: it may be a file's data block by now)."""
    last: dict[int, Record] = {}
    for page in pages:
        for r in page.records:
            if r.kind in (Kind.DELTA, Kind.FULL, Kind.REVOKE):
                last[r.block] = r
    return {b for b, r in last.items() if r.host == host and r.kind is not Kind.REVOKE}


def transactions(pages: list[Page]) -> Iterator[list[Record]]:
    """The committed transactions in these pages, in log order; records
    without a COMMIT before the next append (or the end) belong to a
    transaction that never finished."""
    tx: list[Record] = []
    for page in pages:
        for r in page.records:
            if r.kind is Kind.COMMIT:
                yield tx
                tx = []
            elif r.kind is Kind.BEGIN:
                tx = []
            else:
                tx.append(r)


@dataclass(slots=True)
class _Foreign:
    """Another host's records, to append for it (LogAppend)."""

    host: int
    records: list[Record]
    done: trio.Event = field(default_factory=trio.Event)
    ok: bool = False


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
        self._revoked: dict[int, int] = {}  # block -> version up to which it is void
        self.applied = 0
        self.skipped = 0

    def need(self, tx: list[Record]) -> list[int]:
        """Blocks of `tx` to load from storage first."""
        live = {r.block for r in tx if r.kind is not Kind.REVOKE and not self._void(r)}
        return sorted(live - set(self._images))

    def _void(self, r: Record) -> bool:
        return r.version <= self._revoked.get(r.block, -1)

    def load(self, block: int, data: bytes | bytearray) -> None:
        version = fmt.stored_version(data, block)
        self._images[block] = _Image(bytearray(data), version, version, 0)

    def apply(self, tx: list[Record]) -> None:
        for r in tx:
            if r.kind is Kind.REVOKE:
                # Freed: what was replayed onto it so far is not written.
                self._images.pop(r.block, None)
                self._revoked[r.block] = max(self._revoked.get(r.block, -1), r.version)
                continue
            if self._void(r):
                self.skipped += 1
                continue
            img = self._images[r.block]
            if r.version <= img.base:
                self.skipped += 1  # storage already has it
                continue
            if r.version < img.version:
                # A transaction appended twice (its host asked the LLOL's
                # holder to append it, heard nothing, and appended it
                # itself): the block has gone past it since.
                self.skipped += 1
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

    def results(self) -> list[tuple[int, int, int, bytearray]]:
        """(block, type, version, contents) of the blocks records changed,
        sealed with their new versions."""
        out = []
        for b, img in sorted(self._images.items()):
            if img.version > img.base:
                fmt.seal(img.data, fmt.BlockType(img.btype), b, img.version)
                out.append((b, img.btype, img.version, img.data))
        return out


async def read_chain(
    storage: Storage, area: Area, bs: int, seq: int, end: int | None = None
) -> list[Page]:
    """The pages from page number `seq` on (before `end`, if given): the
    first page that is not the next one in the chain (an older lap, a torn
    or never written page) ends it."""
    pages: list[Page] = []
    block = area.block_of(seq)
    for _ in range(area.count):
        if end is not None and seq >= end:
            break
        try:
            page = decode_page(await storage.read(block * bs, bs), block)
        except CorruptVolume:
            break
        if page.seq != seq:
            break
        pages.append(page)
        seq, block = seq + 1, page.next
    return pages


async def read_log(storage: Storage, sb: fmt.Superblock) -> tuple[JournalHeader, list[Page]]:
    """The header and the pages from the checkpoint to the end of the log."""
    area, bs = Area.of(sb), sb.block_size
    header = decode_header(await storage.read(area.header * bs, bs), area.header)
    return header, await read_chain(storage, area, bs, header.checkpoint_seq)


@dataclass(slots=True)
class ReplayResult:
    pages: int
    transactions: int
    applied: int
    skipped: int
    blocks_written: int


async def apply_log(
    storage: Storage, bs: int, pages: list[Page], only: set[int] | None = None
) -> tuple[Replay, int]:
    """The committed transactions in `pages` applied onto the blocks they
    name as storage has them (only those in `only`, if given); the Replay
    holds the results.  Also returns how many transactions there were."""
    rp = Replay(bs)
    txs = 0
    for tx in transactions(pages):
        txs += 1
        if only is not None:
            tx = [r for r in tx if r.block in only]
        for b in rp.need(tx):
            rp.load(b, await storage.read(b * bs, bs))
        rp.apply(tx)
    return rp, txs


async def replay(storage: Storage, sb: fmt.Superblock, *, dry_run: bool = False) -> ReplayResult:
    """Bring storage up to the end of the log, then empty the log (the
    checkpoint moves past its last page).  Run with no host mounted.
    dry_run: only say what it would write."""
    bs = sb.block_size
    header, pages = await read_log(storage, sb)
    rp, txs = await apply_log(storage, bs, pages)
    written = rp.results()
    if dry_run:
        return ReplayResult(len(pages), txs, rp.applied, rp.skipped, len(written))
    for b, _, _, data in written:
        await storage.write(b * bs, data)
    await storage.flush()
    end = pages[-1].seq + 1 if pages else header.checkpoint_seq
    if pages or any(header.low):
        area = Area.of(sb)
        empty = JournalHeader(end, end, [0] * len(header.low))
        await storage.write(area.header * bs, encode_header(bs, area.header, empty), fua=True)
    return ReplayResult(len(pages), txs, rp.applied, rp.skipped, len(written))


# --------------------------------------------------------------------------
# This host's side: the private log cache, group commit, the checkpoint


class Log:
    """One host's part in the shared log.

    A transaction's records go into the private log cache (PLC) when its
    operation ends.  `force()` appends the whole PLC to the log under the
    last log object lock (the journal header block, held in X through the
    cache: its contents, where the log ends, travel with the lock) and the
    append semaphore (`append_lock`), in new pages that no other host can
    reach (no block locks), and waits until they are on storage: one write
    for every transaction committed so far (group commit).  The cache calls
    `force` before a block whose records are still in the PLC is written or
    shipped (write-ahead), and before the LLOL leaves for another host.

    A host that does not hold the LLOL first asks the host it last saw take
    it to append the PLC for it (`LogAppend`, host to host), rather than
    move the LLOL for one commit: with several hosts committing, the LLOL
    stays where it is and each commit costs two peer messages, no master
    message.  The holder appends such records with its own (group commit),
    each under its host's BEGIN and mark.  Refused (it no longer holds it),
    or unanswered, the host takes the LLOL as before.

    Attributes:
        pending: block -> newest version whose records are not durable.
    """

    #: Operations wait (the log is "full") past this share of the circle.
    FULL = 0.75
    #: Also take a block lock on every log page written (mount
    #: --log-page-locks): the baseline tools/bench journal measures the
    #: LLOL against, log pages locked as any other block would be.
    page_locks = False

    def __init__(self, cache: BlockCache, sb: fmt.Superblock, host: int) -> None:
        self.cache = cache
        self.sb = sb
        self.host = host
        self.area = Area.of(sb)
        self.bs = sb.block_size
        self.room = page_room(self.bs)
        self.plc: list[Record] = []
        self._plc_bytes = 0
        self.pending: dict[int, int] = {}
        self.append_lock = trio.Lock()
        self._known = JournalHeader(0, 0, [])  # as of our last LLOL hold
        self._mark = 0  # log end at our last checkpoint
        self._mark_scn = 0  # and our SCN then
        self._checkpointing = trio.Lock()
        self.commits = 0
        self.forces = 0
        self.pages_written = 0
        self.llp_reads = 0
        self.waits = 0
        cache.wal = self.force_for
        cache.logged = self.logged
        cache.llol_block = self.area.header
        cache.append_lock = self.append_lock
        cache.log_counters = self.counters
        if hasattr(cache.agent, "on_recover"):
            cache.agent.on_recover = self.recover
            cache.agent.log_marks = self.marks
        if hasattr(cache.agent, "on_log_append"):
            cache.agent.on_log_append = self.append_for
        self._foreign: list[_Foreign] = []  # to append for other hosts
        self._asking = False  # our LogAppend waits for its answer
        self.shipped = 0  # our PLCs another host appended for us
        self.appended_for = 0  # other hosts' forces we appended
        self.recovered = 0
        self._rebuilding: set[int] = set()  # blocks the master gave us to rebuild

    # -- committing --------------------------------------------------------------
    def commit(
        self,
        changes: list[tuple[int, int, int, bytes | None, bytearray]],
        freed: Iterable[int] = (),
    ) -> None:
        """An operation ended: (block, btype, version, before or None, after)
        for each metadata block it changed, and the metadata blocks it freed
        (revoked: a replay must not bring their old contents back over what
        the block holds next, a file's data, say)."""
        recs: list[Record] = []
        top = 0
        for block, btype, version, before, after in changes:
            recs += block_records(self.host, block, btype, version, before, after, self.room)
            top = max(top, version)
        top = top or self.cache.scn
        recs += [Record(Kind.REVOKE, 0, self.host, b, top) for b in sorted(freed)]
        if not recs:
            return
        recs.append(Record(Kind.COMMIT, 0, self.host, 0, top))
        for block, _, version, _, _ in changes:
            self.pending[block] = max(self.pending.get(block, 0), version)
        self.plc += recs
        self._plc_bytes += sum(r.size for r in recs)
        self.commits += 1

    async def wait_for_room(self) -> None:
        """Before an operation: a log past FULL slows writers down (they wait
        for checkpoints to free pages) rather than failing them."""
        while self._used_pages() > self.FULL * self.area.count:
            self.waits += 1
            log.info("host %d: the log is full: checkpoint before going on", self.host)
            await self.checkpoint()
            if self._used_pages() > self.FULL * self.area.count:
                # Other hosts' changes hold it: their checkpoints free it.
                await trio.sleep(0.05)

    def _used_pages(self) -> int:
        h = self._known
        return h.next_seq - h.checkpoint_seq + self._plc_bytes // self.room + 1

    # -- appending --------------------------------------------------------------
    def logged(self, blocks: Iterable[int]) -> bool:
        """Are the records of these blocks' versions all on storage?"""
        return not any(b in self.pending for b in blocks)

    async def force_for(self, blocks: Iterable[int]) -> None:
        """Write-ahead: the records of these blocks' versions on storage first."""
        if not self.logged(blocks):
            await self.force()

    @asynccontextmanager
    async def _llol(self) -> AsyncIterator[Buffer]:
        """The LLOL (its block in X) and the append semaphore.  The lock is
        waited for outside the semaphore: a recovery may hold the block we
        wait for, and need the semaphore to finish."""
        while True:
            hbuf = await self.cache.get(self.area.header, Mode.X, fmt.BlockType.JOURNAL, pin=False)
            async with self.append_lock:
                if self.cache.holding(self.area.header, Mode.X) is hbuf:
                    yield hbuf
                    return
            # It left for another host while we waited: ask again.

    async def force(self) -> None:
        """Append the PLC to the log; return when it is on storage."""
        if self.plc:
            if await self._ship():
                return
            async with self._llol() as hbuf:
                await self._force(hbuf)
        elif self.pending:
            # Another task's append is taking our records to storage.
            async with self.append_lock:
                pass

    async def _ship(self) -> bool:
        """Have the LLOL's holder append the PLC for us (LogAppend); True
        once it is on storage, False if we must take the LLOL ourselves."""
        ship = getattr(self.cache.agent, "ship_log", None)
        if ship is None or self.page_locks:
            return False
        async with self.append_lock:
            if not self.plc:
                return True  # an append of another task took ours along
            if self.cache.holding(self.area.header, Mode.X) is not None:
                return False  # ours meanwhile: append here
            records, self.plc, self._plc_bytes = self.plc, [], 0
            appending = dict(self.pending)
            body = bytes(_pack_records(records))
            reply = None
            self._asking = True
            try:
                reply = await self._ask_holder(ship, body)
            finally:
                self._asking = False
                # Not known to be on storage (no answer, a refusal, or we
                # were cancelled waiting): the records are ours to append
                # again, or the blocks they changed stay pending with no
                # record anywhere to force, and can never be written.
                if reply is None:
                    self._put_back(records)
            if reply is None:
                return False
            self._durable(appending)
            self._known = JournalHeader(
                reply.checkpoint_seq, reply.next_seq, self._known.low, reply.llp_used
            )
            self.shipped += 1
            return True

    @staticmethod
    async def _ask_holder(
        ship: Callable[[bytes], Awaitable[p.LogAppended | None]], body: bytes
    ) -> p.LogAppended | None:
        """The holder's ok to our LogAppend, or None."""
        for _ in range(2):  # the one we asked may name the holder now
            reply = await ship(body)
            if reply is None or reply.ok:
                return reply
        return None

    async def append_for(self, host: int, body: bytes) -> p.LogAppended:
        """A peer's LogAppend: its records appended with ours, once on
        storage ok; refused unless we hold the LLOL."""
        hbuf = self.cache.holding(self.area.header, Mode.X)
        refusal = p.LogAppended(0, False, self.cache.agent.llol_holder, 0, 0, 0)
        if hbuf is None or self.page_locks or self._used_pages() > self.FULL * self.area.count:
            return refusal  # a full log: the asker waits for room itself
        if self._asking:
            # The LLOL reached us while our own LogAppend waits for an
            # answer, holding the append semaphore: the asker may be the
            # host we asked, each waiting for the other until both give up.
            return refusal
        try:
            records = _unpack_records(memoryview(body), -1)
        except CorruptVolume as e:
            log.warning("host %d: node %d's log records refused: %s", self.host, host, e)
            return refusal
        if (
            not 0 <= host < self.sb.host_slots
            or not records
            or records[-1].kind is not Kind.COMMIT
            or any(r.host != host for r in records)
        ):
            log.warning(
                "host %d: node %d sent records that are not its own transactions", self.host, host
            )
            return refusal
        job = _Foreign(host, records)
        self._foreign.append(job)
        async with self.append_lock:
            if not job.done.is_set():
                if self.cache.holding(self.area.header, Mode.X) is hbuf:
                    try:
                        await self._force(hbuf)
                    except (StorageError, CorruptVolume) as e:  # the asker appends itself
                        log.warning("host %d: appending for node %d: %s", self.host, host, e)
                else:
                    self._foreign.remove(job)  # it left meanwhile
        if not job.ok:
            return refusal
        self.appended_for += 1
        k = self._known
        return p.LogAppended(0, True, self.host, k.next_seq, k.llp_used, k.checkpoint_seq)

    def _put_back(self, records: list[Record]) -> None:
        """Records taken for an append that did not happen: ours to append
        again, ahead of any committed since."""
        self.plc = records + self.plc
        self._plc_bytes = sum(r.size for r in self.plc)

    def _durable(self, appended: dict[int, int]) -> None:
        """These versions' records are on storage."""
        for b, version in appended.items():
            if self.pending.get(b) == version:  # no newer commit meanwhile
                del self.pending[b]

    def _foreign_of_live_hosts(self) -> list[_Foreign]:
        """The LogAppends to serve now.  One from a host the master has
        since said is down is refused: its recovery may have read the log
        already, and would not follow blocks its records allocated (they
        would reach the log after their host's recovery took what it
        holds).  The asker died before our answer: nothing it was told
        is lost."""
        if not self._foreign:
            return []
        live = set(self.cache.agent.live_nodes())
        for job in self._foreign:
            if job.host not in live:
                log.warning(
                    "host %d: node %d is down: its records are not appended", self.host, job.host
                )
                job.done.set()  # not ok
        return [job for job in self._foreign if job.host in live]

    async def _force(self, hbuf: Buffer) -> None:
        """force() with the LLOL held: our PLC, and the records other hosts
        asked us to append."""
        if not self.plc and not self._foreign:
            return  # a group commit took ours along
        h = unpack_header(hbuf.data, self.area.header)
        records, self.plc, self._plc_bytes = self.plc, [], 0
        foreign, self._foreign = self._foreign_of_live_hosts(), []
        batches = [(self.host, records)] if records else []
        batches += [(job.host, job.records) for job in foreign]
        # Still pending while the pages are on their way: a block must not
        # reach storage before its records do (a crash between would find
        # the change with no record of it).
        appending = dict(self.pending)
        try:
            await self._append(h, batches)
        except BaseException:
            self._put_back(records)
            for job in foreign:
                job.done.set()  # not ok: each asker appends for itself
            raise
        self._durable(appending)
        pack_header(hbuf.data, h)
        self.cache.mark_dirty(hbuf)
        self._known = h
        self.forces += 1
        for job in foreign:
            job.ok = True
            job.done.set()

    async def _append(self, h: JournalHeader, batches: list[tuple[int, list[Record]]]) -> None:
        """Each host's records, after a BEGIN of its own, into the last page
        while they fit (it is read back from storage: the previous holder
        wrote it before letting the LLOL go), then into new pages; all
        written, then `h` says where the log ends, and marks each host."""
        records = [r for host, recs in batches for r in (Record(Kind.BEGIN, 0, host, 0, 0), *recs)]
        writes: list[tuple[int, bytearray]] = []
        if h.next_seq - 1 < h.checkpoint_seq:
            h.llp_used = 0  # the last page is behind the checkpoint: a new one
        first = h.next_seq - 1 if h.llp_used else h.next_seq
        if h.llp_used:
            seq = h.next_seq - 1
            block = self.area.block_of(seq)
            used = h.llp_used
            page = bytearray(await self.cache.storage.read(block * self.bs, self.bs))
            self.llp_reads += 1
        else:
            seq = h.next_seq
            block = self.area.block_of(seq)
            page, used = new_page(self.bs, block, seq, self.area.block_of(seq + 1)), PAGE_HDR
        while records:
            n = self._fitting(records, self.bs - used - _GROUP.size)
            if n:
                used = add_group(page, used, max(r.version for r in records[:n]), records[:n])
                records = records[n:]
            if records or n == 0:
                if n or used > PAGE_HDR:
                    writes.append((block, page))
                seq += 1
                block = self.area.block_of(seq)
                page, used = new_page(self.bs, block, seq, self.area.block_of(seq + 1)), PAGE_HDR
        writes.append((block, page))
        if seq + 1 > h.checkpoint_seq + self.area.count:
            # Admission keeps a quarter of the circle free; getting here
            # means hosts ran far past it.  Refuse rather than overwrite.
            raise CorruptVolume("the log is full: no checkpoint freed pages in time")
        if self.page_locks:
            await self.cache.hold_written(writes)
        for b, data in writes:
            await self.cache.storage.write(b * self.bs, data)
        await self.cache.storage.flush()
        log.debug(
            "host %d: appended pages %d..%d, log end %d (+%d bytes), checkpoint %d",
            self.host,
            first,
            seq,
            seq + 1,
            used,
            h.checkpoint_seq,
        )
        self.pages_written += len(writes)
        h.next_seq, h.llp_used = seq + 1, used
        for host, _ in batches:
            if not h.low[host]:
                h.low[host] = first

    @staticmethod
    def _fitting(records: list[Record], room: int) -> int:
        """How many of the first records fit in `room` bytes."""
        n = 0
        for r in records:
            if r.size > room:
                break
            room -= r.size
            n += 1
        return n

    # -- checkpoints -------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Write back what this host changed before its last checkpoint (the
        cache's checkpoint covers those past images through the master),
        then say so in the log header and move the log's checkpoint as far
        as every host allows."""
        async with self._checkpointing:
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        await self.force()
        # The log's end before the cache closes its open bin: what we logged
        # before it will be covered by the next checkpoint's bin writes.
        # (As of our last hold of the LLOL: stale only ever means lower.)
        # The end is the first page an append may still fill: the last page
        # is appended to in place, so changes logged there later are not
        # covered by this checkpoint.
        k = self._known
        mark, self._mark = self._mark, k.next_seq - 1 if k.llp_used else k.next_seq
        since, self._mark_scn = self._mark_scn, self.cache.scn
        await self.cache.checkpoint()
        async with self._llol() as hbuf:
            h = unpack_header(hbuf.data, self.area.header)
            if h.low[self.host]:
                # Our changes logged before `mark` have versions up to
                # `since`: if everything left unwritten here was first
                # changed after it, they are all on storage.  Nothing left
                # at all: none of ours is needed.
                oldest = self.cache.oldest_unwritten()
                was = h.low[self.host]
                if oldest is None and not self.plc:
                    h.low[self.host] = 0
                elif oldest is None or oldest > since:
                    h.low[self.host] = max(h.low[self.host], mark)
                log.debug(
                    "host %d: checkpoint: mark %d -> %d (oldest unwritten %s, since %d, mark %d)",
                    self.host,
                    was,
                    h.low[self.host],
                    oldest,
                    since,
                    mark,
                )
            await self._put_header(hbuf, h)

    async def _put_header(self, hbuf: Buffer, h: JournalHeader) -> None:
        """`h`, with the checkpoint moved as far as every host allows, as the
        LLOL's value (held, in `hbuf`)."""
        moved = h.advance()
        if moved:
            log.debug("host %d: log checkpoint moves to page %d", self.host, h.checkpoint_seq)
        pack_header(hbuf.data, h)
        self.cache.mark_dirty(hbuf)
        self._known = h
        if moved:
            # Pages before the new checkpoint may be reused only once the
            # header saying so is on storage.
            await self.cache.flush([self.area.header])
            await self.cache.storage.flush()

    # -- recovery --------------------------------------------------------------
    async def recover(
        self,
        dead: int,
        blocks: list[int],
        report: Report,
        follow: bool = True,
        sweep: bool = False,
        only: Callable[[int], bool] | None = None,
    ) -> None:
        """Another host died holding `blocks` in X; the master has us hold
        them now, and storage has the newest copy that survived elsewhere.
        Rebuild each from storage and the committed records after the
        checkpoint, take the result into our cache and our log (FULL
        records: our checkpoints now answer for them), and `report` the
        blocks done.  No blocks: every round is over, and we clear the dead
        host's mark in the log header, which lets the checkpoint pass its
        records at last.

        The blocks it allocated were private to it (the master knows
        nothing of them) and are reachable now: its records name them, and
        we take them in X like any other block before rebuilding them
        (`follow`: the master has one survivor do that).

        `sweep`: the master does not know what it held (a master rebuilt
        from the hosts' reports, which it did not come back to): we take
        every block its records name (`only`: of those, the blocks this
        master answers for, spread.py: what we keep of them it must hear).
        """
        if sweep:
            await self._sweep(dead, report, only)
            return
        if not blocks:
            await self._close_recovery(dead)
            await report([], [], [])
            return
        want = set(blocks)
        self._rebuilding |= want
        try:
            await self._recover(dead, want, report, follow)
        finally:
            self._rebuilding -= set(blocks)

    async def _close_recovery(self, dead: int) -> None:
        async with self._llol() as hbuf:
            h = unpack_header(hbuf.data, self.area.header)
            if dead < len(h.low):
                h.low[dead] = 0
            await self._put_header(hbuf, h)
        log.info("host %d: the log no longer keeps records for dead node %d", self.host, dead)

    async def _recover(self, dead: int, want: set[int], report: Report, follow: bool) -> None:
        given = set(want)
        # Read without the LLOL: the dead host's records are all on storage.
        _, pages = await read_log(self.cache.storage, self.sb)
        if self.area.header in want:
            # It died holding the LLOL: the header on storage may be behind
            # the pages it wrote; the chain tells where the log ends.  The
            # LLOL goes back into service at once: other hosts may need to
            # append before they can ship us what we ask for next.
            want.discard(self.area.header)
            kept = await self._adopt_header(dead, pages)
            await report([self.area.header], [self.area.header], kept)
        # The blocks its records name, except those the master gave us to
        # rebuild in another round: they are ours already, and wait for that
        # round, not for a lock.
        followed: set[int] = set()
        try:
            while True:
                if follow:
                    more = self._theirs(pages, dead) - followed
                    await self._take(more, followed)
                    want |= {b for b in more if self.cache.holding(b, Mode.X) is None}
                done = await self._rebuild_into_cache(dead, want, followed if follow else None)
                if isinstance(done, list):
                    pages = done  # it names more: take those too, and again
                    continue
                installed, kept = done
                break
        finally:
            self.cache.release_rebuild_hold(followed)
        self.recovered += len(installed)
        log.warning(
            "host %d: rebuilt %d blocks of dead node %d from the log (%d it had allocated)",
            self.host,
            len(installed),
            dead,
            len(want - given),
        )
        rest = given - {self.area.header}
        if rest:
            await report(
                sorted(rest), [b for b in installed if b in rest], [k for k in kept if k[0] in rest]
            )

    async def _sweep(
        self, dead: int, report: Report, only: Callable[[int], bool] | None = None
    ) -> None:
        """Recover(sweep): every block whose last record is the dead
        host's, taken and rebuilt as a dead host's blocks are (a copy
        shipped to us that is as new stays, and is reported kept: storage
        must have it before the dead host's records may go).  The log's
        header, which it may have held, comes in a round of its own."""
        _, pages = await read_log(self.cache.storage, self.sb)
        theirs: set[int] = set()
        marked: set[int] = set()  # ours to rebuild: no round follows them
        try:
            while True:
                more = self._theirs(pages, dead, only) - theirs
                marked |= more
                self._rebuilding |= more
                await self._take(more, theirs)
                done = await self._rebuild_into_cache(dead, theirs, theirs, only)
                if not isinstance(done, list):
                    rebuilt, kept_too = done
                    break
                pages = done  # it names more: take those too, and again
        finally:
            self.cache.release_rebuild_hold(theirs)
            self._rebuilding -= marked
        self.recovered += len(rebuilt)
        log.warning(
            "host %d: swept %d blocks of node %d from the log, rebuilt %d",
            self.host,
            len(theirs),
            dead,
            len(rebuilt),
        )
        await report([], rebuilt, kept_too)

    def _theirs(
        self, pages: list[Page], dead: int, only: Callable[[int], bool] | None = None
    ) -> set[int]:
        """The blocks whose last record in `pages` is the dead host's (and
        that `only` keeps), but the log's header and those the master gave
        us to rebuild in a round of their own (ours already: they wait for
        that round, not a lock)."""
        blocks = _last_changed_by(pages, dead) - self._rebuilding - {self.area.header}
        return blocks if only is None else {b for b in blocks if only(b)}

    async def _take(self, blocks: set[int], taken: set[int]) -> None:
        """Hold `blocks` in X for the rebuild (release_rebuild_hold(taken)
        lets them go), and add them to `taken`."""
        if blocks:
            await self.cache.take_for_rebuild(sorted(blocks))
            taken |= blocks

    async def _rebuild_into_cache(
        self,
        dead: int,
        want: set[int],
        followed: set[int] | None = None,
        only: Callable[[int], bool] | None = None,
    ) -> tuple[list[int], list[tuple[int, int]]] | list[Page]:
        """Rebuild `want` into our cache: the blocks installed, and those of
        them whose cached copy was newer and stayed (block, version rebuilt).

        `followed`: the dead host's blocks we took by following its records.
        If the log, read here under the LLOL, names more of them, nothing is
        rebuilt and the pages are returned: take those blocks first.  (Its
        last records can land after we first read the log: the LLOL's holder
        had its LogAppend queued when it died.  They would name blocks it
        allocated that nobody else knows of.)"""
        storage = self.cache.storage
        async with self._llol() as hbuf:
            # Nobody appends while we read the log (we hold the LLOL).
            h = unpack_header(hbuf.data, self.area.header)
            pages = await read_chain(storage, self.area, self.bs, h.checkpoint_seq, h.next_seq)
            if followed is not None and self._theirs(pages, dead, only) - followed:
                log.info("host %d: more records of dead node %d: following them", self.host, dead)
                return pages
            images: list[tuple[int, int, int, bytearray]] = []
            if want:
                rp, _ = await apply_log(storage, self.bs, pages, want)
                images = rp.results()
            kept = self.cache.adopt([(b, fmt.BlockType(t), v, data) for b, t, v, data in images])
            # A copy that stayed is newer than the image, and our records of
            # its changes are in the log already: a full record of the older
            # image would undo them in a replay.
            stayed = {b for b, _ in kept}
            self.commit([(b, t, v, None, data) for b, t, v, data in images if b not in stayed])
            # Our records on storage before anything of it leaves us: from
            # then on the log keeps these blocks' changes for us too (the
            # dead host's mark stays until the master's closing round).
            await self._force(hbuf)
        return [b for b, _, _, _ in images], kept

    async def _adopt_header(self, dead: int, pages: list[Page]) -> list[int]:
        """The LLOL's value as storage and the log chain (`pages`, read from
        the checkpoint it names) make it: the log ends after the last whole
        group on storage."""
        data = bytearray(await self.cache.storage.read(self.area.header * self.bs, self.bs))
        h = decode_header(data, self.area.header)
        if pages and pages[-1].seq + 1 >= h.next_seq:
            h.next_seq, h.llp_used = pages[-1].seq + 1, pages[-1].used
        # The marks on storage may be older than the ones the dead host had:
        # where this copy says a host had nothing unwritten, it may have now
        # (each live host's next checkpoint puts its own mark right again),
        # and the dead host's records stay needed until its recovery is over.
        for n in [*self.cache.agent.live_nodes(), dead]:
            if n < len(h.low) and not h.low[n]:
                h.low[n] = h.checkpoint_seq
        pack_header(data, h)
        version = fmt.read_header(data).version
        return self.cache.adopt([(self.area.header, fmt.BlockType.JOURNAL, version, data)])

    async def marks(self) -> tuple[int, set[int]]:
        """The hosts whose records the log still keeps (a mark in its
        header), as our copy of the LLOL has them, or else storage; with
        the version of the header they come from (the newest is right)."""
        buf = self.cache.holding(self.area.header, Mode.S)
        try:
            if buf is not None:
                version, h = buf.version, unpack_header(buf.data, self.area.header)
            else:
                data = await self.cache.storage.read(self.area.header * self.bs, self.bs)
                version, h = fmt.read_header(data).version, decode_header(data, self.area.header)
        except CorruptVolume as e:
            log.error("host %d: cannot read the log's marks: %s", self.host, e)
            return 0, set()
        return version, {n for n, low in enumerate(h.low) if low}

    def counters(self) -> dict[str, int]:
        return {
            "log_recovered_blocks": self.recovered,
            "log_commits": self.commits,
            "log_forces": self.forces,
            "log_appends_asked": self.shipped,  # our forces another host appended
            "log_appends_for_others": self.appended_for,
            "log_pages_written": self.pages_written,
            "log_last_page_reads": self.llp_reads,
            "log_full_waits": self.waits,
            # A level: the log's use as of our last LLOL hold.
            "log_pages_in_use": self._known.next_seq - self._known.checkpoint_seq,
        }


# --------------------------------------------------------------------------
# `sharedfs journal`: the log as it is on storage


def usage(storage: Storage, sb: fmt.Superblock) -> dict[str, Any]:
    """How much of the log lies between its checkpoint and its end, from the
    header as last written to storage (the appending host may be ahead)."""
    area = Area.of(sb)
    bs = sb.block_size
    try:
        h = decode_header(storage.read_sync(area.header * bs, bs), area.header)
    except CorruptVolume as e:
        return {"error": f"{e}; run 'sharedfs fsck'"}
    used = h.next_seq - h.checkpoint_seq
    return {
        "pages": area.count,
        "in_use": used,
        "percent": round(100 * used / area.count, 1),
        "checkpoint": h.checkpoint_seq,
        "end": h.next_seq,
        "unwritten_since": {str(n): seq for n, seq in enumerate(h.low) if seq},
    }


def describe(header: JournalHeader, pages: list[Page], *, records: bool) -> list[str]:
    marks = ", ".join(f"host {n}: page {m}" for n, m in enumerate(header.low) if m) or "none"
    out = [
        f"checkpoint at page {header.checkpoint_seq}, log ends before page {header.next_seq}"
        f" (last page {header.llp_used} bytes used)",
        f"oldest unwritten change per host: {marks}",
    ]
    by_host: dict[int, int] = {}
    for page in pages:
        out.append(
            f"page {page.seq} (block {page.block}): {len(page.records)} records, PTS {page.pts}"
        )
        for r in page.records:
            if r.kind is Kind.COMMIT:
                by_host[r.host] = by_host.get(r.host, 0) + 1
            if records and r.kind is Kind.BEGIN:
                out.append(f"  BEGIN  host {r.host}")
            elif records:
                size = sum(len(d) for _, d in r.ranges)
                out.append(
                    f"  {r.kind.name:6} host {r.host} block {r.block} version {r.version}"
                    + (
                        f", {len(r.ranges)} ranges, {size} bytes"
                        if r.kind in (Kind.DELTA, Kind.FULL)
                        else ""
                    )
                )
    total = sum(by_host.values())
    per = ", ".join(f"host {h}: {n}" for h, n in sorted(by_host.items())) or "none"
    out.append(f"{len(pages)} pages, {total} committed transactions past the checkpoint ({per})")
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from .cli_util import Parser, run_tool
    from .storage import open_volume
    from .volume import open_superblock

    ap = Parser(
        prog="sharedfs journal", description="Show a volume's log: pages, records, checkpoint."
    )
    ap.add_argument("volume")
    ap.add_argument("--records", action="store_true", help="list every record")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    def show(args: argparse.Namespace) -> None:
        storage = open_volume(args.volume)
        try:
            sb = open_superblock(storage)
            header, pages = trio.run(read_log, storage, sb)
        finally:
            storage.close()
        print("\n".join(describe(header, pages, records=args.records)))

    run_tool(show, args)
