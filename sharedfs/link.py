"""Trio glue for protocol.Connection: an authenticated message link on a stream.

Used for every connection: host to master, host to host, tool to master;
but a host's link to the master running in its own process is a
`LocalLink`, which hands the messages over as they are.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator

import trio

from . import protocol as p
from .errors import QuietError
from .tls import Tls, handshake_failure, secure

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
#: Connections in their handshake at once, per listener.  One that sends
#: nothing holds a socket and a task until HANDSHAKE_TIMEOUT: thousands of
#: them would use up the process's file descriptors, and its hosts' too.
MAX_HANDSHAKES = 128
_RECV = 65536


class LinkClosed(Exception):
    """The other side went away."""


class Handshakes:
    """A listener's count of connections in their handshake (MAX_HANDSHAKES)."""

    def __init__(self) -> None:
        self.active = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Inside, one handshake; LinkClosed at once if `limit` are running."""
        if self.active >= MAX_HANDSHAKES:
            raise LinkClosed(f"{self.active} connections already in their handshake")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class Link:
    """Attributes:
    peer_node: the other side's node id (from its Hello).
    rejected: frames refused on this link.
    """

    def __init__(self, stream: trio.abc.Stream, conn: p.Connection) -> None:
        self.stream = stream
        self.conn = conn
        self._send_lock = trio.Lock()
        self.sent = 0
        self.received = 0
        self._early: list[p.Message] = []

    @property
    def peer_node(self) -> int:
        assert self.conn.peer_node is not None
        return self.conn.peer_node

    @classmethod
    async def open(
        cls,
        stream: trio.abc.Stream,
        key: bytes,
        node: int,
        *,
        initiator: bool,
        tls: Tls | None = None,
    ) -> Link:
        """Run the handshake (TLS first, with `tls`); raise AuthError,
        ProtocolError or LinkClosed."""
        if tls is not None:
            try:
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    stream = await secure(stream, tls, server=not initiator)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise LinkClosed(f"TLS handshake failed: {handshake_failure(e)}") from None
        link = cls(stream, p.Connection(key, node, initiator=initiator))
        try:
            await link._handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            # A peer that dies mid-handshake is a closed link, nothing worse.
            raise LinkClosed(f"broken during the handshake: {e}") from None
        return link

    async def _handshake(self) -> None:
        stream, conn = self.stream, self.conn
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.send_all(conn.hello())
            while not conn.authenticated:
                # Both handshake frames may arrive in one chunk: use up what
                # is buffered before waiting for more.
                before = conn.buffered
                msg, reply = conn.next_event()
                if reply:
                    await stream.send_all(reply)
                if msg is not None:
                    self._early.append(msg)  # the first frames after the handshake
                if conn.authenticated or conn.buffered < before:
                    continue
                # Never more than the frame being waited for could hold: a
                # peer that does not know the key makes us buffer at most
                # MAX_HANDSHAKE_FRAME bytes, however much it sends.
                data = await stream.receive_some(p.MAX_HANDSHAKE_FRAME - conn.buffered)
                if not data:
                    raise LinkClosed("closed during the handshake")
                conn.receive_data(data)

    async def send(self, msg: p.Message) -> None:
        async with self._send_lock:
            # Framed under the lock: sequence numbers must go out in order.
            data = self.conn.send(msg)
            try:
                # Never cancelled midway: half a frame breaks the link for
                # every other task that uses it.
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise LinkClosed(str(e)) from None
        self.sent += 1

    async def receive(self) -> p.Message | None:
        """The next message, or None once the other side has closed;
        ProtocolError on garbage.  A loop, not an async generator: a
        generator left by a raising loop body is never closed (a
        ResourceWarning per refused connection)."""
        if self._early:
            self.received += 1
            return self._early.pop(0)
        while True:
            msg, _ = self.conn.next_event()
            if msg is not None:
                self.received += 1
                return msg
            try:
                data = await self.stream.receive_some(_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return None
            if not data:
                return None
            self.conn.receive_data(data)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class LocalLink:
    """One end of a link within this process: a host and the master it
    runs (embedded, or the successor it became).  The messages themselves
    pass through memory channels: no socket, framing, MAC or decoding, so
    a lock request to our own master costs no network message.  Nothing
    outside the process can reach it, so nothing is authenticated.  Ends
    as a Link does: receive() gives None once the other end has closed,
    send() raises LinkClosed."""

    def __init__(
        self, send: trio.MemorySendChannel[p.Message], recv: trio.MemoryReceiveChannel[p.Message]
    ) -> None:
        self._send, self._recv = send, recv
        self.sent = 0
        self.received = 0

    @classmethod
    def pair(cls) -> tuple[LocalLink, LocalLink]:
        # Unbounded, as a socket's buffers nearly are: the master's outbox
        # for each host already bounds what waits for it.
        a_send, b_recv = trio.open_memory_channel[p.Message](math.inf)
        b_send, a_recv = trio.open_memory_channel[p.Message](math.inf)
        return cls(a_send, a_recv), cls(b_send, b_recv)

    async def send(self, msg: p.Message) -> None:
        try:
            await self._send.send(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise LinkClosed("the other end closed") from None
        self.sent += 1

    async def receive(self) -> p.Message | None:
        try:
            msg = await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None
        self.received += 1
        return msg

    async def aclose(self) -> None:
        self._send.close()
        self._recv.close()
        await trio.lowlevel.cancel_shielded_checkpoint()  # closing, as Link's, is never cancelled


#: Either kind of link to a master.
AnyLink = Link | LocalLink


def parse_address(text: str, default_port: int = 7400) -> tuple[str, int]:
    """'host:port', 'host' or ':port' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or "127.0.0.1", default_port
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def open_master(
    addr: tuple[str, int], key: bytes, node: int, *, exitcode: int, tls: Tls | None = None
) -> Link:
    """An authenticated link to the lock master at `addr` (as `node`, -1 for
    a tool); if there is none, a QuietError naming the cause and the fix."""
    where = f"master {addr[0]}:{addr[1]}"
    try:
        stream = await trio.open_tcp_stream(*addr)
    except OSError as e:
        raise QuietError(f"cannot reach {where}: {_why(e)}; is it running?", exitcode) from None
    try:
        return await Link.open(stream, key, node, initiator=True, tls=tls)
    except p.AuthError:
        await stream.aclose()
        raise QuietError(
            f"{where} refused this volume's cluster key: it is the master of another volume",
            exitcode,
        ) from None
    except (p.ProtocolError, LinkClosed, trio.BrokenResourceError, trio.TooSlowError) as e:
        await stream.aclose()
        why = str(e) or "no answer to the handshake"
        if tls is not None or "TLS" in why:
            raise QuietError(
                f"{where}: {why}; does it use --tls with a certificate of this cluster's CA?",
                exitcode,
            ) from None
        raise QuietError(
            f"{where}: {why}; is it a sharedfs master (one run with --tls needs --tls here too)?",
            exitcode,
        ) from None


def _why(e: OSError) -> str:
    """trio gathers one failure per address tried: the first says why."""
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup) and isinstance(cause.exceptions[0], OSError):
        e = cause.exceptions[0]
    if e.errno and e.errno > 0:
        return os.strerror(e.errno)
    return e.strerror or str(e)
