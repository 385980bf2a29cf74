"""tools/demo, the README's first command, end to end: it leaves its cluster
running, a second run stops the first one, and --stop ends it clean."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from mount_util import needs_fuse, public_dir

pytestmark = [needs_fuse, pytest.mark.fuse]

DEMO = Path(__file__).resolve().parent.parent / "tools" / "demo"


def demo(d: Path, *args: str) -> str:
    env = {**os.environ, "SHAREDFS_DEMO_DIR": str(d)}
    r = subprocess.run(
        [str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, f"tools/demo {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
    return r.stdout


def hosts_mounted(d: Path) -> list[bool]:
    return [os.path.ismount(d / f"host{n}") for n in range(3)]


def test_demo_runs_twice_and_stops_clean() -> None:
    d = public_dir() / "demo"
    try:
        out = demo(d)
        assert "host 1 reads: written on host 0" in out
        assert "host 2 reads: written on host 0" in out
        assert "appended on host 2" in out.split("host 0 reads:")[1]
        assert "diff -r on host 1: identical" in out
        rows = re.findall(r"^([0-2]) +live ", out, re.M)
        assert rows == ["0", "1", "2"]  # the status table
        assert hosts_mounted(d) == [True, True, True]  # left running
        assert "tools/demo --stop" in out
        again = demo(d)
        assert "a demo is still running" in again and "is clean" in again
        assert hosts_mounted(d) == [True, True, True]
        stopped = demo(d, "--stop")
        assert "master stopped" in stopped and "is clean" in stopped
        assert hosts_mounted(d) == [False, False, False]
        assert "none is running" in demo(d, "--stop")
    finally:
        for n in range(3):
            if os.path.ismount(d / f"host{n}"):
                subprocess.run(["fusermount3", "-u", "-z", str(d / f"host{n}")])
        pid = d / "master.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGTERM)
