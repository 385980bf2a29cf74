"""A master that has just started rebuilds its directory from what the
resuming hosts report (Join.resume), message by message (sans I/O): the
newest copy wins, copies older than it are revoked, and a block whose
newest version is only a past image waits until storage has it."""

from __future__ import annotations

import pytest

from sharedfs import protocol as p
from sharedfs.directory import NOBODY, Directory
from sharedfs.protocol import Mode

X, S = int(Mode.X), int(Mode.S)


def lock(d: Directory, node: int, req: int, blocks: tuple[int, ...], mode: Mode) -> list:
    return d.on_lock_request(node, p.LockRequest(req, blocks, int(mode), 0, float(req)))


def revoke(block: int, scn: int, written: tuple = ()) -> p.Ping:
    return p.Ping(block, NOBODY, X, int(Mode.N), 0, scn, 0.0, False, written)


def test_consistent_reports_rebuild_holders_owner_and_past_images_with_no_message():
    d = Directory()
    d.rebuild(1, ((10, X, 9, True),), ())
    d.rebuild(2, ((11, S, 4, False),), ((10, 5),))
    assert d.settle() == []
    st = d.blocks[10]
    assert st.holders == {1: Mode.X} and st.owner == 1 and st.pis == {2: 5}
    assert d.blocks[11].holders == {2: Mode.S} and d.blocks[11].disk_version == 4
    # Served as before the restart: the X holder ships its dirty copy.
    out = lock(d, 3, 7, (10,), Mode.X)
    assert [(n, type(m).__name__, m.to, m.final) for n, m in out] == [(1, "Ping", 3, True)]
    # The directory's clock is past every version it heard of.
    assert d.scn == 9


def test_a_copy_shipped_for_a_request_never_granted_wins_and_the_read_copies_go():
    """The old master had node 1's X copy shipped to node 3 and node 2 told
    to drop its read copy; it died before node 2 answered.  Node 3 reports
    the copy that arrived (X), node 2 its read copy: node 2 is revoked, and
    node 3's request, asked again, is granted once node 2 has let go."""
    d = Directory()
    d.rebuild(2, ((5, S, 3, False),), ())
    d.rebuild(3, ((5, X, 7, True),), ())
    d.rebuild(1, (), ((5, 7),))
    assert d.settle() == [(2, revoke(5, 7))]
    assert d.blocks[5].holders == {3: Mode.X} and d.blocks[5].owner == 3
    assert lock(d, 3, 4, (5,), Mode.X) == []  # waits for node 2's PingDone
    out = d.on_ping_done(2, p.PingDone(5, NOBODY, int(Mode.N), 0, 3, False, 0, 8))
    assert out == [(3, p.Grant(4, (5,), X, 8))]


def test_a_transfer_lost_with_the_master_leaves_the_past_image_to_be_written_first():
    """Node 1 shipped its dirty copy (keeping a past image) and the copy
    never arrived: no host reports block 5.  The past image is the newest
    version; its holder writes it unless storage turns out newer (check),
    and nobody is served until then."""
    d = Directory()
    d.rebuild(1, (), ((5, 6),))
    d.rebuild(2, (), ())
    assert d.settle() == [(1, p.WritePerform((5,), 6, True))]
    assert d.blocks[5].settling
    assert lock(d, 2, 3, (5,), Mode.S) == []
    out = d.on_write_done(1, p.WriteDone(((5, 6),), 7))
    # Storage has it: node 1 drops its past image, node 2 reads storage.
    assert out == [(2, p.Grant(3, (5,), S, 7)), (1, p.WriteNotify(((5, 6),), 7))]
    assert not d.blocks[5].settling and d.blocks[5].pis == {}


def test_a_clean_copy_covers_every_older_past_image():
    """A clean copy is what storage has; a past image no newer was covered
    by a write whose notice was lost: its holder is told, and a write it
    asks for is avoided (writing it would put an old version back)."""
    d = Directory()
    d.rebuild(2, ((5, S, 9, False),), ())
    d.rebuild(1, (), ((5, 4),))
    assert d.settle() == []
    assert d.blocks[5].pis == {} and d.blocks[5].disk_version == 9
    out = d.on_write_request(1, p.WriteRequest(((5, 4),), 9))
    assert out == [(1, p.WriteNotify(((5, 9),), 9))]
    assert d.counters.writes_avoided == 1


