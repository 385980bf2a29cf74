"""The lock master's directory spread over the hosts (seed 000, claims 6-7).

The blocks fall into a fixed number of partitions (protocol.partition_of).
Each partition is mastered by the live host that a hash over the live
hosts names (rendezvous hashing: when a host joins or goes, only the
partitions it gains or had change hands).  Every host runs a MasterPort
with a MasterService for each partition it masters, and a ClusterAgent
per partition; `SpreadAgent` puts those behind the one agent the cache
knows.  A request for a block of a partition mastered here goes by a
LocalLink: no network message.

A partition changes hands:
- when a host joins that the hash names for it: the joiner asks the
  partition's master to stop (Handover), then starts a master for it that
  knows nothing and rebuilds its directory from the hosts' reports
  (docs/PROTOCOL.md, Resume);
- when its master's host dies or leaves: the host the hash names among
  those still alive on the volume starts one, rebuilt from the reports of
  the others, sweeping what the dead host held (failover.py's rule: not
  before the volume says the old host is dead).

Each partition's master declares deaths and runs recoveries of its own
blocks.  The log's records of a dead host stay until every partition's
recovery of it is over: its mark in the log header is cleared only once
each partition that knew it has sent its closing round.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import trio
import xxhash

from . import format as fmt
from . import protocol as p
from .agent import AgentStats, ClusterAgent, Report
from .errors import QuietError, StorageError
from .link import LinkClosed, open_master, parse_address
from .master import MasterPort, MasterService
from .protocol import HostId, Mode, partition_of
from .storage import Storage
from .tls import Tls
from .volume import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, SlotWatch, master_address, read_slot

if TYPE_CHECKING:
    from .cache import BlockCache

log = logging.getLogger(__name__)

Address = tuple[str, int]
T = TypeVar("T")
#: How long a host that asked for a partition waits for its master to stop.
HANDOVER_TIMEOUT = 30.0


def served(published: str) -> set[int]:
    """The partitions a host slot's `master` field says its host masters
    ("host:port/hex mask"; none without a mask)."""
    _, sep, mask = published.partition("/")
    try:
        bits = int(mask, 16) if sep else 0
    except ValueError:
        return set()
    return {k for k in range(bits.bit_length()) if bits >> k & 1}


class _ToParts:
    """An attribute of SpreadAgent that is every part's: read from the
    first, set on each (what the journal and the mount set on an agent)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, agent: SpreadAgent, owner: type | None = None) -> Any:
        return getattr(agent.parts[0], self.name)

    def __set__(self, agent: SpreadAgent, value: object) -> None:
        for part in agent.parts:
            setattr(part, self.name, value)


def owner(partition: int, hosts: set[int] | list[int]) -> int:
    """The host that masters `partition` among `hosts` (rendezvous hash)."""
    return max(hosts, key=lambda h: xxhash.xxh64_intdigest(h.to_bytes(4, "little"), seed=partition))


