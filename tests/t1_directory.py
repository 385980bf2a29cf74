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
    out = d.fail(1)
    assert out == [(2, p.Recover(1, (5,), 0))]
    assert d.blocks[5].recovering == 1 and d.blocks[5].holders == {2: Mode.X}
    # No grant to node 3 from storage: the newest version died with node 1.
    assert lock(d, 3, 3, (5,), Mode.X) == []
    out = d.on_recover_done(2, p.RecoverDone(1, (5,), (5,), 9))
    # Node 2 rebuilt it: node 3's requests are served from node 2's copy;
    # and node 2 is told to close the recovery (clear node 1's log mark).
    assert [(n, type(m).__name__) for n, m in out] == [(2, "Ping"), (2, "Recover")]
    assert out[0][1].to == 3
    assert out[1][1] == p.Recover(1, (), 9)
    # Until that is done, node 1's slot stays closed.
    assert 1 in d.recoveries
    assert d.on_recover_done(2, p.RecoverDone(1, (), (), 10)) == []
    assert 1 not in d.recoveries
    assert d.counters.hosts_failed == 1 and d.counters.blocks_recovered == 1


def test_a_final_transfer_whose_sender_died_is_rebuilt_by_its_asker():
    """Node 1 is to ship block 5 to node 3 as a final transfer (it is the
    grant) and dies before saying it did.  Node 3 may hold that copy and
    have changed it: node 3 rebuilds the block, not the lowest survivor
    (whose rebuild would lack those changes, beside node 3's copy); a copy
    it kept is written before node 1's records may go."""
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5,), Mode.X)
    out = lock(d, 3, 2, (5,), Mode.X)
    assert [(n, type(m).__name__, m.final) for n, m in out] == [(1, "Ping", True)]
    assert d.fail(1) == [(3, p.Recover(1, (5,), 0, False))]
    assert d.blocks[5].holders == {3: Mode.X}
    out = d.on_recover_done(3, p.RecoverDone(1, (5,), (5,), 9, ((5, 9),)))
    assert out == [
        (3, p.WritePerform((5,), 9)),
        (3, p.Grant(2, (5,), int(Mode.X), 9)),
    ]
    out = d.on_write_done(3, p.WriteDone(((5, 9),), 10))
    assert (2, p.Recover(1, (), 10)) in out
    assert d.blocks[5].heir is None and d.blocks[5].holders == {3: Mode.X}


def test_a_final_transfer_that_never_left_is_rebuilt_by_its_asker_too():
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5,), Mode.X)
    lock(d, 3, 2, (5,), Mode.X)
    d.fail(1)
    out = d.on_recover_done(3, p.RecoverDone(1, (5,), (5,), 9))
    # Rebuilt from storage and the log: nothing to write first.
    assert out == [(3, p.Grant(2, (5,), int(Mode.X), 9)), (2, p.Recover(1, (), 9))]
    assert d.blocks[5].owner == 3


def test_an_heir_that_dies_too_leaves_the_rebuild_to_the_lowest_survivor():
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5,), Mode.X)
    lock(d, 3, 2, (5,), Mode.X)
    d.fail(1)
    out = d.fail(3)
    assert (2, p.Recover(1, (5,), 0)) in out


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


def test_closing_rounds_go_to_the_next_survivor_when_the_closer_dies():
    d = joined(1, 2, 3)
    # A dead host that held nothing still has its mark in the log cleared.
    assert d.fail(1) == [(2, p.Recover(1, (), 0))]
    out = d.fail(2)
    assert sorted(out, key=lambda x: x[1].dead) == [
        (3, p.Recover(1, (), 0)),
        (3, p.Recover(2, (), 0)),
    ]
    assert d.on_recover_done(2, p.RecoverDone(1, (), (), 1)) == []  # dead: ignored
    assert 1 in d.recoveries
    d.on_recover_done(3, p.RecoverDone(1, (), (), 1))
    d.on_recover_done(3, p.RecoverDone(2, (), (), 1))
    assert d.recoveries == {}


