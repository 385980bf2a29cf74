"""Hostile input for sharedfs; see tools/fuzz.

`frames`: a real lock master and two real hosts on loopback serve a
workload (each host writes files and reads back its own and the other's)
while attackers open connections to the master and to the hosts' peer
listeners and send what no honest peer sends: garbage before the
handshake, oversized length prefixes, truncated frames, handshakes with the
wrong key, replays of a recorded session, and, as insiders who know the
key, frames with flipped MACs, out-of-order sequence numbers, malformed
bodies, unknown types, wrong field types and out-of-range values.  Every
bad frame must end its connection without a reply, the services must keep
running, and the workload must read back exactly what it wrote.

`volume`: damaged copies of a small real volume (flipped bytes, with and
without the checksum fixed up, zeroed and swapped blocks): mounting must
refuse with a clear error or fail just the operations the damage touches,
with an FsError, and `fsck -y` must leave a volume `fsck -n` finds clean.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import stat
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgpack
import trio

from sharedfs import format as fmt
from sharedfs import protocol as p
from sharedfs.errors import CorruptVolume, FsError, QuietError
from sharedfs.fs import Ctx, FileSystem
from sharedfs.fsck import run_fsck
from sharedfs.host import open_cluster_host, open_host
from sharedfs.master import MasterService
from sharedfs.mkfs import format_volume
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock

log = logging.getLogger("fuzz")

CTX = Ctx(0, 0)
#: How long a peer gets to answer a bad frame by closing the connection
#: (generous: the machine may be loaded; only a failure waits this long).
VERDICT_TIMEOUT = 30.0
#: Files each host creates before it only rewrites its own.
SHARED_FILES = 60
HOSTS = 2


@dataclass
class Report:
    """What a fuzz run did and found.

    Attributes:
        frames: frames (or garbage chunks) sent, handshake frames included.
        bad_frames: of those, frames the peer had to refuse.
        closed: connections the peer ended after a bad frame.
        accepted: bad frames that got a reply instead (must be 0).
        connections: connections opened.
        rejected_master / rejected_hosts: the services' own counts.
        ops / wrong: workload operations, and reads that came back wrong.

    An exception in the master or a host ends the run with its traceback:
    a report means no crash.
    """

    frames: int = 0
    bad_frames: int = 0
    closed: int = 0
    accepted: int = 0
    connections: int = 0
    rejected_master: int = 0
    rejected_hosts: int = 0
    ops: int = 0
    wrong: int = 0
    seconds: float = 0.0
    by_attack: dict[str, int] = field(default_factory=dict)

    @property
    def unaccounted(self) -> int:
        """Bad frames the services did not count as rejected."""
        return self.bad_frames - self.rejected_master - self.rejected_hosts

    def lines(self) -> list[str]:
        return [
            f"frames sent {self.frames} ({self.bad_frames} bad) on {self.connections} connections",
            f"refused by closing {self.closed}, accepted {self.accepted}",
            f"rejected: master {self.rejected_master}, hosts {self.rejected_hosts}",
            f"workload: {self.ops} operations, {self.wrong} wrong reads; crashes 0",
            f"time {self.seconds:.1f} s",
            "attacks: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_attack.items())),
        ]


# ---------------------------------------------------------------------------
# Frames


def raw_frame(conn: p.Connection, mtype: int, body: bytes, seq: int | None = None) -> bytes:
    """A frame as `conn` would send it, but of any type, body and sequence:
    what an insider who knows the key can put on the wire."""
    assert conn._send_key is not None
    seq = conn._send_seq if seq is None else seq
    length = p._HEAD.size + len(body) + p.MAC_SIZE
    frame = p._HEAD.pack(length, mtype, seq) + body
    return frame + p._mac(conn._send_key, frame)


def _wrong_value(rng: random.Random) -> object:
    return rng.choice(
        [None, True, -1, 2**64 - 1, -(2**63), 1.5, "x" * rng.randrange(50), b"\0" * 9, [1], {1: 2}]
    )


def _bad_int(rng: random.Random) -> int:
    """No block, version or id (-1 may mean "nobody": -2 never does)."""
    return rng.choice([-2, -(2**63), 2**63, 2**64 - 1])


def _bad_mode(rng: random.Random) -> int:
    return rng.choice([-1, 3, 255, 2**63, 2**64 - 1])


def bad_body(rng: random.Random) -> tuple[int, bytes]:
    """(type, body) that must be refused: a known type with a broken body,
    wrong field count or types, or an unknown type."""
    types = sorted(p.Message.registry)
    mtype = rng.choice(types)
    cls = p.Message.registry[mtype]
    names = p._field_names(cls)
    kind = rng.randrange(5)
    if kind == 0:
        return mtype, rng.randbytes(rng.randrange(0, 64))  # not msgpack (mostly)
    if kind == 1:
        wrong = len(names) + (1 if not names else rng.choice([-1, 1]))
        return mtype, msgpack.packb([0] * wrong)
    if kind == 2:
        return rng.choice([0, 3, 99, 1000, 65535]), msgpack.packb([])
    if kind == 3:
        return mtype, msgpack.packb(rng.choice([{}, 7, "hello", None]))
    # The right count with one field of the wrong kind (needs one field).
    if not names:
        return mtype, msgpack.packb([None])
    values: list[object] = [0] * len(names)
    values[rng.randrange(len(names))] = _wrong_value(rng)
    return mtype, msgpack.packb(values)


def bad_values(rng: random.Random, node: int) -> p.Message:
    """A well-typed message from joined `node` whose values no honest host
    sends: negative or huge block numbers, modes that do not exist."""
    b = _bad_int(rng)
    choices: list[p.Message] = [
        p.LockRequest(rng.randrange(1, 99), (b,), rng.randrange(3), 0, 0.0),
        p.LockRequest(rng.randrange(1, 99), (7,), _bad_mode(rng), 0, 0.0),
        p.PingDone(b, -1, 0, 0, 0, False, 0, 0),
        p.PingDone(7, -1, _bad_mode(rng), 0, 0, False, 0, 0),
        p.LockRequest(1, (1,), 1, 0, rng.choice([math.nan, math.inf])),
        p.Release((b,)),
        p.WriteRequest(((b, 1),), 0),
        p.WriteDone(((b, _bad_int(rng)),), 0),
        p.RecoverDone(node, (b,), (), 0),
        p.LockRequest(1, (1,), 1, _bad_int(rng), 0.0),
    ]
    return rng.choice(choices)


# ---------------------------------------------------------------------------
# One attack per connection

#: What a joined insider hears whatever it sends: not replies to a bad frame.
_UNASKED = (p.Beat, p.PeerUp, p.PeerDown, p.WriteNotify)


class Attacker:
    """Opens connections to the master and the hosts' peer listeners and
    sends one attack on each."""

    def __init__(self, key: bytes, master_port: int, peer_ports: list[int], report: Report):
        self.key = key
        self.master_port = master_port
        self.peer_ports = peer_ports
        self.report = report
        self.recorded = b""  # a whole authenticated session, sent by a tool
        # Host slots insiders join in; a slot is busy until its fencing ends.
        self._slot_back, self._slot_free = trio.open_memory_channel[int](8)
        for node in range(HOSTS, 8):
            self._slot_back.send_nowait(node)

    async def record_session(self) -> None:
        """What an honest tool sends for `sharedfs status`: replay material."""
        tape: list[bytes] = []
        stream = await trio.open_tcp_stream("127.0.0.1", self.master_port)
        async with stream:
            conn = await self.handshake(stream, -1, tape)
            assert conn is not None, "the master refused an honest handshake"
            tape.append(conn.send(p.StatusRequest()))
            await stream.send_all(tape[-1])
        self.recorded = b"".join(tape)

    async def attack(self, rng: random.Random) -> None:
        to_master = rng.random() < 0.6
        port = self.master_port if to_master else rng.choice(self.peer_ports)
        name, fn = rng.choice(ATTACKS)
        if name == "bad_values" and not to_master:
            name, fn = "bad_body", _insider_bad_body
        self.report.by_attack[name] = self.report.by_attack.get(name, 0) + 1
        self.report.connections += 1
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return  # the listener's backlog is full: that is the peer coping
        async with stream:
            await fn(self, stream, rng, to_master)

    async def send(self, stream: trio.SocketStream, data: bytes, *, bad: bool = False) -> None:
        self.report.frames += 1
        self.report.bad_frames += bad
        with contextlib.suppress(trio.BrokenResourceError, OSError):
            await stream.send_all(data)  # it may have hung up on an earlier frame already

    async def verdict(self, stream: trio.SocketStream, conn: p.Connection | None) -> None:
        """After a bad frame the peer must close without a message."""
        with trio.move_on_after(VERDICT_TIMEOUT):
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, OSError):
                    data = b""
                if not data:
                    self.report.closed += 1
                    return
                if conn is not None and conn.authenticated:
                    conn.receive_data(data)
                    if reply := self._reply(conn):
                        log.error("accepted: a bad frame got %.200r", reply)
                        self.report.accepted += 1
                        return
        log.error("accepted: a bad frame left the connection open")
        self.report.accepted += 1

    @staticmethod
    def _reply(conn: p.Connection) -> p.Message | None:
        """A message in what arrived that answers us, if any."""
        while (msg := conn.next_event()[0]) is not None:
            if not isinstance(msg, _UNASKED):
                return msg
        return None

    async def handshake(
        self, stream: trio.SocketStream, node: int, tape: list[bytes] | None = None
    ) -> p.Connection | None:
        """An insider's honest handshake (what it sends also goes on `tape`);
        None if the peer hung up."""
        conn = p.Connection(self.key, node, initiator=True)
        tape = [] if tape is None else tape
        tape.append(conn.hello())
        await self.send(stream, tape[-1])
        while not conn.authenticated:
            try:
                data = await stream.receive_some(4096)
            except (trio.BrokenResourceError, OSError):
                return None
            if not data:
                return None
            conn.receive_data(data)
            while True:
                _, reply = conn.next_event()
                if reply:
                    tape.append(reply)
                    await self.send(stream, reply)
                if conn.authenticated or not reply:
                    break
        return conn


async def _garbage(a: Attacker, stream: trio.SocketStream, rng: random.Random, _m: bool) -> None:
    data = rng.randbytes(rng.randrange(1, 600))
    await a.send(stream, data)
    # Too short for a header, or a length the peer still waits to fill:
    # then hanging up is all the peer ever sees.
    length = struct.unpack_from("<I", data)[0] if len(data) >= 4 else 0
    if len(data) >= 14 and not 14 <= length <= len(data) + 14:
        a.report.bad_frames += 1
        await a.verdict(stream, None)


async def _oversize(a: Attacker, stream: trio.SocketStream, rng: random.Random, _m: bool) -> None:
    length = rng.choice([p.MAX_HANDSHAKE_FRAME + 1, p.MAX_FRAME + 1, 2**32 - 1, 0, 5])
    await a.send(stream, p._HEAD.pack(length, 1, 0) + rng.randbytes(200), bad=True)
    await a.verdict(stream, None)


async def _truncated(a: Attacker, stream: trio.SocketStream, rng: random.Random, _m: bool) -> None:
    hello = p.Connection(a.key, 5, initiator=True).hello()
    await a.send(stream, hello[: rng.randrange(1, len(hello))])


async def _wrong_key(a: Attacker, stream: trio.SocketStream, rng: random.Random, _m: bool) -> None:
    impostor = Attacker(rng.randbytes(32), a.master_port, a.peer_ports, a.report)
    try:
        await impostor.handshake(stream, rng.randrange(-1, 8))
    except p.AuthError:
        # We cannot check the peer's proof either; ours went out all the same.
        a.report.bad_frames += 1
        await a.verdict(stream, None)
        return
    log.error("accepted: a handshake with the wrong key")
    a.report.accepted += 1


async def _replay(a: Attacker, stream: trio.SocketStream, rng: random.Random, _m: bool) -> None:
    await a.send(stream, a.recorded, bad=True)
    await a.verdict(stream, None)


async def _drop(a: Attacker, stream: trio.SocketStream, rng: random.Random, _m: bool) -> None:
    pass  # opened and dropped at once


def _node(rng: random.Random, to_master: bool) -> int:
    return -1 if to_master else rng.randrange(HOSTS, 8)


async def _flip_mac(a: Attacker, stream: trio.SocketStream, rng: random.Random, m: bool) -> None:
    conn = await a.handshake(stream, _node(rng, m))
    if conn is not None:
        frame = bytearray(conn.send(p.StatusRequest() if m else p.Beat()))
        frame[-rng.randrange(1, p.MAC_SIZE + 1)] ^= 1 << rng.randrange(8)
        await a.send(stream, bytes(frame), bad=True)
        await a.verdict(stream, conn)


async def _reorder(a: Attacker, stream: trio.SocketStream, rng: random.Random, m: bool) -> None:
    conn = await a.handshake(stream, _node(rng, m))
    if conn is not None:
        seq = rng.choice([1, 2, 2**64 - 1])
        await a.send(stream, raw_frame(conn, p.Beat.TYPE, msgpack.packb(()), seq), bad=True)
        await a.verdict(stream, conn)


async def _replay_inside(
    a: Attacker, stream: trio.SocketStream, rng: random.Random, m: bool
) -> None:
    """The same authenticated frame twice: the second is a replay."""
    conn = await a.handshake(stream, _node(rng, m))
    if conn is not None:
        frame = conn.send(p.Beat())
        await a.send(stream, frame)
        await a.send(stream, frame, bad=True)
        await a.verdict(stream, conn)


async def _insider_bad_body(
    a: Attacker, stream: trio.SocketStream, rng: random.Random, m: bool
) -> None:
    conn = await a.handshake(stream, _node(rng, m))
    if conn is not None:
        await a.send(stream, raw_frame(conn, *bad_body(rng)), bad=True)
        await a.verdict(stream, conn)


async def _bad_values(a: Attacker, stream: trio.SocketStream, rng: random.Random, m: bool) -> None:
    """Join in a free slot, then send values no honest host sends."""
    node = await a._slot_free.receive()
    try:
        await _join_and_misbehave(a, stream, rng, node)
    finally:
        # Its slot is fenced and recovered before the next insider may join.
        await trio.sleep(0.6)
        a._slot_back.send_nowait(node)


async def _join_and_misbehave(
    a: Attacker, stream: trio.SocketStream, rng: random.Random, node: int
) -> None:
    conn = await a.handshake(stream, -1)
    if conn is None:
        return
    await a.send(stream, conn.send(p.Join(node, "127.0.0.1", 9, "fusion")))
    if not await _welcomed(stream, conn):
        return  # refused: its slot is still being recovered
    await a.send(stream, conn.send(bad_values(rng, node)), bad=True)
    await a.verdict(stream, conn)


async def _welcomed(stream: trio.SocketStream, conn: p.Connection) -> bool:
    with trio.move_on_after(VERDICT_TIMEOUT):
        while data := await stream.receive_some(65536):
            conn.receive_data(data)
            while (msg := conn.next_event()[0]) is not None:
                if isinstance(msg, p.Refused | p.Welcome):
                    return isinstance(msg, p.Welcome)
    return False


Attack = Callable[[Attacker, trio.SocketStream, random.Random, bool], Awaitable[None]]
ATTACKS: list[tuple[str, Attack]] = [
    ("garbage", _garbage),
    ("oversize", _oversize),
    ("truncated", _truncated),
    ("wrong_key", _wrong_key),
    ("replay", _replay),
    ("drop", _drop),
    ("drop", _drop),
    ("flip_mac", _flip_mac),
    ("reorder", _reorder),
    ("replay_inside", _replay_inside),
    ("bad_body", _insider_bad_body),
    ("bad_body", _insider_bad_body),
    ("bad_values", _bad_values),
]


# ---------------------------------------------------------------------------
# The cluster under attack and its workload


@dataclass
class Workload:
    """Files each host writes: shared ones (written once, read by both
    hosts) and a private one per host, rewritten and read by its owner."""

    shared: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    ops: int = 0
    wrong: int = 0

    async def run(self, fs: FileSystem, node: int, seed: int, stop: trio.Event) -> None:
        rng = random.Random(seed * 100 + node)
        top = await fs.mkdir(fmt.ROOT_INO, b"h%d" % node, 0o755, CTX)
        mine = await fs.create(top.ino, b"private", 0o644, CTX)
        i = 0
        while not stop.is_set():
            if i < SHARED_FILES:
                data = rng.randbytes(rng.randrange(1, 9000))
                f = await fs.create(top.ino, b"f%d" % i, 0o644, CTX)
                await fs.write(f.ino, 0, data)
                self.shared[b"h%d/f%d" % (node, i)] = (f.ino, data)
            else:
                data = rng.randbytes(rng.randrange(1, 9000))
                await fs.setattr(mine.ino, size=0)
                await fs.write(mine.ino, 0, data)
                await self.check(fs, mine.ino, data)
            ino, want = rng.choice(list(self.shared.values()))
            await self.check(fs, ino, want)
            i += 1
            await trio.sleep(0.002)  # leave the attackers some of the loop

    async def check(self, fs: FileSystem, ino: int, want: bytes) -> None:
        got = await fs.read(ino, 0, len(want) + 1)
        self.ops += 1
        if got != want:
            self.wrong += 1
            log.error("wrong read of inode %d: %d bytes, wanted %d", ino, len(got), len(want))

    async def verify(self, fs: FileSystem) -> None:
        for ino, want in self.shared.values():
            await self.check(fs, ino, want)


async def make_volume(size: int = 64 << 20) -> MemoryStorage:
    storage = MemoryStorage(size)
    await format_volume(storage, fmt.make_geometry(size))
    return storage


async def fuzz_frames(frames: int, seed: int, concurrency: int = 8) -> Report:
    """Attack a running master and two hosts until `frames` frames are sent."""
    report = Report()
    start = time.monotonic()
    storage = await make_volume()
    sb = read_superblock(storage)
    master = MasterService(sb.cluster_key, host_slots=sb.host_slots)
    work = Workload()
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(master.serve, "127.0.0.1", 0)
        hosts = []
        for node in range(HOSTS):
            fs = open_cluster_host(storage, sb, node=node)
            await nursery.start(fs.cache.agent.run, ("127.0.0.1", port))
            nursery.start_soon(fs.write_back_every, 0.5)
            hosts.append(fs)
        async with trio.open_nursery() as load:
            for node, fs in enumerate(hosts):
                load.start_soon(work.run, fs, node, seed, stop)
            attacker = Attacker(
                sb.cluster_key, port, [h.cache.agent.peer_port for h in hosts], report
            )
            await attacker.record_session()
            async with trio.open_nursery() as attackers:
                for k in range(concurrency):
                    attackers.start_soon(
                        _attack_loop, attacker, random.Random(seed * 1000 + k), frames
                    )
            # The master still serves its hosts: a lock round trip each way.
            with trio.fail_after(60):
                for fs in hosts:
                    await work.verify(fs)
            stop.set()
        for fs in hosts:
            await fs.destroy()
        report.rejected_master = master.rejected_frames
        report.rejected_hosts = sum(h.cache.agent.stats.peer_rejected for h in hosts)
        nursery.cancel_scope.cancel()
    report.ops, report.wrong = work.ops, work.wrong
    report.seconds = time.monotonic() - start
    return report


async def _attack_loop(attacker: Attacker, rng: random.Random, frames: int) -> None:
    while attacker.report.frames < frames:
        await attacker.attack(rng)


# ---------------------------------------------------------------------------
# Damaged volumes

#: Operations of the tree walk on one damaged volume: a loop in the damaged
#: metadata must not make one case run forever.
WALK_LIMIT = 3000
CASE_TIMEOUT = 30.0


@dataclass
class VolumeReport:
    """What the volume fuzzer did.  refused: mounts that said no with a
    clear error; failed_ops: operations that failed with an FsError;
    unrepairable: volumes fsck -y refused with one line; failures: cases
    that broke a rule (each logged)."""

    cases: int = 0
    refused: int = 0
    failed_ops: int = 0
    ops: int = 0
    repaired: int = 0
    unrepairable: int = 0
    failures: int = 0
    seconds: float = 0.0
    by_damage: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [
            f"cases {self.cases}: mount refused {self.refused}, "
            f"{self.ops} operations walked, {self.failed_ops} failed with an FsError",
            f"fsck -y repaired {self.repaired}, refused {self.unrepairable} "
            f"(no superblock left); failures {self.failures}",
            f"time {self.seconds:.1f} s",
            "damage: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_damage.items())),
        ]


async def populated_volume(seed: int) -> MemoryStorage:
    """A small volume as mkfs makes it, filled by the fs core: files (some
    big enough for indirect blocks), directories (one past a single bucket),
    symlinks, hard links and extended attributes."""
    rng = random.Random(seed)
    storage = MemoryStorage(16 << 20)
    await format_volume(storage, fmt.make_geometry(16 << 20, host_slots=2))
    fs = open_host(storage, read_superblock(storage))
    root = fmt.ROOT_INO
    for d in range(3):
        sub = await fs.mkdir(root, b"d%d" % d, 0o755, CTX)
        for i in range(40 if d == 0 else 6):
            f = await fs.create(sub.ino, b"file-%d" % i, 0o644, CTX)
            await fs.write(f.ino, 0, rng.randbytes(rng.choice([10, 3000, 70000])))
        await fs.symlink(sub.ino, b"link", b"../d0/file-1", CTX)
        await fs.setxattr(sub.ino, b"user.tag", b"v" * 40)
    await fs.link(f.ino, root, b"hard")
    await fs.mkdir((await fs.lookup(root, b"d1")).ino, b"deeper", 0o700, CTX)
    await fs.destroy()
    return storage


def metadata_blocks(storage: MemoryStorage) -> list[int]:
    """Blocks whose header and checksum are sound: the fuzzer's targets."""
    sb = read_superblock(storage)
    out = []
    for b in range(sb.volume_blocks):
        block = storage.read_sync(b * sb.block_size, sb.block_size)
        try:
            head = fmt.read_header(block)
        except CorruptVolume:
            continue
        if head.blockno == b and head.checksum == fmt.checksum(block):
            out.append(b)
    return out


