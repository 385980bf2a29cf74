"""Asynchronous mirroring of the shared volume to a secondary (seed 004).

This module owns the mirror: the storage wrapper each host puts over the
primary when the superblock names a secondary (`MirrorStorage`, built by
`mirrored()`), the per-region "unsynchronized" indicators on the primary
(`Indicators`), the offline operations on a mirrored pair (attach, resync,
verify, detach, promote) and the `sharedfs mirror` command.

The way of a write (claims 1-2, 7-8, 12-13):
1. the write's regions get its update id in their update sets, and their
   indicator bits are set on the primary, durably, before the data write
   is issued: a crash after the data write always leaves the marks;
2. the data goes to the primary; the write returns;
3. a background task ships the update to the secondary; the write never
   waits for it;
4. once the secondary has acknowledged it, the primary's range is read
   again: if another host (or a later write of ours) changed it meanwhile,
   that version goes to the secondary too, since two hosts' shipments of
   one block may land in either order; only an update whose data still
   matches the primary after its acknowledgement leaves the update sets;
5. a region whose set is empty has its indicator reset in memory, and on
   storage lazily, after a flush of the secondary made what it acknowledged
   durable.

Every host has its own run of indicator blocks, so hosts never write the
same block; a crashed host's run keeps its marks for `sharedfs mirror
resync`, which copies exactly the regions some run marks.  A region whose
update could not be shipped (the queue is full, the primary write failed,
it was marked by an earlier mount of this slot) is *stale*: it stays marked
until a resync.  An update whose range another write keeps changing is
shipped again a little later, and stale only if that still fails as the
mount ends.  While the secondary is unreachable writes go on, their
regions stay marked, one log line says so, and shipping retries with
backoff.

Not mirrored: the host slots (each mount's heartbeat) and the indicator
area itself; attach and promote write them empty on the secondary, and
verify leaves them out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import trio
import xxhash

from . import format as fmt
from .cli_util import Parser, parse_address_arg, run_tool, setup_logging
from .errors import QuietError, StorageError
from .mkfs import existing_volume
from .progress import Progress
from .status import ask_master, merge_spread
from .storage import Storage, canonical_name, create_image, open_volume
from .storage.uri import is_uri
from .volume import describe_slot, live_slots, open_superblock

log = logging.getLogger(__name__)

#: Bytes of updates a host keeps queued for the secondary; past that, new
#: updates are not queued and their regions wait for a resync.
QUEUE_BYTES = 256 << 20
#: Shipping tasks per host: an NBD secondary answers faster with several
#: requests in flight.  Their order does not matter (step 4 above).
SHIPPERS = 4
#: Updates a shipping task takes from the queue at once.
SHIP_BATCH = 64
#: How long an update waits for more to join its batch.
#: A write-back issues its runs one by one; without the wait each would be
#: a batch of one, shipped and read back with two thread hops of its own,
#: which on two cores cost the write-back itself about half its speed.
SHIP_GATHER = 0.005
#: How often reset indicators are written to storage.
CLEAR_EVERY = 0.5
#: Waits between attempts to reach a lost secondary: first, then doubling.
RETRY_FIRST, RETRY_MOST = 0.1, 5.0
#: How long a secondary NBD connection tries to reconnect before we count
#: the secondary unreachable and retry on our own (with a fresh connection).
SECONDARY_NBD_TIMEOUT = 5.0
#: An update whose range keeps changing under it this many times in a row
#: is put aside rather than chased on (a hot block, the log's tail say, is
#: being written meanwhile); it goes again CHASE_AFTER seconds later, still
#: queued, its region still marked.  One that still fails as the mount
#: drains is left stale, for a resync.
MAX_RECHECKS = 8
CHASE_AFTER = 0.2
#: How long the marks a write-back announced (will_write) are held for its writes.
HINT_HOLD = 1.0
#: How long an unmount waits for the queue to drain to a reachable secondary.
DRAIN_TIMEOUT = 30.0


# -- which bytes are mirrored --------------------------------------------------


def runtime_areas(sb: fmt.Superblock) -> list[tuple[int, int]]:
    """Block ranges [start, end) that belong to the running cluster rather
    than to the filesystem: the host slots and the indicator area."""
    return [
        (sb.hosts_start, sb.hosts_start + sb.host_slots),
        (sb.mirror_start, sb.mirror_start + sb.mirror_blocks),
    ]


def mirrored_pieces(sb: fmt.Superblock, offset: int, length: int) -> list[tuple[int, int]]:
    """Byte ranges (offset, length) of [offset, offset+length) that are mirrored."""
    bs = sb.block_size
    pieces = [(offset, offset + length)]
    for a, b in runtime_areas(sb):
        lo, hi = a * bs, b * bs
        cut = []
        for s, e in pieces:
            if e <= lo or s >= hi:
                cut.append((s, e))
                continue
            if s < lo:
                cut.append((s, lo))
            if e > hi:
                cut.append((hi, e))
        pieces = cut
    return [(s, e - s) for s, e in pieces]


def region_pieces(sb: fmt.Superblock, region: int) -> list[tuple[int, int]]:
    first, count = sb.region_range(region)
    return mirrored_pieces(sb, first * sb.block_size, count * sb.block_size)


def regions_of(sb: fmt.Superblock, offset: int, length: int) -> range:
    rb = sb.mirror_region_blocks * sb.block_size
    return range(offset // rb, (offset + length - 1) // rb + 1)


def region_bytes(sb: fmt.Superblock, regions: Iterable[int]) -> int:
    return sum(sb.region_range(r)[1] for r in regions) * sb.block_size


# -- the indicators -------------------------------------------------------------


class Indicators:
    """One host's run of indicator blocks on the primary.

    Attributes:
        wanted: per block of the run, the bits that should be set.
        durable: per block, the bits known to be set on storage.  A bit
            counts as set once the write setting it has completed, and as
            clear from the moment a write clearing it is issued: so a
            region marked while its reset is on the way is marked again.
        writes: indicator blocks written (tests count them).
    """

    def __init__(self, storage: Storage, sb: fmt.Superblock, node: int) -> None:
        self.storage = storage
        self.sb = sb
        self.node = node
        bs = sb.block_size
        self.wanted = [bytearray(bs) for _ in range(sb.indicator_run_blocks)]
        self.durable = [bytearray(bs) for _ in range(sb.indicator_run_blocks)]
        self._locks = [trio.Lock() for _ in range(sb.indicator_run_blocks)]
        self.writes = 0

    def load(self) -> set[int]:
        """Read the run from storage: the regions it marks (a damaged block
        marks every region it covers)."""
        marked = set()
        for i, (blockno, regions) in enumerate(self._blocks()):
            buf = self.storage.read_sync(blockno * self.sb.block_size, self.sb.block_size)
            bits = fmt.read_indicators(buf, blockno)
            for n, r in enumerate(regions):
                if bits is None or fmt.bit_test(bits, n):
                    marked.add(r)
                    fmt.bit_set(self.wanted[i], n)
                    fmt.bit_set(self.durable[i], n)
        return marked

    def _blocks(self) -> list[tuple[int, range]]:
        """(block number, regions it covers) for each block of the run."""
        cap = fmt.bitmap_capacity(self.sb.block_size)
        out = []
        for i in range(self.sb.indicator_run_blocks):
            blockno, _ = self.sb.indicator_block(self.node, i * cap)
            out.append((blockno, range(i * cap, min((i + 1) * cap, self.sb.region_count))))
        return out

    def _where(self, region: int) -> tuple[int, int]:
        return divmod(region, fmt.bitmap_capacity(self.sb.block_size))

    def is_durable(self, region: int) -> bool:
        i, bit = self._where(region)
        return fmt.bit_test(self.durable[i], bit)

    async def mark(self, regions: Iterable[int]) -> None:
        """Set the bits of `regions`; return once they are durable."""
        regions = list(regions)
        todo = set()
        for r in regions:
            i, bit = self._where(r)
            fmt.bit_set(self.wanted[i], bit)
            if not fmt.bit_test(self.durable[i], bit):
                todo.add(i)
        for i in sorted(todo):
            await self._write(i, regions)

    def mark_sync(self, regions: Iterable[int]) -> None:
        """mark() for tools' synchronous writes (fsck -y), which never run
        beside async writers of the same run.  Not forced to the disk: no
        host is mounted, and the tool flushes before it is done."""
        for r in regions:
            i, bit = self._where(r)
            fmt.bit_set(self.wanted[i], bit)
            if not fmt.bit_test(self.durable[i], bit):
                blockno = self._blocks()[i][0]
                data = fmt.seal_indicators(self.wanted[i], blockno)
                self.storage.write_sync(blockno * self.sb.block_size, data)
                self.durable[i][:] = self.wanted[i]
                self.writes += 1

    def reset(self, region: int) -> None:
        """Clear the bit in memory; `write_resets` takes it to storage."""
        i, bit = self._where(region)
        fmt.bit_clear(self.wanted[i], bit)

    def resets_pending(self) -> bool:
        """Some bit is set on storage and no longer wanted."""
        return any(_and_not(d, w) for d, w in zip(self.durable, self.wanted, strict=True))

    def snapshot(self) -> list[bytes]:
        return [bytes(w) for w in self.wanted]

    async def write_resets(self, before: list[bytes]) -> None:
        """Write the blocks whose bits were reset before the snapshot
        `before` was taken (and still are); bits reset since stay set on
        storage until the next call."""
        for i, old in enumerate(before):
            if _and_not(self.durable[i], _or(self.wanted[i], old)):
                await self._write(i, (), keep=old)

    async def _write(self, i: int, regions: Iterable[int], keep: bytes | None = None) -> None:
        async with self._locks[i]:
            need = [self._where(r)[1] for r in regions if self._where(r)[0] == i]
            if need and all(fmt.bit_test(self.durable[i], b) for b in need):
                return  # a write that ran while we waited set them
            content = bytearray(self.wanted[i] if keep is None else _or(self.wanted[i], keep))
            blockno = self._blocks()[i][0]
            # Bits this write clears are clear from now on (see `durable`).
            self.durable[i][:] = _and(self.durable[i], content)
            await self.storage.write(
                blockno * self.sb.block_size, fmt.seal_indicators(content, blockno), fua=True
            )
            self.durable[i][:] = content
            self.writes += 1


def _or(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(n, "little")


def _and(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    n = len(a)
    return (int.from_bytes(a, "little") & int.from_bytes(b, "little")).to_bytes(n, "little")


def _and_not(a: bytes | bytearray, b: bytes | bytearray) -> bool:
    """Some bit is set in `a` and clear in `b`."""
    return bool(int.from_bytes(a, "little") & ~int.from_bytes(b, "little"))


# -- the wrapper a host writes through -----------------------------------------


@dataclass(slots=True)
class _Update:
    uid: int
    pieces: list[tuple[int, bytes]]
    regions: range
    queued: float = 0.0  # trio time

    @property
    def size(self) -> int:
        return sum(len(d) for _, d in self.pieces)


class MirrorStorage(Storage):
    """The primary, with every write also shipped to the secondary.

    Attributes:
        inner: the primary volume.
        node: the host slot whose indicator run this host writes.
        secondary_name: the secondary's address (from the superblock).
        indicators: this host's run of indicator bits.
        updates: per region, the ids of updates not yet acknowledged
            (seed 004's update sets).
        stale: marked regions with no update on the way: only a resync
            clears them.
        ship: False for tools that only mark (fsck -y): every region they
            write is stale at once.
        queued_bytes: data waiting to be shipped.
        reachable: whether the last attempt to use the secondary worked.
        shipped, rechecks, dropped, shipments, chases: counters (updates
            acknowledged, ranges sent again because they changed meanwhile,
            updates left stale, batches put on the secondary, updates
            shipped again after MAX_RECHECKS).
    """

    def __init__(
        self,
        inner: Storage,
        sb: fmt.Superblock,
        node: int,
        *,
        ship: bool = True,
        open_secondary: Callable[[], Storage] | None = None,
        queue_bytes: int = QUEUE_BYTES,
    ) -> None:
        self.inner = inner
        self.sb = sb
        self.node = node
        self.name = inner.name
        self.size = inner.size
        self.shared = inner.shared
        self.min_block = inner.min_block
        self.secondary_name = sb.mirror_secondary
        self.indicators = Indicators(inner, sb, node)
        self.stale = self.indicators.load()
        self.updates: defaultdict[int, set[int]] = defaultdict(set)
        self.ship = ship
        self.queue_bytes = queue_bytes
        self.queued_bytes = 0
        self.reachable = True
        self._puts = 0  # writes to the secondary that succeeded
        self.shipped = self.rechecks = self.dropped = self.shipments = self.chases = 0
        self._open_secondary = open_secondary or self._open_by_name
        self._secondary: Storage | None = None
        self._opening = trio.Lock()
        self._retry = RETRY_FIRST
        self._ids = itertools.count(1)
        self._send, self._recv = trio.open_memory_channel[_Update](math.inf)
        self._closed = False
        self._full_logged = False
        self._resets_due = trio.Event()
        #: When each queued update was queued, oldest first (for the lag).
        self._queued: dict[int, float] = {}
        #: Regions a write-back announced, and until when their marks hold.
        self._hinted: dict[int, float] = {}
        #: Updates put aside after MAX_RECHECKS, for the chase task.
        self._unsettled: list[_Update] = []
        self._put_aside = trio.Event()
        if self.stale:
            log.info(
                "host %d: mirror: %d regions marked by an earlier mount wait for a resync",
                node,
                len(self.stale),
            )

    # -- Storage --------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        return await self.inner.read(offset, length)

    def read_sync(self, offset: int, length: int) -> bytes:
        return self.inner.read_sync(offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        pieces = mirrored_pieces(self.sb, offset, len(data))
        if not pieces:
            return await self.inner.write(offset, data, fua=fua)
        regions = regions_of(self.sb, pieces[0][0], pieces[-1][0] + pieces[-1][1] - pieces[0][0])
        uid = next(self._ids)
        for r in regions:
            self.updates[r].add(uid)
        try:
            await self.indicators.mark(regions)
            await self.inner.write(offset, data, fua=fua)
        except BaseException:
            self._drop(uid, regions)
            raise
        view = memoryview(data).cast("B")
        copies = [(o, bytes(view[o - offset : o - offset + n])) for o, n in pieces]
        self._enqueue(_Update(uid, copies, regions))

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Tools' synchronous writes: marked, not shipped (they wait for a resync)."""
        pieces = mirrored_pieces(self.sb, offset, len(data))
        if pieces:
            regions = regions_of(self.sb, offset, len(data))
            self.indicators.mark_sync(regions)
            self.stale.update(regions)
        self.inner.write_sync(offset, data)

    async def flush(self) -> None:
        await self.inner.flush()

    async def will_write(self, ranges: list[tuple[int, int]]) -> None:
        """A write-back of many runs: their marks in one indicator write per
        block rather than one per region.  The marks are held for HINT_HOLD
        seconds for the writes to come (a reset meanwhile would have each
        write set its mark again); then the lazy reset takes those with no
        update left."""
        regions = {
            r
            for offset, length in ranges
            for o, n in mirrored_pieces(self.sb, offset, length)
            for r in regions_of(self.sb, o, n)
        }
        until = trio.current_time() + HINT_HOLD
        for r in regions:
            self._hinted[r] = until
        await self.indicators.mark(regions)
        self._resets_due.set()  # for those whose writes never come
        await self.inner.will_write(ranges)

    async def trim(self, offset: int, length: int) -> None:
        # Trimmed bytes read as anything: the region differs until a resync.
        regions = regions_of(self.sb, offset, length)
        await self.indicators.mark(regions)
        self.stale.update(regions)
        await self.inner.trim(offset, length)

    def close(self) -> None:
        self._close_secondary()
        self.inner.close()

    # -- updates ----------------------------------------------------------------
    def _enqueue(self, update: _Update) -> None:
        if not self.ship or self._closed:
            self._drop(update.uid, update.regions)
            return
        if self.queued_bytes + update.size > self.queue_bytes:
            if not self._full_logged:
                log.warning(
                    "host %d: mirror: %d MiB queued for %s: further writes are only "
                    "marked, for a resync",
                    self.node,
                    self.queued_bytes >> 20,
                    self.secondary_name,
                )
                self._full_logged = True
            self._drop(update.uid, update.regions)
            return
        try:
            self._send.send_nowait(update)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The shippers have stopped (the mount is ending): marked only.
            self._drop(update.uid, update.regions)
            return
        self.queued_bytes += update.size
        update.queued = trio.current_time()
        self._queued[update.uid] = update.queued

    def _drop(self, uid: int, regions: range) -> None:
        """The update will not be shipped: its regions stay marked."""
        self.dropped += 1
        for r in regions:
            self._forget(r, uid)
            self.stale.add(r)

    def _acknowledged(self, update: _Update) -> None:
        """The secondary holds the update and the primary still does (claims 4, 7)."""
        self.shipped += 1
        for r in update.regions:
            self._forget(r, update.uid)
            self._maybe_reset(r)

    def _maybe_reset(self, region: int) -> None:
        """An empty update set resets the indicator (claims 7-8), unless the
        region is stale or announced writes may still come."""
        if region in self.updates or region in self.stale or region in self._hinted:
            return
        self.indicators.reset(region)
        self._resets_due.set()

    def _expire_hints(self) -> None:
        now = trio.current_time()
        for r, until in list(self._hinted.items()):
            if until <= now:
                del self._hinted[r]
                self._maybe_reset(r)

    def _forget(self, region: int, uid: int) -> None:
        ids = self.updates.get(region)
        if ids is not None:
            ids.discard(uid)
            if not ids:
                del self.updates[region]

    def counters(self) -> dict[str, int]:
        """For status and /metrics: the queue, its lag, the marks."""
        oldest = next(iter(self._queued.values()), None)
        lag = 0 if oldest is None else trio.current_time() - oldest
        return {
            "mirror_queued_bytes": self.queued_bytes,
            "mirror_queued_updates": len(self._queued),
            "mirror_lag_ms": round(lag * 1000),
            "mirror_marked_regions": len(self.marked()),
            "mirror_reachable": int(self.reachable),
            "mirror_shipped": self.shipped,
            "mirror_rechecks": self.rechecks,
            "mirror_dropped": self.dropped,
            "mirror_shipments": self.shipments,
            "mirror_chases": self.chases,
            "mirror_indicator_writes": self.indicators.writes,
        }

    def marked(self) -> set[int]:
        """Regions whose indicator is set in memory."""
        return set(self.updates) | self.stale | set(self._hinted)

    # -- the background tasks -----------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ship updates and write resets until `drain` has closed the queue."""
        batches_send, batches_recv = trio.open_memory_channel[list[_Update]](0)
        async with trio.open_nursery() as n:
            n.start_soon(self._gather, self._recv, batches_send)
            for _ in range(SHIPPERS):
                n.start_soon(self._shipper, batches_recv.clone())
            await batches_recv.aclose()
            n.start_soon(self._reset_task)
            n.start_soon(self._chase_task)
            task_status.started()

    async def _gather(
        self,
        recv: trio.MemoryReceiveChannel[_Update],
        send: trio.MemorySendChannel[list[_Update]],
    ) -> None:
        """Updates into batches for the shipping tasks.  While they are all
        busy the queue fills, and the next batch is a full one."""
        async with recv, send:
            async for first in recv:
                batch = [first]
                if recv.statistics().current_buffer_used < SHIP_BATCH - 1:
                    await trio.sleep(SHIP_GATHER)  # a full batch is not waited for
                while len(batch) < SHIP_BATCH:
                    try:
                        batch.append(recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break  # EndOfChannel: drained; the loop then ends
                await send.send(batch)

    async def _shipper(self, recv: trio.MemoryReceiveChannel[list[_Update]]) -> None:
        async with recv:
            async for batch in recv:
                await self._ship_batch(batch, last_try=False)

    async def _chase_task(self) -> None:
        """Ship the updates put aside again, a little later; once drain has
        begun, for the last time."""
        while True:
            await self._put_aside.wait()
            await trio.sleep(CHASE_AFTER)
            self._put_aside = trio.Event()
            batch, self._unsettled = self._unsettled, []
            self.chases += len(batch)
            await self._ship_batch(batch, last_try=self._closed)

    async def _ship_batch(self, batch: list[_Update], *, last_try: bool) -> None:
        results = await self._ship(batch)
        for update, shipped in zip(batch, results, strict=True):
            if not shipped and not last_try:
                self._unsettled.append(update)  # still queued, its regions marked
                self._put_aside.set()
                continue
            self.queued_bytes -= update.size
            del self._queued[update.uid]
            if shipped:
                self._acknowledged(update)
            else:
                self._drop(update.uid, update.regions)

    async def _ship(self, batch: list[_Update]) -> list[bool]:
        """Put the updates on the secondary, retrying until it has them, then
        read their ranges on the primary again (step 4 of the module
        docstring): a range changed meanwhile goes again with its new
        contents; one still changing after MAX_RECHECKS fails.  Returns,
        per update, whether it made it."""
        ok = [True] * len(batch)
        tries = [0] * len(batch)
        todo = [(i, offset, data) for i, u in enumerate(batch) for offset, data in u.pieces]
        while todo:
            self.shipments += 1
            await self._put([(offset, data) for _, offset, data in todo])
            now = await trio.to_thread.run_sync(
                self._read_primary, [(offset, len(data)) for _, offset, data in todo]
            )
            again = []
            for (i, offset, data), current in zip(todo, now, strict=True):
                if current == data:
                    continue
                self.rechecks += 1
                tries[i] += 1
                if tries[i] < MAX_RECHECKS:
                    again.append((i, offset, current))
                else:
                    ok[i] = False
                    # What goes if it is shipped again: the newest we know.
                    u = batch[i]
                    u.pieces = [(o, current if o == offset else d) for o, d in u.pieces]
            todo = again
        return ok

    def _read_primary(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return [self.inner.read_sync(offset, length) for offset, length in ranges]

    async def _put(self, pieces: list[tuple[int, bytes]]) -> None:
        """Write the pieces to the secondary; retry until it has them all."""
        while True:
            sec = await self._secondary_storage()
            puts = self._puts
            failed: BaseException | None = None
            try:
                await _write_all(sec, pieces)
            except* (StorageError, OSError) as eg:
                failed = eg.exceptions[0]
            if failed is not None:
                if self._puts == puts:
                    self._lost(sec, str(failed))
                # else: another shipper got through while ours was failing:
                # the secondary is back, and this is news from before.
                await trio.sleep(self._next_retry())
                continue
            self._puts += 1
            if not self.reachable:
                log.info("host %d: mirror: %s answers again", self.node, self.secondary_name)
                self.reachable = True
            self._retry = RETRY_FIRST
            return

    async def _secondary_storage(self) -> Storage:
        async with self._opening:
            while self._secondary is None:
                try:
                    sec = await trio.to_thread.run_sync(self._open_secondary)
                except (QuietError, StorageError, OSError) as e:
                    self._unreachable(str(e))
                    await trio.sleep(self._next_retry())
                    continue
                if sec.size < self.sb.volume_blocks * self.sb.block_size:
                    sec.close()
                    self._unreachable(f"{self.secondary_name} is smaller than the volume")
                    await trio.sleep(self._next_retry())
                    continue
                self._secondary = sec
            return self._secondary

    def _open_by_name(self) -> Storage:
        return open_volume(self.secondary_name, nbd_timeout=SECONDARY_NBD_TIMEOUT)

    def _lost(self, sec: Storage, why: str) -> None:
        if sec is self._secondary:
            self._close_secondary()
        self._unreachable(why)

    def _unreachable(self, why: str) -> None:
        if self.reachable:
            log.warning(
                "host %d: mirror: secondary unreachable (%s); writes go on, their regions "
                "stay marked; retrying",
                self.node,
                why,
            )
            self.reachable = False

    def _next_retry(self) -> float:
        delay, self._retry = self._retry, min(self._retry * 2, RETRY_MOST)
        return delay

    def _close_secondary(self) -> None:
        if self._secondary is not None:
            self._secondary.close()
            self._secondary = None

    async def _reset_task(self) -> None:
        while True:
            await self._resets_due.wait()
            self._resets_due = trio.Event()
            self._expire_hints()
            if self._hinted:
                self._resets_due.set()  # come back once they expire
            await self.write_resets()
            await trio.sleep(CLEAR_EVERY)

    async def write_resets(self) -> None:
        """Make what the secondary acknowledged durable there, then write the
        indicators reset before that to the primary (claim 12: only marks of
        unacknowledged updates need to stay on storage)."""
        before = self.indicators.snapshot()
        sec = self._secondary
        if sec is None or not self.indicators.resets_pending():
            return
        try:
            await sec.flush()
        except (StorageError, OSError) as e:
            self._lost(sec, str(e))
            self._resets_due.set()  # the next one that works
            return
        try:
            await self.indicators.write_resets(before)
        except StorageError as e:
            # The primary refuses (our host is fenced, say): the marks stay
            # on storage, for a resync.
            log.warning("host %d: mirror: marks left set: %s", self.node, e)

    async def drain(self, timeout: float = DRAIN_TIMEOUT) -> None:  # noqa: ASYNC109 - a budget for shipping, the resets come after it
        """No more updates: ship what is queued while the secondary answers
        (within `timeout`), then write the resets.  What is left stays
        marked on storage."""
        self._closed = True
        self._send.close()
        hinted, self._hinted = self._hinted, {}  # no write comes any more
        for r in hinted:
            self._maybe_reset(r)
        with trio.move_on_after(timeout):
            while self.queued_bytes and self.reachable:  # noqa: ASYNC110 - counters, no event
                await trio.sleep(0.01)
        if self.queued_bytes:
            log.warning(
                "host %d: mirror: %d MiB not shipped to %s; %d regions stay marked for a resync",
                self.node,
                self.queued_bytes >> 20,
                self.secondary_name,
                len(self.marked()),
            )
        await self.write_resets()


async def _write_all(storage: Storage, pieces: list[tuple[int, bytes]]) -> None:
    if storage.pipelined:
        async with trio.open_nursery() as n:
            for offset, data in pieces:
                n.start_soon(storage.write, offset, data)
        return
    # One thread for them all: a hop per write would cost the event loop
    # more than the write-back it mirrors.
    await trio.to_thread.run_sync(_write_all_sync, storage, pieces, abandon_on_cancel=True)


def _write_all_sync(storage: Storage, pieces: list[tuple[int, bytes]]) -> None:
    for offset, data in pieces:
        storage.write_sync(offset, data)


@asynccontextmanager
async def mirrored(
    storage: Storage,
    sb: fmt.Superblock,
    node: int,
    *,
    open_secondary: Callable[[], Storage] | None = None,
    drain_timeout: float = DRAIN_TIMEOUT,
) -> AsyncIterator[Storage]:
    """`storage`, mirrored when the volume names a secondary: host `node`
    writes through what this yields."""
    if not sb.mirror_secondary:
        yield storage
        return
    m = MirrorStorage(storage, sb, node, open_secondary=open_secondary)
    log.info("host %d: mirroring to %s", node, sb.mirror_secondary)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.run)
        try:
            yield m
        finally:
            with trio.CancelScope(shield=True):
                await m.drain(drain_timeout)
            nursery.cancel_scope.cancel()
    m._close_secondary()


def refuse_own_secondary(name: str, sb: fmt.Superblock) -> None:
    """A secondary is a copy of its primary's superblock, naming itself."""
    if canonical_name(name) == sb.mirror_secondary:
        raise QuietError(
            f"{name}: is the secondary of a mirrored volume; "
            f"'sharedfs mirror promote {name}' makes it a volume of its own",
            32,
        )


def marking_only(storage: Storage, sb: fmt.Superblock) -> Storage:
    """For tools that write a mirrored volume with no host mounted (fsck -y):
    every region written is marked for the next resync."""
    if not sb.mirror_secondary:
        return storage
    return MirrorStorage(storage, sb, 0, ship=False)


# -- offline operations on a mirrored pair -------------------------------------


def read_marks(storage: Storage, sb: fmt.Superblock) -> dict[int, set[int]]:
    """Per host slot, the regions its indicator run marks."""
    return {n: Indicators(storage, sb, n).load() for n in range(sb.host_slots)}


async def clear_marks(storage: Storage, sb: fmt.Superblock) -> None:
    bs = sb.block_size
    await storage.write(sb.mirror_start * bs, bytes(bs * sb.mirror_blocks), fua=True)


async def mark_all(storage: Storage, sb: fmt.Superblock) -> None:
    """Every region in slot 0's run: an interrupted copy leaves them marked."""
    await Indicators(storage, sb, 0).mark(range(sb.region_count))


async def copy_regions(
    primary: Storage,
    secondary: Storage,
    sb: fmt.Superblock,
    regions: list[int],
    progress: Progress | None = None,
) -> None:
    """Copy `regions` from the primary to the secondary, durably."""
    for done, r in enumerate(regions, 1):
        for offset, length in region_pieces(sb, r):
            await secondary.write(offset, await primary.read(offset, length))
        if progress is not None:
            progress.update(done)
    await secondary.flush()


async def differing_regions(
    primary: Storage, secondary: Storage, sb: fmt.Superblock, progress: Progress | None = None
) -> list[int]:
    """Regions whose mirrored bytes differ (xxh3-128 of each side)."""
    out = []
    for r in range(sb.region_count):
        a, b = xxhash.xxh3_128(), xxhash.xxh3_128()
        for offset, length in region_pieces(sb, r):
            a.update(await primary.read(offset, length))
            b.update(await secondary.read(offset, length))
        if a.digest() != b.digest():
            out.append(r)
        if progress is not None:
            progress.update(r + 1)
    return out


async def write_runtime_areas(storage: Storage, sb: fmt.Superblock) -> None:
    """Empty host slots and no marks: what a secondary has instead of the
    primary's running state."""
    bs = sb.block_size
    for n in range(sb.host_slots):
        b = sb.hosts_start + n
        await storage.write(b * bs, fmt.HostSlot().pack(bs, b))
    await clear_marks(storage, sb)


async def write_superblocks(storage: Storage, sb: fmt.Superblock) -> None:
    """Backup first, then the primary, as mkfs does."""
    await storage.write(sb.backup_blockno * sb.block_size, sb.pack(sb.backup_blockno), fua=True)
    await storage.write(0, sb.pack(0), fua=True)


async def resync(
    primary: Storage, secondary: Storage, sb: fmt.Superblock, progress: Progress | None = None
) -> list[int]:
    """Copy exactly the regions some host's run marks, then clear the marks;
    returns the regions copied."""
    marks = read_marks(primary, sb)
    regions = sorted(set().union(*marks.values()))
    if progress is not None:
        progress.total = max(len(regions), 1)
    await copy_regions(primary, secondary, sb, regions, progress)
    await clear_marks(primary, sb)
    return regions


async def attach_secondary(
    primary: Storage, secondary: Storage, sb: fmt.Superblock, progress: Progress | None = None
) -> list[int]:
    """Make `secondary` (named in `sb`) the primary's mirror: a full copy."""
    # Marks first: an attach cut short leaves every region to resync.
    await mark_all(primary, sb)
    await write_superblocks(primary, sb)
    await write_runtime_areas(secondary, sb)
    return await resync(primary, secondary, sb, progress)


async def promote_secondary(secondary: Storage, sb: fmt.Superblock) -> None:
    """The secondary (whose superblock is `sb`) becomes a volume of its own."""
    sb = sb.with_secondary("")
    await write_runtime_areas(secondary, sb)
    await write_superblocks(secondary, sb)


# -- the command ---------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sharedfs mirror", description="Mirror a volume to a secondary volume.")
    p.add_argument("--debug", action="store_true")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=Parser)
    a = sub.add_parser("attach", help="name a secondary and copy the whole volume to it")
    a.add_argument("volume")
    a.add_argument("secondary", help="image file (created when missing) or NBD URI")
    a.add_argument("--force", action="store_true", help="overwrite another sharedfs volume")
    a.add_argument("--quiet", "-q", action="store_true")
    s = sub.add_parser("status", help="regions not yet on the secondary")
    s.add_argument("volume")
    s.add_argument(
        "--master",
        type=parse_address_arg,
        metavar="HOST:PORT",
        help="also each mounted host's queue and lag, from the cluster's master",
    )
    s.add_argument("--json", action="store_true")
    r = sub.add_parser("resync", help="copy the marked regions to the secondary")
    r.add_argument("volume")
    r.add_argument("--quiet", "-q", action="store_true")
    v = sub.add_parser("verify", help="compare the volume with its secondary, region by region")
    v.add_argument("volume")
    v.add_argument("--quiet", "-q", action="store_true")
    d = sub.add_parser("detach", help="stop mirroring")
    d.add_argument("volume")
    pr = sub.add_parser("promote", help="make a secondary a volume of its own")
    pr.add_argument("secondary")
    pr.add_argument("--force", action="store_true", help="it is named otherwise than at attach")
    return p


def _open(name: str, *, writable: bool = True) -> tuple[Storage, fmt.Superblock]:
    storage = open_volume(name, writable=writable)
    try:
        return storage, open_superblock(storage)
    except BaseException:
        storage.close()
        raise


def _refuse_mounted(storage: Storage, sb: fmt.Superblock, what: str) -> None:
    live = live_slots(storage, sb)
    if live:
        n = min(live)
        raise QuietError(
            f"{storage.name}: mounted by {describe_slot(n, live[n])}; unmount every host "
            f"before 'sharedfs mirror {what}'",
            32,
        )


def _secondary_of(storage: Storage, sb: fmt.Superblock) -> str:
    if not sb.mirror_secondary:
        raise QuietError(
            f"{storage.name}: has no secondary; 'sharedfs mirror attach {storage.name} "
            "SECONDARY' names one"
        )
    return sb.mirror_secondary


def _open_secondary(name: str, *, writable: bool = True) -> Storage:
    try:
        return open_volume(name, writable=writable, nbd_timeout=SECONDARY_NBD_TIMEOUT)
    except QuietError as e:
        raise QuietError(f"secondary {e}", e.exitcode) from None


def _progress(what: str, total: int, quiet: bool) -> Progress:
    p = Progress(what, total)
    p.enabled = p.enabled and not quiet
    return p


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _open_attach_target(primary: Storage, sb: fmt.Superblock, name: str, force: bool) -> Storage:
    """The secondary-to-be: created when it is a missing image file, big
    enough, not the primary, and not someone else's volume unless forced."""
    if canonical_name(name) == canonical_name(primary.name):
        raise QuietError(f"{name}: is the volume itself; a secondary must be another volume", 2)
    if not is_uri(name) and not os.path.exists(name):
        create_image(name, primary.size)
    if not is_uri(name) and os.path.samefile(name, primary.name):
        raise QuietError(f"{name}: is the volume itself; a secondary must be another volume", 2)
    sec = _open_secondary(name)
    try:
        need = sb.volume_blocks * sb.block_size
        if sec.size < need:
            raise QuietError(f"{name}: holds {sec.size} bytes; the volume needs {need}")
        other = existing_volume(sec)
        if other is not None and other.uuid != sb.uuid and not force:
            raise QuietError(
                f"{name}: holds another sharedfs volume (label {other.label!r}); "
                "use --force to overwrite it"
            )
    except BaseException:
        sec.close()
        raise
    return sec


async def attach(args: argparse.Namespace) -> None:
    primary, sb = _open(args.volume)
    try:
        _refuse_mounted(primary, sb, "attach")
        if sb.mirror_secondary:
            raise QuietError(
                f"{args.volume}: is already mirrored to {sb.mirror_secondary}; "
                f"'sharedfs mirror detach {args.volume}' first"
            )
        sec = _open_attach_target(primary, sb, args.secondary, args.force)
        try:
            sb = sb.with_secondary(canonical_name(args.secondary))
            progress = _progress("copying", sb.region_count, args.quiet)
            regions = await attach_secondary(primary, sec, sb, progress)
            progress.close()
        finally:
            sec.close()
    finally:
        primary.close()
    print(
        f"{args.volume}: mirrored to {sb.mirror_secondary}; copied {len(regions)} regions "
        f"({_mib(region_bytes(sb, regions))})"
    )


async def status(args: argparse.Namespace) -> None:
    primary, sb = _open(args.volume, writable=False)
    try:
        secondary = _secondary_of(primary, sb)
        marks = read_marks(primary, sb)
        live = sorted(live_slots(primary, sb))
    finally:
        primary.close()
    union = set().union(*marks.values())
    queues = await _host_queues(sb, args.master) if args.master else {}
    report = {
        "secondary": secondary,
        "regions": sb.region_count,
        "region_bytes": sb.mirror_region_blocks * sb.block_size,
        "marked_regions": len(union),
        "marked_bytes": region_bytes(sb, union),
        "by_host": {str(n): len(m) for n, m in marks.items() if m},
        "mounted": live,
    }
    if args.master:
        report["hosts"] = queues
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"secondary:      {secondary}")
    each = sb.mirror_region_blocks * sb.block_size >> 10
    print(
        f"marked regions: {len(union)} of {sb.region_count} "
        f"({_mib(report['marked_bytes'])}, {each} KiB each)"
    )
    for n, m in sorted(marks.items()):
        if m:
            print(f"  node {n}: {len(m)} regions")
    for node, q in sorted(queues.items()):
        print(
            f"  node {node} queue: {_mib(q['queued_bytes'])} in {q['queued_updates']} updates, "
            f"oldest {q['lag_s']:.1f} s, {q['marked_regions']} regions marked, secondary "
            + ("reachable" if q["reachable"] else "UNREACHABLE")
        )
    if live and not args.master:
        print(f"mounted by nodes {', '.join(map(str, live))}: --master shows their queues")


