"""An in-process cluster: a real MasterService and real ClusterAgents talking
over loopback TCP, all on one MemoryStorage, without FUSE."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace

import trio

from sharedfs.debug import task_tree
from sharedfs.failover import Failover
from sharedfs.fs import FileSystem
from sharedfs.host import open_cluster_host
from sharedfs.master import DEFAULT_LEASE, MasterService
from sharedfs.mirror import MirrorStorage
from sharedfs.storage import Storage
from sharedfs.storage.memory import MemoryStorage
from sharedfs.tls import Tls
from sharedfs.volume import read_slot, read_superblock, write_slot

log = logging.getLogger(__name__)


class Cluster:
    def __init__(
        self,
        storage: MemoryStorage,
        master: MasterService,
        nursery: trio.Nursery,
        port: int,
        coherence: str,
        cache_bytes: int,
        checkpoint_every: float | None,
        open_secondary: Callable[[], Storage] | None,
        wrap: Callable[[int, Storage], Storage] | None = None,
        tls: Tls | None = None,
    ):
        self.storage = storage
        self.master = master
        self.hosts: list[FileSystem] = []
        self.sb = read_superblock(storage)
        self._nursery = nursery
        self._port = port
        self._coherence = coherence
        self._cache_bytes = cache_bytes
        self._checkpoint_every = checkpoint_every
        self._scopes: dict[int, trio.CancelScope] = {}
        self._open_secondary = open_secondary
        #: Per host, its mirror (when the volume names a secondary).
        self.mirrors: dict[int, MirrorStorage] = {}
        self._wrap = wrap
        self._tls = tls

    @property
    def directory(self):  # type: ignore[no-untyped-def]
        return self.master.directory

    async def run_master(  # type: ignore[no-untyped-def]
        self, master: MasterService, port: int, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.CancelScope() as scope:
            self._master_scope = scope
            await master.serve("127.0.0.1", port, task_status=task_status)

    async def restart_master(self, *, down: float = 0.0) -> MasterService:
        """What kill -9 and a restart do to the master: its connections
        drop at once, and a new one, knowing nothing, listens on the same
        port (after `down` seconds)."""
        old = self.master
        self._master_scope.cancel()
        await trio.sleep(down)
        self.master = MasterService(
            old.key,
            coherence=old.directory.coherence,
            host_slots=old.host_slots,
            lease=old.lease,
            tls=old.tls,
            node=old.node,
            peer_reads=old.directory.peer_reads,
            volume_blocks=old.volume_blocks,
        )
        await self._nursery.start(self.run_master, self.master, self._port)
        for fs in self.hosts:  # the host it is embedded in reaches the new one
            dials = fs.cache.agent.local_masters
            if ("127.0.0.1", self._port) in dials:
                dials[("127.0.0.1", self._port)] = self.master.connect_local
        return self.master

    async def start(self, node: int) -> FileSystem:
        """Start host `node` (again, after a kill: in the same slot)."""
        storage: Storage = self.storage
        if self._wrap is not None:
            storage = self._wrap(node, storage)
        if self.sb.mirror_secondary:
            storage = MirrorStorage(
                self.storage, self.sb, node, open_secondary=self._open_secondary
            )
            self.mirrors[node] = storage
        fs = open_cluster_host(
            storage,
            self.sb,
            node=node,
            coherence=self._coherence,
            cache_bytes=self._cache_bytes,
            tls=self._tls,
        )
        if node == self.master.node:  # as a mount talks to the master it runs
            fs.cache.agent.local_masters[("127.0.0.1", self._port)] = self.master.connect_local
        self._scopes[node] = await self._nursery.start(self._run, fs)
        if node < len(self.hosts):
            self.hosts[node] = fs
        else:
            self.hosts.append(fs)
        return fs

    async def _run(self, fs: FileSystem, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                if fs.sb.mirror_secondary:
                    await n.start(self.mirrors[fs.host].run)
                await n.start(fs.cache.agent.run, ("127.0.0.1", self._port))
                if self._checkpoint_every is not None:
                    n.start_soon(fs.write_back_every, self._checkpoint_every)
                n.start_soon(fs.trim_when_crowded)  # as a mount does
                task_status.started(scope)

    def kill(self, node: int) -> None:
        """What kill -9 does to a host: it stops at once, mid-whatever, and
        never writes again; its connections drop without a Bye."""
        fs = self.hosts[node]
        fs.cache.fence("killed by the test")
        self._scopes.pop(node).cancel()

    def forget(self, node: int) -> None:
        """Host `node` has unmounted (its destroy() ran): stop its tasks."""
        self._scopes.pop(node).cancel()

    async def wait_recovered(self, node: int) -> None:
        with self.watchdog(10):
            while (  # noqa: ASYNC110
                node in self.master._dying
                or node in self.directory.recoveries
                or (node in self.directory.nodes)
            ):
                await trio.sleep(0.01)

    @contextmanager
    def watchdog(self, seconds: float) -> Iterator[None]:
        """fail_after, logging first what every task waits on and the
        master's and hosts' protocol state: a hang says where it hangs."""
        try:
            with trio.fail_after(seconds):
                yield
        except trio.TooSlowError:
            self.dump()
            raise

    def stop_master(self) -> None:
        """The master's connections drop; nothing listens on its port."""
        self._master_scope.cancel()

    def fail_over(self, nodes: list[int], slot_timeout: float = 1.0) -> list[MasterService]:
        """Hosts `nodes` follow a master embedded in a host that dies as
        mounts do (failover.py): by the slots on the volume, the lowest
        live one starting a successor here.  A slot is dead once it has
        stood still for `slot_timeout` (a mount's is 10 s): keep the live
        ones beating (t5_failover.beating).  Returns the list the
        successors are added to as they start; the cluster's master is
        then the newest (later starts join it)."""
        started: list[MasterService] = []

        async def start(node: int, dead: int) -> tuple[str, int]:
            old = self.master
            new = MasterService(
                old.key,
                coherence=old.directory.coherence,
                host_slots=old.host_slots,
                lease=old.lease,
                tls=old.tls,
                node=node,
                dead=frozenset({dead}),
                peer_reads=old.directory.peer_reads,
                volume_blocks=old.volume_blocks,
            )
            self._port = await self._nursery.start(self.run_master, new, 0)
            self.master = new
            started.append(new)
            agent = self.hosts[node].cache.agent
            agent.local_masters[("127.0.0.1", self._port)] = new.connect_local
            # Published in its slot, as a mount's SlotKeeper does.
            slot = read_slot(self.storage, self.sb, node)
            write_slot(self.storage, self.sb, node, replace(slot, master=f"127.0.0.1:{new.port}"))
            return ("127.0.0.1", self._port)

        for node in nodes:
            agent = self.hosts[node].cache.agent
            agent.failover = Failover(
                self.storage, self.sb, node, functools.partial(start, node), slot_timeout
            )
        return started

    def dump(self) -> None:
        """The state of the master and of every host, to the log."""
        lines = task_tree() + self.master.describe()
        for node, fs in enumerate(self.hosts):
            if node in self._scopes:
                lines += [f"host {node}: {x}" for x in fs.cache.agent.describe()]
        for line in lines:
            log.warning("state: %s", line)