def _reseal(block: bytearray) -> None:
    """Fix the checksum up, so the damage must be caught by what it means."""
    struct.pack_into("<Q", block, fmt._CSUM_OFF, fmt.checksum(block))


def damage(storage: MemoryStorage, targets: list[int], rng: random.Random) -> str:
    """Damage one or two metadata blocks in place; say how."""
    bs = read_superblock(storage).block_size
    b = rng.choice(targets)
    block = bytearray(storage.read_sync(b * bs, bs))
    kind = rng.choice(["flip", "flip_sealed", "flip_sealed", "zero", "swap", "swap_sealed"])
    if kind.startswith("flip"):
        for _ in range(rng.choice([1, 1, 2, 8])):
            # Mostly past the header: the payload is where meaning lives.
            at = rng.randrange(fmt.HDR_SIZE, bs) if rng.random() < 0.9 else rng.randrange(bs)
            block[at] ^= 1 << rng.randrange(8)
        if kind == "flip_sealed":
            _reseal(block)
    elif kind == "zero":
        block[:] = bytes(bs)
    else:
        other = rng.choice(targets)
        theirs = bytearray(storage.read_sync(other * bs, bs))
        if kind == "swap_sealed":
            # Each claims to be where it now lies: only its contents lie.
            for blk, no in ((block, other), (theirs, b)):
                struct.pack_into("<Q", blk, 8, no)
                _reseal(blk)
        storage.write_sync(other * bs, block)
        block = theirs
    storage.write_sync(b * bs, block)
    return kind