def test_a_read_copy_of_a_dirty_owner_covers_nothing():
    """Node 1 shipped a read copy of its dirty version to node 2 and kept
    it (S, owner): node 2's copy is clean to node 2 but not on storage.
    Node 0's older past images stay, and a write node 1 asks for is done
    by node 1, not avoided (a test run lost an inode table this way)."""
    d = Directory()
    d.rebuild(0, (), ((7, 22),))
    d.rebuild(1, ((7, S, 34, True),), ())
    d.rebuild(2, ((7, S, 34, False),), ())
    assert d.settle() == []
    st = d.blocks[7]
    assert st.owner == 1 and st.disk_version == 0 and st.pis == {0: 22}
    out = d.on_write_request(1, p.WriteRequest(((7, 34),), 40))
    assert out == [(1, p.WritePerform((7,), 40))]


def test_a_read_copy_older_than_a_past_image_is_stale_and_revoked():
    """Node 2's read copy (v3) is older than node 1's past image (v6): the
    revoke of it died with the old master, and so did the copy node 1
    shipped.  The copy goes, and the past image is written first."""
    d = Directory()
    d.rebuild(2, ((5, S, 3, False),), ())
    d.rebuild(1, (), ((5, 6),))
    out = d.settle()
    assert out == [(2, revoke(5, 6)), (1, p.WritePerform((5,), 6, True))]
    assert d.blocks[5].holders == {}


def test_a_write_that_lands_after_the_restart_is_news_to_the_new_master():
    """A write the old master asked for lands after the restart: its
    WriteDone waits for the new session (deliver), and covers the past
    images the new master learnt of."""
    d = Directory()
    d.rebuild(1, ((5, X, 8, True),), ())
    d.rebuild(2, (), ((5, 6),))
    assert d.settle() == []
    out = d.on_write_done(1, p.WriteDone(((5, 8),), 10))
    assert out == [(1, p.WriteNotify(((5, 8),), 10))]
    assert d.blocks[5].pis == {} and d.deferred == {2: {5: 8}}


def test_a_host_that_dies_before_the_rebuild_takes_its_report_with_it():
    d = Directory()
    d.rebuild(1, ((5, X, 8, True),), ())
    d.rebuild(2, (), ())
    d.fail(1)
    assert d.settle() == []
    assert 5 not in d.blocks or d.blocks[5].holders == {}


def test_a_report_of_a_mode_that_does_not_exist_is_refused():
    with pytest.raises(p.ProtocolError, match="mode 7"):
        Directory().rebuild(1, ((5, 7, 8, True),), ())


def test_a_host_that_did_not_come_back_is_swept_and_nothing_else_is_served_until_then():
    """Node 2 did not resume.  Read copies may be of a version only it had
    (dirty owner): the newest holder becomes the owner and no past image
    counts as covered.  Node 0 (the lowest) is told to sweep node 2's
    records, and to rebuild the log's header (block 9), which nobody holds,
    in a round of its own; node 1's request waits, node 0's recovery
    requests and the log's tail go; once swept, node 1 is served."""
    d = Directory()
    d.llol_block = 9
    d.rebuild(0, (), ((5, 3),))
    d.rebuild(1, ((5, S, 8, False), (6, S, 4, False)), ())
    assert d.settle(sweep=True) == []
    assert d.blocks[5].owner == 1 and d.blocks[5].pis == {0: 3}
    assert d.blocks[5].disk_version == 0
    out = d.sweep({2})
    scn = d.scn  # past every version reported
    assert out == [(0, p.Recover(2, (), scn, False, True)), (0, p.Recover(2, (9,), scn, False))]
    assert d.blocks[9].recovering == 2 and d.blocks[9].holders == {0: Mode.X}
    # Node 1 asks for block 7 (no holder): held back, a sweep may take it.
    assert lock(d, 1, 1, (7,), Mode.X) == []
    # The sweeper's recovery request for block 7 goes ahead of it.
    out = d.on_lock_request(0, p.LockRequest(2, (7,), X, 0, 0.0, True))
    assert out == [(0, p.Grant(2, (7,), X, scn))]
    # The header's round done: the log's tail is served again at once.
    assert d.on_recover_done(0, p.RecoverDone(2, (9,), (9,), 5)) == []
    out = lock(d, 1, 3, (9,), Mode.X)
    assert [(n, type(m).__name__, m.to) for n, m in out] == [(0, "Ping", 1)]
    # Swept (block 7 rebuilt into node 0's cache): node 0 is told to
    # close the recovery (clear node 2's log mark), and node 1 is served.
    out = d.on_recover_done(0, p.RecoverDone(2, (), (7,), 6, (), True))
    assert out[0] == (0, p.Recover(2, (), scn))
    assert [(n, type(m).__name__) for n, m in out[1:]] == [(0, "Ping")]
    assert out[1][1].block == 7 and out[1][1].to == 1
    assert d.blocks[7].owner == 0 and d.counters.hosts_failed == 1