def test_a_rebuild_revokes_the_read_copies_of_a_dead_owners_version():
    """Node 1 shipped read copies of its dirty version and died: the
    rebuilder takes the block in X, so those copies must go first, and
    nobody is served until they have."""
    d = joined(1, 2, 3)
    lock(d, 1, 1, (4,), Mode.X)
    lock(d, 3, 2, (4,), Mode.S)  # node 1 ships a read copy, keeps S, owns it
    d.on_ping_done(1, p.PingDone(4, 3, int(Mode.S), 0, 30, True, 0, 30))
    assert d.blocks[4].holders == {1: Mode.S, 3: Mode.S} and d.blocks[4].owner == 1
    out = d.fail(1)
    assert out == [
        (2, p.Recover(1, (4,), 30)),
        (3, p.Ping(4, -1, int(Mode.X), int(Mode.N), 0, 30, 0.0, False)),
    ]
    assert d.blocks[4].holders == {2: Mode.X} and d.blocks[4].revoking == {3}
    d.on_recover_done(2, p.RecoverDone(1, (4,), (4,), 31))
    assert lock(d, 3, 3, (4,), Mode.S) == []  # waits for its own revoke
    out = d.on_ping_done(3, p.PingDone(4, -1, int(Mode.N), 0, 30, False, 0, 31))
    assert [(n, type(m).__name__, m.to) for n, m in out] == [(2, "Ping", 3)]


def test_a_rebuilders_recovery_request_queued_before_its_round_is_granted():
    """Node 2 follows node 1's records to block 8, which dead node 3 held and
    which waits for a write before its rebuild: the request queues; when the
    round hands block 8 to node 2, that request is granted too."""
    d = joined(1, 2, 3, 4)
    lock(d, 4, 1, (8,), Mode.X)
    lock(d, 3, 1, (8,), Mode.X)
    d.on_ping_done(4, p.PingDone(8, 3, int(Mode.N), 40, 40, True, 0, 40))
    d.fail(1)
    assert d.fail(3) == [(4, p.WritePerform((8,), 40))]
    req = p.LockRequest(7, (8,), int(Mode.X), 40, 0.0, True)
    assert d.on_lock_request(2, req) == []
    out = d.on_write_done(4, p.WriteDone(((8, 40),), 41))
    assert (2, p.Recover(3, (8,), 41)) in out
    grants = [m for n, m in out if n == 2 and isinstance(m, p.Grant)]
    assert [(g.req, g.blocks) for g in grants] == [(7, (8,))]


def test_a_block_rebuilt_from_storage_alone_stays_held_by_its_rebuilder():
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5,), Mode.X)
    d.fail(1)
    d.on_recover_done(2, p.RecoverDone(1, (5,), (), 3))
    assert d.blocks[5].holders == {2: Mode.X} and d.blocks[5].owner is None
    out = lock(d, 3, 2, (5,), Mode.X)
    assert [(n, type(m).__name__) for n, m in out] == [(2, "Ping")]


def test_a_senders_death_mid_transfer_waits_for_the_other_copies_to_go():
    """Node 1 owns a dirty version shared with node 2; node 3 asks for X:
    node 1 is to ship it, node 2 to drop its copy.  Node 1 dies first: node
    3's request must be served from the rebuilt copy, not granted bare when
    node 2's answer comes."""
    d = joined(1, 2, 3, 4)
    lock(d, 1, 1, (9,), Mode.X)
    lock(d, 2, 1, (9,), Mode.S)
    d.on_ping_done(1, p.PingDone(9, 2, int(Mode.S), 0, 20, True, 0, 20))
    out = lock(d, 3, 1, (9,), Mode.X)
    assert sorted(n for n, _ in out) == [1, 2]
    out = d.fail(1)
    assert (2, p.Recover(1, (9,), 20)) in out
    d.on_recover_done(2, p.RecoverDone(1, (9,), (9,), 21))
    out = d.on_ping_done(2, p.PingDone(9, -1, int(Mode.N), 0, 20, False, 0, 21))
    # Served anew: the rebuilder (node 2) ships; no bare grant to node 3.
    assert [(n, type(m).__name__) for n, m in out if not isinstance(m, p.Recover)] == [(2, "Ping")]
    assert out[0][1].to == 3


def test_a_clean_leave_recovers_nothing():
    d = joined(1, 2)
    lock(d, 1, 1, (5,), Mode.X)
    assert d.leave(1) == []
    assert d.recoveries == {} and 5 not in d.blocks


