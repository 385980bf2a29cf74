"""Crash trials on real mounts; see tools/torture.

A standalone master and N mount processes on one image.  On every host a
writer creates files in its own directory (and now and then rewrites one in
place), fsyncs each, and only then records it in an acknowledgement file
outside the filesystem.  Each trial kills one host at a random moment (kill -9
of its mount and its writer, or SIGSTOP until its lease lapses), waits for the
master to recover it, reads on a survivor every file the dead host
acknowledged and a sample of the others, and mounts the dead host again in
its slot.  At the end every host unmounts, `fsck -n` must be clean, and a
fresh mount must read every acknowledged file.

With `--mode failover` there is no standalone master: the first host embeds
it, the others find it on the volume, and most trials kill -9 the host that
runs the master, whose successor the others elect (failover.py).

`tools/torture soak ...` runs tools/soak.py instead: load, no kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
import xxhash

from sharedfs.errors import QuietError
from sharedfs.link import parse_address
from sharedfs.status import ask_master, ask_spread, merge_spread, spread_listeners
from sharedfs.storage import open_volume
from sharedfs.volume import open_superblock, published_master

PY = sys.executable

#: The writer: `W name digest size seed` before a rewrite, `A name digest
#: size seed` once a create or rewrite has been fsync'd; the contents are
#: random.Random(seed).randbytes(size), so a checker can rebuild them.  A
#: name whose last line is W may hold the old or the new contents.
WRITER = r"""
import os, random, sys, xxhash
top, acks, seed, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
os.makedirs(top, exist_ok=True)
log = open(acks, "a", buffering=1)
def contents(size):
    dseed = rng.getrandbits(63)
    return random.Random(dseed).randbytes(size), dseed
def ack(kind, name, data, dseed):
    log.write(f"{kind} {name} {xxhash.xxh64_hexdigest(data)} {len(data)} {dseed}\n")
    log.flush()
    os.fsync(log.fileno())
mine, i = [], start
while True:
    i += 1
    if i % 5 == 0 and mine:
        name = rng.choice(mine)
        path = os.path.join(top, name)
        data, dseed = contents(os.path.getsize(path))
        ack("W", name, data, dseed)
        fd = os.open(path, os.O_WRONLY)
    else:
        name = f"f{i:06d}"
        path = os.path.join(top, name)
        data, dseed = contents(rng.choice((100, 4096, 5000, 20000, 70000)))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        mine.append(name)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    ack("A", name, data, dseed)
"""

#: What the cluster appends to a host's acknowledgement file once it has
#: killed that host's writer with its mount: a rewrite under way then was
#: cut off mid-write or mid-fsync.
CRASHED = "X\n"

#: The unit a killed write leaves whole: a page of the image file.  A
#: crash mid-rewrite may leave each page of the file old or new, as on any
#: filesystem that overwrites in place (ext4 too, without data=journal).
PAGE = 4096


class TortureFailed(Exception):
    pass


def sfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([PY, "-m", "sharedfs.cli", *args], capture_output=True, text=True)
    if check and r.returncode:
        raise TortureFailed(f"sharedfs {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    """Poll `pred`; the seconds it took, or TortureFailed after `timeout`."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TortureFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


@dataclass
class Host:
    node: int
    mnt: Path
    log: Path
    acks: Path
    mount: subprocess.Popen[bytes] | None = None
    writer: subprocess.Popen[bytes] | None = None


@dataclass(frozen=True)
class Version:
    """Contents a writer wrote, by what rebuilds them."""

    digest: str
    size: int
    seed: int

    def data(self) -> bytes:
        return random.Random(self.seed).randbytes(self.size)


