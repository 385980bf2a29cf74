"""How long a block takes to cross from host to host, against a loopback
round trip of the same size (issue #9: "a cross-host block transfer within
2x a loopback round trip of the same size").

Three figures, medians in milliseconds:

- a 4 KiB request and a 4 KiB reply between two trio processes on one
  loopback TCP connection: the floor, in our language and event loop;
- the same through sharedfs's peer link (link.py: framing, msgpack, a MAC
  per frame), a 4 KiB `Transfer` each way: what our framing adds;
- on two real mounts of one volume (a standalone master, bench.cluster()),
  host B reading a 4 KiB block that host A holds dirty: B asks the master,
  the master pings A, A ships the block to B.

Each sample of the last one is: A pwrites 4 KiB at offset 0 of a shared
file (its X lock revokes B's copies, and B's kernel drops its pages and
attributes); B fstats the file, which brings the file's inode block over
(with A's log force: the inode's change is logged); then B preads the 4 KiB,
timed alone: only the data block is left to move.  B checks it read what A
wrote, so a page cache answering stale data cannot pass for a transfer.

Every timed step and round trip starts after the same pause (`--pause`):
see PAUSE.

Run: PYTHONPATH=tools .venv/bin/python tools/bench_transfer.py [--samples N]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio

from sharedfs import protocol as p
from sharedfs.link import Link
from sharedfs.status import ask_master
from sharedfs.storage import open_volume
from sharedfs.volume import read_superblock

SIZE = 4096
#: Rounds before the timed ones: connections opened, caches and code warm.
WARMUP = 20
#: The pause before each timed step or round trip, in every figure alike.
#: The messages that trail a transfer (the holder's PingDone, the master's
#: Grant: the requester goes on when the block arrives) land before the next
#: step, not during it.  It also lets every process go idle, as between a
#: quiet host's requests; waking one costs a lot on some machines (on a VM's
#: idle vCPU a loopback round trip takes 3-4x as long as back to back), and
#: every figure pays that per hop alike.  0: back to back.
PAUSE = 0.01
#: Samples whose transfers are counted step by step (the master's counters
#: read between steps), to tell which step moved which block.
TRACED = 5
#: How long a traced step gives its PingDone, which may follow the requester
#: going on, to reach the master and be counted.
COUNT_SETTLE = 0.05

LOOPBACK = "loopback round trip 4 KiB, ms"
PEER_LINK = "the same through sharedfs's peer link, ms"
CROSS_HOST = "cross-host block transfer 4 KiB, ms"
INODE = "cross-host inode block transfer (fstat), ms"
WRITE = "write that revokes the reader's copies, ms"
LOCAL = "read of a block the reader holds, O_DIRECT, ms"
PER_SAMPLE = "block transfers per sample"
PER_READ = "block transfers per timed read"
FORCES = "log forces per sample"
WRITES = "storage writes per sample"
#: Issue #9 wants the first within twice the second.
TARGET = (CROSS_HOST, LOOPBACK)

#: The other end of the loopback figures: accepts one connection on a free
#: loopback port (printed on stdout) and echoes SIZE-byte messages until it
#: closes, as raw bytes ("tcp") or as sharedfs messages on a Link
#: authenticated with the key in argv[2] ("link").
ECHO = r"""
import sys, trio
from sharedfs.link import Link

SIZE = int(sys.argv[3])

async def main() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    print(listener.socket.getsockname()[1], flush=True)
    stream = await listener.accept()
    if sys.argv[1] == "tcp":
        buf = b""
        while data := await stream.receive_some(65536):
            buf += data
            while len(buf) >= SIZE:
                await stream.send_all(buf[:SIZE])
                buf = buf[SIZE:]
        return
    link = await Link.open(stream, bytes.fromhex(sys.argv[2]), 1, initiator=False)
    while (msg := await link.receive()) is not None:
        await link.send(msg)

