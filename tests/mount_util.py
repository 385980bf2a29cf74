"""Real mounts for tests: each host is a `sharedfs mount --foreground` process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PY = sys.executable

needs_fuse = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3")),
    reason="needs /dev/fuse and fusermount3",
)


def public_dir() -> Path:
    """A fresh directory every user can traverse (pytest's tmp tree is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="sharedfs-test-"))
    d.chmod(0o755)
    return d


def sharedfs(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the `sharedfs` command line as a user would."""
    r = subprocess.run(
        [PY, "-m", "sharedfs.cli", *args], capture_output=True, text=True, timeout=600, **kw
    )
    if check and r.returncode:
        raise AssertionError(f"sharedfs {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


def mkfs(volume: Path | str, size: str = "256M", *extra: str) -> None:
    sharedfs("mkfs", str(volume), "--size", size, "-q", *extra)


def fsck_ok(volume: Path | str) -> None:
    r = sharedfs("fsck", "-n", str(volume), check=False)
    assert r.returncode == 0, f"fsck -n exited {r.returncode}:\n{r.stdout}{r.stderr}"


def wait_for(pred, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Master:
    """A standalone `sharedfs master` process, listening once constructed."""

    def __init__(self, volume: Path | str, log: Path, *args: str) -> None:
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.log = log
        self._cmd = [PY, "-m", "sharedfs.cli", "master", str(volume), "--listen", self.addr, *args]
        self._start("w")

    def _start(self, mode: str) -> None:
        with open(self.log, mode) as f:
            self.proc = subprocess.Popen(self._cmd, stdout=subprocess.DEVNULL, stderr=f)

        def listening() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, what="master")

    def kill(self) -> None:
        """kill -9: it stops at once, its connections drop."""
        self.proc.kill()
        self.proc.wait()

    def start_again(self) -> None:
        """The same master, knowing nothing, on the same port."""
        self._start("a")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


class Mount:
    """One host: a foreground mount process and its mountpoint."""

    def __init__(self, volume: Path | str, mnt: Path, *args: str) -> None:
        self.volume = volume
        self.mnt = mnt
        mnt.mkdir(exist_ok=True)
        self.log = mnt.parent / f"{mnt.name}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "sharedfs.cli", "mount", "--foreground", str(volume), str(mnt), *args],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"mount exited {self.proc.returncode}: {self.log.read_text()}")
            return os.path.ismount(mnt)

        wait_for(up, what=f"mount on {mnt}")

    def umount(self) -> None:
        """Unmount the way a user does and require a clean exit."""
        r = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert self.proc.wait(timeout=120) == 0, self.log.read_text()
        for line in self.log.read_text().splitlines():
            if "fuse_reply_* failed with No such file or directory" in line:
                # pyfuse3's line for a reply the kernel no longer waits for:
                # a release still being answered as the unmount lands.
                continue
            assert " ERROR " not in line and "Traceback" not in line, line

    def kill(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
