"""The host side of the lock protocol: asks the master, serves pings, ships blocks.

The buffer cache is the agent's only client.  It names blocks and the mode it
needs; the agent gets the mode from the master and returns, per block, the
copy another host shipped (or None: read it from storage, or keep yours).
In the other direction the master pings this host to ship a block, asks it
to write blocks (write-perform), and tells it what reached storage (write
notifications); the agent hands those to the cache.

`LocalAgent` is the stand-in for single-process tools and unit tests of the
core: an in-process LockMaster, no other hosts.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from . import protocol as p
from .errors import QuietError, StorageError
from .link import AnyLink, Handshakes, Link, LinkClosed, LocalLink, open_master
from .master import LockMaster
from .protocol import HostId, Mode, Resource, block_resource, partition_of
from .storage.fence import Fenced
from .tls import Tls
from .volume import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT

if TYPE_CHECKING:
    from .cache import BlockCache
    from .failover import Failover

log = logging.getLogger(__name__)

Report = Callable[[list[int], list[int], list[tuple[int, int]]], Awaitable[None]]

RELEASE_BATCH = 256
STATS_TICKS = 20  # every second
CONNECT_TIMEOUT = 10.0
#: A master that has just started holds joins back while the hosts of its
#: predecessor resume (a lease at most).
JOIN_TIMEOUT = 30.0
#: How long a host that lost its master holds its writes and tries to
#: resume with it (seconds); then it fences itself.
DEFAULT_MASTER_WAIT = 10.0
#: Between attempts to reach a master that went away.
RECONNECT_INTERVAL = 0.5
#: An attempt to reach a master whose host may be dying (failover.py): cut
#: short, so that the volume is read again soon once that host is dead
#: there (a connect to a host cut off hangs for CONNECT_TIMEOUT).
FAILOVER_ATTEMPT = 2 * HEARTBEAT_INTERVAL
#: How long a host that lost its master tries to reach the other hosts.
PROBE_TIMEOUT = 2.0
#: How long a LogAppend waits for its answer before we append ourselves,
#: in leases: an append takes milliseconds, and a holder the master has
#: lost (no PeerDown will come: a master that forgot every lock, say) may
#: never answer.
LOG_ASK_LEASES = 1.0


class MasterRefused(QuietError):
    """The master said no to our Join."""


class OpRetry(Exception):
    """The running operation must let go of its blocks and start again
    (another host needs a block it holds while it waits for one)."""


class LocalAgent:
    """One host's locks in an in-process LockMaster (no network, no peers)."""

    def __init__(self, host: HostId, master: LockMaster) -> None:
        self.host = host
        self.master = master

    @contextlib.asynccontextmanager
    async def taking(
        self, blocknos: list[int], mode: Mode, op_start: float = 0.0, recovery: bool = False
    ) -> AsyncIterator[dict[int, p.Transfer]]:
        await self.master.acquire(self.host, [block_resource(b) for b in blocknos], mode)
        yield {}

    async def acquire(self, res: Resource, mode: Mode) -> None:
        await self.master.acquire(self.host, [res], mode)

    def release_block(self, blockno: int) -> None:
        self.master.release(self.host, block_resource(blockno))

    def asking(self, blockno: int) -> bool:
        return False  # granted at once: never in flight

    @property
    def retention(self) -> dict[int, float]:
        return {}  # no other host to hand a block to

    def handoff(self, blockno: int, to: int) -> None:
        raise AssertionError("a single host has no other host to hand a block to")

    async def write_request(self, blocks: list[tuple[int, int]], bin: int = 0) -> None:
        raise AssertionError("a single host never has blocks in global role")

    def write_done(self, blocks: list[tuple[int, int]]) -> None:
        pass

    def close(self) -> None:
        self.master.release_all(self.host)

    async def bye(self) -> None:
        pass


@dataclass(eq=False)
class Pending:
    """A lock request in flight."""

    req: int
    blocks: set[int]
    mode: Mode
    op_start: float = 0.0
    recovery: bool = False
    granted: set[int] = field(default_factory=set)
    arrived: dict[int, p.Transfer] = field(default_factory=dict)
    await_transfer: set[int] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)
    #: The asker has taken what it was granted into its cache (copies
    #: installed, the rest read from storage): only now may a ping take
    #: the blocks away again.
    used: trio.Event = field(default_factory=trio.Event)
    abandoned: bool = False

    def check(self) -> None:
        if all(b in self.granted and b not in self.await_transfer for b in self.blocks):
            self.done.set()


@dataclass(slots=True)
class _LogAsk:
    """A LogAppend of ours awaiting its answer."""

    node: int
    done: trio.Event = field(default_factory=trio.Event)
    reply: p.LogAppended | None = None


@dataclass(slots=True)
class AgentStats:
    lock_requests: int = 0
    blocks_requested: int = 0
    pings_served: int = 0
    revokes_served: int = 0
    transfers_sent: int = 0
    transfers_received: int = 0
    write_requests: int = 0
    write_performs: int = 0
    notifications: int = 0
    retries: int = 0
    peer_rejected: int = 0  # frames refused on the peer listener
    resumes: int = 0  # sessions resumed with a master that came back
    lock_wait_us: int = 0  # from each lock request sent to its last grant, summed


