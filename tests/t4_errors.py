"""Every failure a user can cause, through the real command line: exactly one
line on stderr naming the cause (and the fix, where there is one), nothing
on stdout, no traceback, a non-zero exit.

The cases share one scene (a volume with a standalone master and a mounted
host, another volume, junk, a damaged volume, ports with nothing or not a
master behind them) and run side by side; each case is then its own test.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import trio
from mount_util import PY, Master, Mount, free_port, mkfs, needs_fuse, public_dir, sharedfs

from sharedfs import format as fmt
from sharedfs.fs import Ctx
from sharedfs.host import open_host
from sharedfs.storage import open_volume
from sharedfs.volume import read_superblock

pytestmark = [needs_fuse, pytest.mark.fuse]

HELPER = str(Path(sys.prefix) / "bin" / "mount.sharedfs")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after `sharedfs`; a first word "mount.sharedfs" runs the helper
    want: tuple[str, ...]  # each must be in the line
    code: int | None = None  # the exit status, where it is fixed


@dataclass
class Scene:
    d: Path
    vol: Path  # mounted on mnt by node 0, its master at master
    master: str
    mnt: Path
    other: Path  # another volume (another cluster key), with /file in it
    junk: Path
    damaged: Path  # its primary superblock is broken
    empty: Path  # a directory nothing is mounted on
    closed: str  # nothing listens there
    not_master: str  # something that is not a sharedfs master listens there
    mirrored: Path  # mirrored to an image file that is gone since


def cases(s: Scene) -> list[Case]:
    d, vol, other, empty = str(s.d), str(s.vol), str(s.other), str(s.empty)
    log = ("--log", f"{d}/failed-mount.log")
    return [
        Case("unknown-command", ("frobnicate",), ("unknown command", "--help"), 2),
        # mkfs
        Case("mkfs-no-size", ("mkfs", f"{d}/new.img"), ("does not exist", "--size"), 2),
        Case("mkfs-bad-size", ("mkfs", f"{d}/new.img", "--size", "3X"), ("not a size",), 2),
        Case("mkfs-too-small", ("mkfs", f"{d}/tiny.img", "--size", "100K"), ("too small",)),
        Case(
            "mkfs-block-size",
            ("mkfs", f"{d}/bs.img", "--size", "64M", "--block-size", "3000"),
            ("block size",),
        ),
        Case("mkfs-nodes", ("mkfs", f"{d}/n.img", "--size", "64M", "--nodes", "0"), ("--nodes",)),
        Case("mkfs-existing", ("mkfs", other, "--size", "64M"), ("already holds", "--force")),
        Case(
            "mkfs-mounted",
            ("mkfs", vol, "--size", "64M", "--force"),
            ("mounted by node 0", "unmount it"),
        ),
        Case(
            "mkfs-no-directory",
            ("mkfs", f"{d}/no/such/dir/v.img", "--size", "64M"),
            ("cannot create image",),
        ),
        # mount
        Case("mount-missing-volume", ("mount", f"{d}/missing.img", empty), ("no such file",)),
        Case("mount-junk", ("mount", str(s.junk), empty), ("not a sharedfs volume",), 32),
        Case(
            "mount-damaged",
            ("mount", str(s.damaged), empty),
            ("primary superblock is damaged", "fsck -y"),
            32,
        ),
        Case("mount-no-mountpoint", ("mount", vol, f"{d}/nodir"), ("does not exist",), 32),
        Case("mount-not-a-directory", ("mount", vol, str(s.junk)), ("not a directory",), 32),
        Case("mount-busy", ("mount", vol, str(s.mnt)), ("busy",), 32),
        Case(
            "mount-second-embedded-master",
            ("mount", vol, empty),
            ("already mounted by node 0", "--master"),
            32,
        ),
        Case(
            "mount-bad-address",
            ("mount", vol, empty, "--master", "127.0.0.1:99999"),
            ("bad port",),
            2,
        ),
        Case(
            "mount-unreachable-master",
            ("mount", vol, empty, "--master", s.closed, "--node", "5", *log),
            ("cannot reach master", "is it running?"),
            32,
        ),
        Case(
            "mount-not-a-master",
            ("mount", vol, empty, "--master", s.not_master, "--node", "6", *log),
            ("is it a sharedfs master (one run with --tls needs --tls here too)?",),
            32,
        ),
        Case(
            "mount-wrong-cluster-key",
            ("mount", other, empty, "--master", s.master, *log),
            ("cluster key", "master of another volume"),
            32,
        ),
        Case(
            "mount-slot-in-use",
            ("mount", vol, empty, "--master", s.master, "--node", "0"),
            ("host slot 0 is held by live node 0",),
        ),
        Case(
            "mount-node-out-of-range",
            ("mount", vol, empty, "--master", s.master, "--node", "99"),
            ("host slots 0..7",),
            2,
        ),
        Case(
            "mount-peer-address-any",
            ("mount", vol, empty, "--peer-address", "0.0.0.0"),
            ("the address the other hosts reach this one at",),
            2,
        ),
        Case(
            "mount-peer-address-not-here",
            (
                "mount",
                vol,
                empty,
                "--master",
                s.master,
                "--node",
                "4",
                "--peer-address",
                "192.0.2.1",
                *log,
            ),
            ("--peer-address 192.0.2.1:0: cannot listen", "an address of this machine"),
            32,
        ),
        Case("mount-node-not-a-number", ("mount", vol, empty, "--node", "x"), ("invalid int",), 2),
        Case(
            "mount-bad-cache-size", ("mount", vol, empty, "--cache-size", "12Q"), ("not a size",), 2
        ),
        Case(
            "mount-metrics-port-taken",
            ("mount", vol, empty, "--master", s.master, "--node", "7", "--metrics", s.master, *log),
            ("--metrics", "cannot listen", "another port"),
        ),
        Case(
            "helper-node-not-a-number",
            ("mount.sharedfs", vol, empty, "-o", f"master={s.master},node=abc"),
            ("invalid int value: 'abc'",),
            2,
        ),
        Case("helper-no-value", ("mount.sharedfs", vol, empty, "-o", "node"), ("node=",)),
        Case(
            "mount-peer-reads-with-disk",
            ("mount", vol, empty, "--coherence", "disk", "--peer-reads"),
            ("--peer-reads", "not with --coherence disk"),
            2,
        ),
        Case(
            "master-peer-reads-with-disk",
            ("master", vol, "--coherence", "disk", "--peer-reads"),
            ("--peer-reads", "not with --coherence disk"),
            2,
        ),
        # master
        Case("master-missing-volume", ("master", f"{d}/missing.img"), ("no such file",)),
        Case("master-junk", ("master", str(s.junk)), ("not a sharedfs volume",)),
        Case("master-bad-listen", ("master", vol, "--listen", "127.0.0.1:x"), ("bad port",), 2),
        Case(
            "master-port-taken",
            ("master", vol, "--listen", s.master),
            ("cannot listen", "another master running there?"),
        ),
        Case("master-bad-lease", ("master", vol, "--lease", "0"), ("--lease",), 2),
        Case(
            "master-metrics-port-taken",
            ("master", vol, "--listen", s.closed, "--metrics", s.master),
            ("--metrics", "cannot listen"),
        ),
        # status
        Case("status-missing-volume", ("status", f"{d}/missing.img"), ("no such file",)),
        Case("status-junk", ("status", str(s.junk)), ("not a sharedfs volume",)),
        Case(
            "status-unreachable-master",
            ("status", vol, "--master", s.closed),
            ("cannot reach master", "is it running?"),
        ),
        Case(
            "status-not-a-master",
            ("status", vol, "--master", s.not_master),
            ("is it a sharedfs master (one run with --tls needs --tls here too)?",),
        ),
        Case(
            "status-wrong-cluster-key",
            ("status", other, "--master", s.master),
            ("cluster key", "master of another volume"),
        ),
        Case("status-bad-address", ("status", vol, "--master", "h:p"), ("bad port",), 2),
        Case("status-bad-watch", ("status", vol, "--watch", "0"), ("--watch",), 2),
        # umount, fsck, journal
        Case("umount-not-mounted", ("umount", empty), ("no sharedfs volume is mounted there",)),
        Case("fsck-missing-volume", ("fsck", "-n", f"{d}/missing.img"), ("no such file",), 8),
        Case("fsck-junk", ("fsck", "-n", str(s.junk)), ("not a sharedfs volume",), 8),
        Case("fsck-mounted", ("fsck", "-n", vol), ("in use by node 0", "unmount it"), 8),
        Case("fsck-usage", ("fsck", "-n", "-y", vol), ("not allowed with",), 16),
        Case("journal-junk", ("journal", str(s.junk)), ("not a sharedfs volume",)),
        # inspect
        Case("inspect-junk", ("inspect", str(s.junk), "superblock"), ("not a sharedfs volume",)),
        Case(
            "inspect-damaged",
            ("inspect", str(s.damaged), "superblock"),
            ("damaged", "fsck -y"),
        ),
        Case("inspect-what", ("inspect", other, "frob"), ("invalid choice: 'frob'",), 2),
        Case("inspect-inode-missing", ("inspect", other, "inode"), ("which one?",), 2),
        Case("inspect-inode-not-a-number", ("inspect", other, "inode", "x"), ("not a number",), 2),
        Case(
            "inspect-inode-out-of-range",
            ("inspect", other, "inode", "99999999"),
            ("inode 99999999 is out of range", "inodes 1-"),
        ),
        Case("inspect-inode-free", ("inspect", other, "inode", "300"), ("inode 300 is free",)),
        Case("inspect-path-missing", ("inspect", other, "path", "/no/such"), ("no 'no' in /",)),
        Case(
            "inspect-path-through-a-file",
            ("inspect", other, "path", "/file/x"),
            ("/file is not a directory",),
        ),
        Case(
            "inspect-block-out-of-range",
            ("inspect", other, "block", "99999999"),
            ("block 99999999 is out of range", "blocks 0-"),
        ),
        # mirror
        Case("mirror-no-action", ("mirror",), ("required: ACTION",), 2),
        Case("mirror-bad-action", ("mirror", "frob", vol), ("invalid choice: 'frob'",), 2),
        Case("mirror-status-junk", ("mirror", "status", str(s.junk)), ("not a sharedfs volume",)),
        Case(
            "mirror-status-none",
            ("mirror", "status", other),
            ("has no secondary", f"sharedfs mirror attach {other} SECONDARY"),
        ),
        Case(
            "mirror-attach-mounted",
            ("mirror", "attach", vol, f"{d}/never.img"),
            ("mounted by node 0", "unmount every host"),
            32,
        ),
        Case("mirror-attach-itself", ("mirror", "attach", other, other), ("the volume itself",), 2),
        Case(
            "mirror-attach-too-small",
            ("mirror", "attach", other, str(s.junk)),
            ("holds 1048576 bytes", "the volume needs"),
        ),
        Case(
            "mirror-attach-another-volume",
            ("mirror", "attach", other, str(s.damaged)),
            ("holds another sharedfs volume", "--force"),
        ),
        Case(
            "mirror-attach-twice",
            ("mirror", "attach", str(s.mirrored), f"{d}/never.img"),
            ("already mirrored to", "detach"),
        ),
        Case(
            "mirror-resync-secondary-gone",
            ("mirror", "resync", str(s.mirrored)),
            ("secondary", "gone.img: no such file"),
        ),
        Case(
            "mirror-verify-secondary-gone",
            ("mirror", "verify", str(s.mirrored)),
            ("secondary", "gone.img: no such file"),
        ),
        Case("mirror-verify-none", ("mirror", "verify", vol), ("has no secondary",)),
        Case("mirror-detach-none", ("mirror", "detach", other), ("has no secondary",)),
        Case("mirror-promote-unmirrored", ("mirror", "promote", other), ("is not a secondary",)),
        Case(
            "mirror-promote-primary",
            ("mirror", "promote", str(s.mirrored)),
            ("is the primary of", "gone.img", "--force"),
        ),
        Case("mirror-resync-missing", ("mirror", "resync", f"{d}/missing.img"), ("no such file",)),
    ]


def not_a_master() -> tuple[str, threading.Event]:
    """A port that accepts connections and hangs up at once."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        with srv:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{srv.getsockname()[1]}", stop


