"""sharedfs on one host beside its two ceilings, in one run (issue #9).

Owns the three targets (sharedfs on an image file; tools/passthrough.py, a
minimal pyfuse3 passthrough, over a directory; the kernel's ext4 on a loop
image), all on the same disk, and the workloads run on each: sequential and
random I/O, small files, metadata, and a macro run of ordinary tools (tar,
find, cat, rm) on a copy of a source tree; made for tools/bench.py to import.

    python tools/bench_fs.py [--repeat N]

runs every workload on every target N times, interleaved, and prints the
medians with the ratios sharedfs / passthrough and sharedfs / ext4.
Every workload's unit is "higher is better", so every ratio reads the same
way: below 1, sharedfs is slower.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

TOP = Path(__file__).resolve().parent.parent
PY = sys.executable
PASSTHROUGH = TOP / "tools" / "passthrough.py"

MiB = 1 << 20
IMAGE_BYTES = 1 << 30
SEQ_MIB = 256
RANDOM_OPS = 3000
SMALL_FILES = 2000
SMALL_BYTES = 4096
META_FILES = 5000
#: The macro run's tree: ~1,400 files, ~54 MB, there on every Debian machine.
SOURCE = Path("/usr/lib/python3.11")
MOUNT_WAIT = 30.0

TARGETS = ("sharedfs", "passthrough", "ext4")


# -- targets -----------------------------------------------------------------------


def run(*cmd: str) -> str:
    """A command's stdout; its stderr in the error if it fails."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def sfs(*args: str) -> str:
    return run(PY, "-m", "sharedfs.cli", *args)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def drop_caches() -> None:
    """Empty the kernel's page, dentry and inode caches (written back first):
    the passthrough's files and the image files would stay cached otherwise."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Mount:
    """A target, mounted at `path`, its bytes in `store` (an image file or
    a directory); `cold()` makes the next reads cold."""

    def __init__(self, path: Path, store: Path) -> None:
        self.path, self.store = path, store
        remove(store)  # fresh, whatever a run cut short left there

    def up(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        """Unmount when `down` could not: lazily, so it goes once unused."""
        raise NotImplementedError

    def cold(self) -> None:
        """Unmount (everything written back, every cache of the filesystem
        gone), drop the kernel's caches, mount again."""
        self.down()
        drop_caches()
        self.up()

    def close(self) -> None:
        """Unmounted, whatever happened before."""
        if not is_mounted(self.path):
            return
        try:
            self.down()
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"bench_fs: {self.path}: {e}; detaching lazily", file=sys.stderr)
            self.detach()


class Sharedfs(Mount):
    """A fresh 1 GiB image file, one host with its embedded master, default options."""

    def __init__(self, path: Path, work: Path) -> None:
        super().__init__(path, work / "sharedfs.img")
        self.log = work / "sharedfs.log"
        sfs("mkfs", str(self.store), "--size", f"{IMAGE_BYTES // MiB}M", "-q")

    def up(self) -> None:
        sfs("mount", str(self.store), str(self.path), "--log", str(self.log))

    def down(self) -> None:
        sfs("umount", str(self.path))  # returns once the host has written back

    def detach(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)


class Passthrough(Mount):
    """tools/passthrough.py over a fresh directory on the same disk.  Run in
    the foreground, so that its process is ours to wait for and to end."""

    def __init__(self, path: Path, work: Path) -> None:
        super().__init__(path, work / "passthrough-src")
        self.log = work / "passthrough.log"
        self.store.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, str(PASSTHROUGH), str(self.store), str(self.path), "--foreground"],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + MOUNT_WAIT
        while not is_mounted(self.path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"passthrough did not mount; see {self.log}")
            time.sleep(0.02)

    def down(self) -> None:
        run("fusermount3", "-u", str(self.path))
        # It exits once the kernel ends the session: not still closing its
        # files while the next workload runs.
        if self.proc is not None:
            self.proc.wait(timeout=MOUNT_WAIT)
            self.proc = None

    def detach(self) -> None:
        self.stop()  # SIGTERM: it unmounts itself
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        super().close()
        self.stop()  # one that never mounted, too


