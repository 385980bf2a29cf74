"""Who takes the lock master's role when the host that embeds it dies.

A master embedded in a mount lives and dies with that host.  The others
learn of its death from the volume, which every host reads alike: the host
slots say who is alive (volume.slot_is_live), and a host that runs a master
publishes its address in its slot.  The successor is the lowest-numbered
live host.  It starts a master of its own, knowing nothing, which rebuilds
its directory from the hosts' reports (docs/PROTOCOL.md, Resume) and sweeps
what the dead host held (Sweep); the others resume with it.

Two masters must never serve at once.  That holds because:
- a successor is chosen only once the old master's host is dead on the
  volume: it released its slot, we watched its heartbeat stand still for
  HEARTBEAT_TIMEOUT of our own clock (volume.SlotWatch: no wall clocks
  compared), or (on this machine) its process is gone;
- a host that runs a master keeps a disk lease (storage/fence.py): once its
  own last heartbeat is older than HEARTBEAT_TIMEOUT - HEARTBEAT_INTERVAL,
  before any other host could take it for dead, it writes nothing more and
  its master sends nothing more (MasterService.may_serve);
- a host that cannot reach the successor keeps its writes held, and fences
  itself when its wait is up, as with any master it cannot reach.

A partition that leaves the master's host with fewer than half of the
hosts stops that master before it declares anyone dead, and fences its host
(MasterService.on_minority): its heartbeat stops, and the majority elects a
successor as if it had died.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from . import format as fmt
from .errors import StorageError
from .link import parse_address
from .storage import Storage
from .volume import HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT, SlotWatch

log = logging.getLogger(__name__)

#: How long a host that runs a master may go without a heartbeat reaching
#: the volume: one interval less than the others wait before they take it
#: for dead.
DISK_LEASE = HEARTBEAT_TIMEOUT - HEARTBEAT_INTERVAL

Address = tuple[str, int]


class Failover:
    """A host's part in the election.

    `start(dead)` starts a master in this host, told that node `dead` is
    gone, and returns the address to join it at (None if it may not or
    cannot: then it is not tried again, and the others wait, then fence).
    """

    def __init__(
        self,
        storage: Storage,
        sb: fmt.Superblock,
        node: int,
        start: Callable[[int], Awaitable[Address | None]],
        timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        self.storage, self.sb, self.node = storage, sb, node
        self._start = start
        self._mine: Address | None = None
        self._tried = False
        self._slots = SlotWatch(timeout)

    @staticmethod
    def covers(master_node: int, node: int) -> bool:
        """Does a successor take over when that master goes?  Only one
        embedded in another host."""
        return master_node not in (-1, node)

    async def watch(self, needed: Callable[[], bool]) -> None:
        """Read the slots every heartbeat interval from the mount on, while
        `needed` (our master runs in another host), so that the watch knows
        how long each has stood still when that master goes."""
        while True:
            if needed():
                with contextlib.suppress(StorageError):
                    await trio.to_thread.run_sync(self._slots.live, self.storage, self.sb)
            await trio.sleep(HEARTBEAT_INTERVAL)

    async def where(self, old: int, old_addr: Address) -> Address | None:
        """The master to try now, when the one embedded in host `old` went
        away: `old_addr` while that host is alive on the volume; once it is
        dead, the successor's (this host's own, started here, if it is the
        successor); None while the successor has not published one yet."""
        live = await trio.to_thread.run_sync(self._slots.live, self.storage, self.sb)
        if old in live:
            return old_addr
        heir = min(live, default=None)
        if heir is None:
            return None
        if heir == self.node:
            if not self._tried:
                self._tried = True
                log.warning(
                    "host %d: the lock master's host %d is dead: taking the master role",
                    self.node,
                    old,
                )
                self._mine = await self._start(old)
            return self._mine
        published = live[heir].master
        if not published:
            return None
        try:
            return parse_address(published)
        except ValueError:
            return None  # a slot written by something else: wait for a good one
