"""Benchmarks of sharedfs on real mounts; see tools/bench.

pingpong: two hosts (mount processes) take turns appending a line to one
shared file and reading the other's, so the file's blocks move host to host
on every turn.  Run once with Cache Fusion and once with --coherence disk
(write before every transfer, as GFS2 and OCFS2 do on a lock downgrade), on
a volume on this machine's disk, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PY = sys.executable

PLAYER = r"""
import os, sys, time
path, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_RDWR | os.O_APPEND)
line = 32
turns = 0
t0 = None
while turns < rounds:
    size = os.fstat(fd).st_size
    if (size // line) % 2 != me:
        time.sleep(0.0001)  # the other host's turn: its append invalidates our cache
        continue
    if t0 is None:
        t0 = time.monotonic()
    last = os.pread(fd, line, size - line) if size else b""
    os.write(fd, (b"host%d turn %06d " % (me, turns)).ljust(line - 1, b".") + b"\n")
    turns += 1
print(time.monotonic() - t0)
"""


def sfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "sharedfs.cli", *args], capture_output=True, text=True, check=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("master did not start")


def counters(vol: Path, addr: str) -> dict:
    time.sleep(1.1)  # hosts report every second
    return json.loads(sfs("status", str(vol), "--master", addr, "--json").stdout)["master"]


def pingpong(coherence: str, rounds: int, work: Path) -> dict:
    vol = work / f"pingpong-{coherence}.img"
    sfs("mkfs", str(vol), "--size", "256M", "-q", "--force")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    master = subprocess.Popen(
        [PY, "-m", "sharedfs.cli", "master", str(vol), "--listen", addr, "--coherence", coherence],
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    mnts = []
    try:
        for n in range(2):
            mnt = work / f"{coherence}-host{n}"
            mnt.mkdir(exist_ok=True)
            sfs(
                "mount",
                str(vol),
                str(mnt),
                "--master",
                addr,
                "--node",
                str(n),
                "--coherence",
                coherence,
                "--writeback",
                "600",
                "--log",
                str(work / f"{mnt.name}.log"),
            )
            mnts.append(mnt)
        (mnts[0] / "pingpong").write_bytes(b"")
        before = counters(vol, addr)
        players = [
            subprocess.Popen(
                [PY, "-c", PLAYER, str(m / "pingpong"), str(n), str(rounds)],
                stdout=subprocess.PIPE,
                text=True,
            )
            for n, m in enumerate(mnts)
        ]
        secs = max(float(p.communicate(timeout=600)[0]) for p in players)
        after = counters(vol, addr)
        lines = (mnts[1] / "pingpong").read_bytes().splitlines()
        assert len(lines) == 2 * rounds, "lost an append"
        transfers = after["counters"]["transfers"] - before["counters"]["transfers"]

        def grew(counter: str) -> int:
            return sum(
                after["hosts"][h]["counters"].get(counter, 0)
                - before["hosts"][h]["counters"].get(counter, 0)
                for h in after["hosts"]
            )

        writes = grew("cache_storage_writes")
        forces = grew("log_forces")
        return {
            "coherence": coherence,
            "ops": 2 * rounds,
            "seconds": secs,
            "ops_per_s": 2 * rounds / secs,
            "transfers": transfers,
            "storage_writes": writes,
            "writes_per_transfer": writes / transfers if transfers else 0.0,
            "log_forces": forces,
        }
    finally:
        for m in mnts:
            subprocess.run([PY, "-m", "sharedfs.cli", "umount", str(m)], capture_output=True)
        master.terminate()
        master.wait()


def median_run(runs: list[dict]) -> dict:
    """The run with the median operations per second."""
    med = statistics.median_low(r["ops_per_s"] for r in runs)
    return next(r for r in runs if r["ops_per_s"] == med)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB, Linux {platform.release()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(prog="tools/bench")
    ap.add_argument("what", choices=["pingpong"])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode; the median is reported")
    ap.add_argument("--dir", default=str(TOP / ".bench"), help="where the volumes live (real disk)")
    ap.add_argument(
        "--record", action="store_true", help="append the results to docs/BENCHMARKS.md"
    )
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base))
    try:
        # Interleaved, so that a noisy minute hurts both modes alike.
        runs: dict[str, list[dict]] = {"fusion": [], "disk": []}
        for _ in range(args.repeat):
            for mode in runs:
                runs[mode].append(pingpong(mode, args.rounds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = [median_run(r) for r in runs.values()]
    fusion, disk = results
    cmd = f"tools/bench pingpong --rounds {args.rounds} --repeat {args.repeat}"
    out = [
        f"### ping-pong, {time.strftime('%Y-%m-%d')}",
        "",
        f"`{cmd}` on {machine()}; volume: a 256 MiB image file on the machine's disk;",
        "two mount processes and a standalone master on loopback; each turn appends a",
        "32-byte line to one shared file and reads the other host's line.",
        "",
        f"Median of {args.repeat} runs per mode (the runs' ops/s in brackets).",
        "",
        "| coherence | ops | ops/s | block transfers | block writes | writes per transfer "
        "| log forces |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r, mode in zip(results, runs, strict=True):
        each = ", ".join(f"{x['ops_per_s']:.0f}" for x in runs[mode])
        out.append(
            f"| {r['coherence']} | {r['ops']} | {r['ops_per_s']:.0f} ({each}) | {r['transfers']} "
            f"| {r['storage_writes']} | {r['writes_per_transfer']:.2f} | {r['log_forces']} |"
        )
    out += [
        "",
        "Block writes are writes of the shared blocks themselves; log forces are",
        "appends of the redo log, which must reach storage before a block whose",
        "changes they hold leaves its host (write-ahead, as Oracle forces its log",
        "on a ping).",
        "",
        f"fusion / disk: {fusion['ops_per_s'] / disk['ops_per_s']:.1f}x the operations per second.",
        "",
    ]
    text = "\n".join(out)
    print(text)
    if args.record:
        doc = TOP / "docs" / "BENCHMARKS.md"
        if not doc.exists():
            doc.write_text("# Benchmarks\n\nEach section was produced by the command it names.\n\n")
        with open(doc, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
