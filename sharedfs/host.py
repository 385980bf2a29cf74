"""One host's stack below FUSE: agent, buffer cache and filesystem core.

Tests build hosts with this directly; `mount` adds FUSE, the host slot and the
background tasks on top.
"""

from __future__ import annotations

from . import format as fmt
from .agent import ClusterAgent, LocalAgent
from .cache import BlockCache
from .fs import FileSystem
from .master import LockMaster
from .protocol import HostId
from .spread import SpreadAgent
from .storage import Storage
from .storage.fence import Fence
from .tls import Tls

DEFAULT_CACHE_BYTES = 256 << 20


def open_host(
    storage: Storage,
    sb: fmt.Superblock,
    *,
    node: int = 0,
    master: LockMaster | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> FileSystem:
    """A FileSystem for a single-process host (tools, core tests): its locks
    live in an in-process LockMaster, shared with other such hosts if given."""
    agent = LocalAgent(HostId(node), master if master is not None else LockMaster())
    cache = BlockCache(storage, sb.block_size, agent, capacity=cache_bytes // sb.block_size)
    return FileSystem(sb, cache, host=node)


def open_cluster_host(
    storage: Storage,
    sb: fmt.Superblock,
    *,
    node: int,
    coherence: str = "fusion",
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    gate: Fence | None = None,
    tls: Tls | None = None,
    partitions: int = 1,
) -> FileSystem:
    """A FileSystem whose agent speaks the Cache Fusion protocol to a master
    (start it with `fs.cache.agent.run(...)`).  gate: the Fence every write
    of this host already passes below `storage` (a mount's, under its
    mirror); by default one is put over `storage`.  tls: for every
    connection, to the master and to peers.  partitions: more than one
    spreads the directory over the hosts (spread.py)."""
    agent: ClusterAgent | SpreadAgent
    if partitions > 1:
        agent = SpreadAgent(HostId(node), sb.cluster_key, partitions, coherence=coherence, tls=tls)
    else:
        agent = ClusterAgent(HostId(node), sb.cluster_key, coherence=coherence, tls=tls)
    cache = BlockCache(
        storage if gate is not None else Fence(storage),
        sb.block_size,
        agent,
        capacity=cache_bytes // sb.block_size,
        coherence=coherence,
        gate=gate,
    )
    return FileSystem(sb, cache, host=node)
