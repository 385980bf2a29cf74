"""Every message hosts and masters exchange, the framing, and the handshake.

Sans-IO, after h11: `Connection` turns bytes into messages and messages into
bytes; the trio services (master.py, agent.py) own the sockets.  Rule: any
message type or field lives here and nowhere else.

A frame is

    u32 length | u16 type | u64 sequence | msgpack body | 16-byte MAC

where the MAC is keyed BLAKE2b over everything before it, with a session key
both sides derive from the cluster key (which mkfs stores in the superblock)
and the two nonces of the handshake.  Sequence numbers start at 0 in each
direction and must arrive in order, so a replayed, reordered or forged frame
is refused.  Until the handshake completes only `Hello` and `Auth` travel,
unauthenticated but useless without the key.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import hmac
import math
import os
import struct
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, NewType

import msgpack
import xxhash

HostId = NewType("HostId", int)


class Mode(enum.IntEnum):
    """N: no access; S: shared, read; X: exclusive, write.  Ordered: X > S > N."""

    N = 0
    S = 1
    X = 2

    def compatible(self, other: Mode) -> bool:
        return self is Mode.N or other is Mode.N or (self is Mode.S and other is Mode.S)


#: A lockable resource: ("block", blockno) or a named one such as ("llol", 0).
Resource = tuple[str, int]


def block_resource(blockno: int) -> Resource:
    return ("block", blockno)


# ---------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """The peer sent something we must not accept; the connection ends."""


class AuthError(ProtocolError):
    """The peer does not know the cluster key (or replayed a frame)."""


# ---------------------------------------------------------------------------
# Messages

MAX_FRAME = 1 << 24  # 16 MiB: a batch of blocks, never unbounded
MAX_HANDSHAKE_FRAME = 256  # what an unauthenticated peer may make us buffer
MAC_SIZE = 16
_HEAD = struct.Struct("<IHQ")
PROTOCOL_VERSION = 1


class Message:
    """Base of all messages: a frozen dataclass with a wire `TYPE` number."""

    __slots__ = ()
    TYPE: ClassVar[int]
    registry: ClassVar[dict[int, type[Message]]] = {}


def message(type_: int):  # type: ignore[no-untyped-def]
    """Class decorator: a frozen, slotted dataclass registered under `type_`."""

    def wrap(cls):  # type: ignore[no-untyped-def]
        if type_ in Message.registry:
            raise TypeError(f"message type {type_} used twice")
        cls = dataclass(frozen=True, slots=True)(cls)
        cls.TYPE = type_
        Message.registry[type_] = cls
        return cls

    return wrap


# -- handshake ---------------------------------------------------------------


@message(1)
class Hello(Message):
    """First frame each way: who I am and a fresh nonce."""

    version: int
    node: int  # -1 for a tool (status) or the master itself
    nonce: bytes


@message(2)
class Auth(Message):
    """Proof of the cluster key: MAC over both nonces and both roles."""

    proof: bytes


# -- membership ----------------------------------------------------------------


@message(10)
class Join(Message):
    """A host asks to join with its slot and the address peers reach it at.

    `live`: the other hosts it knows may hold locks: for a fresh join, the
    slots it saw live on the volume; for a resume, the peers it knew.  A
    master that has just started (or lost every host at once) waits for
    those to resume before it serves anyone.

    `resume`: the host was joined to a master it lost, and reports what it
    holds so that a master that has just started can rebuild its directory:
    `held` as (block, mode, version, dirty), `pis` as (block, newest
    past-image version), and the hosts with records in the log (`marks`,
    as of the log header's version `marks_version`: the newest report is
    right; a host with records that does not resume left changes only its
    records know of).
    """

    node: int
    peer_host: str
    peer_port: int
    coherence: str  # "fusion" or "disk"
    live: tuple[int, ...] = ()
    resume: bool = False
    held: tuple[tuple[int, int, int, bool], ...] = ()
    pis: tuple[tuple[int, int], ...] = ()
    marks: tuple[int, ...] = ()
    marks_version: int = 0
    llol: int = -1  # the log header's block (the LLOL's), for a sweep
    # With the directory spread over the hosts (spread.py): the part of the
    # blocks this session is about, of how many.
    partition: int = 0
    partitions: int = 1


@message(11)
class Welcome(Message):
    scn: int
    peers: dict[int, tuple[str, int]]
    coherence: str
    lease: float  # seconds: a host silent this long is declared dead
    master_node: int = -1  # the host this master is embedded in; -1: standalone


@message(12)
class Refused(Message):
    reason: str


@message(13)
class PeerUp(Message):
    node: int
    host: str
    port: int


@message(14)
class PeerDown(Message):
    node: int


@message(15)
class Beat(Message):
    """Lease renewal, both ways, each quarter lease: a host that hears
    nothing from the master for most of a lease fences itself; the master
    declares a host it hears nothing from for a lease dead."""


@message(16)
class Bye(Message):
    """A host leaves cleanly: everything it changed is on storage, so its
    locks can simply go (no recovery)."""


@message(17)
class Recover(Message):
    """Master to a survivor: host `dead` died holding these blocks in X.
    Rebuild them from storage and the log (you hold them in X now), take
    its records over, then say RecoverDone.  `follow`: also take and
    rebuild the blocks its records name that it had allocated privately
    (one survivor does that: two taking the same blocks would each wait
    for the other's round to end).  A round of blocks the dead host was
    shipping does not: it registered its private blocks before a block
    left it.

    `sweep`: a master rebuilt from the hosts' reports does not know what
    `dead` held (it did not come back): take and rebuild every block its
    records name, the log's header first (it may have held the LLOL), then
    say RecoverDone with `sweep` set."""

    dead: int
    blocks: tuple[int, ...]
    scn: int
    follow: bool = True
    sweep: bool = False


@message(18)
class RecoverDone(Message):
    """Survivor to master: the dead host's blocks are rebuilt; `installed`
    are in our cache (dirty, held X), the others are current on storage.
    `kept`: installed blocks whose cached copy was newer than the rebuild
    and stayed (the dead host shipped it to us before it died), each with
    the version rebuilt, which storage must reach before the dead host's
    records may go."""

    dead: int
    blocks: tuple[int, ...]
    installed: tuple[int, ...]
    scn: int
    kept: tuple[tuple[int, int], ...] = ()
    sweep: bool = False  # the answer to a Recover with sweep set


# -- locks -------------------------------------------------------------------


@message(20)
class LockRequest(Message):
    """Ask for `mode` on several blocks at once (claims 10-12)."""

    req: int
    blocks: tuple[int, ...]
    mode: int
    scn: int
    op_start: float  # the asking operation's start: older operations win conflicts
    # A rebuilder's, or a registration of blocks the asker allocated: granted
    # at once on blocks under recovery that the asker holds in X already.
    recovery: bool = False


@message(21)
class Grant(Message):
    """Blocks granted with no transfer: read them from storage (or keep
    the copy you have).  Write notifications ride along (claim 15)."""

    req: int
    blocks: tuple[int, ...]
    mode: int
    scn: int
    written: tuple[tuple[int, int], ...] = ()  # (block, version on storage)
    transfer: bool = False  # a host is sending the data: wait for it


@message(22)
class Ping(Message):
    """Master to holder: send your copy of `block` to `to` and drop to
    `keep` (N or S).  Write notifications ride along (claim 17)."""

    block: int
    to: int
    mode: int  # the mode the receiver gets
    keep: int
    req: int  # the receiver's request id
    scn: int
    op_start: float
    final: bool  # no other host must let go first: the transfer is the grant
    written: tuple[tuple[int, int], ...] = ()
    # --peer-reads: you keep S and stay the block's primary cache; the
    # receiver's copy is a copy (evicted first there: seed 001).
    primary: bool = False


@message(23)
class Transfer(Message):
    """Holder to requester, host to host: the block, and what it is.

    `dirty` marks a version not yet on storage; then the block is in global
    role at the receiver.  `writing` is the version the sender is writing to
    storage at this moment (0 if none): the receiver must keep its past images
    up to it apart from newer ones (claims 41-45).
    """

    req: int
    block: int
    mode: int
    version: int
    dirty: bool
    writing: int
    scn: int
    final: bool  # the grant: the requester may go on at once
    btype: int  # metadata block type, 0 for a data block
    data: bytes
    via_storage: bool = False  # --coherence disk: read it from storage instead
    copy: bool = False  # the sender stays the primary: hold it as a copy (Ping.primary)
    age: float = 0.0  # seconds since the sender last used it (its retention value)


@message(24)
class PingDone(Message):
    """Holder to master: sent `block` to `to`; I now hold `keep`, and keep a
    past image of version `pi` (0 if none)."""

    block: int
    to: int
    keep: int
    pi: int
    version: int  # the version shipped
    dirty: bool  # it was not on storage
    writing: int  # a version of it we are writing to storage right now (0: none)
    scn: int


@message(25)
class Release(Message):
    """A host lets go of clean blocks (eviction, unmount)."""

    blocks: tuple[int, ...]


#: The request id of a handoff (Handoff): no request of the receiver's
#: (those count from 1); a Transfer or Grant with it brings a block the
#: receiver did not ask for, to keep.
HANDOFF = 0


@message(28)
class Handoff(Message):
    """A host to the master (--peer-reads): it is about to evict these clean
    blocks, the only cached copies it knows of, and `to` has room for
    colder blocks than these (Retention): move them there rather than let
    the cluster lose them (seed 001, cache retention values compared).  The
    host keeps each until the master pings it: to ship it to `to`, or
    just to drop it."""

    blocks: tuple[int, ...]
    to: int


# -- the log's tail, host to host ------------------------------------------------


@message(26)
class LogAppend(Message):
    """Host to the host it takes for the LLOL's holder: append `records`
    (its private log cache: whole transactions, packed as in a log page) to
    the log for me, and answer once they are on storage.  A commit that
    costs two host-to-host messages instead of moving the LLOL."""

    req: int
    records: bytes


@message(27)
class LogAppended(Message):
    """The answer to LogAppend `req`: `ok`, the records are on storage; or
    not (it does not hold the LLOL: `holder` is the host it gave it to, -1
    if it does not know).  Then where the log ends and its checkpoint, as
    the holder's header has them."""

    req: int
    ok: bool
    holder: int
    next_seq: int
    llp_used: int
    checkpoint_seq: int


# -- writes ----------------------------------------------------------------------


@message(30)
class WriteRequest(Message):
    """Please get these dirty versions onto storage (claims 1, 30, 58).
    A checkpoint asks for a whole bin of past images in one request, and
    names it by its upper edge (claims 10-12)."""

    blocks: tuple[tuple[int, int], ...]  # (block, version)
    scn: int
    bin: int = 0  # 0: not a bin write


@message(31)
class WritePerform(Message):
    """Master to the host with the newest version: write it (claims 19-21).
    `check`: a master rebuilt from the hosts' reports does not know what
    storage has: write your newest past image only if storage has an older
    version (a data block carries none: storage is taken as newer)."""

    blocks: tuple[int, ...]
    scn: int
    check: bool = False


@message(32)
class WriteDone(Message):
    """Host to master: these versions are on storage."""

    blocks: tuple[tuple[int, int], ...]
    scn: int


@message(33)
class WriteNotify(Message):
    """Master to a host: storage holds at least these versions; drop past
    images up to them (claims 8-17, 22-23)."""

    written: tuple[tuple[int, int], ...]
    scn: int


# -- status ------------------------------------------------------------------------


@message(34)
class Primary(Message):
    """Master to a host (--peer-reads): the primary cache of these blocks
    let its copy go; yours is the primary now, kept before copies of
    blocks other hosts are primary for (seed 001)."""

    blocks: tuple[int, ...]


#: At most this many partitions (a host slot says which it masters, as a mask).
MAX_PARTITIONS = 64
#: Blocks go to partitions in runs of this many, so that a request for
#: neighbouring blocks mostly goes to one master.
PARTITION_RUN = 64


def partition_of(block: int, partitions: int) -> int:
    """Which of `partitions` masters a block has (spread.py): a hash of
    its run of PARTITION_RUN blocks."""
    if partitions == 1:
        return 0
    return xxhash.xxh32_intdigest((block // PARTITION_RUN).to_bytes(8, "little")) % partitions


@message(35)
class Handover(Message):
    """A host to the host that masters `partition` (spread.py): the hash
    over the live hosts names the asker now; stop mastering it."""

    partition: int


@message(36)
class HandedOver(Message):
    """The answer to a Handover: the partition's master has stopped, and
    every session with it has ended; the asker may master it now."""

    partition: int
    ok: bool
    hosts: tuple[int, ...] = ()  # joined to it when it stopped: the new one waits for them


@message(40)
class StatusRequest(Message):
    pass


@message(41)
class StatusReply(Message):
    info: dict[str, Any] = field(default_factory=dict)


@message(42)
class Stats(Message):
    """A host's counters, sent to the master every second for status: running
    totals, except the levels named in STATS_LEVELS."""

    node: int
    counters: dict[str, int]
    #: Seconds since the block this host would evict next was last used
    #: (its cache retention value: the older, the less it is worth); SPARE
    #: while it has room, or would evict only a copy of a block another host
    #: is primary for.  -1: not told.
    spare: float = -1.0


#: Stats.spare of a host that would evict nothing of worth.
SPARE = 1e9


@message(43)
class Retention(Message):
    """The master to each host (--peer-reads), in answer to its Stats: what
    the other live hosts last said their Stats.spare was."""

    spare: tuple[tuple[int, float], ...]


#: Stats counters that are levels (blocks cached now), not running totals.
STATS_LEVELS = frozenset(
    {
        "cache_blocks",
        "cache_dirty",
        "cache_pis",
        "log_pages_in_use",
        "mirror_queued_bytes",
        "mirror_queued_updates",
        "mirror_marked_regions",
        "mirror_lag_ms",
        "mirror_reachable",
    }
)


# ---------------------------------------------------------------------------
# Framing


def _mac(key: bytes, data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, key=key, digest_size=MAC_SIZE).digest()


@functools.cache
def _field_names(cls: type[Message]) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


def encode_body(msg: Message) -> bytes:
    # Fields are plain values (no nested dataclasses): no astuple, which
    # deep-copies, and costs more than the rest of a send.
    return msgpack.packb(tuple(getattr(msg, n) for n in _field_names(type(msg))), use_bin_type=True)


def decode_body(mtype: int, body: bytes | memoryview) -> Message:
    cls = Message.registry.get(mtype)
    if cls is None:
        raise ProtocolError(f"unknown message type {mtype}")
    try:
        values = msgpack.unpackb(body, raw=False, strict_map_key=False, use_list=False)
    except Exception as e:  # msgpack raises several kinds; all mean garbage
        raise ProtocolError(f"malformed {cls.__name__} body: {e}") from None
    if not isinstance(values, tuple) or len(values) != len(_field_names(cls)):
        raise ProtocolError(f"malformed {cls.__name__}: wrong field count")
    try:
        msg = cls(*values)
    except TypeError as e:
        raise ProtocolError(f"malformed {cls.__name__}: {e}") from None
    _check_types(msg)
    return msg


Check = typing.Callable[[Any], bool]


def _checker(t: Any) -> Check:
    """A test that a decoded value has the annotated type `t`, built once per
    field (bool is not taken for an int: msgpack keeps them apart, and so do
    we)."""
    origin = typing.get_origin(t)
    if t is Any:
        return lambda v: True
    if t is float:
        return lambda v: isinstance(v, int | float) and not isinstance(v, bool)
    if t is int:
        return lambda v: isinstance(v, int) and not isinstance(v, bool)
    if origin is None:
        return lambda v: isinstance(v, t)
    args = typing.get_args(t)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _checker(args[0])
            return lambda v: isinstance(v, tuple) and all(item(x) for x in v)
        items = [_checker(a) for a in args]
        return lambda v: (
            isinstance(v, tuple)
            and len(v) == len(items)
            and all(c(x) for c, x in zip(items, v, strict=True))
        )
    if origin is dict:
        key, val = _checker(args[0]), _checker(args[1])
        return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
    return lambda v: isinstance(v, origin)


#: Every int on the wire is a count, block, version or id: 0 <= v < 2**63,
#: except these, where -1 means "nobody" (a tool, the master, no receiver)
#: or "none" (no log header known).
_MAY_BE_NOBODY = frozenset({"node", "to", "dead", "llol", "master_node", "holder"})
#: Fields that carry a Mode.
_MODES = frozenset({"mode", "keep"})
_INT_LIMIT = 1 << 63


def _in_range(name: str, t: Any) -> Check:
    """A test of a decoded field's values (the handlers index, compare and
    build Modes from them: a negative block or a mode of 7 must stop here).
    A free-form field (status info) is only shown, never acted on."""
    if t is Any or Any in typing.get_args(t):
        return lambda v: True
    if name in _MODES:
        return lambda v: v in (0, 1, 2)
    low = -1 if name in _MAY_BE_NOBODY else 0
    return lambda v: _ints_within(v, low)


def _ints_within(v: Any, low: int) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return low <= v < _INT_LIMIT
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, tuple):
        return all(_ints_within(x, low) for x in v)
    if isinstance(v, dict):
        return all(_ints_within(x, low) for x in v.values())
    return True


@functools.cache
def _checkers(cls: type[Message]) -> tuple[tuple[str, Check, Check], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((n, _checker(hints[n]), _in_range(n, hints[n])) for n in _field_names(cls))


def _check_types(msg: Message) -> None:
    """Refuse fields of the wrong kind or out of range, so handlers can
    trust what they get."""
    for name, ok, within in _checkers(type(msg)):
        value = getattr(msg, name)
        if not ok(value):
            raise ProtocolError(f"malformed {type(msg).__name__}.{name}")
        if not within(value):
            raise ProtocolError(f"{type(msg).__name__}.{name} out of range")


class Connection:
    """One side of a link: feed received bytes, take messages; hand messages,
    get bytes to send.  Before the handshake only Hello/Auth pass.

    Attributes:
        node: our node id (-1 for the master or a tool).
        peer_node: the other side's node id, once its Hello arrived.
        authenticated: both proofs checked; MACs are on from here.
        rejected: frames refused (malformed, forged, replayed), for counters.
    """

    def __init__(self, cluster_key: bytes, node: int, *, initiator: bool) -> None:
        self._key = cluster_key
        self.node = node
        self.initiator = initiator
        self.peer_node: int | None = None
        self._nonce = os.urandom(16)
        self._peer_nonce: bytes | None = None
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self.authenticated = False
        self._buf = bytearray()
        self._send_seq = 0
        self._recv_seq = 0
        self.rejected = 0

    # -- handshake -----------------------------------------------------------
    def hello(self) -> bytes:
        return self._frame(Hello(PROTOCOL_VERSION, self.node, self._nonce), mac=False)

    def _proof(self, mine: bool) -> bytes:
        assert self._peer_nonce is not None
        role = self.initiator if mine else not self.initiator
        a, b = (self._nonce, self._peer_nonce) if mine else (self._peer_nonce, self._nonce)
        return _mac(self._key, b"sharedfs-auth" + bytes([role]) + a + b)

    def _handshake(self, msg: Message) -> bytes:
        """Handle a handshake frame; return bytes to send (maybe empty)."""
        if isinstance(msg, Hello) and self._peer_nonce is None:
            if msg.version != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"peer speaks protocol {msg.version}, we speak {PROTOCOL_VERSION}"
                )
            if len(msg.nonce) != 16:
                raise ProtocolError("bad nonce")
            self._peer_nonce = msg.nonce
            self.peer_node = msg.node
            return self._frame(Auth(self._proof(mine=True)), mac=False)
        if isinstance(msg, Auth) and self._peer_nonce is not None and not self.authenticated:
            if not hmac.compare_digest(msg.proof, self._proof(mine=False)):
                raise AuthError("peer does not know the cluster key")
            i_n, r_n = (
                (self._nonce, self._peer_nonce)
                if self.initiator
                else (self._peer_nonce, self._nonce)
            )
            # One key per direction: a frame bounced back to its sender fails.
            i2r = _mac(self._key, b"sharedfs-i2r" + i_n + r_n) * 2
            r2i = _mac(self._key, b"sharedfs-r2i" + i_n + r_n) * 2
            self._send_key, self._recv_key = (i2r, r2i) if self.initiator else (r2i, i2r)
            self.authenticated = True
            self._send_seq = self._recv_seq = 0
            return b""
        raise AuthError(f"unexpected {type(msg).__name__} before authentication")

    # -- bytes in ------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken as frames."""
        return len(self._buf)

    def next_event(self) -> tuple[Message | None, bytes]:
        """(a message or None if more bytes are needed, bytes to send back).
        Raises ProtocolError/AuthError for anything we must not accept."""
        try:
            while True:
                was_authenticated = self.authenticated
                msg, reply = self._next()
                # The handshake's last frame asks for no reply: go straight on
                # to what followed it in the buffer, so (None, b"") keeps
                # meaning "need more bytes".
                if msg is None and not reply and self.authenticated and not was_authenticated:
                    continue
                return msg, reply
        except ProtocolError:
            self.rejected += 1
            raise

    def _next(self) -> tuple[Message | None, bytes]:
        if len(self._buf) < _HEAD.size:
            return None, b""
        length, mtype, seq = _HEAD.unpack_from(self._buf, 0)
        limit = MAX_FRAME if self.authenticated else MAX_HANDSHAKE_FRAME
        if length < _HEAD.size or length > limit:
            raise ProtocolError(f"frame length {length} out of bounds")
        if len(self._buf) < length:
            return None, b""
        frame = bytes(self._buf[:length])
        del self._buf[:length]
        if not self.authenticated:
            msg = decode_body(mtype, memoryview(frame)[_HEAD.size :])
            return None, self._handshake(msg)
        assert self._recv_key is not None
        if length < _HEAD.size + MAC_SIZE:
            raise ProtocolError("frame too short for its MAC")
        body, mac = frame[:-MAC_SIZE], frame[-MAC_SIZE:]
        if not hmac.compare_digest(mac, _mac(self._recv_key, body)):
            raise AuthError("frame MAC mismatch (forged or corrupted)")
        if seq != self._recv_seq:
            raise AuthError(f"frame sequence {seq}, expected {self._recv_seq} (replayed?)")
        self._recv_seq += 1
        return decode_body(mtype, memoryview(body)[_HEAD.size :]), b""

    # -- bytes out -----------------------------------------------------------
    def send(self, msg: Message) -> bytes:
        if not self.authenticated:
            raise ProtocolError("cannot send before authentication")
        return self._frame(msg, mac=True)

    def _frame(self, msg: Message, *, mac: bool) -> bytes:
        body = encode_body(msg)
        length = _HEAD.size + len(body) + (MAC_SIZE if mac else 0)
        if length > MAX_FRAME:
            raise ProtocolError(f"{type(msg).__name__} too large ({length} bytes)")
        seq = self._send_seq if mac else 0
        frame = _HEAD.pack(length, msg.TYPE, seq) + body
        if mac:
            assert self._send_key is not None
            frame += _mac(self._send_key, frame)
            self._send_seq += 1
        return frame
