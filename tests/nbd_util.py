"""NBD servers for tests: nbdkit and qemu-nbd, started and killed by the test,
on loopback TCP (a free port) or on a unix socket in a private directory."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mount_util import wait_for


def _libnbd() -> bool:
    try:
        import nbd  # noqa: F401
    except ImportError:
        return False
    return True


needs_nbdkit = pytest.mark.skipif(
    not (shutil.which("nbdkit") and _libnbd()), reason="needs nbdkit and python3-libnbd"
)
needs_qemu_nbd = pytest.mark.skipif(
    not (shutil.which("qemu-nbd") and _libnbd()), reason="needs qemu-nbd and python3-libnbd"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One NBD server process and the URI that reaches it.

    `command(server)` gives the argv; the server is ready once it has
    written its pid file (nbdkit and qemu-nbd both do that once listening).
    kill() is a crash; start() brings the server back on the same address.
    """

    def __init__(
        self, command: Callable[[Server], list[str]], *, unix: bool, export: str = ""
    ) -> None:
        # Short: a unix socket path has room for 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="sfs-nbd-", dir="/tmp"))
        self.socket = str(self.dir / "sock") if unix else ""
        self.port = 0 if unix else free_port()
        self.export = export
        self.pidfile = self.dir / "pid"
        self.log = self.dir / "server.log"
        self._command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def uri(self) -> str:
        if self.socket:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def listen_args(self, unix: str, host: str, port: str) -> list[str]:
        """The server's options for where to listen, in its own spelling."""
        return [unix, self.socket] if self.socket else [host, "127.0.0.1", port, str(self.port)]

    @property
    def pause_control(self) -> str:
        """Where nbdkit's pause filter listens (pass pause-control=...)."""
        return str(self.dir / "pause.ctl")

    def start(self) -> None:
        # A killed server leaves these behind, and refuses to start over them.
        for stale in (self.pidfile, Path(self.socket or self.pidfile), Path(self.pause_control)):
            stale.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._command(self), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

        def ready() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"server exited: {self.log.read_text()}"
            return self.pidfile.exists() and self.pidfile.stat().st_size > 0

        wait_for(ready, what=f"NBD server at {self.uri}")

    def pause(self, on: bool = True) -> None:
        """Hold every request from now on (nbdkit's pause filter), or resume."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(self.pause_control)
            s.sendall(b"p" if on else b"r")
            assert s.recv(1) == (b"P" if on else b"R")

    def kill(self) -> None:
        """What a crash does: gone at once, mid-request."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()  # a paused server would wait for ever on what it holds
        shutil.rmtree(self.dir, ignore_errors=True)


def nbdkit(*args: str, unix: bool = False, export: str = "", pause: bool = False) -> Server:
    """nbdkit serving `args` (plugin, its parameters, --filter=...); with
    `pause`, under nbdkit's pause filter (Server.pause)."""

    def command(s: Server) -> list[str]:
        where = s.listen_args("-U", "-i", "-p")
        run = ["nbdkit", "-f", "--exit-with-parent", "-P", str(s.pidfile), *where]
        if pause:  # a filter before the plugin, its parameter after
            return [*run, "--filter=pause", *args, f"pause-control={s.pause_control}"]
        return [*run, *args]

    return Server(command, unix=unix, export=export)


def qemu_nbd(image: Path, *args: str, unix: bool = False, export: str = "") -> Server:
    """qemu-nbd serving a raw image; -t: it outlives its clients."""

    def command(s: Server) -> list[str]:
        where = s.listen_args("-k", "-b", "-p")
        name = ["-x", export] if export else []
        pid = ["--pid-file", str(s.pidfile)]
        return ["qemu-nbd", "-t", "-f", "raw", *pid, *where, *name, *args, str(image)]

    return Server(command, unix=unix, export=export)


class Servers:
    """The servers one test starts, stopped after it (the nbd_servers fixture)."""

    def __init__(self) -> None:
        self.started: list[Server] = []

    def nbdkit(self, *args: str, unix: bool = False, pause: bool = False) -> Server:
        return self._keep(nbdkit(*args, unix=unix, pause=pause))

    def qemu_nbd(self, image: Path, *args: str, unix: bool = False, export: str = "") -> Server:
        return self._keep(qemu_nbd(image, *args, unix=unix, export=export))

    def _keep(self, s: Server) -> Server:
        self.started.append(s)
        return s

    def stop(self) -> None:
        for s in self.started:
            s.stop()


def sparse_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextmanager
def one_export_two_ways(size: str) -> Iterator[tuple[str, str]]:
    """One nbdkit memory export, reached over a unix socket and, through a
    second nbdkit relaying each connection to it, over loopback TCP: yields
    (tcp_uri, unix_uri).  nbdkit listens on one kind of socket at a time;
    the relay keeps it one export (and passes on its multi-conn)."""
    export = nbdkit("memory", size, unix=True)
    try:
        relay = nbdkit("nbd", f"socket={export.socket}")
        try:
            yield relay.uri, export.uri
        finally:
            relay.stop()
    finally:
        export.stop()
