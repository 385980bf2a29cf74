"""The command line as users meet it: mistakes get one line and a non-zero exit."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
from pathlib import Path

import pytest
from mount_util import PY, Mount, fsck_ok, mkfs, needs_fuse, sharedfs, wait_for


def one_line_error(r, code: int | None = None) -> str:  # type: ignore[no-untyped-def]
    assert r.returncode != 0, r.stdout
    if code is not None:
        assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_mkfs_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    vol = tmp_path / "v.img"
    mkfs(vol, "64M", "--label", "first")
    msg = one_line_error(sharedfs("mkfs", str(vol), "--size", "64M", check=False))
    assert "already holds a sharedfs volume" in msg and "--force" in msg
    sharedfs("mkfs", str(vol), "--size", "64M", "--force", "--label", "second", "-q")
    status = json.loads(sharedfs("status", str(vol), "--json").stdout)
    assert status["label"] == "second"


def test_mkfs_errors(tmp_path: Path) -> None:
    msg = one_line_error(sharedfs("mkfs", str(tmp_path / "tiny"), "--size", "100K", check=False))
    assert "too small" in msg
    msg = one_line_error(sharedfs("mkfs", str(tmp_path / "nosize"), check=False))
    assert "--size" in msg
    msg = one_line_error(
        sharedfs("mkfs", str(tmp_path / "bs"), "--size", "64M", "--block-size", "3000", check=False)
    )
    assert "block size" in msg


def test_mkfs_makes_a_large_sparse_volume_quickly(tmp_path: Path) -> None:
    vol = tmp_path / "big.img"
    r = sharedfs("mkfs", str(vol), "--size", "1T")
    assert "268435456 blocks" in r.stdout
    assert vol.stat().st_size == 1 << 40
    assert vol.stat().st_blocks * 512 < 200 << 20  # metadata only, the rest stays sparse


def test_unknown_command() -> None:
    r = sharedfs("frobnicate", check=False)
    assert r.returncode == 2 and "unknown command" in r.stderr


@needs_fuse
def test_mount_errors(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    msg = one_line_error(sharedfs("mount", str(junk), str(mnt), check=False))
    assert "not a sharedfs volume" in msg
    msg = one_line_error(sharedfs("mount", str(tmp_path / "missing.img"), str(mnt), check=False))
    assert "no such file" in msg
    vol = tmp_path / "v.img"
    mkfs(vol, "64M")
    msg = one_line_error(sharedfs("mount", str(vol), str(tmp_path / "nodir"), check=False))
    assert "does not exist" in msg
    # A damaged primary superblock: refuse, and say how to repair.
    with open(vol, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 16)
    msg = one_line_error(sharedfs("mount", str(vol), str(mnt), check=False))
    assert "damaged" in msg and "fsck" in msg


@needs_fuse
def test_background_mount_busy_mountpoint_second_host_joins_and_umount(tmp_path: Path) -> None:
    vol = tmp_path / "v.img"
    mkfs(vol, "64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "host.log"
    r = sharedfs("mount", str(vol), str(mnt), "--log", str(log))
    assert r.returncode == 0 and os.path.ismount(mnt)  # live when the command returns
    try:
        (mnt / "f").write_text("x")
        msg = one_line_error(sharedfs("mount", str(vol), str(mnt), check=False))
        assert "busy" in msg
        # A second host without --master joins the master the first runs,
        # which it finds in the first's slot.
        other = tmp_path / "other"
        other.mkdir()
        sharedfs("mount", str(vol), str(other), "--log", str(tmp_path / "other.log"))
        assert (other / "f").read_text() == "x"
        assert "joining the master that node 0 runs" in (tmp_path / "other.log").read_text()
        st = json.loads(sharedfs("status", str(vol), "--json").stdout)
        assert [(h["node"], h["live"], h["mountpoint"]) for h in st["hosts"]] == [
            (0, True, str(mnt)),
            (1, True, str(other)),
        ]
        published = st["hosts"][0]["runs_master"]
        assert published.startswith("127.0.0.1:") and st["hosts"][1]["runs_master"] == ""
        # Without --master, status asks the master the volume names.
        assert st["master"]["address"] == published and set(st["master"]["hosts"]) == {"0", "1"}
        assert f"master {published}: coherence fusion" in sharedfs("status", str(vol)).stdout
        sharedfs("umount", str(other))
        sharedfs("umount", str(mnt))
    finally:
        for m in (tmp_path / "other", mnt):
            if os.path.ismount(m):
                sharedfs("umount", "-z", str(m), check=False)
    assert not os.path.ismount(mnt)
    st = json.loads(sharedfs("status", str(vol), "--json").stdout)
    assert st["hosts"][0]["live"] is False and st["hosts"][0]["runs_master"] == ""
    assert "node0" in log.read_text()  # log lines carry the host id
    fsck_ok(vol)


@needs_fuse
def test_sigterm_unmounts_cleanly(tmp_path: Path) -> None:
    vol = tmp_path / "v.img"
    mkfs(vol, "64M")
    m = Mount(vol, tmp_path / "mnt")
    (m.mnt / "data").write_bytes(b"z" * 100_000)
    m.proc.terminate()
    assert m.proc.wait(timeout=60) == 0
    wait_for(lambda: not os.path.ismount(m.mnt), what="unmount")
    fsck_ok(vol)
    m2 = Mount(vol, tmp_path / "mnt")
    assert (m2.mnt / "data").read_bytes() == b"z" * 100_000
    m2.umount()


@needs_fuse
def test_full_volume_gives_enospc_and_stays_usable(tmp_path: Path) -> None:
    vol = tmp_path / "small.img"
    mkfs(vol, "32M")
    m = Mount(vol, tmp_path / "mnt")
    try:
        chunk = os.urandom(1 << 20)
        with pytest.raises(OSError) as e, open(m.mnt / "fill", "wb") as f:
            for _ in range(64):
                f.write(chunk)
                f.flush()
        assert e.value.errno == 28  # ENOSPC
        assert os.statvfs(m.mnt).f_bfree < 64
        (m.mnt / "fill").unlink()
        (m.mnt / "after").write_bytes(chunk)
        assert (m.mnt / "after").read_bytes() == chunk
    finally:
        m.umount()
    fsck_ok(vol)


def on_a_terminal(*args: str) -> str:
    """Run `sharedfs ARGS` with stderr on a pseudo-terminal; what it drew there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [PY, "-m", "sharedfs.cli", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=120) == 0
    return out.decode(errors="replace")


def test_progress_bars_on_a_terminal_only(tmp_path: Path) -> None:
    piped = sharedfs("mkfs", str(tmp_path / "a.img"), "--size", "64G")
    assert piped.stderr == ""
    drawn = on_a_terminal("mkfs", str(tmp_path / "b.img"), "--size", "64G")
    assert "mkfs:   0%" in drawn and re.search(r"mkfs: 100%.* (\d+)/\1 ", drawn)
    assert "fsck: inode tables: 100%" in on_a_terminal("fsck", "-n", str(tmp_path / "b.img"))
    assert "100%" not in sharedfs("fsck", "-n", str(tmp_path / "b.img")).stderr