def test_after_a_sweep_an_old_past_image_is_written_only_if_storage_is_older():
    """Node 1 did not come back.  Node 0 wrote block 5 (v30) and reports it
    clean; node 2 keeps a past image (v20) whose notice of that write died
    with the old master.  With a host missing, a clean copy proves nothing
    of storage (it may be a read copy of the missing host's dirty one), so
    nobody knows what storage has.  Node 2 takes the block, lets go of it
    clean, and asks for its past image to be written: checked, it lands
    only if storage is older.  (Unchecked, a torture run put v20 back over
    v30: an inode table's newest changes were lost, a directory bucket
    with them.)"""
    d = Directory()
    d.rebuild(0, ((5, S, 30, False),), ())
    d.rebuild(2, (), ((5, 20),))
    assert d.settle(sweep=True) == []
    assert d.blocks[5].owner == 0 and d.blocks[5].pis == {2: 20}
    out = lock(d, 2, 3, (5,), Mode.X)
    assert [(n, type(m).__name__, m.to) for n, m in out] == [(0, "Ping", 2)]
    d.on_ping_done(0, p.PingDone(5, 2, int(Mode.N), 0, 30, False, 0, 31))
    d.on_release(2, p.Release((5,)))
    out = d.on_write_request(2, p.WriteRequest(((5, 20),), 31))
    assert out == [(2, p.WritePerform((5,), 31, True))]
    # It found v30 on storage, and says so: storage is known from here on.
    out = d.on_write_done(2, p.WriteDone(((5, 30),), 32))
    assert out == [(2, p.WriteNotify(((5, 30),), 32))]
    assert 5 not in d.blocks or d.blocks[5].disk_version == 30


def test_a_current_copy_is_written_plainly_beside_an_unsure_past_image():
    """The holder of the current copy writes that: it is the newest there
    is, whatever storage has.  Only a past image's write is checked."""
    d = Directory()
    d.rebuild(0, ((5, X, 30, True),), ())
    d.rebuild(2, (), ((5, 20),))
    assert d.settle(sweep=True) == []
    assert d.blocks[5].unsure
    out = d.on_write_request(2, p.WriteRequest(((5, 20),), 31))
    assert out == [(0, p.WritePerform((5,), 31))]


def test_a_read_copy_is_written_plainly_by_its_holder_beside_its_own_past_image():
    """Node 2 holds a read copy (v30, clean to it but perhaps on no
    storage: a host is missing) and an older past image.  Asked to write,
    it writes its copy, the newest version, unchecked: a checked write
    would look at the past image only, find storage newer than that, and
    leave v30 on no storage (a test run left the log needing a replay)."""
    d = Directory()
    d.rebuild(0, ((5, S, 30, False),), ())
    d.rebuild(2, ((5, S, 30, False),), ((5, 20),))
    assert d.settle(sweep=True) == []
    d.on_release(0, p.Release((5,)))
    out = d.on_write_request(2, p.WriteRequest(((5, 20),), 31))
    assert out == [(2, p.WritePerform((5,), 31))]


def test_a_sweep_before_any_host_named_the_log_header_rebuilds_it_once_one_does():
    """A partition's new master whose expected hosts all died sweeps them
    before any host could say which block is the log's header (it used to
    look up block -1, and crash).  The first host to join names it: the
    header is held for its own recovery round, and the joiner gets that
    round with the sweep."""
    d = Directory()
    assert d.settle(sweep=True) == []
    assert d.sweep({1}) == []  # no host to do it yet
    assert d.recoveries[1].sweep and -1 not in d.blocks
    assert d.name_llol(9) == []
    assert d.blocks[9].recovering == 1
    out = d.join(2)
    assert [(n, m.dead, m.blocks, m.sweep) for n, m in out] == [
        (2, 1, (), True),
        (2, 1, (9,), False),
    ]
