"""The lock master: the trio service hosts talk to, and a local stand-in.

`MasterService` serves the Cache Fusion protocol (decisions in directory.py)
to hosts over authenticated TCP; `sharedfs master` runs it alone and a mount
without `--master` runs it beside its own host.  A master that has just
started, or that heard from no host for a lease (it was the one cut off),
knows nothing of the locks the hosts hold: for a while (the rebuild window)
it takes back hosts that resume, rebuilds its directory from what they
report, and serves nobody until every host that may hold locks is back
(docs/PROTOCOL.md, Resume).  `LockMaster` is the in-process resource
directory that single-process tools (mkfs, fsck repairs)
and the core's unit tests use: a conflicting request waits until the hold is
released.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import signal
import sys
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict

import trio

from . import protocol as p
from .cli_util import Parser, notify_systemd, parse_address_arg, run_tool, setup_logging
from .debug import dump_on_signal, watch_loop
from .directory import Directory
from .errors import QuietError
from .link import AnyLink, Handshakes, Link, LinkClosed, LocalLink, parse_address
from .metrics import Sample, counter_samples, serve_metrics
from .protocol import HostId, Mode, Resource, partition_of
from .storage import open_volume
from .tls import Tls, add_tls_arg, load_tls
from .volume import open_superblock

log = logging.getLogger(__name__)

#: How long a write notification waits for a message to ride on (claim 14).
NOTIFY_DELAY = 0.2
#: A host the master hears nothing from for this long is dead (seconds).
DEFAULT_LEASE = 10.0
#: After a host's connection closes without a Bye, how long its writes
#: still on their way to storage get before its blocks are rebuilt.  (It
#: fences itself the moment it sees the connection go.)
CLOSE_GRACE = 0.5
#: How long a host rejoining in a slot whose recovery is running waits.
JOIN_WAIT = 30.0
#: How long a master that knows nothing (it has just started, or lost every
#: host at once) waits for hosts to resume, in leases.
REBUILD_LEASES = 2.0
#: Rates in status are over this many seconds of counters, sampled each second.
RATE_WINDOW = 10
#: Messages queued for one host at most.  An honest host reads what it is
#: sent (a ping per block it holds that others ask for: bursts of thousands);
#: one that stops reading must not make the master queue without bound.
OUTBOX_MAX = 1 << 16

#: (when, the master's counters, each host's counters)
_CounterSample = tuple[float, dict[str, int], dict[int, dict[str, int]]]


#: Messages that keep the cluster's bookkeeping, not its locks: not counted
#: in the messages per transfer or per commit.
_UPKEEP = (p.Beat, p.Stats, p.StatusRequest, p.StatusReply, p.Retention)


class LockMaster:
    """Attributes:
    holders: resource -> {host: mode}; a resource held by nobody is absent.
    requests, grants, waits: counters for status and tests.
    """

    def __init__(self) -> None:
        self.holders: dict[Resource, dict[HostId, Mode]] = {}
        self._released: dict[Resource, trio.Event] = defaultdict(trio.Event)
        self.requests = 0
        self.grants = 0
        self.waits = 0

    def _grantable(self, host: HostId, res: Resource, mode: Mode) -> bool:
        return all(h == host or m.compatible(mode) for h, m in self.holders.get(res, {}).items())

    async def acquire(self, host: HostId, resources: list[Resource], mode: Mode) -> None:
        """Grant `mode` on every resource in `resources` to `host` (one request)."""
        self.requests += 1
        for res in resources:
            while not self._grantable(host, res, mode):
                self.waits += 1
                await self._released[res].wait()
            held = self.holders.setdefault(res, {})
            held[host] = max(mode, held.get(host, Mode.N))
            self.grants += 1

    def release(self, host: HostId, res: Resource, mode: Mode = Mode.N) -> None:
        """Lower `host`'s hold on `res` to `mode` (N drops it)."""
        held = self.holders.get(res)
        if held is None or host not in held:
            return
        if mode is Mode.N:
            del held[host]
            if not held:
                del self.holders[res]
        else:
            held[host] = mode
        ev = self._released.pop(res, None)
        if ev is not None:
            ev.set()

    def release_all(self, host: HostId) -> None:
        for res in [r for r, held in self.holders.items() if host in held]:
            self.release(host, res)


