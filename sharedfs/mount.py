"""`sharedfs mount`: wire one host together and serve it through FUSE.

Order of things: check the volume and the mountpoint (so that mistakes give
one line before anything starts), go to the background, claim the host slot,
build agent/cache/core, mount, then run the FUSE loop beside the heartbeat and
write-back tasks until the filesystem is unmounted or a signal arrives; then
write everything back and free the slot, so the volume is clean.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator

import pyfuse3
import trio

from . import format as fmt
from . import journal
from .agent import DEFAULT_MASTER_WAIT, ClusterAgent, LocalAgent
from .cli_util import (
    Parser,
    find_quiet,
    notify_systemd,
    parse_address_arg,
    parse_size,
    run_tool,
    setup_logging,
)
from .debug import dump_on_signal, watch_loop
from .errors import QuietError
from .failover import DISK_LEASE, Failover
from .fs import FileSystem
from .fuse_ops import Operations
from .host import DEFAULT_CACHE_BYTES, open_cluster_host
from .link import parse_address
from .master import (
    DEFAULT_LEASE,
    NO_HANDOFFS_HELP,
    PEER_READS_HELP,
    MasterService,
    check_peer_reads,
)
from .metrics import Sample, counter_samples, serve_metrics
from .mirror import mirrored, refuse_own_secondary
from .protocol import MAX_PARTITIONS
from .spread import Spread, SpreadAgent
from .storage import Storage, canonical_name, open_volume
from .storage.fence import Fence, Fenced
from .storage.nbd import DEFAULT_TIMEOUT as NBD_TIMEOUT
from .tls import add_tls_arg, load_tls
from .volume import (
    HEARTBEAT_INTERVAL,
    SlotKeeper,
    check_block_size,
    claim_slot,
    describe_slot,
    is_mounted,
    live_slots,
    open_superblock,
    published_master,
)

log = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sharedfs mount", description="Mount a sharedfs volume.")
    add_mount_args(p)
    return p


def add_mount_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("volume", help="image file, block device or NBD URI holding the volume")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    p.add_argument(
        "--master",
        metavar="HOST:PORT",
        help="lock master to join (default: the one a live host runs, as the volume names it; "
        "else embed one)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default="127.0.0.1:0",
        help="where the master this host runs listens: the one it embeds without --master, "
        "or one it starts when the host that ran the master dies (default: loopback, or "
        "the --peer-address host after a failover; any port)",
    )
    p.add_argument(
        "--spread",
        type=int,
        default=0,
        metavar="PARTITIONS",
        help="spread the lock master's directory over the hosts in this many partitions, "
        "each mastered by the host a hash over the live hosts names (every host of the "
        "cluster gives the same number; no --master)",
    )
    p.add_argument(
        "--lease",
        type=float,
        default=DEFAULT_LEASE,
        metavar="SECONDS",
        help="for the master this host runs: a host silent this long is declared dead "
        f"(default {DEFAULT_LEASE:g})",
    )
    p.add_argument(
        "--node", type=int, default=None, help="host slot to claim (default: first free)"
    )
    p.add_argument(
        "--peer-address",
        type=parse_peer_address,
        default=("127.0.0.1", 0),
        metavar="HOST[:PORT]",
        help="where the other hosts reach this one for block transfers: an address of this "
        "machine (default 127.0.0.1, any port: hosts on one machine)",
    )
    p.add_argument(
        "--coherence",
        choices=("fusion", "disk"),
        default="fusion",
        help="fusion: ship blocks host to host; disk: write before every transfer",
    )
    p.add_argument(
        "--peer-reads",
        action="store_true",
        help="for the master this mount embeds (without --master): " + PEER_READS_HELP,
    )
    p.add_argument(
        "--no-handoffs",
        action="store_true",
        help="for the master this mount embeds: " + NO_HANDOFFS_HELP,
    )
    p.add_argument("--cache-size", type=parse_size, default=DEFAULT_CACHE_BYTES)
    p.add_argument(
        "--writeback",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="write dirty blocks back this often (like ext4's commit=; default 5)",
    )
    p.add_argument(
        "--nbd-timeout",
        type=float,
        default=NBD_TIMEOUT,
        metavar="SECONDS",
        help="how long to keep trying to reach an NBD server that went away "
        f"before failing (default {NBD_TIMEOUT:g})",
    )
    p.add_argument(
        "--master-wait",
        type=float,
        default=DEFAULT_MASTER_WAIT,
        metavar="SECONDS",
        help="when the lock master goes away, hold writes and wait this long for it to "
        f"come back before failing with EIO (default {DEFAULT_MASTER_WAIT:g}; 0: fail at once)",
    )
    p.add_argument(
        "--metrics",
        type=parse_address_arg,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default)",
    )
    p.add_argument(
        "--log-page-locks",
        action="store_true",
        help="also lock every log page written (a baseline for tools/bench journal)",
    )
    add_tls_arg(p)
    p.add_argument("-o", dest="options", action="append", default=[], help="FUSE mount options")
    p.add_argument("--log", metavar="FILE", help="log file (default: stderr in the foreground)")
    p.add_argument("--debug", action="store_true")


def parse_peer_address(text: str) -> tuple[str, int]:
    """HOST or HOST:PORT; without a port, any free one."""
    if ":" not in text:
        text += ":0"
    host, port = parse_address_arg(text)
    if host in ("0.0.0.0", "::"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the address the other hosts reach this one at, not {host}"
        )
    return host, port


def check_mountpoint(path: str) -> str:
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise QuietError(f"{path}: mountpoint does not exist", 32)
    if not os.path.isdir(path):
        raise QuietError(f"{path}: mountpoint is not a directory", 32)
    if is_mounted(path):
        raise QuietError(f"{path}: mountpoint is busy (something is already mounted there)", 32)
    return path


def pick_node(storage: Storage, sb: fmt.Superblock, node: int | None, joining: bool) -> int:
    """The slot to claim.  `joining`: we join the cluster's master (or
    spread the directory with the others); else we would embed one."""
    live = live_slots(storage, sb)
    if live and not joining:
        # Hosts on one volume must share one master: a second embedded
        # master would let two hosts write the same blocks unaware.
        n, slot = min(live.items())
        raise QuietError(
            f"{storage.name}: already mounted by {describe_slot(n, slot)}; "
            "join its lock master with --master HOST:PORT",
            32,
        )
    if node is None:
        free = [n for n in range(sb.host_slots) if n not in live]
        if not free:
            raise QuietError(f"{storage.name}: all {sb.host_slots} host slots are in use", 32)
        return free[0]
    return node


def check_shared(storage: Storage, joining: bool) -> None:
    """A host joining a cluster needs a volume whose every host sees the
    others' writes (an NBD export without multi-conn may not)."""
    if storage.shared:
        return
    why = (
        "the NBD server does not promise that one connection sees what another wrote "
        "(no multi-conn)"
    )
    if joining:
        raise QuietError(f"{storage.name}: {why}, so no cluster can share it", 32)
    log.warning("%s: %s: no other host may join this one", storage.name, why)