async def put_file(volume: Path) -> None:
    storage = open_volume(str(volume))
    fs = open_host(storage, read_superblock(storage))
    await fs.create(fmt.ROOT_INO, b"file", stat.S_IFREG | 0o644, Ctx(0, 0))
    await fs.destroy()
    storage.close()


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    d = tmp_path_factory.mktemp("errors")
    vol, other, damaged = d / "vol.img", d / "other.img", d / "damaged.img"
    for v in (vol, other, damaged):
        mkfs(v, "64M")
    trio.run(put_file, other)
    with open(damaged, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    junk = d / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    mirrored = d / "mirrored.img"
    mkfs(mirrored, "64M")
    sharedfs("mirror", "attach", str(mirrored), str(d / "gone.img"))
    (d / "gone.img").unlink()
    (d / "empty").mkdir()
    master = Master(vol, d / "master.log")
    host = None
    not_master, stop = not_a_master()
    try:
        host = Mount(vol, public_dir() / "mnt", "--master", master.addr, "--node", "0")
        yield Scene(
            d,
            vol,
            master.addr,
            host.mnt,
            other,
            junk,
            damaged,
            d / "empty",
            f"127.0.0.1:{free_port()}",
            not_master,
            mirrored,
        )
    finally:
        stop.set()
        if host is not None:
            host.kill()
        master.stop()


def run_case(case: Case) -> subprocess.CompletedProcess[str]:
    if case.argv[0] == "mount.sharedfs":
        cmd = [HELPER, *case.argv[1:]]
    else:
        cmd = [PY, "-m", "sharedfs.cli", *case.argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def results(scene: Scene) -> dict[str, tuple[Case, subprocess.CompletedProcess[str]]]:
    todo = cases(scene)
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(run_case, todo))
    return {c.id: (c, r) for c, r in zip(todo, done, strict=True)}


# The ids, without building the scene: a scene of placeholders.
_IDS = [c.id for c in cases(Scene(*[Path("x")] * len(fields(Scene))))]  # type: ignore[arg-type]


@pytest.mark.parametrize("case_id", _IDS)
def test_user_error_is_one_line(results, case_id: str) -> None:  # type: ignore[no-untyped-def]
    case, r = results[case_id]
    assert r.returncode != 0, f"exit 0: {r.stdout}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for want in case.want:
        assert want in lines[0]
    assert r.stdout == ""
    if case.code is not None:
        assert r.returncode == case.code, lines[0]


def test_the_scene_survived(scene: Scene, results) -> None:  # type: ignore[no-untyped-def]
    """No failed command disturbed the cluster it failed against."""
    (scene.mnt / "after-errors").write_text("still here")
    assert (scene.mnt / "after-errors").read_text() == "still here"


def test_a_mount_that_failed_never_says_it_left_the_volume_clean(scene: Scene, results) -> None:  # type: ignore[no-untyped-def]
    """The failed mounts' log: each freed the slot it claimed, and says it
    stopped on an error, not that it unmounted a clean volume."""
    log = (scene.d / "failed-mount.log").read_text()
    assert "stopped on an error, slot freed" in log
    assert "volume clean" not in log
