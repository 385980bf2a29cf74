"""The lock master: the resource directory of who holds what, in which mode.

A mount with no `--master` address embeds one, so a single host works out of
the box; the same service will listen on the network for several hosts.  A
request that conflicts with another host's hold waits until that hold is
released.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import trio

from .protocol import HostId, Mode, Resource

log = logging.getLogger(__name__)


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