def fuse_options(volume: str, extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts.add(f"fsname={canonical_name(volume)}")
    opts.add("subtype=sharedfs")
    if os.getuid() == 0:
        opts.add("allow_other")  # a cluster filesystem is for every user
    for group in extra:
        opts.update(o for o in group.split(",") if o)
    return opts


async def serve(
    storage: Storage,
    sb: fmt.Superblock,
    mountpoint: str,
    node: int,
    options: set[str],
    args: argparse.Namespace,
    ready: Callable[[], None],
) -> None:
    """Run one host until unmounted; leave the volume clean."""
    # Signals are ours from here to the end: one that comes while we write
    # back after an unmount (systemd sends SIGTERM after umount(8)) must not
    # end the process before the volume is clean.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        slot = claim_slot(storage, sb, node, mountpoint)
        # Every write of this host passes the gate, its slot's and its
        # mirror's too: once fenced, it writes nothing more.
        gate = Fence(storage)
        keeper = SlotKeeper(gate, sb, node, slot)
        clean = False
        try:
            # The mirror wraps everything this host writes, the replay too.
            async with mirrored(gate, sb, node) as volume:
                await _serve_host(
                    volume, gate, sb, mountpoint, node, options, args, ready, signals, keeper
                )
            clean = True
        finally:
            try:
                # Freed after a failure too: the slot of a process that is
                # gone is dead either way (the journal has what it committed).
                keeper.release()
                if clean:
                    log.info("host %d: unmounted %s, volume clean", node, mountpoint)
                else:
                    log.info("host %d: stopped on an error, slot freed", node)
            except Fenced:
                # The slot frees itself: this process gone, its heartbeat old.
                log.info("host %d: unmounted %s, fenced", node, mountpoint)


async def _serve_host(
    storage: Storage,
    gate: Fence,
    sb: fmt.Superblock,
    mountpoint: str,
    node: int,
    options: set[str],
    args: argparse.Namespace,
    ready: Callable[[], None],
    signals: AsyncIterator[int],
    keeper: SlotKeeper,
) -> None:
    others = sorted(set(live_slots(storage, sb)) - {node})
    if not others:
        await replay_log(storage, sb, node)
    fs = open_cluster_host(
        storage,
        sb,
        node=node,
        coherence=args.coherence,
        cache_bytes=args.cache_size,
        gate=gate,
        tls=args.tls_config,
        partitions=max(1, args.spread),
    )
    fs.log.page_locks = args.log_page_locks
    agent = fs.cache.agent
    assert not isinstance(agent, LocalAgent)
    agent.master_wait = args.master_wait
    # A master that has just started waits for these to resume first.
    agent.live_at_join = tuple(others)
    ops = Operations(fs)
    async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as nursery:
        masters = Masters(nursery, sb, args, node, gate, keeper, agent)
        service = None
        lhost, lport = args.peer_address
        if isinstance(agent, SpreadAgent):
            spread = masters.spread(agent, gate)
            states = [agent.describe, spread.describe]
            run = functools.partial(spread.run, parse_address(args.listen), lhost)
        else:
            agent.failover = failover = Failover(gate, sb, node, masters.take_over)
            master, service = await masters.start_embedded()
            states = [agent.describe] + ([service.describe] if service else [])
            nursery.start_soon(failover.watch, agent.can_fail_over)
            run = functools.partial(agent.run, master, listen_host=lhost, listen_port=lport)
        if args.metrics:
            samples = functools.partial(_metric_samples, fs, agent, service)
            port = await stack.enter_async_context(serve_metrics(args.metrics, samples))
            log.info("host %d: metrics on %s:%d/metrics", node, args.metrics[0], port)
        nursery.start_soon(dump_on_signal, f"host {node}", *states)
        nursery.start_soon(watch_loop, f"host {node}")
        await nursery.start(run)
        await _run_fuse(
            fs,
            ops,
            gate,
            sb,
            mountpoint,
            node,
            options,
            keeper,
            ready,
            nursery,
            args.writeback,
            signals,
        )


class Masters:
    """The lock master this host runs, if any: the one embedded at mount
    (no --master), or one started after a failover (failover.py).  It
    lives as long as its host may write: the host keeps a disk lease, and
    a host that is fenced stops its master, so that the others elect a
    successor."""

    def __init__(
        self,
        nursery: trio.Nursery,
        sb: fmt.Superblock,
        args: argparse.Namespace,
        node: int,
        gate: Fence,
        keeper: SlotKeeper,
        agent: ClusterAgent | SpreadAgent,
    ) -> None:
        self._nursery, self._sb, self._args, self._node = nursery, sb, args, node
        self._gate, self._keeper, self._agent = gate, keeper, agent

    async def start_embedded(self) -> tuple[tuple[str, int], MasterService | None]:
        """The master to join: --master's, or one started here."""
        if self._args.master:
            return parse_address(self._args.master), None
        addr, service = await self._start(parse_address(self._args.listen), frozenset())
        log.info("host %d: embedded master on %s:%d", self._node, *addr)
        return addr, service

    async def take_over(self, dead: int) -> tuple[str, int] | None:
        """Start the successor of the master that host `dead` ran; None if
        this host may not (its disk lease is up: it fences) or cannot (its
        --listen address is taken): the others wait, then fence."""
        host, port = parse_address(self._args.listen)
        if host in ("127.0.0.1", "localhost") and self._args.peer_address[0] != host:
            host = self._args.peer_address[0]  # where the other hosts reach us
        try:
            addr, _ = await self._start((host, port), frozenset({dead}))
        except QuietError as e:
            log.error("host %d: cannot take the master role: %s", self._node, e)
            return None
        log.warning("host %d: took the master role: listening on %s:%d", self._node, *addr)
        return addr

    def spread(self, agent: SpreadAgent, storage: Storage) -> Spread:
        """This host's part of a directory spread over the hosts."""

        async def publish(addr: str) -> None:
            await trio.to_thread.run_sync(self._keeper.publish, addr)

        def make_service(k: int, dead: frozenset[int], expect: frozenset[int]) -> MasterService:
            return self._service(dead, (k, self._args.spread), expect)

        return Spread(
            agent,
            storage,
            self._sb,
            key=self._sb.cluster_key,
            tls=self._args.tls_config,
            make_service=make_service,
            publish=publish,
        )

    def _service(
        self,
        dead: frozenset[int],
        partition: tuple[int, int] = (0, 1),
        expect: frozenset[int] = frozenset(),
    ) -> MasterService:
        args, gate = self._args, self._gate
        service = MasterService(
            self._sb.cluster_key,
            coherence=args.coherence,
            host_slots=self._sb.host_slots,
            tls=args.tls_config,
            lease=args.lease,
            node=self._node,
            dead=dead,
            peer_reads=args.peer_reads,
            handoffs=not args.no_handoffs,
            volume_blocks=self._sb.volume_blocks,
            partition=partition,
            expect=expect,
        )
        # This host writes only while its heartbeat is fresh, and its master
        # serves only as long.
        gate.disk_lease = (DISK_LEASE, lambda: self._keeper.beat_at)
        if gate.lapsed():
            raise QuietError("this host's disk lease is up", 32)
        service.may_serve = lambda: not gate.lapsed()
        service.on_minority = self._agent.fence
        return service

    async def _start(
        self, listen: tuple[str, int], dead: frozenset[int]
    ) -> tuple[tuple[str, int], MasterService]:
        service = self._service(dead)
        lhost, lport = listen
        port = await self._nursery.start(service.serve, lhost, lport)
        reach = self._args.peer_address[0] if lhost in ("0.0.0.0", "::", "") else lhost
        self._agent.local_masters[(reach, port)] = service.connect_local
        await trio.to_thread.run_sync(self._keeper.publish, f"{reach}:{port}")
        self._nursery.start_soon(self._stop_when_fenced, service)
        return (reach, port), service

    async def _stop_when_fenced(self, service: MasterService) -> None:
        await self._agent.master_lost.wait()
        service.stop(f"host {self._node} is fenced")


def _metric_samples(
    fs: FileSystem, agent: ClusterAgent | SpreadAgent, service: MasterService | None
) -> list[Sample]:
    """This host's side of /metrics (and its embedded master's)."""
    labels = {"node": str(agent.host)}
    out = counter_samples("host", agent.counters(), labels)
    out.append(Sample("host_fenced", int(fs.fenced), "1 once fenced", False, labels))
    return out + (service.metric_samples() if service is not None else [])


#: pyfuse3's loop reads /dev/fuse with the GIL held once the device polls
#: readable.  A request withdrawn in between (its process killed, or an
#: interrupt whose request got its answer first) leaves that read blocked,
#: and every thread of the mount with it, until some other request comes:
#: a quiet mount then lost its lease (RELIABILITY, the stalls).  A timer
#: signal every tick ends such a read with EINTR, on which pyfuse3 polls
#: again; anywhere else the signal costs a wakeup.
FUSE_READ_TICK = 0.5


@contextlib.contextmanager
def unblocked_fuse_reads(tick: float = FUSE_READ_TICK) -> Iterator[None]:
    """A no-op SIGALRM every `tick` seconds that interrupts system calls
    (not restarted), while the FUSE loop runs."""
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.siginterrupt(signal.SIGALRM, True)
    timer = signal.setitimer(signal.ITIMER_REAL, tick, tick)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, *timer)
        signal.signal(signal.SIGALRM, old)


