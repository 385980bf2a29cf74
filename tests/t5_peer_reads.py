"""--peer-reads on real mounts: two processes, the master embedded in the
first; a file one host wrote is read on the other from the first's cache
(and, past the reader's cache, its copies go before its own blocks)."""

from __future__ import annotations

import json
import os
import random

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
