"""Pieces every command shares: sizes, logging, and turning errors into one line."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from .errors import QuietError, StorageError

E = TypeVar("E", bound=BaseException)

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """'3G' -> 3221225472; plain numbers are bytes; K/M/G/T/P are powers of 1024."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 3G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_address_arg(text: str) -> tuple[str, int]:
    """An argparse type for HOST:PORT options (parse_address, with a usage error)."""
    from .link import parse_address

    try:
        return parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


class Parser(argparse.ArgumentParser):
    """argparse with usage errors in one line: what is wrong and where to
    read more, then exit `usage_exit` (2, as argparse; fsck uses e2fsck's 16)."""

    usage_exit = 2

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(self.usage_exit)


def notify_systemd(state: str) -> None:
    """Tell systemd how we are (`READY=1` once serving), when it runs us as
    a Type=notify unit; nothing otherwise."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(state.encode())


def setup_logging(debug: bool = False, logfile: str | None = None, node: int | None = None) -> None:
    """One line per event; a mount's lines carry its host id."""
    handler: logging.Handler = (
        logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    )
    who = "" if node is None else f"node{node} "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {who}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # trio and pyfuse3 are chatty at debug level.
    logging.getLogger("trio").setLevel(logging.WARNING)


def find_quiet(exc: BaseException) -> QuietError | None:
    """The user-facing error inside `exc`, which trio may have wrapped in
    exception groups on its way out of nurseries."""
    return _find(exc, QuietError)


def _find(exc: BaseException, kind: type[E]) -> E | None:
    """The first `kind` inside `exc` and the exception groups around it."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _find(sub, kind)
            if found is not None:
                return found
    return None


def run_tool(fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> None:
    """Run a command; user errors become one line on stderr and an exit code."""
    try:
        try:
            code = fn(args)
        except BaseExceptionGroup as eg:
            # A task's failure, wrapped on its way out of nurseries.
            found = find_quiet(eg) or _find(eg, StorageError)
            if found is None:
                raise
            raise found from None
    except QuietError as e:
        print(f"sharedfs: {e}", file=sys.stderr)
        sys.exit(e.exitcode)
    except StorageError as e:
        print(f"sharedfs: storage error: {e}", file=sys.stderr)
        sys.exit(8)
    except KeyboardInterrupt:
        print("sharedfs: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code or 0)