async def _run_fuse(
    fs: FileSystem,
    ops: Operations,
    gate: Fence,
    sb: fmt.Superblock,
    mountpoint: str,
    node: int,
    options: set[str],
    keeper: SlotKeeper,
    ready: Callable[[], None],
    nursery: trio.Nursery,
    writeback: float,
    signals: AsyncIterator[int],
) -> None:
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as e:
        raise QuietError(f"{mountpoint}: cannot mount: {e}", 32) from None
    log.info("host %d: mounted %s on %s", node, gate.name, mountpoint)
    try:
        async with trio.open_nursery() as beats:
            # Heartbeats go on through the unmount: a destroy that waits
            # longer than the disk lease (the last host, sweeping and
            # handing on) would otherwise fence its own host mid-way.
            beats.start_soon(_heartbeat_task, gate, keeper)
            try:
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(fs.write_back_every, writeback)
                    tasks.start_soon(fs.trim_when_crowded)
                    tasks.start_soon(_signal_task, signals)
                    ready()
                    with unblocked_fuse_reads():
                        await pyfuse3.main()
                    tasks.cancel_scope.cancel()
            finally:
                # Still mounted unless the kernel unmounted us (fusermount3 -u).
                pyfuse3.close(unmount=is_mounted(mountpoint))
                with trio.CancelScope(shield=True):
                    if not fs.fenced:
                        await fs.destroy()
                beats.cancel_scope.cancel()
    finally:
        nursery.cancel_scope.cancel()


