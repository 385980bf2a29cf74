"""Opening a volume: the superblock (or its backup) and the host slots.

Each host owns one slot block on the volume, written only by that host: it
says the slot is in use and carries a heartbeat, so that tools (fsck, mkfs)
and other hosts can tell a live mount from one that died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import replace

from . import format as fmt
from .errors import CorruptVolume, QuietError
from .storage import Storage

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 2.0
#: A slot whose heartbeat is older than this belongs to a dead host.
HEARTBEAT_TIMEOUT = 10.0
#: How far behind ours another host's clock may be, at most, for the slot
#: checks of tools: a heartbeat older than this by our clock is dead at once.
MAX_CLOCK_SKEW = 600.0
_SIZES = (4096, 1024, 2048, 8192, 16384, 32768, 65536)


def read_superblock(storage: Storage) -> fmt.Superblock:
    """The primary superblock; CorruptVolume if it is damaged or absent."""
    n = min(storage.size, 65536)
    if n < 1024:
        raise CorruptVolume(f"{storage.name}: too small to be a sharedfs volume")
    sb = fmt.Superblock.unpack(storage.read_sync(0, n), 0)
    if sb.volume_blocks * sb.block_size > storage.size:
        raise CorruptVolume(
            f"{storage.name}: volume is {storage.size} bytes but the superblock says "
            f"{sb.volume_blocks * sb.block_size}"
        )
    return sb


def read_backup_superblock(storage: Storage) -> fmt.Superblock:
    """The backup copy in the last block, trying each block size."""
    for bs in _SIZES:
        blockno = storage.size // bs - 1
        if blockno < 1:
            continue
        try:
            sb = fmt.Superblock.unpack(storage.read_sync(blockno * bs, bs), blockno)
        except CorruptVolume:
            continue
        if sb.block_size == bs and sb.backup_blockno == blockno:
            return sb
    raise CorruptVolume(f"{storage.name}: no valid backup superblock")


def open_superblock(storage: Storage) -> fmt.Superblock:
    """For mount and tools that need a sound volume: one clear line otherwise."""
    try:
        return read_superblock(storage)
    except CorruptVolume as e:
        try:
            read_backup_superblock(storage)
        except CorruptVolume:
            raise QuietError(f"{storage.name}: not a sharedfs volume ({e})", 32) from None
        raise QuietError(
            f"{storage.name}: primary superblock is damaged ({e}); "
            f"run 'sharedfs fsck -y {storage.name}' to restore it from the backup",
            32,
        ) from None


def check_block_size(storage: Storage, block_size: int) -> None:
    """Blocks must be whole multiples of what the storage writes at least."""
    if block_size % storage.min_block:
        raise QuietError(
            f"{storage.name}: writes must be in {storage.min_block}-byte units, "
            f"which {block_size}-byte blocks are not",
            2,
        )


# -- host slots ----------------------------------------------------------------


def slot_blockno(sb: fmt.Superblock, node: int) -> int:
    return sb.hosts_start + node


def read_slot(storage: Storage, sb: fmt.Superblock, node: int) -> fmt.HostSlot:
    blockno = slot_blockno(sb, node)
    buf = storage.read_sync(blockno * sb.block_size, sb.block_size)
    try:
        fmt.verify(buf, fmt.BlockType.HOST, blockno)
    except CorruptVolume:
        return fmt.HostSlot()  # a damaged slot is a free slot: it holds no data
    return fmt.HostSlot.unpack(buf)


def write_slot(storage: Storage, sb: fmt.Superblock, node: int, slot: fmt.HostSlot) -> None:
    blockno = slot_blockno(sb, node)
    storage.write_sync(blockno * sb.block_size, slot.pack(sb.block_size, blockno))


def slot_is_live(slot: fmt.HostSlot, now_ns: int | None = None) -> bool:
    """In use with a fresh heartbeat, and (when the holder ran on this
    machine) its process still exists: a crashed local mount frees its slot
    at once instead of after the heartbeat timeout."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if not slot.in_use or now_ns - slot.heartbeat_ns >= HEARTBEAT_TIMEOUT * 1e9:
        return False
    return not _process_gone(slot)


def _process_gone(slot: fmt.HostSlot) -> bool:
    """Its holder ran on this machine, and its process is no more."""
    return slot.hostname == socket.gethostname() and not _pid_alive(slot.pid)


