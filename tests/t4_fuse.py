"""POSIX through a real FUSE mount, driven by os calls and ordinary tools.

One mount serves the whole module (mounting takes a while); the last test
unmounts it and requires fsck to find the volume clean.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mount_util import Mount, fsck_ok, mkfs, needs_fuse, public_dir

pytestmark = [needs_fuse, pytest.mark.fuse]

SRC = Path(__file__).resolve().parent.parent / "sharedfs"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("fuse")
    vol = d / "vol.img"
    mkfs(vol, "3G")
    # Other users must reach the mountpoint for the permission tests, and
    # pytest's own temp tree is private to root.
    m = Mount(vol, public_dir() / "mnt")
    yield m
    m.kill()


@pytest.fixture
def mnt(host: Mount, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the mount for each test."""
    p = host.mnt / request.node.name
    p.mkdir()
    return p


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    def drop() -> None:
        os.setgid(65534)
        os.setuid(65534)

    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=drop)


def test_create_write_read_append(mnt: Path) -> None:
    f = mnt / "a"
    f.write_bytes(b"hello ")
    with open(f, "ab") as fh:
        fh.write(b"world")
    assert f.read_bytes() == b"hello world"
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"!")  # O_APPEND writes go to the end, whatever the offset
    os.close(fd)
    assert f.read_bytes() == b"hello world!"
    assert os.stat(f).st_size == 12


def test_truncate_extend_reads_zeros(mnt: Path) -> None:
    f = mnt / "t"
    f.write_bytes(b"x" * 10000)
    os.truncate(f, 100)
    os.truncate(f, 9000)
    data = f.read_bytes()
    assert data[:100] == b"x" * 100 and data[100:] == bytes(8900)
    with open(f, "r+b") as fh:
        fh.seek(1 << 20)
        fh.write(b"end")
    data = f.read_bytes()
    assert len(data) == (1 << 20) + 3 and data[9000 : 1 << 20] == bytes((1 << 20) - 9000)


def test_o_trunc_on_an_existing_file_truncates_it(mnt: Path) -> None:
    """`echo hi > file` over a longer file: the kernel leaves O_TRUNC to the
    filesystem (atomic O_TRUNC), which must truncate (the soak found it
    did not: the old bytes stayed after the new)."""
    f = mnt / "trunc"
    f.write_bytes(b"0123456789" * 500)
    subprocess.run(["sh", "-c", f"echo hi > {f}"], check=True)
    assert f.read_bytes() == b"hi\n"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert f.stat().st_size == 0


def test_unlink_open_file_keeps_data_until_close(mnt: Path, host: Mount) -> None:
    f = mnt / "u"
    payload = os.urandom(300_000)
    f.write_bytes(payload)
    before = shutil.disk_usage(host.mnt).free
    fh = open(f, "rb")  # noqa: SIM115 - held open across the unlink
    os.unlink(f)
    assert not f.exists()
    assert fh.read() == payload
    fh.close()
    # Freed on the last close (the kernel's forget may come a moment later).
    for _ in range(100):
        if shutil.disk_usage(host.mnt).free > before:
            break
        os.sync()
    assert shutil.disk_usage(host.mnt).free > before


def test_mkdir_rmdir_nlink(mnt: Path) -> None:
    (mnt / "d").mkdir()
    (mnt / "d" / "sub1").mkdir()
    (mnt / "d" / "sub2").mkdir()
    assert os.stat(mnt / "d").st_nlink == 4
    with pytest.raises(OSError) as e:
        (mnt / "d").rmdir()
    assert e.value.errno == errno.ENOTEMPTY
    (mnt / "d" / "sub1").rmdir()
    assert os.stat(mnt / "d").st_nlink == 3
    assert sorted(os.listdir(mnt / "d")) == ["sub2"]


