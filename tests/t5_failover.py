"""The master embedded in a host, and that host dies (no FUSE): the lowest
live host, by the slots on the volume, starts a master of its own, the
others resume with it, and it sweeps what the dead host held.  While the
master's host is alive on the volume nobody takes over; a host whose disk
lease is up writes nothing, and its master serves nothing.  Protocol tests
check who started a master, who resumed with whom and what was swept, not
only the bytes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from cluster_util import cluster
from conftest import CTX, ROOT, make_volume
from mount_util import (
    PY,
    Mount,
    free_port,
    fsck_ok,
    mkfs,
    needs_fuse,
    public_dir,
    sharedfs,
    wait_for,
)
from t5_master_restart import fsck_clean, resumed
from t5_recovery import content

from sharedfs import format as fmt
from sharedfs import protocol as p
from sharedfs.link import open_master
from sharedfs.master import MasterService
from sharedfs.storage.fence import Fence, Fenced
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import (
    SlotWatch,
    claim_slot,
    read_slot,
    read_superblock,
    slot_is_live,
    write_slot,
)


async def fsync_files(fs, parent: int, tag: bytes, acked: dict) -> None:  # type: ignore[no-untyped-def]
    for i in range(4):
        f = await fs.create(parent, tag + b"%d" % i, 0o644, CTX)
        await fs.write(f.ino, 0, tag * 1000)
        await fs.fsync(f.ino)
        acked[(parent, tag + b"%d" % i)] = tag * 1000


class Beating:
    """Host slots kept fresh as a mount's heartbeat keeps its own (every
    0.2 s here, against the cluster's 1 s slot timeout); `stop(n)` stills
    one, as a host that dies does."""

    def __init__(self, vol: MemoryStorage, sb, nodes: list[int]) -> None:  # type: ignore[no-untyped-def]
        self.vol, self.sb = vol, sb
        self.nodes = set(nodes)
        for n in nodes:
            claim_slot(vol, sb, n)

    def stop(self, node: int) -> None:
        self.nodes.discard(node)

    async def run(self) -> None:
        while True:
            await trio.sleep(0.2)
            for n in sorted(self.nodes):
                slot = read_slot(self.vol, self.sb, n)  # with what others wrote: a master
                write_slot(self.vol, self.sb, n, replace(slot, heartbeat_ns=time.time_ns()))


@contextlib.asynccontextmanager
async def beating(vol, sb, nodes: list[int]) -> AsyncIterator[Beating]:  # type: ignore[no-untyped-def]
    beats = Beating(vol, sb, nodes)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(beats.run)
        yield beats
        nursery.cancel_scope.cancel()


def local_links(master: MasterService) -> dict[int, bool]:
    """Per joined host, whether it talks to `master` within its process."""
    return {n: h["local"] for n, h in master.status()["hosts"].items()}  # type: ignore[attr-defined]


async def test_the_lowest_live_host_takes_over_the_master_of_a_host_that_died():
    """Host 0 runs the master and dies with it.  Host 1, the lowest live
    slot, starts the one successor; host 2 resumes with it; host 0's
    blocks are swept from its log records; every file fsync'd before is
    there, and host 0 mounts again into the new master."""
    vol = await make_volume()
    sb = read_superblock(vol)
    async with cluster(vol, 3, lease=1.5, master_node=0) as c:
        started = c.fail_over([1, 2])
        assert [fs.cache.agent.master_node for fs in c.hosts] == [0, 0, 0]
        assert local_links(c.master) == {0: True, 1: False, 2: False}
        acked: dict = {}
        shared = (await c.hosts[0].mkdir(ROOT, b"shared", 0o755, CTX)).ino
        for n, fs in enumerate(c.hosts):
            await fsync_files(fs, shared, b"h%d-" % n, acked)
        # Host 0 holds the directory last, dirty: only its log has that.
        await fsync_files(c.hosts[0], shared, b"late-", acked)
        # The volume as the mounts keep it: each slot beating.
        async with beating(vol, sb, [0, 1, 2]) as beats:
            c.kill(0)
            c.stop_master()
            await trio.sleep(1.5)  # longer than the slot timeout
            assert started == []  # host 0's slot beats on: it is alive on the volume
            beats.stop(0)  # now it stands still: dead once watched for 1 s
            await resumed(c, [1, 2])
            assert [m.node for m in started] == [1]
            new = started[0]
            for n in (1, 2):
                agent = c.hosts[n].cache.agent
                assert agent.master_node == 1 and agent._master_addr == ("127.0.0.1", new.port)
            with c.watchdog(20):
                while 0 in new.directory.recoveries:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            assert new.directory.counters.hosts_failed == 1  # host 0, swept
            assert local_links(new) == {1: True, 2: False}  # its own master, no socket
            assert not c.hosts[1].fenced and not c.hosts[2].fenced
            for (parent, name), data in acked.items():
                assert await content(c.hosts[2], parent, name) == data, name
            await c.hosts[1].create(shared, b"after", 0o644, CTX)
            await c.hosts[2].lookup(shared, b"after")
            again = await c.start(0)
            assert again.cache.agent.master_node == 1
            assert local_links(new) == {0: False, 1: True, 2: False}
            assert await content(again, shared, b"late-3") == b"late-" * 1000
    await fsck_clean(vol)


async def test_nobody_takes_over_while_the_masters_host_is_alive_on_the_volume():
    """The master goes (its host's link, say) but its host's slot stays
    fresh: the others hold, retry the old address, start no master of
    their own, and resume when it is back."""
    vol = await make_volume()
    sb = read_superblock(vol)
    async with cluster(vol, 3, lease=1.5, master_node=0) as c:
        started = c.fail_over([1, 2])
        d = (await c.hosts[1].mkdir(ROOT, b"d", 0o755, CTX)).ino
        async with beating(vol, sb, [0, 1, 2]):
            c.stop_master()
            await trio.sleep(3)  # two leases: every host has noticed
            assert started == []
            assert all(fs.cache.gate.held and not fs.fenced for fs in c.hosts)
            await c.restart_master()
            await resumed(c, [0, 1, 2])
            assert started == [] and c.master.node == 0
            await c.hosts[2].create(d, b"f", 0o644, CTX)
            await c.hosts[0].lookup(d, b"f")
    await fsck_clean(vol)


async def test_a_master_whose_host_may_no_longer_write_stops_before_it_answers():
    vol = await make_volume()
    sb = read_superblock(vol)
    master = MasterService(sb.cluster_key, host_slots=sb.host_slots, node=0)
    async with trio.open_nursery() as n:
        port = await n.start(master.serve, "127.0.0.1", 0)
        master.may_serve = lambda: False
        link = await open_master(("127.0.0.1", port), sb.cluster_key, 1, exitcode=1)
        await link.send(p.Join(1, "127.0.0.1", 1, "fusion"))
        with trio.fail_after(5):
            assert await link.receive() is None  # no Welcome: the link closed
        await link.aclose()
        with trio.fail_after(5), pytest.raises(OSError):
            while True:  # serve() returns: nothing listens on the port
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                await trio.sleep(0.05)


async def test_a_host_whose_disk_lease_is_up_writes_nothing_more():
    """The Fence of a host that runs the master: a write once its last
    heartbeat is older than the lease closes the gate, and trips."""
    gate = Fence(MemoryStorage(1 << 20))
    beat = [time.monotonic()]
    tripped: list[str] = []
    gate.on_trip = tripped.append
    gate.disk_lease = (5.0, lambda: beat[0])
    await gate.write(0, b"a" * 4096)
    beat[0] -= 6  # as if no heartbeat had reached the volume for 6 s
    with pytest.raises(Fenced, match="no heartbeat reached the volume"):
        await gate.write(4096, b"b" * 4096)
    assert tripped and gate.reason == tripped[0]
    assert gate.read_sync(4096, 1) == b"\0"
    with pytest.raises(Fenced):  # and whatever comes later
        await gate.flush()


# -- real mounts ------------------------------------------------------------------


def _mounts(vol: Path, work: Path) -> tuple[list[Mount], str]:
    mkfs(vol)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    first = Mount(vol, work / "h0", "--node", "0", "--listen", addr, "--lease", "2")
    rest = [Mount(vol, work / f"h{n}", "--node", str(n), "--master", addr) for n in (1, 2)]
    return [first, *rest], addr


def _local_links(vol: Path, addr: str) -> dict[str, bool]:
    """Per joined host, whether it reaches the master at `addr` by a link
    within its own process (no socket) rather than over TCP."""
    st = json.loads(sharedfs("status", str(vol), "--master", addr, "--json").stdout)
    return {n: h["local"] for n, h in st["master"]["hosts"].items()}


def _published(vol: Path) -> dict[int, str]:
    st = json.loads(sharedfs("status", str(vol), "--json").stdout)
    return {h["node"]: h["runs_master"] for h in st["hosts"] if h["runs_master"]}


@needs_fuse
@pytest.mark.fuse
def test_killed_master_host_is_followed_by_a_successor_and_a_clean_unmount_hands_over() -> None:
    """Three mounts, the master embedded in host 0.  kill -9 of host 0:
    host 1 takes the master role, host 2 resumes with it, a create made
    meanwhile completes, and what host 0 fsync'd is there.  Host 0 mounts
    again without --master (it finds host 1's master on the volume).  Then
    host 1 unmounts cleanly: host 0, now the lowest live host, takes over,
    and nobody is fenced.  fsck is clean after all unmount.  Whichever
    host runs the master talks to it by a link in its own process."""
    work = public_dir()
    vol = work / "vol.img"
    mounts, addr = _mounts(vol, work)
    h0, h1, h2 = mounts
    try:
        assert _published(vol) == {0: addr}
        assert _local_links(vol, addr) == {"0": True, "1": False, "2": False}
        (h0.mnt / "d").mkdir()
        with open(h0.mnt / "d" / "synced", "wb") as f:
            f.write(b"s" * 30000)
            os.fsync(f.fileno())
        assert (h2.mnt / "d" / "synced").read_bytes() == b"s" * 30000
        h0.proc.kill()
        h0.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(h0.mnt)], capture_output=True)
        script = "import sys; open(sys.argv[1], 'wb').write(b'm' * 5000)"
        during = subprocess.run(
            [PY, "-c", script, str(h2.mnt / "d" / "meanwhile")], timeout=60, check=True
        )
        assert during.returncode == 0
        wait_for(lambda: "took the master role" in h1.log.read_text(), what="a successor")
        assert "took the master role" not in h2.log.read_text()
        new = _published(vol)[1]
        wait_for(lambda: f"resumed with master {new}" in h2.log.read_text(), what="h2 resume")
        wait_for(lambda: f"resumed with master {new}" in h1.log.read_text(), what="h1 resume")
        assert _local_links(vol, new) == {"1": True, "2": False}
        for m in (h1, h2):
            assert (m.mnt / "d" / "synced").read_bytes() == b"s" * 30000
            assert (m.mnt / "d" / "meanwhile").read_bytes() == b"m" * 5000
        again = Mount(vol, work / "h0", "--node", "0")
        mounts[0] = again
        assert "joining the master that node 1 runs" in again.log.read_text()
        assert (again.mnt / "d" / "meanwhile").read_bytes() == b"m" * 5000
        h1.umount()
        mounts.remove(h1)
        wait_for(lambda: "took the master role" in again.log.read_text(), what="a handover")
        (h2.mnt / "d" / "after").write_text("goes on")
        assert (again.mnt / "d" / "after").read_text() == "goes on"
        assert _published(vol).keys() == {0}
        assert _local_links(vol, _published(vol)[0]) == {"0": True, "2": False}
        for m in (again, h2):
            assert "fenced" not in m.log.read_text(), m.log.read_text()
        for m in (h2, again):
            m.umount()
            mounts.remove(m)
    finally:
        for m in mounts:
            m.kill()
    fsck_ok(vol)


@pytest.mark.parametrize(
    ("node", "silent", "stands_down"),
    [
        (0, {0: 0.1, 1: 3.2, 2: 3.0}, True),  # hears itself only, of three
        (0, {0: 2.0, 1: 3.2, 2: 0.5}, False),  # its own host slow, not cut off
        (0, {0: 0.1, 1: 3.2, 2: 0.5}, False),  # two of three: h1 is cut off
        (0, {0: 0.1, 1: 3.2}, False),  # half of two: the master's side goes on
        (0, {0: 0.1, 1: 3.2, 2: 2.9, 3: 0.4}, False),  # two of four
        (0, {0: 0.1, 1: 3.2, 2: 2.9, 3: 2.5, 4: 0.4}, True),  # two of five
        (-1, {1: 3.2, 2: 3.0, 3: 0.2}, False),  # a standalone master is no host
    ],
)
def test_an_embedded_master_that_hears_a_minority_stands_down_before_declaring_anyone_dead(
    node: int, silent: dict[int, float], stands_down: bool
) -> None:
    """The decision t6_netns makes happen on a real partition, case by
    case (lease 3 s: heard means within 1.5 s)."""
    master = MasterService(b"k" * 32, lease=3.0, node=node)
    told: list[str] = []
    master.on_minority = told.append
    assert master._in_minority(silent) is stands_down
    assert bool(told) is stands_down
    if stands_down:
        assert "a minority" in told[0]


async def test_who_is_dead_on_the_volume_needs_no_clock_of_another_host():
    """Two remote hosts whose wall clocks are far off ours: host 1's slow by
    a day but beating, host 2's ahead by a day but standing still.  By
    wall-clock age (slot_is_live) host 1 is dead already, while it still
    runs (a successor would start beside its master), and host 2 alive
    for a day.  The watch goes by what it sees change on its own clock:
    host 1 lives, host 2 is dead once watched for the timeout."""
    vol = await make_volume()
    sb = read_superblock(vol)
    day = 86_400 * 10**9
    slot = fmt.HostSlot(True, 4242, 1, 0, 0, "elsewhere")
    beats = {1: time.time_ns() - day, 2: time.time_ns() + day}
    for n, at in beats.items():
        write_slot(vol, sb, n, replace(slot, heartbeat_ns=at))
    assert not slot_is_live(read_slot(vol, sb, 1)) and slot_is_live(read_slot(vol, sb, 2))
    watch = SlotWatch(timeout=0.5)
    assert set(watch.live(vol, sb)) == {1, 2}  # first seen: given the whole timeout
    for _ in range(4):
        await trio.sleep(0.2)
        beats[1] += 2 * 10**9
        write_slot(vol, sb, 1, replace(slot, heartbeat_ns=beats[1]))
        live = set(watch.live(vol, sb))
    assert live == {1}
    write_slot(vol, sb, 1, replace(slot, in_use=False, heartbeat_ns=beats[1]))
    assert watch.live(vol, sb) == {}  # released: gone at once
