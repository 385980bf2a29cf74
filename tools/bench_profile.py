"""Where a sharedfs mount's time goes in each one-host workload (issue #9).

Runs bench_fs's workloads once more on a fresh sharedfs target with py-spy
attached to the mount process for each workload alone, and says per
workload: how busy the mount's event-loop thread was, how much its storage
threads worked, and which modules the loop's busy time was spent in.  A
loop near 100% busy is bound by Python on one core; a loop mostly waiting
is bound by latency (storage, locks, the kernel) that nothing overlaps.
Made for tools/bench.py to import.
"""

from __future__ import annotations

import collections
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import bench_fs

PY_SPY = Path(bench_fs.PY).parent / "py-spy"
RATE = 100  # samples per second and thread
#: Innermost frames of a thread that waits rather than works.
IDLE = ("EpollIOManager.get_events", "Condition.wait", "WorkerThread._work", "Lock.acquire")
#: Modules every frame of the loop thread runs under (the mount's outer
#: shell): a sample whose innermost sharedfs frame is one of them is trio's.
SHELL = ("mount.py", "cli.py", "cli_util.py")
#: Module groups, as the report names them.
GROUPS = {
    "fs.py": "fs (inodes, block maps)",
    "cache.py": "cache",
    "journal.py": "journal",
    "format.py": "on-disk format",
    "master.py": "lock master",
    "directory.py": "lock master",
    "agent.py": "messages",
    "link.py": "messages",
    "protocol.py": "messages",
    "fuse_ops.py": "FUSE layer",
}


@dataclass(frozen=True)
class Profile:
    """One workload's samples: `loop` of the event-loop thread, `busy` of
    them working, `storage` samples of threads in sharedfs.storage, and
    the busy samples per module group."""

    rate: float
    loop: int
    busy: int
    storage: int
    groups: dict[str, int]

    def row(self, name: str, unit: str) -> str:
        top = sorted(self.groups.items(), key=lambda kv: -kv[1])[:4]
        where = ", ".join(f"{g} {100 * n / max(self.busy, 1):.0f}%" for g, n in top)
        return (
            f"| {name} | {bench_fs.fmt(self.rate)} {unit} | {self.pct(self.busy)} "
            f"| {self.pct(self.storage)} | {where} |"
        )

    def pct(self, n: int) -> str:
        return f"{100 * n / max(self.loop, 1):.0f}%"


def group_of(frame: str) -> str | None:
    """'Log.commit (sharedfs/journal.py:412)' -> 'journal'; None outside
    sharedfs and in its shell."""
    where = frame.rpartition("(")[2]
    if "sharedfs/" not in where:
        return None
    module = where.rpartition("/")[2].partition(":")[0]
    if "sharedfs/storage/" in where:
        return "storage"
    if module in SHELL:
        return None
    return GROUPS.get(module, module.removesuffix(".py"))


def read_profile(raw: Path, rate: float) -> Profile:
    """Parse py-spy's raw output (`thread (TID): NAME;frame;... count`)."""
    loop = busy = storage = 0
    groups: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        main = frames[0].endswith("MainThread")
        idle = frames[-1].partition(" (")[0] in IDLE
        if main:
            loop += n
        if idle:
            continue
        if not main:
            storage += n if any("sharedfs/storage/" in f for f in frames) else 0
            continue
        busy += n
        inner = next((g for f in reversed(frames) if (g := group_of(f))), None)
        if inner is None:
            inner = "pyfuse3" if any("pyfuse3" in f for f in frames) else "trio and the rest"
        groups[inner] += n
    return Profile(rate, loop, busy, storage, dict(groups))


def mount_pid(m: bench_fs.Mount) -> int:
    out = bench_fs.run("pgrep", "-f", f"sharedfs.cli mount {m.store} ")
    return int(out.split()[0])


@contextmanager
def sampled(pid: int, raw: Path) -> Iterator[Path]:
    """py-spy on `pid` for the body; its raw samples in `raw` afterwards."""
    spy = subprocess.Popen(
        [PY_SPY, "record", "-p", str(pid), "-o", str(raw), "-f", "raw", "-r", str(RATE)]
        + ["--idle", "--threads", "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield raw
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has and ends
        _, err = spy.communicate(timeout=60)
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no profile: {err.decode().strip()}")


def profile_all(work: Path) -> dict[str, Profile]:
    """Every workload once, in bench_fs.STEPS' order, each one sampled."""
    tree = bench_fs.source_tree(work)
    out: dict[str, Profile] = {}
    with bench_fs.target("sharedfs", work) as m:
        for step in bench_fs.STEPS:
            if step.cold:
                m.cold()
            raw = work / "profile.txt"
            raw.unlink(missing_ok=True)
            with sampled(mount_pid(m), raw):
                rate = bench_fs.timed(lambda step=step: step.run(m.path, tree))
            out[step.name] = read_profile(raw, rate)
    return out


def report(profiles: dict[str, Profile]) -> list[str]:
    """The section's Markdown lines."""
    return [
        "Every workload once more, on a fresh sharedfs target, with py-spy",
        f"(`record --idle --threads`, {RATE} Hz) on the mount process during the",
        "workload alone; the rates are slowed by the sampling. *Loop busy*: the",
        "share of the event-loop thread's samples not waiting in epoll (near",
        "100%: bound by Python on one core; low: bound by waits nothing",
        "overlaps). *Storage threads*: samples of worker threads inside",
        "sharedfs.storage, per loop sample. Then where the loop's busy samples",
        "are, each counted to the innermost sharedfs module on its stack",
        "(pyfuse3 or trio where there is none).",
        "",
        "| workload | rate, profiled | loop busy | storage threads | the loop's busy time |",
        "| --- | --- | --- | --- | --- |",
        *(p.row(name, bench_fs.WORKLOADS[name]) for name, p in profiles.items()),
    ]
