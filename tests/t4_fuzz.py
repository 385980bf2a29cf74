"""Hostile peers: tools/fuzz against a running master and two hosts, and the
fixes it led to, each on its own."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from sharedfs import protocol as p
from sharedfs.link import Link, LinkClosed

_spec = importlib.util.spec_from_file_location(
    "fuzz", Path(__file__).resolve().parent.parent / "tools" / "fuzz.py"
)
assert _spec is not None and _spec.loader is not None
fuzz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz"] = fuzz  # its dataclasses look themselves up there
_spec.loader.exec_module(fuzz)

KEY = b"k" * 32


async def test_fuzzed_master_and_hosts_refuse_every_bad_frame_and_keep_serving():
    report = await fuzz.fuzz_frames(3000, seed=7)
    # Every attack kind ran, on about a thousand connections.
    assert {name for name, _ in fuzz.ATTACKS} <= set(report.by_attack)
    assert report.connections > 1000
    # Each bad frame ended its connection with no reply, and was counted
    # by the service it hit.
    assert report.accepted == 0
    assert report.bad_frames > 500
    assert report.closed == report.bad_frames
    assert report.rejected_master + report.rejected_hosts == report.bad_frames
    assert report.rejected_master > 0 and report.rejected_hosts > 0
    # The hosts kept working through the master and read back what they wrote.
    assert report.ops > 0
    assert report.wrong == 0


def _authenticated_pair() -> tuple[p.Connection, p.Connection]:
    a = p.Connection(KEY, 0, initiator=True)
    b = p.Connection(KEY, -1, initiator=False)
    b.receive_data(a.hello())
    a.receive_data(b.hello())
    a.receive_data(b.next_event()[1])
    b.receive_data(a.next_event()[1])
    a.next_event()
    b.next_event()
    assert a.authenticated and b.authenticated
    return a, b


@pytest.mark.parametrize(
    "msg",
    [
        p.LockRequest(1, (-1,), 1, 0, 0.0),  # a negative block
        p.LockRequest(1, (2**63,), 1, 0, 0.0),  # past any volume
        p.LockRequest(1, (5,), 7, 0, 0.0),  # no such mode: Mode(7) crashed the master
        p.LockRequest(1, (5,), 1, 0, float("nan")),  # op_start that orders nothing
        p.PingDone(5, -1, 9, 0, 0, False, 0, 0),  # keep=9: Mode(9) crashed it too
        p.PingDone(5, -2, 0, 0, 0, False, 0, 0),  # -1 is "nobody"; -2 is nothing
        p.Release((-5,)),
        p.WriteRequest(((3, -1),), 0),
        p.WriteDone(((-3, 1),), 0),
        p.Stats(0, {"x": -1}),
    ],
)
def test_values_no_honest_peer_sends_are_refused_at_decoding(msg: p.Message):
    a, b = _authenticated_pair()
    b.receive_data(a.send(msg))
    with pytest.raises(p.ProtocolError, match="out of range"):
        b.next_event()
    assert b.rejected == 1


def test_values_honest_peers_send_still_pass():
    a, b = _authenticated_pair()
    for msg in [
        p.PingDone(5, -1, 0, 3, 4, True, 0, 9),  # to=-1: nobody
        p.Hello(1, -1, b"n" * 16),
        p.LockRequest(1, (0, 2**63 - 1), 2, 2**63 - 1, 12.5),
        p.StatusReply({"master": -1, "uptime": -3.5}),  # free-form: shown, not used
    ]:
        b.receive_data(a.send(msg))
        assert b.next_event()[0] == msg


async def test_an_unauthenticated_peer_cannot_make_us_buffer_more_than_a_handshake_frame():
    """Before the fix the handshake read 64 KiB at a time, whatever the
    frame it waited for could hold."""
    ours, theirs = trio.testing.memory_stream_pair()
    most = 0
    conn = p.Connection(KEY, -1, initiator=False)
    real_receive = conn.receive_data

    def receive_data(data: bytes) -> None:
        nonlocal most
        real_receive(data)
        most = max(most, conn.buffered)

    conn.receive_data = receive_data  # type: ignore[method-assign]
    link = Link(ours, conn)
    # A header that promises a whole handshake frame, then a flood.
    head = p._HEAD.pack(p.MAX_HANDSHAKE_FRAME, p.Hello.TYPE, 0)
    await theirs.send_all(head + b"\xc1" * (1 << 20))
    with pytest.raises(p.ProtocolError):
        await link._handshake()
    assert 0 < most <= p.MAX_HANDSHAKE_FRAME


async def test_the_master_counts_rejected_frames_in_status_and_describe():
    from sharedfs.master import MasterService

    master = MasterService(KEY)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(master.serve, "127.0.0.1", 0)
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(p._HEAD.pack(2**32 - 1, 1, 0))
                while await stream.receive_some(4096):  # its Hello, then it hangs up
                    pass
        # The warnings are logged per connection as it ends: let them finish.
        while master.rejected_frames < 3:  # noqa: ASYNC110
            await trio.sleep(0.01)
        assert master.status()["rejected_frames"] == 3
        assert "rejected frames 3" in master.describe()[0]
        nursery.cancel_scope.cancel()


async def test_an_insider_that_never_reads_is_cut_off_not_queued_for_without_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    """A joined peer (it knows the key) asks for status again and again and
    never reads the replies: once its queue at the master is full, the
    master ends its connection instead of queueing more."""
    from sharedfs import master as master_mod
    from sharedfs.link import open_master

    monkeypatch.setattr(master_mod, "OUTBOX_MAX", 64)
    master = master_mod.MasterService(KEY)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(master.serve, "127.0.0.1", 0)
        link = await open_master(("127.0.0.1", port), KEY, 5, exitcode=1)
        await link.send(p.Join(5, "127.0.0.1", 1, "fusion"))
        with trio.fail_after(30):
            while 5 not in master._links:  # noqa: ASYNC110 - no event for it
                await trio.sleep(0.01)
            with contextlib.suppress(LinkClosed):
                while 5 in master._links:
                    await link.send(p.StatusRequest())
            while master.directory.counters.hosts_failed < 1:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert any("node 5 has 64 messages unread" in r.getMessage() for r in caplog.records)
        await link.aclose()
        nursery.cancel_scope.cancel()


async def test_connections_that_never_finish_their_handshake_are_capped():
    """MAX_HANDSHAKES connections that send nothing hold their sockets for
    the handshake timeout; more are closed at once, not left to use up
    the master's file descriptors.  Once they go, an honest peer joins."""
    from sharedfs.link import MAX_HANDSHAKES, open_master
    from sharedfs.master import MasterService

    master = MasterService(KEY)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(master.serve, "127.0.0.1", 0)
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(MAX_HANDSHAKES)]
        with trio.fail_after(10):
            while master._handshakes.active < MAX_HANDSHAKES:  # noqa: ASYNC110
                await trio.sleep(0.01)
            extra = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(20)]
            for s in extra:
                assert await s.receive_some(4096) == b""  # closed, no Hello
        assert master.refused == 20
        for s in idle + extra:
            await s.aclose()
        with trio.fail_after(10):
            while master._handshakes.active:  # noqa: ASYNC110
                await trio.sleep(0.01)
        link = await open_master(("127.0.0.1", port), KEY, -1, exitcode=1)
        await link.aclose()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# Damaged volumes