@dataclass
class Acked:
    """What a host's writer acknowledged: name -> the versions it may hold
    (one, or the old and the new while a rewrite is unacknowledged)."""

    files: dict[str, list[Version]] = field(default_factory=dict)
    #: Names whose rewrite a crash cut off: any page mix of their versions.
    torn: set[str] = field(default_factory=set)
    last: int = 0  # highest file number created

    @classmethod
    def read(cls, path: Path) -> Acked:
        out = cls()
        if not path.exists():
            return out
        for line in path.read_text().splitlines():
            if line == CRASHED.strip():
                out.torn |= {name for name, vs in out.files.items() if len(vs) > 1}
                continue
            parts = line.split()
            if len(parts) != 5:
                continue  # torn by a kill mid-line: not acknowledged
            kind, name, digest, size, seed = parts
            v = Version(digest, int(size), int(seed))
            if kind == "W":
                out.files[name] = out.files.get(name, []) + [v]
            else:
                out.files[name] = [v]
                out.torn.discard(name)
            out.last = max(out.last, int(name[1:]))
        return out

    def check(self, path: Path, name: str) -> None:
        """`path` holds what `name` may: one of its versions, or, if a
        crash cut its rewrite off, a page mix of them."""
        versions = self.files[name]
        try:
            got = path.read_bytes()
        except OSError as e:
            raise TortureFailed(f"{path}: acknowledged, now {e.strerror}") from None
        digest = xxhash.xxh64_hexdigest(got)
        if any(v.digest == digest for v in versions):
            return
        if name in self.torn and _page_mix(got, [v.data() for v in versions]):
            print(f"torture: {path}: a crash mid-rewrite left pages old and new", flush=True)
            return
        want = {v.digest for v in versions}
        raise TortureFailed(f"{path}: acknowledged contents lost (got {digest}, want {want})")


def _page_mix(got: bytes, candidates: list[bytes]) -> bool:
    """Each page of `got` is that page of one of `candidates` (all of its size)."""
    if any(len(c) != len(got) for c in candidates):
        return False
    return all(
        any(c[i : i + PAGE] == got[i : i + PAGE] for c in candidates)
        for i in range(0, len(got), PAGE)
    )