def test_readdir_offsets_survive_changes(mnt: Path) -> None:
    names = {f"f{i:04d}" for i in range(600)}
    for n in names:
        (mnt / n).touch()
    seen: list[str] = []
    removed: set[str] = set()
    with os.scandir(mnt) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i == 50:
                # Change the directory in the middle of the listing.
                for n in sorted(names - set(seen))[:100:2]:
                    (mnt / n).unlink()
                    removed.add(n)
                for k in range(100):
                    (mnt / f"new{k}").touch()
    assert len(seen) == len(set(seen)), "an entry was returned twice"
    assert names - removed <= set(seen), "an entry that stayed was skipped"


def test_ls_shows_dot_entries(mnt: Path) -> None:
    (mnt / "x").touch()
    out = subprocess.run(["ls", "-a", str(mnt)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [".", "..", "x"]


def test_rename_files_and_dirs(mnt: Path) -> None:
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    os.rename(mnt / "a", mnt / "b")  # replaces b
    assert (mnt / "b").read_text() == "A" and not (mnt / "a").exists()
    (mnt / "d1").mkdir()
    (mnt / "d2").mkdir()
    (mnt / "d1" / "inner").mkdir()
    os.rename(mnt / "b", mnt / "d1" / "inner" / "moved")
    assert (mnt / "d1" / "inner" / "moved").read_text() == "A"
    os.rename(mnt / "d1" / "inner", mnt / "d2" / "inner")
    assert (mnt / "d2" / "inner" / "moved").read_text() == "A"
    assert os.stat(mnt / "d1").st_nlink == 2 and os.stat(mnt / "d2").st_nlink == 3
    with pytest.raises(OSError) as e:
        os.rename(mnt / "d2", mnt / "d2" / "inner" / "loop")
    assert e.value.errno == errno.EINVAL
    (mnt / "empty").mkdir()
    os.rename(mnt / "d1", mnt / "empty")  # an empty directory may be replaced
    assert not (mnt / "d1").exists() and (mnt / "empty").is_dir()
    with pytest.raises(OSError) as e:
        os.rename(mnt / "empty", mnt / "d2")
    assert e.value.errno == errno.ENOTEMPTY


def test_hard_and_symbolic_links(mnt: Path) -> None:
    f = mnt / "orig"
    f.write_text("data")
    os.link(f, mnt / "hard")
    assert os.stat(f).st_nlink == 2
    assert os.stat(f).st_ino == os.stat(mnt / "hard").st_ino
    os.unlink(f)
    assert os.stat(mnt / "hard").st_nlink == 1
    os.symlink("hard", mnt / "sym")
    assert os.readlink(mnt / "sym") == "hard"
    assert (mnt / "sym").read_text() == "data"
    assert stat.S_ISLNK(os.lstat(mnt / "sym").st_mode)


def test_chmod_chown_utimens_and_permissions(mnt: Path) -> None:
    f = mnt / "p"
    f.write_text("secret")
    os.chmod(f, 0o600)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    os.utime(f, ns=(1_000_000_000, 2_000_000_000))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    os.chmod(mnt, 0o755)
    assert "Permission denied" in as_nobody("cat", str(f)).stderr  # 0600 root file
    assert "not permitted" in as_nobody("chmod", "777", str(f)).stderr  # not the owner
    os.chown(f, 65534, 65534)
    assert (os.stat(f).st_uid, os.stat(f).st_gid) == (65534, 65534)
    r = as_nobody("cat", str(f))
    assert r.returncode == 0 and r.stdout == "secret"
    assert "Permission denied" in as_nobody("touch", str(mnt / "nobody-file")).stderr


def test_fifo(mnt: Path) -> None:
    os.mkfifo(mnt / "fifo")
    assert stat.S_ISFIFO(os.stat(mnt / "fifo").st_mode)


def test_statfs_counts_change(mnt: Path, host: Mount) -> None:
    before = os.statvfs(host.mnt)
    (mnt / "big").write_bytes(os.urandom(4 << 20))
    after = os.statvfs(host.mnt)
    assert before.f_bfree - after.f_bfree >= (4 << 20) // after.f_bsize
    assert before.f_ffree - after.f_ffree == 1
    (mnt / "big").unlink()


def test_xattrs(mnt: Path) -> None:
    f = mnt / "x"
    f.touch()
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.size", b"42")
    assert os.getxattr(f, "user.color") == b"blue"
    assert sorted(os.listxattr(f)) == ["user.color", "user.size"]
    os.removexattr(f, "user.color")
    with pytest.raises(OSError) as e:
        os.getxattr(f, "user.color")
    assert e.value.errno == errno.ENODATA


def test_fsync_and_fdatasync(mnt: Path, host: Mount) -> None:
    fd = os.open(mnt / "s", os.O_CREAT | os.O_WRONLY)
    os.write(fd, b"durable")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    # After fsync the bytes are in the image itself, not just in the cache.
    assert any(b"durable" in chunk for chunk in data_extents(host.volume))


def data_extents(path: Path) -> Iterator[bytes]:
    """The parts of a sparse image that hold data (reading 3 GiB of holes
    takes the better part of a minute here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return  # no data past pos
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                n = min(hole - pos, 64 << 20)
                yield os.pread(fd, n + 16, pos)  # a little overlap across chunks
                pos += n
    finally:
        os.close(fd)


def test_sparse_file_past_4gib(mnt: Path) -> None:
    f = mnt / "sparse"
    with open(f, "wb") as fh:
        fh.truncate(5 << 30)
        fh.seek((5 << 30) - 9)
        fh.write(b"tail-data")
        fh.seek((4 << 30) + 123)
        fh.write(b"past4g")
    st = os.stat(f)
    assert st.st_size == 5 << 30
    assert st.st_blocks * 512 < 1 << 20  # sparse: only a few blocks
    with open(f, "rb") as fh:
        fh.seek((4 << 30) + 123)
        assert fh.read(6) == b"past4g"
        fh.seek((5 << 30) - 9)
        assert fh.read() == b"tail-data"
        fh.seek(3 << 30)
        assert fh.read(1 << 20) == bytes(1 << 20)


def test_ordinary_tools(mnt: Path, tmp_path: Path) -> None:
    def sh(*cmd: str, cwd: Path | None = None) -> str:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=cwd).stdout

    sh("cp", "-a", str(SRC), str(mnt / "tree"))
    sh("diff", "-r", str(SRC), str(mnt / "tree"))
    sh("tar", "-C", str(mnt), "-cf", str(tmp_path / "t.tar"), "tree")
    (mnt / "untar").mkdir()
    sh("tar", "-C", str(mnt / "untar"), "-xf", str(tmp_path / "t.tar"))
    sh("diff", "-r", str(SRC), str(mnt / "untar" / "tree"))
    found = sh("find", str(mnt / "tree"), "-name", "*.py").split()
    assert len(found) == len(list(SRC.rglob("*.py")))
    sh("mv", str(mnt / "untar" / "tree"), str(mnt / "moved"))
    sh("ln", "-s", "moved/fs.py", str(mnt / "link"))
    assert (mnt / "link").read_text() == (SRC / "fs.py").read_text()
    sh("rm", "-rf", str(mnt / "tree"), str(mnt / "untar"), str(mnt / "moved"))
    assert sorted(os.listdir(mnt)) == ["link"]


def test_git(mnt: Path) -> None:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@e",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@e",
    )

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=mnt, env=env, check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    shutil.copytree(SRC, mnt / "src")
    git("add", "-A")
    git("commit", "-qm", "first")
    (mnt / "src" / "fs.py").write_text("changed\n")
    git("commit", "-qam", "second")
    assert git("log", "--format=%s").split() == ["second", "first"]
    assert git("status", "--porcelain") == ""
    git("checkout", "-q", "HEAD~1")
    assert (mnt / "src" / "fs.py").read_text() == (SRC / "fs.py").read_text()


def test_zz_unmount_leaves_volume_clean(host: Mount) -> None:
    host.umount()
    fsck_ok(host.volume)
