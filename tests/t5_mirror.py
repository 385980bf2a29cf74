"""Mirroring a cluster (seed 004): several hosts in one process, each
shipping its own writes; a host killed while it ships; a real nbdkit
secondary killed in the middle of a workload and brought back; then the
commands an operator runs: status, resync, verify, promote, fsck."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import trio
from cluster_util import Cluster, cluster
from conftest import CTX, ROOT, host, make_volume
from mount_util import (
    Master,
    Mount,
    fsck_ok,
    mkfs,
    needs_fuse,
    public_dir,
    sharedfs,
    wait_for,
)
from nbd_util import needs_nbdkit
from nbd_util import sparse_image as image

from sharedfs.errors import StorageError
from sharedfs.fs import FileSystem
from sharedfs.fsck import run_fsck
from sharedfs.mirror import (
    attach_secondary,
    differing_regions,
    promote_secondary,
    read_marks,
    resync,
)
from sharedfs.storage import Storage, open_volume
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock

SIZE = 64 << 20


class Secondary(MemoryStorage):
    """A secondary in memory that can be taken away (writes fail)."""

    down = False

    def write_sync(self, offset, data):  # type: ignore[no-untyped-def]
        if self.down:
            raise StorageError(f"{self.name}: gone")
        super().write_sync(offset, data)


async def mirrored_volume() -> tuple[MemoryStorage, Secondary]:
    primary = await make_volume(SIZE)
    secondary = Secondary(SIZE, "secondary")
    sb = read_superblock(primary).with_secondary("secondary")
    await attach_secondary(primary, secondary, sb)
    return primary, secondary


async def put(fs: FileSystem, parent: int, name: bytes, data: bytes) -> None:
    """Create, write, fsync: acknowledged once this returns."""
    ino = (await fs.create(parent, name, 0o644, CTX)).ino
    await fs.write(ino, 0, data)
    await fs.fsync(ino)


async def workload(
    hosts: list[FileSystem], d: int, tag: str, files: int, seed: int
) -> dict[bytes, bytes]:
    """Every host writes `files` files into directory `d` at once (the
    directory's blocks move host to host); what each file must hold."""
    rng = random.Random(seed)
    want = {
        f"{tag}-{n}-{i}".encode(): rng.randbytes(rng.randrange(1, 300_000))
        for n in range(len(hosts))
        for i in range(files)
    }

    async def one(n: int, fs: FileSystem) -> None:
        for name, data in want.items():
            if name.startswith(f"{tag}-{n}-".encode()):
                await put(fs, d, name, data)

    async with trio.open_nursery() as nursery:
        for n, fs in enumerate(hosts):
            nursery.start_soon(one, n, fs)
    return want


async def all_shipped(c: Cluster, nodes: list[int]) -> None:
    with c.watchdog(20):
        while any(c.mirrors[n].queued_bytes for n in nodes):  # noqa: ASYNC110
            await trio.sleep(0.01)


async def check_files(storage: Storage, want: dict[bytes, bytes]) -> None:
    fs = host(storage)  # type: ignore[arg-type]
    d = (await fs.lookup(ROOT, b"d")).ino
    for name, data in want.items():
        ino = (await fs.lookup(d, name)).ino
        assert await fs.read(ino, 0, len(data) + 1) == data, name


async def test_three_hosts_mirror_their_writes_and_the_secondary_is_identical():
    primary, secondary = await mirrored_volume()
    async with cluster(primary, 3, open_secondary=lambda: secondary) as c:
        d = (await c.hosts[0].mkdir(ROOT, b"d", 0o755, CTX)).ino
        want = await workload(c.hosts, d, "w", 6, seed=1)
        assert sum(m.shipped for m in c.mirrors.values()) > 0
        # Every host shipped its own writes.
        assert all(m.shipped for m in c.mirrors.values())
    sb = read_superblock(primary)
    assert not any(read_marks(primary, sb).values())
    assert await differing_regions(primary, secondary, sb) == []
    await promote_secondary(secondary, read_superblock(secondary))
    f = await run_fsck(secondary, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems
    await check_files(secondary, want)


async def test_a_host_killed_while_it_ships_leaves_marks_that_resync_copies():
    primary, secondary = await mirrored_volume()
    async with cluster(primary, 3, open_secondary=lambda: secondary) as c:
        d = (await c.hosts[0].mkdir(ROOT, b"d", 0o755, CTX)).ino
        want = await workload(c.hosts, d, "a", 3, seed=2)
        secondary.down = True
        want |= await workload(c.hosts, d, "b", 3, seed=3)
        assert c.mirrors[2].queued_bytes and c.mirrors[2].marked()
        c.kill(2)  # with updates in its queue
        await c.wait_recovered(2)
        secondary.down = False
        want |= await workload(c.hosts[:2], d, "c", 3, seed=4)
        await all_shipped(c, [0, 1])
    sb = read_superblock(primary)
    marks = read_marks(primary, sb)
    # Only the dead host's marks are left; the survivors shipped theirs.
    assert marks[2] and not marks[0] and not marks[1]
    assert set(await differing_regions(primary, secondary, sb)) <= marks[2]
    assert await resync(primary, secondary, sb) == sorted(marks[2])
    assert await differing_regions(primary, secondary, sb) == []
    await promote_secondary(secondary, read_superblock(secondary))
    f = await run_fsck(secondary, repair=False, force=True, progress=False)
    assert f.found_errors == 0, f.problems
    await check_files(secondary, want)


@needs_nbdkit
async def test_an_nbd_secondary_killed_mid_workload_then_resync_verify_promote(
    nbd_servers, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    vol = tmp_path / "primary.img"
    mkfs(vol, "64M")
    server = nbd_servers.nbdkit("file", str(image(tmp_path / "secondary.img", SIZE)), unix=True)
    assert "copied 64 regions" in sharedfs("mirror", "attach", str(vol), server.uri).stdout
    primary = open_volume(str(vol))
    async with cluster(primary, 3) as c:  # type: ignore[arg-type]
        d = (await c.hosts[0].mkdir(ROOT, b"d", 0o755, CTX)).ino
        want = await workload(c.hosts, d, "a", 3, seed=5)
        server.kill()
        with trio.fail_after(30):  # the writes do not wait for the secondary
            want |= await workload(c.hosts, d, "b", 3, seed=6)
        await trio.to_thread.run_sync(server.start)
        want |= await workload(c.hosts, d, "c", 3, seed=7)
        await all_shipped(c, [0, 1, 2])
        server.kill()  # again, and the cluster stops before it is back
        want |= await workload(c.hosts, d, "e", 2, seed=8)
    primary.close()
    status = json.loads(sharedfs("mirror", "status", str(vol), "--json").stdout)
    assert status["marked_regions"] > 0
    server.start()
    r = sharedfs("mirror", "resync", str(vol))
    assert f"resynced {status['marked_regions']} regions" in r.stdout
    assert "all 64 regions identical" in sharedfs("mirror", "verify", str(vol), "-q").stdout
    assert (
        json.loads(sharedfs("mirror", "status", str(vol), "--json").stdout)["marked_regions"] == 0
    )
    sharedfs("mirror", "promote", server.uri)
    fsck_ok(server.uri)
    server.stop()
    secondary = open_volume(str(tmp_path / "secondary.img"))
    await check_files(secondary, want)
    secondary.close()


def test_verify_lists_the_regions_that_differ_and_fails(tmp_path: Path) -> None:
    vol, sec = tmp_path / "v.img", tmp_path / "s.img"
    mkfs(vol, "64M")
    sharedfs("mirror", "attach", str(vol), str(sec))
    with open(sec, "r+b") as f:  # a change behind the mirror's back
        f.seek(40 << 20)
        f.write(b"behind its back")
    r = sharedfs("mirror", "verify", str(vol), check=False)
    assert r.returncode == 1
    assert "region 40 (blocks 10240..10495) differs" in r.stdout
    assert "1 of 64 regions differ" in r.stdout
    sharedfs("mirror", "detach", str(vol))
    r = sharedfs("mirror", "status", str(vol), check=False)
    assert r.returncode == 1 and "has no secondary" in r.stderr


@needs_fuse
@pytest.mark.fuse
def test_two_mounts_mirror_what_they_write_and_the_secondary_will_not_mount() -> None:
    d = public_dir()
    try:
        vol, sec = d / "v.img", d / "s.img"
        mkfs(vol, "64M")
        sharedfs("mirror", "attach", str(vol), str(sec))
        master = Master(vol, d / "master.log")
        try:
            a = Mount(vol, d / "a", "--master", master.addr, "--node", "0")
            b = Mount(vol, d / "b", "--master", master.addr, "--node", "1")
            for m, tag in ((a, b"a"), (b, b"b")):
                for i in range(5):
                    with open(m.mnt / f"{tag.decode()}{i}", "wb") as f:
                        f.write(tag * (i * 70_000 + 1))
                        os.fsync(f.fileno())

            def both_report() -> bool:
                r = sharedfs("mirror", "status", str(vol), "--master", master.addr, "--json")
                return set(json.loads(r.stdout)["hosts"]) == {"0", "1"}

            wait_for(both_report, what="the hosts' mirror counters at the master")
            text = sharedfs("mirror", "status", str(vol), "--master", master.addr).stdout
            assert "node 1 queue:" in text and "secondary reachable" in text, text
            a.umount()
            b.umount()
        finally:
            master.stop()
        assert "all 64 regions identical" in sharedfs("mirror", "verify", str(vol)).stdout
        assert "marked regions: 0 of 64" in sharedfs("mirror", "status", str(vol)).stdout
        r = sharedfs("mount", str(sec), str(d / "a"), check=False)
        assert r.returncode == 32 and "mirror promote" in r.stderr
        sharedfs("mirror", "promote", str(sec))
        fsck_ok(sec)
        c = Mount(sec, d / "c")  # a volume of its own now, with every fsync'd byte
        try:
            for tag in "ab":
                for i in range(5):
                    assert (c.mnt / f"{tag}{i}").read_bytes() == tag.encode() * (i * 70_000 + 1)
        finally:
            c.umount()
        fsck_ok(sec)
    finally:
        shutil.rmtree(d, ignore_errors=True)
