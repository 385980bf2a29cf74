"""link.Link: the handshake over a real trio stream, however TCP cuts the bytes."""

from __future__ import annotations

import trio
import trio.testing

from sharedfs import protocol as p
from sharedfs.link import Link, parse_address

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
