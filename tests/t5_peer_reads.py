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


def test_a_host_reads_what_another_caches_from_its_cache_not_storage() -> None:
    work = public_dir()
    vol = work / "vol.img"
    mkfs(vol)
    addr = f"127.0.0.1:{free_port()}"
    cache = ("--cache-size", "4M")
    h0 = Mount(vol, work / "h0", "--node", "0", "--listen", addr, "--peer-reads", *cache)
    h1 = Mount(vol, work / "h1", "--node", "1", "--master", addr, *cache)
    try:
        data = random.Random(4).randbytes(6 * MiB)  # more than one cache holds
        with open(h0.mnt / "f", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        assert (h1.mnt / "f").read_bytes() == data

        def master() -> dict:  # type: ignore[type-arg]
            return json.loads(sharedfs("status", str(vol), "--master", addr, "--json").stdout)[
                "master"
            ]

        assert master()["counters"]["peer_reads"] > 0
        # Host 1's copies came from host 0's cache, marked as copies: past
        # its cache, those went first.  (Hosts report counters each second.)
        wait_for(lambda: "cache_copies_evicted" in master()["hosts"]["1"]["counters"])
        h1c = master()["hosts"]["1"]["counters"]
        assert h1c["cache_transfers_in"] > 0 and h1c["cache_copies_evicted"] > 0
        for h in (h1, h0):
            h.umount()
    finally:
        for h in (h0, h1):
            h.kill()
    fsck_ok(vol)


def test_what_one_host_evicts_goes_to_the_idle_hosts_cache_and_back() -> None:
    """Host 0 reads a file half again its cache, twice, with O_DIRECT (every
    read reaches the mount); host 1 only mounts.  What host 0 evicts is
    handed to host 1, and host 0's second pass is shipped it from there:
    far fewer blocks read from storage than the file has."""
    work = public_dir()
    vol = work / "vol.img"
    mkfs(vol)
    addr = f"127.0.0.1:{free_port()}"
    cache = ("--cache-size", "4M")
    h0 = Mount(vol, work / "h0", "--node", "0", "--listen", addr, "--peer-reads", *cache)
    h1 = Mount(vol, work / "h1", "--node", "1", "--master", addr, *cache)
    try:
        data = random.Random(5).randbytes(6 * MiB)
        with open(h0.mnt / "f", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())

        def status() -> dict:  # type: ignore[type-arg]
            out = sharedfs("status", str(vol), "--master", addr, "--json").stdout
            return json.loads(out)["master"]  # type: ignore[no-any-return]

        def h0_misses() -> int:
            return status()["hosts"]["0"]["counters"].get("cache_misses", -1)

        # Hosts send Stats each second, and hear the others' in answer:
        # host 0 knows host 1 has room once each has sent two.
        time.sleep(2.5)
        passes = []
        for _ in range(2):
            before = h0_misses()
            assert direct_read(h0.mnt / "f", len(data)) == data
            time.sleep(1.2)  # host 0's next Stats
            passes.append(h0_misses() - before)
        m = status()
        assert m["counters"]["handoffs"] > 0 and m["counters"]["peer_reads"] > 0
        assert m["hosts"]["1"]["counters"]["cache_handed_in"] > 0
        blocks = len(data) // 4096
        assert passes[1] < blocks // 4, passes
        for h in (h1, h0):
            h.umount()
    finally:
        for h in (h0, h1):
            h.kill()
    fsck_ok(vol)


def direct_read(path, size: int) -> bytes:  # type: ignore[no-untyped-def]
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