async def test_damaged_volumes_mount_or_refuse_cleanly_and_fsck_repairs_them():
    report = await fuzz.fuzz_volumes(200, seed=3)
    assert report.failures == 0
    assert set(report.by_damage) == {"flip", "flip_sealed", "zero", "swap", "swap_sealed"}
    # The damage was felt: some mounts refused, some operations failed,
    # and fsck -y had work to do.
    assert report.refused > 0 and report.failed_ops > 0
    assert report.repaired > report.cases // 2


def _copy_block(storage, src: int, dst: int, *, as_blockno: int) -> None:  # type: ignore[no-untyped-def]
    """Put block `src` at `dst`, its header and checksum fixed up to pass
    for block `as_blockno`: damage only its meaning betrays."""
    bs = fuzz.read_superblock(storage).block_size
    block = bytearray(storage.read_sync(src * bs, bs))
    fuzz.struct.pack_into("<Q", block, 8, as_blockno)
    fuzz._reseal(block)
    storage.write_sync(dst * bs, block)


async def _log_header(storage) -> int:  # type: ignore[no-untyped-def]
    from sharedfs import journal

    return journal.Area.of(fuzz.read_superblock(storage)).header


async def test_fsck_restarts_a_log_whose_header_is_another_block():
    """fsck -y went through the core to rebuild directories, whose journal
    raised CorruptVolume on the log header: a traceback, and -n never clean."""
    from sharedfs.fsck import run_fsck

    storage = await fuzz.populated_volume(1)
    head = await _log_header(storage)
    _copy_block(storage, fuzz.metadata_blocks(storage)[-1], head, as_blockno=head)
    check = await run_fsck(storage, repair=False, force=True, progress=False)
    assert any("the log cannot be read" in x for x in check.problems)
    await run_fsck(storage, repair=True, force=True, progress=False)
    check = await run_fsck(storage, repair=False, force=True, progress=False)
    assert check.found_errors == 0, check.problems
    report = fuzz.VolumeReport()
    await fuzz.walk(fuzz.open_host(storage, fuzz.read_superblock(storage)), report)
    assert report.failed_ops == 0  # the files were never in the log's hands


