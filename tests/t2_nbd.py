"""The NBD backend against real servers (nbdkit, qemu-nbd) the tests start:
requests, the export's limits, many in flight, and faults (I/O errors, a
server killed and restarted, gone for good, or silent)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import trio
from nbd_util import needs_nbdkit, needs_qemu_nbd, sparse_image

from sharedfs.errors import QuietError, StorageError
from sharedfs.storage.nbd import NbdStorage

pytestmark = needs_nbdkit

MiB = 1 << 20


def pattern(n: int, tag: int) -> bytes:
    return bytes((i * 7 + tag) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


async def wait_until(pred, what: str) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(60):
        while not pred():  # noqa: ASYNC110 - the state lives in libnbd, not in trio
            await trio.sleep(0.01)


def on_image(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_requests_reach_the_export(nbd_servers, tmp_path: Path, unix: bool) -> None:  # type: ignore[no-untyped-def]
    img = sparse_image(tmp_path / "img", 16 * MiB)
    vol = NbdStorage.open(nbd_servers.nbdkit("file", str(img), unix=unix).uri)
    assert vol.size == 16 * MiB and vol.shared  # nbdkit's file plugin: multi-conn
    vol.write_sync(0, pattern(4096, 1))  # before trio, as mount's checks run
    assert vol.read_sync(0, 4096) == pattern(4096, 1)
    await vol.write(MiB, pattern(3 * MiB, 2))
    await vol.write(8 * MiB, pattern(4096, 3), fua=True)
    await vol.flush()
    assert await vol.read(MiB + 100, 5000) == pattern(3 * MiB, 2)[100:5100]
    # A sync call from a worker thread while trio runs (the heartbeat's way),
    # and one on the loop's own thread (fsck's).
    await trio.to_thread.run_sync(vol.write_sync, 12 * MiB, pattern(8192, 4))
    assert vol.read_sync(12 * MiB, 8192) == pattern(8192, 4)
    # What the server holds:
    assert on_image(img, 0, 4096) == pattern(4096, 1)
    assert on_image(img, MiB, 3 * MiB) == pattern(3 * MiB, 2)
    assert on_image(img, 12 * MiB, 8192) == pattern(8192, 4)
    used = os.stat(img).st_blocks
    await vol.trim(MiB, 3 * MiB)  # the file plugin punches a hole
    assert os.stat(img).st_blocks <= used - 3 * MiB // 512
    with pytest.raises(StorageError, match="past the end"):
        await vol.read(16 * MiB - 10, 20)
    vol.close()


async def test_many_requests_in_flight_on_one_connection(nbd_servers) -> None:  # type: ignore[no-untyped-def]
    srv = nbd_servers.nbdkit("memory", "64M", pause=True)
    vol = NbdStorage.open(srv.uri)
    srv.pause()
    async with trio.open_nursery() as n:
        for i in range(16):
            n.start_soon(vol.write, i * MiB, pattern(4096, i))
        await wait_until(lambda: vol._conn.in_flight == 16, "16 writes in flight")
        srv.pause(False)
    for i in range(16):
        assert await vol.read(i * MiB, 4096) == pattern(4096, i)
    vol.close()


def test_a_heartbeat_thread_beside_a_new_runs_first_requests(nbd_servers) -> None:  # type: ignore[no-untyped-def]
    """A mount uses the volume before trio runs; then its first heartbeat
    (in a worker thread) races its tasks' first requests.  The thread must
    go through the run, not poll the socket beside the run's pumps: it
    would read replies whose tasks it cannot wake, and they hang.  Each
    round is a new run, as a new mount in one process would be."""
    srv = nbd_servers.nbdkit("memory", "64M", pause=True)
    vol = NbdStorage.open(srv.uri)
    for i in range(8):
        vol.write_sync(i * MiB, pattern(4096, i))  # before trio, as mount's checks run

    async def first_requests() -> dict[int, bytes]:
        results: dict[int, bytes] = {}

        async def read(i: int) -> None:
            results[i] = await vol.read(i * MiB, 4096)

        async def heartbeat() -> None:
            results[7] = await trio.to_thread.run_sync(vol.read_sync, 7 * MiB, 4096)

        srv.pause()
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(heartbeat)
                await trio.sleep(0.2)  # the thread's request waits on the server
                for i in range(7):
                    n.start_soon(read, i)
                await trio.sleep(0.2)
                srv.pause(False)
        return results

    for _ in range(5):
        assert trio.run(first_requests) == {i: pattern(4096, i) for i in range(8)}
    vol.close()


async def test_requests_are_cut_to_the_exports_block_size_limits(nbd_servers) -> None:  # type: ignore[no-untyped-def]
    # The filter fails any request outside the limits it advertises.
    limits = ["blocksize-minimum=4096", "blocksize-maximum=64K", "blocksize-error-policy=error"]
    srv = nbd_servers.nbdkit("--filter=blocksize-policy", "memory", "16M", *limits)
    vol = NbdStorage.open(srv.uri)
    assert vol.min_block == 4096 and vol.info.max_request == 64 << 10
    await vol.write(4096, pattern(MiB, 5))  # in 16 requests
    assert await vol.read(4096 + 1000, 300_000) == pattern(MiB, 5)[1000:301_000]
    assert vol.read_sync(4096 + 5, 10) == pattern(MiB, 5)[5:15]  # widened to a block
    with pytest.raises(StorageError, match="not aligned to the export's 4096-byte blocks"):
        await vol.write(1024, bytes(1024))
    vol.close()


async def test_an_io_error_fails_that_request_and_no_other(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad_writes, bad_reads = tmp_path / "fail-writes", tmp_path / "fail-reads"
    srv = nbd_servers.nbdkit(
        "--filter=error",
        "memory",
        "16M",
        "error=EIO",
        "error-pwrite-rate=100%",
        f"error-pwrite-file={bad_writes}",
        "error-pread-rate=100%",
        f"error-pread-file={bad_reads}",
    )
    vol = NbdStorage.open(srv.uri)
    await vol.write(0, pattern(8192, 6))
    bad_writes.touch()
    with pytest.raises(StorageError, match=r"write of 4096 bytes at 8192 failed: Input/output"):
        await vol.write(8192, pattern(4096, 7))
    assert await vol.read(0, 8192) == pattern(8192, 6)  # reads still work
    bad_writes.unlink()
    bad_reads.touch()
    with pytest.raises(StorageError, match="Input/output error"):
        vol.read_sync(0, 4096)
    bad_reads.unlink()
    await vol.write(8192, pattern(4096, 7))
    assert await vol.read(8192, 4096) == pattern(4096, 7)
    assert vol.reconnects == 0 and vol.resent == 0  # an error is an answer
    vol.close()


async def test_a_killed_server_restarted_gets_the_unanswered_requests_again(  # type: ignore[no-untyped-def]
    nbd_servers, tmp_path: Path, caplog
) -> None:
    img = sparse_image(tmp_path / "img", 16 * MiB)
    srv = nbd_servers.nbdkit("file", str(img), pause=True)
    vol = NbdStorage.open(srv.uri, timeout=60)
    await vol.write(0, pattern(4096, 8))
    srv.pause()
    async with trio.open_nursery() as n:
        n.start_soon(vol.write, MiB, pattern(64 << 10, 9))
        n.start_soon(vol.write, 2 * MiB, pattern(4096, 10))
        await wait_until(lambda: vol._conn.in_flight == 2, "two writes held")
        srv.kill()  # neither was answered: not known to be done
        await wait_until(lambda: warnings(caplog, "reconnect attempt"), "a failed attempt")
        srv.start()
    assert vol.reconnects == 1 and vol.resent == 2
    assert on_image(img, MiB, 64 << 10) == pattern(64 << 10, 9)
    assert on_image(img, 2 * MiB, 4096) == pattern(4096, 10)
    assert await vol.read(0, 4096) == pattern(4096, 8)
    assert warnings(caplog, "connection to the NBD server lost")
    assert warnings(caplog, "reconnected to the NBD server")
    vol.close()


async def test_a_request_in_pieces_sent_on_a_connection_already_dead(
    nbd_servers, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    img = sparse_image(tmp_path / "img", 16 * MiB)
    srv = nbd_servers.nbdkit(
        "--filter=blocksize-policy", "file", str(img), "blocksize-maximum=64K", unix=True
    )
    vol = NbdStorage.open(srv.uri, timeout=60)
    await vol.write(0, pattern(MiB, 15))
    srv.kill()  # and no checkpoint: the reader has not seen it yet
    async with trio.open_nursery() as n:

        async def read() -> None:
            assert await vol.read(0, MiB) == pattern(MiB, 15)  # 16 commands

        n.start_soon(read)
        await wait_until(lambda: vol._conn.lost, "the loss noticed")
        srv.start()
    assert vol.reconnects == 1
    vol.close()


async def test_a_server_gone_for_good_fails_the_volume_after_the_timeout(  # type: ignore[no-untyped-def]
    nbd_servers, caplog
) -> None:
    srv = nbd_servers.nbdkit("memory", "16M", unix=True)
    vol = NbdStorage.open(srv.uri, timeout=1.5)
    await vol.write(0, pattern(4096, 10))
    srv.kill()
    with pytest.raises(StorageError, match=r"NBD server lost for \d+ s") as e:
        await vol.read(0, 4096)
    assert "reconnect attempts failed" in str(e.value)
    assert len(warnings(caplog, "reconnect attempt")) >= 2  # each one logged
    with pytest.raises(StorageError) as again:  # for good, at once
        vol.read_sync(0, 4096)
    assert str(again.value) == str(e.value)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "lost for" in errors[0].getMessage()
    vol.close()


async def test_a_server_that_stops_answering_fails_and_nothing_goes_again(nbd_servers) -> None:  # type: ignore[no-untyped-def]
    srv = nbd_servers.nbdkit("memory", "16M", pause=True)
    vol = NbdStorage.open(srv.uri, timeout=2)
    srv.pause()  # alive, connected, silent
    with pytest.raises(StorageError, match=r"has not answered for \d+ s"):
        await vol.write(0, pattern(4096, 11))
    srv.pause(False)
    # What it held may land late: this volume writes nothing more.
    with pytest.raises(StorageError, match="has not answered"):
        await vol.read(0, 4096)
    assert vol.resent == 0 and vol.reconnects == 0
    vol.close()


async def test_a_server_shutting_down_is_asked_again(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flag = tmp_path / "shutting-down"
    flag.touch()
    srv = nbd_servers.nbdkit(
        "--filter=error",
        "memory",
        "16M",
        "error=ESHUTDOWN",
        "error-pwrite-rate=100%",
        f"error-pwrite-file={flag}",
    )
    vol = NbdStorage.open(srv.uri)
    async with trio.open_nursery() as n:
        n.start_soon(vol.write, 0, pattern(4096, 12))
        await wait_until(lambda: vol.reconnects >= 1, "a reconnect after ESHUTDOWN")
        flag.unlink()
    assert await vol.read(0, 4096) == pattern(4096, 12)
    vol.close()


async def test_a_different_export_after_a_restart_is_refused(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = sparse_image(tmp_path / "img", 16 * MiB)
    srv = nbd_servers.nbdkit("file", str(img))
    vol = NbdStorage.open(srv.uri)
    await vol.write(0, pattern(4096, 13))
    srv.kill()
    os.truncate(img, 8 * MiB)
    srv.start()
    with pytest.raises(StorageError, match="not the same volume"):
        await vol.read(0, 4096)
    vol.close()


def test_read_only_exports_and_read_only_opens(nbd_servers) -> None:  # type: ignore[no-untyped-def]
    srv = nbd_servers.nbdkit("-r", "memory", "16M")
    with pytest.raises(QuietError, match="read-only"):
        NbdStorage.open(srv.uri)
    vol = NbdStorage.open(srv.uri, writable=False)
    assert vol.read_sync(0, 4096) == bytes(4096)
    with pytest.raises(StorageError, match="read-only"):
        vol.write_sync(0, bytes(4096))
    vol.close()


@needs_qemu_nbd
@pytest.mark.parametrize(("clients", "multi_conn"), [("1", False), ("2", True)])
def test_qemu_nbd(nbd_servers, tmp_path: Path, clients: str, multi_conn: bool) -> None:  # type: ignore[no-untyped-def]
    img = sparse_image(tmp_path / "img", 16 * MiB)
    srv = nbd_servers.qemu_nbd(img, "-e", clients, "--cache=none", unix=True, export="vol")
    vol = NbdStorage.open(srv.uri)
    # qemu-nbd promises hosts' connections see each other only when it
    # lets several in.
    assert vol.shared is multi_conn
    vol.write_sync(4096, pattern(8192, 14))
    assert vol.read_sync(4096, 8192) == pattern(8192, 14)
    vol.close()
    assert on_image(img, 4096, 8192) == pattern(8192, 14)