async def _heartbeat_task(gate: Fence, keeper: SlotKeeper) -> None:
    """Keep our slot fresh until we are fenced."""
    with contextlib.suppress(Fenced):
        while True:
            await trio.sleep(HEARTBEAT_INTERVAL)
            if gate.lapsed():
                return  # a heartbeat now would make a fenced host look alive
            await trio.to_thread.run_sync(keeper.beat)


async def replay_log(storage: Storage, sb: fmt.Superblock, node: int) -> None:
    """The first host to mount after a crash of every host brings storage up
    to the end of the log."""
    done = await journal.replay(storage, sb)
    if done.transactions:
        log.warning(
            "host %d: replayed the log: %d transactions in %d pages, %d blocks written",
            node,
            done.transactions,
            done.pages,
            done.blocks_written,
        )


async def _signal_task(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("got signal %d: unmounting", signum)
        pyfuse3.terminate()
        return


def daemonize(run: Callable[[Callable[[], None]], None]) -> None:
    """Fork; the parent exits 0 once the child reports the mount is live, or
    prints the child's one-line error and exits non-zero."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg == "OK":
            sys.exit(0)
        code, _, text = msg.partition(" ")
        if not text:
            _, status = os.waitpid(pid, 0)
            text, code = f"mount process died (status {status}) before the mount was live", "1"
        print(f"sharedfs: {text}", file=sys.stderr)
        sys.exit(int(code) if code.isdigit() else 1)
    os.close(rfd)
    os.setsid()
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)

    def ready() -> None:
        os.write(wfd, b"OK")
        os.close(wfd)

    try:
        run(ready)
    except BaseException as e:  # the parent must hear of it, whatever it is
        quiet = find_quiet(e)
        if quiet is None:
            log.exception("mount failed")
            quiet = QuietError(f"mount failed: {e!r}")
        else:
            log.error("%s", quiet)
        os.write(wfd, f"{quiet.exitcode} {quiet}".encode())
        os._exit(quiet.exitcode)
    os._exit(0)


def default_log(node: int) -> str:
    base = "/var/log/sharedfs" if os.getuid() == 0 else os.path.expanduser("~/.cache/sharedfs")
    os.makedirs(base, exist_ok=True)
    return os.path.join(base, f"mount-node{node}.log")


def mount(args: argparse.Namespace) -> None:
    for addr in (args.master, args.listen):
        if addr:
            try:
                parse_address(addr)
            except ValueError as e:
                raise QuietError(f"{addr}: {e}", 2) from None
    if args.nbd_timeout <= 0:
        raise QuietError(f"--nbd-timeout {args.nbd_timeout:g}: give a positive number", 2)
    if not 0.2 <= args.lease <= 600:
        raise QuietError(f"--lease {args.lease:g}: give 0.2 to 600 seconds", 2)
    if not 0 <= args.master_wait <= 3600:
        raise QuietError(f"--master-wait {args.master_wait:g}: give 0 to 3600 seconds", 2)
    check_peer_reads(args)
    if args.spread and (args.master or not 2 <= args.spread <= MAX_PARTITIONS):
        why = "with --master" if args.master else f"give 2 to {MAX_PARTITIONS} partitions"
        raise QuietError(f"--spread {args.spread}: {why}", 2)
    mountpoint = check_mountpoint(args.mountpoint)
    args.tls_config = load_tls(args.tls)
    storage = open_volume(args.volume, nbd_timeout=args.nbd_timeout)
    sb = open_superblock(storage)
    check_block_size(storage, sb.block_size)
    joined = None if args.master or args.spread else published_master(storage, sb)
    if joined is not None:
        args.master = joined[1]  # a host of the cluster runs one: join it
    joining = bool(args.master or args.spread)
    check_shared(storage, joining)
    refuse_own_secondary(args.volume, sb)
    node = pick_node(storage, sb, args.node, joining)
    if not 0 <= node < sb.host_slots:
        raise QuietError(f"--node {node}: this volume has host slots 0..{sb.host_slots - 1}", 2)
    options = fuse_options(args.volume, args.options)
    logfile = args.log or (None if args.foreground else default_log(node))
    setup_logging(args.debug, logfile, node=node)
    if joined is not None:
        log.info("host %d: joining the master that node %d runs, at %s", node, *joined)
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def run(ready: Callable[[], None]) -> None:
        trio.run(serve, storage, sb, mountpoint, node, options, args, ready)

    if args.foreground:
        run(lambda: notify_systemd("READY=1"))
    else:
        daemonize(run)


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(sys.argv[1:] if argv is None else argv)
    run_tool(mount, args)


# mount(8) runs `mount.sharedfs VOLUME DIR [-sfnv] [-o OPTIONS]` (from
# `mount -t sharedfs` and fstab).  Our options map to `sharedfs mount` flags;
# the ones only mount(8) and fstab care about are dropped; the rest go to FUSE.
_HELPER_OPTIONS = {
    "master": "--master",
    "node": "--node",
    "listen": "--listen",
    "lease": "--lease",
    "coherence": "--coherence",
    "peer_address": "--peer-address",
    "writeback": "--writeback",
    "nbd_timeout": "--nbd-timeout",
    "master_wait": "--master-wait",
    "spread": "--spread",
    "cache_size": "--cache-size",
    "metrics": "--metrics",
    "tls": "--tls",
    "log": "--log",
}
_FSTAB_ONLY = {"defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "rw"}


def helper_argv(volume: str, mountpoint: str, options: str) -> list[str]:
    """The `sharedfs mount` arguments for mount(8)'s VOLUME DIR -o OPTIONS."""
    argv = [volume, mountpoint]
    fuse = []
    for opt in filter(None, options.split(",")):
        key, eq, value = opt.partition("=")
        if key in _HELPER_OPTIONS:
            if not eq or not value:
                raise QuietError(f"-o {key}: give a value ({key}=...)", 1)
            argv.append(f"{_HELPER_OPTIONS[key]}={value}")
        elif key in ("debug", "peer_reads", "no_handoffs"):
            argv.append("--" + key.replace("_", "-"))
        elif key not in _FSTAB_ONLY and not key.startswith("x-"):
            fuse.append(opt)
    return argv + (["-o", ",".join(fuse)] if fuse else [])


def mount_helper_main(argv: list[str] | None = None) -> None:
    p = Parser(
        prog="mount.sharedfs",
        description="mount(8)'s helper: mount -t sharedfs VOLUME DIR -o OPTIONS.",
        epilog="OPTIONS: master=HOST:PORT, node=N, peer_address=HOST[:PORT], "
        "listen=HOST:PORT, coherence=fusion|disk, "
        "writeback=SECONDS, nbd_timeout=SECONDS, master_wait=SECONDS, cache_size=SIZE, "
        "metrics=HOST:PORT, tls=DIR, "
        "log=FILE, "
        "peer_reads, no_handoffs, debug, and FUSE "
        "options; defaults, auto, noauto, _netdev, nofail, user(s), rw and x-* are for "
        "mount(8) and fstab and are ignored.",
    )
    p.add_argument("volume")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-f", dest="fake", action="store_true", help="do everything but mount")
    for flag in ("-s", "-n", "-v"):
        p.add_argument(flag, action="store_true", help="accepted, as mount(8) passes it")
    p.add_argument("-t", dest="fstype")
    ns = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        mount_argv = helper_argv(ns.volume, ns.mountpoint, ",".join(ns.options))
    except QuietError as e:
        print(f"mount.sharedfs: {e}", file=sys.stderr)
        sys.exit(e.exitcode)
    mount_parser = make_parser()
    mount_parser.prog = "mount.sharedfs"
    args = mount_parser.parse_args(mount_argv)
    if ns.fake:
        sys.exit(0)
    run_tool(mount, args)


if __name__ == "__main__":
    main()
