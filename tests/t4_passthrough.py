"""tools/passthrough.py, the benchmarks' ceiling: what ordinary tools do
through its mount lands in the source directory, and `fusermount3 -u` (or
SIGTERM) ends it with exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_util import PY, needs_fuse, wait_for

pytestmark = [needs_fuse, pytest.mark.fuse]

TOOL = Path(__file__).resolve().parent.parent / "tools" / "passthrough.py"


class Passthrough:
    """A `passthrough.py --foreground` process mirroring `src` on `mnt`."""

    def __init__(self, src: Path, mnt: Path) -> None:
        self.src, self.mnt = src, mnt
        self.log = mnt.parent / "passthrough.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [PY, str(TOOL), str(src), str(mnt), "--foreground"],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

        def up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()
            return os.path.ismount(mnt)

        wait_for(up, timeout=10, what=f"passthrough on {mnt}")

    def end(self) -> None:
        """Require an exit 0, unmounted, with nothing logged as an error."""
        assert self.proc.wait(timeout=10) == 0, self.log.read_text()
        assert not os.path.ismount(self.mnt)
        text = self.log.read_text()
        assert "ERROR" not in text and "Traceback" not in text, text

    def umount(self) -> None:
        r = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        self.end()

    def kill(self) -> None:
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    return src, mnt


@pytest.fixture
def pt(tmp_path: Path) -> Iterator[Passthrough]:
    p = Passthrough(*dirs(tmp_path))
    yield p
    p.kill()


def test_files_and_names(pt: Passthrough) -> None:
    m, s = pt.mnt, pt.src
    (m / "f").write_bytes(b"hello world")
    assert (m / "f").read_bytes() == b"hello world"
    assert (s / "f").read_bytes() == b"hello world"

    (m / "d").mkdir()
    (m / "d" / "inner").write_bytes(b"in")
    os.rename(m / "f", m / "d" / "g")
    os.rename(m / "d", m / "e")  # the directory's inodes go along
    assert sorted(os.listdir(m)) == ["e"]
    assert sorted(os.listdir(m / "e")) == ["g", "inner"]
    assert (m / "e" / "inner").read_bytes() == b"in"
    assert sorted(os.listdir(s / "e")) == ["g", "inner"]

    os.truncate(m / "e" / "g", 5)
    assert (m / "e" / "g").read_bytes() == b"hello"
    assert os.stat(s / "e" / "g").st_size == 5

    os.symlink("e/g", m / "l")
    assert os.readlink(m / "l") == "e/g"
    assert (m / "l").read_bytes() == b"hello"
    os.link(m / "e" / "g", m / "h")
    assert os.stat(m / "h").st_nlink == 2

    os.unlink(m / "e" / "g")
    assert not (s / "e" / "g").exists()
    assert (m / "h").read_bytes() == b"hello"
    os.unlink(m / "e" / "inner")
    os.rmdir(m / "e")
    assert sorted(os.listdir(s)) == ["h", "l"]
    pt.umount()


def small_archive(path: Path, tree: Path) -> None:
    """A tar of a few files and directories, a symlink and a hard link, with
    modes and times of their own (tar -x sets them: chmod and utimens)."""
    (tree / "a" / "b").mkdir(parents=True)
    for i in range(20):
        (tree / "a" / f"f{i}").write_bytes(os.urandom(i * 997))
    (tree / "a" / "b" / "big").write_bytes(os.urandom(300_000))
    (tree / "a" / "b" / "big").chmod(0o640)
    os.symlink("b/big", tree / "a" / "link")
    os.link(tree / "a" / "f3", tree / "a" / "hard")
    os.utime(tree / "a" / "f1", (1_000_000, 2_000_000))
    with tarfile.open(path, "w") as tar:
        tar.add(tree / "a", arcname="a")


def test_tar(pt: Passthrough, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    archive = tmp_path / "t.tar"
    small_archive(archive, tree)

    def sh(*cmd: str | Path) -> None:
        subprocess.run([str(c) for c in cmd], check=True, capture_output=True)

    (pt.mnt / "x").mkdir()
    sh("tar", "-xf", archive, "-C", pt.mnt / "x")
    # The reference: the same archive extracted on the source side.
    (pt.src / "ref").mkdir()
    sh("tar", "-xf", archive, "-C", pt.src / "ref")
    sh("diff", "-r", "--no-dereference", pt.mnt / "x", pt.src / "ref")
    sh("diff", "-r", "--no-dereference", pt.src / "x", pt.src / "ref")
    sh("tar", "-df", archive, "-C", pt.mnt / "x")  # modes, times, links as archived
    pt.umount()


def test_sigterm_unmounts(pt: Passthrough) -> None:
    (pt.mnt / "f").write_bytes(b"x")
    pt.proc.send_signal(signal.SIGTERM)
    pt.end()
    assert (pt.src / "f").read_bytes() == b"x"


def test_background(tmp_path: Path) -> None:
    """Without --foreground it returns 0 once the mount is up."""
    src, mnt = dirs(tmp_path)
    r = subprocess.run([PY, str(TOOL), str(src), str(mnt)], capture_output=True, timeout=10)
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
        (mnt / "f").write_bytes(b"x")
        assert (src / "f").read_bytes() == b"x"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    wait_for(lambda: not os.path.ismount(mnt), timeout=10, what="unmount")
