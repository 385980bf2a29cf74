"""sharedfs as the system's own tools mount it: util-linux mount(8) with -t
and with an fstab, umount(8), and systemd (unit files, READY=1, SIGTERM).

mount(8) runs /sbin/mount.sharedfs, which tools/setup installs; that shim
honours SHAREDFS_VENV, so these tests run this checkout's code whichever
checkout on the machine installed it last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_util import (
    PY,
    Mount,
    free_port,
    fsck_ok,
    mkfs,
    needs_fuse,
    public_dir,
    sharedfs,
    wait_for,
)

pytestmark = [
    needs_fuse,
    pytest.mark.fuse,
    pytest.mark.skipif(
        os.getuid() != 0 or not shutil.which("mount"), reason="needs root and util-linux mount"
    ),
]

REPO = Path(__file__).resolve().parent.parent
HELPER = Path("/sbin/mount.sharedfs")
VENV = Path(sys.prefix)


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    """The environment for mount(8): SHAREDFS_VENV names this checkout.  A
    missing or older helper is replaced for the module's duration."""
    old = HELPER.read_bytes() if HELPER.exists() else None
    replaced = old is None or b"SHAREDFS_VENV" not in old
    if replaced:
        shim = (REPO / "mount" / "mount.sharedfs").read_text().replace("@VENV@", str(VENV))
        _install(shim.encode())
    yield {**os.environ, "SHAREDFS_VENV": str(VENV)}
    if replaced and old is None:
        HELPER.unlink()
    elif replaced:
        assert old is not None
        _install(old)


def _install(data: bytes) -> None:
    new = HELPER.parent / "mount.sharedfs.new"
    new.write_bytes(data)
    new.chmod(0o755)
    new.rename(HELPER)


