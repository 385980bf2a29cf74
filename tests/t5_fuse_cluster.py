"""Three real mounts of one volume, each its own process, joined to a
standalone `sharedfs master`, driven by os calls and ordinary tools.

Twice: on an image file, and on one nbdkit export that host 1 reaches over
a unix socket and hosts 0 and 2 over TCP (made by mkfs through NBD, and
checked at the end by fsck through NBD)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest
from mount_util import (
    PY,
    Master,
    Mount,
    free_port,
    fsck_ok,
    mkfs,
    needs_fuse,
    public_dir,
    sharedfs,
    wait_for,
)
from nbd_util import needs_nbdkit, one_export_two_ways
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [needs_fuse, pytest.mark.fuse]

SRC = Path(__file__).resolve().parent.parent / "sharedfs"


#: /metrics ports of the master and of host 0.
METRICS = (free_port(), free_port())


@pytest.fixture(scope="module", params=["image", pytest.param("nbd", marks=needs_nbdkit)])
def hosts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack:
        if request.param == "image":
            vol: Path | str = d / "vol.img"
            names = [vol] * 3
        else:
            tcp, unix = stack.enter_context(one_export_two_ways("1G"))
            vol, names = tcp, [tcp, unix, tcp]
        mkfs(vol, "1G")
        master = Master(vol, d / "master.log", "--metrics", f"127.0.0.1:{METRICS[0]}")
        pub = public_dir()
        mounts = [
            Mount(
                names[n],
                pub / f"host{n}",
                "--master",
                master.addr,
                "--node",
                str(n),
                *(["--metrics", f"127.0.0.1:{METRICS[1]}"] if n == 0 else []),
                # Peers reach host 2 at the address it gives, not at 127.0.0.1.
                *(["--peer-address", "127.0.0.2"] if n == 2 else []),
            )
            for n in range(3)
        ]
        yield mounts, master, vol
        for m in mounts:
            m.kill()
        master.stop()


def test_file_created_on_one_host_is_listed_on_the_others_at_once(hosts) -> None:  # type: ignore[no-untyped-def]
    (a, b, c), _, _ = hosts
    (a.mnt / "made-on-a").write_text("hello")
    assert "made-on-a" in os.listdir(b.mnt)
    assert (c.mnt / "made-on-a").read_text() == "hello"
    os.rename(a.mnt / "made-on-a", a.mnt / "renamed")
    assert "renamed" in os.listdir(b.mnt) and "made-on-a" not in os.listdir(b.mnt)
    assert not (c.mnt / "made-on-a").exists()
    os.unlink(b.mnt / "renamed")
    assert not (a.mnt / "renamed").exists()


def test_open_descriptor_reads_the_other_hosts_write(hosts) -> None:  # type: ignore[no-untyped-def]
    (a, b, _), _, _ = hosts
    (a.mnt / "fd").write_bytes(b"old contents")
    with open(b.mnt / "fd", "rb") as reader:
        assert reader.read() == b"old contents"
        with open(a.mnt / "fd", "r+b") as writer:
            writer.write(b"NEW")
        reader.seek(0)
        assert reader.read() == b"NEW contents"  # no reopen, no sleep
        assert os.fstat(reader.fileno()).st_size == 12


def test_size_change_seen_through_open_descriptor(hosts) -> None:  # type: ignore[no-untyped-def]
    (a, b, _), _, _ = hosts
    (a.mnt / "grow").write_bytes(b"x" * 10)
    with open(b.mnt / "grow", "rb") as reader:
        assert reader.read() == b"x" * 10
        with open(a.mnt / "grow", "ab") as w:
            w.write(b"y" * 5000)
        reader.seek(0)
        assert reader.read() == b"x" * 10 + b"y" * 5000


def test_appends_from_two_hosts_never_overwrite(hosts) -> None:  # type: ignore[no-untyped-def]
    (a, b, _), _, _ = hosts
    script = (
        "import os,sys\n"
        "fd=os.open(sys.argv[1],os.O_WRONLY|os.O_APPEND|os.O_CREAT,0o644)\n"
        "for i in range(200): os.write(fd, b'%s %03d\\n' % (sys.argv[2].encode(), i))\n"
    )
    procs = [
        subprocess.Popen([PY, "-c", script, str(m.mnt / "log"), tag])
        for m, tag in ((a, "A"), (b, "B"))
    ]
    for pr in procs:
        assert pr.wait(timeout=120) == 0
    lines = (a.mnt / "log").read_bytes().splitlines()
    want = sorted(b"%s %03d" % (t, i) for t in (b"A", b"B") for i in range(200))
    assert sorted(lines) == want


def test_disjoint_and_shared_writers(hosts) -> None:  # type: ignore[no-untyped-def]
    mounts, _, _ = hosts
    script = (
        "import os,sys\n"
        "root,tag=sys.argv[1],sys.argv[2]\n"
        "os.makedirs(os.path.join(root,'own-'+tag),exist_ok=True)\n"
        "for i in range(40):\n"
        "  open(os.path.join(root,'own-'+tag,'f%d'%i),'wb').write(tag.encode()*(i*97+1))\n"
        "  fd=os.open(os.path.join(root,'shared.bin'),os.O_RDWR|os.O_CREAT,0o644)\n"
        "  os.pwrite(fd, tag.encode()*100, int(tag)*4096+i)\n"
        "  os.close(fd)\n"
    )
    procs = [subprocess.Popen([PY, "-c", script, str(m.mnt), str(n)]) for n, m in enumerate(mounts)]
    for pr in procs:
        assert pr.wait(timeout=180) == 0
    for m in mounts:
        for n in range(3):
            for i in range(40):
                assert (m.mnt / f"own-{n}" / f"f{i}").read_bytes() == str(n).encode() * (i * 97 + 1)
        data = (m.mnt / "shared.bin").read_bytes()
        for n in range(3):
            assert data[n * 4096 + 39 : n * 4096 + 139] == str(n).encode() * 100


def test_tree_written_on_one_host_diffs_clean_from_another(hosts) -> None:  # type: ignore[no-untyped-def]
    (a, b, c), _, _ = hosts
    subprocess.run(["cp", "-a", str(SRC), str(a.mnt / "tree")], check=True)
    subprocess.run(["diff", "-r", str(SRC), str(b.mnt / "tree")], check=True)
    # tar on one host while find walks the tree on another.
    tar = subprocess.Popen(["tar", "-C", str(c.mnt), "-cf", str(a.mnt / "tree.tar"), "tree"])
    found = subprocess.run(
        ["find", str(b.mnt / "tree"), "-type", "f"], check=True, capture_output=True, text=True
    )
    assert tar.wait(timeout=120) == 0
    assert len(found.stdout.split()) == sum(1 for p in SRC.rglob("*") if p.is_file())
    listing = subprocess.run(
        ["tar", "-tf", str(b.mnt / "tree.tar")], check=True, capture_output=True, text=True
    )
    assert "tree/fs.py" in listing.stdout.split()
    subprocess.run(["rm", "-rf", str(c.mnt / "tree")], check=True)
    assert not (a.mnt / "tree").exists()


def status_json(vol: Path, master: Master) -> dict:  # type: ignore[type-arg]
    return json.loads(sharedfs("status", str(vol), "--master", master.addr, "--json").stdout)


def test_status_shows_hosts_leases_locks_rates_and_the_journal(hosts) -> None:  # type: ignore[no-untyped-def]
    (a, b, _), master, vol = hosts
    (a.mnt / "status-probe").write_bytes(b"x" * 10000)
    assert (b.mnt / "status-probe").read_bytes() == b"x" * 10000

    def counted() -> bool:
        # Hosts send their counters every second; rates need two samples.
        m = status_json(vol, master)["master"]
        hosts = m["hosts"].values()
        return (
            m["rates"]["window_s"] > 0
            and all(h["counters"].get("agent_lock_requests", 0) > 0 for h in hosts)
            and set(m["rates"]["hosts"]) == set(m["hosts"])  # two samples of each
        )

    wait_for(counted, what="every host's counters at the master")
    info = status_json(vol, master)
    assert [h["node"] for h in info["hosts"] if h["live"]] == [0, 1, 2]
    j = info["journal"]
    assert j["pages"] > 0 and 0 <= j["in_use"] <= j["pages"]
    m = info["master"]
    assert sorted(m["hosts"]) == ["0", "1", "2"]
    assert m["counters"]["transfers"] > 0 and m["counters"]["pings"] > 0
    # A transfer costs at least request, ping, transfer, done (and a grant,
    # unless the transfer was the grant).
    assert m["messages_per_transfer"] >= 4
    assert [h["peer"][0] for h in m["hosts"].values()] == ["127.0.0.1", "127.0.0.1", "127.0.0.2"]
    for node, h in m["hosts"].items():
        assert 0 <= h["heard_s"] < m["lease"]  # its lease is being renewed
        assert 0 < h["cache_hit_rate"] <= 1
        assert "cache_hits" in m["rates"]["hosts"][node]
    assert sum(h["X"] + h["S"] for h in m["held"].values()) > 0
    assert "transfers" in m["rates"]["master"]
    text = sharedfs("status", str(vol), "--master", master.addr).stdout
    assert "messages per block transfer" in text and "journal:" in text
    header = next(line for line in text.splitlines() if line.startswith("node"))
    assert header.split()[:4] == ["node", "state", "host:pid", "mountpoint"]
    assert "hit rate" in header and "PIs" in header
    rows = [line.split() for line in text.splitlines() if line[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(r[1] == "live" for r in rows)


def test_status_watch_repeats_until_interrupted(hosts) -> None:  # type: ignore[no-untyped-def]
    _, master, vol = hosts
    cmd = [PY, "-m", "sharedfs.cli", "status", str(vol), "--master", master.addr]
    proc = subprocess.Popen(
        [*cmd, "--json", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # As from a terminal: a suite run in the background of a script
        # inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt for it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        views = [json.loads(proc.stdout.readline()) for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and err == b""
    assert all(v["master"]["hosts"].keys() == {"0", "1", "2"} for v in views)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_prometheus_metrics_on_the_master_and_a_host(hosts) -> None:  # type: ignore[no-untyped-def]
    (a, _, _), _, _ = hosts
    (a.mnt / "metrics-probe").write_text("x")
    assert (a.mnt / "metrics-probe").read_text() == "x"
    m = scrape(METRICS[0])
    assert m[("sharedfs_master_hosts", ())] == 3
    assert m[("sharedfs_master_transfers_total", ())] > 0
    silent = {k[1]: v for k, v in m.items() if k[0] == "sharedfs_master_host_silent_seconds"}
    assert sorted(silent) == [(("node", str(n)),) for n in range(3)]
    h = scrape(METRICS[1])
    node0 = (("node", "0"),)
    assert h[("sharedfs_host_cache_hits_total", node0)] > 0
    assert h[("sharedfs_host_agent_lock_requests_total", node0)] > 0
    assert h[("sharedfs_host_fenced", node0)] == 0
    # Not one endpoint for both: the host exports its own counters only.
    assert not any(name.startswith("sharedfs_master") for name, _ in h)


def test_wrong_node_and_unauthenticated_peer_are_refused(hosts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    (a, _, _), master, vol = hosts
    other = tmp_path / "x"
    other.mkdir()
    r = sharedfs("mount", str(vol), str(other), "--master", master.addr, "--node", "1", check=False)
    assert r.returncode != 0 and "held by live node 1" in r.stderr
    # A volume with another cluster key cannot join this master.
    stranger = tmp_path / "stranger.img"
    mkfs(stranger, "64M")
    r = sharedfs("mount", str(stranger), str(other), "--master", master.addr, check=False)
    assert r.returncode != 0 and "cluster key" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # A peer that speaks garbage is dropped, and the master goes on serving.
    with socket.create_connection(("127.0.0.1", master.port)) as s:
        s.sendall(os.urandom(300))
    (a.mnt / "still-serving").write_text("yes")
    assert (a.mnt / "still-serving").read_text() == "yes"


def test_master_killed_and_restarted_hosts_hold_then_carry_on(hosts) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the standalone master, then a restart: every mount holds
    its writes, resumes with the new master, which rebuilds its directory
    from their reports, and what was written before, during and after the
    outage is seen on every host."""
    mounts, master, vol = hosts
    a, b, c = mounts
    (a.mnt / "outage").mkdir()
    with open(a.mnt / "outage" / "synced", "wb") as f:
        f.write(b"s" * 20000)
        os.fsync(f.fileno())
    (b.mnt / "outage" / "unsynced").write_bytes(b"u" * 7000)  # in b's cache only
    assert (c.mnt / "outage" / "synced").read_bytes() == b"s" * 20000
    logs = [m.log.read_text().count("resumed with") for m in mounts]
    master.kill()
    script = "import sys; open(sys.argv[1], 'wb').write(b'd' * 5000)"
    during = subprocess.Popen([PY, "-c", script, str(c.mnt / "outage" / "during")])
    time.sleep(1.0)
    assert during.poll() is None, "c's create should wait for the master"
    master.start_again()
    for m, before in zip(mounts, logs, strict=True):
        wait_for(
            lambda m=m, before=before: m.log.read_text().count("resumed with") > before,
            timeout=30,
            what=f"{m.mnt.name} to resume",
        )
    assert during.wait(timeout=30) == 0
    wait_for(lambda: "rebuilt from 3 resumed hosts" in master.log.read_text(), what="rebuild")
    for m in mounts:
        d = m.mnt / "outage"
        assert sorted(os.listdir(d)) == ["during", "synced", "unsynced"], m.log.read_text()
        assert (d / "unsynced").read_bytes() == b"u" * 7000
        assert (d / "during").read_bytes() == b"d" * 5000
        assert "fenced" not in m.log.read_text()
    (a.mnt / "outage" / "after").write_text("carries on")
    assert (b.mnt / "outage" / "after").read_text() == "carries on"
    assert sorted(status_json(vol, master)["master"]["hosts"]) == ["0", "1", "2"]


def test_zz_unmount_all_and_fsck_clean(hosts) -> None:  # type: ignore[no-untyped-def]
    mounts, master, vol = hosts
    for m in mounts:
        m.umount()
    master.stop()
    fsck_ok(vol)