async def walk(fs: FileSystem, report: VolumeReport) -> None:
    """stat, read, readlink, list xattrs of and readdir everything reachable;
    an operation may fail only with an FsError."""
    todo, seen = [fmt.ROOT_INO], set()
    ops = 0
    while todo and ops < WALK_LIMIT:
        ino = todo.pop()
        if ino in seen:
            continue
        seen.add(ino)
        for op in (_stat_and_read, _listxattr, _readdir):
            ops += 1
            report.ops += 1
            try:
                todo += await op(fs, ino)
            except FsError:
                report.failed_ops += 1


async def _stat_and_read(fs: FileSystem, ino: int) -> list[int]:
    attr = await fs.getattr(ino)
    if stat.S_ISREG(attr.mode):
        await fs.read(ino, 0, min(attr.size, 1 << 20))
    elif stat.S_ISLNK(attr.mode):
        await fs.readlink(ino)
    return []


async def _listxattr(fs: FileSystem, ino: int) -> list[int]:
    for name in await fs.listxattr(ino):
        await fs.getxattr(ino, name)
    return []


async def _readdir(fs: FileSystem, ino: int) -> list[int]:
    if not stat.S_ISDIR((await fs.getattr(ino)).mode):
        return []
    found, after = [], 0
    while batch := await fs.readdir(ino, after):
        for entry, attr in batch:
            if entry.name not in (b".", b".."):
                found.append(attr.ino)
                await fs.lookup(ino, entry.name)
        after = batch[-1][0].cookie
        if len(found) > WALK_LIMIT:
            break
    return found


