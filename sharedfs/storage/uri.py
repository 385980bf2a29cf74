"""Volume URIs: the NBD forms qemu and libnbd use, parsed and checked.

    nbd://HOST[:PORT][/EXPORT]                TCP (port 10809 by default)
    nbd+unix:///[EXPORT]?socket=PATH          a unix socket on this machine

Anything else with `://` in it is a mistake, and says so in one line.  No I/O
here: parsing only (a relative socket path is made absolute, since a
daemonized mount reconnects from /).
"""

from __future__ import annotations

import os.path
import urllib.parse
from dataclasses import dataclass

from ..errors import QuietError

__all__ = ["NbdAddress", "is_uri", "parse_nbd_uri"]

NBD_PORT = 10809
FORMS = "nbd://HOST[:PORT][/EXPORT] or nbd+unix:///[EXPORT]?socket=PATH"


@dataclass(frozen=True, slots=True)
class NbdAddress:
    """Where an NBD export is: `socket` for a unix socket, else host and port."""

    export: str
    host: str = ""
    port: int = NBD_PORT
    socket: str = ""

    def __str__(self) -> str:
        export = urllib.parse.quote(self.export, safe="")
        if self.socket:
            return f"nbd+unix:///{export}?socket={urllib.parse.quote(self.socket)}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{export}"


def is_uri(name: str) -> bool:
    """A volume named by URI rather than by path."""
    return "://" in name


def parse_nbd_uri(uri: str) -> NbdAddress:
    """The address in `uri`, or a QuietError (exit 2) saying what is wrong."""
    try:
        return _parse(uri)
    except ValueError as e:
        raise QuietError(f"{uri}: {e} (volume URIs are {FORMS})", 2) from None


def _parse(uri: str) -> NbdAddress:
    parts = urllib.parse.urlsplit(uri)
    if parts.fragment:
        raise ValueError("a volume URI has no #fragment")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    if parts.scheme == "nbd":
        if query:
            raise ValueError(f"unknown query {parts.query!r}")
        if parts.username is not None or not parts.hostname:
            raise ValueError("give the server as nbd://HOST[:PORT]")
        port = parts.port  # ValueError when not a number in 0..65535
        if port == 0:
            raise ValueError("port 0 is not a server's port")
        return NbdAddress(export, host=parts.hostname, port=port or NBD_PORT)
    if parts.scheme == "nbd+unix":
        if parts.netloc:
            raise ValueError("a unix socket URI has no host: write nbd+unix:///EXPORT?socket=PATH")
        sockets = query.pop("socket", [])
        if query:
            raise ValueError(f"unknown query parameter {sorted(query)[0]!r}")
        if len(sockets) != 1 or not sockets[0]:
            raise ValueError("say which socket: ?socket=PATH")
        return NbdAddress(export, socket=os.path.abspath(sockets[0]))
    if parts.scheme in ("nbds", "nbds+unix", "nbd+vsock", "nbds+vsock"):
        raise ValueError(f"{parts.scheme}:// is not supported")
    raise ValueError(f"unknown scheme {parts.scheme!r}")