async def test_fsck_checks_the_log_once_it_has_restored_the_superblock():
    """With the superblock damaged too (here: the two swapped), the log was
    skipped (nothing said where it was) and stayed broken after -y."""
    from sharedfs.fsck import run_fsck

    storage = await fuzz.populated_volume(1)
    head = await _log_header(storage)
    # The two swapped, each sealed for where it now lies.
    bs = fuzz.read_superblock(storage).block_size
    superblock, log_header = storage.read_sync(0, bs), storage.read_sync(head * bs, bs)
    for data, where in ((superblock, head), (log_header, 0)):
        block = bytearray(data)
        fuzz.struct.pack_into("<Q", block, 8, where)
        fuzz._reseal(block)
        storage.write_sync(where * bs, block)
    await run_fsck(storage, repair=True, force=True, progress=False)
    check = await run_fsck(storage, repair=False, force=True, progress=False)
    assert check.found_errors == 0, check.problems


async def test_an_insider_asking_for_a_block_past_the_volumes_end_is_dropped(
    caplog: pytest.LogCaptureFixture,
):
    """A joined peer asks for a lock on a block the volume does not have:
    no honest host does, so the master drops its connection (and keeps no
    state for that block) rather than grant it."""
    from sharedfs.link import open_master
    from sharedfs.master import MasterService

    master = MasterService(KEY, volume_blocks=1000)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(master.serve, "127.0.0.1", 0)
        link = await open_master(("127.0.0.1", port), KEY, 5, exitcode=1)
        await link.send(p.Join(5, "127.0.0.1", 1, "fusion"))
        assert isinstance(await link.receive(), p.Welcome)
        await link.send(p.LockRequest(1, (999,), int(p.Mode.S), 0, 0.0))
        assert isinstance(await link.receive(), p.Grant)  # the last block is fine
        await link.send(p.LockRequest(2, (5, 1000), int(p.Mode.X), 0, 0.0))
        with trio.fail_after(10):
            while (msg := await link.receive()) is not None:
                assert not isinstance(msg, p.Grant), msg
        assert 1000 not in master.directory.blocks and 5 not in master.directory.blocks
        assert any("past the volume's end (1000 blocks)" in r.getMessage() for r in caplog.records)
        await link.aclose()
        nursery.cancel_scope.cancel()
