"""Stalls of the event loop: the loop watch (debug.watch_loop) reports a
loop held by blocking code once, with where it was held, and a loop that
comes round not at all; a host's lease task says how long a stall was and
how much CPU it took (busy code, or a process that got none); and the
mount's timer signal ends a read that blocks with the GIL held, as
pyfuse3's read of /dev/fuse can."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import time

import trio
from cluster_util import cluster
from conftest import make_volume

from sharedfs.debug import watch_loop
from sharedfs.mount import unblocked_fuse_reads


def hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # what a blocking call on the event loop does


async def watched(caplog, work) -> list[str]:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="sharedfs.debug")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_loop, "host 7", 0.2)
        await trio.sleep(0.1)
        await work()
        nursery.cancel_scope.cancel()
    return [r.getMessage() for r in caplog.records if "event loop held" in r.getMessage()]


async def test_a_held_loop_is_reported_once_with_the_code_that_holds_it(caplog):
    async def work() -> None:
        hold_the_loop(0.8)
        await trio.sleep(0.3)

    [line] = await watched(caplog, work)
    assert line.startswith("host 7: event loop held ")
    assert "t2_debug.py" in line and "hold_the_loop" in line
    held = float(line.split("held ")[1].split(" s")[0])
    assert 0.2 <= held < 0.8


async def test_a_loop_that_comes_round_is_not_reported(caplog):
    async def work() -> None:
        for _ in range(20):
            await trio.sleep(0.03)

    assert await watched(caplog, work) == []


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


async def test_a_hosts_stall_says_how_much_cpu_it_took(caplog):
    """A host's loop blocked 1.2 s twice (lease 2 s, renewed every 0.5 s):
    asleep, the stall took no CPU; spinning, it took about all of it, and
    on the loop's thread."""
    caplog.set_level(logging.WARNING, logger="sharedfs.agent")
    async with cluster(await make_volume(), 1, lease=2.0):
        await trio.sleep(0.6)  # the lease task's first tick
        hold_the_loop(1.2)
        await trio.sleep(0.6)
        spin(1.2)
        await trio.sleep(0.6)
    stalls = [r.getMessage() for r in caplog.records if "event loop stalled" in r.getMessage()]
    assert len(stalls) == 2, stalls

    def cpu(line: str) -> tuple[float, float]:
        total, loop = line.split("CPU meanwhile ")[1].split(" s, ")
        return float(total), float(loop.split(" s")[0])

    assert cpu(stalls[0])[0] < 0.3
    assert cpu(stalls[1])[1] > 0.8


def gil_holding_read(delay: float, **ticks: float) -> tuple[int, int, float]:
    """read(2) of a pipe that gets a byte `delay` seconds later (from
    another process: no thread of ours can run meanwhile), called with the
    GIL held; (result, errno, seconds taken)."""
    libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the call keeps the GIL
    r, w = os.pipe()
    writer = subprocess.Popen(["sh", "-c", f"sleep {delay}; printf x"], stdout=w)
    os.close(w)
    buf = ctypes.create_string_buffer(1)
    start = time.monotonic()
    try:
        if ticks:
            with unblocked_fuse_reads(ticks["tick"]):
                n = libc.read(r, buf, 1)
        else:
            n = libc.read(r, buf, 1)
        return n, ctypes.get_errno(), time.monotonic() - start
    finally:
        writer.wait()
        os.close(r)


def test_a_read_that_blocks_holding_the_gil_ends_at_the_next_tick():
    n, _, took = gil_holding_read(1.0)
    assert n == 1 and took >= 0.9  # without the ticks it waits for the byte
    n, err, took = gil_holding_read(3.0, tick=0.2)
    assert (n, err) == (-1, errno.EINTR) and took < 1.5