async def _host_queues(sb: fmt.Superblock, master: tuple[str, int]) -> dict[str, dict[str, Any]]:
    """Each mounted host's mirror counters, as it last reported them."""
    info = await ask_master(sb.cluster_key, master)
    if "partitions" in info:  # a host of a spread directory: its partitions know every host
        info = merge_spread({-1: info})
    out = {}
    for node, h in info["hosts"].items():
        c = h["counters"]
        if "mirror_queued_bytes" not in c:
            continue
        out[str(node)] = {
            "queued_bytes": c["mirror_queued_bytes"],
            "queued_updates": c["mirror_queued_updates"],
            "lag_s": c["mirror_lag_ms"] / 1000,
            "marked_regions": c["mirror_marked_regions"],
            "reachable": bool(c["mirror_reachable"]),
            "shipped": c["mirror_shipped"],
        }
    return out


@contextmanager
def _both(
    volume: str, what: str, *, writable: bool
) -> Iterator[tuple[fmt.Superblock, Storage, Storage, str]]:
    """The primary (not mounted anywhere) and its secondary, open for `what`:
    (superblock, primary, secondary, the secondary's name)."""
    primary, sb = _open(volume, writable=writable)
    try:
        secondary = _secondary_of(primary, sb)
        _refuse_mounted(primary, sb, what)
        sec = _open_secondary(secondary, writable=writable)
        try:
            yield sb, primary, sec, secondary
        finally:
            sec.close()
    finally:
        primary.close()