@asynccontextmanager
async def cluster(
    storage: MemoryStorage,
    n: int = 3,
    *,
    coherence: str = "fusion",
    cache_bytes: int = 64 << 20,
    checkpoint_every: float | None = 0.5,
    open_secondary: Callable[[], Storage] | None = None,
    hang_after: float = 150,
    wrap: Callable[[int, Storage], Storage] | None = None,
    tls: Tls | None = None,
    lease: float = DEFAULT_LEASE,
    master_node: int = -1,
    peer_reads: bool = False,
) -> AsyncIterator[Cluster]:
    """checkpoint_every=None: no background checkpoints, for tests that
    account for every storage write.  On a volume that names a secondary,
    every host mirrors to what `open_secondary` gives (default: the
    volume it names), and drains its queue at the end.  `wrap(node,
    storage)`: what host `node` sees of the volume (a faulty device, say).
    `tls`: every connection over TLS.  `master_node`: the host the master
    is embedded in, as the hosts learn it (Welcome.master_node).  `peer_reads`:
    the master's (Directory.peer_reads).  A body still
    running after `hang_after` seconds is a hang: the state is dumped."""
    sb = read_superblock(storage)
    master = MasterService(
        sb.cluster_key,
        coherence=coherence,
        host_slots=sb.host_slots,
        tls=tls,
        lease=lease,
        node=master_node,
        peer_reads=peer_reads,
        volume_blocks=sb.volume_blocks,
    )
    async with trio.open_nursery() as nursery:
        c = Cluster(
            storage,
            master,
            nursery,
            0,  # once it listens
            coherence,
            cache_bytes,
            checkpoint_every,
            open_secondary,
            wrap,
            tls,
        )
        c._port = await nursery.start(c.run_master, master, 0)
        for node in range(n):
            await c.start(node)
        try:
            with c.watchdog(hang_after):
                yield c
        finally:
            with trio.CancelScope(shield=True), c.watchdog(60):
                for node, fs in enumerate(c.hosts):
                    if node in c._scopes:
                        await fs.destroy()
                # Only once all have: a later host's unmount can have an
                # earlier one write (a WritePerform for a past image), and
                # that write is mirrored too.
                for node, mirror in c.mirrors.items():
                    if node in c._scopes:
                        await mirror.drain()
            nursery.cancel_scope.cancel()
