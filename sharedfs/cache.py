"""The buffer cache: the only way the filesystem core touches a block.

Every access names the lock mode it needs (S to read, X to change); the cache
gets that mode through the host's agent before handing the buffer out.  It owns
per-block state (mode, dirty, version, local or global role), the past images
(PIs) of dirty versions this host shipped, verifies metadata blocks read from
storage, seals them (header and checksum) when they are written back, and
writes dirty blocks back in runs of adjacent blocks.

Blocks this host has just allocated are *private*: no other host can reach
them until the structure pointing at them is shipped, so they need no lock
round trip.

Operations: the core brackets each filesystem operation with begin_op() and
end_op().  Blocks the operation touched are pinned: a ping for one waits until
the operation ends, unless the operation is itself waiting for a lock and the
asking operation is older; then the cache undoes the operation's changes
(it kept before-images) and the core runs it again (OpRetry).  That breaks
every cycle of hosts waiting on each other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from . import format as fmt
from . import protocol as p
from .agent import ClusterAgent, LocalAgent, OpRetry, Pending
from .errors import CorruptVolume
from .pastimages import PastImage, PastImages
from .protocol import Mode
from .storage import Storage
from .storage.fence import Fence

if TYPE_CHECKING:
    from .spread import SpreadAgent

log = logging.getLogger(__name__)

#: An operation that waits for a lock this long while another host waits for
#: a block it holds backs off, whatever its age: it may be part of a cycle.
DEADLOCK_TIMEOUT = 0.02


@dataclass(eq=False, slots=True)
class Buffer:
    """One cached block.

    Attributes:
        btype: the metadata block type, or None for a raw data block.
        version: change number (SCN) of the last change (stamped into
            metadata headers when written back).
        role_global: a dirty version of this block has been on another host
            (it came from one, or went to one): writing it goes through the
            master.  Local: this host may write it alone (claims 28-31).
        private: allocated by this host and not yet reachable by others.
        owner: the inode whose kernel caches depend on this block (data,
            indirect and directory blocks), for invalidation.
        first_dirty: the SCN at which it last went from clean to dirty here
            (the checkpoint bin a past image of it goes into).
        boundary: the version its sender was writing to storage when it
            arrived (claims 41-45).
        leaving: being shipped to another host: it may be read, not changed.
        going: leaving for good (no copy stays here): not even read, or a
            reply made from it could reach the kernel after its caches
            were dropped, and stay there stale.
        copy: a read copy of a block whose primary cache is another host's
            (--peer-reads): evicted before the blocks we are primary for,
            so that the cluster keeps one copy of more blocks (seed 001).
        used: when an operation last had it (time.monotonic): its age is its
            cache retention value, which hosts compare (BlockCache.spare).
        offered: evicted, and offered to another host (protocol.Handoff):
            kept, held, until the master pings for it or declines.
        last_chance: evicted without an offer: it came here by a handoff,
            or an offer of it was declined, and nobody has used it since
            (a block does not go round the cluster for ever).
    """

    blockno: int
    data: bytearray
    btype: fmt.BlockType | None
    mode: Mode = Mode.N
    dirty: bool = False
    version: int = 0
    role_global: bool = False
    private: bool = False
    owner: int = 0
    first_dirty: int = 0
    boundary: int = 0
    leaving: bool = False
    going: bool = False
    copy: bool = False
    used: float = 0.0
    offered: bool = False
    last_chance: bool = False


@dataclass(slots=True)
class Shipped:
    """What give_up() hands the agent to send."""

    data: bytes
    version: int
    dirty: bool
    writing: int
    pi: int
    via_storage: bool
    btype: int = 0
    was_dirty: bool = False  # our copy was not on storage when it left
    cached: bool = True  # False: we had let it go already (its Release is on its way)
    age: float = 0.0  # seconds since an operation here last used it


@dataclass(slots=True)
class _Snapshot:
    data: bytes
    mode: Mode
    dirty: bool
    version: int
    role_global: bool
    btype: fmt.BlockType | None
    private: bool


def _snapshot(buf: Buffer) -> _Snapshot:
    return _Snapshot(
        bytes(buf.data), buf.mode, buf.dirty, buf.version, buf.role_global, buf.btype, buf.private
    )


@dataclass(eq=False)
class _Op:
    start: float
    task: trio.lowlevel.Task
    pinned: set[int] = field(default_factory=set)
    exclusive: set[int] = field(default_factory=set)  # asked for in X
    undo: dict[int, _Snapshot | None] = field(default_factory=dict)
    waiting: Pending | None = None
    abort: trio.Event = field(default_factory=trio.Event)
    doomed: bool = False
    discarded: dict[int, bool] = field(default_factory=dict)  # freed here: was it private?
    revoked: set[int] = field(default_factory=set)  # metadata blocks freed here


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    storage_reads: int = 0
    storage_writes: int = 0
    blocks_written: int = 0
    evictions: int = 0
    lock_requests: int = 0
    bin_writes: int = 0
    retries: int = 0
    transfers_in: int = 0
    copies_evicted: int = 0  # of those evictions, copies (Buffer.copy)
    handed_off: int = 0  # evicted blocks offered to another host (Handoff)
    handoffs_declined: int = 0  # ... and evicted here after all
    handed_in: int = 0  # blocks another host handed us


Invalidate = Callable[[Buffer], Awaitable[None]]
#: Tells the master which (block, version)s are on storage now.
Landed = Callable[[list[tuple[int, int]]], Awaitable[None]]


async def _no_wal(blocks: Iterable[int]) -> None:
    pass


async def _no_invalidation(buf: Buffer) -> None:
    pass


class BlockCache:
    """Attributes:
    capacity: blocks kept before clean ones are evicted (LRU).
    dirty_limit: dirty blocks that make a writer flush before going on.
    scn: this host's change-number clock (Lamport: moves to the highest seen).
    on_give_up: called before a block leaves this host, to drop what the
        kernel cached from it (fuse_ops sets it).
    """

    def __init__(
        self,
        storage: Storage,
        block_size: int,
        agent: LocalAgent | ClusterAgent | SpreadAgent,
        *,
        capacity: int = 65536,
        coherence: str = "fusion",
        gate: Fence | None = None,
    ) -> None:
        self.storage = storage
        #: What fence() closes: `storage` itself, or a Fence below it (under
        #: a mirror, so that the mirror's own writes stop too).
        self.gate = gate if gate is not None else storage if isinstance(storage, Fence) else None
        self.bs = block_size
        self.agent = agent
        self._host = agent.host  # for log lines
        self.coherence = coherence
        self.capacity = max(capacity, 64)
        self.dirty_limit = max(self.capacity // 2, 32)
        self._bufs: OrderedDict[int, Buffer] = OrderedDict()
        #: The copies among them (Buffer.copy), coldest first; may name
        #: blocks gone since, or no longer copies (skipped, then dropped).
        self._copies: OrderedDict[int, None] = OrderedDict()
        #: Evicted blocks offered to another host, not yet gone (Buffer.offered).
        self.offered: set[int] = set()
        #: Set when a handed block takes us past the capacity: trim soon,
        #: idle or not (FileSystem.trim_when_crowded).
        self.crowded = trio.Event()
        self._dirty: set[int] = set()
        self._inflight: dict[int, int] = {}  # block -> version being written
        self._shipped_while_writing: dict[int, int] = {}
        self.pis = PastImages()
        self._private: set[int] = set()  # allocated here, unknown to the master
        self._registering = trio.Lock()
        # One write-back at a time, so two writes of one block never race.
        self._write_lock = trio.Lock()
        self.scn = 0
        self.stats = CacheStats()
        self.on_give_up: Invalidate = _no_invalidation
        # The journal's: write-ahead (log records before the blocks they
        # describe), and the LLOL's block with the append semaphore.
        self.wal: Callable[[Iterable[int]], Awaitable[None]] = _no_wal
        self.logged: Callable[[Iterable[int]], bool] = lambda blocks: True
        self.llol_block = -1
        self.append_lock: trio.Lock | None = None
        self.log_counters: Callable[[], dict[str, int]] = dict
        self._op: _Op | None = None
        self._op_changed = trio.Event()
        # Blocks recoveries took in X to rebuild, and by how many rounds
        # (they overlap): pings for them wait until every rebuilt copy is in.
        self._rebuild_held: Counter[int] = Counter()
        self._rebuild_released = trio.Event()
        if not isinstance(agent, LocalAgent):
            agent.cache = self
            if self.gate is not None:
                self.gate.on_trip = agent.withdraw

    def counters(self) -> dict[str, int]:
        out = {f"cache_{k}": getattr(self.stats, k) for k in CacheStats.__slots__}  # type: ignore[attr-defined]
        out["cache_blocks"] = len(self._bufs)
        out["cache_dirty"] = len(self._dirty)
        out["cache_pis"] = self.pis.count()
        out["cache_pis_kept"] = self.pis.kept
        out["cache_pis_merged"] = self.pis.merged
        out["cache_pis_discarded"] = self.pis.discarded
        out.update(self.log_counters())
        out.update(self.storage.counters())
        return out

    def describe(self) -> list[str]:
        """The running operation, blocks on their way out, held for a
        rebuild or being written, and the log's locks (a state dump)."""
        op = self._op
        out = []
        if op is not None:
            out.append(
                f"operation since {op.start:.3f}: pinned {sorted(op.pinned)} waiting "
                f"{sorted(op.waiting.blocks) if op.waiting else None} abort {op.abort.is_set()}"
            )
        leaving = sorted(b for b, buf in self._bufs.items() if buf.leaving)
        out.append(
            f"leaving {leaving} rebuild-held {sorted(self._rebuild_held)} "
            f"writing {sorted(self._inflight)} write lock {self._write_lock.locked()} "
            f"append lock {self.append_lock.locked() if self.append_lock else None} "
            f"dirty {len(self._dirty)} private {len(self._private)}"
        )
        return out

    def fence(self, reason: str) -> None:
        """This host lost its lease: nothing more of ours reaches storage
        (a cluster host's storage is always behind a Fence)."""
        assert self.gate is not None
        self.gate.close_gate(reason)

    @property
    def fenced(self) -> str:
        """Why this host may no longer write ("" while it may)."""
        return self.gate.reason if self.gate is not None else ""

    def see_scn(self, scn: int) -> None:
        if scn > self.scn:
            self.scn = scn

    # -- operations ------------------------------------------------------------
    def begin_op(self, start: float | None = None) -> None:
        """An operation begins; a retried one keeps its first start time, so
        it ages and eventually wins every conflict."""
        self._op = _Op(time.time() if start is None else start, trio.lowlevel.current_task())

    def check_op(self) -> None:
        """Raise OpRetry if the running operation read a block that has left."""
        if self._op is not None and self._op.doomed:
            raise OpRetry

    @property
    def op_start(self) -> float | None:
        return self._op.start if self._op is not None else None

    def op_changes(self) -> list[tuple[int, int, int, bytes | None, bytearray]]:
        """What the running operation changed in metadata blocks, for the
        log: (block, type, version, contents before or None if it was
        allocated, contents now)."""
        op = self._op
        out: list[tuple[int, int, int, bytes | None, bytearray]] = []
        if op is None:
            return out
        for b, snap in op.undo.items():
            buf = self._bufs.get(b)
            if buf is None or buf.btype is None or not buf.dirty:
                continue
            if snap is not None and snap.version == buf.version:
                continue  # read in X, not changed
            before = snap.data if snap is not None and snap.btype == buf.btype else None
            out.append((b, int(buf.btype), buf.version, before, buf.data))
        return out

    def revoke(self, blocknos: Iterable[int]) -> None:
        """The running operation frees these metadata blocks."""
        if self._op is not None:
            self._op.revoked.update(blocknos)

    def op_freed(self) -> list[int]:
        """Metadata blocks the running operation freed and did not take
        again: the log revokes their records."""
        return sorted(self._op.revoked) if self._op is not None else []

    def end_op(self) -> None:
        self._op = None
        self._changed()

    def abort_op(self) -> None:
        """Put every block the operation changed back as it was."""
        op = self._op
        if op is None:
            return
        for b, snap in op.undo.items():
            self._dirty.discard(b)
            if snap is None:
                self._bufs.pop(b, None)
                self._private.discard(b)
                continue
            buf = self._bufs.get(b)
            if buf is None and b in op.discarded:
                # Freed by the operation: undone, the block is in use again,
                # and its contents exist nowhere else.
                buf = Buffer(b, bytearray(snap.data), snap.btype, snap.mode)
                buf.private = op.discarded[b]
                if buf.private:
                    self._private.add(b)
                self._insert(buf)
            if buf is None:
                continue  # it left meanwhile (doomed op): the lock is gone with it
            buf.data[:] = snap.data
            buf.mode, buf.dirty, buf.version = snap.mode, snap.dirty, snap.version
            buf.role_global, buf.btype = snap.role_global, snap.btype
            if buf.dirty:
                self._dirty.add(b)
            if buf.private and not snap.private:
                # Allocated (new()) over a copy we held, the allocation now
                # undone: that copy again, not ours to register.  Left
                # private, a later registration would take X with it and
                # keep its stale contents over the next allocator's.
                buf.private = False
                self._private.discard(b)
        self.stats.retries += 1
        self.end_op()

    def _changed(self) -> None:
        ev, self._op_changed = self._op_changed, trio.Event()
        ev.set()

    def _touch(self, buf: Buffer, mode: Mode) -> None:
        """Pin a block to the running operation; keep a before-image of
        blocks it may change."""
        op = self._op
        if op is None:
            return
        op.pinned.add(buf.blockno)
        if mode is Mode.X and buf.blockno not in op.undo:
            op.undo[buf.blockno] = _snapshot(buf)

    async def wait_for_grant(self, pend: Pending) -> None:
        """Wait for a lock request, unless the operation is asked to back off."""
        op = self._op
        if op is None or op.task is not trio.lowlevel.current_task():
            await pend.done.wait()
            return
        op.waiting = pend
        self._changed()
        try:
            async with trio.open_nursery() as n:

                async def watch_abort() -> None:
                    await op.abort.wait()
                    n.cancel_scope.cancel()

                n.start_soon(watch_abort)
                await pend.done.wait()
                n.cancel_scope.cancel()
        finally:
            op.waiting = None
        if not pend.done.is_set():
            raise OpRetry

    # -- getting blocks ------------------------------------------------------
    async def get(
        self, blockno: int, mode: Mode, btype: fmt.BlockType | None = None, *, pin: bool = True
    ) -> Buffer:
        """The block in at least `mode`, read from storage if not cached.
        pin=False: not part of the running operation (the log's appender)."""
        buf = self._bufs.get(blockno)
        if buf is not None and buf.mode >= mode and buf.btype == btype and not buf.leaving:
            # The common case: cached and held; no lock request, no I/O.
            self.stats.hits += 1
            self._bufs.move_to_end(blockno)
            if buf.copy:
                self._copies.move_to_end(blockno)
            buf.used, buf.last_chance = time.monotonic(), False
            if pin:
                self._touch(buf, mode)
            return buf
        return (await self.get_many([blockno], mode, btype, pin=pin))[0]

    async def get_many(
        self,
        blocknos: list[int],
        mode: Mode,
        btype: fmt.BlockType | None = None,
        *,
        pin: bool = True,
    ) -> list[Buffer]:
        """Several blocks at once: one lock request, adjacent misses in one read."""
        async with self._locked(blocknos, mode, btype, pin=pin):
            await self._read_missing(blocknos, mode, btype)
            return self._hand_out(blocknos, mode, btype, pin)

    def _hand_out(
        self, blocknos: list[int], mode: Mode, btype: fmt.BlockType | None, pin: bool
    ) -> list[Buffer]:
        out = []
        now = time.monotonic()
        for b in blocknos:
            buf = self._bufs[b]
            if btype is not None and buf.btype != btype:
                raise CorruptVolume(f"block {b}: used as {btype.name}, cached as {buf.btype}")
            buf.mode = max(buf.mode, mode)
            self._bufs.move_to_end(b)
            if buf.copy:
                self._copies.move_to_end(b)
            buf.used, buf.last_chance = now, False
            if pin:
                self._touch(buf, mode)
            out.append(buf)
        return out

    async def _read_missing(
        self, blocknos: list[int], mode: Mode, btype: fmt.BlockType | None
    ) -> None:
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
                buf = Buffer(b, block, btype, max(mode, Mode.S))
                if btype is not None:
                    # Our next change must be newer than what storage has
                    # (log replay compares versions), whoever wrote it.
                    buf.version = fmt.verify(block, btype, b).version
                    self.see_scn(buf.version)
                self._insert(buf)
                log.debug("host %d: block %d read from storage, v%d", self._host, b, buf.version)

    @contextlib.asynccontextmanager
    async def _locked(
        self,
        blocknos: list[int],
        mode: Mode,
        btype: fmt.BlockType | None = None,
        *,
        pin: bool = True,
        recovery: bool = False,
    ) -> AsyncIterator[None]:
        """Hold `mode` on these blocks: pin them to the operation, then ask
        the master (one request) for those we do not hold well enough.
        Inside, read what is missing: no ping takes them meanwhile."""
        while any(
            (b := self._bufs.get(n)) is not None and (b.going or b.leaving and mode is Mode.X)
            for n in blocknos
        ):
            if pin:
                raise OpRetry  # being shipped: come back once it has gone
            await trio.sleep(0.001)  # no operation to undo: just wait
        op = self._op if pin else None
        if op is not None:
            # Pinned before we ask: a ping that comes between the grant and
            # the storage read must wait for us, not ship what we lack.
            op.pinned.update(blocknos)
            if mode is Mode.X:
                op.exclusive.update(blocknos)
        need_lock = [b for b in blocknos if self._held(b) < mode]
        if not need_lock:
            yield
            return
        self.stats.lock_requests += 1
        # Outside operations (the log's appender) nothing can be undone:
        # such a request counts as the oldest, and always wins.
        op_start = op.start if op is not None else (time.time() if pin else 0.0)
        async with self.agent.taking(need_lock, mode, op_start, recovery) as arrived:
            self.install(arrived, need_lock, mode, btype)
            yield

    def install(
        self,
        arrived: dict[int, p.Transfer],
        blocks: Iterable[int],
        mode: Mode,
        btype: fmt.BlockType | None = None,
    ) -> None:
        """Granted blocks: copies shipped by other hosts replace ours; the
        rest keep our copy or will be read from storage."""
        for b in blocks:
            t = arrived.get(b)
            buf = self._bufs.get(b)
            if buf is not None and buf.private:
                pass  # registering a block we allocated: our copy is the one
            elif t is not None and not t.via_storage:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "host %d: block %d arrived, v%d%s (had %s)",
                        self._host,
                        b,
                        t.version,
                        " dirty" if t.dirty else "",
                        _held_copy(buf),
                    )
                self.stats.transfers_in += 1
                tbtype = fmt.BlockType(t.btype) if t.btype else None
                if buf is None:
                    buf = Buffer(b, bytearray(t.data), tbtype)
                    self._insert(buf)
                else:
                    buf.data[:] = t.data
                    buf.btype = tbtype
                buf.version = t.version
                self.see_scn(t.version)
                buf.boundary = t.writing
                buf.copy = t.copy
                if t.copy:
                    self._copies[b] = None
                if t.dirty or t.writing:
                    # A dirty version from another host, or one its sender
                    # is still writing: writing it needs the master, which
                    # knows of the past images and of that write (claims
                    # 33, 37, 40).
                    buf.role_global = True
                if t.dirty:
                    buf.dirty = True
                    buf.first_dirty = self.scn
                    self._dirty.add(b)
            elif t is not None and buf is not None and not buf.dirty:
                self._bufs.pop(b)  # disk coherence: read the new copy from storage
                continue
            if buf is not None:
                buf.mode = max(buf.mode, mode)
                if mode is Mode.X:
                    buf.copy = False  # nobody else holds it now

    def take_handoff(self, t: p.Transfer) -> bool:
        """A block another host evicted and the master moved here (Handoff):
        held in S, clean, ours as primary; False if no copy came with it.
        It goes in as used when its giver last used it, but at the warm
        end (a dict keeps no order in between)."""
        if t.via_storage:
            return False
        self.stats.handed_in += 1
        fresh = t.block not in self._bufs
        self.install({t.block: t}, [t.block], Mode(t.mode))
        if fresh:
            buf = self._bufs[t.block]
            buf.used, buf.last_chance = time.monotonic() - t.age, True
        if len(self._bufs) > self.capacity:
            self.crowded.set()
        return True

    def declined(self, blocks: Iterable[int]) -> None:
        """The master kept these offered blocks here: the next trim evicts
        them, offering them to nobody."""
        for b in blocks:
            buf = self._bufs.get(b)
            if buf is not None and buf.offered:
                buf.offered, buf.last_chance = False, True
                self.stats.handoffs_declined += 1
            self.offered.discard(b)

    def _offers(self) -> int:
        """How many blocks are offered (forgetting those gone meanwhile:
        freed, or dropped at unmount)."""
        self.offered.difference_update(
            [b for b in self.offered if not getattr(self._bufs.get(b), "offered", False)]
        )
        return len(self.offered)

    def spare(self) -> float:
        """This host's Stats.spare: how long ago the block we would evict
        next was used (protocol.SPARE if it is worth nothing to the
        cluster: we have room, or it is a copy)."""
        if len(self._bufs) - self._offers() < self.capacity:
            return p.SPARE
        victims = self._victims(1)
        if not victims:
            return 0.0  # nothing we can evict: no room for anything
        buf = self._bufs[victims[0]]
        if buf.copy:
            return p.SPARE
        return max(0.0, time.monotonic() - buf.used)

    def made_primary(self, blocks: Iterable[int]) -> None:
        """The master made our copies of these blocks their primary (the
        primary host let its copy go): kept like our own from here on."""
        for b in blocks:
            buf = self._bufs.get(b)
            if buf is not None:
                buf.copy = False
            self._copies.pop(b, None)

    def adopt(
        self, images: list[tuple[int, fmt.BlockType | None, int, bytearray]]
    ) -> list[tuple[int, int]]:
        """Blocks rebuilt for a dead host (journal recovery), which the master
        has us hold in X: (block, type, version, contents).  They are dirty,
        and written through the master (survivors may keep past images of
        them).  A copy that reached us meanwhile, as new, stays: those are
        returned, (block, the version rebuilt: storage must reach it before
        the dead host's records may go)."""
        kept = []
        for b, btype, version, data in images:
            self.see_scn(version)
            buf = self._bufs.get(b)
            log.debug(
                "host %d: block %d rebuilt, v%d (had %s)", self._host, b, version, _held_copy(buf)
            )
            if buf is not None and buf.mode is Mode.X and buf.version >= version:
                kept.append((b, version))
                continue
            if buf is None:
                buf = Buffer(b, data, btype, Mode.X)
                self._insert(buf)
            else:
                buf.data[:] = data
                buf.btype, buf.mode = btype, Mode.X
            buf.version = version
            buf.role_global = True
            if not buf.dirty:
                buf.dirty = True
                buf.first_dirty = self.scn
                self._dirty.add(b)
        return kept

    def new(self, blockno: int, btype: fmt.BlockType | None = None) -> Buffer:
        """A freshly allocated block: zeroed, private, held in X, no storage read."""
        old = self._bufs.get(blockno)
        if old is not None and old.leaving:
            raise OpRetry
        if self._op is not None and blockno not in self._op.undo:
            self._op.undo[blockno] = None if old is None else _snapshot(old)
        if old is not None:
            self._bufs.pop(blockno)
            self._dirty.discard(blockno)
        if self._op is not None:
            self._op.revoked.discard(blockno)  # in use again
        buf = Buffer(blockno, bytearray(self.bs), btype, Mode.X, private=True)
        self._insert(buf)
        self._private.add(blockno)
        if self._op is not None:
            self._op.pinned.add(blockno)
        self.mark_dirty(buf)
        return buf

    async def overwrite(self, blockno: int) -> Buffer:
        """A data block the caller will overwrite whole: X, but no storage read."""
        if blockno in self._bufs:
            return await self.get(blockno, Mode.X)
        async with self._locked([blockno], Mode.X):
            if blockno not in self._bufs:
                buf = Buffer(blockno, bytearray(self.bs), None, Mode.X)
                if self._op is not None:
                    self._op.undo.setdefault(blockno, None)
                self._insert(buf)
                self._touch(buf, Mode.X)
                return buf
        return await self.get(blockno, Mode.X)  # another host shipped its copy

    async def hold_written(self, pages: list[tuple[int, bytearray]]) -> None:
        """X on raw blocks we are about to write ourselves, our copy cached
        with the lock (the per-page-lock baseline of the log)."""
        async with self._locked([b for b, _ in pages], Mode.X, pin=False):
            for b, data in pages:
                buf = self._bufs.get(b)
                if buf is None:
                    self._insert(Buffer(b, bytearray(data), None, Mode.X))
                else:
                    buf.data[:] = data

    async def take_for_rebuild(self, blocknos: list[int]) -> None:
        """X on these blocks for a recovery, without reading them (those
        another host shipped are cached, the rest are not), held until
        release_rebuild_hold(): a ping that took one away before the
        rebuild is in the cache would leave us rebuilding a block another
        host now holds."""
        async with self._locked(blocknos, Mode.X, pin=False, recovery=True):
            self._rebuild_held.update(blocknos)

    def release_rebuild_hold(self, blocknos: Iterable[int]) -> None:
        self._rebuild_held.subtract(blocknos)
        self._rebuild_held = +self._rebuild_held  # drop what no round holds
        ev, self._rebuild_released = self._rebuild_released, trio.Event()
        ev.set()

    def holdings(self) -> dict[int, tuple[int, int, int, bool]]:
        """Block -> (block, mode, version, dirty) of every copy we hold a
        lock on (protocol.Join.held), for a master that rebuilds its
        directory.  A copy being written is not on storage yet: dirty.
        Blocks held for a rebuild are not read yet."""
        out = {}
        for b, buf in self._bufs.items():
            if buf.mode is Mode.N or buf.private:
                continue  # a private block is unknown to any master
            out[b] = (b, int(buf.mode), buf.version, buf.dirty or b in self._inflight)
        for b in self._rebuild_held:
            out.setdefault(b, (b, int(Mode.X), 0, False))
        return out

    def holding(self, blockno: int, mode: Mode) -> Buffer | None:
        """Our copy of `blockno` if we hold it in `mode` and it is not leaving."""
        buf = self._bufs.get(blockno)
        if buf is None or buf.mode < mode or buf.leaving:
            return None
        return buf

    def _held(self, blockno: int) -> Mode:
        buf = self._bufs.get(blockno)
        return buf.mode if buf is not None else Mode.N

    def _insert(self, buf: Buffer) -> None:
        if not buf.used:
            buf.used = time.monotonic()
        self._bufs[buf.blockno] = buf

    # -- changing blocks -----------------------------------------------------
    def mark_dirty(self, buf: Buffer) -> None:
        assert buf.mode is Mode.X, f"block {buf.blockno} changed without an X lock"
        self.scn += 1
        buf.version = self.scn
        if not buf.dirty:
            buf.dirty = True
            buf.first_dirty = self.scn
            self._dirty.add(buf.blockno)

    def discard(self, blockno: int) -> None:
        """Forget a block that was freed: its contents never need writing."""
        buf = self._bufs.get(blockno)
        if buf is not None and buf.leaving:
            raise OpRetry
        if buf is None or buf.role_global:
            # Other hosts may keep past images of it: let the copy be written
            # through the master like any other rather than vanish.
            return
        if self._op is not None:
            # Pinned too: an undo must not bring back a block that left.
            self._op.pinned.add(blockno)
            self._op.undo.setdefault(blockno, _snapshot(buf))
        # The lock stays ours: the block may come back to us through the
        # allocator, private, before a Release could reach the master.
        if self._op is not None:
            self._op.discarded.setdefault(blockno, buf.private)
        self._bufs.pop(blockno)
        self._dirty.discard(blockno)
        self._private.discard(blockno)

    @property
    def dirty_count(self) -> int:
        return len(self._dirty)

    def dirty_data(self) -> list[int]:
        """Dirty blocks that are file data (not logged: fsync writes them)."""
        return [b for b in self._dirty if self._bufs[b].btype is None]

    def oldest_unwritten(self) -> int | None:
        """The first-dirty SCN of the oldest change of ours not on storage
        (in a dirty block or a past image), or None if there is none."""
        # The log's header block is no change of ours: it is not logged.  A
        # block being written is clean already, but not yet on storage.
        unwritten = self._dirty | {b for b in self._inflight if b in self._bufs}
        dirty = [self._bufs[b].first_dirty for b in unwritten if b != self.llol_block]
        pi = self.pis.oldest_since(skip=self.llol_block)
        marks = dirty + ([pi] if pi is not None else [])
        return min(marks) if marks else None

    # -- writing back ----------------------------------------------------------
    async def flush(self, blocknos: Iterable[int] | None = None) -> int:
        """Write dirty blocks (all, or those named) to storage; return how many.

        Local-role blocks are written straight away; global-role ones through
        a write request to the master (claims 28-31).  Operations go on
        meanwhile: a block changed during its write is dirty again afterwards,
        and a block freed meanwhile is simply skipped.
        """
        todo = sorted(self._dirty if blocknos is None else set(blocknos) & self._dirty)
        local = [b for b in todo if not self._bufs[b].role_global]
        glob = [(b, self._bufs[b].version) for b in todo if self._bufs[b].role_global]
        written = 0
        async with self._write_lock:
            runs = _runs(local)
            await self.storage.will_write([(s * self.bs, n * self.bs) for s, n in runs])
            for start, count in runs:
                # Re-check: earlier writes awaited, and blocks may have gone.
                still = [b for b in range(start, start + count) if b in self._dirty]
                for s, n in _runs(still):
                    written += len(await self._write_run(s, n))
        if glob:
            await self.agent.write_request(glob)
            written += len(glob)
        return written

    async def _write_run(self, start: int, count: int) -> list[tuple[int, int]]:
        """Write these blocks, each after the log records of the version
        written (write-ahead); return (block, version) for what was written
        (a block may have left meanwhile)."""
        out: list[tuple[int, int]] = []
        todo = list(range(start, start + count))
        while todo:
            await self._wal_write_locked(todo)
            # No await from here to the write's start: what is written is
            # what the log has.  A change the running operation has not
            # committed never goes to storage: it may yet be undone, and a
            # crash must not find half an operation there.  (Another write
            # may have taken some meanwhile.)
            todo = [
                b for b in todo if b in self._bufs and self._bufs[b].dirty and not self.in_flux(b)
            ]
            if not todo:
                break
            s, n = _runs(todo)[0]
            out += [(b, self._bufs[b].version) for b in range(s, s + n)]
            await self._write_blocks(s, n)
            todo = todo[n:]
        return out

    async def _wal_write_locked(self, blocks: list[int]) -> None:
        """Write-ahead for a writer that holds the write lock: the lock is let
        go while the log is forced.  A force waits for the LLOL, and the
        LLOL's holder may be a checkpoint or a recovery here that needs the
        write lock to write the log header."""
        while not self.logged(blocks):
            self._write_lock.release()
            try:
                await self.wal(blocks)
            finally:
                with trio.CancelScope(shield=True):
                    await self._write_lock.acquire()

    def in_flux(self, b: int) -> bool:
        """Changed by the running operation, not yet committed (it may
        still be undone)."""
        op = self._op
        if op is None or b not in op.undo:
            return False
        snap = op.undo[b]
        return snap is None or snap.version != self._bufs[b].version

    async def _write_blocks(self, start: int, count: int) -> None:
        parts = []
        for b in range(start, start + count):
            buf = self._bufs[b]
            if buf.btype is not None:
                fmt.seal(buf.data, buf.btype, b, buf.version)
            parts.append(buf.data)
            # Clean before the write: a change during it re-dirties.
            buf.dirty = False
            self._dirty.discard(b)
            self._inflight[b] = buf.version
        if log.isEnabledFor(logging.DEBUG):
            versions = [self._inflight[b] for b in range(start, start + count)]
            log.debug(
                "host %d: writing blocks %d+%d, versions %s", self._host, start, count, versions
            )
        chunk = b"".join(parts)  # one copy: growing a bytearray copies again
        try:
            await self.storage.write(start * self.bs, chunk)
        except BaseException:
            for b in range(start, start + count):
                if b in self._bufs:
                    self._bufs[b].dirty = True
                    self._dirty.add(b)
            raise
        finally:
            for b in range(start, start + count):
                self._inflight.pop(b, None)
        self.stats.storage_writes += 1
        self.stats.blocks_written += count
        # Shipped while this write was under way: the master must hear that
        # it landed, to tell the receiver (claims 32-35).
        landed = [
            (b, self._shipped_while_writing.pop(b))
            for b in range(start, start + count)
            if b in self._shipped_while_writing
        ]
        if landed:
            self.agent.write_done(landed)

    async def perform_write_checked(self, blocknos: list[int], report: Landed) -> None:
        """perform_write() for a master that lost track of storage
        (WritePerform.check): our newest past image of each block goes to
        storage only if storage has an older version of it; either way,
        storage has at least that version now, and the newer one it had is
        what we report (the master learns what storage has)."""
        out = []
        async with self._write_lock:
            for b in blocknos:
                pi = self.pis.newest(b)
                if pi is None:
                    out.append((b, 0))
                elif pi.btype is None:
                    out.append((b, pi.version))  # no version to compare: storage wins
                else:
                    out.append(await self._write_past_image(b, pi))
        await report(out)

    async def _write_past_image(self, b: int, pi: PastImage) -> tuple[int, int]:
        """Our past image of metadata block `b` to storage, unless storage
        has a version as new: the notice of a write of a newer one can die
        with a master, and the next one ask for an image it covered (and
        the blocks a rebuild holds are no copy here: what we write for them
        is an image).  What storage has is reported then.  (One read per
        past image written: the newest holder writes its copy, and images
        are written only when none holds one.)"""
        if pi.btype is not None:
            stored = fmt.stored_version(await self.storage.read(b * self.bs, self.bs), b)
            if stored >= pi.version:
                return (b, stored)
        await self._write_image(b, pi.data, pi.btype, pi.version)
        return (b, pi.version)

    async def perform_write(self, blocknos: list[int], report: Landed) -> None:
        """The master chose us to write these blocks (claims 19-21): write our
        current copy, or our newest past image; `report` which versions
        landed.  What needs no log force (a past image: its records were
        forced before it left; a copy already logged or clean) is written
        and reported first: a force waits for the LLOL, whose holder may be
        waiting for one of those very writes (the log header's, say)."""
        later: set[int] = set()
        await report(await self._perform_all(blocknos, later))
        if later:
            # Their records first, without the write lock (see _wal_write_locked).
            await self.wal(later)
            await report(await self._perform_all([b for b in blocknos if b in later]))

    def _needs_force(self, b: int) -> bool:
        """Would writing our version of `b` need its records forced first?"""
        buf = self._bufs.get(b)
        return buf is not None and (buf.dirty or self.in_flux(b)) and not self.logged([b])

    async def _perform_all(
        self, blocknos: list[int], later: set[int] | None = None
    ) -> list[tuple[int, int]]:
        """Write each block (perform_write); with `later`, those that need a
        log force go there instead.  Decided block by block with the write
        lock held: an operation may commit to one while we wait for the lock
        or write the ones before it."""
        out: list[tuple[int, int]] = []
        async with self._write_lock:
            for b in blocknos:
                if later is not None and self._needs_force(b):
                    later.add(b)
                    continue
                while (done := await self._perform_one(b)) is None:
                    pass
                out.append(done)
        return out

    async def _perform_one(self, b: int) -> tuple[int, int] | None:
        """perform_write() of one block, with the write lock; None: the lock
        was let go meanwhile, and what to write must be decided again."""
        buf = self._bufs.get(b)
        if buf is not None and self.in_flux(b):
            return await self._write_committed(b)
        if buf is not None and buf.dirty:
            done = await self._write_run(b, 1)
            if done:
                return done[0]
            # It left while its log records were written (what we keep of
            # it now is a past image), or an operation changed it meanwhile.
            if self.in_flux(b):
                return await self._write_committed(b)
        buf = self._bufs.get(b)
        if buf is not None:
            # Clean here, and newer than any past image we keep: writing one
            # of those would put an old version back over it.  But "clean"
            # may be a read copy whose owner, elsewhere, has not written it
            # (and may be dead: a recovery asks us for the newest copy that
            # survives), so the copy itself is written, not just reported.
            await self._write_image(b, buf.data, buf.btype, buf.version)
            return (b, buf.version)
        if (pi := self.pis.newest(b)) is not None:
            return await self._write_past_image(b, pi)
        # Nothing of it here: the master must still hear back, or whoever
        # waits for this write waits for ever.
        return (b, 0)

    async def _write_committed(self, b: int) -> tuple[int, int] | None:
        """The version of `b` before the running operation changed it: on
        storage already if it was clean, else written now.  None: its
        records had to be forced first (with the write lock let go)."""
        assert self._op is not None
        snap = self._op.undo[b]
        if snap is None:
            return (b, 0)  # allocated by the operation: nothing committed
        if snap.dirty:
            if not self.logged([b]):
                await self._wal_write_locked([b])  # from an earlier operation
                return None
            await self._write_image(b, snap.data, snap.btype, snap.version)
        return (b, snap.version)

    async def _write_image(
        self, b: int, image: bytes, btype: fmt.BlockType | None, version: int
    ) -> None:
        """Write a copy other than the cached one (a past image, a version
        before the running operation), sealed as that version."""
        data = bytearray(image)
        if btype is not None:
            fmt.seal(data, btype, b, version)
        await self.storage.write(b * self.bs, data)
        self.stats.storage_writes += 1

    def notified(self, written: Iterable[tuple[int, int]]) -> None:
        """Storage holds at least these versions: drop past images up to them;
        a copy no newer is clean, and local again (claims 31, 36, 40)."""
        written = list(written)
        log.debug("host %d: on storage: %s", self._host, written)
        for b, version in written:
            self.pis.covered(b, version)
            buf = self._bufs.get(b)
            if buf is not None and buf.boundary <= version:
                buf.boundary = 0
            if buf is not None and buf.version <= version:
                buf.dirty = False
                buf.role_global = False
                self._dirty.discard(b)

    async def sync(self) -> None:
        """Everything dirty on storage, and storage flushed."""
        await self.flush()
        await self.storage.flush()

    async def write_past_images(self) -> None:
        """Ask for every past image to be covered by a write (unmount)."""
        if self.pis:
            await self.agent.write_request(self.pis.newest_versions())

    async def checkpoint(self) -> None:
        """Move this host's checkpoint: write local dirty blocks, then have
        the master write each closed bin of past images, one request per bin
        (claims 2-5, 11-12); then close the open bin.  What changed since the
        last checkpoint stays in memory one round longer: a block that keeps
        moving between hosts is written once per round, not once per move."""
        await self.flush()
        while self.pis.closed_bins:
            entries = self.pis.bin_entries(0)
            if entries:
                self.stats.bin_writes += 1
                await self.agent.write_request(entries, bin=self.pis.edges[1])
            self.pis.empty_oldest_bin()
        self.pis.open_bin(self.scn)

    # -- pings ---------------------------------------------------------------------
    async def give_up(self, ping: p.Ping) -> Shipped:
        """Another host needs `ping.block`: wait until our operation lets go
        of it (or make the operation back off), drop what the kernel cached
        from it, and hand over the copy; keep a past image of a dirty one."""
        b = ping.block
        deadline = trio.current_time() + DEADLOCK_TIMEOUT
        await self._wait_for_op(ping, deadline)
        while b in self._rebuild_held:
            await self._rebuild_released.wait()
            # The operation may have taken the block in X meanwhile: from
            # here to `leaving` nothing may wait, or it changes a block
            # that is on its way out.
            await self._wait_for_op(ping, deadline)
        if b == self.llol_block and self.append_lock is not None:
            # The LLOL leaves only between appends (an append in progress
            # finishes first, and none starts while it goes).
            async with self.append_lock:
                return await self._leave(b, Mode(ping.keep))
        return await self._leave(b, Mode(ping.keep))

    async def _wait_for_op(self, ping: p.Ping, deadline: float) -> None:
        """Until the running operation lets go of the block (or may keep
        it: a read copy of what it only read), asking it to back off where
        it waits for another host while holding what that host (or one
        behind it) needs: the older operation goes first; and one waiting
        too long is taken for part of a cycle."""
        b = ping.block
        while (op := self._op) is not None and b in op.pinned:
            if ping.keep == Mode.S and b not in op.undo and b not in op.exclusive:
                return
            if op.waiting is not None and (
                (ping.op_start, ping.to) < (op.start, self.agent.host)
                or b in op.waiting.blocks  # queued behind this very request
                or trio.current_time() >= deadline
            ):
                op.abort.set()
            with trio.move_on_at(deadline if trio.current_time() < deadline else math.inf):
                await self._op_changed.wait()

    async def _leave(self, b: int, keep: Mode) -> Shipped:
        buf = self._bufs.get(b)
        if buf is None:
            log.debug("host %d: block %d leaves, not cached", self._host, b)
            return Shipped(b"", 0, False, 0, 0, True, cached=False)  # storage has our last copy
        buf.leaving = True
        buf.going = keep is Mode.N
        try:
            # Only now, with no operation left to change it: the operation we
            # waited for may have linked blocks it allocated into this one.
            # Not for a block we hold in S: we cannot have changed it since
            # it last left in X (which registered what it pointed at), and
            # a registration can wait for another host that is giving up a
            # block we hold in S, for its own registration (a hang in the
            # soak with --spread).  Nor for the log's header: it points only
            # at log pages, which are never registered; and it leaves
            # holding the append semaphore, which a recovery the
            # registration may wait for needs.
            if buf.mode is Mode.X and b != self.llol_block:
                await self.register_private()
            if buf.going:
                # A copy we keep cannot change elsewhere: the kernel's caches
                # of it stay good.
                await self.on_give_up(buf)
            # Its records go into the log before it leaves (write-ahead):
            # whoever changes it next appends after them.
            await self.wal([b])
            return await self._hand_over(buf, keep)
        finally:
            buf.leaving = buf.going = False

    async def register_private(self) -> None:
        """Before anything leaves this host, the master learns of the blocks
        we allocated: once a block pointing at them is shipped, other hosts
        can reach them, and must be sent here for them."""
        # One at a time: a second ping must not ship while the first one's
        # registration is still on its way to the master.
        async with self._registering:
            if not self._private:
                return
            blocks, self._private = sorted(self._private), set()
            # As a rebuilder's request: a block we allocated (free on the
            # bitmap) may be one a dead host held and we rebuild meanwhile.
            # Queued behind that recovery, the registration waited for our
            # own round, which waited for the ping it held up (a hang in
            # the soak); granted at once, as we hold it in X already.
            try:
                async with self.agent.taking(blocks, Mode.X, 0.0, recovery=True):
                    pass
            except BaseException:
                # Not known to be registered (the ping that asked was
                # cancelled, with its master gone): private still.
                self._private.update(blocks)
                raise
            for b in blocks:
                buf = self._bufs.get(b)
                if buf is not None:
                    buf.private = False

    async def _hand_over(self, buf: Buffer, keep: Mode) -> Shipped:
        b = buf.blockno
        if self._op is not None and b in self._op.pinned:
            # An operation read it while it was leaving: what it read may be
            # changed elsewhere now, so it must not commit.
            self._op.doomed = True
        if self.coherence == "disk" and buf.dirty:
            # What GFS2 and OCFS2 do on a downgrade: write, wait until the
            # device has it (the next holder reads the device, not our page
            # cache), then let go.
            async with self._write_lock:
                if buf.dirty:
                    await self._write_run(b, 1)
                    await self.storage.flush()
        writing = self._inflight.get(b, 0)
        dirty = buf.dirty and keep is Mode.N
        pi = 0
        if writing:
            # Our write must be reported when it lands (claims 33-34).
            buf.role_global = True
            self._shipped_while_writing[b] = writing
        if keep is Mode.N:
            self._bufs.pop(b, None)
            self._copies.pop(b, None)
            self._dirty.discard(b)
            if buf.dirty:
                # Keep a past image until a write covers it (claim 1).
                image = PastImage(
                    buf.version, buf.first_dirty or self.scn, bytes(buf.data), buf.btype
                )
                self.pis.keep(b, image, boundary=max(buf.boundary, writing))
                pi = buf.version
        else:
            buf.mode = keep
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "host %d: block %d leaves, v%d%s, keeping %s%s",
                self._host,
                b,
                buf.version,
                " dirty" if buf.dirty else "",
                keep.name,
                f", past image v{pi}" if pi else "",
            )
        if self.coherence == "disk":
            return Shipped(b"", buf.version, False, 0, 0, True)
        btype = int(buf.btype) if buf.btype is not None else 0
        return Shipped(
            bytes(buf.data),
            buf.version,
            dirty,
            writing,
            pi,
            False,
            btype,
            buf.dirty or bool(writing),
            age=max(0.0, time.monotonic() - buf.used),
        )

    # -- memory --------------------------------------------------------------------
    async def trim(self) -> None:
        """Called between operations, when no buffer is in use: write back if
        too much is dirty, and evict cold clean blocks past the capacity."""
        if len(self._dirty) >= self.dirty_limit:
            await self.flush()
        if self.crowded.is_set():
            self.crowded = trio.Event()
        excess = len(self._bufs) - self._offers() - self.capacity
        if excess <= 0:
            return
        # Evict clean blocks from the cold end; write back dirty ones first.
        # A block whose write is still in flight stays: storage does not
        # have its contents yet.
        if len(self._dirty) > len(self._bufs) - excess:
            await self.flush()
        # Another host may read a released block from storage and follow it
        # to blocks only we know of: the master must know them first.  And
        # a private block itself is registered before it goes: another host
        # may still hold a read copy of it from before it was freed and
        # allocated here (no lock revoked that copy), which the registration
        # revokes (t5_cluster: ...never_read_stale).
        await self.register_private()
        victims = self._victims(excess)
        heir = self._heir()
        now = time.monotonic()
        offers = 0
        for b in victims:
            buf = self._bufs[b]
            if heir is not None and not (buf.copy or buf.last_chance) and now - buf.used < heir[1]:
                # Warmer than what `heir` would evict next: the cluster
                # keeps this one and drops that (seed 001).
                buf.offered = True
                self.offered.add(b)
                self.agent.handoff(b, heir[0])
                offers += 1
                continue
            del self._bufs[b]
            self.agent.release_block(b)
            if buf.copy:
                self._copies.pop(b, None)
                self.stats.copies_evicted += 1
        self.stats.handed_off += offers
        self.stats.evictions += len(victims) - offers
        log.debug("host %d: evicted %s", self._host, victims)

    def _heir(self) -> tuple[int, float] | None:
        """The host with the most room for our evictions, and its
        Stats.spare (the master's last word on it)."""
        return max(self.agent.retention.items(), key=lambda kv: kv[1], default=None)

    def _victims(self, excess: int) -> list[int]:
        """Up to `excess` clean blocks: copies of blocks another host is
        primary for first, then from the cold end.  A block whose write is
        still in flight stays: storage does not have it yet."""
        victims = self._cold_copies(excess)
        chosen = set(victims)
        for b, buf in self._bufs.items():
            if len(victims) >= excess:
                break
            if b not in chosen and self._evictable(b, buf):
                victims.append(b)
        return victims

    def _cold_copies(self, excess: int) -> list[int]:
        victims, stale = [], []
        for b in self._copies:
            if len(victims) >= excess:
                break
            buf = self._bufs.get(b)
            if buf is None or not buf.copy:
                stale.append(b)
            elif self._evictable(b, buf):
                victims.append(b)
        for b in stale:
            del self._copies[b]
        return victims

    def _evictable(self, b: int, buf: Buffer) -> bool:
        # Not one we have a request in flight for (an upgrade from S): its
        # Release would go after the request, and could reach the master
        # after the grant, which it would then undo; we would hold X on a
        # block the master thinks nobody holds, and another host would read
        # it from storage (lost creates in the soak with --peer-reads and
        # small caches).
        return (
            not buf.dirty
            and b not in self._inflight
            and not buf.leaving
            and not buf.offered
            and not self.agent.asking(b)
        )

    def drop_all(self) -> None:
        """Forget every clean block and release its lock (unmount)."""
        for b in [b for b, buf in self._bufs.items() if not buf.dirty]:
            del self._bufs[b]
            self.agent.release_block(b)


def _held_copy(buf: Buffer | None) -> str:
    return f"v{buf.version} {buf.mode.name}" if buf is not None else "none"


def _runs(sorted_blocks: list[int]) -> list[tuple[int, int]]:
    """[3,4,5,9] -> [(3,3),(9,1)]: runs of adjacent block numbers."""
    runs: list[tuple[int, int]] = []
    for b in sorted_blocks:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
