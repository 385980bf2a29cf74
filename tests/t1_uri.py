"""Volume URIs: the NBD forms qemu and libnbd use, and one clear line for the rest."""

from __future__ import annotations

import os

import pytest

from sharedfs.errors import QuietError
from sharedfs.storage import canonical_name
from sharedfs.storage.uri import NbdAddress, is_uri, parse_nbd_uri


@pytest.mark.parametrize(
    ("uri", "want"),
    [
        ("nbd://server", NbdAddress("", host="server")),
        ("nbd://server/", NbdAddress("", host="server")),
        ("nbd://10.0.0.1:10810/vol", NbdAddress("vol", host="10.0.0.1", port=10810)),
        ("nbd://[::1]:7000/a%20b", NbdAddress("a b", host="::1", port=7000)),
        ("nbd://h/dir/export", NbdAddress("dir/export", host="h")),
        ("nbd+unix:///?socket=/run/nbd.sock", NbdAddress("", socket="/run/nbd.sock")),
        ("nbd+unix:///disk?socket=/run/nbd.sock", NbdAddress("disk", socket="/run/nbd.sock")),
        ("nbd+unix://?socket=/s", NbdAddress("", socket="/s")),
    ],
)
def test_forms_qemu_and_libnbd_use(uri: str, want: NbdAddress) -> None:
    assert is_uri(uri)
    assert parse_nbd_uri(uri) == want
    assert parse_nbd_uri(str(want)) == want  # the canonical form reads back the same


def test_a_relative_socket_is_made_absolute_for_later_reconnects() -> None:
    # A daemonized mount works in /, and reconnects long after it started.
    addr = parse_nbd_uri("nbd+unix:///x?socket=run/s.sock")
    assert addr.socket == os.path.abspath("run/s.sock")
    assert canonical_name("nbd+unix:///x?socket=run/s.sock") == str(addr)
    assert canonical_name("vol.img") == os.path.abspath("vol.img")


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("nbd://", "nbd://HOST"),
        ("nbd://host:port/x", "Port could not be cast"),
        ("nbd://host:99999/x", "out of range"),
        ("nbd://host:0/x", "port 0"),
        ("nbd://user@host/x", "nbd://HOST"),
        ("nbd://host/x?tls=on", "unknown query"),
        ("nbd+unix:///x", "?socket=PATH"),
        ("nbd+unix:///x?socket=", "?socket=PATH"),
        ("nbd+unix://host/x?socket=/s", "no host"),
        ("nbd+unix:///x?socket=/s&tls=on", "unknown query parameter 'tls'"),
        ("nbds://host/x", "nbds:// is not supported"),
        ("http://host/x", "unknown scheme 'http'"),
        ("nbd://host/x#frag", "fragment"),
    ],
)
def test_a_bad_uri_is_one_line_naming_the_forms(uri: str, says: str) -> None:
    with pytest.raises(QuietError) as e:
        parse_nbd_uri(uri)
    msg = str(e.value)
    assert says in msg and "\n" not in msg
    assert msg.startswith(uri) and "nbd+unix:///[EXPORT]?socket=PATH" in msg
    assert e.value.exitcode == 2


def test_paths_are_not_uris() -> None:
    assert not is_uri("/dev/sdb") and not is_uri("vol.img") and not is_uri("nbd:host")