async def resync_command(args: argparse.Namespace) -> None:
    t0 = time.monotonic()
    with _both(args.volume, "resync", writable=True) as (sb, primary, sec, secondary):
        progress = _progress("resync", sb.region_count, args.quiet)
        regions = await resync(primary, sec, sb, progress)
        progress.close()
    print(
        f"{args.volume}: resynced {len(regions)} regions ({_mib(region_bytes(sb, regions))}) "
        f"to {secondary} in {time.monotonic() - t0:.1f} s"
    )


async def verify(args: argparse.Namespace) -> int:
    with _both(args.volume, "verify", writable=False) as (sb, primary, sec, secondary):
        progress = _progress("verifying", sb.region_count, args.quiet)
        differ = await differing_regions(primary, sec, sb, progress)
        progress.close()
    for r in differ:
        first, count = sb.region_range(r)
        print(f"region {r} (blocks {first}..{first + count - 1}) differs")
    if differ:
        print(f"{args.volume}: {len(differ)} of {sb.region_count} regions differ from {secondary}")
        return 1
    print(f"{args.volume}: all {sb.region_count} regions identical on {secondary}")
    return 0


async def detach(args: argparse.Namespace) -> None:
    primary, sb = _open(args.volume)
    try:
        secondary = _secondary_of(primary, sb)
        _refuse_mounted(primary, sb, "detach")
        await write_superblocks(primary, sb.with_secondary(""))
        await clear_marks(primary, sb)
    finally:
        primary.close()
    print(f"{args.volume}: no longer mirrored to {secondary}")


async def promote(args: argparse.Namespace) -> None:
    sec, sb = _open(args.secondary)
    try:
        if not sb.mirror_secondary:
            raise QuietError(f"{args.secondary}: is not a secondary (its volume names no mirror)")
        _refuse_mounted(sec, sb, "promote")
        if canonical_name(args.secondary) != sb.mirror_secondary and not args.force:
            raise QuietError(
                f"{args.secondary}: is the primary of {sb.mirror_secondary}, not a secondary "
                "(--force if it is that secondary under another name)"
            )
        await promote_secondary(sec, sb)
    finally:
        sec.close()
    print(f"{args.secondary}: a volume of its own now ('sharedfs fsck -n' checks it)")


_ACTIONS = {
    "attach": attach,
    "status": status,
    "resync": resync_command,
    "verify": verify,
    "detach": detach,
    "promote": promote,
}


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug)
    action = _ACTIONS[args.action]
    run_tool(lambda a: trio.run(action, a), args)


if __name__ == "__main__":
    main()
