"""Hosts cut off from the cluster by the network (issue #7): a master and
three mounts, each in a network namespace of its own on one bridge; a
host's link goes down.  Each host reaches the volume through an nbdkit of
its own whose log filter records every request, so the test sees every
write a host makes to storage, and can prove a fenced host makes none."""

from __future__ import annotations

import errno
import os
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
from sharedfs.volume import open_superblock

pytestmark = [needs_fuse, needs_netns, pytest.mark.fuse, pytest.mark.slow]

LEASE = 3.0
PORT = 7411


class Host:
    """One host: its namespace, its NBD server, its mount process."""

    def __init__(self, node: int, net: Net, vol: Path, work: Path, master: str) -> None:
        self.node, self.net, self.work, self.master = node, net, work, master
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
        cmd += ["--master", self.master, "--node", str(self.node if node is None else node)]
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
        key = open_superblock(storage).cluster_key
    finally:
        storage.close()
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
        ctx = {"status": status, "vol": vol, "master": master, "mlog": mlog}
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
    # It fences itself once the master has been silent most of a lease.
    wait_for(lambda: "fenced" in h1.log.read_text(), timeout=3 * LEASE, what="h1 to fence")
    fenced = time.monotonic()
    assert fenced - cut < LEASE + 1.0
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


def test_hosts_cut_off_from_the_master_stop_writing(cluster) -> None:  # type: ignore[no-untyped-def]
    """No split brain: the master unreachable, every host fences itself
    before the master could have declared it dead and given its locks to
    anyone, and writes nothing more."""
    net, hosts, ctx = cluster
    put(hosts[0].mnt / "f", b"x" * 10000)
    net.cut("m")
    for h in hosts:
        wait_for(lambda h=h: "fenced" in h.log.read_text(), timeout=3 * LEASE, what="a fence")
    written = [h.writes() for h in hosts]
    for h in hosts:
        assert _eio(h.mnt / f"g{h.node}")
    time.sleep(LEASE)
    net.heal("m")
    time.sleep(LEASE)
    assert [h.writes() for h in hosts] == written
    # Every host was declared dead, and each slot waits for its recovery:
    # a host mounting in a free slot runs them, then the others come back.
    for h in hosts:
        h.unmount()
    assert [h.writes() for h in hosts] == written
    wait_for(lambda: not _hosts(ctx["status"]), timeout=6 * LEASE, what="the deaths")
    hosts[0].mount(node=3)
    wait_for(lambda: not ctx["status"]()["recovering"], timeout=6 * LEASE, what="recoveries")
    for h in hosts[1:]:
        h.mount()
    assert (hosts[2].mnt / "f").read_bytes() == b"x" * 10000
    put(hosts[1].mnt / "g", b"carries on")
    assert (hosts[0].mnt / "g").read_bytes() == b"carries on"