trio.run(main)
"""


# -- loopback ---------------------------------------------------------------------


async def _tcp_round_trips(stream: trio.SocketStream, rounds: int, pause: float) -> list[float]:
    payload = os.urandom(SIZE)
    times = []
    for _ in range(rounds):
        await trio.sleep(pause)
        t0 = time.perf_counter()
        await stream.send_all(payload)
        got = 0
        while got < SIZE:
            got += len(await stream.receive_some(SIZE - got))
        times.append(time.perf_counter() - t0)
    return times


async def _link_round_trips(link: Link, rounds: int, pause: float) -> list[float]:
    # A Transfer as a host ships one: 4 KiB of data and its metadata.
    msg = p.Transfer(1, 1234, 1, 1, True, 0, 1, True, 0, os.urandom(SIZE))
    times = []
    for _ in range(rounds):
        await trio.sleep(pause)
        t0 = time.perf_counter()
        await link.send(msg)
        reply = await link.receive()
        times.append(time.perf_counter() - t0)
        assert isinstance(reply, p.Transfer) and reply.data == msg.data
    return times


async def _echo_client(kind: str, port: int, key: bytes, samples: int, pause: float) -> float:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        if kind == "tcp":
            await _tcp_round_trips(stream, WARMUP, pause)
            times = await _tcp_round_trips(stream, samples, pause)
        else:
            link = await Link.open(stream, key, 0, initiator=True)
            await _link_round_trips(link, WARMUP, pause)
            times = await _link_round_trips(link, samples, pause)
    finally:
        await stream.aclose()
    return statistics.median(times) * 1000


def echo_median(kind: str, samples: int, pause: float) -> float:
    """Median round trip, in ms, to an echo process of `kind` ("tcp", "link")."""
    key = os.urandom(32)  # any key both ends share: the handshake is the same
    server = subprocess.Popen(
        [sys.executable, "-c", ECHO, kind, key.hex(), str(SIZE)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        return trio.run(_echo_client, kind, port, key, samples, pause)
    finally:
        server.kill()
        server.wait()


# -- two hosts ---------------------------------------------------------------------


class Sample:
    """Rounds on the shared file, step by step: A writes, B fstats, B reads."""

    def __init__(self, fd_a: int, fd_b: int) -> None:
        self.fd_a, self.fd_b = fd_a, fd_b
        self.n = 0

    def steps(self) -> list[tuple[str, Callable[[], object]]]:
        """The next round's steps, by figure name; each round writes
        different bytes, which the read checks."""
        self.n += 1
        data = self.n.to_bytes(8, "little") * (SIZE // 8)

        def read() -> None:
            assert os.pread(self.fd_b, SIZE, 0) == data, "B read a stale copy"

        return [
            (WRITE, lambda: os.pwrite(self.fd_a, data, 0)),
            (INODE, lambda: os.fstat(self.fd_b)),
            (CROSS_HOST, read),
        ]

    def run(self, pause: float) -> dict[str, float]:
        """One round: each step's seconds."""
        out = {}
        for name, step in self.steps():
            time.sleep(pause)
            t0 = time.perf_counter()
            step()
            out[name] = time.perf_counter() - t0
        return out


def master_transfers(key: bytes, addr: str) -> int:
    """The master's transfer count, current at once (unlike the hosts'
    counters in bench.counters(), which they report every second)."""
    host, port = addr.rsplit(":", 1)
    return trio.run(ask_master, key, (host, int(port)))["counters"]["transfers"]


def cluster_key(vol: Path) -> bytes:
    storage = open_volume(str(vol), writable=False)
    try:
        return read_superblock(storage).cluster_key
    finally:
        storage.close()


def traced(sample: Sample, key: bytes, addr: str) -> dict[str, int]:
    """Block transfers per step over TRACED rounds."""
    moved = dict.fromkeys((WRITE, INODE, CROSS_HOST), 0)
    for _ in range(TRACED):
        for name, step in sample.steps():
            before = master_transfers(key, addr)
            step()
            time.sleep(COUNT_SETTLE)
            moved[name] += master_transfers(key, addr) - before
    return moved