async def one_case(storage: MemoryStorage, report: VolumeReport, case: str) -> None:
    """Mount (the core opened as a host), walk, then fsck -y and fsck -n."""
    try:
        fs = open_host(storage, read_superblock(storage))
    except (CorruptVolume, QuietError, FsError) as e:
        report.refused += 1
        log.debug("%s: mount refused: %s", case, e)
    else:
        await walk(fs, report)
    try:
        repaired = await run_fsck(storage, repair=True, force=True, progress=False)
    except QuietError as e:
        # Both superblocks gone (a swap of the two): nothing says what the
        # volume was.  One clear line is all fsck can give.
        report.unrepairable += 1
        log.debug("%s: fsck -y refused: %s", case, e)
        return
    report.repaired += bool(repaired.found_errors)
    check = await run_fsck(storage, repair=False, force=True, progress=False)
    if check.found_errors:
        raise AssertionError(f"fsck -n after fsck -y: {check.problems[:3]}")


async def fuzz_volumes(cases: int, seed: int) -> VolumeReport:
    report = VolumeReport()
    start = time.monotonic()
    base = await populated_volume(seed)
    targets = metadata_blocks(base)
    rng = random.Random(seed)
    for n in range(cases):
        storage = MemoryStorage(base.size)
        storage._data[:] = base._data
        kind = damage(storage, targets, rng)
        case = f"case {n} ({kind}, seed {seed})"
        report.cases += 1
        report.by_damage[kind] = report.by_damage.get(kind, 0) + 1
        try:
            with trio.fail_after(CASE_TIMEOUT):
                await one_case(storage, report, case)
        except (Exception, trio.TooSlowError) as e:
            report.failures += 1
            log.error("%s: %s: %s", case, type(e).__name__, e, exc_info=report.failures <= 3)
    report.seconds = time.monotonic() - start
    return report


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="tools/fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=("frames", "volume"), default="frames")
    ap.add_argument("--frames", type=int, default=100_000, help="frames to send (frames)")
    ap.add_argument("--cases", type=int, default=2000, help="damaged volumes (volume)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--log", metavar="FILE", help="the services' warnings (one per connection)")
    args = ap.parse_args(argv)
    # The services log a line per refused connection: tens of thousands here.
    logging.basicConfig(
        filename=args.log or os.devnull,
        level=logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    log.addHandler(logging.StreamHandler(sys.stderr))
    if args.what == "frames":
        report = trio.run(fuzz_frames, args.frames, args.seed)
        failed = report.accepted or report.wrong or report.unaccounted
    else:
        vreport = trio.run(fuzz_volumes, args.cases, args.seed)
        report, failed = vreport, vreport.failures
    for line in report.lines():
        print(line)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
