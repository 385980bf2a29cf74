"""link.Link: the handshake over a real trio stream, however TCP cuts the bytes."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sharedfs import protocol as p
from sharedfs.link import Link, LinkClosed, LocalLink, parse_address
from sharedfs.master import MasterService

KEY = b"k" * 32


class OneChunkPeer(trio.abc.Stream):
    """A peer whose Auth and first message reach us in a single chunk, as
    they do over TCP when it completes its side of the handshake first."""

    def __init__(self, first: p.Message) -> None:
        self.conn = p.Connection(KEY, 7, initiator=True)
        self.first = first
        self.outbox = self.conn.hello()
        self.held = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.conn.receive_data(bytes(data))
        while True:
            msg, out = self.conn.next_event()
            self.held += out
            if msg is None and not out:
                break
        if self.conn.authenticated:
            self.outbox += self.held + self.conn.send(self.first)
            self.held = b""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        data, self.outbox = self.outbox, b""
        return data

    async def send_eof(self) -> None:
        pass

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_first_message_in_the_handshake_chunk_is_not_lost():
    peer = OneChunkPeer(p.Join(7, "127.0.0.1", 1234, "fusion"))
    link = await Link.open(peer, KEY, -1, initiator=False)
    assert link.peer_node == 7
    assert await link.receive() == p.Join(7, "127.0.0.1", 1234, "fusion")
    assert await link.receive() is None  # the fake peer then closes


async def test_links_talk_over_memory_streams():
    a_stream, b_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as n:
        result = {}

        async def side_b() -> None:
            link = await Link.open(b_stream, KEY, 2, initiator=False)
            result["b"] = await link.receive()
            await link.send(p.Welcome(5, {}, "fusion", 5.0))

        n.start_soon(side_b)
        a = await Link.open(a_stream, KEY, 1, initiator=True)
        await a.send(p.Join(1, "h", 9, "fusion"))
        assert await a.receive() == p.Welcome(5, {}, "fusion", 5.0)
    assert result["b"] == p.Join(1, "h", 9, "fusion")


def test_parse_address():
    assert parse_address("10.0.0.1:7400") == ("10.0.0.1", 7400)
    assert parse_address(":0") == ("127.0.0.1", 0)
    assert parse_address("host") == ("host", 7400)
    assert parse_address("[::1]:80") == ("::1", 80)


async def test_a_local_link_hands_messages_over_and_ends_as_a_link_does():
    a, b = LocalLink.pair()
    msg = p.Beat()
    await a.send(msg)
    assert await b.receive() is msg  # the message itself: nothing encoded
    assert (a.sent, b.received) == (1, 1)
    await a.aclose()
    assert await b.receive() is None  # as a closed connection reads
    with pytest.raises(LinkClosed):
        await b.send(p.Beat())


async def test_a_host_joins_the_master_in_its_process_by_a_local_link():
    """connect_local: the Join and the lock traffic reach the master as
    messages, no socket; status says the host is local; the link's end
    is the host's leaving; a stopped master has no local link to give."""
    master = MasterService(KEY)
    async with trio.open_nursery() as n:
        await n.start(master.serve)
        link = master.connect_local()
        await link.send(p.Join(5, "127.0.0.1", 1, "fusion"))
        assert isinstance(await link.receive(), p.Welcome)
        await link.send(p.LockRequest(1, (40, 41), int(p.Mode.X), 0, 0.0))
        grant = await link.receive()
        assert isinstance(grant, p.Grant) and grant.blocks == (40, 41)
        assert master.status()["hosts"][5]["local"] is True  # type: ignore[index]
        assert master.directory.counters.lock_requests == 1
        await link.send(p.Bye())
        await link.aclose()
        with trio.fail_after(5):
            while master.status()["hosts"]:  # noqa: ASYNC110 - gone once its session ends
                await trio.sleep(0.01)
        master.stop("the test is done")
    with pytest.raises(LinkClosed):
        master.connect_local()
