"""Who holds a host slot, as tools judge it (mount, mkfs, fsck, mirror):
a host on another machine whose clock is behind ours is still alive while
its heartbeat moves, and one whose heartbeat stands still is dead once we
have watched it, whatever the clocks say."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from mount_util import mkfs, sharedfs

from sharedfs import format as fmt
from sharedfs import volume
from sharedfs.errors import QuietError
from sharedfs.storage import Storage, open_volume
from sharedfs.volume import claim_slot, live_slots, open_superblock, read_slot, write_slot

BEHIND = 60.0  # seconds the other machine's clock is behind ours


def remote_slot(age: float) -> fmt.HostSlot:
    """A slot written on another machine, whose clock says `age` s ago."""
    at = time.time_ns() - int(age * 1e9)
    return fmt.HostSlot(True, 4242, 1, at, at, "elsewhere", "/mnt/shared")


@contextmanager
def beating(storage: Storage, node: int, behind: float = BEHIND) -> Iterator[None]:
    """A live host on another machine: it beats every 0.1 s, by a clock
    `behind` seconds behind ours."""
    sb = open_superblock(storage)
    write_slot(storage, sb, node, remote_slot(behind))
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.1):
            slot = read_slot(storage, sb, node)
            stamp = time.time_ns() - int(behind * 1e9)
            write_slot(storage, sb, node, replace(slot, heartbeat_ns=stamp))

    t = threading.Thread(target=beat)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


@pytest.fixture
def vol(tmp_path: Path) -> Iterator[Storage]:
    path = tmp_path / "v.img"
    mkfs(path, "64M")
    storage = open_volume(str(path))
    yield storage
    storage.close()


def reads_of_slots(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    seen: list[int] = []
    real = volume.read_slot

    def spy(storage: Storage, sb: fmt.Superblock, node: int) -> fmt.HostSlot:
        seen.append(node)
        return real(storage, sb, node)

    monkeypatch.setattr(volume, "read_slot", spy)
    return seen


def test_a_live_host_whose_clock_is_behind_keeps_its_slot(vol: Storage) -> None:
    sb = open_superblock(vol)
    with beating(vol, 3):
        assert 3 not in live_slots(vol, sb, watch=0)  # by the wall clock alone: dead
        assert 3 in live_slots(vol, sb)
        with pytest.raises(QuietError, match="slot 3 is held by live node 3"):
            claim_slot(vol, sb, 3)
    assert read_slot(vol, sb, 3).hostname == "elsewhere"


def test_a_stale_slot_that_stands_still_is_dead_once_watched(
    vol: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = open_superblock(vol)
    write_slot(vol, sb, 2, remote_slot(BEHIND))
    reads = reads_of_slots(monkeypatch)
    assert 2 not in live_slots(vol, sb, watch=0.5)
    watched = reads.count(2)
    assert watched > 1  # read again while watched
    # Judged once per process: a mount asks three times.
    monkeypatch.setattr(volume, "HEARTBEAT_TIMEOUT", 0.5)
    reads.clear()
    assert claim_slot(vol, sb, 2).hostname != "elsewhere"
    assert reads == [2]


def test_a_slot_older_than_any_clock_skew_is_dead_at_once(
    vol: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    sb = open_superblock(vol)
    write_slot(vol, sb, 1, remote_slot(volume.MAX_CLOCK_SKEW + 5))
    reads = reads_of_slots(monkeypatch)
    assert live_slots(vol, sb) == {}
    assert reads.count(1) == 1


def test_mkfs_and_fsck_refuse_a_volume_a_host_with_a_slow_clock_uses(tmp_path: Path) -> None:
    path = tmp_path / "v.img"
    mkfs(path, "64M")
    storage = open_volume(str(path))
    try:
        with beating(storage, 0):
            r = sharedfs("mkfs", str(path), "--size", "64M", "--force", "-q", check=False)
            assert r.returncode != 0 and "Traceback" not in r.stderr
            assert "is mounted by node 0" in r.stderr.strip().splitlines()[-1]
            r = sharedfs("fsck", "-n", str(path), check=False)
            assert r.returncode != 0 and "in use by node 0" in r.stderr, r.stderr
    finally:
        storage.close()