def test_a_write_request_that_overtakes_its_transfers_ping_done_is_performed():
    """Node 2's final transfer reached node 3, which changed the block and
    asked for a write, all before node 2's PingDone reached the master: the
    write is not "avoided" (node 3 would drop its only copy of the change
    as clean).  Node 2, still the X holder as far as the master knows,
    writes what it has (an older past image: a write of its own may be in
    flight, and must land first); its PingDone comes before its WriteDone,
    and then node 3, known to hold the block now, writes its v12.  Only
    then is node 3 told: an older notice once let its unmount leave the log
    header unwritten (a CI run)."""
    d = joined(2, 3)
    lock(d, 2, 1, (6,), Mode.X)
    lock(d, 3, 1, (6,), Mode.X)
    out = d.on_write_request(3, p.WriteRequest(((6, 12),), 12))
    assert out == [(2, p.WritePerform((6,), 12))]
    assert d.counters.writes_avoided == 0
    d.on_ping_done(2, p.PingDone(6, 3, int(Mode.N), 10, 10, True, 0, 12))
    out = d.on_write_done(2, p.WriteDone(((6, 10),), 12))
    assert out == [(3, p.WritePerform((6,), 12)), (2, p.WriteNotify(((6, 10),), 12))]
    out = d.on_write_done(3, p.WriteDone(((6, 12),), 13))
    assert out == [(3, p.WriteNotify(((6, 12),), 13))]
    assert d.blocks[6].write_waiters == {}


def test_a_past_image_a_write_covered_before_its_ping_done_came_is_not_recorded():
    """Node 3's v12 landed while node 2's PingDone (with its past image of
    v10) was still on its way: the image is covered already; node 2 hears
    so later, and the master keeps no past image of it to have written."""
    d = joined(2, 3)
    lock(d, 2, 1, (6,), Mode.X)
    lock(d, 3, 1, (6,), Mode.X)
    d.on_write_done(3, p.WriteDone(((6, 12),), 12))
    d.on_ping_done(2, p.PingDone(6, 3, int(Mode.N), 10, 10, True, 0, 12))
    assert 2 not in d.blocks[6].pis and d.deferred[2] == {6: 12}


def test_a_waiter_whose_write_was_in_flight_when_it_asked_waits_for_its_version():
    """Node 2 was writing its v10 when it shipped the block to node 3 (so
    that write must end before another starts); node 3 changed the block
    and asks for v12.  Node 2's v10 landing does not answer node 3: node 3
    is told to write, and hears when v12 is there."""
    d = joined(2, 3)
    lock(d, 2, 1, (6,), Mode.X)
    d.on_write_request(2, p.WriteRequest(((6, 10),), 10))
    lock(d, 3, 1, (6,), Mode.X)
    d.on_ping_done(2, p.PingDone(6, 3, int(Mode.N), 10, 10, True, 10, 11))
    assert d.on_write_request(3, p.WriteRequest(((6, 12),), 12)) == []  # one write at a time
    out = d.on_write_done(2, p.WriteDone(((6, 10),), 12))
    assert out == [(3, p.WritePerform((6,), 12)), (2, p.WriteNotify(((6, 10),), 12))]
    out = d.on_write_done(3, p.WriteDone(((6, 12),), 13))
    assert out == [(3, p.WriteNotify(((6, 12),), 13))]
    assert d.blocks[6].write_waiters == {}


def test_a_host_writing_its_own_copy_mid_operation_hears_the_version_it_wrote():
    """Node 2 asks for its own v12, but an operation of its own is changing
    the copy, so it writes the version before (v9).  It is told v9, not
    v12 (its copy stays dirty; telling it v12 lost a bitmap's change in a
    soak run), and not left waiting for a write nobody can do yet."""
    d = joined(2, 3)
    lock(d, 2, 1, (6,), Mode.X)
    assert d.on_write_request(2, p.WriteRequest(((6, 12),), 12)) == [(2, p.WritePerform((6,), 12))]
    out = d.on_write_done(2, p.WriteDone(((6, 9),), 13))
    assert out == [(2, p.WriteNotify(((6, 9),), 13))]
    assert d.blocks[6].write_waiters == {} and d.blocks[6].writer is None


