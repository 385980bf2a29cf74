"""The NBD backend: the shared volume is an export of an NBD server.

Each host has its own connection to the export (nbdkit, qemu-nbd,
nbd-server...), with many requests in flight on it.  Requests are cut to
the export's limits: no longer than its maximum request, writes aligned to
its minimum block (reads are widened to it).

Several hosts, several connections.  The cluster needs what a shared disk
gives: a write one host completed is what another host reads next, and a
flush makes durable what was written before it.  The NBD spec promises that
across connections only when the server advertises multi-conn
(NBD_FLAG_CAN_MULTI_CONN: no cache, or one shared by all connections); the
volume's `shared` attribute says which, and `mount` will not let a host join
a cluster on an export without it.

Faults.  When the connection dies (the server went away, crashed, or was
restarted), the requests it had not answered are not known to be done:
they are sent again on a new connection, which is tried with growing waits
(each attempt one log line) for `timeout` seconds after the loss; then the
volume fails for good with a StorageError, as does every later request.  A
write sent again is no different from a slow write: the caller has not been
told it is done.  A server that keeps the connection but stops answering
is not left for a new connection (what it holds might still land, after
newer writes from elsewhere): after `timeout` seconds of silence the
waiting requests, and the volume, fail.  Writes the server acknowledged but
did not flush are its to keep, as a disk's cache is; they are not replayed.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import trio

from ..errors import QuietError, StorageError
from . import Storage
from .nbdconn import LOST, Command, ConnectFailed, Connection, ExportInfo, Rejected
from .uri import NbdAddress, parse_nbd_uri

log = logging.getLogger(__name__)

#: How long a host keeps trying to reach a server it lost (mount --nbd-timeout).
DEFAULT_TIMEOUT = 30.0
#: The longest one connection attempt may take (a server that accepts and
#: never shakes hands).
CONNECT_TIMEOUT = 10.0
#: Waits between attempts: the first, then doubling up to the last.
RETRY_FIRST, RETRY_MOST = 0.1, 5.0
#: A server silent this long while requests wait gets a log line, and
#: another each STALL_LOG_EVERY seconds until it answers or times out.
STALL_LOG_AFTER = STALL_LOG_EVERY = 5.0
#: Trims go in pieces of at most this (the protocol's length is 32 bits).
TRIM_MOST = 1 << 30


class _Retry:
    """The attempts to reach the server again after the connection was lost:
    when the next is due, and when to give up.

    Attributes:
        attempts: failed attempts so far.
    """

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.started = time.monotonic()
        self.attempts = 0
        self._delay = RETRY_FIRST

    def wait(self) -> float:
        """Seconds to sleep before the next attempt."""
        return max(0.0, min(self._delay, self.left()))

    def connect_timeout(self) -> float:
        return max(1.0, min(CONNECT_TIMEOUT, self.left()))

    def failed(self, why: str) -> str:
        """Count a failed attempt: the reason to give up ("" to go on)."""
        self.attempts += 1
        elapsed = time.monotonic() - self.started
        if self.left() <= 0:
            return (
                f"{self.name}: NBD server lost for {elapsed:.0f} s, "
                f"{self.attempts} reconnect attempts failed: {why}"
            )
        self._delay = min(self._delay * 2, RETRY_MOST)
        log.warning(
            "%s: reconnect attempt %d failed (%s); next in %.1f s, giving up %.0f s after the loss",
            self.name,
            self.attempts,
            why,
            self.wait(),
            self.timeout,
        )
        return ""

    def left(self) -> float:
        return self.started + self.timeout - time.monotonic()


class NbdStorage(Storage):
    """A volume on an NBD export, through one connection at a time.

    Attributes:
        address: where the export is.
        timeout: how long to keep trying after losing the server.
        writable: False for tools that must not write (fsck -n).
        reconnects: connections opened after losing one.
        resent: requests sent again after their connection died.
    """

    pipelined = True

    def __init__(
        self, address: NbdAddress, conn: Connection, *, timeout: float, writable: bool
    ) -> None:
        self.address = address
        self.name = str(address)
        self.size = conn.info.size
        self.shared = conn.info.can_multi_conn
        self.min_block = conn.info.min_block
        self.timeout = timeout
        self.writable = writable
        self.reads = 0
        self.writes = 0
        self.reconnects = 0
        self.resent = 0
        self._conn = conn
        self._watch(conn)
        self._retry: _Retry | None = None
        self._failed = ""
        self._stall_logged = 0.0
        self._reconnecting = trio.Lock()
        self._blocking = threading.Lock()
        # The trio run whose tasks use the volume: other threads' sync calls
        # go through it rather than drive the same socket beside it.
        self._loop: trio.lowlevel.TrioToken | None = None

    @classmethod
    def open(
        cls, uri: str, *, timeout: float = DEFAULT_TIMEOUT, writable: bool = True
    ) -> NbdStorage:
        """Connect now: an unreachable server or a refused export is one line."""
        address = parse_nbd_uri(uri)
        try:
            conn = Connection.open(address, min(CONNECT_TIMEOUT, max(timeout, 1.0)))
        except ConnectFailed as e:
            raise QuietError(f"{address}: cannot use the NBD export: {e}") from None
        if writable and conn.info.read_only:
            conn.close()
            raise QuietError(f"{address}: the NBD export is read-only")
        if writable and not conn.info.can_flush:
            log.info(
                "%s: the server offers no flush: writes are as durable as it makes them", address
            )
        return cls(address, conn, timeout=timeout, writable=writable)

    @property
    def info(self) -> ExportInfo:
        """What the server said about the export (on the current connection)."""
        return self._conn.info

    # -- requests --------------------------------------------------------------
    def _reads(self, offset: int, length: int) -> tuple[memoryview, list[Command]]:
        """Commands reading [offset, offset+length), widened to the export's
        blocks, and the view of their buffer that holds the range."""
        self._check_range(offset, length)
        self.reads += 1
        mb = self.min_block
        lo, hi = offset // mb * mb, -(-(offset + length) // mb) * mb
        buf = memoryview(bytearray(hi - lo))
        cmds = [Command("read", lo + a, b - a, buf[a:b]) for a, b in _pieces(hi - lo, self._max())]
        return buf[offset - lo : offset - lo + length], cmds

    def _writes(
        self, offset: int, data: bytes | bytearray | memoryview, fua: bool
    ) -> list[Command]:
        self._check_writable()
        self._check_range(offset, len(data))
        mb = self.min_block
        if offset % mb or len(data) % mb:
            raise StorageError(
                f"{self.name}: write at {offset}+{len(data)} is not aligned to the "
                f"export's {mb}-byte blocks"
            )
        self.writes += 1
        fua = fua and self.info.can_fua
        view = memoryview(data).cast("B")
        return [
            Command("write", offset + a, b - a, view[a:b], fua)
            for a, b in _pieces(len(data), self._max())
        ]

    def _trims(self, offset: int, length: int) -> list[Command]:
        self._check_writable()
        self._check_range(offset, length)
        if not self.info.can_trim:
            return []
        mb = self.min_block
        lo, hi = -(-offset // mb) * mb, (offset + length) // mb * mb
        most = TRIM_MOST // mb * mb
        return [Command("trim", lo + a, b - a) for a, b in _pieces(max(0, hi - lo), most)]

    def _flushes(self) -> list[Command]:
        return [Command("flush")] if self.writable and self.info.can_flush else []

    def _max(self) -> int:
        mb = self.min_block
        return max(mb, self.info.max_request // mb * mb)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(f"{self.name}: I/O at {offset}+{length} is past the end")

    def _check_writable(self) -> None:
        if not self.writable:
            raise StorageError(f"{self.name}: opened read-only")

    # -- async interface -------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        view, cmds = self._reads(offset, length)
        await self._run(cmds)
        return bytes(view)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        await self._run(self._writes(offset, data, fua))
        if fua and not self.info.can_fua:
            await self.flush()

    async def flush(self) -> None:
        await self._run(self._flushes())

    async def trim(self, offset: int, length: int) -> None:
        await self._run(self._trims(offset, length))

    async def _run(self, cmds: list[Command]) -> None:
        """Send `cmds` and wait for every answer; those lost with their
        connection go again on the next one."""
        while cmds:
            conn = await self._connection()
            answered = [trio.Event() for _ in cmds]
            for c, done in zip(cmds, answered, strict=True):
                c.done = done
                self._submit(conn, c)
            for done in answered:
                await done.wait()
            cmds = self._unanswered(conn, cmds)

    async def _connection(self) -> Connection:
        self._loop = trio.lowlevel.current_trio_token()
        while self._conn.lost:
            async with self._reconnecting:  # one task reconnects; the others wait
                if not self._conn.lost:
                    break
                retry = self._retry_for_loss()
                await trio.sleep(retry.wait())
                try:
                    conn = await trio.to_thread.run_sync(
                        Connection.open, self.address, retry.connect_timeout()
                    )
                except ConnectFailed as e:
                    self._attempt_failed(retry, str(e))
                    continue
                self._replace(conn)
        self._conn.ensure_pumps()
        return self._conn

    # -- synchronous twins -----------------------------------------------------
    def read_sync(self, offset: int, length: int) -> bytes:
        if (token := self._loop_elsewhere()) is not None:
            return trio.from_thread.run(self.read, offset, length, trio_token=token)
        view, cmds = self._reads(offset, length)
        self._run_blocking(cmds)
        return bytes(view)

    def write_sync(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if (token := self._loop_elsewhere()) is not None:
            return trio.from_thread.run(self.write, offset, data, trio_token=token)
        self._run_blocking(self._writes(offset, data, False))

    def _loop_elsewhere(self) -> trio.lowlevel.TrioToken | None:
        """The trio run driving this volume, when the caller is not in it.

        A trio worker thread goes through its own run even before the volume
        has seen that run: the mount's first heartbeat races its first reads,
        and a thread polling the socket beside the run's pumps would read
        replies whose tasks it cannot wake.  A thread trio did not start may
        drive the socket only while no run uses the volume."""
        for find in (lambda: self._loop, _workers_run):
            token = find()
            if token is None:
                continue
            try:
                if trio.lowlevel.current_trio_token() is token:
                    return None  # its own thread: the loop waits while we block
            except RuntimeError:
                pass
            try:
                trio.from_thread.run_sync(lambda: None, trio_token=token)
            except trio.RunFinishedError:
                if token is self._loop:
                    self._loop = None
                continue
            return token
        return None

    def _run_blocking(self, cmds: list[Command]) -> None:
        """_run, for callers with no trio run to wait in."""
        with self._blocking:
            while cmds:
                conn = self._connection_blocking()
                for c in cmds:
                    self._submit(conn, c)
                conn.drive(cmds)
                cmds = self._unanswered(conn, cmds)

    def _connection_blocking(self) -> Connection:
        while self._conn.lost:
            retry = self._retry_for_loss()
            time.sleep(retry.wait())
            try:
                conn = Connection.open(self.address, retry.connect_timeout())
            except ConnectFailed as e:
                self._attempt_failed(retry, str(e))
                continue
            self._replace(conn)
        return self._conn

    # -- faults ----------------------------------------------------------------
    def _submit(self, conn: Connection, cmd: Command) -> None:
        try:
            conn.submit(cmd)
        except Rejected as e:
            raise StorageError(f"{self.name}: {e}") from None

    def _unanswered(self, conn: Connection, cmds: list[Command]) -> list[Command]:
        """Of `cmds`, all answered on `conn` now, those lost with the
        connection; a failure the server reported, or giving up, is a
        StorageError."""
        if self._failed:
            raise StorageError(self._failed)
        lost = []
        for c in cmds:
            if c.error in LOST:
                lost.append(c)
            elif c.error:
                raise StorageError(f"{self.name}: {c} failed: {os.strerror(c.error)}")
        if lost:
            self.resent += len(lost)
            conn.drop("the server is shutting down")  # after ESHUTDOWN it may live on
        elif self._retry is not None:
            self._retry = None  # answered: the server is back for real
        return lost

    def _watch(self, conn: Connection) -> None:
        conn.on_lost = self._lost
        conn.on_stalled = self._stalled

    def _lost(self, conn: Connection) -> None:
        """The current connection died.  The time allowed to get another
        runs from the first loss until a request is answered again: a
        server that takes connections and drops them is no better than one
        that is gone."""
        if conn is not self._conn or self._failed:
            return
        if self._retry is None:
            self._retry = _Retry(self.name, self.timeout)
        log.warning(
            "%s: connection to the NBD server lost (%s); reconnecting for up to %.0f s more",
            self.name,
            conn.lost,
            self._retry.left(),
        )

    def _retry_for_loss(self) -> _Retry:
        if self._failed:
            raise StorageError(self._failed)
        if self._retry is None:
            self._retry = _Retry(self.name, self.timeout)
        return self._retry

    def _attempt_failed(self, retry: _Retry, why: str) -> None:
        give_up = retry.failed(why)
        if give_up:
            self._fail(give_up)
            raise StorageError(give_up)

    def _replace(self, conn: Connection) -> None:
        """Use the new connection `conn` from now on."""
        old, self._conn = self._conn, conn
        old.close()
        if conn.info.size != self.size:
            conn.close()
            msg = (
                f"{self.name}: after reconnecting the export is {conn.info.size} bytes, "
                f"not {self.size}: not the same volume"
            )
            self._fail(msg)
            raise StorageError(msg)
        self._watch(conn)
        self.reconnects += 1
        log.warning(
            "%s: reconnected to the NBD server %.1f s after losing it; "
            "unanswered requests go again",
            self.name,
            time.monotonic() - self._retry.started if self._retry else 0.0,
        )

    def _stalled(self, conn: Connection) -> None:
        """Requests wait on `conn` and the server has said nothing for a while."""
        now = time.monotonic()
        quiet = now - conn.quiet_since
        if quiet >= self.timeout:
            self._fail(
                f"{self.name}: the NBD server has not answered for {quiet:.0f} s; "
                "giving up on it (what it holds might still land, so no request goes again)"
            )
            conn.abandon("no answer")
        elif quiet >= STALL_LOG_AFTER and now - self._stall_logged >= STALL_LOG_EVERY:
            self._stall_logged = now
            log.warning(
                "%s: no answer from the NBD server for %.0f s (%d requests waiting); "
                "giving up after %g s",
                self.name,
                quiet,
                conn.in_flight,
                self.timeout,
            )

    def _fail(self, msg: str) -> None:
        if not self._failed:
            self._failed = msg
            log.error("%s", msg)

    def close(self) -> None:
        self._failed = self._failed or f"{self.name}: closed"
        self._conn.close()


def _workers_run() -> trio.lowlevel.TrioToken | None:
    """The trio run this thread works for, if trio.to_thread started it."""
    try:
        return trio.from_thread.run_sync(trio.lowlevel.current_trio_token)
    except RuntimeError:  # not a trio worker thread, or its run has ended
        return None


def _pieces(length: int, most: int) -> list[tuple[int, int]]:
    """[0, length) in consecutive pieces of at most `most` bytes."""
    return [(a, min(a + most, length)) for a in range(0, length, most)]