class MasterService:
    """The lock master as a trio TCP service: one session per host, the
    directory deciding, a sender task per host so that one slow host never
    holds up the others.  `sharedfs master` runs it alone; a mount without
    --master runs it beside its own host.

    Attributes:
        directory: the resource directory (directory.py).
        port: the port it listens on, once started.
        refused: connections refused (bad key, malformed frames, slot taken).
        rejected_frames: frames refused (forged, replayed, malformed); each
            ends its connection, so a hostile peer costs one count and one
            log line per connection.
        lease: seconds a host may stay silent before it is declared dead.
        node: the host this master is embedded in (-1: standalone); the
            hosts learn it from the Welcome, and elect a successor when
            that host dies (failover.py).
        may_serve: for an embedded master, whether its host may still
            write (its disk lease): once not, the master stops before it
            sends anything more, since a successor may be serving.
        volume_blocks: the volume's size in blocks (None: not known, as in
            unit tests); a host that names a block past it is dropped,
            since no honest one does and the directory would keep state
            for it.
        on_minority: for an embedded master, called (with why) once it
            hears fewer than half of its hosts, its own included: it stops
            before it declares any of them dead, and its host fences
            itself, so that the majority elects a successor (failover.py)
            rather than going on without writes.
    """

    def __init__(
        self,
        key: bytes,
        *,
        coherence: str = "fusion",
        host_slots: int = 64,
        lease: float = DEFAULT_LEASE,
        tls: Tls | None = None,
        node: int = -1,
        dead: frozenset[int] = frozenset(),
        peer_reads: bool = False,
        handoffs: bool = True,
        volume_blocks: int | None = None,
        partition: tuple[int, int] = (0, 1),
        expect: frozenset[int] = frozenset(),
    ) -> None:
        """`dead`: hosts known to be dead (a successor's predecessor): the
        rebuild window need not wait for them to resume.  `peer_reads`:
        Directory.peer_reads.  `handoffs`: with peer reads, tell the hosts
        where their evictions may go (Retention, Handoff).  `partition`: (k, of how many): with the
        directory spread over the hosts (spread.py), this master serves
        only the blocks of part k.  `expect`: hosts known to hold locks,
        waited for as a resume says of the others (spread.py: every live
        host, when a partition changes hands)."""
        self.volume_blocks = volume_blocks
        self._expect = set(expect)
        self.partition = partition
        self.key = key
        self.tls = tls
        #: What our log lines begin with.
        self.name = "master" if partition[1] == 1 else f"master of partition {partition[0]}"
        self.directory = Directory(coherence, peer_reads=peer_reads, owns=self._owns)
        self.directory.name = self.name
        self.host_slots = host_slots
        self.lease = lease
        self.port = 0
        self.refused = 0
        self.rejected_frames = 0
        self._heard: dict[int, float] = {}
        self._scopes: dict[int, trio.CancelScope] = {}
        self._said_bye: set[int] = set()
        self._dying: set[int] = set()
        self._handshakes = Handshakes()
        self._links: dict[int, AnyLink] = {}
        self._outboxes: dict[int, trio.MemorySendChannel[p.Message]] = {}
        self._peers: dict[int, tuple[str, int]] = {}
        self._host_stats: dict[int, dict[str, int]] = {}
        self._spare: dict[int, float] = {}  # node -> its last Stats.spare (--peer-reads)
        self.handoffs = handoffs
        self._samples: deque[_CounterSample] = deque(maxlen=RATE_WINDOW + 1)
        self._nursery: trio.Nursery | None = None
        # The rebuild window: open (not set) while hosts may still resume.
        self._rebuilt = trio.Event()
        self._window_end = 0.0
        self._expected: set[int] = set()  # hosts that may hold locks
        self._marks: tuple[int, tuple[int, ...]] = (-1, ())  # newest report of the log's
        self._resumed: set[int] = set()
        self._backlog: list[tuple[int, p.Message]] = []  # theirs, until settled
        self._forgotten: set[int] = set()  # cut off by _forget: not dead
        self.node = node
        self._dead = set(dead)
        self.may_serve: Callable[[], bool] = lambda: True
        self.on_minority: Callable[[str], None] = lambda why: None

    def _owns(self, block: int) -> bool:
        k, parts = self.partition
        return partition_of(block, parts) == k

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve without a listener of our own: the host's MasterPort hands
        us the links of our partition (spread.py)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_tasks(nursery)
            task_status.started()

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self._notify_task)
        nursery.start_soon(self._lease_task)
        nursery.start_soon(self._sample_task)
        self._open_window(self._expect)

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, self._handle, port, host=host)
                )
            except OSError as e:
                raise QuietError(
                    f"cannot listen on {host}:{port}: {e.strerror or e}; "
                    "is another master running there?",
                    1,
                ) from None
            self.port = listeners[0].socket.getsockname()[1]
            log.info("%s: listening on %s:%d", self.name, host, self.port)
            self._start_tasks(nursery)
            task_status.started(self.port)

    def _serving(self) -> bool:
        """May we answer still?  If not, stop."""
        ok = self.may_serve()
        if not ok:
            self.stop("its host's disk lease is up")
        return ok

    def stop(self, why: str) -> None:
        """Serve no more (an embedded master whose host may no longer
        write): every connection drops, and the hosts elect a successor."""
        if not self._stopped:
            assert self._nursery is not None
            log.warning("%s: stopping: %s", self.name, why)
            self._nursery.cancel_scope.cancel()

    @property
    def _stopped(self) -> bool:
        """Not serving: not started yet, or stopped."""
        return self._nursery is None or self._nursery.cancel_scope.cancel_called

    # -- the rebuild window ----------------------------------------------------------
    def _open_window(self, expected: set[int]) -> None:
        """Know nothing, and wait for the hosts that may hold locks to come
        back and say what they hold."""
        self._rebuilt.set()  # what waited for the window before this one wakes
        self._rebuilt = trio.Event()
        self._window_end = trio.current_time() + self.lease * REBUILD_LEASES
        self._expected = set(expected)
        self._marks = (-1, ())
        self._resumed = set()
        self._backlog = []
        assert self._nursery is not None
        self._nursery.start_soon(self._window_task, self._rebuilt)

    async def _window_task(self, rebuilt: trio.Event) -> None:
        with trio.move_on_at(self._window_end):
            await rebuilt.wait()
        if not rebuilt.is_set():  # still this window
            await self._close_window()

    def _missing(self) -> set[int]:
        return self._expected.union(self._marks[1]) - self._resumed

    async def alive_on_volume(self, live: set[int]) -> None:
        """The hosts alive on the volume now (spread.py): one we wait for
        that is not is dead, and will not resume."""
        if not self._rebuilt.is_set() and (gone := self._missing() - live - self._dead):
            log.info("%s: hosts %s are dead on the volume: not waiting", self.name, sorted(gone))
            self._dead |= gone
            await self._maybe_close_window()

    async def _maybe_close_window(self) -> None:
        if not self._rebuilt.is_set() and self._missing() <= self._dead:
            await self._close_window()

    async def _close_window(self) -> None:
        """Every host that may hold locks has resumed, or the window is
        over: settle the directory and serve what was held back."""
        self._rebuilt.set()
        missing = self._missing()
        if self._resumed:
            log.warning(
                "%s: rebuilt from %d resumed hosts %s",
                self.name,
                len(self._resumed),
                sorted(self._resumed),
            )
        # What the missing held is in no report, only in their log records:
        # a survivor sweeps them (the next host to join, if none resumed).
        self._dispatch(self.directory.settle(sweep=bool(missing)))
        self._dispatch(self.directory.sweep(missing))
        backlog, self._backlog = self._backlog, []
        for node, msg in backlog:
            if node in self._links:
                await self._on_message(node, msg)

    def _forget(self) -> None:
        """We heard from no host for a lease: we are the one cut off (or
        every host died).  Whatever we decide now, they may be deciding
        without us: forget every lock, and take back the hosts that resume."""
        nodes = set(self._links)
        log.warning(
            "%s: heard from none of the hosts %s for %.1f s: forgetting every lock, "
            "waiting for them to resume",
            self.name,
            sorted(nodes),
            self.lease,
        )
        for node in nodes:
            self._forgotten.add(node)
            self._scopes[node].cancel()
        d = self.directory
        self.directory = Directory(d.coherence, d.counters, d.peer_reads, self._owns)
        self.directory.name = self.name
        self._open_window(nodes)

    async def _notify_task(self) -> None:
        """Deferred write notifications that found no message to ride on."""
        while True:
            await trio.sleep(NOTIFY_DELAY)
            self._dispatch(self.directory.flush_deferred())

    async def _lease_task(self) -> None:
        """Renew every host's lease (a Beat each quarter lease) and cut off a
        host that has been silent for a lease."""
        tick = self.lease / 4
        last = trio.current_time()
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            late, last = now - last - tick, now
            if late > tick:
                # We were stopped or starved, not the hosts: what they sent
                # meanwhile is still unread.  They get that time back.
                for node in self._heard:
                    self._heard[node] += late
            silent = {n: now - self._heard.get(n, now) for n in self._outboxes}
            lapsed = silent and max(silent.values()) > self.lease
            if lapsed and self._in_minority(silent):
                return
            if lapsed and min(silent.values()) > self.lease / 2:
                # Every host lapses at once: it is we who were cut off.
                self._forget()
                continue
            for node in list(self._outboxes):
                self._post(node, p.Beat())
                if silent[node] > self.lease:
                    log.warning(
                        "%s: node %d silent for %.1f s: lease lapsed", self.name, node, self.lease
                    )
                    self._scopes[node].cancel()

    def _in_minority(self, silent: dict[int, float]) -> bool:
        """An embedded master whose host hears fewer than half of the hosts
        (itself included) is on the minority side of a partition: it stops
        and fences its host (on_minority) rather than declare the others
        dead.  Asked before anyone is cut off, with "heard" meaning within
        half a lease: hosts cut off together lapse a beat apart, and one
        cut off after another would shrink the count a host at a time.
        Half exactly is not a minority: with two hosts, or two and two, the
        master's side goes on and the other fences (the volume says the
        master's host lives), as before.  A standalone master is no host:
        the hosts it hears go on, the rest fence."""
        if self.node < 0:
            return False
        # Our own host counts as heard even when its loop is slow: it is us.
        heard = sorted(n for n, s in silent.items() if s <= self.lease / 2 or n == self.node)
        if 2 * len(heard) >= len(silent):
            return False
        why = f"the master hears only hosts {heard} of {sorted(silent)}: a minority"
        self.on_minority(why)
        self.stop(why)
        return True

    async def _sample_task(self) -> None:
        """Keep the last RATE_WINDOW seconds of counters, for rates."""
        while True:
            counters = asdict(self.directory.counters)
            self._samples.append((trio.current_time(), counters, dict(self._host_stats)))
            await trio.sleep(1)

    def rates(self) -> dict[str, object]:
        """Per second over the last samples: the master's counters, and each
        host's from the oldest sample that has it."""
        if len(self._samples) < 2:
            return {"window_s": 0.0, "master": {}, "hosts": {}}
        t0, first, _ = self._samples[0]
        now, last, hosts = self._samples[-1]
        per_host = {}
        for node, counters in hosts.items():
            since = next((t, h[node]) for t, _, h in self._samples if node in h)
            if since[0] < now:
                per_host[node] = _per_second(since[1], counters, now - since[0])
        return {
            "window_s": round(now - t0, 1),
            "master": _per_second(first, last, now - t0),
            "hosts": per_host,
        }

    async def _handle(self, stream: trio.SocketStream) -> None:
        # Every failure stays with this connection: serve_tcp would otherwise
        # let one bad peer take the whole master down.
        peer = _peername(stream)
        try:
            with self._handshakes.slot():
                link = await Link.open(stream, self.key, -1, initiator=False, tls=self.tls)
        except (p.ProtocolError, LinkClosed, trio.TooSlowError, trio.BrokenResourceError) as e:
            if not isinstance(e, trio.BrokenResourceError):  # that one just went away
                self._dropped(peer, e)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        await self._serve_link(link, peer)

    def connect_local(self) -> LocalLink:
        """A link for a host in this process (the one we are embedded in):
        its messages reach us as they are, through no socket."""
        if self._stopped:
            raise LinkClosed("the master in this process has stopped")
        ours, theirs = LocalLink.pair()
        self._nursery.start_soon(self._serve_link, ours, "this process")
        return theirs

    async def serve_link(self, link: AnyLink, peer: str, first: p.Message) -> None:
        """Serve a link whose first message the MasterPort has read, in
        our nursery (it ends when we stop); return when it has ended."""
        assert self._nursery is not None
        ended = trio.Event()

        async def serve() -> None:
            try:
                await self._serve_link(link, peer, first)
            finally:
                ended.set()

        self._nursery.start_soon(serve)
        await ended.wait()

    async def _serve_link(self, link: AnyLink, peer: str, first: p.Message | None = None) -> None:
        node: int | None = None
        try:
            with trio.CancelScope() as scope:
                if first is not None:
                    node = await self._first(link, first, scope)
                    if node is None:
                        return
                while (msg := await link.receive()) is not None:
                    if node is None:
                        node = await self._first(link, msg, scope)
                        if node is None:
                            return
                        continue
                    self._heard[node] = trio.current_time()
                    self._check_blocks(node, msg)
                    await self._on_message(node, msg)
        except (p.ProtocolError, LinkClosed, trio.TooSlowError) as e:
            self._dropped(peer, e)
        except trio.BrokenResourceError:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await link.aclose()
                if node is not None:
                    await self._gone(node)

    def _check_blocks(self, node: int, msg: p.Message) -> None:
        """ProtocolError if `msg` asks for a block past the volume's end, or
        (spread.py) one of another partition: no honest host does."""
        if isinstance(msg, p.LockRequest):
            blocks: list[int] = list(msg.blocks)
        elif isinstance(msg, p.WriteRequest):
            blocks = [b for b, _ in msg.blocks]
        else:
            return
        if self.partition[1] > 1 and (stray := [b for b in blocks if not self._owns(b)]):
            raise p.ProtocolError(
                f"node {node} asks for block {stray[0]}, not of partition {self.partition[0]}"
            )
        past = max(blocks, default=-1)
        if self.volume_blocks is not None and past >= self.volume_blocks:
            raise p.ProtocolError(
                f"node {node} asks for block {past}, past the volume's end "
                f"({self.volume_blocks} blocks)"
            )

    def _dropped(self, peer: str, e: Exception) -> None:
        self.refused += 1
        if isinstance(e, p.ProtocolError):
            self.rejected_frames += 1
        log.warning("%s: dropped connection from %s: %s", self.name, peer, e)

    async def _first(self, link: AnyLink, msg: p.Message, scope: trio.CancelScope) -> int | None:
        if not self._serving():
            return None
        if isinstance(msg, p.StatusRequest):
            await link.send(p.StatusReply(self.status()))
            return None
        if not isinstance(msg, p.Join):
            raise p.ProtocolError(f"expected Join, got {type(msg).__name__}")
        node = msg.node
        reason = await self._refusal(msg)
        if reason is not None:
            self.refused += 1
            log.warning("%s: refused node %d: %s", self.name, node, reason)
            await link.send(p.Refused(reason))
            return None
        # From the refusal to the report, nothing waits: the rebuild window
        # cannot end between finding a resume in time and taking in what it
        # holds.  (It once did, while the Welcome was on its way: the
        # directory settled without the report and served the host's dirty
        # blocks from storage.)  The Welcome goes first in the outbox.
        self._admit(node, link, scope, msg)
        # Before the join: a round it may be given could be the header's.
        self._dispatch(self.directory.name_llol(msg.llol))
        self._peers[node] = (msg.peer_host, msg.peer_port)
        for other in list(self._outboxes):
            if other != node:
                self._post(other, p.PeerUp(node, msg.peer_host, msg.peer_port))
        if msg.resume:
            self.directory.rebuild(node, msg.held, msg.pis)
            self._resumed.add(node)
            self._expected |= set(msg.live)
            self._marks = max(self._marks, (msg.marks_version, msg.marks))
            log.info(
                "%s: node %d resumed with %d blocks and %d past images",
                self.name,
                node,
                len(msg.held),
                len(msg.pis),
            )
            await self._maybe_close_window()
            return node
        self._dispatch(self.directory.join(node))
        log.info("%s: node %d joined (peer port %d)", self.name, node, msg.peer_port)
        return node

    def _admit(self, node: int, link: AnyLink, scope: trio.CancelScope, msg: p.Join) -> None:
        """`node` is joined: its link, its outbox with the Welcome first in
        it, and the sender that empties it."""
        send, recv = trio.open_memory_channel[p.Message](OUTBOX_MAX)
        self._links[node] = link
        self._outboxes[node] = send
        self._scopes[node] = scope
        self._heard[node] = trio.current_time()
        welcome = p.Welcome(
            self.directory.scn, dict(self._peers), msg.coherence, self.lease, self.node
        )
        self._post(node, welcome)
        assert self._nursery is not None
        self._nursery.start_soon(self._sender, node, link, recv)

    async def _refusal(self, msg: p.Join) -> str | None:
        """Why `msg` cannot join.  A resume is too late once the directory
        is settled.  A fresh join waits while hosts may still resume (they
        may hold blocks it would read), and a host coming back into its
        slot waits for its old self's recovery."""
        node = msg.node
        if msg.resume and self._rebuilt.is_set():
            return (
                "this master does not know its locks (it declared the host dead, "
                "or the host came back too late)"
            )
        if not msg.resume and not self._rebuilt.is_set():
            self._expected |= set(msg.live) - {node}
            await self._maybe_close_window()
            while not self._rebuilt.is_set():
                await self._rebuilt.wait()  # closed, or a new window opened
        if not 0 <= node < self.host_slots:
            return f"node {node} is out of range 0..{self.host_slots - 1}"
        if node not in self._links and not msg.resume:
            # A resume never waits: it is the same life, not a new one (and
            # the window must not end between our look at it and its report).
            await self._wait_recovered(node)
        if node in self._links:
            return f"node {node} is already joined"
        if node in self._dying or node in self.directory.recoveries:
            return f"node {node} is still being recovered; try again"
        if msg.coherence != self.directory.coherence:
            return f"the cluster runs --coherence {self.directory.coherence}"
        if (msg.partition, msg.partitions) != self.partition:
            return f"the cluster spreads its directory over {self.partition[1]} partitions"
        return None

    async def _sender(
        self, node: int, link: AnyLink, recv: trio.MemoryReceiveChannel[p.Message]
    ) -> None:
        async with recv:
            async for msg in recv:
                if not self._serving():
                    return
                try:
                    await link.send(msg)
                    if not isinstance(msg, _UPKEEP):
                        self.directory.counters.messages_out += 1
                except LinkClosed:
                    return

    async def _on_message(self, node: int, msg: p.Message) -> None:
        d = self.directory
        if not self._rebuilt.is_set() and not isinstance(msg, (*_UPKEEP, p.Bye)):
            self._backlog.append((node, msg))  # served once the directory is settled
            return
        if not isinstance(msg, _UPKEEP):
            d.counters.messages_in += 1
            log.debug("%s: <- node %d %s", self.name, node, msg)
        if isinstance(msg, p.LockRequest):
            out = d.on_lock_request(node, msg)
        elif isinstance(msg, p.PingDone):
            out = d.on_ping_done(node, msg)
        elif isinstance(msg, p.Release):
            out = d.on_release(node, msg)
        elif isinstance(msg, p.Handoff):
            out = d.on_handoff(node, msg)
        elif isinstance(msg, p.WriteRequest):
            out = d.on_write_request(node, msg)
        elif isinstance(msg, p.WriteDone):
            out = d.on_write_done(node, msg)
        elif isinstance(msg, p.RecoverDone):
            out = d.on_recover_done(node, msg)
        elif isinstance(msg, p.Beat):
            return
        elif isinstance(msg, p.Bye):
            self._said_bye.add(node)
            return
        elif isinstance(msg, p.Stats):
            self._host_stats[node] = dict(msg.counters)
            self._retention(node, msg.spare)
            return
        elif isinstance(msg, p.StatusRequest):
            self._post(node, p.StatusReply(self.status()))
            return
        else:
            raise p.ProtocolError(f"unexpected {type(msg).__name__} from node {node}")
        self._dispatch(out)

    def _retention(self, node: int, spare: float) -> None:
        """--peer-reads: keep what `node` says it has room for, and tell it
        what the others said (where its evictions may go: Handoff)."""
        if not (self.directory.peer_reads and self.handoffs) or spare < 0:
            return
        self._spare[node] = spare
        others = tuple((n, s) for n, s in self._spare.items() if n != node and n in self._links)
        self._post(node, p.Retention(others))

    def _dispatch(self, out: list[tuple[int, p.Message]]) -> None:
        for node, msg in out:
            log.debug("%s: -> node %d %s", self.name, node, msg)
            self._post(node, msg)

    def _post(self, node: int, msg: p.Message) -> None:
        """Queue `msg` for `node` if it is joined.  One whose link has just
        closed may not be gone yet: its sender takes nothing more, and what
        we would tell it no longer matters."""
        box = self._outboxes.get(node)
        if box is None:
            return
        try:
            box.send_nowait(msg)
        except trio.WouldBlock:
            scope = self._scopes[node]
            if not scope.cancel_called:  # once: its connection is ending
                log.warning(
                    "%s: node %d has %d messages unread: cutting it off",
                    self.name,
                    node,
                    OUTBOX_MAX,
                )
                scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _gone(self, node: int) -> None:
        """Its connection ended: after a Bye its holds just go; otherwise it
        is dead, and what it held is recovered."""
        box = self._outboxes.pop(node, None)
        if box is None:
            return
        box.close()
        self._links.pop(node, None)
        self._peers.pop(node, None)
        self._scopes.pop(node, None)
        self._heard.pop(node, None)
        self._spare.pop(node, None)
        self._resumed.discard(node)  # before the rebuild: one that never came back
        if self._stopped:
            return  # who is dead is our successor's to judge
        if node in self._forgotten:
            self._forgotten.discard(node)
            self._said_bye.discard(node)
            return  # it resumes, or is dead: its locks were forgotten
        for other in list(self._outboxes):
            self._post(other, p.PeerDown(node))
        if node in self._said_bye:
            self._said_bye.discard(node)
            log.info("%s: node %d left", self.name, node)
            self._dispatch(self.directory.leave(node))
            return
        log.warning("%s: node %d is gone without a Bye: fencing it", self.name, node)
        self._dying.add(node)
        try:
            await trio.sleep(CLOSE_GRACE)
        finally:
            self._dying.discard(node)
            self._dispatch(self.directory.fail(node))

    async def _wait_recovered(self, node: int) -> None:
        """A host coming back into its slot waits for its old self's recovery."""
        with trio.move_on_after(JOIN_WAIT):
            # The directory is sans I/O, with no event to wait on.
            while node in self._dying or node in self.directory.recoveries:  # noqa: ASYNC110
                await trio.sleep(0.05)

    def joined(self) -> set[int]:
        """The hosts with a session now."""
        return set(self._links)

    def recovering(self) -> set[int]:
        """The hosts being recovered (one in its close grace is as good as
        dead: it is being fenced)."""
        return set(self.directory.recoveries) | self._dying

    def describe(self) -> list[str]:
        """Who is joined, dying, recovering, and the blocks waited on."""
        return [
            f"joined {sorted(self._links)} dying {sorted(self._dying)} "
            f"recovering {sorted(self.directory.recoveries)} "
            f"refused connections {self.refused} rejected frames {self.rejected_frames}",
            *self.directory.stuck(),
        ]

    def status(self) -> dict[str, object]:
        info = self.directory.summary()
        now = trio.current_time()
        info["hosts"] = {
            n: {
                "peer": list(self._peers.get(n, ("", 0))),
                "heard_s": round(self._silent(n, now), 2),
                "local": isinstance(self._links[n], LocalLink),
                "counters": self._host_stats.get(n, {}),
            }
            for n in sorted(self._links)
        }
        info["coherence"] = self.directory.coherence
        info["lease"] = self.lease
        info["recovering"] = sorted(self.recovering())
        # Just started (or cut off from every host): waiting for resumes.
        info["rebuilding"] = not self._rebuilt.is_set()
        info["refused_connections"] = self.refused
        info["rejected_frames"] = self.rejected_frames
        info["rates"] = self.rates()
        return info

    def _silent(self, node: int, now: float) -> float:
        """Seconds since we last heard from `node` (never below 0: a host's
        last word may be dated ahead when the master itself was starved)."""
        return max(0.0, now - self._heard.get(node, now))

    def metric_samples(self) -> list[Sample]:
        """The master's side of /metrics."""
        out = counter_samples("master", asdict(self.directory.counters))
        out += [
            Sample("master_hosts", len(self._links), "hosts joined", counter=False),
            Sample(
                "master_blocks_tracked",
                len(self.directory.blocks),
                "blocks in the directory",
                counter=False,
            ),
            Sample("master_refused_connections", self.refused, "connections refused"),
            Sample("master_rejected_frames", self.rejected_frames, "frames refused"),
        ]
        now = trio.current_time()
        for n in sorted(self._links):
            out.append(
                Sample(
                    "master_host_silent_seconds",
                    self._silent(n, now),
                    "seconds since the master last heard from the host (its lease)",
                    counter=False,
                    labels={"node": str(n)},
                )
            )
        held = self.directory.summary()["held"]
        assert isinstance(held, dict)
        for n, h in sorted(held.items()):
            for mode in ("S", "X"):
                out.append(
                    Sample(
                        "master_locks_held",
                        h[mode],
                        "blocks a host holds, by mode",
                        counter=False,
                        labels={"node": str(n), "mode": mode},
                    )
                )
            out.append(
                Sample(
                    "master_past_images",
                    h["pi"],
                    "past images a host keeps",
                    counter=False,
                    labels={"node": str(n)},
                )
            )
        return out


