"""Shared fixtures: formatted in-memory volumes and hosts over them."""

from __future__ import annotations

import faulthandler
import signal
from collections.abc import Iterator

import pytest
from nbd_util import Servers

from sharedfs import format as fmt
from sharedfs.fs import Ctx, FileSystem
from sharedfs.host import open_host
from sharedfs.mkfs import format_volume
from sharedfs.storage.memory import MemoryStorage
from sharedfs.volume import read_superblock

faulthandler.register(signal.SIGUSR1, all_threads=True)

ROOT = fmt.ROOT_INO
CTX = Ctx(0, 0)


async def make_volume(size: int = 64 << 20, **geometry: int) -> MemoryStorage:
    """A freshly formatted in-memory volume (as `sharedfs mkfs` makes it)."""
    storage = MemoryStorage(size)
    await format_volume(storage, fmt.make_geometry(size, **geometry))
    return storage


def host(storage: MemoryStorage, **kw: object) -> FileSystem:
    return open_host(storage, read_superblock(storage), **kw)  # type: ignore[arg-type]


@pytest.fixture
async def volume() -> MemoryStorage:
    return await make_volume()


@pytest.fixture
async def fs(volume: MemoryStorage) -> FileSystem:
    return host(volume)


@pytest.fixture
def nbd_servers() -> Iterator[Servers]:
    """NBD servers the test starts (nbdkit, qemu-nbd), stopped after it."""
    servers = Servers()
    yield servers
    servers.stop()
