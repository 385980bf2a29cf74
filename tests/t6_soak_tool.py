"""tools/torture soak in the suite: a short soak on real mounts (three hosts,
two workers each) must end with no error, and work done on every side;
and the workers' model, run on a local filesystem, must agree with it and
catch a byte changed behind its back."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_util import needs_fuse, public_dir

TOOLS = Path(__file__).resolve().parent.parent / "tools"

_spec = importlib.util.spec_from_file_location("soak_worker", TOOLS / "soak_worker.py")
assert _spec is not None and _spec.loader is not None
sw = importlib.util.module_from_spec(_spec)
sys.modules["soak_worker"] = sw  # its dataclasses look themselves up there
_spec.loader.exec_module(sw)

#: The soak's own deadline is 15 s; setting up, unmounting, fsck and the
#: fresh mount's read back take the rest, more on a loaded machine.
SOAK_TIMEOUT = 240


def soak(*args: str) -> dict:  # type: ignore[type-arg]
    """Run `tools/torture soak ARGS --json`; its report."""
    cmd = [sys.executable, str(TOOLS / "torture.py"), "soak", *args, "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=SOAK_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the soak takes its cluster down on SIGTERM
        out, err = proc.communicate(timeout=120)
        raise AssertionError(f"soak still running after {SOAK_TIMEOUT} s:\n{out}{err}") from None
    assert proc.returncode == 0, f"soak exited {proc.returncode}:\n{out}{err}"
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


@needs_fuse
@pytest.mark.fuse
@pytest.mark.slow
def test_a_short_soak_on_three_hosts_ends_with_no_error() -> None:
    r = soak("--seconds", "15", "--tasks", "2", "--dir", str(public_dir()))
    assert r["errors"] == 0, r["first_errors"]
    assert r["ops_total"] > 100  # that it ran; how much depends on the machine's load
    assert r["cross_host"]["total"] > 0
    assert r["final"]["clean"] and r["final"]["dirs"] == 6
    assert r["memory"]["within_budget"]


#: The workers chmod files read-only and go on writing them, as root may.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the workers write read-only files")


@pytest.fixture
def umask0() -> Iterator[None]:
    """As the worker's main() sets it: modes exactly as asked."""
    old = os.umask(0)
    yield
    os.umask(old)


def worker(top: Path, seed: int) -> sw.Worker:
    """A worker on a plain directory, as if `top` were a host's mountpoint."""
    for sub in (sw.SHARED, "work", f"work/{sw.FEEDS}", f"work/{sw.STATS}", f"work/{sw.MODELS}"):
        (top / sub).mkdir()
    args = argparse.Namespace(mnt=str(top), name="h0-t0", work=str(top / "work"), seed=seed)
    return sw.Worker(args)


@needs_root
def test_the_workers_model_agrees_with_a_local_filesystem(tmp_path: Path, umask0: None) -> None:
    w = worker(tmp_path, seed=5)
    w.run(2.0, skip=set())
    assert w.n_errors == 0, w.errors
    assert w.ops["write"] and w.ops["rename"] and w.ops["verify"]
    manifest = json.loads((tmp_path / "work" / sw.MODELS / "h0-t0.json").read_text())
    assert sw.manifest_diff(manifest, sw.disk_manifest(w.root)) is None


@needs_root
def test_the_worker_reports_a_byte_changed_behind_its_back(tmp_path: Path, umask0: None) -> None:
    w = worker(tmp_path, seed=6)
    w.run(1.0, skip=set())
    rel = next(rel for rel, n in sw.model_manifest(w.tree).items() if n[0] == "f" and n[1])
    with open(os.path.join(w.root, rel), "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 1]))
    w.guarded("verify", w.op_verify)
    assert w.n_errors == 1 and rel in w.errors[0], w.errors
