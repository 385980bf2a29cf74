"""A host's gate to the volume (storage/fence.py): held while a master is
lost, opened when it is back, closed when the host is fenced."""

from __future__ import annotations

import pytest
import trio

from sharedfs.storage.fence import Fence, Fenced
from sharedfs.storage.memory import MemoryStorage

BS = 4096


async def test_the_gate_opens_once_every_holder_has_its_master_back():
    """With the directory spread, each partition's agent holds the gate
    while its master is lost: one partition resuming must not let writes
    through while another's master may be declaring us dead."""
    inner = MemoryStorage(1 << 20)
    gate = Fence(inner)
    p1, p15 = object(), object()
    gate.hold(p1)
    gate.hold(p15)
    gate.open_gate(p1)
    assert gate.held
    with trio.move_on_after(1.0):
        await gate.write(0, b"x" * BS)
    assert inner.write_log == []  # still waiting for partition 15
    gate.open_gate(p15)
    assert not gate.held
    await gate.write(0, b"x" * BS)
    assert inner.write_log == [(0, BS)]


async def test_a_held_write_fails_when_the_gate_closes():
    inner = MemoryStorage(1 << 20)
    gate = Fence(inner)
    gate.hold(object())
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            with pytest.raises(Fenced):
                await gate.write(0, b"x" * BS)

        nursery.start_soon(write)
        await trio.sleep(0.1)
        gate.close_gate("declared dead")
    assert inner.write_log == [] and not gate.held
