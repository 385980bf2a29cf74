"""Hosts that can be cut off: network namespaces joined by veth pairs to
one bridge, as separate machines on one switch.  A process enters a
namespace's network only (nsenter --net), so FUSE mounts made inside stay
visible to the test; the volume and unix sockets are shared as a disk and
its NBD servers would be."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

SUBNET = "10.78.{}.{}"

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nsenter"),
    reason="needs root, ip(8) and nsenter(1)",
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Net:
    """A bridge and namespaces on it; `cut` and `heal` a namespace's link."""

    def __init__(self, tag: str, names: list[str], third: int) -> None:
        self.tag = tag
        self.bridge = f"sfb{tag}"
        self.names = names
        self.third = third
        self.addr: dict[str, str] = {}

    def ns(self, name: str) -> str:
        return f"sfs-{self.tag}-{name}"

    def _veth(self, name: str) -> str:
        return f"sfv{self.tag}{self.names.index(name)}"

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", SUBNET.format(self.third, 1) + "/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.names):
            ns, veth = self.ns(name), self._veth(name)
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            addr = SUBNET.format(self.third, 10 + i)
            _ip("-n", ns, "addr", "add", addr + "/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.addr[name] = addr

    def down(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", self.ns(name)], capture_output=True)
            subprocess.run(["ip", "link", "del", self._veth(name)], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def prefix(self, name: str) -> list[str]:
        """Run a command on host `name` (its network, our filesystem)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(name)}"]

    def cut(self, name: str) -> None:
        _ip("link", "set", self._veth(name), "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self._veth(name), "up")


@contextmanager
def network(names: list[str]) -> Iterator[Net]:
    tag = str(os.getpid() % 10000)
    net = Net(tag, names, 1 + os.getpid() % 250)
    net.down()  # what a killed earlier run may have left
    net.up()
    try:
        yield net
    finally:
        net.down()