def _pid_alive(pid: int) -> bool:
    # A zombie (killed, not yet reaped by its parent) mounts nothing.
    return process_state(pid) not in (None, "Z", "X")


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` (R, S, D, T, Z, ...), None if there
    is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"  # it exists, but we may not look
    # "pid (comm) S ...": comm may hold spaces and parentheses.
    return stat_line.rpartition(")")[2].split()[0]


class SlotWatch:
    """Who is alive on the volume by this host's own clock, as OCFS2's disk
    heartbeat judges it: a slot lives while its heartbeat keeps changing,
    and is dead once we have watched it stand still for `timeout` seconds
    of our monotonic time (or it is not in use, or its holder ran on this
    machine and its process is gone).  No wall clocks are compared, so
    hosts whose clocks disagree still agree on who died; and a host that
    runs a master has fenced itself DISK_LEASE after its own last heartbeat
    (failover.py), before anyone can have watched that heartbeat for
    `timeout`.  A slot first seen is given the whole `timeout`: watch from
    the mount on, so that a host long dead is known dead when it counts."""

    def __init__(self, timeout: float = HEARTBEAT_TIMEOUT) -> None:
        self.timeout = timeout
        self._seen: dict[int, tuple[int, float]] = {}  # node -> (heartbeat, since)

    def live(self, storage: Storage, sb: fmt.Superblock) -> dict[int, fmt.HostSlot]:
        now = time.monotonic()
        out = {}
        for n in range(sb.host_slots):
            slot = read_slot(storage, sb, n)
            if not slot.in_use or _process_gone(slot):
                self._seen.pop(n, None)
                continue
            beat, since = self._seen.get(n, (slot.heartbeat_ns, now))
            if beat != slot.heartbeat_ns:
                since = now
            self._seen[n] = (slot.heartbeat_ns, since)
            if now - since < self.timeout:
                out[n] = slot
        return out


def live_slots(
    storage: Storage, sb: fmt.Superblock, watch: float = HEARTBEAT_TIMEOUT
) -> dict[int, fmt.HostSlot]:
    """The slots of live hosts, for a tool that must not act on a volume
    (or take a slot) that a live host uses.  A heartbeat fresh by our wall
    clock is live: at worst a dead host with a clock ahead of ours looks
    alive a while, which only makes us refuse.  One that looks stale may be
    a live host with a clock behind ours: unless it is older than
    MAX_CLOCK_SKEW, or its holder ran here and its process is gone, it is
    watched for `watch` seconds and live if it moves (SlotWatch's rule).
    watch=0: by our wall clock alone, for what only reports."""
    slots = {n: read_slot(storage, sb, n) for n in range(sb.host_slots)}
    live = {n: s for n, s in slots.items() if slot_is_live(s)}
    doubtful = {n: s for n, s in slots.items() if n not in live and _may_be_behind(s)}
    if doubtful and watch > 0:
        live.update(_watch(storage, sb, doubtful, watch))
    return dict(sorted(live.items()))


def _may_be_behind(slot: fmt.HostSlot, now_ns: int | None = None) -> bool:
    """In use, stale by our clock, but not so stale that only a dead host
    (or one whose clock is hopelessly wrong) could have written it."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    age = (now_ns - slot.heartbeat_ns) / 1e9
    stale = HEARTBEAT_TIMEOUT <= age < MAX_CLOCK_SKEW
    return slot.in_use and stale and not _process_gone(slot) and _key(slot) not in _watched_dead


def _key(slot: fmt.HostSlot) -> tuple[str, int, int, int]:
    return (slot.hostname, slot.pid, slot.mount_count, slot.heartbeat_ns)


#: Slots (as _key has them) watched and found standing still: dead, and not
#: watched again by this process (a mount looks three times).
_watched_dead: set[tuple[str, int, int, int]] = set()


def _watch(
    storage: Storage, sb: fmt.Superblock, doubtful: dict[int, fmt.HostSlot], seconds: float
) -> dict[int, fmt.HostSlot]:
    """Those of `doubtful` whose heartbeat moves within `seconds`."""
    log.warning(
        "%s: host slots %s look stale by this machine's clock; watching their heartbeats "
        "for %.0f s (clocks may disagree)",
        storage.name,
        sorted(doubtful),
        seconds,
    )
    live = {}
    deadline = time.monotonic() + seconds
    while doubtful and time.monotonic() < deadline:
        time.sleep(min(0.25, HEARTBEAT_INTERVAL / 4))
        for n, old in list(doubtful.items()):
            slot = read_slot(storage, sb, n)
            if not slot.in_use:
                del doubtful[n]
            elif slot.heartbeat_ns != old.heartbeat_ns:
                live[n] = slot
                del doubtful[n]
    _watched_dead.update(_key(s) for s in doubtful.values())
    return live


def describe_slot(node: int, slot: fmt.HostSlot) -> str:
    return f"node {node} (pid {slot.pid} on {slot.hostname or '?'})"


def wait_for_local_unmounts(storage: Storage, sb: fmt.Superblock, timeout: float = 20.0) -> None:
    """Give local hosts whose mountpoint is already gone (an unmount in
    progress: they are writing back) time to finish and free their slots."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [
            s
            for s in live_slots(storage, sb, watch=0).values()
            if s.hostname == socket.gethostname() and not is_mounted(s.mountpoint)
        ]
        if not busy:
            return
        time.sleep(0.1)


def is_mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return os.path.ismount(path)


def claim_slot(
    storage: Storage, sb: fmt.Superblock, node: int, mountpoint: str = ""
) -> fmt.HostSlot:
    """Take slot `node` for this process; refuse while a live host holds it."""
    if not 0 <= node < sb.host_slots:
        raise QuietError(
            f"node {node} is out of range: this volume has host slots 0..{sb.host_slots - 1}", 2
        )
    old = read_slot(storage, sb, node)
    if slot_is_live(old) or (
        _may_be_behind(old) and _watch(storage, sb, {node: old}, HEARTBEAT_TIMEOUT)
    ):
        raise QuietError(
            f"{storage.name}: host slot {node} is held by live {describe_slot(node, old)}"
        )
    now = time.time_ns()
    slot = fmt.HostSlot(
        True, os.getpid(), old.mount_count + 1, now, now, socket.gethostname(), mountpoint
    )
    write_slot(storage, sb, node, slot)
    return slot


def release_slot(storage: Storage, sb: fmt.Superblock, node: int, slot: fmt.HostSlot) -> None:
    write_slot(
        storage, sb, node, replace(slot, in_use=False, master="", heartbeat_ns=time.time_ns())
    )


class SlotKeeper:
    """A mounted host's own slot: its heartbeat, and the address of the lock
    master it runs, published for the other hosts.  Written from worker
    threads (the heartbeat) and from trio (a publish), hence the lock.

    Attributes:
        slot: what is on the volume now.
        beat_at: time.monotonic() taken before the last heartbeat that
            reached the volume (the Fence's disk lease counts from it).
    """

    def __init__(self, storage: Storage, sb: fmt.Superblock, node: int, slot: fmt.HostSlot) -> None:
        self.storage, self.sb, self.node, self.slot = storage, sb, node, slot
        self.beat_at = time.monotonic()
        self._lock = threading.Lock()

    def beat(self) -> None:
        self._write(master=self.slot.master)

    def publish(self, master: str) -> None:
        self._write(master=master)

    def _write(self, master: str) -> None:
        with self._lock:
            if not self.slot.in_use:
                return  # released: a late publish (a master stopping) must not take it again
            at = time.monotonic()
            slot = replace(self.slot, heartbeat_ns=time.time_ns(), master=master)
            write_slot(self.storage, self.sb, self.node, slot)
            self.slot, self.beat_at = slot, at

    def release(self) -> None:
        with self._lock:
            release_slot(self.storage, self.sb, self.node, self.slot)
            self.slot = replace(self.slot, in_use=False)


def master_address(slot: fmt.HostSlot) -> str:
    """The address of the lock master a slot publishes ("" if none).  A
    host of a spread directory adds "/" and the partitions it masters."""
    return slot.master.partition("/")[0]


def published_master(storage: Storage, sb: fmt.Superblock) -> tuple[int, str] | None:
    """The live host that runs a lock master, and its address, if any."""
    for n, slot in sorted(live_slots(storage, sb).items()):
        if slot.master:
            return n, master_address(slot)
    return None
