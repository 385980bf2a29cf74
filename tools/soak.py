"""Load on real mounts: `tools/torture soak`.

A standalone master and --hosts real mounts of one volume (tools/torture.py's
Cluster); on each host --tasks worker processes (tools/soak_worker.py) run
mixed file operations for --seconds in directories of their own, every read
checked against an exact model, and read through their own mount what the
workers of other hosts published.  A progress line comes every 10 s.  Then
every host unmounts, `fsck -n` must be clean, and a fresh mount must read
every published file, every shared name and every worker's directory as
its model ended.

The report: operations per kind, errors (any fails the run), cross-host
checks, and each mount process's VmRSS after mounting (the baseline) and at
the end.  A mount may grow by its cache budget (--cache-size, given to every
mount) and the allowance below; more fails the run too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import soak_worker as sw
from torture import PY, Cluster, Host, TortureFailed, check_file, final_check

from sharedfs.cli_util import parse_size

WORKER = str(Path(__file__).resolve().with_name("soak_worker.py"))
PROGRESS_EVERY = 10.0
#: A worker whose counters have not moved for this long is hung: no step
#: takes a minute even on a loaded machine.
STALL_SECONDS = 120.0
#: How many error lines the report prints.
SHOWN_ERRORS = 10
#: What a mount's RSS may grow by besides its cache budget: for each cached
#: 4 KiB block about 1 KiB more (its Buffer, dict entries, lock state), and
#: a fixed part (journal pages, past images, Python's arenas).  Measured:
#: with a full 16 MiB cache a mount grew 20 MiB, with 8 MiB 12, with 1 MiB 1.6.
BOOKKEEPING = 0.25
SLACK_KIB = 8 << 10
#: With --spread a mount also masters partitions of the directory: about
#: 1.8 KiB more per block those track (a BlockState and its containers,
#: measured with tracemalloc), which a standalone master holds otherwise.
DIRECTORY_KIB = 2


@dataclass
class Task:
    """One worker process and what the runner knows of it."""

    name: str
    host: Host
    proc: subprocess.Popen[bytes]
    log: Path
    stats_path: Path
    moved: float  # monotonic time its counters last changed
    stamp: float = 0.0  # mtime of its counters file then
    hung: bool = False

    def stats(self) -> dict[str, Any]:
        try:
            return json.loads(self.stats_path.read_text())  # type: ignore[no-any-return]
        except FileNotFoundError:
            return {}


@dataclass
class Rss:
    """A mount process's VmRSS in KiB: after mounting, highest seen, last;
    and, from the last counters it sent the master, what its cache held
    (KiB) and how many blocks it evicted."""

    start: int
    peak: int = 0
    end: int = 0
    cache_kib: int = 0
    evictions: int = 0
    tracked: int = 0  # blocks the directory partitions it masters track

    def sample(self, kib: int) -> None:
        self.peak = max(self.peak, kib)
        self.end = kib


@dataclass
class Final:
    """What the fresh mount read at the end; clean: it read it all, and
    fsck -n was clean before and after."""

    clean: bool = False
    published: int = 0
    names: int = 0
    dirs: int = 0
    entries: int = 0


@dataclass
class Totals:
    """The workers' counters, added up."""

    ops: Counter[str] = field(default_factory=Counter)
    cross: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    published: int = 0
    shared: int = 0

    @classmethod
    def of(cls, tasks: list[Task]) -> Totals:
        out = cls()
        for t in tasks:
            s = t.stats()
            out.ops.update(s.get("ops", {}))
            out.cross.update(s.get("cross", {}))
            out.errors += s.get("errors", 0)
            out.first_errors += s.get("first_errors", [])
            out.published += s.get("published", 0)
            out.shared += s.get("shared", 0)
        return out


