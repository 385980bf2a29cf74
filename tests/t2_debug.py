"""The loop watch (debug.watch_loop): a loop held by blocking code is
reported once, with where it was held; a loop that comes round is not."""

from __future__ import annotations

import logging
import time

import trio

from sharedfs.debug import watch_loop


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