class Ext4(Mount):
    """A fresh 1 GiB image file, mkfs.ext4, `mount -o loop` (umount frees the loop)."""

    def __init__(self, path: Path, work: Path) -> None:
        super().__init__(path, work / "ext4.img")
        with open(self.store, "wb") as f:
            f.truncate(IMAGE_BYTES)
        # Inode tables and journal zeroed now, not by ext4lazyinit in the
        # background of the first workloads.
        run(
            "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.store)
        )

    def up(self) -> None:
        run("mount", "-o", "loop", str(self.store), str(self.path))

    def down(self) -> None:
        run("umount", str(self.path))

    def detach(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


KINDS: dict[str, Callable[[Path, Path], Mount]] = {
    "sharedfs": Sharedfs,
    "passthrough": Passthrough,
    "ext4": Ext4,
}


@contextmanager
def target(kind: str, work: Path) -> Iterator[Mount]:
    """A fresh target of `kind` in `work`, mounted; unmounted and removed
    afterwards, even when a workload fails."""
    work = work.resolve()  # as /proc/self/mountinfo names mountpoints
    mnt = work / f"{kind}-mnt"
    mnt.mkdir(exist_ok=True)
    m = KINDS[kind](mnt, work)
    try:
        m.up()
        yield m
    finally:
        m.close()
        if not is_mounted(mnt):  # a lazily detached one is gone from here too
            remove(m.store)


# -- workloads ---------------------------------------------------------------------
# The I/O ones follow tools/bench.py's; importing them from there would be an
# import cycle once bench.py imports this module.


@dataclass(frozen=True)
class Tree:
    """The macro run's source tree, as a tarball in memory."""

    tar: bytes
    files: int
    mb: float


def source_tree(work: Path) -> Tree:
    """The tarball of SOURCE, made once per work directory and then reused:
    every target extracts the same bytes."""
    tarball = work / f"{SOURCE.name}.tar"
    if not tarball.exists():
        run("tar", "-cf", str(tarball), "-C", str(SOURCE.parent), SOURCE.name)
    with tarfile.open(tarball) as t:
        files = [m for m in t.getmembers() if m.isreg()]
    return Tree(tarball.read_bytes(), len(files), sum(m.size for m in files) / 1e6)


def timed(fn: Callable[[], float]) -> float:
    """Units of work per second: fn returns how many it did."""
    t0 = time.monotonic()
    n = fn()
    return n / (time.monotonic() - t0)


def seq_write(path: Path) -> float:
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(SEQ_MIB):
            os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return SEQ_MIB * MiB / 1e6


def seq_read(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        while data := os.read(fd, MiB):
            n += len(data)
    finally:
        os.close(fd)
    return n / 1e6


def offsets() -> list[int]:
    rng = random.Random(5)  # the same blocks on every target
    return [rng.randrange(SEQ_MIB * MiB // 4096) * 4096 for _ in range(RANDOM_OPS)]


def rand_write(path: Path) -> float:
    fd = os.open(path, os.O_WRONLY)
    block = os.urandom(4096)
    try:
        for off in offsets():
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return RANDOM_OPS


def rand_read(path: Path) -> float:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
    try:
        for off in offsets():
            os.preadv(fd, [buf], off)
    finally:
        os.close(fd)
        buf.close()
    return RANDOM_OPS


def make_files(d: Path, count: int, size: int, fsync: bool) -> float:
    d.mkdir()
    data = os.urandom(size)
    for i in range(count):
        fd = os.open(d / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        if data:
            os.write(fd, data)
        if fsync and i == count - 1:
            os.fsync(fd)  # sharedfs: the log, and with it every file before
        os.close(fd)
    return count


def read_files(d: Path, count: int) -> float:
    for i in range(count):
        fd = os.open(d / f"f{i}", os.O_RDONLY)
        while os.read(fd, MiB):
            pass
        os.close(fd)
    return count


def stat_files(d: Path, count: int) -> float:
    for i in range(count):
        os.stat(d / f"f{i}")
    return count


def list_dir(d: Path, count: int) -> float:
    if (n := len(os.listdir(d))) != count:
        raise RuntimeError(f"{d}: {n} entries, not {count}")
    return count


def unlink_files(d: Path, count: int) -> float:
    for i in range(count):
        os.unlink(d / f"f{i}")
    return count


def shell(cmd: str, cwd: Path, stdin: bytes | None = None) -> bytes:
    return subprocess.run(
        cmd, shell=True, cwd=cwd, input=stdin, capture_output=True, check=True
    ).stdout


def untar(root: Path, tree: Tree) -> float:
    shell("tar -xf -", root, tree.tar)  # from memory: no target reads the tarball
    return tree.files


def find_files(root: Path, tree: Tree) -> float:
    n = int(shell("find . -type f | wc -l", root / SOURCE.name))
    if n != tree.files:
        raise RuntimeError(f"find counted {n} files, not {tree.files}")
    return n


def cat_files(root: Path, tree: Tree) -> float:
    shell("find . -type f -exec cat {} + > /dev/null", root / SOURCE.name)
    return tree.mb


def remove_tree(root: Path, tree: Tree) -> float:
    shell(f"rm -rf {SOURCE.name}", root)
    return tree.files


class Step(NamedTuple):
    name: str
    unit: str
    cold: bool  # cold() just before it
    run: Callable[[Path, Tree], float]  # (mountpoint, tree) -> units of work done


#: In the order run_all runs them, each on what the ones before left.
STEPS = (
    Step("seq write 1 MiB", "MB/s", False, lambda r, t: seq_write(r / "big")),
    Step("rand write 4 KiB", "IOPS", False, lambda r, t: rand_write(r / "big")),
    Step("seq read 1 MiB, cold", "MB/s", True, lambda r, t: seq_read(r / "big")),
    Step("rand read 4 KiB O_DIRECT, cold", "IOPS", True, lambda r, t: rand_read(r / "big")),
    Step(
        "small files: write 4 KiB",
        "files/s",
        False,
        lambda r, t: make_files(r / "small", SMALL_FILES, SMALL_BYTES, True),
    ),
    Step(
        "small files: read, cold",
        "files/s",
        True,
        lambda r, t: read_files(r / "small", SMALL_FILES),
    ),
    Step(
        "metadata: create",
        "ops/s",
        False,
        lambda r, t: make_files(r / "meta", META_FILES, 0, False),
    ),
    Step("metadata: stat, cold", "ops/s", True, lambda r, t: stat_files(r / "meta", META_FILES)),
    Step(
        "metadata: readdir, cold", "entries/s", True, lambda r, t: list_dir(r / "meta", META_FILES)
    ),
    Step("metadata: unlink", "ops/s", False, lambda r, t: unlink_files(r / "meta", META_FILES)),
    Step("macro: tar -x", "files/s", True, untar),
    Step("macro: find -type f, cold", "files/s", True, find_files),
    Step("macro: cat every file, cold", "MB/s", True, cat_files),
    Step("macro: rm -rf", "files/s", True, remove_tree),
)
#: workload -> unit; higher is better for each.
WORKLOADS: dict[str, str] = {s.name: s.unit for s in STEPS}
#: What issue #9 asks of sharedfs against the passthrough, as a ratio.
TARGET_RATIOS = {
    "seq write 1 MiB": 0.7,
    "seq read 1 MiB, cold": 0.7,
    "metadata: create": 0.5,
    "metadata: stat, cold": 0.5,
    "metadata: readdir, cold": 0.5,
    "metadata: unlink": 0.5,
}


def run_all(kind: str, work: Path) -> dict[str, float]:
    """Every workload once, in STEPS' order, on one fresh target of `kind`."""
    tree = source_tree(work)
    out: dict[str, float] = {}
    with target(kind, work) as m:
        for step in STEPS:
            if step.cold:
                m.cold()
            out[step.name] = timed(lambda step=step: step.run(m.path, tree))
    return out


def describe() -> list[str]:
    """What the targets and workloads are, as Markdown lines for a report."""
    cold = ", ".join(f"*{s.name}*" for s in STEPS if s.cold)
    return [
        "Targets, each fresh for every run and all on the same disk (the bench's",
        "work directory):",
        "",
        "- **sharedfs**: a 1 GiB image file (`sharedfs mkfs --size 1G`), mounted",
        "  by one host with its embedded master and default options (write-back",
        "  every 5 s, the default block cache).",
        "- **passthrough**: `tools/passthrough.py`, a minimal pyfuse3 + trio",
        "  filesystem with sharedfs's FUSE options, timeouts and capabilities,",
        "  over a directory on the host filesystem: the ceiling for a Python FUSE",
        "  filesystem. It strips O_DIRECT toward the host (the kernel still",
        "  bypasses the mount's page cache).",
        "- **ext4**: the kernel's ext4 on a 1 GiB image file (`mkfs.ext4`, inode",
        "  tables zeroed at mkfs), `mount -o loop`, default options.",
        "",
        "*Cold* means: unmount (the filesystem writes everything back and loses",
        "its caches), `sync`, `echo 3 > /proc/sys/vm/drop_caches` (so neither",
        "the passthrough's files nor an image file stay in the page cache), and",
        f"mount again, untimed. It comes just before: {cold}.",
        "",
        "Workloads, in this order on one target:",
        "",
        f"- seq write: {SEQ_MIB} MiB written 1 MiB at a time to a new file, then",
        "  fsync; seq read: the same file 1 MiB at a time.",
        f"- rand write: {RANDOM_OPS} pwrites of 4 KiB at random 4 KiB-aligned",
        "  offsets in that file, then one fsync; rand read: the same offsets,",
        "  O_DIRECT, one at a time.",
        f"- small files: {SMALL_FILES} new files of {SMALL_BYTES // 1024} KiB each"
        " (create, write, close),",
        "  one directory, an fsync of the last one only (on sharedfs that commits",
        "  the log holding every file; on ext4 its journal, not every file's",
        "  data); then each read back whole.",
        f"- metadata: {META_FILES} empty files created in one directory (no fsync),",
        "  each stat'ed, the directory listed once (`os.listdir`), each unlinked",
        "  (no fsync).",
        f"- macro: a tarball of `{SOURCE}` (made once per run, fed to every",
        "  target from memory) extracted with `tar -xf -` (no fsync); `find . -type",
        "  f | wc -l` (the count checked); `find . -type f -exec cat {} + >",
        "  /dev/null` (MB/s of file data); `rm -rf` of the tree. Files/s count",
        "  the tree's regular files.",
    ]


# -- the table ---------------------------------------------------------------------


def fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def table(runs: dict[str, list[dict[str, float]]]) -> list[str]:
    """Medians per target and workload, the runs in brackets when several."""
    med = {k: {w: statistics.median(r[w] for r in rs) for w in WORKLOADS} for k, rs in runs.items()}
    out = [
        "| workload | " + " | ".join(TARGETS) + " | sharedfs / passthrough | sharedfs / ext4 |",
        "| --- | " + " | ".join("---" for _ in TARGETS) + " | --- | --- |",
    ]
    for w, unit in WORKLOADS.items():
        cells = []
        for k in TARGETS:
            each = f" ({', '.join(fmt(r[w]) for r in runs[k])})" if len(runs[k]) > 1 else ""
            cells.append(f"{fmt(med[k][w])}{each}")
        ratios = [f"{med['sharedfs'][w] / med[k][w]:.2f}" for k in TARGETS[1:]]
        out.append(f"| {w}, {unit} | " + " | ".join(cells + ratios) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="tools/bench_fs.py", description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per target; medians are shown")
    ap.add_argument("--dir", default=str(TOP / ".bench"), help="where the targets live (real disk)")
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base))
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in TARGETS}
    seconds: dict[str, float] = dict.fromkeys(TARGETS, 0.0)
    try:
        for _ in range(args.repeat):
            for kind in TARGETS:  # interleaved: a noisy minute hurts every target alike
                t0 = time.monotonic()
                runs[kind].append(run_all(kind, work))
                seconds[kind] += time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"### sharedfs and its ceilings on one host, {time.strftime('%Y-%m-%d')}")
    print(f"\n`python tools/bench_fs.py --repeat {args.repeat}`; medians of", end=" ")
    print(f"{args.repeat} run(s) per target, the targets interleaved.\n")
    print("\n".join([*describe(), "", *table(runs)]))
    took = ", ".join(f"{k} {s / args.repeat:.0f} s" for k, s in seconds.items())
    print(f"\nper repeat: {sum(seconds.values()) / args.repeat:.0f} s ({took})", file=sys.stderr)


if __name__ == "__main__":
    main()
