"""TLS as an option: every connection of a cluster over mutual TLS with the
cluster's own CA, under the cluster key's HMAC challenge; a peer without a
certificate of that CA is refused, with one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio
from cluster_util import cluster
from conftest import CTX, ROOT, make_volume
from mount_util import Master, Mount, mkfs, needs_fuse, public_dir, sharedfs
from t4_cli import one_line_error

from sharedfs.errors import QuietError
from sharedfs.link import open_master
from sharedfs.tls import load_tls
from sharedfs.volume import read_superblock


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_ca(d: Path) -> None:
    d.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", d / "ca.key", "-out", d / "ca.pem", "-days", "2",
            "-subj", f"/CN={d.name} CA")  # fmt: skip


def make_cert(ca: Path, d: Path) -> Path:
    """A machine's --tls directory: ca.pem, and cert.pem signed by `ca`."""
    d.mkdir()
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", d / "key.pem", "-out", d / "req.csr", "-subj", f"/CN={d.name}")  # fmt: skip
    openssl("x509", "-req", "-in", d / "req.csr", "-CA", ca / "ca.pem", "-CAkey", ca / "ca.key",
            "-CAcreateserial", "-out", d / "cert.pem", "-days", "2")  # fmt: skip
    (d / "ca.pem").write_bytes((ca / "ca.pem").read_bytes())
    return d


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The cluster's CA and a machine of it; a rogue CA and a machine of that."""
    top = tmp_path_factory.mktemp("pki")
    make_ca(top / "cluster")
    make_ca(top / "rogue")
    return {
        "node": make_cert(top / "cluster", top / "node"),
        "rogue": make_cert(top / "rogue", top / "intruder"),
    }


async def test_every_connection_is_tls_and_blocks_travel_over_it(pki) -> None:  # type: ignore[no-untyped-def]
    tls = load_tls(str(pki["node"]))
    vol = await make_volume()
    async with cluster(vol, 2, tls=tls) as c:
        a, b = c.hosts
        f = await a.create(ROOT, b"secret", 0o644, CTX)
        await a.write(f.ino, 0, b"over TLS")
        assert await b.read(f.ino, 0, 100) == b"over TLS"
        assert c.directory.counters.transfers > 0  # host to host, not by storage
        links = list(c.master._links.values())
        links += [*a.cache.agent._peer_links.values(), *b.cache.agent._peer_links.values()]
        assert len(links) >= 3 and all(isinstance(x.stream, trio.SSLStream) for x in links)


async def test_a_peer_without_a_certificate_of_the_clusters_ca_is_refused(pki) -> None:  # type: ignore[no-untyped-def]
    vol = await make_volume()
    key = read_superblock(vol).cluster_key
    async with cluster(vol, 1, tls=load_tls(str(pki["node"]))) as c:
        addr = ("127.0.0.1", c.master.port)
        refused = c.master.refused
        with pytest.raises(QuietError, match="TLS handshake failed"):
            await open_master(addr, key, -1, exitcode=1, tls=load_tls(str(pki["rogue"])))
        with pytest.raises(QuietError, match="needs --tls here too"):
            await open_master(addr, key, -1, exitcode=1)  # the key alone does not do
        with trio.fail_after(5):
            while c.master.refused < refused + 2:  # noqa: ASYNC110 - a counter, no event
                await trio.sleep(0.01)
        link = await open_master(addr, key, -1, exitcode=1, tls=load_tls(str(pki["node"])))
        await link.aclose()


def test_a_bad_tls_directory_is_one_line(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    vol = tmp_path / "vol.img"
    mkfs(vol, "64M")
    msg = one_line_error(sharedfs("status", str(vol), "--tls", str(tmp_path), check=False), 2)
    assert "no ca.pem there" in msg
    (tmp_path / "bad").mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / "bad" / name).write_text("not PEM\n")
    r = sharedfs("master", str(vol), "--tls", str(tmp_path / "bad"), check=False)
    assert "--tls" in one_line_error(r, 2)


@needs_fuse
def test_master_mounts_and_status_over_tls(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    vol = tmp_path / "vol.img"
    mkfs(vol, "256M")
    tls = ["--tls", str(pki["node"])]
    master = Master(vol, tmp_path / "master.log", *tls)
    pub = public_dir()
    mounts = []
    try:
        for n in range(2):
            mounts.append(
                Mount(vol, pub / f"h{n}", "--master", master.addr, "--node", str(n), *tls)
            )
        (mounts[0].mnt / "f").write_bytes(b"x" * 50000)
        assert (mounts[1].mnt / "f").read_bytes() == b"x" * 50000
        r = sharedfs("status", str(vol), "--master", master.addr, "--json", *tls)
        assert sorted(json.loads(r.stdout)["master"]["hosts"]) == ["0", "1"]
        r = sharedfs("status", str(vol), "--master", master.addr, check=False)
        assert "--tls" in one_line_error(r, 1)
        for m in mounts:
            m.umount()
    finally:
        for m in mounts:
            m.kill()
        master.stop()
    assert "TLS handshake failed: wrong version number" in (tmp_path / "master.log").read_text()