def test_a_waiter_for_a_version_nobody_has_any_more_is_answered():
    """The newest holder wrote all it has, older than a waiter's past image
    (the block was freed since): the waiter is told its version is done,
    rather than waiting for a write that cannot come."""
    d = joined(2, 3)
    lock(d, 2, 1, (6,), Mode.X)
    lock(d, 3, 1, (6,), Mode.X)
    d.on_ping_done(2, p.PingDone(6, 3, int(Mode.N), 9, 9, True, 0, 9))
    out = d.on_write_request(2, p.WriteRequest(((6, 9),), 12))
    assert out == [(3, p.WritePerform((6,), 12))]
    out = d.on_write_done(3, p.WriteDone(((6, 0),), 12))
    assert sorted(out) == [(2, p.WriteNotify(((6, 9),), 12)), (3, p.WriteNotify(((6, 0),), 12))]


def test_a_rebuilder_registering_a_block_it_allocated_gets_it_at_once():
    """Node 2 rebuilds block 5 for dead node 1 (it holds it in X) and has
    allocated it meanwhile (node 1 had freed it): its registration, sent as
    a recovery request, is granted at once, not queued behind the recovery
    that node 2's own round holds open (a cycle: a hang in the soak).  Any
    other request waits, node 2's plain ones too."""
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5,), Mode.X)
    assert d.fail(1) == [(2, p.Recover(1, (5,), 0))]
    register = p.LockRequest(7, (5,), int(Mode.X), 0, 0.0, True)
    assert d.on_lock_request(2, register) == [(2, p.Grant(7, (5,), int(Mode.X), 0))]
    assert lock(d, 2, 8, (5,), Mode.X) == []
    assert lock(d, 3, 9, (5,), Mode.X) == []


def test_a_recovery_waits_for_the_version_it_needs_not_an_older_write():
    """Node 3 kept a copy newer than the rebuild (v30) and is asked to write
    it; an older write landing meanwhile (node 2's past image, v20, from a
    write that was in flight) does not let node 1's records go."""
    d = joined(1, 2, 3)
    lock(d, 2, 1, (5,), Mode.X)
    lock(d, 1, 1, (5,), Mode.X)
    d.on_ping_done(2, p.PingDone(5, 1, int(Mode.N), 20, 20, True, 0, 20))
    lock(d, 3, 2, (5,), Mode.X)  # node 1 is to ship to node 3, final
    # Node 2's past image goes to storage before the rebuild.
    assert d.fail(1) == [(2, p.WritePerform((5,), 20))]
    out = d.on_write_done(2, p.WriteDone(((5, 20),), 21))
    assert (3, p.Recover(1, (5,), 21, False)) in out
    out = d.on_recover_done(3, p.RecoverDone(1, (5,), (5,), 31, ((5, 30),)))
    assert (3, p.WritePerform((5,), 31)) in out
    out = d.on_write_done(2, p.WriteDone(((5, 20),), 32))
    assert not any(isinstance(m, p.Recover) for _, m in out)
    assert d.recoveries[1].writes == {5: 30}
    out = d.on_write_done(3, p.WriteDone(((5, 30),), 33))
    assert (2, p.Recover(1, (), 33)) in out


def test_a_reader_that_lets_go_before_the_pingdone_is_not_counted_a_holder():
    """The transfer is the grant: the reader uses the block and evicts it
    before the sender's PingDone reaches the master, so its Release comes
    first (torture seeds 21 and 22, with small caches).  Counted a holder
    once done, it was told to keep a copy it no longer had on its next
    request, and read storage, which the dirty owner had not written yet:
    a corrupt directory."""
    d = joined(1, 2)
    lock(d, 1, 1, (5,), Mode.X)
    out = lock(d, 2, 2, (5,), Mode.S)
    assert out == [(1, p.Ping(5, 2, int(Mode.S), int(Mode.S), 2, 0, 2.0, True, ()))]
    assert d.on_release(2, p.Release((5,))) == []  # it had the transfer
    assert lock(d, 2, 3, (5,), Mode.S) == []  # and wants it again: queued
    dirty = p.PingDone(5, 2, int(Mode.S), 0, 7, True, 0, 7)
    out = d.on_ping_done(1, dirty)
    # Its first request completes, granted but not held; the second is
    # served from the owner's copy again, not from storage.
    assert out == [
        (2, p.Grant(2, (5,), int(Mode.S), 7, (), True)),
        (1, p.Ping(5, 2, int(Mode.S), int(Mode.S), 3, 7, 3.0, True, ())),
    ]
    assert d.blocks[5].holders == {1: Mode.S} and d.blocks[5].owner == 1
    d.on_ping_done(1, dirty)
    assert d.blocks[5].holders == {1: Mode.S, 2: Mode.S}
