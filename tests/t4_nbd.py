"""The commands on NBD volumes as users meet them: mkfs, fsck, status and
mounts through real servers; mistakes and faults in one line; a mount that
rides out a server restart, and one whose server is gone for good."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from mount_util import (
    PY,
    Master,
    Mount,
    fsck_ok,
    mkfs,
    needs_fuse,
    public_dir,
    sharedfs,
    wait_for,
)
from nbd_util import free_port, needs_nbdkit, needs_qemu_nbd
from nbd_util import sparse_image as image
from t4_cli import one_line_error

pytestmark = needs_nbdkit

SRC = Path(__file__).resolve().parent.parent / "sharedfs"


def test_mkfs_fsck_status_journal_through_nbd(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = image(tmp_path / "img", 256 << 20)
    uri = nbd_servers.nbdkit("file", str(img)).uri
    r = sharedfs("mkfs", uri, "--label", "net")  # the size is the export's
    assert "65536 blocks of 4096 bytes" in r.stdout
    msg = one_line_error(sharedfs("mkfs", uri, check=False))
    assert "already holds a sharedfs volume" in msg
    fsck_ok(uri)
    assert json.loads(sharedfs("status", uri, "--json").stdout)["label"] == "net"
    assert "committed transactions" in sharedfs("journal", uri).stdout
    fsck_ok(img)  # the server wrote it where it should


def test_unreachable_servers_and_refused_exports_are_one_line(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    closed = f"nbd://127.0.0.1:{free_port()}/"
    nowhere = f"nbd+unix:///?socket={tmp_path}/no.sock"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for argv, code in (
        (("mkfs", closed), 1),
        (("fsck", "-n", nowhere), 8),  # e2fsck's operational error
        (("mount", closed, str(mnt)), 1),
    ):
        msg = one_line_error(sharedfs(*argv, check=False), code)
        assert "cannot use the NBD export" in msg and "connect" in msg, argv
    srv = nbd_servers.nbdkit("--filter=exportname", "memory", "64M", "exportname-strict=true")
    msg = one_line_error(sharedfs("mkfs", srv.uri + "other", check=False))
    assert "server has no export named 'other'" in msg


def test_bad_uris_and_exports_that_cannot_hold_the_volume(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    msg = one_line_error(sharedfs("mkfs", "nbd://host:port/x", check=False), 2)
    assert "nbd://HOST[:PORT][/EXPORT]" in msg
    one_line_error(sharedfs("fsck", "-n", "nbds://host/x", check=False))
    small = nbd_servers.nbdkit("memory", "64M").uri
    msg = one_line_error(sharedfs("mkfs", small, "--size", "1G", check=False))
    assert "only 67108864 bytes" in msg
    # A volume made bigger than the export that serves it now.
    img = image(tmp_path / "img", 128 << 20)
    mkfs(img, "128M")
    cut = nbd_servers.nbdkit("--filter=truncate", "file", str(img), "truncate=64M").uri
    msg = one_line_error(sharedfs("fsck", "-n", cut, check=False), 8)
    assert "not a sharedfs volume" in msg and "67108864 bytes" in msg
    # Blocks smaller than the export's smallest write.
    policy = ["blocksize-minimum=4096", "blocksize-error-policy=error"]
    strict = nbd_servers.nbdkit("--filter=blocksize-policy", "memory", "64M", *policy).uri
    msg = one_line_error(sharedfs("mkfs", strict, "--block-size", "1024", check=False), 2)
    assert "4096-byte units" in msg
    sharedfs("mkfs", strict, "--block-size", "8192", "-q")
    fsck_ok(strict)


def test_a_cluster_needs_an_export_with_multi_conn(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri = nbd_servers.nbdkit(
        "--filter=multi-conn", "memory", "64M", "multi-conn-mode=disable", unix=True
    ).uri
    mkfs(uri, "64M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = sharedfs("mount", uri, str(mnt), "--master", f"127.0.0.1:{free_port()}", check=False)
    assert "no multi-conn" in one_line_error(r, 32)


@needs_fuse
@needs_qemu_nbd
def test_a_mount_over_qemu_nbd(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = image(tmp_path / "img", 256 << 20)
    srv = nbd_servers.qemu_nbd(img, "-e", "2", "--cache=none", unix=True, export="vol")
    mkfs(srv.uri)
    m = Mount(srv.uri, public_dir() / "mnt")
    try:
        subprocess.run(["cp", "-a", str(SRC), str(m.mnt / "tree")], check=True)
        subprocess.run(["diff", "-r", str(SRC), str(m.mnt / "tree")], check=True)
        m.umount()
    finally:
        m.kill()
    fsck_ok(srv.uri)
    fsck_ok(img)


WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"x" * 300000)
try:
    os.fsync(fd)
except OSError as e:
    print(e.errno)
    sys.exit(1)
"""


