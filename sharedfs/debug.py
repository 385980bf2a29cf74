"""What a running master or host is doing: for `kill -USR2 PID`, every trio
task and where it waits, and the protocol state it may be stuck on; and, on
its own, where the event loop was held when it went a second or more
without coming round (a stall that long costs leases).  Written to its log,
one line per item."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

import trio

log = logging.getLogger(__name__)

Describe = Callable[[], list[str]]


def task_tree() -> list[str]:
    """One line per trio task: its name, then its innermost frames."""
    out: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = " <- ".join(reversed(list(_frames(task))[-5:]))
        out.append(f"{'  ' * depth}{task.name.rsplit('.', 1)[-1]}: {frames}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return out


def _frames(task: trio.lowlevel.Task) -> Iterator[str]:
    coro: object = task.coro
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is None:
            # An async generator's asend/athrow (an async context manager's
            # __aenter__ or __aexit__): its generator is what it refers to.
            gens = [g for g in gc.get_referents(coro) if hasattr(g, "ag_frame")]
            if not gens:
                return
            coro = gens[0]
            continue
        code = frame.f_code
        if "/trio/" not in code.co_filename:  # where trio parks a task says little
            yield f"{code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {code.co_name}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)


async def dump_on_signal(who: str, *describe: Describe) -> None:
    """Until cancelled: on SIGUSR2, log the task tree and what `describe` says."""
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            lines = task_tree()
            for d in describe:
                lines += d()
            for line in lines:
                log.warning("%s: state: %s", who, line)


#: A loop that has not come round for this long is reported, with where it is.
HELD_AFTER = 1.0


async def watch_loop(who: str, held_after: float = HELD_AFTER) -> None:
    """Until cancelled: a thread looks at a time this task renews; when the
    loop has not renewed it for `held_after`, the thread logs the stack of
    the loop's thread, once per stall (the code that holds the loop, or
    the garbage collector, or a machine that gave us no CPU)."""
    loop_thread = threading.get_ident()
    seen = [time.monotonic()]
    done = threading.Event()

    def watch() -> None:
        reported = 0.0
        while not done.wait(held_after / 4):
            last = seen[0]
            held = time.monotonic() - last
            if held > held_after and last != reported:
                reported = last
                frame = sys._current_frames().get(loop_thread)
                where = " <- ".join(
                    f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
                    for f in reversed(traceback.extract_stack(frame, limit=8))
                )
                log.warning("%s: event loop held %.1f s so far, at %s", who, held, where)

    thread = threading.Thread(target=watch, name="loop-watch", daemon=True)
    thread.start()
    try:
        while True:
            seen[0] = time.monotonic()
            await trio.sleep(held_after / 4)
    finally:
        done.set()