class Cluster:
    """A standalone master and `hosts` mounts of a fresh volume in `work`,
    each with a writer unless `writers` is false (the soak brings its own
    workload); `mount_args` go to every mount.  `embedded`: no standalone
    master; the first host runs it, the others join it through the volume."""

    def __init__(
        self,
        work: Path,
        hosts: int,
        size: str,
        lease: float,
        seed: int,
        debug: bool,
        *,
        writers: bool = True,
        mount_args: tuple[str, ...] = (),
        embedded: bool = False,
        peer_reads: bool = False,
        spread: int = 0,
    ) -> None:
        self.work = work
        # --spread: every mount masters its share, no master of our own.
        self.spread = spread
        embedded = embedded or bool(spread)
        self.debug = ["--debug"] if debug else []
        # Every mount may come to run the master (embedded, or by failover).
        self.peer_reads = ["--peer-reads"] if peer_reads else []
        self.mount_args = list(mount_args) + self.peer_reads
        if spread:
            self.mount_args += ["--spread", str(spread)]
        self.vol = work / "volume.img"
        self.seed = seed
        self.lease = lease
        sfs("mkfs", str(self.vol), "--size", size, "-q")
        storage = open_volume(str(self.vol))
        try:
            sb = open_superblock(storage)
            self.key, self.block_size = sb.cluster_key, sb.block_size
        finally:
            storage.close()
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.master_log = work / "master.log"
        self.embedded = embedded
        self.master = None if embedded else self._start_master()
        self.hosts = [
            Host(n, work / f"host{n}", work / f"host{n}.log", work / f"acks{n}.txt")
            for n in range(hosts)
        ]
        for h in self.hosts:
            self.mount(h)
            if writers:
                self.start_writer(h)

    @classmethod
    def for_run(cls, work: Path, args: argparse.Namespace, **options: Any) -> Cluster:
        """The cluster a run's command line asks for (--hosts, --size,
        --lease, --seed, --debug); `options` as for the constructor."""
        return cls(work, args.hosts, args.size, args.lease, args.seed, args.debug, **options)

    def _start_master(self) -> subprocess.Popen[bytes]:
        with open(self.master_log, "a") as log:
            proc = subprocess.Popen(
                [PY, "-m", "sharedfs.cli", "master", str(self.vol), "--listen", self.addr]
                + ["--lease", str(self.lease)]
                + self.peer_reads
                + self.debug,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

        def listening() -> bool:
            if proc.poll() is not None:
                raise TortureFailed(f"master exited: {self.master_log.read_text()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 30, "the master")
        return proc

    def status(self) -> dict:  # type: ignore[type-arg]
        """The master's status; with --spread, every host's master listener
        asked: the hosts they all have joined, those any recovers."""
        if not self.spread:
            try:
                return trio.run(ask_master, self.key, self.master_address())
            except QuietError as e:
                raise TortureFailed(str(e)) from None
        try:
            view = merge_spread(trio.run(ask_spread, self.key, self._listeners()))
        except QuietError as e:  # every host just killed, or none masters yet
            raise TortureFailed(str(e)) from None
        # Joined: to every partition's master.
        parts = view["partitions"].values()
        joined = set.intersection(*(set(part["hosts"]) for part in parts))
        view["hosts"] = {n: h for n, h in view["hosts"].items() if n in joined}
        return view

    def _listeners(self) -> dict[int, tuple[str, int]]:
        storage = open_volume(str(self.vol))
        try:
            return spread_listeners(storage, open_superblock(storage))
        finally:
            storage.close()

    def _published(self) -> tuple[int, str] | None:
        storage = open_volume(str(self.vol))
        try:
            return published_master(storage, open_superblock(storage))
        finally:
            storage.close()

    def master_node(self) -> int | None:
        """The host that runs the master now (embedded), by the volume."""
        found = self._published()
        return None if found is None else found[0]

    def master_address(self) -> tuple[str, int]:
        if not self.embedded:
            return ("127.0.0.1", self.port)
        found = self._published()
        if found is None:
            raise TortureFailed("no host runs the master")
        return parse_address(found[1])

    def mount(self, h: Host) -> None:
        h.mnt.mkdir(exist_ok=True)
        with open(h.log, "a") as log:
            h.mount = subprocess.Popen(
                [PY, "-m", "sharedfs.cli", "mount", "--foreground", str(self.vol), str(h.mnt)]
                + ([] if self.embedded else ["--master", self.addr])
                + ["--lease", str(self.lease), "--node", str(h.node), "--writeback", "1"]
                + self.mount_args
                + self.debug,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        proc = h.mount

        def up() -> bool:
            if proc.poll() is not None:
                raise TortureFailed(f"mount of host {h.node} exited: {h.log.read_text()[-2000:]}")
            return os.path.ismount(h.mnt)

        wait_until(up, 60, f"host {h.node} to mount")

    def start_writer(self, h: Host) -> None:
        start = Acked.read(h.acks).last + 1000  # past anything a dead writer began
        h.writer = subprocess.Popen(
            [PY, "-c", WRITER, str(h.mnt / f"w{h.node}"), str(h.acks)]
            + [str(self.seed * 100 + h.node + start), str(start)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def pause_writers(self, sig: int) -> None:
        """Signal every live writer; after SIGSTOP, wait until each is
        stopped, so that no write of theirs is under way while files are read."""
        live = [h.writer for h in self.hosts if h.writer is not None and h.writer.poll() is None]
        for w in live:
            w.send_signal(sig)
        if sig == signal.SIGSTOP:
            wait_until(lambda: all(_stopped(w.pid) for w in live), 60, "the writers to stop")

    def _reap_crashed(self, h: Host) -> None:
        """Wait for the writer killed with `h`'s mount, and mark in its
        acknowledgements that a rewrite under way may have been cut off."""
        assert h.writer is not None
        h.writer.wait()
        text = h.acks.read_bytes() if h.acks.exists() else b""
        with open(h.acks, "a") as f:
            f.write(("\n" if text and not text.endswith(b"\n") else "") + CRASHED)

    def kill(self, h: Host, mode: str) -> float:
        """Kill host `h`; return the seconds from its death (or, for a
        stopped host, the lapse of its lease) to the end of its recovery."""
        assert h.mount is not None and h.writer is not None
        if h.mount.poll() is not None:
            raise TortureFailed(f"host {h.node} died on its own: {h.log}")
        if mode == "stop":
            h.mount.send_signal(signal.SIGSTOP)
            lapse = time.monotonic() + self.lease
        else:
            h.mount.kill()
            lapse = time.monotonic()
        h.writer.kill()
        wait_until(lambda: self._recovered(h.node), self.lease + 60, f"recovery of host {h.node}")
        took = max(0.0, time.monotonic() - lapse)
        if mode == "stop":
            h.mount.kill()  # it fenced itself, or would once it ran again
        h.mount.wait()
        self._reap_crashed(h)
        subprocess.run(["fusermount3", "-u", "-z", str(h.mnt)], capture_output=True)
        return took

    def restart_master(self, rng: random.Random, victim: Host | None = None) -> float:
        """kill -9 the master (and `victim` with it) and start it again
        after a pause of up to 2 s; return the seconds from its death until
        every other host has resumed with the new one (none may fence) and
        the victim's records are swept."""
        if victim is not None:
            assert victim.mount is not None and victim.writer is not None
            victim.mount.kill()
            victim.writer.kill()
        self.master.kill()
        self.master.wait()
        died = time.monotonic()
        time.sleep(rng.uniform(0, 2.0))
        self.master = self._start_master()
        alive = {h.node for h in self.hosts if h is not victim}
        wait_until(lambda: self._all_resumed(alive), self.lease * 3 + 30, "the hosts to resume")
        took = time.monotonic() - died
        for h in self.hosts:
            if h is not victim and "fenced" in h.log.read_text(errors="replace"):
                raise TortureFailed(f"host {h.node} fenced after a master restart: {h.log}")
        if victim is not None:
            assert victim.mount is not None and victim.writer is not None
            victim.mount.wait()
            self._reap_crashed(victim)
            subprocess.run(["fusermount3", "-u", "-z", str(victim.mnt)], capture_output=True)
        return took

    def fail_over(self, victim: Host) -> float:
        """kill -9 `victim`, the host that runs the master; return the
        seconds until another host runs one and every other host has
        resumed with it (none may fence) and the victim is swept."""
        assert victim.mount is not None and victim.writer is not None
        victim.mount.kill()
        victim.writer.kill()
        died = time.monotonic()
        alive = {h.node for h in self.hosts if h is not victim}

        def taken_over() -> bool:
            node = self.master_node()
            return node is not None and node != victim.node and self._all_resumed(alive)

        wait_until(taken_over, self.lease * 3 + 40, "a successor and the hosts to resume")
        took = time.monotonic() - died
        for h in self.hosts:
            if h is not victim and "fenced" in h.log.read_text(errors="replace"):
                raise TortureFailed(f"host {h.node} fenced after a failover: {h.log}")
        victim.mount.wait()
        self._reap_crashed(victim)
        subprocess.run(["fusermount3", "-u", "-z", str(victim.mnt)], capture_output=True)
        return took

    def _all_resumed(self, nodes: set[int]) -> bool:
        info = self.status()
        hosts = {int(n) for n in info["hosts"]}
        return not info["rebuilding"] and hosts == nodes and not info["recovering"]

    def _recovered(self, node: int) -> bool:
        info = self.status()
        hosts = {int(n) for n in info["hosts"]}
        return node not in hosts and node not in info["recovering"]

    def check(self, reader: Host, dead: Host | None, sample: int, rng: random.Random) -> int:
        """Every file `dead` acknowledged, and `sample` of each other host's,
        as acknowledged when read through `reader`; return files checked."""
        checked = 0
        for h in self.hosts:
            acked = Acked.read(h.acks)
            names = sorted(acked.files)
            if h is not dead:
                names = rng.sample(names, min(sample, len(names)))
            for name in names:
                acked.check(reader.mnt / f"w{h.node}" / name, name)
                checked += 1
        return checked

    def stop(self) -> None:
        """Writers stopped, every host unmounted cleanly, the master gone."""
        for h in self.hosts:
            if h.writer is not None:
                h.writer.kill()
                h.writer.wait()
        runs = self.master_node() if self.embedded else None
        # The host that runs the master last: each earlier one would hand it on.
        for h in sorted(self.hosts, key=lambda h: h.node == runs):
            if h.mount is not None and h.mount.poll() is None:
                r = subprocess.run(["fusermount3", "-u", str(h.mnt)], capture_output=True)
                if r.returncode or h.mount.wait(timeout=120):
                    raise TortureFailed(f"host {h.node} did not unmount cleanly: {h.log}")
        if self.master is not None:
            self.master.terminate()
            self.master.wait(timeout=30)

    def dump_states(self) -> None:
        """Have the master and every mount log what they wait on (USR2)."""
        procs = [self.master] + [h.mount for h in self.hosts if h.mount is not None]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGUSR2)
        time.sleep(1)

    def abort(self) -> None:
        self.dump_states()
        for h in self.hosts:
            for proc in (h.writer, h.mount):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(h.mnt)], capture_output=True)
        if self.master is not None and self.master.poll() is None:
            self.master.kill()
            self.master.wait()


def _stopped(pid: int) -> bool:
    """Whether process `pid` is stopped by a signal (or gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "Z", "X")


def check_file(path: Path, digests: set[str]) -> None:
    try:
        got = xxhash.xxh64_hexdigest(path.read_bytes())
    except OSError as e:
        raise TortureFailed(f"{path}: acknowledged, now {e.strerror}") from None
    if got not in digests:
        raise TortureFailed(f"{path}: acknowledged contents lost (got {got}, want {digests})")


def read_acked(c: Cluster, mnt: Path) -> int:
    """Every file the writers acknowledged, read under `mnt`; how many."""
    n = 0
    for h in c.hosts:
        acked = Acked.read(h.acks)
        for name in acked.files:
            acked.check(mnt / f"w{h.node}" / name, name)
            n += 1
    return n


def final_check(c: Cluster, read: Callable[[Path], int] | None = None) -> int:
    """fsck -n clean, then a fresh mount reads every acknowledged file (or
    whatever `read` reads on its mountpoint; its count is returned), then
    fsck -n clean again."""
    r = sfs("fsck", "-n", str(c.vol), check=False)
    if r.returncode:
        raise TortureFailed(f"fsck -n exited {r.returncode}:\n{r.stdout}{r.stderr}")
    mnt = c.work / "final"
    mnt.mkdir()
    sfs("mount", str(c.vol), str(mnt), "--log", str(c.work / "final.log"))
    try:
        n = read(mnt) if read is not None else read_acked(c, mnt)
    finally:
        sfs("umount", str(mnt))
    r = sfs("fsck", "-n", str(c.vol), check=False)
    if r.returncode:
        raise TortureFailed(f"fsck -n after the final mount exited {r.returncode}:\n{r.stdout}")
    return n


def run(args: argparse.Namespace) -> dict:  # type: ignore[type-arg]
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sharedfs-torture-", dir=args.dir))
    work.chmod(0o755)
    embedded = args.mode == "failover"
    c = Cluster.for_run(
        work,
        args,
        embedded=embedded,
        peer_reads=args.peer_reads,
        spread=args.spread,
        mount_args=("--cache-size", args.cache_size) if args.cache_size else (),
    )
    result: dict = {"work": str(work), "trials": 0, "recovery_s": [], "checked": 0, "failovers": 0}  # type: ignore[type-arg]
    ok = False
    try:
        for trial in range(args.trials):
            time.sleep(rng.uniform(0.3, args.max_wait))
            mode = args.mode
            if mode == "mixed":
                mode = rng.choice(("kill", "kill", "stop", "master", "both"))
            victim = rng.choice(c.hosts) if mode != "master" else None
            if mode == "failover":
                # Mostly the master's host; now and then another.
                runs = c.master_node()
                victim = next(h for h in c.hosts if h.node == runs)
                if trial and rng.random() < 0.25:
                    victim = rng.choice([h for h in c.hosts if h is not victim])
                    mode = "kill"
            if mode == "failover":
                assert victim is not None
                took = c.fail_over(victim)
                result["failovers"] += 1
                heir = c.master_node()
                what = f"master's host {victim.node} killed, host {heir} took over in {took:.2f} s"
            elif mode == "master":
                took = c.restart_master(rng)
                what = f"master restarted, hosts resumed in {took:.2f} s"
            elif mode == "both":
                assert victim is not None
                took = c.restart_master(rng, victim)
                what = f"master and host {victim.node} killed, swept in {took:.2f} s"
            else:
                assert victim is not None
                took = c.kill(victim, mode)
                what = f"{mode} host {victim.node}, recovered in {took:.2f} s"
            reader = rng.choice([h for h in c.hosts if h is not victim])
            c.pause_writers(signal.SIGSTOP)
            try:
                checked = c.check(reader, victim, args.sample, rng)
            finally:
                c.pause_writers(signal.SIGCONT)
            if victim is not None:
                c.mount(victim)
                c.start_writer(victim)
            result["trials"] += 1
            result["recovery_s"].append(round(took, 2))
            result["checked"] += checked
            print(
                f"trial {trial + 1}/{args.trials}: {what}, {checked} files read on host "
                f"{reader.node}: ok",
                flush=True,
            )
        # What the master did meanwhile: a master restarted in a trial
        # counts from then on.
        counters = c.status()["counters"]
        result["peer_reads"] = counters["peer_reads"]
        result["handoffs"] = counters.get("handoffs", 0)
        result["transfers"] = counters["transfers"]
        c.stop()
        result["final_files"] = final_check(c)
        ok = True
    finally:
        if not ok:
            c.abort()
            print(f"torture: logs kept in {work}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def main() -> None:
    if sys.argv[1:2] == ["soak"]:
        # soak.py imports this module by name: let it find this copy.
        sys.modules.setdefault("torture", sys.modules[__name__])
        import soak

        soak.main(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(
        prog="tools/torture",
        description=__doc__.split("\n\n")[0],
        epilog="tools/torture soak --help: load on a cluster instead of crashes",
    )
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--hosts", type=int, default=3)
    ap.add_argument("--size", default="512M", help="volume size (default 512M)")
    ap.add_argument(
        "--mode",
        choices=("kill", "stop", "master", "both", "mixed", "failover"),
        default="kill",
        help="kill -9 a host, SIGSTOP one until its lease lapses, kill -9 and restart the "
        "master (the hosts must resume), kill -9 the master and a host together (the others "
        "resume and sweep its records), all these at random, or (failover) embed the master "
        "in a host and kill -9 mostly the host that runs it (another takes over)",
    )
    ap.add_argument(
        "--lease", type=float, default=10.0, help="the master's lease (default 10 s, as mounts)"
    )
    ap.add_argument(
        "--max-wait", type=float, default=3.0, help="longest pause between trials (seconds)"
    )
    ap.add_argument("--sample", type=int, default=50, help="files per survivor checked per trial")
    ap.add_argument(
        "--peer-reads",
        action="store_true",
        help="the master ships reads from the hosts' caches (sharedfs master --peer-reads)",
    )
    ap.add_argument("--cache-size", help="each mount's --cache-size (small: evictions, copies)")
    ap.add_argument(
        "--spread",
        type=int,
        default=0,
        metavar="N",
        help="mount every host with --spread N (no master of our own; modes kill and stop)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where to make the work directory")
    ap.add_argument("--keep", action="store_true", help="keep the volume and logs")
    ap.add_argument("--json", action="store_true", help="print the result as JSON at the end")
    ap.add_argument("--debug", action="store_true", help="debug logs from the master and hosts")
    args = ap.parse_args()
    if args.spread and args.mode not in ("kill", "stop"):
        ap.error("--spread goes with --mode kill or stop")
    # Stopped from outside: still take the cluster down (run's cleanup).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        result = run(args)
    except TortureFailed as e:
        print(f"torture: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    rec = result["recovery_s"]
    print(
        f"torture: {result['trials']} trials passed"
        + (f" ({result['failovers']} failovers)" if result["failovers"] else "")
        + f"; recovery {min(rec):.2f} / "
        f"{statistics.median(rec):.2f} / {max(rec):.2f} s (min/median/max); "
        f"{result['checked']} files read in trials, {result['final_files']} at the end; fsck clean"
        + (
            f"; {result['peer_reads']} peer reads, {result['handoffs']} handoffs"
            if args.peer_reads
            else ""
        )
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
