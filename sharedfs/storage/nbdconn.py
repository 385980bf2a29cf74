"""One connection to an NBD server through libnbd, driven by trio or by poll().

libnbd speaks the protocol: the fixed newstyle handshake with NBD_OPT_GO
(export name, size, block size constraints, transmission flags), structured
replies, and any number of commands in flight on the one socket.  This
module runs libnbd's state machine: the handshake with a blocking poll()
loop and a deadline (in a worker thread when trio waits for it); commands
with completion callbacks, pumped either by trio system tasks (one waits
until the socket is readable, one writes while libnbd has output queued,
one watches for a server that stopped answering) or, for the synchronous
twins, by the same poll() loop.

A connection that dies is never revived: libnbd completes each command it
had in flight with ENOTCONN, and whoever owns the connection opens a new one.
"""

from __future__ import annotations

import errno
import logging
import re
import select
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

import trio

from ..errors import QuietError
from .uri import NbdAddress

log = logging.getLogger(__name__)

#: Completion errors that say the connection went away before the reply,
#: so the command may or may not have been done.  ESHUTDOWN is a server
#: refusing work because it is shutting down.
LOST = frozenset({errno.ENOTCONN, errno.ESHUTDOWN})
#: When the server does not say, the NBD spec's safe request size.
DEFAULT_MAX_REQUEST = 32 << 20

_READ, _WRITE = 1, 2  # libnbd's AIO_DIRECTION_READ, AIO_DIRECTION_WRITE
_CLOSED = "closed"


def libnbd() -> ModuleType:
    """Debian's libnbd bindings (python3-libnbd, linked into the venv by tools/setup)."""
    try:
        import nbd  # type: ignore[import-untyped]
    except ImportError:
        raise QuietError(
            "NBD volumes need the libnbd Python bindings (Debian's python3-libnbd): run tools/setup"
        ) from None
    return nbd


class ConnectFailed(Exception):
    """The server could not be reached, or refused the handshake."""


class Rejected(Exception):
    """libnbd refused a command before sending it (it breaks the export's limits)."""


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server said about the export in the handshake."""

    size: int
    min_block: int
    preferred_block: int
    max_request: int
    read_only: bool
    can_flush: bool
    can_fua: bool
    can_trim: bool
    can_multi_conn: bool


@dataclass(eq=False, slots=True)
class Command:
    """One NBD command; `error` is None until the server answered (0: done).

    `buf` is what a write sends, or where a read lands (a slice of the
    caller's buffer).  Each attempt on a connection starts it afresh."""

    kind: str  # "read", "write", "flush", "trim"
    offset: int = 0
    length: int = 0
    buf: Any = None
    fua: bool = False
    error: int | None = None
    done: trio.Event | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.kind} of {self.length} bytes at {self.offset}" if self.length else self.kind


def _describe(e: Exception) -> str:
    """libnbd's message without the name of the call that failed."""
    return re.sub(r"^nbd_\w+: ", "", getattr(e, "string", None) or str(e))


