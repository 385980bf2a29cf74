"""The host side of the lock protocol: asks the master for modes, releases them.

The buffer cache is the agent's only client: it names a block and the mode it
needs, and the agent gets that mode from the master.
"""

from __future__ import annotations

import logging

from .master import LockMaster
from .protocol import HostId, Mode, Resource, block_resource

log = logging.getLogger(__name__)


class Agent:
    """One host's connection to its lock master.

    Attributes:
        host: this host's id (its slot number).
        master: the master it talks to (embedded in this process for now).
    """

    def __init__(self, host: HostId, master: LockMaster) -> None:
        self.host = host
        self.master = master

    async def acquire_blocks(self, blocknos: list[int], mode: Mode) -> None:
        """Get `mode` on all these blocks in one request."""
        await self.master.acquire(self.host, [block_resource(b) for b in blocknos], mode)

    async def acquire(self, res: Resource, mode: Mode) -> None:
        await self.master.acquire(self.host, [res], mode)

    def release_block(self, blockno: int) -> None:
        self.master.release(self.host, block_resource(blockno))

    def close(self) -> None:
        self.master.release_all(self.host)
