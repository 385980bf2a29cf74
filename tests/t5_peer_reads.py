"""--peer-reads on real mounts: two processes, the master embedded in the
first; a file one host wrote is read on the other from the first's cache
(and, past the reader's cache, its copies go before its own blocks); and
what a host evicts goes to an idle host's cache rather than nowhere."""

from __future__ import annotations

import json
import mmap
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mount_util import (
    Mount,
    free_port,
    fsck_ok,
    mkfs,
    needs_fuse,
    public_dir,
    sharedfs,
    wait_for,
)

pytestmark = [needs_fuse, pytest.mark.fuse]

MiB = 1 << 20


@contextmanager
def two_hosts(seed: int) -> Iterator[tuple[Mount, Mount, bytes, Callable[[], dict]]]:  # type: ignore[type-arg]
    """Host 0 (embedding the master, --peer-reads) and host 1, 4 MiB caches
    each, and a 6 MiB file host 0 wrote and fsynced (more than one cache
    holds): (the hosts, the file's bytes, the master's status as a function).
    Both unmount at the end, and the volume must be fsck-clean."""
    work = public_dir()
    vol = work / "vol.img"
    mkfs(vol)
    addr = f"127.0.0.1:{free_port()}"
    cache = ("--cache-size", "4M")
    h0 = Mount(vol, work / "h0", "--node", "0", "--listen", addr, "--peer-reads", *cache)
    h1 = Mount(vol, work / "h1", "--node", "1", "--master", addr, *cache)
    try:
        data = random.Random(seed).randbytes(6 * MiB)
        with open(h0.mnt / "f", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

        def master() -> dict:  # type: ignore[type-arg]
            out = sharedfs("status", str(vol), "--master", addr, "--json").stdout
            return json.loads(out)["master"]  # type: ignore[no-any-return]

        yield h0, h1, data, master
        for h in (h1, h0):
            h.umount()
    finally:
        for h in (h0, h1):
            h.kill()
    fsck_ok(vol)


def test_a_host_reads_what_another_caches_from_its_cache_not_storage() -> None:
    with two_hosts(4) as (_, h1, data, master):
        assert (h1.mnt / "f").read_bytes() == data
        assert master()["counters"]["peer_reads"] > 0
        # Host 1's copies came from host 0's cache, marked as copies: past
        # its cache, those went first.  (Hosts report counters each second.)
        wait_for(lambda: "cache_copies_evicted" in master()["hosts"]["1"]["counters"])
        h1c = master()["hosts"]["1"]["counters"]
        assert h1c["cache_transfers_in"] > 0 and h1c["cache_copies_evicted"] > 0


def test_what_one_host_evicts_goes_to_the_idle_hosts_cache_and_back() -> None:
    """Host 0 reads a file half again its cache, twice, with O_DIRECT (every
    read reaches the mount); host 1 only mounts.  What host 0 evicts is
    handed to host 1, and host 0's second pass is shipped it from there:
    far fewer blocks read from storage than the file has."""
    with two_hosts(5) as (h0, _, data, master):

        def h0_misses() -> int:
            return master()["hosts"]["0"]["counters"].get("cache_misses", -1)

        # Hosts send Stats each second, and hear the others' in answer:
        # host 0 knows host 1 has room once each has sent two.
        time.sleep(2.5)
        passes = []
        for _ in range(2):
            before = h0_misses()
            assert direct_read(h0.mnt / "f", len(data)) == data
            time.sleep(1.2)  # host 0's next Stats
            passes.append(h0_misses() - before)
        m = master()
        assert m["counters"]["handoffs"] > 0 and m["counters"]["peer_reads"] > 0
        assert m["hosts"]["1"]["counters"]["cache_handed_in"] > 0
        assert passes[1] < len(data) // 4096 // 4, passes


def direct_read(path: Path, size: int) -> bytes:
    """The file's bytes through O_DIRECT reads of 1 MiB (past the page cache)."""
    buf = mmap.mmap(-1, MiB)
    out = bytearray()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        while len(out) < size and (n := os.readv(fd, [buf])):
            out += buf[:n]
    finally:
        os.close(fd)
    return bytes(out)