def run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def mounted_type(mnt: Path) -> str:
    """The filesystem type mountinfo gives `mnt`, or ''."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == str(mnt):
                return right.split()[0]
    return ""


def slot_live(vol: Path, node: int) -> bool:
    hosts = json.loads(sharedfs("status", str(vol), "--json").stdout)["hosts"]
    return any(h["node"] == node and h["live"] for h in hosts)


def lazy_unmount(*mnts: Path) -> None:
    for m in mnts:
        if os.path.ismount(m):
            subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)


def test_mount_t_sharedfs_then_umount(tmp_path: Path, env: dict[str, str]) -> None:
    vol = tmp_path / "v.img"
    mkfs(vol, "64M")
    mnt = public_dir() / "m"
    mnt.mkdir()
    log = tmp_path / "host.log"
    try:
        r = run("mount", "-t", "sharedfs", str(vol), str(mnt), "-o", f"node=3,log={log}", env=env)
        assert r.returncode == 0, r.stderr
        assert mounted_type(mnt) == "fuse.sharedfs"  # live when mount(8) returns
        assert slot_live(vol, 3)
        (mnt / "f").write_text("through mount(8)")
        r = run("umount", str(mnt))
        assert r.returncode == 0, r.stderr
        # umount(8) returns once the kernel lets go; the host then writes back.
        wait_for(lambda: not slot_live(vol, 3), what="the host to write back and leave")
    finally:
        lazy_unmount(mnt)
    assert "volume clean" in log.read_text()
    fsck_ok(vol)
    assert "size 16," in sharedfs("inspect", str(vol), "path", "/f").stdout


def test_fstab_with_netdev_mounts_two_hosts(tmp_path: Path, env: dict[str, str]) -> None:
    """An fstab (never /etc/fstab) through `mount --fstab`: host 0 embeds the
    master, host 1 joins it."""
    vol = tmp_path / "v.img"
    mkfs(vol, "64M")
    pub = public_dir()
    m0, m1 = pub / "h0", pub / "h1"
    m0.mkdir()
    m1.mkdir()
    port = free_port()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# sharedfs on two hosts of one machine\n"
        f"{vol} {m0} sharedfs _netdev,node=0,listen=127.0.0.1:{port},"
        f"log={tmp_path / 'h0.log'} 0 0\n"
        f"{vol} {m1} sharedfs _netdev,master=127.0.0.1:{port},node=1,"
        f"log={tmp_path / 'h1.log'},noauto 0 0\n"
    )
    try:
        r = run("mount", "--fstab", str(fstab), "-a", env=env)  # noauto: not host 1
        assert r.returncode == 0, r.stderr
        assert mounted_type(m0) == "fuse.sharedfs" and not os.path.ismount(m1)
        r = run("mount", "--fstab", str(fstab), str(m1), env=env)  # by its mountpoint
        assert r.returncode == 0, r.stderr
        assert mounted_type(m1) == "fuse.sharedfs"
        (m0 / "hello").write_text("from host 0")
        assert (m1 / "hello").read_text() == "from host 0"
        for m in (m1, m0):  # the host running the master last
            sharedfs("umount", str(m))
    finally:
        lazy_unmount(m1, m0)
    fsck_ok(vol)


def test_mount_helper_errors_are_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    vol = tmp_path / "v.img"
    mkfs(vol, "64M")
    mnt = tmp_path / "m"
    mnt.mkdir()
    for opts, want in (
        ("node=abc", "invalid int value: 'abc'"),
        ("master", "-o master: give a value"),
        ("master=127.0.0.1:1", "cannot reach master 127.0.0.1:1"),
    ):
        r = run("mount", "-t", "sharedfs", str(vol), str(mnt), "-o", opts, env=env)
        assert r.returncode != 0 and not os.path.ismount(mnt)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and want in lines[0], r.stderr


def test_sigterm_during_write_back_after_umount_still_ends_clean(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """systemd stops an fstab mount with umount(8), then SIGTERM to what is
    left in the unit: the host writing back must finish, not die."""
    vol = tmp_path / "v.img"
    mkfs(vol, "256M")
    mnt = public_dir() / "m"
    mnt.mkdir()
    log = tmp_path / "host.log"
    data = os.urandom(1 << 20) * 40
    try:
        r = run(
            "mount",
            "-t",
            "sharedfs",
            str(vol),
            str(mnt),
            "-o",
            f"writeback=600,log={log}",
            env=env,
        )
        assert r.returncode == 0, r.stderr
        (mnt / "big").write_bytes(data)  # dirty in the cache: nothing written back yet
        pid = json.loads(sharedfs("status", str(vol), "--json").stdout)["hosts"][0]["pid"]
        assert run("umount", str(mnt)).returncode == 0
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not slot_live(vol, 0), timeout=120, what="the host to leave")
    finally:
        lazy_unmount(mnt)
    assert "volume clean" in log.read_text()
    fsck_ok(vol)  # no log left to replay: it wrote everything back
    m = Mount(vol, tmp_path / "again")
    try:
        assert (m.mnt / "big").read_bytes() == data
    finally:
        m.umount()


# -- systemd ----------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
@pytest.mark.parametrize(
    "unit, instance",
    [("sharedfs-master@.service", "dev-sdb"), ("sharedfs-mount@.service", "mnt-shared")],
)
def test_systemd_units_verify(tmp_path: Path, unit: str, instance: str) -> None:
    text = (REPO / "mount" / unit).read_text()
    assert "/usr/local/bin/sharedfs " in text
    # Where the docs have the sharedfs command installed: here, this checkout's.
    (tmp_path / unit).write_text(text.replace("/usr/local/bin/sharedfs ", f"{VENV}/bin/sharedfs "))
    name = unit.replace("@.", f"@{instance}.")
    r = run("systemd-analyze", "verify", str(tmp_path / name))
    assert r.returncode == 0 and r.stderr == "", r.stderr


def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)
    return sock


def test_master_and_foreground_mount_tell_systemd_when_ready(tmp_path: Path) -> None:
    """Type=notify: READY=1 only once the master listens and the mount is live."""
    vol = tmp_path / "v.img"
    mkfs(vol, "64M")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    with notify_socket(tmp_path) as sock:
        master = subprocess.Popen(
            [PY, "-m", "sharedfs.cli", "master", str(vol), "--listen", "127.0.0.1:0"],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert sock.recv(100) == b"READY=1"
        finally:
            master.terminate()
            assert master.wait(timeout=30) == 0
        mnt = public_dir() / "m"
        mnt.mkdir()
        host = subprocess.Popen(
            [PY, "-m", "sharedfs.cli", "mount", "--foreground", str(vol), str(mnt)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert sock.recv(100) == b"READY=1"
            assert os.path.ismount(mnt)
        finally:
            host.terminate()  # as systemctl stop does
            assert host.wait(timeout=60) == 0
            lazy_unmount(mnt)
    fsck_ok(vol)