class ClusterAgent:
    """A host in a cluster: one link to the master, links to peers.

    Attributes:
        host: this host's node id.
        cache: the buffer cache it serves (set by the cache).
        peer_port: where peers reach this host for transfers.
        master_wait: how long it holds its writes and tries to resume when
            it loses the master, before it fences itself.
        live_at_join: the other hosts whose slots were live when it
            mounted (Join.live).
        master_node: the host the master is embedded in (Welcome), -1 for
            a standalone master.
        failover: set by a mount: finds, or becomes, the successor of a
            master whose host died (failover.py).

    A lost master is not at once a fence: the master may have restarted,
    or been cut off from every host, and then takes each host's word for
    what it holds (docs/PROTOCOL.md, Resume).  Meanwhile block writes wait
    at the gate, and operations that need the master wait for it.  The
    master's answer to our resume decides: carry on, or fence.
    """

    def __init__(
        self, host: HostId, key: bytes, *, coherence: str = "fusion", tls: Tls | None = None
    ) -> None:
        self.host = host
        self.key = key
        self.tls = tls
        self._handshakes = Handshakes()
        self.coherence = coherence
        self.cache: BlockCache | None = None
        self.peer_port = 0
        self._master: AnyLink | None = None  # None between sessions
        #: Masters running in this process, by the address the others reach
        #: them at: we talk to them by a LocalLink (set by a mount).
        self.local_masters: dict[tuple[str, int], Callable[[], LocalLink]] = {}
        self._master_addr: tuple[str, int] = ("", 0)
        self._listen_host = ""
        self._up = trio.Event()  # set while a session is up
        self.master_wait = DEFAULT_MASTER_WAIT
        self.live_at_join: tuple[int, ...] = ()
        self.master_node = -1
        self.failover: Failover | None = None
        self._peers: dict[int, tuple[str, int]] = {}
        self._peer_links: dict[int, Link] = {}
        self._peer_locks: dict[int, trio.Lock] = {}
        self._reqs = itertools.count(1)
        self._pending: dict[int, Pending] = {}
        self._written: dict[int, trio.Event] = {}  # block -> write notification wanted
        self._write_wanted: dict[int, int] = {}  # block -> version asked for
        self._releases: list[int] = []
        #: --peer-reads: node -> its Stats.spare, as the master last said.
        self.retention: dict[int, float] = {}
        self._handoffs: dict[int, list[int]] = {}  # to -> blocks to offer it
        #: Handed-off blocks granted to us before their transfer came.
        self._handoff_due: dict[int, trio.Event] = {}
        self._handed_in: set[int] = set()  # ... and those that came first
        self._handoff_lost: set[int] = set()  # ... and those given up on
        self._send_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.stats = AgentStats()
        self.master_lost = trio.Event()
        self._left = False  # said Bye
        self.lease = 0.0  # the master's, once joined
        self._heard = 0.0  # when the master last said anything
        #: Rebuilds a dead host's blocks (the journal sets it): called with
        #: the dead node, its blocks, `report(blocks, installed, kept)`, which
        #: tells the master which are done, which are now in our cache, and
        #: which of those are copies newer than the rebuild; whether to
        #: follow its records to the blocks it had allocated; and whether to
        #: sweep them all (Recover.sweep).
        self.on_recover: Callable[[int, list[int], Report, bool, bool], Awaitable[None]] | None = (
            None
        )
        #: The hosts with records in the log (the journal sets it): a
        #: resume names them, for a master that knows nothing of them.
        self.log_marks: Callable[[], Awaitable[tuple[int, set[int]]]] | None = None
        #: Appends a peer's records for it (LogAppend), if we hold the LLOL
        #: (the journal sets it): called with the peer, and the records.
        self.on_log_append: Callable[[int, bytes], Awaitable[p.LogAppended]] | None = None
        #: The host we last saw take the LLOL (-1: none known).
        self.llol_holder = -1
        #: With the directory spread over the hosts (spread.py): the
        #: partition of the blocks this agent asks for, of how many; every
        #: host a master of it ever told us of; and who to tell when we fence.
        self.partition = (0, 1)
        self.ever_peers: set[int] = set()
        self.on_fence: Callable[[str], None] | None = None
        #: What our Stats report (spread.py: the whole host's counters).
        self.report_counters: Callable[[], dict[str, int]] | None = None
        self._log_asks: dict[int, _LogAsk] = {}

    @property
    def name(self) -> str:
        """What our log lines begin with."""
        k, parts = self.partition
        return f"host {self.host}" if parts == 1 else f"host {self.host} partition {k}"

    # -- start -------------------------------------------------------------------
    async def run(
        self,
        master: tuple[str, int],
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen for peers at listen_host (the address they reach us at; port 0:
        any), join the master, then serve until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    listeners = await nursery.start(
                        functools.partial(
                            trio.serve_tcp, self._peer_handler, listen_port, host=listen_host
                        )
                    )
                except OSError as e:
                    raise QuietError(
                        f"--peer-address {listen_host}:{listen_port}: cannot listen: "
                        f"{e.strerror or e}; give an address of this machine and a free port",
                        32,
                    ) from None
                self.peer_port = listeners[0].socket.getsockname()[1]
                self._master_addr, self._listen_host = master, listen_host
                link = await self._connect(master, listen_host)
                nursery.start_soon(self._sessions, link)
                nursery.start_soon(self._release_task)
                task_status.started()
        finally:
            # Our connections end with us: the master sees at once that we
            # are gone, rather than when our lease lapses.
            with trio.CancelScope(shield=True):
                for link in [self._master, *self._peer_links.values()]:
                    if link is not None:
                        await link.aclose()

    async def _connect(self, master: tuple[str, int], listen_host: str) -> AnyLink:
        where = f"master {master[0]}:{master[1]}"
        assert self.cache is not None
        join = p.Join(
            self.host,
            listen_host,
            self.peer_port,
            self.coherence,
            self.live_at_join,
            llol=self.cache.llol_block,
            partition=self.partition[0],
            partitions=self.partition[1],
        )
        try:
            # A master that has just started may hold joins back while the
            # hosts of its predecessor resume (a lease at most).
            with trio.fail_after(JOIN_TIMEOUT):
                link = await self._open_master(master)
                await self._welcomed(link, join, where)
        except trio.TooSlowError:
            raise QuietError(f"{where} did not answer; is it a sharedfs master?", 32) from None
        except (p.ProtocolError, LinkClosed) as e:
            raise QuietError(f"{where}: {e}; is it a sharedfs master?", 32) from None
        self._begin(link)
        log.info("%s: joined master %s:%d", self.name, *master)
        return link

    async def _open_master(self, addr: tuple[str, int]) -> AnyLink:
        """A link to the master at `addr`: a LocalLink if it runs in this
        process (lock requests to it then cost no network message)."""
        dial = self.local_masters.get(addr)
        if dial is not None:
            return dial()
        return await open_master(addr, self.key, self.host, exitcode=32, tls=self.tls)

    def _begin(self, link: AnyLink) -> None:
        """From here what we send goes to the master on `link`."""
        self._master = link
        self._up.set()
        # Offers the last master had not answered will not be answered.
        self._handoffs.clear()
        self.retention = {}
        if self.cache is not None:
            self.cache.declined([b for b in self.cache.offered if self._ours(b)])

    async def _welcomed(self, link: AnyLink, join: p.Join, where: str) -> None:
        """Send `join`, and take the master's Welcome (QuietError if it refuses)."""
        await link.send(join)
        while not isinstance(msg := await link.receive(), p.Welcome):
            if msg is None:
                raise LinkClosed("master closed the connection")
            if isinstance(msg, p.Refused):
                raise MasterRefused(f"{where} refused: {msg.reason}", 32)
        self._peers = dict(msg.peers)
        self.ever_peers |= set(msg.peers)
        self.master_node = msg.master_node
        self.lease = msg.lease
        self._heard = trio.current_time()
        assert self.cache is not None
        self.cache.see_scn(msg.scn)

    # -- sessions with the master --------------------------------------------------
    async def _sessions(self, link: AnyLink) -> None:
        """Serve the master; when it goes, hold our writes and resume with
        it when it is back (or fence)."""
        while True:
            reason = await self._session(link)
            if self.master_lost.is_set() or self._left:
                return
            resumed = await self._resume(reason)
            if resumed is None:
                return
            link = resumed

    async def _session(self, link: AnyLink) -> str:
        """Serve one connection to the master; why it ended.  Pings it sent
        that are still being served end with it: a master that takes us
        back rebuilds from what we hold once they have (and, should they
        ship a copy first, from the past image we keep of it)."""
        assert self._master is link  # _begin: before anything could be sent
        try:
            async with trio.open_nursery() as session:
                session.start_soon(self._lease_task, link)
                reason = await self._master_loop(link, session)
                session.cancel_scope.cancel()
        finally:
            self._master = None
            self._up = trio.Event()
            with trio.CancelScope(shield=True):
                await link.aclose()
        return reason

    async def _resume(self, reason: str) -> AnyLink | None:
        """Hold our writes and try the master until master_wait is up: a
        master that takes us back gets our report (Join.resume); one that
        refuses (it declared us dead), or none, fences us.  A master that
        was embedded in another host is followed by a successor once that
        host is dead on the volume (failover.py): we resume with that one."""
        assert self.cache is not None and self.cache.gate is not None
        if self.master_wait <= 0:
            self.fence(reason)
            return None
        # Held before anything else: the master may be declaring us dead.
        gate = self.cache.gate
        gate.hold(self)  # with the directory spread, each partition's hold is its own
        failover = self.can_fail_over()
        if not failover and self._peers and not await self._a_peer_answers():
            # Neither the master nor any other host: it is we who are cut
            # off.  (With failover, the volume tells: the master's host may
            # be dead, and we its only survivor.)
            self.fence(f"{reason}, and no other host answers")
            return None
        # Its host's death shows on the volume a heartbeat timeout late, as
        # watched every heartbeat interval (volume.SlotWatch).
        wait = self.master_wait + (HEARTBEAT_TIMEOUT + HEARTBEAT_INTERVAL if failover else 0.0)
        log.warning(
            "%s: lost the lock master (%s): holding writes, retrying for %.0f s",
            self.name,
            reason,
            wait,
        )
        deadline = trio.current_time() + wait
        limit = FAILOVER_ATTEMPT if failover else CONNECT_TIMEOUT
        while trio.current_time() < deadline and not self.master_lost.is_set():
            addr = await self._where() if failover else self._master_addr
            if addr is None:
                log.debug("%s: no master to resume with yet", self.name)
            try:
                link = None if addr is None else await self._resume_with(addr, deadline, limit)
            except MasterRefused as e:
                self.fence(str(e))
                return None
            if link is not None:
                assert addr is not None
                self.stats.resumes += 1
                self._master_addr = addr
                gate.open_gate(self)
                log.warning("%s: resumed with master %s:%d", self.name, *addr)
                return link
            await trio.sleep(RECONNECT_INTERVAL)
        self.fence(f"the lock master was gone for {wait:.0f} s ({reason})")
        return None

    def can_fail_over(self) -> bool:
        """Our master is embedded in another host: if that host dies, the
        volume says who takes its place (failover.py)."""
        return self.failover is not None and self.failover.covers(self.master_node, self.host)

    async def _where(self) -> tuple[str, int] | None:
        """The master to try: ours, or its successor's."""
        assert self.failover is not None
        with contextlib.suppress(StorageError):  # the slots unreadable now: try again
            return await self.failover.where(self.master_node, self._master_addr)
        return None

    async def _resume_with(
        self, addr: tuple[str, int], deadline: float, limit: float
    ) -> AnyLink | None:
        """A session resumed with the master at `addr` within `limit`
        seconds; None if it is not there (yet); MasterRefused if it will
        not take us back."""
        where = f"master {addr[0]}:{addr[1]}"
        try:
            left = deadline - trio.current_time()
            with trio.fail_after(max(0.1, min(limit, left))):
                link = await self._open_master(addr)
                try:
                    await self._rejoin(link, where)
                except BaseException:
                    with trio.CancelScope(shield=True):
                        await link.aclose()
                    raise
        except MasterRefused:
            raise
        except (QuietError, p.ProtocolError, LinkClosed, trio.TooSlowError, OSError) as e:
            log.debug("%s: no resume with %s: %s", self.name, where, e.__class__.__name__)
            return None
        return link

    async def _a_peer_answers(self) -> bool:
        """Can we reach any other host (an authenticated handshake)?"""
        answered = False

        async def probe(addr: tuple[str, int]) -> None:
            # Each handshake is finished, not cut short when another
            # answers: the peer would log a broken one.
            nonlocal answered
            with contextlib.suppress(OSError, LinkClosed, p.ProtocolError, trio.TooSlowError):
                stream = await trio.open_tcp_stream(*addr)
                try:
                    await Link.open(stream, self.key, self.host, initiator=True, tls=self.tls)
                    answered = True
                finally:
                    await stream.aclose()

        with trio.move_on_after(PROBE_TIMEOUT):
            async with trio.open_nursery() as n:
                for addr in list(self._peers.values()):
                    n.start_soon(probe, addr)
        return answered

    async def _rejoin(self, link: AnyLink, where: str) -> None:
        """Report what we hold, then ask again for what we still wait for:
        requests and writes the old master took with it."""
        assert self.cache is not None
        version, marks = await self.log_marks() if self.log_marks is not None else (0, set())
        async with self._send_lock:
            # What we hold is in the report: releases of what we let go are
            # no longer news.  Nothing awaits between here and the send, so
            # the report is one moment of the cache.
            self._releases.clear()
            held, pis = self._holdings()
            join = p.Join(
                self.host,
                self._listen_host,
                self.peer_port,
                self.coherence,
                tuple(sorted(self._peers)),
                True,
                held,
                pis,
                tuple(sorted(marks - {self.host})),
                version,
                self.cache.llol_block,
                *self.partition,
            )
            await self._welcomed(link, join, where)
            # What others send goes after what we send now (we hold the
            # send lock).
            self._begin(link)
            scn = self.cache.scn
            for pend in list(self._pending.values()):
                if not pend.done.is_set():
                    blocks = tuple(sorted(pend.blocks))
                    req = p.LockRequest(
                        pend.req, blocks, int(pend.mode), scn, pend.op_start, pend.recovery
                    )
                    await link.send(req)
            if self._write_wanted:
                await link.send(p.WriteRequest(tuple(self._write_wanted.items()), scn))

    def _holdings(
        self,
    ) -> tuple[tuple[tuple[int, int, int, bool], ...], tuple[tuple[int, int], ...]]:
        """Join.held and Join.pis: our cached copies, with what requests in
        flight were granted or shipped (it may not be in the cache yet)."""
        assert self.cache is not None
        held = {b: h for b, h in self.cache.holdings().items() if self._ours(b)}
        for pend in self._pending.values():
            for b in pend.granted | set(pend.arrived):
                t = pend.arrived.get(b)
                mine = held.get(b)
                if mine is not None and mine[1] >= pend.mode:
                    continue
                if t is not None:
                    version, dirty = t.version, t.dirty
                elif mine is not None:
                    # An upgrade granted in place: our copy, as it is.  (As
                    # version 0, clean, it read as storage's: a rebuild then
                    # took the newest past image for what storage has.)
                    version, dirty = mine[2], mine[3]
                else:
                    version, dirty = 0, False  # to be read from storage
                held[b] = (b, int(pend.mode), version, dirty)
        pis = tuple(pi for pi in self.cache.pis.newest_versions() if self._ours(pi[0]))
        return tuple(held.values()), pis

    def _ours(self, block: int) -> bool:
        """Is `block` of the partition this agent asks for (spread.py)?"""
        k, parts = self.partition
        return partition_of(block, parts) == k

    # -- requests ------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def taking(
        self, blocknos: list[int], mode: Mode, op_start: float = 0.0, recovery: bool = False
    ) -> AsyncIterator[dict[int, p.Transfer]]:
        """Get `mode` on these blocks in one request, and yield the copies
        other hosts shipped; inside, the caller takes what it was granted
        into its cache.  Pings for the blocks wait until it has: a block
        taken away between its grant and the caller's storage read would be
        read stale and held as if granted.  Raises OpRetry if the operation
        must back off.  recovery: asked while rebuilding a dead host's blocks,
        or registering blocks we allocated (protocol.LockRequest)."""
        pend = await self._acquire(blocknos, mode, op_start, recovery)
        try:
            yield pend.arrived
        finally:
            self._used(pend)

    async def _acquire(
        self, blocknos: list[int], mode: Mode, op_start: float, recovery: bool
    ) -> Pending:
        assert self.cache is not None
        req = next(self._reqs)
        pend = Pending(req, set(blocknos), mode, op_start, recovery)
        self._pending[req] = pend
        self.stats.lock_requests += 1
        self.stats.blocks_requested += len(blocknos)
        sent = time.perf_counter()
        try:
            await self._send_master(
                p.LockRequest(req, tuple(blocknos), int(mode), self.cache.scn, op_start, recovery)
            )
            await self.cache.wait_for_grant(pend)
            self.stats.lock_wait_us += round((time.perf_counter() - sent) * 1e6)
        except BaseException as e:
            # Backed off or cancelled: the master still grants the request
            # (one cancelled before it was sent is asked again of a master
            # that comes back), and what other hosts ship for it is the
            # newest copy there is, so it goes into the cache whenever it
            # arrives.
            if isinstance(e, OpRetry):
                self.stats.retries += 1
            pend.abandoned = True
            if pend.done.is_set():
                self._finish(pend)
            raise
        self._check_fenced()
        return pend

    def _check_fenced(self) -> None:
        """What waited for the master fails once we are fenced."""
        if self.master_lost.is_set():
            assert self.cache is not None
            raise Fenced(f"fenced ({self.cache.fenced})")

    def _finish(self, pend: Pending) -> None:
        """A request is complete.  If its asker has given up meanwhile, its
        arrivals go into the cache all the same (they may be the newest
        copies there are)."""
        if pend.abandoned:
            assert self.cache is not None
            self.cache.install(pend.arrived, pend.blocks, pend.mode)
            self._used(pend)

    def _used(self, pend: Pending) -> None:
        self._pending.pop(pend.req, None)
        pend.used.set()

    def asking(self, blockno: int) -> bool:
        """Whether a request of ours for `blockno` is in flight (an
        abandoned one too: its grant still comes, and makes us its holder)."""
        return any(blockno in pend.blocks for pend in self._pending.values())

    def release_block(self, blockno: int) -> None:
        self._releases.append(blockno)

    def handoff(self, blockno: int, to: int) -> None:
        """Offer a block we are about to evict to `to` (protocol.Handoff);
        the cache keeps it until the master pings us for it, or declines."""
        self._handoffs.setdefault(to, []).append(blockno)

    async def _release_task(self) -> None:
        """Releases also go out on their own, batched, when nothing else does;
        and now and then our counters, for `sharedfs status`."""
        ticks = 0
        with contextlib.suppress(LinkClosed):  # fenced: nothing more to say
            while True:
                await trio.sleep(0.05)
                if self._releases or self._handoffs:
                    await self._send_master(None)
                ticks += 1
                if ticks % STATS_TICKS == 0:
                    counters = (self.report_counters or self.counters)()
                    spare = self.cache.spare() if self.cache is not None else -1.0
                    await self._send_master(p.Stats(self.host, counters, spare))

    async def _lease_task(self, link: AnyLink) -> None:
        """Renew our lease; end the session once the master has been silent
        for most of one: by the time it declares us dead, our writes are
        held (a master we cannot hear may already have)."""
        tick = self.lease / 4
        while True:
            before, cpu, loop_cpu = trio.current_time(), time.process_time(), time.thread_time()
            await trio.sleep(tick)
            if (late := trio.current_time() - before - tick) > tick:
                # Nothing ran here meanwhile, Beats included: a stall this
                # long can cost the lease of a host that is alive and well.
                # The CPU it took says whether we were busy (this thread:
                # code holding the loop) or got no CPU at all.
                log.warning(
                    "host %d: event loop stalled for %.1f s (lease %.1f s; CPU meanwhile"
                    " %.1f s, %.1f s of it the loop's)",
                    self.host,
                    late,
                    self.lease,
                    time.process_time() - cpu,
                    time.thread_time() - loop_cpu,
                )
            if trio.current_time() - self._heard > self.lease * 0.75:
                # After a stall of our own, what the master sent meanwhile
                # (Beats; a PeerDown) may be unread yet: read it first.
                await trio.sleep(min(0.2, tick / 4))
            if trio.current_time() - self._heard > self.lease * 0.75:
                log.warning("%s: no word from the master for %.1f s", self.name, self.lease * 0.75)
                await link.aclose()  # the session ends
                return
            try:
                await self._send_master(p.Beat())
            except LinkClosed:
                return  # fenced meanwhile (spread.py: by another partition's agent)

    def fence(self, reason: str) -> None:
        """Stop writing to storage: this host's locks may be someone else's."""
        if self.master_lost.is_set() or self._left:
            return
        log.error("%s: fenced: %s; the mount returns EIO until remounted", self.name, reason)
        assert self.cache is not None
        self.cache.fence(reason)
        self.master_lost.set()
        # Whatever waits for the master fails now (_check_fenced).
        self._up.set()
        for pend in self._pending.values():
            pend.done.set()
        for ev in self._written.values():
            ev.set()
        self._answer_log_asks(None)
        if self.on_fence is not None:
            self.on_fence(reason)

    def withdraw(self, reason: str) -> None:
        """Our storage failed a write (the Fence closed itself): stop as a
        fenced host does, and close our connection, so that the master
        recovers what we held now, not when our lease lapses."""
        self.fence(reason)
        if self._nursery is not None and self._master is not None:
            self._nursery.start_soon(self._master.aclose)

    def live_nodes(self) -> list[int]:
        """This host and the peers the master says are up."""
        return [self.host, *self._peers]

    async def bye(self) -> None:
        """Leaving cleanly (all we changed is on storage): the master can
        drop our locks without recovering anything."""
        self._left = True
        if self._master is not None and not self.master_lost.is_set():
            with trio.move_on_after(CONNECT_TIMEOUT), contextlib.suppress(LinkClosed):
                await self._send_master(p.Bye(), deliver=True)

    def describe(self) -> list[str]:
        """Requests in flight and writes waited for (a state dump)."""
        out = [
            f"request {p.req}: {p.mode.name} {sorted(p.blocks)} granted {sorted(p.granted)} "
            f"awaiting {sorted(p.await_transfer)} done {p.done.is_set()} "
            f"abandoned {p.abandoned}"
            for p in self._pending.values()
        ]
        if self._written:
            out.append(f"write notifications awaited: {sorted(self._written)}")
        assert self.cache is not None
        return out + self.cache.describe()

    def counters(self) -> dict[str, int]:
        assert self.cache is not None
        out = {f"agent_{k}": getattr(self.stats, k) for k in AgentStats.__slots__}  # type: ignore[attr-defined]
        out.update(self.cache.counters())
        return out

    async def write_request(self, blocks: list[tuple[int, int]], bin: int = 0) -> None:
        """Ask the master to get these versions onto storage; return when
        storage has them (claims 1, 30, 58), or has all it can for now (our
        own copy changed by an operation still running: what it wrote is
        the version before, and the copy stays dirty).  The master answers
        only with a version that covers what we asked, or with that."""
        assert self.cache is not None
        events = []
        for b, v in blocks:
            ev = self._written.get(b)
            if ev is None:
                ev = self._written[b] = trio.Event()
            events.append(ev)
            # Asked again of a master that comes back (_rejoin).
            self._write_wanted[b] = max(self._write_wanted.get(b, 0), v)
        self.stats.write_requests += 1
        await self._send_master(p.WriteRequest(tuple(blocks), self.cache.scn, bin))
        for ev in events:
            await ev.wait()
        self._check_fenced()

    def write_done(self, blocks: list[tuple[int, int]]) -> None:
        """Storage has these versions of global blocks (claim 34)."""
        assert self._nursery is not None and self.cache is not None
        self._nursery.start_soon(self._deliver, p.WriteDone(tuple(blocks), self.cache.scn))

    async def _deliver(self, msg: p.Message) -> None:
        with contextlib.suppress(LinkClosed):  # fenced: nothing more to say
            await self._send_master(msg, deliver=True)

    async def _send_master(self, msg: p.Message | None, *, deliver: bool = False) -> None:
        """Send to the master, releases first: a Release must never reach the
        master after a later request for the same block, or it would drop
        the hold that request just got.

        Between sessions a message is dropped, unless `deliver`: it waits
        for the next session.  Most need not wait: a resume reports what we
        hold and asks again for what we wait for, and a PingDone is about a
        ping of the master that went.  What storage has (WriteDone) and
        rebuilds (RecoverDone) are news to the next one.  LinkClosed once
        fenced."""
        while True:
            if self.master_lost.is_set():
                raise LinkClosed("fenced")
            link = self._master
            if link is None:
                if not deliver:
                    return
                await self._up.wait()
                continue
            async with self._send_lock:
                if link is not self._master:
                    continue
                try:
                    while self._releases:
                        batch = tuple(self._releases[:RELEASE_BATCH])
                        del self._releases[:RELEASE_BATCH]
                        await link.send(p.Release(batch))
                    while self._handoffs:
                        to, blocks = self._handoffs.popitem()
                        await link.send(p.Handoff(tuple(blocks), to))
                    if msg is not None:
                        await link.send(msg)
                    return
                except LinkClosed:
                    # The session ends (its receive loop sees the link go).
                    await link.aclose()
                    if not deliver:
                        return

    # -- from the master -------------------------------------------------------------
    async def _master_loop(self, link: AnyLink, session: trio.Nursery) -> str:
        """Handle what the master sends until the link ends; why it did."""
        assert self._nursery is not None and self.cache is not None
        try:
            while (msg := await link.receive()) is not None:
                self._heard = trio.current_time()
                self.cache.see_scn(getattr(msg, "scn", 0))
                written = getattr(msg, "written", ())
                if written:
                    self._notified(written)
                if isinstance(msg, p.Grant):
                    self._on_grant(msg)
                elif isinstance(msg, p.Ping):
                    session.start_soon(self._serve_ping, msg)
                elif isinstance(msg, p.Primary):
                    self.cache.made_primary(msg.blocks)
                elif isinstance(msg, p.Retention):
                    self.retention = dict(msg.spare)
                elif isinstance(msg, p.Handoff):
                    self.cache.declined(msg.blocks)
                elif isinstance(msg, p.WritePerform):
                    self._nursery.start_soon(self._perform, msg)
                elif isinstance(msg, p.Recover):
                    self._nursery.start_soon(self._recover, msg)
                elif isinstance(msg, p.PeerUp):
                    self._peers[msg.node] = (msg.host, msg.port)
                    self.ever_peers.add(msg.node)
                    old = self._peer_links.pop(msg.node, None)  # to its last life
                    if old is not None:
                        self._nursery.start_soon(old.aclose)
                elif isinstance(msg, p.PeerDown):
                    self._peers.pop(msg.node, None)
                    gone = self._peer_links.pop(msg.node, None)
                    if gone is not None:
                        self._nursery.start_soon(gone.aclose)
        except p.ProtocolError as e:
            log.error("%s: bad message from the master: %s", self.name, e)
            return f"bad message from the master: {e}"
        except LinkClosed as e:
            return f"lost the connection to the lock master: {e}"
        return "lost the connection to the lock master"

    def _on_grant(self, msg: p.Grant) -> None:
        if msg.req == p.HANDOFF:
            self._handoff_granted(msg)
            return
        pend = self._pending.get(msg.req)
        if pend is None:
            return  # already complete: its transfer was the grant
        pend.granted.update(msg.blocks)
        if msg.transfer:
            pend.await_transfer.update(b for b in msg.blocks if b not in pend.arrived)
        pend.check()
        if pend.done.is_set():
            self._finish(pend)

    def _notified(self, written: Iterable[tuple[int, int]]) -> None:
        assert self.cache is not None
        written = list(written)
        self.stats.notifications += len(written)
        self.cache.notified(written)
        for b, _ in written:
            self._write_wanted.pop(b, None)
            ev = self._written.pop(b, None)
            if ev is not None:
                ev.set()

    async def _serve_ping(self, msg: p.Ping) -> None:
        """Ship `block` to the requester (or just drop it) and tell the master."""
        with self._fence_on_failure(f"serving a ping for block {msg.block}"):
            await self._ship(msg)

    @contextlib.contextmanager
    def _fence_on_failure(self, what: str) -> Iterator[None]:
        """A failure to write what the master asked for, or to answer it,
        leaves the master waiting on a host it can no longer trust: fence.
        (Once fenced, writes fail as a matter of course: no more to say.)"""
        try:
            yield
        except (StorageError, LinkClosed) as e:
            self.fence(f"{what} failed: {e}")

    async def _ship(self, msg: p.Ping) -> None:
        assert self.cache is not None
        # The master granted us this block and then pinged us for it (the
        # grant came first on its link): let the data on its way land first.
        # A request of ours still queued is not about this hold: no waiting.
        for pend in list(self._pending.values()):
            if msg.block in pend.granted and msg.block in pend.blocks:
                await pend.used.wait()
        await self._handoff_landed(msg.block)
        shipped = await self.cache.give_up(msg)
        if msg.block == self.cache.llol_block:
            self.llol_holder = msg.to
        if msg.to == -1:
            self.stats.revokes_served += 1
        else:
            self.stats.pings_served += 1
            t = p.Transfer(
                msg.req,
                msg.block,
                msg.mode,
                shipped.version,
                shipped.dirty,
                shipped.writing,
                self.cache.scn,
                msg.final,
                shipped.btype,
                shipped.data,
                shipped.via_storage,
                msg.primary and not shipped.via_storage,
                shipped.age,
            )
            # Once handed over, the copy goes out even if the master's link
            # ends meanwhile: our past image and the receiver's request,
            # asked again of a master that takes us back, expect it.
            with trio.CancelScope(shield=True), trio.move_on_after(CONNECT_TIMEOUT):
                await self._send_peer(msg.to, t)
            self.stats.transfers_sent += 1
        done = p.PingDone(
            msg.block,
            msg.to,
            msg.keep if shipped.cached else int(Mode.N),  # none to keep: asked to keep S
            shipped.pi,
            shipped.version,
            shipped.was_dirty,
            shipped.writing,
            self.cache.scn,
        )
        await self._send_master(done)

    async def _perform(self, msg: p.WritePerform) -> None:
        assert self.cache is not None
        self.stats.write_performs += 1

        async def report(written: list[tuple[int, int]]) -> None:
            assert self.cache is not None
            if written:
                await self._send_master(p.WriteDone(tuple(written), self.cache.scn), deliver=True)

        with self._fence_on_failure(f"writing {len(msg.blocks)} blocks for the master"):
            if msg.check:
                await self.cache.perform_write_checked(list(msg.blocks), report)
            else:
                await self.cache.perform_write(list(msg.blocks), report)

    async def _recover(self, msg: p.Recover) -> None:
        """Rebuild what a dead host held (the journal does it)."""
        assert self.on_recover is not None and self.cache is not None
        log.warning(
            "%s: recovering %d blocks of dead node %d", self.name, len(msg.blocks), msg.dead
        )

        async def report(
            blocks: list[int], installed: list[int], kept: list[tuple[int, int]]
        ) -> None:
            assert self.cache is not None
            await self._send_master(
                p.RecoverDone(
                    msg.dead,
                    tuple(blocks),
                    tuple(installed),
                    self.cache.scn,
                    tuple(kept),
                    msg.sweep,
                ),
                deliver=True,
            )

        try:
            await self.on_recover(msg.dead, list(msg.blocks), report, msg.follow, msg.sweep)
        except Exception as e:  # noqa: BLE001 - any failure: we cannot be trusted either
            self.fence(f"recovery of node {msg.dead} failed: {e}")
            return
        log.info("%s: recovered node %d", self.name, msg.dead)

    # -- peers -------------------------------------------------------------------------
    async def _send_peer(self, node: int, msg: p.Message) -> bool:
        """Send to a peer; False if it could not be reached.  One that
        cannot be reached has died or is being fenced: what we send it is
        lost, as it would be with the peer, and the master recovers what
        that peer should have had."""
        lock = self._peer_locks.setdefault(node, trio.Lock())
        async with lock:
            # A link we keep may be to the peer's last life (it restarted in
            # its slot, and no master was there to say it went): once more
            # on a new one.
            for fresh in (False, True):
                try:
                    link = self._peer_links.get(node)
                    if link is None:
                        addr = self._peers.get(node)
                        if addr is None:
                            raise LinkClosed("the master says it is down")
                        stream = await trio.open_tcp_stream(*addr)
                        link = await Link.open(
                            stream, self.key, self.host, initiator=True, tls=self.tls
                        )
                        self._peer_links[node] = link
                        assert self._nursery is not None
                        self._nursery.start_soon(self._watch_peer, node, link)
                        fresh = True
                    await link.send(msg)
                    return True
                except (OSError, LinkClosed, p.ProtocolError, trio.TooSlowError) as e:
                    self._peer_links.pop(node, None)
                    if fresh:
                        log.warning("%s: peer %d unreachable: %s", self.name, node, e)
                        return False
        return False

    async def _watch_peer(self, node: int, link: Link) -> None:
        """Nothing comes back on our link to a peer: it ends when the peer
        does, or when we drop it (PeerDown), and so does any LogAppend
        waiting on that peer (a master gone too sends no PeerDown)."""
        try:
            with contextlib.suppress(p.ProtocolError, LinkClosed):
                await link.receive()
        finally:
            if self._peer_links.get(node) is link:
                del self._peer_links[node]
            self._answer_log_asks(node)
            await link.aclose()

    async def _peer_handler(self, stream: trio.SocketStream) -> None:
        try:
            with self._handshakes.slot():
                link = await Link.open(stream, self.key, self.host, initiator=False, tls=self.tls)
            while (msg := await link.receive()) is not None:
                if isinstance(msg, p.Transfer):
                    self._on_transfer(msg)
                elif isinstance(msg, p.LogAppend):
                    assert self._nursery is not None
                    self._nursery.start_soon(self._append_for, link.peer_node, msg)
                elif isinstance(msg, p.LogAppended):
                    self._on_log_appended(link.peer_node, msg)
                else:
                    raise p.ProtocolError(f"peer sent {type(msg).__name__}")
        except (p.ProtocolError, LinkClosed, trio.TooSlowError) as e:
            if isinstance(e, p.ProtocolError):
                self.stats.peer_rejected += 1
            log.warning("%s: dropped a peer connection: %s", self.name, e)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _on_transfer(self, msg: p.Transfer) -> None:
        assert self.cache is not None
        self.cache.see_scn(msg.scn)
        self.stats.transfers_received += 1
        if msg.req == p.HANDOFF:
            self._handed(msg)
            return
        pend = self._pending.get(msg.req)
        if pend is None or msg.block not in pend.blocks:
            log.warning("%s: transfer of block %d for no request", self.name, msg.block)
            return
        old = pend.arrived.get(msg.block)
        if old is not None and old.version > msg.version:
            # The request was asked again of a master that came back: the
            # copy the old one had sent is older than this (or as old).
            return
        pend.arrived[msg.block] = msg
        pend.await_transfer.discard(msg.block)
        if msg.final:
            pend.granted.add(msg.block)
        pend.check()
        if pend.done.is_set():
            self._finish(pend)

    # -- blocks other hosts handed us (Handoff) -----------------------------------------
    # Its transfer is the grant (the giver was its only holder), but the
    # master's Grant can come first, and a ping for the block after it:
    # that ping waits for the copy, or it would find nothing to give up,
    # and the copy landing later would be held here unknown to the master.
    def _handed(self, msg: p.Transfer) -> None:
        assert self.cache is not None
        if msg.block in self._handoff_lost:
            self._handoff_lost.discard(msg.block)
            return
        if not self.cache.take_handoff(msg):
            self.release_block(msg.block)  # its giver had let it go: no copy came
        ev = self._handoff_due.pop(msg.block, None)
        if ev is None:
            self._handed_in.add(msg.block)
        else:
            ev.set()

    def _handoff_granted(self, msg: p.Grant) -> None:
        for b in msg.blocks:
            if b in self._handed_in:
                self._handed_in.discard(b)
            elif msg.transfer:
                self._handoff_due[b] = trio.Event()
            else:
                # Its giver died before its PingDone: granted from storage.
                # What it sent, if anything, may come after a ping took the
                # block from us again: not ours to keep.
                self._handoff_lost.add(b)

    async def _handoff_landed(self, block: int) -> None:
        ev = self._handoff_due.get(block)
        if ev is None:
            return
        with trio.move_on_after(CONNECT_TIMEOUT):
            await ev.wait()
        if not ev.is_set():
            # Its giver never got it to us (it died, or could not reach
            # us): a copy that lands after this ping is not ours to keep.
            del self._handoff_due[block]
            self._handoff_lost.add(block)
            log.warning("%s: handed block %d never came", self.name, block)

    # -- the log's tail, host to host --------------------------------------------------
    async def ship_log(self, records: bytes) -> p.LogAppended | None:
        """Ask the host we last saw take the LLOL to append `records` for us
        (LogAppend); its answer, or None if there is none to ask or it went
        away first.  A refusal names the host it gave the LLOL to, which we
        then take for its holder."""
        node = self.llol_holder
        if node < 0 or node == self.host or node not in self._peers:
            return None
        req = next(self._reqs)
        ask = self._log_asks[req] = _LogAsk(node)
        try:
            if not await self._send_peer(node, p.LogAppend(req, records)):
                return None
            # An answer lost on the way would leave us waiting: after this
            # long we append them ourselves (a record twice in the log is
            # harmless: replay skips one older than the block it reached).
            with trio.move_on_after(max(1.0, self.lease * LOG_ASK_LEASES)):
                await ask.done.wait()
        finally:
            del self._log_asks[req]
        reply = ask.reply
        if reply is not None and not reply.ok:
            self.llol_holder = reply.holder
        return reply

    def _on_log_appended(self, node: int, msg: p.LogAppended) -> None:
        ask = self._log_asks.get(msg.req)
        if ask is None or ask.node != node:
            log.warning("%s: answer from %d to no log append of ours", self.name, node)
            return
        ask.reply = msg
        ask.done.set()

    def _answer_log_asks(self, node: int | None) -> None:
        """The asks waiting on `node` (None: every one) get no answer."""
        for ask in self._log_asks.values():
            if node is None or ask.node == node:
                ask.done.set()

    async def _append_for(self, node: int, msg: p.LogAppend) -> None:
        """Serve a peer's LogAppend; refused unless we hold the LLOL."""
        reply = p.LogAppended(msg.req, False, -1, 0, 0, 0)
        if self.on_log_append is not None:
            try:
                reply = replace(await self.on_log_append(node, msg.records), req=msg.req)
            except StorageError as e:  # fenced, or the volume failed: the asker appends
                log.warning("%s: cannot append node %d's records: %s", self.name, node, e)
        await self._send_peer(node, reply)

    def close(self) -> None:
        pass