class MasterPort:
    """One host's listener for the partitions of the directory it masters
    (spread.py): a connection's first message names its partition, and
    the link goes to that partition's MasterService.  A partition that is
    not (or no longer) ours gets its connection closed, not refused: it is
    moving, and the asker tries again.  A Handover asks us to stop one
    (`on_handover`, with the asker and the partition: once stopped, the
    hosts that were joined to it; None if we keep it).

    Attributes:
        services: partition -> the MasterService serving it here.
    """

    def __init__(
        self,
        key: bytes,
        tls: Tls | None,
        on_handover: Callable[[int, int], Awaitable[tuple[int, ...] | None]],
    ) -> None:
        self.key, self.tls = key, tls
        self.services: dict[int, MasterService] = {}
        self.port = 0
        self._on_handover = on_handover
        self._handshakes = Handshakes()

    async def serve(
        self, host: str = "127.0.0.1", port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as e:
            raise QuietError(f"cannot listen on {host}:{port}: {e.strerror or e}", 1) from None
        self.port = listeners[0].socket.getsockname()[1]
        log.info("master: partitions served on %s:%d", host, self.port)
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def connect_local(self, partition: int) -> LocalLink:
        service = self.services.get(partition)
        if service is None:
            raise LinkClosed(f"partition {partition} is not mastered here")
        return service.connect_local()

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = _peername(stream)
        try:
            with self._handshakes.slot():
                link = await Link.open(stream, self.key, -1, initiator=False, tls=self.tls)
            first = await link.receive()
        except (p.ProtocolError, LinkClosed, trio.TooSlowError, trio.BrokenResourceError) as e:
            log.warning("master: dropped connection from %s: %s", peer, e)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        if isinstance(first, p.Join):
            service = self.services.get(first.partition)
            if service is not None and not service._stopped:
                await service.serve_link(link, peer, first)
                return
        elif isinstance(first, p.Handover):
            hosts = await self._on_handover(link.peer_node, first.partition)
            reply = p.HandedOver(first.partition, hosts is not None, hosts or ())
            with contextlib.suppress(LinkClosed):
                await link.send(reply)
        elif isinstance(first, p.StatusRequest):
            with contextlib.suppress(LinkClosed):
                await link.send(p.StatusReply(self.status()))
        with trio.CancelScope(shield=True):
            await link.aclose()

    def status(self) -> dict[str, object]:
        """Each partition served here, with its own master's status:
        `sharedfs status` merges those of every host into one view."""
        return {"partitions": {k: s.status() for k, s in sorted(self.services.items())}}


def _per_second(old: dict[str, int], new: dict[str, int], dt: float) -> dict[str, float]:
    """Rates of the running totals in `new` since `old` (levels left out)."""
    return {
        k: round((v - old.get(k, 0)) / dt, 2) for k, v in new.items() if k not in p.STATS_LEVELS
    }


def _peername(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


async def _serve_forever(
    service: MasterService, host: str, port: int, metrics: tuple[str, int] | None
) -> None:
    # Signals are ours before we say we are ready: a stop may follow at once.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
            if metrics is not None:
                samples = service.metric_samples
                bound = await stack.enter_async_context(serve_metrics(metrics, samples))
            await nursery.start(service.serve, host, port)
            nursery.start_soon(dump_on_signal, "master", service.describe)
            nursery.start_soon(watch_loop, "master")
            if metrics is not None:
                log.info("master: metrics on http://%s:%d/metrics", metrics[0], bound)
            notify_systemd("READY=1")
            async for signum in signals:
                log.info("master: signal %d, stopping", signum)
                nursery.cancel_scope.cancel()
                return


def run_master(args: argparse.Namespace) -> None:
    try:
        host, port = parse_address(args.listen)
    except ValueError as e:
        raise QuietError(f"--listen {args.listen}: {e}", 2) from None
    if not 0.2 <= args.lease <= 600:
        raise QuietError(f"--lease {args.lease:g}: give 0.2 to 600 seconds", 2)
    check_peer_reads(args)
    storage = open_volume(args.volume)
    try:
        sb = open_superblock(storage)
    finally:
        storage.close()
    service = MasterService(
        sb.cluster_key,
        coherence=args.coherence,
        host_slots=sb.host_slots,
        lease=args.lease,
        tls=load_tls(args.tls),
        peer_reads=args.peer_reads,
        handoffs=not args.no_handoffs,
        volume_blocks=sb.volume_blocks,
    )
    trio.run(_serve_forever, service, host, port, args.metrics)


PEER_READS_HELP = (
    "a read of a block another host caches is shipped from that host's cache "
    "rather than read from storage, and each host evicts its copies of blocks "
    "another host is primary for before its own, and offers its own to the host "
    "whose cache holds the coldest blocks (fewer storage reads when the "
    "hosts' caches together hold the working set; each such read costs a ping)"
)
NO_HANDOFFS_HELP = (
    "with --peer-reads: evict a block this host is primary for without offering "
    "it to another host first (to measure what handoffs are worth)"
)


def check_peer_reads(args: argparse.Namespace) -> None:
    if args.peer_reads and args.coherence == "disk":
        raise QuietError("--peer-reads ships blocks host to host: not with --coherence disk", 2)
    if args.no_handoffs and not args.peer_reads:
        raise QuietError("--no-handoffs: only with --peer-reads", 2)


def main(argv: list[str] | None = None) -> None:
    ap = Parser(prog="sharedfs master", description="Run a volume's lock master.")
    ap.add_argument("volume", help="the volume (its cluster key authenticates hosts)")
    ap.add_argument("--listen", default="127.0.0.1:7400", metavar="HOST:PORT")
    ap.add_argument("--coherence", choices=("fusion", "disk"), default="fusion")
    ap.add_argument("--peer-reads", action="store_true", help=PEER_READS_HELP)
    ap.add_argument("--no-handoffs", action="store_true", help=NO_HANDOFFS_HELP)
    ap.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        metavar="SECONDS",
        help=f"a host silent this long is declared dead (default {DEFAULT_LEASE:g})",
    )
    ap.add_argument(
        "--metrics",
        type=parse_address_arg,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)",
    )
    add_tls_arg(ap)
    ap.add_argument("--log", metavar="FILE")
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.debug, args.log)
    run_tool(run_master, args)


if __name__ == "__main__":
    main()
