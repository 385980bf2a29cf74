"""An in-process cluster: a real MasterService and real ClusterAgents talking
over loopback TCP, all on one MemoryStorage, without FUSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from sharedfs.fs import FileSystem
from sharedfs.host import open_cluster_host
from sharedfs.master import MasterService
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock


class Cluster:
    def __init__(self, storage: MemoryStorage, master: MasterService, hosts: list[FileSystem]):
        self.storage = storage
        self.master = master
        self.hosts = hosts

    @property
    def directory(self):  # type: ignore[no-untyped-def]
        return self.master.directory


async def checkpoints(fs: FileSystem, every: float) -> None:
    """What a mount's write-back task does, more often."""
    while True:
        await trio.sleep(every)
        await fs.log.checkpoint()


@asynccontextmanager
async def cluster(
    storage: MemoryStorage,
    n: int = 3,
    *,
    coherence: str = "fusion",
    cache_bytes: int = 64 << 20,
    checkpoint_every: float | None = 0.5,
) -> AsyncIterator[Cluster]:
    """checkpoint_every=None: no background checkpoints, for tests that
    account for every storage write."""
    sb = read_superblock(storage)
    master = MasterService(sb.cluster_key, coherence=coherence, host_slots=sb.host_slots)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(master.serve, "127.0.0.1", 0)
        hosts = []
        for node in range(n):
            fs = open_cluster_host(
                storage, sb, node=node, coherence=coherence, cache_bytes=cache_bytes
            )
            await nursery.start(fs.cache.agent.run, ("127.0.0.1", port))
            if checkpoint_every is not None:
                nursery.start_soon(checkpoints, fs, checkpoint_every)
            hosts.append(fs)
        c = Cluster(storage, master, hosts)
        try:
            yield c
        finally:
            with trio.CancelScope(shield=True):
                for fs in hosts:
                    await fs.destroy()
            nursery.cancel_scope.cancel()
