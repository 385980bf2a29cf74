"""`sharedfs inspect` on a volume the filesystem core filled in, through the CLI."""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import pytest
import trio
from mount_util import mkfs, sharedfs

from sharedfs import format as fmt
from sharedfs.fs import Ctx
from sharedfs.host import open_host
from sharedfs.storage import open_volume
from sharedfs.volume import read_superblock

ROOT = fmt.ROOT_INO


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vol = tmp_path_factory.mktemp("inspect") / "v.img"
    mkfs(vol, "64M")
    return vol


@pytest.fixture(scope="module")
def inos(volume: Path) -> dict[str, int]:
    return trio.run(fill, volume)


@pytest.fixture(scope="module")
def digest(volume: Path, inos: dict[str, int]) -> bytes:
    """The image as filled in, before any inspect."""
    return hashlib.sha256(volume.read_bytes()).digest()


async def fill(volume: Path) -> dict[str, int]:
    """/dir/hello.txt (with an xattr), /dir/link, /dir/f0..f59, /sparse
    (three blocks a million blocks in)."""
    storage = open_volume(str(volume))
    fs = open_host(storage, read_superblock(storage))
    ctx = Ctx(0, 0)
    d = await fs.mkdir(ROOT, b"dir", 0o755, ctx)
    hello = await fs.create(d.ino, b"hello.txt", stat.S_IFREG | 0o644, ctx)
    await fs.write(hello.ino, 0, b"hello, inspect\n")
    await fs.setxattr(hello.ino, b"user.color", b"blue")
    link = await fs.symlink(d.ino, b"link", b"hello.txt", ctx)
    for i in range(60):
        await fs.create(d.ino, b"f%d" % i, stat.S_IFREG | 0o600, ctx)
    sparse = await fs.create(ROOT, b"sparse", stat.S_IFREG | 0o644, ctx)
    await fs.write(sparse.ino, 4096 * 1_000_000, b"s" * 3 * 4096)
    await fs.destroy()
    storage.close()
    return {"dir": d.ino, "hello": hello.ino, "link": link.ino, "sparse": sparse.ino}


def inspect(volume: Path, *args: str) -> str:
    return sharedfs("inspect", str(volume), *args).stdout


def test_superblock(volume: Path, inos: dict[str, int], digest: bytes) -> None:
    out = inspect(volume, "superblock")
    assert "sharedfs format v1" in out and "block size 4096" in out
    assert re.search(r"blocks \d+-\d+ +host slots", out)
    free, total = map(int, re.search(r"(\d+) of (\d+) data blocks free", out).groups())  # type: ignore[union-attr]
    assert 0 < free < total
    assert "journal: pages" in out


def test_path_resolves_through_directories(volume: Path, inos: dict[str, int]) -> None:
    out = inspect(volume, "path", "/dir/hello.txt")
    assert out.startswith(f"inode {inos['hello']}: regular file, mode -rw-r--r--")
    assert "size 15," in out and "user.color = b'blue'" in out
    assert "1 blocks mapped in 1 extents" in out
    assert inspect(volume, "inode", str(inos["hello"])) == out  # the same inode
    link = inspect(volume, "path", "dir/link")
    assert "symbolic link" in link and "target: hello.txt" in link


def test_directory_lists_its_entries(volume: Path, inos: dict[str, int]) -> None:
    out = inspect(volume, "inode", str(inos["dir"]))
    assert "directory" in out and "parent directory: inode 1" in out
    assert "entries (64):" in out  # ., .., hello.txt, link, f0..f59
    assert "... 24 more (64 in all; --all shows every one)" in out
    every = inspect(volume, "inode", str(inos["dir"]), "--all")
    names = re.findall(r"^    (\S+) +inode (\d+) ", every, re.M)
    assert len(names) == 64
    assert ("hello.txt", str(inos["hello"])) in names and ("..", "1") in names


def test_block_map_of_a_sparse_file(volume: Path, inos: dict[str, int]) -> None:
    out = inspect(volume, "path", "/sparse")
    m = re.search(r"logical 1000000-1000002 -> blocks (\d+)-(\d+)", out)
    assert m and int(m.group(2)) - int(m.group(1)) == 2
    assert "height 2, 3 blocks mapped in 1 extents, 2 indirect blocks" in out


def test_block_says_what_and_whose_it_is(volume: Path, inos: dict[str, int]) -> None:
    out = inspect(volume, "path", "/dir/hello.txt")
    data = int(re.search(r"logical 0 -> block (\d+)", out).group(1))  # type: ignore[union-attr]
    xattr = int(re.search(r"extended attributes \(block (\d+)\)", out).group(1))  # type: ignore[union-attr]
    dump = inspect(volume, "block", str(data))
    assert "allocated in the block bitmap" in dump and "file data" in dump
    assert f"owner: inode {inos['hello']}, logical block 0" in dump
    assert "|hello, inspect.." in dump  # the hex dump's text column
    assert "--all shows the whole block" in dump
    assert f"owner: inode {inos['hello']}, its extended attributes" in inspect(
        volume, "block", str(xattr)
    )
    indirect = re.search(r"indirect blocks \((\d+)", inspect(volume, "path", "/sparse"))
    ind = inspect(volume, "block", indirect.group(1))  # type: ignore[union-attr]
    assert "metadata block: INDIRECT" in ind and f"owner: inode {inos['sparse']}" in ind
    assert "the superblock" in inspect(volume, "block", "0")
    sb = read_superblock(open_volume(str(volume)))
    assert "the journal header" in inspect(volume, "block", str(sb.journal_start))
    assert "host slot of node 0" in inspect(volume, "block", "1")
    itable = inspect(volume, "block", str(sb.itable_start(0)))
    assert f"inodes 1-{sb.inodes_per_block}" in itable and "in use" in itable
    assert "unused" in inspect(volume, "block", str(sb.backup_blockno - 1))
    whole = inspect(volume, "block", str(data), "--all")
    assert whole.splitlines()[-1] == "00001000" and "more bytes" not in whole
    assert dump.splitlines()[-2:-1] == ["00000200"]


def test_zz_inspect_never_wrote(volume: Path, digest: bytes) -> None:
    """Every inspect above, and one that fails, left the image as it was."""
    assert sharedfs("inspect", str(volume), "path", "/nothing", check=False).returncode == 1
    assert hashlib.sha256(volume.read_bytes()).digest() == digest