def rss_kib(pid: int) -> int:
    """VmRSS of a live process, in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def sample_rss(c: Cluster, rss: dict[int, Rss]) -> None:
    for h in c.hosts:
        assert h.mount is not None
        rss[h.node].sample(rss_kib(h.mount.pid))


def sample_cache(c: Cluster, rss: dict[int, Rss]) -> None:
    """What each host last told the master of its cache (now and then)."""
    view = c.status()
    for n, r in rss.items():
        counters = view["hosts"].get(n, {}).get("counters", {})
        r.cache_kib = counters.get("cache_blocks", 0) * c.block_size // 1024
        r.evictions = counters.get("cache_evictions", 0)
        parts = view.get("partitions", {}).values()
        r.tracked = sum(part["blocks_tracked"] for part in parts if part["master"] == n)


def start_tasks(c: Cluster, args: argparse.Namespace, work: Path) -> list[Task]:
    rng = random.Random(args.seed)
    tasks = []
    for h in c.hosts:
        for t in range(args.tasks):
            name = f"h{h.node}-t{t}"
            log = work / "workers" / f"{name}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    [PY, WORKER, "--mnt", str(h.mnt), "--name", name, "--work", str(work)]
                    + ["--seed", str(rng.getrandbits(32)), "--seconds", str(args.seconds)]
                    + ["--skip", ",".join(args.skip)],
                    stdout=f,
                    stderr=f,
                )
            stats = work / sw.STATS / f"{name}.json"
            tasks.append(Task(name, h, proc, log, stats, time.monotonic()))
    return tasks


def stalled(t: Task, now: float) -> bool:
    """Whether `t` has shown no progress for STALL_SECONDS."""
    try:
        stamp = t.stats_path.stat().st_mtime
    except FileNotFoundError:
        stamp = 0.0
    if stamp != t.stamp:
        t.stamp, t.moved = stamp, now
    return now - t.moved > STALL_SECONDS


def stop_hung(c: Cluster, t: Task) -> str:
    """Log where `t` and the cluster wait (USR1 dumps the worker's stack in
    its log, USR2 the services' tasks in theirs), then kill it."""
    t.hung = True
    t.proc.send_signal(signal.SIGUSR1)
    c.dump_states()
    t.proc.kill()
    t.proc.wait()
    return (
        f"worker {t.name} made no progress for {STALL_SECONDS:g} s (a hang?); its stack is "
        f"in {t.log}, the services' in {c.master_log} and the host logs"
    )


def dead_mount(c: Cluster) -> str | None:
    for h in c.hosts:
        assert h.mount is not None
        if h.mount.poll() is not None:
            return f"host {h.node}: mount process exited {h.mount.returncode}; see {h.log}"
    return None


def kill(tasks: list[Task]) -> None:
    for t in tasks:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


def watch(c: Cluster, tasks: list[Task], rss: dict[int, Rss], t0: float) -> list[str]:
    """Until every worker has exited: progress lines, RSS samples, hung
    workers stopped.  The errors the runner itself saw."""
    errors: list[str] = []
    next_line = t0 + PROGRESS_EVERY
    while any(t.proc.poll() is None for t in tasks):
        time.sleep(0.5)
        now = time.monotonic()
        died = dead_mount(c)
        if died is not None:
            kill(tasks)
            return [died]
        errors += [stop_hung(c, t) for t in tasks if t.proc.poll() is None and stalled(t, now)]
        if now >= next_line:
            next_line += PROGRESS_EVERY
            sample_rss(c, rss)
            progress(Totals.of(tasks), now - t0, rss)
    for t in tasks:
        if t.proc.returncode and not t.hung:
            last = t.log.read_text().strip().splitlines()[-1:] or ["(nothing logged)"]
            errors.append(f"worker {t.name} exited {t.proc.returncode}: {last[0]}")
    return errors


def progress(tot: Totals, elapsed: float, rss: dict[int, Rss]) -> None:
    mem = ", ".join(f"{r.end / 1024:.0f}" for r in rss.values())
    print(
        f"soak: {elapsed:5.0f} s: {sum(tot.ops.values()):,} operations, "
        f"{sum(tot.cross[k] for k in ('files', 'listings')):,} cross-host checks, "
        f"{tot.errors} errors; mount RSS {mem} MiB",
        flush=True,
    )


def log_errors(c: Cluster) -> list[str]:
    """A line for each of the master's and the hosts' logs with ERROR lines
    or tracebacks in it: how many, and the first."""
    found = []
    for path in [c.master_log] + [h.log for h in c.hosts]:
        if not path.exists():  # no master of our own: embedded, or --spread
            continue
        bad = [
            line.strip()
            for line in path.read_text(errors="replace").splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        ]
        if bad:
            found.append(f"{path.name}: {len(bad)} ERROR lines or tracebacks, the first: {bad[0]}")
    return found


def read_back(work: Path, mnt: Path, into: Final) -> int:
    """On a fresh mount at `mnt`: every published file, every shared name,
    and every worker's directory as its model ended.  Files read."""
    names = set()
    for feed in sorted((work / sw.FEEDS).glob("*.txt")):
        for line in feed.read_text().splitlines():
            kind, *rest = line.split()
            if kind == "F":
                check_file(mnt / rest[0], {rest[2]})
                into.published += 1
            else:
                names.add(rest[0])
    missing = names - set(os.listdir(mnt / sw.SHARED))
    if missing:
        raise TortureFailed(f"{len(missing)} shared names missing, first {sorted(missing)[:3]}")
    into.names = len(names)
    for model in sorted((work / sw.MODELS).glob("*.json")):
        want = json.loads(model.read_text())
        diff = sw.manifest_diff(want, sw.disk_manifest(str(mnt / model.stem)))
        if diff is not None:
            raise TortureFailed(f"{model.stem} on the fresh mount: {diff}")
        into.dirs += 1
        into.entries += len(want)
    return into.published + into.names + into.entries


def finish(c: Cluster, work: Path, final: Final, errors: list[str]) -> None:
    """Unmount every host, then fsck and a fresh mount's read back."""
    try:
        c.stop()
        final_check(c, lambda mnt: read_back(work, mnt, final))
        final.clean = True
    except TortureFailed as e:
        errors.append(f"at the end: {one_line(str(e))}")
        c.abort()


def one_line(text: str) -> str:
    """A failure on one line: its first line and the warnings and errors
    logged in it (fsck's findings), without their log prefixes."""
    first, *rest = text.strip().splitlines()
    found = [line.split(": ", 1)[-1] for line in rest if " WARNING " in line or " ERROR " in line]
    return "; ".join([first.rstrip(":")] + found)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The soak; its report (errors in it, a failure to set up raised)."""
    work = Path(tempfile.mkdtemp(prefix="sharedfs-soak-", dir=args.dir))
    work.chmod(0o755)
    for sub in (sw.FEEDS, sw.STATS, sw.MODELS, "workers"):
        (work / sub).mkdir()
    c = Cluster.for_run(
        work,
        args,
        writers=False,
        mount_args=("--cache-size", str(args.cache_size)),
        peer_reads=args.peer_reads,
        spread=args.spread,
    )
    ok = False
    tasks: list[Task] = []
    try:
        (c.hosts[0].mnt / sw.SHARED).mkdir()
        rss = {h.node: Rss(rss_kib(h.mount.pid)) for h in c.hosts if h.mount is not None}
        t0 = time.monotonic()
        tasks += start_tasks(c, args, work)
        errors = watch(c, tasks, rss, t0)
        elapsed = time.monotonic() - t0
        sample_rss(c, rss)
        if dead_mount(c) is None:
            sample_cache(c, rss)
        final = Final()
        if dead_mount(c) is None:
            finish(c, work, final, errors)
        else:
            c.abort()  # watch() has the error; no clean unmount to wait for
        errors += log_errors(c)
        ok = True
    finally:
        if not ok:
            kill(tasks)
            c.abort()
            print(f"soak: logs kept in {work}", file=sys.stderr)
    tot = Totals.of(tasks)
    report = make_report(args, work, tot, errors, elapsed, rss, final)
    if report["errors"] or not report["memory"]["within_budget"]:
        print(f"soak: volume, logs and workers' counters kept in {work}", file=sys.stderr)
    elif not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report


def make_report(
    args: argparse.Namespace,
    work: Path,
    tot: Totals,
    runner_errors: list[str],
    elapsed: float,
    rss: dict[int, Rss],
    final: Final,
) -> dict[str, Any]:
    ops = sum(tot.ops.values())
    budget = args.cache_size // 1024
    allowance = int(budget * BOOKKEEPING) + SLACK_KIB
    hosts = [
        {"host": n, "start_kib": r.start, "peak_kib": r.peak, "end_kib": r.end}
        | {"cache_kib": r.cache_kib, "evictions": r.evictions, "tracked": r.tracked}
        | {"allowed_kib": budget + allowance + r.tracked * DIRECTORY_KIB}
        for n, r in sorted(rss.items())
    ]
    return {
        "work": str(work),
        "seed": args.seed,
        "hosts": args.hosts,
        "tasks": args.tasks,
        "skipped": args.skip,
        "seconds": round(elapsed, 1),
        "ops": dict(sorted(tot.ops.items())),
        "ops_total": ops,
        "ops_per_s": round(ops / elapsed, 1) if elapsed else 0.0,
        "errors": tot.errors + len(runner_errors),
        "first_errors": (runner_errors + tot.first_errors)[:SHOWN_ERRORS],
        "cross_host": {
            "published_reads": tot.cross["files"],
            "listings": tot.cross["listings"],
            "names_checked": tot.cross["names"],
            "total": tot.cross["files"] + tot.cross["listings"],
        },
        "published": tot.published,
        "shared_names": tot.shared,
        "final": vars(final),
        "memory": {
            "cache_budget_kib": budget,
            "allowance_kib": allowance,
            "hosts": hosts,
            "within_budget": all(h["end_kib"] - h["start_kib"] <= h["allowed_kib"] for h in hosts),
        },
    }


def print_report(r: dict[str, Any]) -> None:
    print(
        f"soak: {r['hosts']} hosts x {r['tasks']} tasks, {r['seconds']:.0f} s, seed {r['seed']}: "
        f"{r['ops_total']:,} operations ({r['ops_per_s']:.1f}/s), {r['errors']} errors"
    )
    skipped = f" (left out: {', '.join(r['skipped'])})" if r["skipped"] else ""
    print("  " + ", ".join(f"{k} {v:,}" for k, v in r["ops"].items()) + skipped)
    x = r["cross_host"]
    print(
        f"  cross-host: {x['total']:,} checks: {x['published_reads']:,} published files read on "
        f"other hosts, {x['listings']:,} shared-directory listings ({x['names_checked']:,} names)"
    )
    f = r["final"]
    print(
        f"  at the end: fsck -n clean before and after a fresh mount that read "
        f"{f['published']:,} published files, {f['names']:,} shared names and "
        f"{f['dirs']} worker directories ({f['entries']:,} entries) as their models ended"
        if f["clean"]
        else "  at the end: no clean unmount, fsck or read back (see the errors)"
    )
    m = r["memory"]
    budget, allowance = m["cache_budget_kib"] / 1024, m["allowance_kib"] / 1024
    print(
        f"  mount VmRSS may grow by the {budget:g} MiB cache budget + {allowance:g} MiB "
        "(bookkeeping per cached block, a fixed part) over its baseline after mounting"
        + (
            f", and {DIRECTORY_KIB} KiB per block its directory partitions track:"
            if any(h["tracked"] for h in m["hosts"])
            else ":"
        )
    )
    for h in m["hosts"]:
        grew = (h["end_kib"] - h["start_kib"]) / 1024
        print(
            f"  host {h['host']}: {h['start_kib'] / 1024:.1f} MiB after mounting, "
            f"{h['end_kib'] / 1024:.1f} at the end (peak {h['peak_kib'] / 1024:.1f}), "
            f"{grew:+.1f} MiB: {'within' if grew * 1024 <= h['allowed_kib'] else 'PAST'} it; "
            f"the cache held {h['cache_kib'] / 1024:.1f} MiB, evicted {h['evictions']:,} blocks"
            + (f"; its partitions tracked {h['tracked']:,} blocks" if h["tracked"] else "")
        )
    for line in r["first_errors"]:
        print(f"  error: {line}")


def skip_list(text: str) -> list[str]:
    kinds = [k for k in text.split(",") if k]
    unknown = [k for k in kinds if k not in sw.WEIGHTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"no such step: {', '.join(unknown)}")
    return kinds


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="tools/torture soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=3, help="mounts (default 3)")
    ap.add_argument("--tasks", type=int, default=4, help="workers per host (default 4)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long they work (default 60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", default="1G", help="volume size (default 1G)")
    ap.add_argument(
        "--cache-size",
        type=parse_size,
        default=parse_size("16M"),
        help="every mount's buffer cache budget (default 16M, which a 2-minute soak fills)",
    )
    ap.add_argument(
        "--lease", type=float, default=10.0, help="the master's lease (default 10 s, as mounts)"
    )
    ap.add_argument(
        "--peer-reads",
        action="store_true",
        help="the master ships reads from the hosts' caches, and evicted blocks move (handoffs)",
    )
    ap.add_argument(
        "--spread",
        type=int,
        default=0,
        metavar="N",
        help="mount every host with --spread N: the directory in N partitions over the hosts",
    )
    ap.add_argument(
        "--skip",
        type=skip_list,
        default=[],
        metavar="KIND[,KIND]",
        help=f"leave out these steps (a known bug's, until it is fixed): {', '.join(sw.WEIGHTS)}",
    )
    ap.add_argument("--dir", default=None, help="where to make the work directory")
    ap.add_argument("--keep", action="store_true", help="keep the volume and logs")
    ap.add_argument("--json", action="store_true", help="print the report as JSON at the end")
    ap.add_argument("--debug", action="store_true", help="debug logs from the master and hosts")
    return ap.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run(args)
    except TortureFailed as e:
        print(f"soak: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    print_report(report)
    if args.json:
        print(json.dumps(report))
    sys.exit(1 if report["errors"] or not report["memory"]["within_budget"] else 0)
