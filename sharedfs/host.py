"""One host's stack below FUSE: agent, buffer cache and filesystem core.

Tests build hosts with this directly; `mount` adds FUSE, the host slot and the
background tasks on top.
"""

from __future__ import annotations

from . import format as fmt
from .agent import Agent
from .cache import BlockCache
from .fs import FileSystem
from .master import LockMaster
from .protocol import HostId
from .storage import Storage

DEFAULT_CACHE_BYTES = 256 << 20


def open_host(
    storage: Storage,
    sb: fmt.Superblock,
    *,
    node: int = 0,
    master: LockMaster | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> FileSystem:
    """A FileSystem for host `node`, with an embedded master unless given one."""
    agent = Agent(HostId(node), master if master is not None else LockMaster())
    cache = BlockCache(storage, sb.block_size, agent, capacity=cache_bytes // sb.block_size)
    return FileSystem(sb, cache, host=node)