def fsync_file(path: Path) -> subprocess.Popen[str]:
    """A process that writes `path` and waits for its fsync (prints the errno)."""
    return subprocess.Popen([PY, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)


@needs_fuse
def test_a_mount_rides_out_a_server_killed_and_restarted(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    img = image(tmp_path / "img", 256 << 20)
    srv = nbd_servers.nbdkit("file", str(img))
    mkfs(srv.uri)
    m = Mount(srv.uri, public_dir() / "mnt", "--nbd-timeout", "120")
    try:
        with open(m.mnt / "before", "wb") as f:
            f.write(b"before")
            os.fsync(f.fileno())
        srv.kill()
        writer = fsync_file(m.mnt / "during")  # waits for the server
        wait_for(lambda: "reconnect attempt" in m.log.read_text(), 60, "a failed attempt")
        assert writer.poll() is None
        srv.start()
        writer.communicate(timeout=120)
        assert writer.returncode == 0
        assert (m.mnt / "during").read_bytes() == b"x" * 300000
        assert (m.mnt / "before").read_bytes() == b"before"
        m.umount()  # clean: no ERROR line in its log
        assert "reconnected to the NBD server" in m.log.read_text()
    finally:
        m.kill()
    fsck_ok(img)


@needs_fuse
def test_a_mount_whose_server_is_gone_for_good_fails_clearly(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = nbd_servers.nbdkit("memory", "256M", unix=True)
    mkfs(srv.uri)
    m = Mount(srv.uri, public_dir() / "mnt", "--nbd-timeout", "2")
    try:
        (m.mnt / "f").write_bytes(b"data")
        srv.kill()
        writer = fsync_file(m.mnt / "g")
        # The fsync fails; the host stops as on any storage failure.
        out, _ = writer.communicate(timeout=120)
        assert writer.returncode == 1
        assert int(out) in (errno.EIO, errno.ENOTCONN, errno.ECONNABORTED)
        assert m.proc.wait(timeout=120) == 8
        log = m.log.read_text()
        assert "Traceback" not in log
        last = log.strip().splitlines()[-1]
        assert last.startswith("sharedfs: storage error:") and "NBD server lost for" in last
        assert log.count("reconnect attempt") >= 2
    finally:
        m.kill()


@needs_fuse
def test_an_io_error_fails_the_operation_that_met_it(nbd_servers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bad_reads = tmp_path / "fail-reads"
    srv = nbd_servers.nbdkit(
        "--filter=error",
        "memory",
        "256M",
        "error=EIO",
        "error-pread-rate=100%",
        f"error-pread-file={bad_reads}",
    )
    mkfs(srv.uri)
    mnt = public_dir() / "mnt"
    first = Mount(srv.uri, mnt)
    (mnt / "f").write_bytes(b"y" * 100000)
    first.umount()
    m = Mount(srv.uri, mnt)  # a cold cache: reading f goes to the server
    try:
        os.stat(mnt / "f")
        bad_reads.touch()
        with pytest.raises(OSError) as e:
            (mnt / "f").read_bytes()
        assert e.value.errno == errno.EIO
        bad_reads.unlink()
        assert (mnt / "f").read_bytes() == b"y" * 100000  # the mount lives on
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert m.proc.wait(timeout=120) == 0
        errors = [line for line in m.log.read_text().splitlines() if " ERROR " in line]
        assert errors and all("storage failed in read" in e for e in errors), errors
        assert all("Input/output error" in e for e in errors), errors
    finally:
        m.kill()
    fsck_ok(srv.uri)


@needs_fuse
def test_a_host_whose_server_fails_its_writes_withdraws_and_the_other_goes_on(  # type: ignore[no-untyped-def]
    nbd_servers, tmp_path: Path
) -> None:
    """Two hosts on one image through two nbdkit servers; host 1's starts
    failing every write (nbdkit's error filter).  Host 1's fsync fails,
    host 1 withdraws (every call EIO from then on), host 0 reads all that
    host 1 acknowledged and goes on writing in the same directory."""
    img = image(tmp_path / "img", 256 << 20)
    failing = tmp_path / "fail-writes"
    good = nbd_servers.nbdkit("file", str(img))
    flaky = nbd_servers.nbdkit(
        "--filter=error",
        "file",
        str(img),
        "error=EIO",
        "error-pwrite-rate=100%",
        f"error-pwrite-file={failing}",
    )
    mkfs(good.uri)
    master = Master(good.uri, tmp_path / "master.log", "--lease", "3")
    pub = public_dir()
    a = Mount(good.uri, pub / "a", "--master", master.addr, "--node", "0")
    b = Mount(flaky.uri, pub / "b", "--master", master.addr, "--node", "1")
    try:
        acked = {}
        for i in range(5):
            data = os.urandom(3000 * (i + 1))
            with open(b.mnt / f"f{i}", "wb") as f:
                f.write(data)
                os.fsync(f.fileno())
            acked[f"f{i}"] = data
        failing.touch()
        with pytest.raises(OSError) as e, open(b.mnt / "lost", "wb") as f:
            f.write(b"never acknowledged" * 1000)
            os.fsync(f.fileno())
        assert e.value.errno == errno.EIO
        wait_for(lambda: "fenced: storage failed a write" in b.log.read_text(), what="withdrawal")
        with pytest.raises(OSError) as e:
            os.listdir(b.mnt)
        assert e.value.errno == errno.EIO
        for name, data in acked.items():
            assert (a.mnt / name).read_bytes() == data, name
        (a.mnt / "after").write_bytes(b"host 0 goes on")
        a.umount()
    finally:
        a.kill()
        b.kill()
        master.stop()
    failing.unlink()
    fsck_ok(good.uri)
    assert "node 1 failed: recovering what it held" in (tmp_path / "master.log").read_text()
