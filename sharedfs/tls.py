"""TLS for every connection of a cluster, as an option (`--tls DIR`).

It runs under the HMAC challenge of the cluster key, not instead of it: TLS
keeps block contents and lock traffic private on the wire, and adds a second
check, by certificate.  DIR holds `ca.pem` (the cluster's own certificate
authority), `cert.pem` and `key.pem` (this machine's certificate, signed by
that CA, and its key).  Both ends present a certificate and check the
other's against the CA (mutual TLS).  Host names are not checked: hosts
reach each other by address, and only the cluster's CA signs certificates.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

from .errors import QuietError

FILES = ("ca.pem", "cert.pem", "key.pem")


@dataclass(frozen=True)
class Tls:
    """The contexts of one machine: as the side that accepts, and connects."""

    server: ssl.SSLContext
    client: ssl.SSLContext


def add_tls_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls",
        metavar="DIR",
        help="TLS on every connection, with DIR's ca.pem, cert.pem and key.pem (off by default)",
    )


def load_tls(directory: str | None) -> Tls | None:
    """The TLS setup in `directory` (None: TLS off); a QuietError naming the
    file and the fix if it cannot be used."""
    if directory is None:
        return None
    d = Path(directory)
    ca, cert, key = (d / name for name in FILES)
    for f in (ca, cert, key):
        if not f.is_file():
            raise QuietError(
                f"--tls {directory}: no {f.name} there; it needs {', '.join(FILES)} "
                "(docs/OPERATIONS.md, TLS, says how to make them)",
                2,
            )
    try:
        return Tls(
            _context(ssl.Purpose.CLIENT_AUTH, ca, cert, key),
            _context(ssl.Purpose.SERVER_AUTH, ca, cert, key),
        )
    except (ssl.SSLError, OSError) as e:
        raise QuietError(f"--tls {directory}: {_reason(e)}", 2) from None


def _context(purpose: ssl.Purpose, ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: a server asks for the client's too
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def secure(stream: trio.abc.Stream, tls: Tls, *, server: bool) -> trio.SSLStream:
    """`stream` after a TLS handshake; trio.BrokenResourceError if it fails
    (`handshake_failure` says why)."""
    ctx = tls.server if server else tls.client
    # https_compatible: closing does not wait for the peer's close_notify, so
    # a dead or hostile peer cannot hold up our side's aclose.
    s = trio.SSLStream(stream, ctx, server_side=server, https_compatible=True)
    await s.do_handshake()
    return s


def handshake_failure(e: BaseException) -> str:
    """Why a TLS handshake failed, in a few words."""
    cause = e.__cause__ if e.__cause__ is not None else e
    return _reason(cause)


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return (e.reason or str(e)).replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e) or type(e).__name__