class Connection:
    """A libnbd handle, connected and negotiated.

    Attributes:
        info: the export, as the server described it.
        lost: why the connection died ("" while it lives).
        on_lost: called once when it dies (not when we close it).
        on_stalled: called each second in which commands wait and the
            server has answered nothing (it may abandon the connection).
        quiet_since: monotonic time since which commands have waited with no
            reply at all (of the last reply, or of the first command sent
            after the connection was idle).
    """

    on_lost: Callable[[Connection], None] | None = None
    on_stalled: Callable[[Connection], None] | None = None

    def __init__(self, nbd: ModuleType, h: Any, info: ExportInfo) -> None:
        self._nbd = nbd
        self._h = h
        self._fd: int = h.aio_get_fd()
        self.info = info
        self.lost = ""
        self.quiet_since = time.monotonic()
        self._in_flight: set[Command] = set()
        self._pumps: trio.lowlevel.TrioToken | None = None
        self._kick = trio.Event()

    # -- connecting ----------------------------------------------------------
    @classmethod
    def open(cls, address: NbdAddress, timeout: float) -> Connection:
        """Connect and negotiate within `timeout` seconds (blocking)."""
        nbd = libnbd()
        h = nbd.NBD()
        h.set_export_name(address.export)
        h.set_full_info(True)  # ask for block size constraints with NBD_OPT_GO
        h.set_pread_initialize(False)  # a failed read is an error, never data
        try:
            if address.socket:
                h.aio_connect_unix(address.socket)
            else:
                h.aio_connect_tcp(address.host, str(address.port))
            deadline = time.monotonic() + timeout
            while not h.aio_is_ready():
                if h.aio_is_dead() or h.aio_is_closed():
                    raise ConnectFailed("the server closed the connection during the handshake")
                if not _poll_once(h, deadline - time.monotonic()):
                    raise ConnectFailed(f"no handshake within {timeout:g} s")
        except nbd.Error as e:
            raise ConnectFailed(_describe(e)) from None
        info = _export_info(nbd, h)
        log.debug("%s: %s, %s", address, h.get_protocol(), asdict(info))
        return cls(nbd, h, info)

    # -- commands ------------------------------------------------------------
    def submit(self, cmd: Command) -> None:
        """Hand `cmd` to libnbd; its completion sets cmd.error (and cmd.done).
        It may complete at once: libnbd fails it while sending when it finds
        the connection dead."""
        cmd.error = None
        if self.lost:
            _answer(cmd, errno.ENOTCONN)
            return
        flags = self._nbd.CMD_FLAG_FUA if cmd.fua else 0

        def completed(err: Any) -> int:
            self._completed(cmd, err.value)
            return 1  # retire the command

        if not self._in_flight:
            self.quiet_since = time.monotonic()
        self._in_flight.add(cmd)
        try:
            if cmd.kind == "read":
                self._h.aio_pread(cmd.buf, cmd.offset, completion=completed)
            elif cmd.kind == "write":
                self._h.aio_pwrite(cmd.buf, cmd.offset, completion=completed, flags=flags)
            elif cmd.kind == "trim":
                self._h.aio_trim(cmd.length, cmd.offset, completion=completed)
            else:
                self._h.aio_flush(completion=completed)
        except self._nbd.Error as e:
            self._in_flight.discard(cmd)
            if not (self._h.aio_is_dead() or self._h.aio_is_closed()):
                raise Rejected(f"{cmd}: {_describe(e)}") from None
            _answer(cmd, errno.ENOTCONN)
            self._lose(_describe(e))
            return
        if self._h.aio_is_dead() or self._h.aio_is_closed():
            self._lose("the server closed the connection")
        elif self._h.aio_get_direction() & _WRITE:
            self._kick.set()  # libnbd has bytes to send: wake the writer

    def _completed(self, cmd: Command, err: int) -> None:
        if cmd not in self._in_flight:
            return  # failed already (a stall)
        self._in_flight.discard(cmd)
        self.quiet_since = time.monotonic()
        _answer(cmd, err)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _lose(self, why: str, err: int = errno.ENOTCONN) -> None:
        """The connection is dead: every command still waiting completes
        with `err` (libnbd has failed them with ENOTCONN already, or would)."""
        if self.lost:
            return
        self.lost = why
        self._kick.set()
        for cmd in list(self._in_flight):
            self._completed(cmd, err)
        if self.on_lost is not None and why != _CLOSED:
            self.on_lost(self)

    def _notify(self, fn: Callable[[], object]) -> None:
        """Run libnbd's state machine (`fn` tells it of socket events); a
        death is noted."""
        try:
            fn()
        except self._nbd.Error as e:
            self._lose(_describe(e))
        if not self.lost and (self._h.aio_is_dead() or self._h.aio_is_closed()):
            self._lose("the server closed the connection")

    def drop(self, why: str) -> None:
        """Stop using the connection; commands waiting may go again."""
        self._lose(why)

    def abandon(self, why: str) -> None:
        """Give up on the server: every command waiting fails with ETIMEDOUT."""
        self._lose(why, errno.ETIMEDOUT)

    # -- driven by trio ------------------------------------------------------
    def ensure_pumps(self) -> None:
        """Start this connection's reader, writer and watchdog in the running
        trio loop (system tasks: the Storage API is used across several trio
        runs and outside them, so no nursery of the caller's outlives them)."""
        token = trio.lowlevel.current_trio_token()
        if self._pumps is token or self.lost:
            return
        self._pumps = token
        for task in (self._reader, self._writer, self._watchdog):
            trio.lowlevel.spawn_system_task(task, name=f"nbd-{task.__name__[1:]}-{self._fd}")

    async def _reader(self) -> None:
        async def step() -> None:
            # Once ready, libnbd always wants to read: replies, or EOF.
            await trio.lowlevel.wait_readable(self._fd)
            if not self.lost:
                self._notify(self._h.aio_notify_read)

        try:
            await self._pump(step)
        finally:
            self._pumps = None

    async def _writer(self) -> None:
        async def step() -> None:
            await self._kick.wait()
            self._kick = trio.Event()
            while not self.lost and self._h.aio_get_direction() & _WRITE:
                await trio.lowlevel.wait_writable(self._fd)
                if not self.lost:
                    self._notify(self._h.aio_notify_write)

        await self._pump(step)

    async def _watchdog(self) -> None:
        async def step() -> None:
            await trio.sleep(1.0)
            self._check_stalled()

        await self._pump(step)

    async def _pump(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` until the connection is lost.  A system task must not
        raise (it would end the whole trio run), so a bug here is logged
        and ends the connection instead."""
        try:
            while not self.lost:
                await step()
        except trio.ClosedResourceError:
            pass  # closed under us (notify_closing)
        except Exception:
            log.exception("NBD connection pump failed")
            self._lose("internal error in the NBD client")

    def _check_stalled(self) -> None:
        quiet = time.monotonic() - self.quiet_since
        if self._in_flight and quiet >= 1.0 and self.on_stalled is not None:
            self.on_stalled(self)

    # -- driven by poll() ----------------------------------------------------
    def drive(self, cmds: list[Command]) -> None:
        """Pump the socket until every command in `cmds` is answered (or
        on_stalled gave up on them)."""
        while any(c.error is None for c in cmds):
            self._notify(lambda: _poll_once(self._h, 1.0))
            self._check_stalled()

    # -- closing -------------------------------------------------------------
    def close(self) -> None:
        """Say goodbye if the server still listens, then drop the socket."""
        if not self.lost and not self._in_flight:
            try:
                self._h.aio_disconnect()
                deadline = time.monotonic() + 2.0
                while not (self._h.aio_is_closed() or self._h.aio_is_dead()):
                    if not _poll_once(self._h, deadline - time.monotonic()):
                        break
            except self._nbd.Error:
                pass
        self._lose(_CLOSED)
        if self._pumps is not None:
            try:
                if trio.lowlevel.current_trio_token() is self._pumps:
                    trio.lowlevel.notify_closing(self._fd)
            except RuntimeError:
                pass  # not in a trio run: its pumps ended with it
        self._h = None  # libnbd closes the socket with the handle


def _answer(cmd: Command, err: int) -> None:
    cmd.error = err
    if cmd.done is not None:
        cmd.done.set()


def _poll_once(h: Any, timeout: float) -> bool:
    """Wait up to `timeout` seconds for the socket as libnbd wants it, and
    tell libnbd; False when nothing happened in time."""
    if timeout <= 0:
        return False
    direction = h.aio_get_direction()
    events = (select.POLLIN if direction & _READ else 0) | (
        select.POLLOUT if direction & _WRITE else 0
    )
    poller = select.poll()
    poller.register(h.aio_get_fd(), events)
    ready = poller.poll(timeout * 1000)
    for _, ev in ready:
        # Reading first: a reply may change what libnbd wants to write.
        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
            h.aio_notify_read()
        elif ev & select.POLLOUT:
            h.aio_notify_write()
    return bool(ready)


def _export_info(nbd: ModuleType, h: Any) -> ExportInfo:
    def block(kind: int) -> int:
        return int(h.get_block_size(kind))

    return ExportInfo(
        size=h.get_size(),
        min_block=block(nbd.SIZE_MINIMUM) or 1,
        preferred_block=block(nbd.SIZE_PREFERRED) or 4096,
        max_request=block(nbd.SIZE_MAXIMUM) or DEFAULT_MAX_REQUEST,
        read_only=bool(h.is_read_only()),
        can_flush=bool(h.can_flush()),
        can_fua=bool(h.can_fua()),
        can_trim=bool(h.can_trim()),
        can_multi_conn=bool(h.can_multi_conn()),
    )
