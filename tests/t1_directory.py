"""The master's decisions when a host dies, message by message (sans I/O):
what it held in X waits for a survivor to rebuild it, after storage has
the newest past image any survivor keeps."""

from __future__ import annotations

from sharedfs import protocol as p
from sharedfs.directory import Directory
from sharedfs.protocol import Mode


def joined(*nodes: int) -> Directory:
    d = Directory()
    for n in nodes:
        d.join(n)
    return d


def lock(d: Directory, node: int, req: int, blocks: tuple[int, ...], mode: Mode) -> list:
    return d.on_lock_request(node, p.LockRequest(req, blocks, int(mode), 0, float(req)))


def test_a_dead_holders_block_waits_for_its_rebuild_by_the_lowest_survivor():
    d = joined(1, 2, 3)
    assert lock(d, 1, 1, (5,), Mode.X) == [(1, p.Grant(1, (5,), int(Mode.X), 0))]
    out = lock(d, 3, 2, (5,), Mode.S)
    assert [(n, type(m).__name__) for n, m in out] == [(1, "Ping")]
    out = d.fail(1)
    # No grant to node 3 from storage: the newest version died with node 1.
    assert out == [(2, p.Recover(1, (5,), 0))]
    assert d.blocks[5].recovering == 1 and d.blocks[5].holders == {2: Mode.X}
    assert lock(d, 3, 3, (5,), Mode.X) == []  # still waits
    out = d.on_recover_done(2, p.RecoverDone(1, (5,), (5,), 9))
    # Node 2 rebuilt it: node 3's requests are served from node 2's copy.
    assert [(n, type(m).__name__, m.to) for n, m in out] == [(2, "Ping", 3)]
    assert 1 not in d.recoveries
    assert d.counters.hosts_failed == 1 and d.counters.blocks_recovered == 1


def test_the_newest_surviving_past_image_is_written_before_the_rebuild():
    d = joined(1, 2, 3)
    lock(d, 3, 1, (7,), Mode.X)
    lock(d, 1, 1, (7,), Mode.X)  # node 3 ships its dirty copy, keeps a PI
    d.on_ping_done(3, p.PingDone(7, 1, int(Mode.N), 40, 40, True, 0, 40))
    out = d.fail(1)
    assert out == [(3, p.WritePerform((7,), 40))]
    assert d.recoveries[1].writes == {7: 40}
    out = d.on_write_done(3, p.WriteDone(((7, 40),), 41))
    assert (2, p.Recover(1, (7,), 41)) in out
    assert d.blocks[7].pis == {}


def test_a_block_the_dead_host_was_being_sent_is_rebuilt_from_the_senders_image():
    d = joined(1, 2)
    lock(d, 2, 1, (9,), Mode.X)
    lock(d, 1, 1, (9,), Mode.X)  # node 2 is pinged to ship to node 1
    d.fail(1)
    # The transfer went out; its receiver is dead: only node 2's PI is left.
    out = d.on_ping_done(2, p.PingDone(9, 1, int(Mode.N), 50, 50, True, 0, 50))
    assert (2, p.WritePerform((9,), 50)) in out
    assert d.blocks[9].recovering == 1
    out = d.on_write_done(2, p.WriteDone(((9, 50),), 51))
    assert (2, p.Recover(1, (9,), 51)) in out


def test_a_clean_leave_recovers_nothing():
    d = joined(1, 2)
    lock(d, 1, 1, (5,), Mode.X)
    assert d.leave(1) == []
    assert d.recoveries == {} and 5 not in d.blocks
