"""Hosts cut off from the cluster by the network (issue #7): a master and
three mounts, each in a network namespace of its own on one bridge; a
host's link goes down.  Each host reaches the volume through an nbdkit of
its own whose log filter records every request, so the test sees every
write a host makes to storage, and can prove a fenced host makes none."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from mount_util import PY, fsck_ok, mkfs, needs_fuse, public_dir, wait_for
from nbd_util import Server, nbdkit
from netns_util import Net, needs_netns, network

from sharedfs.status import ask_master
from sharedfs.storage import open_volume
from sharedfs.volume import open_superblock, slot_blockno

pytestmark = [needs_fuse, needs_netns, pytest.mark.fuse, pytest.mark.slow]

LEASE = 3.0
PORT = 7411
PARTS = 16


class Host:
    """One host: its namespace, its NBD server, its mount process."""

    def __init__(
        self,
        node: int,
        net: Net,
        vol: Path,
        work: Path,
        master: str,
        *,
        embeds: bool = False,
        spread: bool = False,
    ) -> None:
        """`embeds`: this host runs the master, listening at `master`.
        `spread`: every host masters its share of the directory
        (--spread), listening at its own address."""
        self.node, self.net, self.work, self.master = node, net, work, master
        self.embeds, self.spread = embeds, spread
        self.name = f"h{node}"
        self.mnt = work / self.name
        self.mnt.mkdir()
        self.log = work / f"{self.name}.log"
        self.iolog = work / f"{self.name}.io"
        self.nbd: Server = nbdkit(
            "--filter=log", "file", str(vol), f"logfile={self.iolog}", unix=True
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def mount(self, node: int | None = None) -> None:
        """Mount in our slot (or in `node`'s)."""
        cmd = [PY, "-m", "sharedfs.cli", "mount", "--foreground", self.nbd.uri, str(self.mnt)]
        if self.spread:
            listen = f"{self.net.addr[self.name]}:{PORT}"
            cmd += ["--spread", str(PARTS), "--listen", listen, "--lease", str(LEASE)]
        elif self.embeds:
            cmd += ["--listen", self.master, "--lease", str(LEASE)]
        else:
            cmd += ["--master", self.master]
        cmd += ["--node", str(self.node if node is None else node)]
        cmd += ["--peer-address", self.net.addr[self.name], "--writeback", "1"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                self.net.prefix(self.name) + cmd, stdout=subprocess.DEVNULL, stderr=log
            )
        proc = self.proc

        def up() -> bool:
            assert proc.poll() is None, self.log.read_text()
            return os.path.ismount(self.mnt)

        wait_for(up, what=f"host {self.node} to mount")

    def writes(self) -> list[str]:
        """The write requests this host has sent to storage so far."""
        if not self.iolog.exists():
            return []
        lines = self.iolog.read_text(errors="replace").splitlines()
        return [x for x in lines if (" Write " in x or " Trim " in x) and x.endswith(" ...")]

    def block_writes(self, slot_offset: int) -> list[str]:
        """writes() but those of its own slot (its heartbeat, which goes on
        while the host holds its writes for a master that went away)."""
        return [x for x in self.writes() if _offset(x) != slot_offset]

    def unmount(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.unmount()
        self.nbd.stop()


@pytest.fixture
def cluster() -> Iterator[tuple[Net, list[Host], dict]]:  # type: ignore[type-arg]
    work = public_dir()
    vol = work / "volume.img"
    mkfs(vol, "256M")
    storage = open_volume(str(vol))
    try:
        sb = open_superblock(storage)
    finally:
        storage.close()
    key = sb.cluster_key
    with network(["m", "h0", "h1", "h2"]) as net:
        addr = f"{net.addr['m']}:{PORT}"
        mlog = work / "master.log"
        with open(mlog, "w") as log:
            master = subprocess.Popen(
                net.prefix("m")
                + [PY, "-m", "sharedfs.cli", "master", str(vol), "--listen", addr]
                + ["--lease", str(LEASE)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

        def status() -> dict:  # type: ignore[type-arg]
            assert master.poll() is None, mlog.read_text()
            return trio.run(ask_master, key, (net.addr["m"], PORT))

        wait_for(lambda: _answers(status), what="the master")
        hosts = [Host(n, net, vol, work, addr) for n in range(3)]
        slots = {n: slot_blockno(sb, n) * sb.block_size for n in range(4)}
        ctx = {"status": status, "vol": vol, "master": master, "mlog": mlog, "slots": slots}
        try:
            for h in hosts:
                h.mount()
            yield net, hosts, ctx
        finally:
            for h in hosts:
                h.stop()
            master.terminate()
            master.wait(timeout=30)
    fsck_ok(vol)
    subprocess.run(["rm", "-rf", str(work)])


def _offset(line: str) -> int:
    m = re.search(r"offset=(0x[0-9a-f]+|\d+)", line)
    assert m is not None, line
    return int(m.group(1), 0)


def _answers(status) -> bool:  # type: ignore[no-untyped-def]
    try:
        status()
    except Exception:  # noqa: BLE001 - not listening yet
        return False
    return True


def put(path: Path, data: bytes) -> None:
    """Write and fsync: acknowledged once this returns."""
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def _hosts(status) -> set[int]:  # type: ignore[no-untyped-def]
    return {int(n) for n in status()["hosts"]}


def _eio(path: Path) -> bool:
    try:
        path.write_bytes(b"after the cut")
    except OSError as e:
        return e.errno == errno.EIO
    return False


def test_a_host_cut_off_is_fenced_writes_nothing_more_and_rejoins_when_healed(cluster) -> None:  # type: ignore[no-untyped-def]
    net, (h0, h1, h2), ctx = cluster
    put(h1.mnt / "before", b"written by h1" * 500)
    assert (h0.mnt / "before").read_bytes() == b"written by h1" * 500
    net.cut("h1")
    cut = time.monotonic()
    # It fences itself once the master has been silent most of a lease
    # and no other host answers either (it is the one cut off).
    wait_for(lambda: "fenced" in h1.log.read_text(), timeout=3 * LEASE, what="h1 to fence")
    fenced = time.monotonic()
    # Silence is looked for every quarter lease, from three quarters on;
    # what is unread gets 0.2 s; the other hosts are probed for 2 s.
    assert fenced - cut < LEASE + 0.2 + 2.0 + 0.5
    assert "no other host answers" in h1.log.read_text()
    written = h1.writes()
    assert _eio(h1.mnt / "after")
    # The master declares it dead and the others recover it and go on.
    wait_for(
        lambda: 1 not in _hosts(ctx["status"]) and not ctx["status"]()["recovering"],
        timeout=6 * LEASE,
        what="h1's recovery",
    )
    put(h0.mnt / "survivors", b"h0 goes on")
    assert (h2.mnt / "survivors").read_bytes() == b"h0 goes on"
    assert (h2.mnt / "before").read_bytes() == b"written by h1" * 500
    # Some time cut off, then healed: never a write to storage after its fence.
    time.sleep(LEASE)
    net.heal("h1")
    time.sleep(LEASE)
    assert h1.writes() == written, "\n".join(h1.writes()[len(written) :] + [h1.log.read_text()])
    assert _eio(h1.mnt / "still")
    # Its unmount writes nothing either (not even its own slot); remounted,
    # it rejoins and sees what the others did meanwhile.
    h1.unmount()
    assert h1.writes() == written
    h1.mount()
    assert (h1.mnt / "survivors").read_bytes() == b"h0 goes on"
    put(h1.mnt / "back", b"h1 is back")
    assert (h0.mnt / "back").read_bytes() == b"h1 is back"


def test_hosts_cut_off_from_the_master_hold_writes_and_carry_on_when_it_returns(cluster) -> None:  # type: ignore[no-untyped-def]
    """No split brain: the master unreachable (the hosts still reach each
    other), every host holds its block writes from before the master could
    declare it dead; the master, hearing no host at all, forgets its locks.
    Healed, the hosts resume: the master rebuilds its directory from what
    they report, and a write made during the cut completes."""
    net, hosts, ctx = cluster
    slots = ctx["slots"]
    put(hosts[0].mnt / "f", b"x" * 10000)
    net.cut("m")
    for h in hosts:
        wait_for(
            lambda h=h: "holding writes" in h.log.read_text(), timeout=3 * LEASE, what="a hold"
        )
    written = [h.block_writes(slots[h.node]) for h in hosts]
    # A write and fsync during the cut waits; it does not fail.
    script = (
        "import os,sys; f=open(sys.argv[1],'wb'); f.write(b'during'*1000); os.fsync(f.fileno())"
    )
    during = subprocess.Popen([PY, "-c", script, str(hosts[1].mnt / "during")])
    time.sleep(LEASE)
    assert during.poll() is None, "the write should wait for the master"
    assert [h.block_writes(slots[h.node]) for h in hosts] == written
    wait_for(
        lambda: "forgetting every lock" in ctx["mlog"].read_text(),
        timeout=3 * LEASE,
        what="the master to forget",
    )
    net.heal("m")
    for h in hosts:
        wait_for(
            lambda h=h: "resumed with" in h.log.read_text(), timeout=4 * LEASE, what="a resume"
        )
    assert during.wait(timeout=30) == 0
    assert "rebuilt from 3 resumed hosts" in ctx["mlog"].read_text()
    for h in hosts:
        assert "fenced" not in h.log.read_text(), h.log.read_text()
    assert _hosts(ctx["status"]) == {0, 1, 2}
    assert (hosts[2].mnt / "during").read_bytes() == b"during" * 1000
    assert (hosts[2].mnt / "f").read_bytes() == b"x" * 10000
    put(hosts[1].mnt / "g", b"carries on")
    assert (hosts[0].mnt / "g").read_bytes() == b"carries on"


@pytest.fixture
def embedded() -> Iterator[tuple[Net, list[Host], Path]]:
    """Three hosts, the master embedded in h0."""
    work = public_dir()
    vol = work / "volume.img"
    mkfs(vol, "256M")
    with network(["h0", "h1", "h2"]) as net:
        addr = f"{net.addr['h0']}:{PORT}"
        hosts = [Host(n, net, vol, work, addr, embeds=n == 0) for n in range(3)]
        try:
            for h in hosts:
                h.mount()
            yield net, hosts, work
        finally:
            for h in hosts:
                h.stop()
    fsck_ok(vol)
    subprocess.run(["rm", "-rf", str(work)])


def test_a_master_host_cut_off_stands_down_and_the_majority_elects_a_successor(embedded) -> None:  # type: ignore[no-untyped-def]
    """Majority (issue #10): h0, which runs the master, loses its network
    but still reaches the volume.  Its master hears one host of three: it
    stands down before it declares anyone dead, and h0 fences itself, so
    its heartbeat stops.  Once the volume says h0 is dead, h1, the lowest
    live host, takes the master role and sweeps what h0 held; h1 and h2 go
    on, and what h0 acknowledged before the cut is there.  h0 writes
    nothing after its fence; healed, it mounts again and joins h1's
    master."""
    net, (h0, h1, h2), work = embedded
    put(h0.mnt / "before", b"h0" * 5000)
    assert (h1.mnt / "before").read_bytes() == b"h0" * 5000
    put(h0.mnt / "late", b"acknowledged, maybe not yet on storage")
    net.cut("h0")
    wait_for(lambda: "fenced" in h0.log.read_text(), timeout=3 * LEASE, what="h0 to fence")
    assert "a minority" in h0.log.read_text(), h0.log.read_text()
    assert "lease lapsed" not in h0.log.read_text()  # it declared nobody dead
    written = h0.writes()
    assert _eio(h0.mnt / "cut off")
    # h0's slot goes stale on the volume (HEARTBEAT_TIMEOUT), then h1 takes over.
    wait_for(lambda: "took the master role" in h1.log.read_text(), timeout=40, what="a successor")
    put(h1.mnt / "after", b"the majority goes on")
    assert (h2.mnt / "after").read_bytes() == b"the majority goes on"
    assert (h2.mnt / "before").read_bytes() == b"h0" * 5000
    assert (h2.mnt / "late").read_bytes() == b"acknowledged, maybe not yet on storage"
    for h in (h1, h2):
        assert "fenced" not in h.log.read_text(), h.log.read_text()
    net.heal("h0")
    time.sleep(LEASE)
    assert h0.writes() == written, "\n".join(h0.writes()[len(written) :])
    h0.unmount()
    assert h0.writes() == written
    h0.mount()
    assert "joining the master that node 1 runs" in h0.log.read_text()
    assert (h0.mnt / "after").read_bytes() == b"the majority goes on"
    put(h0.mnt / "back", b"h0 is back")
    assert (h2.mnt / "back").read_bytes() == b"h0 is back"


def test_a_host_cut_off_from_an_embedded_master_fences_and_the_rest_go_on(embedded) -> None:  # type: ignore[no-untyped-def]
    """The other side of it: h2 cut off, h0's master still hears two of
    three, so it declares h2 dead and the majority goes on; h2, which sees
    h0 alive on the volume, starts no master and fences."""
    net, (h0, h1, h2), work = embedded
    put(h2.mnt / "before", b"h2" * 5000)
    net.cut("h2")
    wait_for(lambda: "fenced" in h2.log.read_text(), timeout=40, what="h2 to fence")
    assert "took the master role" not in h2.log.read_text()
    written = h2.writes()
    assert _eio(h2.mnt / "after")
    assert "a minority" not in h0.log.read_text()
    put(h1.mnt / "survivors", b"h0 and h1 go on")
    assert (h0.mnt / "survivors").read_bytes() == b"h0 and h1 go on"
    assert (h0.mnt / "before").read_bytes() == b"h2" * 5000
    net.heal("h2")
    time.sleep(LEASE)  # neighbours found again: a remount at once finds no route
    assert h2.writes() == written
    h2.unmount()
    h2.mount()
    assert (h2.mnt / "survivors").read_bytes() == b"h0 and h1 go on"


@pytest.fixture
def spread() -> Iterator[tuple[Net, list[Host], Path]]:
    """Three hosts with the directory spread over them (--spread)."""
    work = public_dir()
    vol = work / "volume.img"
    mkfs(vol, "256M")
    with network(["h0", "h1", "h2"]) as net:
        hosts = [Host(n, net, vol, work, "", spread=True) for n in range(3)]
        try:
            for h in hosts:
                h.mount()
            yield net, hosts, work
        finally:
            for h in hosts:
                h.stop()
    fsck_ok(vol)
    subprocess.run(["rm", "-rf", str(work)])


def test_a_host_cut_off_with_the_directory_spread_fences_and_its_partitions_move(spread) -> None:  # type: ignore[no-untyped-def]
    """Membership with --spread (issue #10, item 2): h2, which masters a
    share of the partitions, loses its network but still reaches the
    volume.  Its masters hear one host of three: they stand down and h2
    fences, writing nothing more, its mount up and answering EIO.  Once
    the volume says h2 is dead, h0 and h1 take its partitions over and go
    on with what h2 acknowledged; healed, h2 mounts again and takes its
    share back."""
    net, (h0, h1, h2), work = spread
    put(h2.mnt / "before", b"h2" * 5000)
    assert (h0.mnt / "before").read_bytes() == b"h2" * 5000
    net.cut("h2")
    wait_for(lambda: "fenced" in h2.log.read_text(), timeout=40, what="h2 to fence")
    assert "a minority" in h2.log.read_text(), h2.log.read_text()
    written = h2.writes()
    assert _eio(h2.mnt / "cut off")
    put(h0.mnt / "after", b"the majority goes on")  # waits while h2's partitions move
    assert (h1.mnt / "after").read_bytes() == b"the majority goes on"
    assert (h1.mnt / "before").read_bytes() == b"h2" * 5000
    for h in (h0, h1):
        assert "fenced" not in h.log.read_text(), h.log.read_text()
    assert "is dead: taking it" in h0.log.read_text() + h1.log.read_text()
    net.heal("h2")
    time.sleep(LEASE)
    assert h2.writes() == written, "\n".join(h2.writes()[len(written) :])
    h2.unmount()
    assert h2.writes() == written
    h2.mount()
    assert (h2.mnt / "after").read_bytes() == b"the majority goes on"
    put(h2.mnt / "back", b"h2 is back")
    assert (h0.mnt / "back").read_bytes() == b"h2 is back"
