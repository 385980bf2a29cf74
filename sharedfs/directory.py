"""The lock master's resource directory and protocol decisions, sans I/O.

For every block some host has asked for, the directory keeps who holds it in
which mode, which host owns the newest version while it is dirty, which hosts
keep past images (PIs) of which versions, the newest version known to be on
storage, and the requests waiting in line.  Each handler takes one message
from a host and returns the messages to send, as (node, message) pairs; the
trio service in master.py does the sending.  Tests drive it directly and
check the exact messages (seed 000_609d80bd4d8e36c9, claims 1-40).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from . import protocol as p
from .protocol import Mode

log = logging.getLogger(__name__)

Out = list[tuple[int, p.Message]]
NOBODY = -1
#: A handoff's place among conflicting operations: after every real one
#: (an operation of the giver's that uses the block meanwhile finishes
#: before the block goes, rather than start again).
HANDOFF_START = 1e18
#: The master itself, waiting for a write (recovery needs a block on storage).
MASTER = -2


@dataclass(slots=True)
class Request:
    node: int
    req: int
    mode: Mode
    op_start: float
    recovery: bool = False
    gone: bool = False  # its asker died while it was being served
    giver: int | None = None  # a handoff: the host that lets go of it for this


@dataclass(slots=True)
class BlockState:
    """Attributes:
    holders: node -> mode held.
    owner: the node whose cache holds the newest version while it is not on
        storage (it holds X, or S after shipping a read copy); None when
        storage has the newest version.
    pis: node -> newest past-image version it keeps.
    disk_version: newest version known to be on storage.
    queue: requests waiting; the head is being served when `acks` is set.
    acks: nodes whose PingDone the head request still waits for.
    final: the head request's transfer doubles as its grant.
    src: the node shipping the head request its data, if any.
    writer: the node told to write the block (write-perform in flight).
    write_waiters: node -> the version it asked to have on storage: it is
        notified at once when a write of at least that version lands.
    recovering: the dead node whose recovery holds the block: nobody is
        served until a survivor has rebuilt it.
    revoking: nodes told to drop their copy outside any request (a rebuild
        takes the block in X; a transfer's sender died mid-request): nobody
        is served until they have.
    heir: the asker of a request whose sender died mid-request after being
        told its transfer was final: the asker may hold that copy already
        (a final transfer needs no grant) and changed it since, so it
        rebuilds the block itself; anyone else would rebuild it without
        those changes, beside the asker's copy.
    settling: a master rebuilt from the hosts' reports found the newest
        version of the block only in a past image: nobody is served until
        that is on storage (or storage is found to be newer).
    primary: --peer-reads: the holder whose cache is the block's primary
        (it read it from storage, or took it exclusively); the others hold
        copies, shipped from it.  None: nobody we know of.
    unsure: a master rebuilt from the hosts' reports does not know what
        storage has of the block, and a past image of it survived: storage
        may hold a newer version (a write whose notice died with the old
        master), so a past image is written only if storage is older
        (WritePerform.check), for as long as the block is known here.
    let_go: the head request's asker sent a Release while the ping that
        serves it was out: the transfer was the grant (Ping.final), so it
        could use the block and evict it before the sender's PingDone
        reached us.  By its link's order that Release is about this hold,
        which completes as granted, not held.
    """

    holders: dict[int, Mode] = field(default_factory=dict)
    owner: int | None = None
    pis: dict[int, int] = field(default_factory=dict)
    disk_version: int = 0
    queue: deque[Request] = field(default_factory=deque)
    acks: set[int] = field(default_factory=set)
    final: bool = False
    src: int | None = None
    writer: int | None = None
    write_waiters: dict[int, int] = field(default_factory=dict)
    recovering: int | None = None
    revoking: set[int] = field(default_factory=set)
    heir: int | None = None
    settling: bool = False
    primary: int | None = None
    let_go: bool = False
    unsure: bool = False


@dataclass(slots=True)
class Copy:
    """A copy a resuming host reports holding (Directory.rebuild)."""

    mode: Mode
    version: int
    dirty: bool


@dataclass(slots=True)
class Recovery:
    """What a dead host left: blocks it held in X (its dirty versions died
    with it), rebuilt by a survivor from storage and the log once storage
    has the newest surviving copy of each.

    Attributes:
        pending: blocks not yet handed to a survivor.
        sent: block -> the survivor rebuilding it.
        writes: block -> version storage must reach first (the newest past
            image of a block it held; the current copy of a block it kept a
            past image of, so that none of its log records is still needed).
        sweep: what the dead host held is unknown (it did not come back to
            a master rebuilt from the hosts' reports): a survivor (the
            `sweeper`) takes every block its records name; until it has
            (`swept`), only recovery requests are served.
        closer: the survivor told, once every block is rebuilt, to clear the
            dead host's mark in the log header.  Only then may the log's
            checkpoint pass its records, and only then is its slot free:
            a mark cleared by an earlier round would let the checkpoint pass
            records that a later round still has to read.
    """

    dead: int
    pending: set[int] = field(default_factory=set)
    sent: dict[int, int] = field(default_factory=dict)
    writes: dict[int, int] = field(default_factory=dict)
    closer: int | None = None
    sweep: bool = False
    sweeper: int | None = None
    swept: bool = False

    @property
    def rebuilt(self) -> bool:
        done = not (self.pending or self.sent or self.writes)
        return done and (self.swept or not self.sweep)


@dataclass(slots=True)
class Counters:
    lock_requests: int = 0
    blocks_requested: int = 0
    grants: int = 0
    pings: int = 0
    revokes: int = 0
    transfers: int = 0
    write_requests: int = 0
    bin_writes: int = 0
    write_performs: int = 0
    writes_avoided: int = 0
    notifications_now: int = 0
    notifications_piggybacked: int = 0
    hosts_failed: int = 0
    blocks_recovered: int = 0
    messages_in: int = 0
    messages_out: int = 0
    peer_reads: int = 0  # clean blocks shipped from a cache instead of read from storage
    primaries_moved: int = 0  # copies made primary when their primary let go
    handoffs: int = 0  # blocks a host evicting them moved to a host with room
    handoffs_declined: int = 0  # offered, and dropped instead (someone else asked, say)


def messages_per_transfer(counters: dict[str, int]) -> float:
    """The master's messages per block transfer, from its counters: every
    transfer also went host to host, past the master."""
    t = counters.get("transfers", 0)
    return round((counters["messages_in"] + counters["messages_out"] + t) / t, 2) if t else 0.0


class Directory:
    """Attributes:
    blocks: block number -> its state.
    nodes: hosts that have joined.
    scn: the highest change number seen (every message carries one).
    deferred: notifications waiting to ride on the next message to a node.
    recoveries: dead node -> what is left of its recovery.
    peer_reads: a host that asks for a block other hosts cache clean gets
        it shipped from the block's primary cache rather than reading
        storage; copies are marked as such, and a copy becomes primary when
        the primary lets go (cluster-aware replacement, seed 001).
    """

    def __init__(
        self,
        coherence: str = "fusion",
        counters: Counters | None = None,
        peer_reads: bool = False,
        owns: Callable[[int], bool] = lambda block: True,
    ) -> None:
        self.coherence = coherence
        #: Whether a block is this directory's (spread.py: one partition).
        self.owns = owns
        self.peer_reads = peer_reads
        self.blocks: dict[int, BlockState] = {}
        self.nodes: set[int] = set()
        self.scn = 0
        self.deferred: dict[int, dict[int, int]] = {}
        self.recoveries: dict[int, Recovery] = {}
        self.counters = counters if counters is not None else Counters()
        #: block -> node -> the copy it reported, while a rebuild gathers.
        self._reported: dict[int, dict[int, Copy]] = {}
        #: The log's header (the LLOL's block), as hosts name it (Join.llol).
        self.llol_block = -1
        #: What our log lines begin with (MasterService.name).
        self.name = "master"

    def _state(self, block: int) -> BlockState:
        st = self.blocks.get(block)
        if st is None:
            st = self.blocks[block] = BlockState()
        return st

    def _see(self, scn: int) -> None:
        self.scn = max(self.scn, scn)

    # -- membership ------------------------------------------------------------
    def join(self, node: int) -> Out:
        """A host joined; recoveries nobody could run so far go to it."""
        self.nodes.add(node)
        out: Out = []
        for rec in list(self.recoveries.values()):
            out += self._advance(rec)
        return out

    # -- a master rebuilt from the hosts ------------------------------------------
    def rebuild(
        self,
        node: int,
        held: tuple[tuple[int, int, int, bool], ...],
        pis: tuple[tuple[int, int], ...],
    ) -> None:
        """A host that held locks under the master before us resumes, and
        reports its copies and past images.  Nothing is served until
        settle(), once every such host has reported."""
        self.nodes.add(node)
        held = tuple(h for h in held if self.owns(h[0]))
        pis = tuple(pi for pi in pis if self.owns(pi[0]))
        for block, mode, version, dirty in held:
            if mode not in (Mode.S, Mode.X):
                raise p.ProtocolError(f"node {node} reports block {block} held in mode {mode}")
            self._reported.setdefault(block, {})[node] = Copy(Mode(mode), version, dirty)
            self._see(version)
        for block, version in pis:
            st = self._state(block)
            st.pis[node] = max(st.pis.get(node, 0), version)
            self._see(version)

    def settle(self, sweep: bool = False) -> Out:
        """Make one state of the reports (docs/PROTOCOL.md, Resume).

        A report can disagree with another where a message was lost with the
        old master: a copy that arrived for a request never granted (an X
        copy beside read copies whose revoke was never served), or a
        transfer lost on its way (its sender kept a past image newer than
        every copy).  The newest copy wins; older copies are revoked; a
        block whose newest version is only a past image waits until that
        is on storage, unless storage has something newer.

        `sweep`: some host did not come back; its copies are in no report.
        A read copy may be of a version only it had as dirty owner, not on
        storage: the holder of the newest copy becomes the owner (the one
        to write it), and no past image counts as covered."""
        out: Out = []
        reported, self._reported = self._reported, {}
        for block in sorted(set(reported) | {b for b, st in self.blocks.items() if st.pis}):
            out += self._settle_block(block, self._state(block), reported.get(block, {}), sweep)
        return out

    def sweep(self, missing: set[int]) -> Out:
        """Hosts that held locks before the restart and did not come back:
        a survivor takes and rebuilds every block their records name
        (Recover.sweep); meanwhile only recovery requests are served."""
        out: Out = []
        for dead in sorted(missing):
            log.warning("%s: node %d did not come back: sweeping its log records", self.name, dead)
            self.counters.hosts_failed += 1
            rec = self.recoveries.setdefault(dead, Recovery(dead, sweep=True))
            out += self._hold_header(rec)
            out += self._advance(rec)
        return out

    def name_llol(self, block: int) -> Out:
        """A joining host names the log's header (Join.llol).  A sweep that
        ran before any host could name it rebuilds it now."""
        if block < 0 or block == self.llol_block:
            return []
        self.llol_block = block
        out: Out = []
        for rec in list(self.recoveries.values()):
            if rec.sweep and not rec.swept:
                out += self._hold_header(rec)
        return out

    def _hold_header(self, rec: Recovery) -> Out:
        """Nobody says they hold the log's header: it may have been the
        dead host, and the header on storage be behind its pages.  Rebuilt
        in a round of its own, as a dead holder's LLOL is.  (Not while no
        host has named it; nor when it is another partition's.)"""
        if self.llol_block < 0 or not self.owns(self.llol_block):
            return []
        header = self.blocks.get(self.llol_block)
        if header is not None and (header.holders or header.recovering is not None):
            return []
        header = self._state(self.llol_block)
        return self._hold_for_recovery(self.llol_block, header, rec)

    def _sweeping(self) -> bool:
        return any(rec.sweep and not rec.swept for rec in self.recoveries.values())

    def _settle_block(
        self, block: int, st: BlockState, copies: dict[int, Copy], sweep: bool
    ) -> Out:
        out: Out = []
        top_pi = max(st.pis.values(), default=0)
        xs = [n for n, c in copies.items() if c.mode is Mode.X]
        keep = {max(xs, key=lambda n: copies[n].version): None} if xs else dict.fromkeys(copies)
        # A copy older than a past image is stale (a clean data block read
        # from storage says version 0: there, storage is taken as newest).
        keep = {n: None for n in keep if not 0 < copies[n].version < top_pi}
        for n, c in copies.items():
            if n not in keep:
                out += self._revoke(block, st, n)
                continue
            st.holders[n] = c.mode
            if c.dirty and (st.owner is None or c.version > copies[st.owner].version):
                st.owner = n
        if keep and st.owner is None and sweep:
            st.owner = max(keep, key=lambda n: copies[n].version)
        elif keep and st.owner is None:
            # Every copy is clean: storage has them, and no past image is
            # newer.  (A read copy of a dirty owner's version is clean at
            # its holder, but not on storage.)
            st.disk_version = max(top_pi, *(copies[n].version for n in keep))
        if keep or not top_pi:
            for n, v in list(st.pis.items()):
                if v <= st.disk_version:
                    del st.pis[n]
                    self._defer(n, block, st.disk_version)
            st.unsure = bool(st.pis)
            self._gc(block, st)
            return out
        # Only a past image has it, or storage has something newer (a
        # write's notice was lost): the holder writes it unless storage
        # is newer (WritePerform.check).
        st.settling = st.unsure = True
        st.write_waiters[MASTER] = top_pi
        if st.writer is None:
            st.writer = max(st.pis, key=lambda n: st.pis[n])
            out += self._perform(st.writer, [block])
        return out

    def leave(self, node: int) -> Out:
        """A host left cleanly (Bye): all it changed is on storage, so its
        holds simply go."""
        self.nodes.discard(node)
        self.deferred.pop(node, None)
        out: Out = []
        for block, st in list(self.blocks.items()):
            st.holders.pop(node, None)
            st.pis.pop(node, None)
            st.write_waiters.pop(node, None)
            if st.owner == node:
                st.owner = None
            if st.writer == node:
                st.writer = None
                out += self._start_write(block, st)
            out += self._drop_requests(node, block, st)
            self._gc(block, st)
        return out

    def fail(self, node: int) -> Out:
        """A host died (its lease lapsed): the blocks it held in X, and those
        whose newest version it was receiving, wait for a survivor to rebuild
        them from storage and the log; storage first gets the newest copy
        that survives anywhere (seed 003; DESIGN.md, Failure and recovery)."""
        log.warning("%s: node %d failed: recovering what it held", self.name, node)
        for copies in self._reported.values():
            copies.pop(node, None)  # it resumed, and died before the rebuild
        self.nodes.discard(node)
        self.deferred.pop(node, None)
        self.counters.hosts_failed += 1
        rec = self.recoveries.setdefault(node, Recovery(node))
        out: Out = []
        for other in list(self.recoveries.values()):
            # It was rebuilding another dead host's blocks: someone else will.
            orphaned = [b for b, by in other.sent.items() if by == node]
            for b in orphaned:
                del other.sent[b]
                other.pending.add(b)
                self.blocks[b].holders.pop(node, None)
            if other.sweeper == node:
                other.sweeper = None
            elif other.closer == node:
                other.closer = None
            elif not orphaned:
                continue
            if other is not rec:
                out += self._advance(other)
        for block, st in list(self.blocks.items()):
            st.revoking.discard(node)
            if st.heir == node:
                st.heir = None
            mode = st.holders.pop(node, None)
            owned = st.owner == node
            if owned:
                st.owner = None
            if (mode is Mode.X or owned) and st.recovering is None:
                out += self._hold_for_recovery(block, st, rec)
            pi = st.pis.pop(node, 0)
            if pi > st.disk_version and st.recovering is None:
                # Its records of that version stay needed until storage has it.
                out += self._need_write(block, st, rec, pi)
            st.write_waiters.pop(node, None)
            if st.writer == node:
                st.writer = None
                out += self._start_write(block, st)
            out += self._drop_requests(node, block, st)
            self._gc(block, st)
        out += self._advance(rec)
        return out

    def _drop_requests(self, node: int, block: int, st: BlockState) -> Out:
        """Forget what a departed node asked for and what it was asked."""
        head = st.queue[0] if st.queue and st.acks else None
        # A head request being served stays: its transfer may be on the way,
        # and completing it tells where the newest version went.  (Marked:
        # the node may be back, a new host, before it completes.)
        st.queue = deque(r for r in st.queue if r.node != node or r is head)
        if head is not None and head.node == node:
            head.gone = True
        if node not in st.acks:
            return self._serve(block, st) if head is None else []
        st.acks.discard(node)
        if st.src == node:
            # It may have shipped before it died, or not: the head request is
            # served again once the block is rebuilt (the same version, from
            # the rebuilder).  Holders still dropping their copies for it are
            # waited for all the same; completing the request when they are
            # done would grant it with no copy at all.
            if st.final and head is not None and not head.gone:
                st.heir = head.node
            st.final = False
            st.let_go = False  # served again, after the rebuild
            st.src = None
            st.revoking |= st.acks
            st.acks.clear()
            return self._serve(block, st)
        if st.acks or st.recovering is not None:
            return []
        return self._complete(block, st)

    def _hold_for_recovery(self, block: int, st: BlockState, rec: Recovery) -> Out:
        self.recoveries.setdefault(rec.dead, rec)
        st.recovering = rec.dead
        rec.pending.add(block)
        self.counters.blocks_recovered += 1
        if st.pis and max(st.pis.values()) > st.disk_version:
            return self._need_write(block, st, rec, max(st.pis.values()))
        return []

    def _need_write(self, block: int, st: BlockState, rec: Recovery, version: int) -> Out:
        self.recoveries.setdefault(rec.dead, rec)
        rec.writes[block] = max(rec.writes.get(block, 0), version)
        # The master waits like any host, for the newest version a recovery needs.
        st.write_waiters[MASTER] = max(st.write_waiters.get(MASTER, 0), version)
        return self._start_write(block, st)

    def _advance(self, rec: Recovery) -> Out:
        """Hand the blocks whose writes are done to a survivor (the lowest
        live node, or a block's heir); once all are rebuilt, have one clear
        the dead host's mark in the log (an empty Recover)."""
        if not self.nodes:
            return []  # the next host to join does it
        by = min(self.nodes)
        if rec.rebuilt:
            if rec.closer is None:
                rec.closer = by
                return [(by, p.Recover(rec.dead, (), self.scn))]
            return []
        out: Out = []
        if rec.sweep and not rec.swept and rec.sweeper is None:
            rec.sweeper = by
            out.append((by, p.Recover(rec.dead, (), self.scn, False, True)))
        ready = sorted(b for b in rec.pending if b not in rec.writes)
        rounds: dict[int, list[int]] = {}
        for b in ready:
            heir = self.blocks[b].heir
            rounds.setdefault(heir if heir in self.nodes else by, []).append(b)
        # The sweep follows the dead host's records itself.
        follow = not rec.sweep
        out += [
            (n, p.Recover(rec.dead, tuple(bs), self.scn, follow and n == by))
            for n, bs in rounds.items()
        ]
        for n, bs in rounds.items():
            for b in bs:
                rec.pending.discard(b)
                rec.sent[b] = n
                st = self.blocks[b]
                out += self._revoke_others(b, st, n)
                # It rebuilds them under an X hold (served by nobody meanwhile).
                st.holders[n] = Mode.X
                # Its recovery requests queued before it held the block.
                out += self._serve(b, st)
        return out

    def _revoke_others(self, block: int, st: BlockState, keeper: int) -> Out:
        """Every holder but `keeper` drops its copy: read copies of a dead
        owner's version must not outlive the rebuilder's next change, nor
        be taken for current by a later rebuild on their host."""
        out: Out = []
        for x in [x for x in st.holders if x != keeper]:
            del st.holders[x]
            if x not in st.acks:  # else already told to drop it, by the head request
                out += self._revoke(block, st, x)
        return out

    def _revoke(self, block: int, st: BlockState, x: int) -> Out:
        """Tell `x` to drop its copy, outside any request."""
        st.revoking.add(x)
        self.counters.revokes += 1
        ping = p.Ping(
            block, NOBODY, int(Mode.X), int(Mode.N), 0, self.scn, 0.0, False, self._take_deferred(x)
        )
        return [(x, ping)]

    def on_recover_done(self, node: int, msg: p.RecoverDone) -> Out:
        self._see(msg.scn)
        rec = self.recoveries.get(msg.dead)
        if rec is not None and msg.sweep:
            return self._swept(node, rec, msg)
        if rec is not None and not msg.blocks and rec.closer == node:
            rec.closer = None
            if rec.rebuilt:
                # Its mark is gone from the log: the recovery is over, and
                # the slot may be joined again.
                del self.recoveries[msg.dead]
                log.info("%s: node %d recovered", self.name, msg.dead)
                return []
            # A block it was being sent when it died came back to it
            # meanwhile: rebuild that, then close again.
            return self._advance(rec)
        out: Out = []
        installed = set(msg.installed)
        kept = dict(msg.kept)
        for block in msg.blocks:
            st = self.blocks.get(block)
            if rec is None or st is None or rec.sent.get(block) != node:
                continue
            del rec.sent[block]
            st.recovering = None
            st.heir = None
            if block in installed:
                st.owner = node  # rebuilt, dirty, in its cache
            if block in kept:
                # Its own copy was newer than the rebuild (the dead host
                # shipped it before dying): the dead host's records of it
                # stay needed until storage has that copy.
                out += self._need_write(block, st, rec, kept[block])
            # Not installed: storage has the newest version.  The X hold
            # stays all the same: the rebuilder may have the block cached
            # (a copy it took in X to follow the log), and a second X
            # holder could be granted beside it.
            out += self._serve(block, st)
            self._gc(block, st)
        if rec is not None:
            out += self._advance(rec)
        return out

    def _swept(self, node: int, rec: Recovery, msg: p.RecoverDone) -> Out:
        """A sweeper took and rebuilt every block the dead host's records
        name: those it installed are dirty with it; those it kept (newer
        copies) go to storage before the dead host's records may go.  Once
        no sweep is left, everyone is served again."""
        if rec.sweeper != node:
            return []
        rec.swept, rec.sweeper = True, None
        out: Out = []
        for block in msg.installed:
            if (st := self.blocks.get(block)) is not None:
                st.owner = node
        for block, version in msg.kept:
            if (st := self.blocks.get(block)) is not None:
                out += self._need_write(block, st, rec, version)
        out += self._advance(rec)
        if not self._sweeping():
            for block, st in list(self.blocks.items()):
                if st.queue:
                    out += self._serve(block, st)
        return out

    # -- locks -------------------------------------------------------------------
    def on_lock_request(self, node: int, msg: p.LockRequest) -> Out:
        self._see(msg.scn)
        self.counters.lock_requests += 1
        self.counters.blocks_requested += len(msg.blocks)
        mode = Mode(msg.mode)
        out: Out = []
        granted: list[int] = []
        # Serving a request starts no sweep and ends none: asked once, not
        # per block (a sequential read asks for hundreds at a time).
        sweeping = self._sweeping()
        for block in msg.blocks:
            st = self.blocks.get(block)
            if st is None and (msg.recovery or not sweeping):
                # Nobody holds it, owns it or waits for it: granted as
                # _serve would, without a queue (a host registering the
                # blocks it allocated sends tens of thousands at a time).
                self.blocks[block] = BlockState(holders={node: mode}, primary=node)
                granted.append(block)
                continue
            st = self._state(block)
            st.queue.append(Request(node, msg.req, mode, msg.op_start, msg.recovery))
            if len(st.queue) == 1 or st.recovering is not None:
                out += self._serve(block, st, granted)
            elif msg.recovery and sweeping:
                # It goes before those queued ahead (_recovery_first); not
                # at once, in `granted`, which is for a request at the head.
                out += self._serve(block, st)
        if granted:
            # Blocks granted at once travel back in one message (claims 10-12).
            out.append((node, self._grant(node, msg.req, tuple(granted), mode)))
        return out

    def _grant(
        self, node: int, req: int, blocks: tuple[int, ...], mode: Mode, transfer: bool = False
    ) -> p.Grant:
        self.counters.grants += len(blocks)
        return p.Grant(req, blocks, int(mode), self.scn, self._take_deferred(node), transfer)

    def _serve(self, block: int, st: BlockState, granted: list[int] | None = None) -> Out:
        """Start serving the head request of `block`, if it is idle."""
        out: Out = []
        if st.recovering is not None:
            # Only a rebuilder that follows the log to a block it was given
            # to rebuild in another round gets it: it holds it already.
            for r in [r for r in st.queue if r.recovery and st.holders.get(r.node) is Mode.X]:
                st.queue.remove(r)
                out.append((r.node, self._grant(r.node, r.req, (block,), r.mode)))
            return out
        while st.queue and not st.acks and not st.revoking and not st.settling:
            if self._sweeping() and block != self.llol_block and not self._recovery_first(st):
                # A sweep may yet take it: only recovery requests go.  (The
                # log's tail goes on: a host ships nothing to the sweeper
                # before its records are in the log.)
                break
            r = st.queue[0]
            held = st.holders.get(r.node, Mode.N)
            conflicts = {
                x: m for x, m in st.holders.items() if x != r.node and not m.compatible(r.mode)
            }
            # Who ships the newest version: a conflicting holder that has it
            # (the owner, or an X holder), or the owner of a dirty version
            # the requester does not have a copy of.
            # An X holder has the current copy, whatever else we believe.
            src = next((x for x, m in conflicts.items() if m is Mode.X), None)
            if (
                src is None
                and st.owner not in (None, r.node)
                and (st.owner in conflicts or held is Mode.N)
            ):
                src = st.owner
            if src is None and held is Mode.N and self.peer_reads:
                src = self._clean_source(st, r.node)
                if src is not None and r.giver is None:
                    self.counters.peer_reads += 1
            if src is None and not conflicts:
                st.queue.popleft()
                st.holders[r.node] = max(held, r.mode)
                if st.primary not in st.holders:
                    st.primary = r.node  # it reads storage: its copy is the one
                if granted is not None and r is not None:
                    granted.append(block)
                else:
                    out.append((r.node, self._grant(r.node, r.req, (block,), r.mode)))
                continue
            targets = dict(conflicts)
            if src is not None:
                targets.setdefault(src, st.holders.get(src, Mode.N))
            final = len(targets) == 1 and src is not None
            st.acks = set(targets)
            st.final = final
            st.src = src
            for x in targets:
                # A giver keeps nothing: it hands its copy over, primary and all.
                keep = Mode.S if (r.mode is Mode.S and x == src != r.giver) else Mode.N
                to = r.node if x == src else NOBODY
                if to == NOBODY:
                    self.counters.revokes += 1
                else:
                    self.counters.pings += 1
                msg = p.Ping(
                    block,
                    to,
                    int(r.mode),
                    int(keep),
                    r.req,
                    self.scn,
                    r.op_start,
                    final,
                    self._take_deferred(x),
                    self.peer_reads and keep is Mode.S,
                )
                out.append((x, msg))
        return out

    @staticmethod
    def _clean_source(st: BlockState, asker: int) -> int | None:
        """--peer-reads: who ships a block storage has the newest version
        of: its primary, or else any other holder (which becomes primary)."""
        others = [n for n in st.holders if n != asker]
        if not others:
            return None
        if st.primary not in others:
            st.primary = others[-1]
        return st.primary

    @staticmethod
    def _recovery_first(st: BlockState) -> bool:
        """Put the first recovery request at the head of the queue; False
        if there is none."""
        r = next((r for r in st.queue if r.recovery), None)
        if r is None:
            return False
        if r is not st.queue[0]:
            st.queue.remove(r)
            st.queue.appendleft(r)
        return True

    def on_ping_done(self, node: int, msg: p.PingDone) -> Out:
        self._see(msg.scn)
        st = self._state(msg.block)
        if node in st.revoking and node not in st.acks:
            st.revoking.discard(node)
            if msg.pi:
                st.pis[node] = max(st.pis.get(node, 0), msg.pi)
            if st.revoking or st.recovering is not None:
                return []
            return self._serve(msg.block, st)
        if node not in st.acks:
            log.warning(
                "%s: unexpected PingDone from node %d for block %d", self.name, node, msg.block
            )
            return []
        st.acks.discard(node)
        keep = Mode(msg.keep)
        if keep is Mode.N:
            st.holders.pop(node, None)
        else:
            st.holders[node] = keep
        if msg.pi > st.disk_version:
            st.pis[node] = max(st.pis.get(node, 0), msg.pi)
        elif msg.pi:
            # A write of a newer version landed while this PingDone was on
            # its way: the past image is covered already.
            self._defer(node, msg.block, st.disk_version)
        # The sender's WriteDone can overtake this PingDone (the transfer went
        # out in between): what storage already has is no longer pending.
        dirty = msg.dirty and msg.version > st.disk_version
        if msg.writing > st.disk_version and st.writer is None:
            # It left while being written (claims 32-35): no other write of
            # this block may start before that one is done, or the older
            # version could land last.
            st.writer = node
        if msg.to != NOBODY:
            self.counters.transfers += 1
            if self.coherence == "disk":
                # Written before it left: storage is current.
                st.disk_version = max(st.disk_version, msg.version)
                st.owner = None
            elif dirty:
                # The newest version is not on storage: it now lives with the
                # receiver of an exclusive copy (claim 37), or stays with the
                # sender of a read copy.
                st.owner = msg.to if keep is Mode.N else node
            elif st.owner == node:
                st.owner = None  # what it sent was clean: storage is current
        elif st.owner == node:
            st.owner = None
        if st.acks or st.recovering is not None:
            return []
        return self._complete(msg.block, st)

    def _complete(self, block: int, st: BlockState) -> Out:
        r = st.queue.popleft()
        let_go, st.let_go = st.let_go, False
        out: Out = []
        if r.gone:
            # Its asker died meanwhile.  If the newest version was shipped to
            # it, what survives is the sender's past image: recover it.
            st.final = False
            st.src = None
            if st.owner == r.node:
                st.owner = None
                rec = self.recoveries.setdefault(r.node, Recovery(r.node))
                out += self._hold_for_recovery(block, st, rec)
                return out + self._advance(rec)
            return out + self._serve(block, st)
        if not let_go:
            st.holders[r.node] = max(st.holders.get(r.node, Mode.N), r.mode)
            if r.mode is Mode.X or st.primary not in st.holders:
                st.primary = r.node  # it holds the only copy, or the first of them
        # Sent even when the transfer was the grant: it reaches the requester
        # before any later ping for the block, so the requester knows that a
        # ping is about this hold and waits for the data still on its way.
        out.append((r.node, self._grant(r.node, r.req, (block,), r.mode, st.src is not None)))
        st.final = False
        st.src = None
        out += self._serve(block, st)
        return out

    def on_release(self, node: int, msg: p.Release) -> Out:
        out: Out = []
        promoted: dict[int, list[int]] = {}
        for block in msg.blocks:
            st = self.blocks.get(block)
            if st is None:
                continue
            if node not in st.holders and st.final and st.queue and st.queue[0].node == node:
                # It had the transfer that was its grant, and let it go
                # before the sender's PingDone came: not a holder once done.
                st.let_go = True
            st.holders.pop(node, None)
            if st.owner == node:
                st.owner = None
            if st.primary == node:
                st.primary = self._promote(block, st, promoted)
            out += self._serve(block, st)
            self._gc(block, st)
        out += [(n, p.Primary(tuple(blocks))) for n, blocks in promoted.items()]
        return out

    def on_handoff(self, node: int, msg: p.Handoff) -> Out:
        """`node` would evict these blocks, and offers them to `msg.to`,
        which has room for colder blocks (seed 001: the cluster drops the
        block of lowest retention value, wherever it is).  A block only the
        giver holds, that nobody waits for, moves: a request of `to`'s
        served by the giver's copy, which the giver keeps none of.  The
        others stay as they are, and go back in one Handoff to nobody: the
        giver evicts them as it would have (a copy stays elsewhere, someone
        asked for it, `to` went)."""
        out: Out = []
        declined: list[int] = []
        # Asked once, not per block (as on_lock_request).
        open_to = self._open_to(node, msg.to)
        for block in msg.blocks:
            st = self.blocks.get(block)
            if not (open_to and st is not None and self._movable(node, st)):
                declined.append(block)
                continue
            self.counters.handoffs += 1
            st.queue.append(Request(msg.to, p.HANDOFF, Mode.S, HANDOFF_START, giver=node))
            out += self._serve(block, st)
        if declined:
            self.counters.handoffs_declined += len(declined)
            out.append((node, p.Handoff(tuple(declined), NOBODY)))
        return out

    def _open_to(self, giver: int, to: int) -> bool:
        """May `giver` hand blocks to `to` at all?"""
        return (
            self.peer_reads
            and to != giver
            and to in self.nodes
            and to not in self.recoveries
            and not self._sweeping()
        )

    @staticmethod
    def _movable(giver: int, st: BlockState) -> bool:
        """Only the giver holds the block, clean, and nothing else goes on."""
        return (
            list(st.holders) == [giver]
            and st.owner is None
            and st.writer is None
            and st.recovering is None
            and not (st.queue or st.acks or st.revoking or st.settling)
        )

    def _promote(self, block: int, st: BlockState, promoted: dict[int, list[int]]) -> int | None:
        """The primary let its copy go: the copy granted last (the warmest,
        as LRU goes) becomes primary, so the cluster keeps one copy."""
        if not self.peer_reads or not st.holders:
            return None
        heir = next(reversed(st.holders))
        promoted.setdefault(heir, []).append(block)
        self.counters.primaries_moved += 1
        return heir

    def _gc(self, block: int, st: BlockState) -> None:
        busy = st.holders or st.pis or st.queue or st.acks or st.revoking or st.write_waiters
        if not busy and st.owner is None and st.writer is None and st.recovering is None:
            del self.blocks[block]

    # -- writes ------------------------------------------------------------------
    def on_write_request(self, node: int, msg: p.WriteRequest) -> Out:
        self._see(msg.scn)
        self.counters.write_requests += 1
        if msg.bin:
            self.counters.bin_writes += 1
        out: Out = []
        done: list[tuple[int, int]] = []
        performs: dict[int, list[int]] = {}
        for block, version in msg.blocks:
            st = self._state(block)
            holds = (
                node in st.pis
                or st.owner == node
                or st.holders.get(node) is Mode.X
                or self._receiving(st) == node
            )
            if st.disk_version >= version or not holds:
                # Storage already has it at least as new (claim 18); or the
                # asker's past image was covered by a write whose notice is
                # still on its way (we forget a PI once covered, and may have
                # forgotten the block since): writing it now would put an
                # old version over a newer one.
                self.counters.writes_avoided += 1
                done.append((block, max(st.disk_version, version)))
                self._gc(block, st)
                continue
            st.write_waiters[node] = max(st.write_waiters.get(node, 0), version)
            if st.writer is None:
                writer = self._newest(st, node)
                st.writer = writer
                performs.setdefault(writer, []).append(block)
        for writer, blocks in performs.items():
            out += self._perform(writer, blocks)
        if done:
            self.counters.notifications_now += len(done)
            out.append((node, p.WriteNotify(tuple(done), self.scn)))
        return out

    @staticmethod
    def _receiving(st: BlockState) -> int | None:
        """The asker of an exclusive copy whose transfer is its grant, while
        the sender's PingDone is on its way: the copy may have reached it
        already, and been changed there."""
        if st.acks and st.final and st.queue and st.queue[0].mode is Mode.X:
            return st.queue[0].node
        return None

    def _newest(self, st: BlockState, asker: int) -> int:
        """The node with the most recent version (claim 21): the X holder
        (it has the current copy), else the owner of a dirty read-shared
        version, else the newest past image.  A block being recovered
        is written from the newest past image a survivor keeps.  (A
        receiver of a final transfer whose sender's PingDone is on its way
        is not asked: the sender may still be writing an older version,
        and two writes of one block at once could land out of order.  The
        sender writes what it has; its PingDone comes before its WriteDone,
        and then the receiver writes, if it waits for more.)"""
        if st.recovering is not None and st.pis:
            return max(st.pis, key=lambda n: st.pis[n])
        x = next((n for n, m in st.holders.items() if m is Mode.X), None)
        if x is not None:
            return x
        if st.owner is not None:
            return st.owner
        if st.pis:
            return max(st.pis, key=lambda n: st.pis[n])
        return asker

    def _start_write(self, block: int, st: BlockState) -> Out:
        if not st.write_waiters or st.writer is not None:
            return []
        writer = self._newest(st, max(st.write_waiters))
        if writer < 0:
            # Only the master waits, and no live host has a copy newer than
            # storage: storage is the newest there is.
            st.write_waiters.clear()
            return self._writes_done(block)
        st.writer = writer
        return self._perform(writer, [block])

    def _perform(self, writer: int, blocks: list[int]) -> Out:
        """Have `writer` write these blocks: checked where what it writes
        is a past image that storage may have something newer than
        (BlockState.unsure); a copy it holds is the newest there is."""
        self.counters.write_performs += len(blocks)
        checked = [b for b in blocks if self._writes_image(self.blocks[b], writer)]
        plain = [b for b in blocks if b not in checked]
        return [
            (writer, p.WritePerform(tuple(bs), self.scn, check))
            for bs, check in ((plain, False), (checked, True))
            if bs
        ]

    @staticmethod
    def _writes_image(st: BlockState, writer: int) -> bool:
        """Is what `writer` would write of the block an unsure past image?
        (A host that holds a copy writes that: cache.perform_write.)"""
        return st.unsure and writer in st.pis and writer not in st.holders

    def _writes_done(self, block: int) -> Out:
        """A write the master waited for (a recovery's, a settling block's)
        is over: the newest version needed is on storage, or no live host
        has anything newer."""
        out: Out = []
        for rec in list(self.recoveries.values()):
            if rec.writes.pop(block, None) is not None:
                out += self._advance(rec)
        st = self.blocks.get(block)
        if st is not None and st.settling:
            st.settling = False
            out += self._serve(block, st)
        return out

    def on_write_done(self, node: int, msg: p.WriteDone) -> Out:
        """Storage has these versions: tell the writer and who asked at once,
        the other PI holders later (claims 13-17), and forget covered PIs."""
        self._see(msg.scn)
        now: dict[int, list[tuple[int, int]]] = {}
        out: Out = []
        for block, version in msg.blocks:
            st = self._state(block)
            st.disk_version = max(st.disk_version, version)
            if st.writer == node:
                st.writer = None
            if st.owner == node and st.holders.get(node) is not Mode.X:
                st.owner = None  # it can no longer change: storage is current
            told = {node: version}
            rest = {}
            for n, wanted in st.write_waiters.items():
                if wanted <= version:
                    told[n] = version
                else:
                    rest[n] = wanted
            if rest and self._newest(st, max(rest)) == node:
                # The newest holder wrote all it can.  If it asked itself,
                # an operation of its own is changing the copy, and it wrote
                # the version before: it hears what it wrote, and its copy
                # stays dirty.  If it had nothing (the block was freed since,
                # or allocated afresh by a running operation), another's past
                # image is obsolete: done with.  A recovery has all there is.
                # Otherwise the others hear what landed; a newer past image
                # stays, for a later write.
                for n, wanted in rest.items():
                    obsolete = n == MASTER or (n != node and version == 0)
                    told[n] = wanted if obsolete else version
                rest = {}
            st.write_waiters = rest
            if told.pop(MASTER, None) is not None:
                out += self._writes_done(block)
            for n, v in told.items():
                now.setdefault(n, []).append((block, v))
            for n, v in list(st.pis.items()):
                if v <= told.get(n, version):
                    del st.pis[n]
                if n not in told:
                    # A holder of a newer PI may keep older ones apart from
                    # it, to drop them now (claims 43-45).
                    self._defer(n, block, version)
            if rest:
                # It wrote an older version than they asked for (their copy
                # reached them before its sender's PingDone reached us, and
                # we asked the sender; a write was in flight when a recovery
                # asked): the newest holder writes again.
                out += self._start_write(block, st)
            self._gc(block, st)
        for n, written in now.items():
            self.counters.notifications_now += len(written)
            out.append((n, p.WriteNotify(tuple(written), self.scn)))
        return out

    def _defer(self, node: int, block: int, version: int) -> None:
        """Storage has `version` of `block`: tell `node` on a later message."""
        d = self.deferred.setdefault(node, {})
        d[block] = max(d.get(block, 0), version)
        self.counters.notifications_piggybacked += 1

    def _take_deferred(self, node: int) -> tuple[tuple[int, int], ...]:
        d = self.deferred.pop(node, None)
        return tuple(d.items()) if d else ()

    def flush_deferred(self) -> Out:
        """Notifications that found no message to ride on in time."""
        out: Out = []
        for node in list(self.deferred):
            written = self._take_deferred(node)
            if written:
                out.append((node, p.WriteNotify(written, self.scn)))
        return out

    # -- status ------------------------------------------------------------------
    def stuck(self) -> list[str]:
        """Blocks someone waits on, and recoveries under way (a state dump)."""
        out = []
        for b, st in sorted(self.blocks.items()):
            busy = st.queue or st.acks or st.revoking or st.write_waiters
            if not (busy or st.recovering is not None or st.writer is not None):
                continue
            queue = [(r.node, r.req, r.mode.name, "rec" if r.recovery else "") for r in st.queue]
            holders = {n: m.name for n, m in st.holders.items()}
            out.append(
                f"block {b}: holders {holders} owner {st.owner} pis {st.pis} "
                f"disk v{st.disk_version} queue {queue} acks {sorted(st.acks)} src {st.src} "
                f"revoking {sorted(st.revoking)} recovering {st.recovering} "
                f"writer {st.writer} write waiters {sorted(st.write_waiters)}"
            )
        for rec in self.recoveries.values():
            out.append(
                f"recovery of node {rec.dead}: pending {sorted(rec.pending)} sent {rec.sent} "
                f"writes {rec.writes} closer {rec.closer}"
            )
        return out

    def summary(self) -> dict[str, object]:
        held: dict[int, dict[str, int]] = {}
        for st in self.blocks.values():
            for n, m in st.holders.items():
                h = held.setdefault(n, {"S": 0, "X": 0, "pi": 0})
                h[m.name] += 1
            for n in st.pis:
                held.setdefault(n, {"S": 0, "X": 0, "pi": 0})["pi"] += 1
        counters = asdict(self.counters)
        return {
            "blocks_tracked": len(self.blocks),
            "messages_per_transfer": messages_per_transfer(counters),
            "held": held,
            "scn": self.scn,
            "counters": counters,
        }