class SpreadAgent:
    """One ClusterAgent per partition, behind the interface of one: each
    request is split by partition, and the parts asked at once."""

    def __init__(
        self, host: HostId, key: bytes, partitions: int, *, coherence: str, tls: Tls | None
    ) -> None:
        self.host = host
        self.partitions = partitions
        self.parts = [
            ClusterAgent(host, key, coherence=coherence, tls=tls) for _ in range(partitions)
        ]
        for k, part in enumerate(self.parts):
            part.partition = (k, partitions)
            part.on_fence = self.fence
            part.report_counters = self.counters
        self.master_lost = trio.Event()
        self._cache: BlockCache | None = None
        self._journal_recover: Callable[..., Awaitable[None]] | None = None
        self._closing: dict[int, set[int]] = {}
        self._closed: dict[int, trio.Event] = {}

    # -- what the cache and the journal set and read -----------------------------
    @property
    def cache(self) -> BlockCache | None:
        return self._cache

    @cache.setter
    def cache(self, cache: BlockCache) -> None:
        self._cache = cache
        for part in self.parts:
            part.cache = cache

    @property
    def on_recover(self) -> Callable[..., Awaitable[None]] | None:
        return self._journal_recover

    @on_recover.setter
    def on_recover(self, recover: Callable[..., Awaitable[None]]) -> None:
        self._journal_recover = recover
        for k, part in enumerate(self.parts):
            part.on_recover = functools.partial(self._recover, k)

    log_marks = _ToParts()
    retention = _ToParts()
    on_log_append = _ToParts()
    master_wait = _ToParts()
    live_at_join = _ToParts()

    def part(self, block: int) -> ClusterAgent:
        return self.parts[partition_of(block, self.partitions)]

    def _split(self, items: Iterable[T], block: Callable[[T], int]) -> dict[int, list[T]]:
        """`items` by the partition of their block."""
        out: dict[int, list[T]] = {}
        for item in items:
            out.setdefault(partition_of(block(item), self.partitions), []).append(item)
        return out

    # -- requests ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def taking(
        self, blocknos: list[int], mode: Mode, op_start: float = 0.0, recovery: bool = False
    ) -> AsyncIterator[dict[int, p.Transfer]]:
        """ClusterAgent.taking, each partition's share asked of its master
        at once."""
        groups = self._split(blocknos, int)
        pends = {}

        async def take(k: int, blocks: list[int]) -> None:
            pends[k] = await self.parts[k]._acquire(blocks, mode, op_start, recovery)

        try:
            if len(groups) == 1:
                [(k, blocks)] = groups.items()
                await take(k, blocks)
            else:
                try:
                    async with trio.open_nursery() as nursery:
                        for k, blocks in groups.items():
                            nursery.start_soon(take, k, blocks)
                except BaseExceptionGroup as group:
                    # One part backed off (OpRetry) or failed: as one agent would.
                    raise group.exceptions[0] from None
            arrived: dict[int, p.Transfer] = {}
            for pend in pends.values():
                arrived.update(pend.arrived)
            yield arrived
        finally:
            for k, pend in pends.items():
                self.parts[k]._used(pend)

    def asking(self, blockno: int) -> bool:
        return self.part(blockno).asking(blockno)

    def release_block(self, blockno: int) -> None:
        self.part(blockno).release_block(blockno)

    def handoff(self, blockno: int, to: int) -> None:
        self.part(blockno).handoff(blockno, to)

    async def write_request(self, blocks: list[tuple[int, int]], bin: int = 0) -> None:
        async with trio.open_nursery() as nursery:
            for k, some in self._split(blocks, _first).items():
                nursery.start_soon(self.parts[k].write_request, some, bin)

    def write_done(self, blocks: list[tuple[int, int]]) -> None:
        for k, some in self._split(blocks, _first).items():
            self.parts[k].write_done(some)

    # -- the log's tail: the LLOL is a block of one partition ------------------------
    @property
    def _llol_part(self) -> ClusterAgent:
        assert self._cache is not None
        return self.part(self._cache.llol_block)

    @property
    def llol_holder(self) -> int:
        return self._llol_part.llol_holder

    async def ship_log(self, records: bytes) -> p.LogAppended | None:
        return await self._llol_part.ship_log(records)

    async def _recover(
        self,
        k: int,
        dead: int,
        blocks: list[int],
        report: Report,
        follow: bool,
        sweep: bool,
    ) -> None:
        """A partition's Recover.  Its closing round (no blocks) clears the
        dead host's mark in the log only once every partition that knew
        the dead host has closed too: until then another's rounds may
        still need its records."""
        assert self._journal_recover is not None
        if sweep:
            # Our partition's blocks only: a copy kept of another's would be
            # reported to a master that knows nothing of it, and no master
            # would have it written (a torture run: indirect blocks a dead
            # host had rebuilt, kept clean here, on no storage).
            ours = functools.partial(self._in_part, k)
            await self._journal_recover(dead, blocks, report, follow, sweep, ours)
            return
        if blocks:
            await self._journal_recover(dead, blocks, report, follow, sweep)
            return
        closing = self._closing.setdefault(dead, set())
        closed = self._closed.setdefault(dead, trio.Event())
        closing.add(k)
        knew = {n for n, part in enumerate(self.parts) if dead in part.ever_peers}
        if knew <= closing:
            await self._journal_recover(dead, [], _no_report, follow, sweep)
            del self._closing[dead], self._closed[dead]
            closed.set()
        else:
            log.info(
                "host %d: partition %d closed its recovery of node %d; waiting for %s",
                self.host,
                k,
                dead,
                sorted(knew - closing),
            )
            await closed.wait()
        await report([], [], [])

    def _in_part(self, k: int, block: int) -> bool:
        return partition_of(block, self.partitions) == k

    # -- the host ------------------------------------------------------------------
    def live_nodes(self) -> list[int]:
        """The hosts every partition's master says are up."""
        alive = set.intersection(*(set(part.live_nodes()) for part in self.parts))
        return sorted(alive)

    def fence(self, reason: str) -> None:
        if self.master_lost.is_set():
            return
        self.master_lost.set()
        for part in self.parts:
            part.fence(reason)

    def withdraw(self, reason: str) -> None:
        for part in self.parts:
            part.withdraw(reason)
        self.master_lost.set()

    async def bye(self) -> None:
        async with trio.open_nursery() as nursery:
            for part in self.parts:
                nursery.start_soon(part.bye)

    def close(self) -> None:
        pass

    def describe(self) -> list[str]:
        """Each part's requests in flight, then the cache's state once."""
        assert self._cache is not None
        mine = len(self._cache.describe())
        out = []
        for k, part in enumerate(self.parts):
            lines = part.describe()
            out += [f"partition {k}: {line}" for line in lines[: len(lines) - mine]]
        return out + self._cache.describe()

    def counters(self) -> dict[str, int]:
        """ClusterAgent.counters: the parts' agent counters summed, and the
        cache's (taken once: every part sends these each second)."""
        assert self._cache is not None
        names = AgentStats.__slots__  # type: ignore[attr-defined]
        out = {f"agent_{n}": sum(getattr(part.stats, n) for part in self.parts) for n in names}
        out.update(self._cache.counters())
        return out


