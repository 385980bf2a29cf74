"""The buffer cache: the only way the filesystem core touches a block.

Every access names the lock mode it needs (S to read, X to change); the cache
gets that mode through the host's agent before handing the buffer out.  It owns
per-block state (mode, dirty, version), verifies metadata blocks read from
storage, seals them (header and checksum) when they are written back, and
writes dirty blocks back in runs of adjacent blocks.

Blocks this host has just allocated are *private*: no other host can reach
them until the structure pointing at them is shipped, so they need no lock
round trip.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from . import format as fmt
from .agent import Agent
from .errors import CorruptVolume
from .protocol import Mode
from .storage import Storage

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Buffer:
    """One cached block.

    Attributes:
        btype: the metadata block type, or None for a raw data block.
        version: change number of the last change (stamped into metadata
            headers when written back).
        private: allocated by this host and not yet reachable by others.
    """

    blockno: int
    data: bytearray
    btype: fmt.BlockType | None
    mode: Mode = Mode.N
    dirty: bool = False
    version: int = 0
    private: bool = False


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    storage_reads: int = 0
    storage_writes: int = 0
    blocks_written: int = 0
    evictions: int = 0
    lock_requests: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class BlockCache:
    """Attributes:
    capacity: blocks kept before clean ones are evicted (LRU).
    dirty_limit: dirty blocks that make a writer flush before going on.
    """

    def __init__(
        self,
        storage: Storage,
        block_size: int,
        agent: Agent,
        *,
        capacity: int = 65536,
    ) -> None:
        self.storage = storage
        self.bs = block_size
        self.agent = agent
        self.capacity = max(capacity, 64)
        self.dirty_limit = max(self.capacity // 2, 32)
        self._bufs: OrderedDict[int, Buffer] = OrderedDict()
        self._dirty: set[int] = set()
        self._inflight: set[int] = set()
        # One write-back at a time, so two writes of one block never race.
        self._write_lock = trio.Lock()
        self.scn = 0
        self.stats = CacheStats()

    # -- getting blocks ------------------------------------------------------
    async def get(self, blockno: int, mode: Mode, btype: fmt.BlockType | None = None) -> Buffer:
        """The block in at least `mode`, read from storage if not cached."""
        buf = self._bufs.get(blockno)
        if buf is not None and buf.mode >= mode and buf.btype == btype:
            # The common case: cached and held; no lock request, no I/O.
            self.stats.hits += 1
            self._bufs.move_to_end(blockno)
            return buf
        return (await self.get_many([blockno], mode, btype))[0]

    async def get_many(
        self, blocknos: list[int], mode: Mode, btype: fmt.BlockType | None = None
    ) -> list[Buffer]:
        """Several blocks at once: one lock request, adjacent misses in one read."""
        need_lock = [b for b in blocknos if self._held(b) < mode]
        if need_lock:
            self.stats.lock_requests += 1
            await self.agent.acquire_blocks(need_lock, mode)
        missing = sorted({b for b in blocknos if b not in self._bufs})
        self.stats.hits += len(blocknos) - len(missing)
        self.stats.misses += len(missing)
        for start, count in _runs(missing):
            data = await self.storage.read(start * self.bs, count * self.bs)
            self.stats.storage_reads += 1
            for i in range(count):
                b = start + i
                if b in self._bufs:  # another task read it meanwhile
                    continue
                block = bytearray(data[i * self.bs : (i + 1) * self.bs])
                if btype is not None:
                    fmt.verify(block, btype, b)
                self._insert(Buffer(b, block, btype))
        out = []
        for b in blocknos:
            buf = self._bufs[b]
            if btype is not None and buf.btype != btype:
                raise CorruptVolume(f"block {b}: used as {btype.name}, cached as {buf.btype}")
            buf.mode = max(buf.mode, mode)
            self._bufs.move_to_end(b)
            out.append(buf)
        return out

    def new(self, blockno: int, btype: fmt.BlockType | None = None) -> Buffer:
        """A freshly allocated block: zeroed, private, held in X, no storage read."""
        old = self._bufs.pop(blockno, None)
        if old is not None:
            self._dirty.discard(blockno)
        buf = Buffer(blockno, bytearray(self.bs), btype, Mode.X, private=True)
        self._insert(buf)
        self.mark_dirty(buf)
        return buf

    async def overwrite(self, blockno: int) -> Buffer:
        """A data block the caller will overwrite whole: X, but no storage read."""
        if blockno in self._bufs:
            return await self.get(blockno, Mode.X)
        if self._held(blockno) < Mode.X:
            self.stats.lock_requests += 1
            await self.agent.acquire_blocks([blockno], Mode.X)
        buf = Buffer(blockno, bytearray(self.bs), None, Mode.X)
        self._insert(buf)
        return buf

    def _held(self, blockno: int) -> Mode:
        buf = self._bufs.get(blockno)
        return buf.mode if buf is not None else Mode.N

    def _insert(self, buf: Buffer) -> None:
        self._bufs[buf.blockno] = buf

    # -- changing blocks -----------------------------------------------------
    def mark_dirty(self, buf: Buffer) -> None:
        assert buf.mode is Mode.X, f"block {buf.blockno} changed without an X lock"
        self.scn += 1
        buf.version = self.scn
        if not buf.dirty:
            buf.dirty = True
            self._dirty.add(buf.blockno)

    def discard(self, blockno: int) -> None:
        """Forget a block that was freed: its contents never need writing."""
        buf = self._bufs.pop(blockno, None)
        if buf is not None:
            self._dirty.discard(blockno)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    # -- writing back ----------------------------------------------------------
    async def flush(self, blocknos: Iterable[int] | None = None) -> int:
        """Write dirty blocks (all, or those named) to storage; return how many.

        Operations go on meanwhile: a block changed during its write is dirty
        again afterwards, and a block freed meanwhile is simply skipped.
        """
        async with self._write_lock:
            todo = sorted(self._dirty if blocknos is None else set(blocknos) & self._dirty)
            written = 0
            for start, count in _runs(todo):
                # Re-check: earlier writes awaited, and blocks may have gone.
                still = [b for b in range(start, start + count) if b in self._dirty]
                for s, n in _runs(still):
                    await self._write_run(s, n)
                    written += n
            return written

    async def _write_run(self, start: int, count: int) -> None:
        chunk = bytearray()
        for b in range(start, start + count):
            buf = self._bufs[b]
            if buf.btype is not None:
                fmt.seal(buf.data, buf.btype, b, buf.version)
            chunk += buf.data
            # Clean before the write: a change during it re-dirties.
            buf.dirty = False
            buf.private = False
            self._dirty.discard(b)
            self._inflight.add(b)
        try:
            await self.storage.write(start * self.bs, chunk)
        except BaseException:
            for b in range(start, start + count):
                if b in self._bufs:
                    self._bufs[b].dirty = True
                    self._dirty.add(b)
            raise
        finally:
            self._inflight.difference_update(range(start, start + count))
        self.stats.storage_writes += 1
        self.stats.blocks_written += count

    async def sync(self) -> None:
        """Everything dirty on storage, and storage flushed."""
        await self.flush()
        await self.storage.flush()

    async def trim(self) -> None:
        """Called between operations, when no buffer is in use: write back if
        too much is dirty, and evict cold clean blocks past the capacity."""
        if len(self._dirty) >= self.dirty_limit:
            await self.flush()
        if len(self._bufs) <= self.capacity:
            return
        # Evict clean blocks from the cold end; write back dirty ones first.
        # A block whose write is still in flight stays: storage does not
        # have its contents yet.
        excess = len(self._bufs) - self.capacity
        if len(self._dirty) > len(self._bufs) - excess:
            await self.flush()
        victims = []
        for b, buf in self._bufs.items():
            if len(victims) >= excess:
                break
            if not buf.dirty and b not in self._inflight:
                victims.append(b)
        for b in victims:
            del self._bufs[b]
            self.agent.release_block(b)
        self.stats.evictions += len(victims)

    def drop_all(self) -> None:
        """Forget every clean block and release its lock (unmount)."""
        for b in [b for b, buf in self._bufs.items() if not buf.dirty]:
            del self._bufs[b]
            self.agent.release_block(b)


def _runs(sorted_blocks: list[int]) -> list[tuple[int, int]]:
    """[3,4,5,9] -> [(3,3),(9,1)]: runs of adjacent block numbers."""
    runs: list[tuple[int, int]] = []
    for b in sorted_blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