def local_reads(path: Path, samples: int, pause: float) -> float:
    """Median ms of B's reads of the block it now holds, with O_DIRECT so
    that each reaches the mount (the kernel's page cache would answer a
    buffered one): FUSE and sharedfs, no message."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, SIZE)  # O_DIRECT wants an aligned buffer
    try:
        times = []
        for _ in range(WARMUP + samples):
            time.sleep(pause)
            t0 = time.perf_counter()
            os.preadv(fd, [buf], 0)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[WARMUP:]) * 1000
    finally:
        os.close(fd)
        buf.close()


def cross_host(work: Path, samples: int, pause: float) -> dict[str, float]:
    """On two mounts of a fresh volume: the median ms of each step of a
    round, of a read that needs no transfer, and what the rounds moved."""
    import bench  # here, not at the top: bench.py imports this module

    vol = work / "transfer.img"
    bench.sfs("mkfs", str(vol), "--size", "64M", "-q", "--force")
    key = cluster_key(vol)
    # No write-back during the run: A's block stays dirty, as a hot block does.
    with bench.cluster(vol, 2, work, (), ("--writeback", "600")) as (addr, mnts):
        fd_a = os.open(mnts[0] / "shared", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd_a, bytes(SIZE), 0)
            fd_b = os.open(mnts[1] / "shared", os.O_RDONLY)
            try:
                sample = Sample(fd_a, fd_b)
                for _ in range(WARMUP):
                    sample.run(pause)
                per_step = traced(sample, key, addr)
                before = bench.counters(vol, addr)
                runs = [sample.run(pause) for _ in range(samples)]
                after = bench.counters(vol, addr)
                local = local_reads(mnts[1] / "shared", samples, pause)
            finally:
                os.close(fd_b)
        finally:
            os.close(fd_a)
    out = {k: statistics.median(r[k] for r in runs) * 1000 for k in runs[0]}
    out[LOCAL] = local
    out[PER_SAMPLE] = (after["counters"]["transfers"] - before["counters"]["transfers"]) / samples
    out[PER_READ] = per_step[CROSS_HOST] / TRACED
    out[FORCES] = bench.grown(before, after, "log_forces") / samples
    out[WRITES] = bench.grown(before, after, "cache_storage_writes") / samples
    return out


def transfer_run(work: Path, samples: int = 300, pause: float = PAUSE) -> dict[str, float]:
    """Every figure (describe() says what each measures): medians in ms
    where the name ends in "ms", else counts per sample."""
    out = {
        LOOPBACK: echo_median("tcp", samples, pause),
        PEER_LINK: echo_median("link", samples, pause),
    }
    out.update(cross_host(work, samples, pause))
    return out


def describe() -> list[str]:
    return [
        f"Each timed step and round trip starts after {PAUSE * 1000:g} ms idle (every",
        "process asleep, as between a quiet host's requests; on a VM, waking an idle",
        "vCPU is a large part of every hop); `--pause 0` runs them back to back.",
        "",
        f"- *{LOOPBACK}*: two trio processes on one loopback TCP connection;",
        "  one sends 4 KiB, the other echoes them; from the send to the reply's",
        "  last byte.",
        f"- *{PEER_LINK}*: the same on a sharedfs `Link` (link.py, authenticated",
        "  with a cluster key): a `Transfer` of 4 KiB each way, framed, encoded",
        "  and MAC'd, then checked and decoded.",
        "- The rest: two mounts of a fresh 64 MiB image file (a standalone master,",
        "  all on loopback, `--writeback 600`: nothing is written back during the",
        "  run), driven by the benchmark process. Each sample: host A pwrites 4 KiB",
        "  at offset 0 of a shared file; host B fstats it, then preads the 4 KiB",
        "  and checks they are what A wrote.",
        f"- *{WRITE}*: A's pwrite: its X locks on the inode and data blocks",
        "  revoke B's read copies (B drops its kernel's caches of them; no data",
        "  moves: A still has its copies).",
        f"- *{INODE}*: B's fstat: the inode block comes from A, after A forces",
        "  the log records of its change to storage (write-ahead).",
        f"- *{CROSS_HOST}*: B's pread alone, the issue's figure: B's request",
        "  to the master, the master's ping to A, A's Transfer of the dirty data",
        "  block (A keeps a read copy) to B, FUSE into B and back included.",
        f"- *{LOCAL}*: B reading that block again once it holds it (O_DIRECT:",
        "  no page cache): the FUSE and sharedfs part of a read, no message.",
        f"- *{PER_SAMPLE}*: the master's transfers over the timed samples, per",
        f"  sample; *{PER_READ}*: those during the pread alone ({TRACED} samples",
        "  with the master's counters read between steps).",
        f"- *{FORCES}*, *{WRITES}*: the hosts' counters over the timed samples.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(prog="tools/bench_transfer.py")
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument(
        "--pause", type=float, default=PAUSE, help="seconds idle before each timed step"
    )
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent / ".bench"))
    args = ap.parse_args()
    base = Path(args.dir)
    base.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base))
    try:
        out = transfer_run(work, args.samples, args.pause)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, value in out.items():
        print(f"{name}: {value:.3f}")
    print(f"cross-host / loopback: {out[CROSS_HOST] / out[LOOPBACK]:.1f}x")
    print()
    print("\n".join(describe()))


if __name__ == "__main__":
    main()
