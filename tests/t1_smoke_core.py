"""The core end to end on a memory volume: the fixture wiring works."""

from __future__ import annotations

from conftest import CTX, ROOT


async def test_create_write_read(fs):
    a = await fs.create(ROOT, b"hello", 0o644, CTX)
    assert await fs.write(a.ino, 0, b"hello world") == 11
    assert await fs.read(a.ino, 0, 100) == b"hello world"
    assert (await fs.lookup(ROOT, b"hello")).size == 11