async def _no_report(blocks: list[int], installed: list[int], kept: list[tuple[int, int]]) -> None:
    pass


def _first(pair: tuple[int, int]) -> int:
    return pair[0]


class Spread:
    """A host's masters of the spread directory, and where its parts find
    theirs.  `make_service(k, dead)` builds the MasterService for
    partition k (with the host's disk lease and minority rule, as a mount
    does for its one master); `publish(addr)` writes our master port's
    address into our host slot."""

    def __init__(
        self,
        agent: SpreadAgent,
        storage: Storage,
        sb: fmt.Superblock,
        *,
        key: bytes,
        tls: Tls | None,
        make_service: Callable[[int, frozenset[int], frozenset[int]], MasterService],
        publish: Callable[[str], Awaitable[None]],
        timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        self.agent, self.storage, self.sb = agent, storage, sb
        self.node = agent.host
        self.key, self.tls = key, tls
        self._make_service = make_service
        self._publish = publish
        self.port = MasterPort(key, tls, self._handover)
        self.address: Address = ("", 0)
        self._slots = SlotWatch(timeout)
        self._handed: set[int] = set()
        self._stopped: dict[int, trio.Event] = {}
        self._publishing = trio.Lock()
        self._nursery: trio.Nursery | None = None

    async def run(
        self,
        listen: Address,
        peer_host: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen for the partitions we master, join every partition's
        master, then take over those the hash names us for; serve until
        cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            lhost, lport = listen
            port = await nursery.start(self.port.serve, lhost, lport)
            reach = peer_host if lhost in ("0.0.0.0", "::", "") else lhost
            self.address = (reach, port)
            await self._publish_served()
            nursery.start_soon(self._watch)
            nursery.start_soon(self._stop_when_fenced)
            live = await self._live()
            for k, part in enumerate(self.agent.parts):
                part.failover = _PartFailover(self, k)  # type: ignore[assignment]
                part.local_masters[self.address] = functools.partial(self.port.connect_local, k)
                server = self._server_of(k, live)
                if server is None:
                    await self._start(k, frozenset(), frozenset())  # the first host
                    server = self.node
                at = self._address_of(server, live) if server != self.node else self.address
                if at is None:
                    raise StorageError(f"host {server} publishes no master address")
                await nursery.start(
                    functools.partial(part.run, at, listen_host=peer_host, listen_port=0)
                )
            for k in range(self.agent.partitions):
                server = self._server_of(k, live)
                if server not in (None, self.node) and owner(k, list(live)) == self.node:
                    await self._take(k, server, live)
            task_status.started()

    async def _left(self, node: int) -> bool:
        """Whether `node` freed its slot (it unmounted, or stopped on an
        error) rather than died holding it.  Only the log line differs: its
        records are swept as a dead host's all the same, in case it left some."""
        slot = await trio.to_thread.run_sync(read_slot, self.storage, self.sb, node)
        return not slot.in_use

    async def _live(self) -> dict[int, fmt.HostSlot]:
        return await trio.to_thread.run_sync(self._slots.live, self.storage, self.sb)

    async def _watch(self) -> None:
        """Read the slots every heartbeat interval, so that the watch knows
        how long each has stood still when its host's partitions move; and
        tell our masters who is alive, so that a rebuild window waits for no
        host the volume says is dead (killed while it resumed)."""
        while True:
            with contextlib.suppress(StorageError):
                live = set(await self._live())
                for service in list(self.port.services.values()):
                    await service.alive_on_volume(live)
            await trio.sleep(HEARTBEAT_INTERVAL)

    @staticmethod
    def _address_of(node: int, live: dict[int, fmt.HostSlot]) -> Address | None:
        slot = live.get(node)
        if slot is None or not slot.master:
            return None
        try:
            return parse_address(master_address(slot))
        except ValueError:
            return None

    def _server_of(self, k: int, live: dict[int, fmt.HostSlot]) -> int | None:
        """The host whose slot says it masters partition k now (the one
        the hash names, if two say so while it changes hands)."""
        servers = [n for n, slot in live.items() if k in served(slot.master)]
        if not servers:
            return None
        heir = owner(k, list(live))
        return heir if heir in servers else min(servers)

    async def _publish_served(self) -> None:
        """Our slot says where our master port is and what it masters.
        One write at a time, its mask taken once the one before has landed:
        two masters started at once each publish, and the writes run in
        threads, in either order; the older mask landing last would hide a
        partition we master from everyone looking for it."""
        async with self._publishing:
            mask = sum(1 << k for k in self.port.services)
            await self._publish(f"{self.address[0]}:{self.address[1]}/{mask:x}")

    # -- the partitions we master ----------------------------------------------------
    async def _start(self, k: int, dead: frozenset[int], expect: frozenset[int]) -> None:
        """Master partition k here, knowing nothing: rebuilt from the
        reports of the hosts that were joined to it (`expect`); `dead`:
        hosts not to wait for."""
        if k in self.port.services:
            return
        service = self._make_service(k, dead, expect - dead)
        self.port.services[k] = service
        stopped = self._stopped[k] = trio.Event()
        assert self._nursery is not None
        await self._nursery.start(self._serve, k, service, stopped)
        await self._publish_served()
        log.info("host %d: masters partition %d", self.node, k)

    async def _serve(
        self,
        k: int,
        service: MasterService,
        stopped: trio.Event,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await service.run(task_status=task_status)
        finally:
            if self.port.services.get(k) is service:
                del self.port.services[k]
            # A fenced host's slot takes no more writes: its mask stays, and
            # the mount stays up, answering EIO, as with one master.
            with trio.CancelScope(shield=True), contextlib.suppress(StorageError):
                await self._publish_served()
            stopped.set()

    async def _take(self, k: int, holder: int, live: dict[int, fmt.HostSlot]) -> None:
        """Ask `holder` to stop mastering partition k, then master it here."""
        addr = self._address_of(holder, live)
        if addr is None:
            return  # it will go, and the hash names us then
        hosts: tuple[int, ...] | None = None
        with (
            trio.move_on_after(HANDOVER_TIMEOUT),
            contextlib.suppress(LinkClosed, OSError, QuietError, p.ProtocolError),
        ):
            link = await open_master(addr, self.key, self.node, exitcode=32, tls=self.tls)
            try:
                await link.send(p.Handover(k))
                reply = await link.receive()
                if isinstance(reply, p.HandedOver) and reply.ok:
                    hosts = reply.hosts
            finally:
                await link.aclose()
        if hosts is None:
            log.warning("host %d: host %d kept partition %d", self.node, holder, k)
            return
        self._handed.add(k)
        await self._start(k, frozenset(), frozenset(hosts))

    async def _handover(self, asker: int, k: int) -> tuple[int, ...] | None:
        """Another host asks for partition k: if the hash names it, stop
        our master of it, and once every session with it has ended, say
        which hosts were joined (None: we keep it)."""
        service = self.port.services.get(k)
        live = await self._live()
        if service is None or asker not in live or owner(k, list(live)) != asker:
            return None
        log.info("host %d: handing partition %d over to host %d", self.node, k, asker)
        hosts = tuple(sorted(service.joined()))
        service.stop(f"partition {k} moves to host {asker}")
        await self._stopped[k].wait()
        return hosts

    def describe(self) -> list[str]:
        """The partitions mastered here, and each one's state."""
        out = [f"masters partitions {sorted(self.port.services)}"]
        for k, service in sorted(self.port.services.items()):
            out += [f"partition {k}: {line}" for line in service.describe()]
        return out

    async def _stop_when_fenced(self) -> None:
        await self.agent.master_lost.wait()
        for service in list(self.port.services.values()):
            service.stop(f"host {self.node} is fenced")


class _PartFailover:
    """Where a partition's agent finds its master once it lost the last:
    the host the hash names among those alive on the volume."""

    def __init__(self, spread: Spread, k: int) -> None:
        self.spread, self.k = spread, k

    @staticmethod
    def covers(master_node: int, node: int) -> bool:
        return True  # every partition's master moves when it goes

    async def where(self, old: int, old_addr: Address) -> Address | None:
        s = self.spread
        if self.k in s.port.services:
            return s.address
        live = await s._live()
        if not live:
            return None
        server = s._server_of(self.k, live)
        if server is not None and server != s.node:
            return s._address_of(server, live)
        if owner(self.k, list(live)) != s.node:
            return None  # nobody masters it yet: the one the hash names will
        if old in live and old != s.node and self.k not in s._handed:
            return None  # the handover is under way: wait for its end
        dead = frozenset({old}) - set(live)
        if dead and await s._left(old):
            log.info(
                "host %d: partition %d's master, host %d, has left (its slot is free): taking it",
                s.node,
                self.k,
                old,
            )
        elif dead:
            log.warning(
                "host %d: partition %d's master, host %d, is dead: taking it", s.node, self.k, old
            )
        # Every live host has an agent of this partition.
        await s._start(self.k, dead, frozenset(live))
        s._handed.discard(self.k)
        return s.address
