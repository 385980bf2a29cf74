"""--peer-reads in the master's directory, message by message (sans I/O):
a read of a block another host caches clean is shipped from that host's
cache, the receiver's copy is marked a copy, and when the primary lets go
a copy becomes primary (cluster-aware replacement, seed 001)."""

from __future__ import annotations

from t1_directory import lock

from sharedfs import protocol as p
from sharedfs.directory import HANDOFF_START, NOBODY, Directory
from sharedfs.protocol import Mode

S, X, N = int(Mode.S), int(Mode.X), int(Mode.N)


def joined(*nodes: int, peer_reads: bool = True) -> Directory:
    d = Directory(peer_reads=peer_reads)
    for n in nodes:
        d.join(n)
    return d


def done(d: Directory, node: int, block: int, to: int, keep: int) -> list:
    return d.on_ping_done(node, p.PingDone(block, to, keep, 0, 0, False, 0, 0))


def test_without_peer_reads_a_second_reader_reads_storage():
    d = joined(1, 2, peer_reads=False)
    lock(d, 1, 1, (5,), Mode.S)
    assert lock(d, 2, 2, (5,), Mode.S) == [(2, p.Grant(2, (5,), S, 0))]
    assert d.counters.pings == 0 and d.counters.peer_reads == 0


def test_a_second_reader_gets_the_primarys_copy_and_holds_it_as_a_copy():
    d = joined(1, 2)
    assert lock(d, 1, 1, (5,), Mode.S) == [(1, p.Grant(1, (5,), S, 0))]
    assert d.blocks[5].primary == 1  # it read storage
    out = lock(d, 2, 2, (5,), Mode.S)
    # One ping: ship to 2, keep S, stay primary; the transfer is the grant.
    assert out == [(1, p.Ping(5, 2, S, S, 2, 0, 2.0, True, (), True))]
    out = done(d, 1, 5, 2, S)
    assert out == [(2, p.Grant(2, (5,), S, 0, (), True))]
    st = d.blocks[5]
    assert st.holders == {1: Mode.S, 2: Mode.S} and st.primary == 1
    assert d.counters.peer_reads == 1 and d.counters.transfers == 1


def test_when_the_primary_lets_go_the_newest_copy_becomes_primary():
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5, 6), Mode.S)
    for node, req in ((2, 2), (3, 3)):
        for block in (5, 6):
            out = lock(d, node, req * 10 + block, (block,), Mode.S)
            assert [(n, m.to) for n, m in out] == [(1, node)]
            done(d, 1, block, node, S)
    # Node 1 evicts both: node 3, whose copies came last, is told at once,
    # both blocks in one message.
    out = d.on_release(1, p.Release((5, 6)))
    assert out == [(3, p.Primary((5, 6)))]
    assert d.blocks[5].primary == 3 and d.counters.primaries_moved == 2
    # The next reader is shipped node 3's copy.
    out = lock(d, 4, 4, (5,), Mode.S)
    assert [(n, m.to, m.primary) for n, m in out] == [(3, 4, True)]


def test_a_copy_that_goes_is_no_news():
    d = joined(1, 2)
    lock(d, 1, 1, (5,), Mode.S)
    lock(d, 2, 2, (5,), Mode.S)
    done(d, 1, 5, 2, S)
    assert d.on_release(2, p.Release((5,))) == []
    assert d.blocks[5].primary == 1 and d.counters.primaries_moved == 0


def test_a_writer_takes_the_primarys_copy_and_the_others_are_revoked():
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5,), Mode.S)
    lock(d, 2, 2, (5,), Mode.S)
    done(d, 1, 5, 2, S)
    out = lock(d, 3, 3, (5,), Mode.X)
    pings = {n: (m.to, m.keep, m.primary) for n, m in out}
    assert pings == {1: (3, N, False), 2: (NOBODY, N, False)}
    assert done(d, 2, 5, NOBODY, N) == []
    assert done(d, 1, 5, 3, N) == [(3, p.Grant(3, (5,), X, 0, (), True))]
    st = d.blocks[5]
    assert st.holders == {3: Mode.X} and st.primary == 3


def test_a_primary_that_had_let_go_ships_nothing_and_the_reader_reads_storage():
    """The ping crosses the primary's Release: it answers keep N (it holds
    nothing), so the master does not count it a holder again."""
    d = joined(1, 2)
    lock(d, 1, 1, (5,), Mode.S)
    out = lock(d, 2, 2, (5,), Mode.S)
    assert [n for n, _ in out] == [1]
    assert d.on_release(1, p.Release((5,))) == []  # it waits for the PingDone
    assert done(d, 1, 5, 2, N) == [(2, p.Grant(2, (5,), S, 0, (), True))]
    st = d.blocks[5]
    assert st.holders == {2: Mode.S} and st.primary == 2


# -- handoffs: an evicted block moves to a host with room (seed 001) ---------------
H = p.HANDOFF


def test_a_block_only_its_evicter_holds_moves_to_the_host_it_offers_it_to():
    """Node 1 would evict block 5 and offers it to node 2: one ping, to
    ship it to 2 and keep nothing; 2's grant is the handoff's, and 2 is the
    block's primary now.  No storage read or write is asked of anyone."""
    d = joined(1, 2)
    lock(d, 1, 1, (5,), Mode.S)
    out = d.on_handoff(1, p.Handoff((5,), 2))
    assert out == [(1, p.Ping(5, 2, S, N, H, 0, HANDOFF_START, True, (), False))]
    assert done(d, 1, 5, 2, N) == [(2, p.Grant(H, (5,), S, 0, (), True))]
    st = d.blocks[5]
    assert st.holders == {2: Mode.S} and st.primary == 2 and st.owner is None
    c = d.counters
    assert (c.handoffs, c.handoffs_declined, c.transfers, c.peer_reads) == (1, 0, 1, 0)
    assert c.write_performs == 0
    # The next reader is shipped node 2's copy, as the primary's.
    out = lock(d, 3, 3, (5,), Mode.S)
    assert [(n, m.to, m.keep, m.primary) for n, m in out] == [(2, 3, S, True)]


def test_an_offer_the_cluster_needs_no_handoff_for_goes_back_declined_in_one_message():
    """Block 5 has a copy on node 3 (it survives the eviction); block 6 has
    a reader waiting; block 7 nobody knows of; block 8 moves.  The three
    that stay go back in one Handoff to nobody, and nothing about them
    changes: the giver evicts them as it would have."""
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5, 6, 8), Mode.S)
    lock(d, 3, 3, (5,), Mode.S)
    done(d, 1, 5, 3, S)
    lock(d, 1, 4, (6,), Mode.X)  # an upgrade: granted, node 1 holds X
    assert lock(d, 3, 5, (6,), Mode.S) != []  # node 3 waits: node 1 is pinged
    before = {b: (dict(d.blocks[b].holders), d.blocks[b].primary) for b in (5, 6)}
    out = d.on_handoff(1, p.Handoff((5, 6, 7, 8), 2))
    assert out[-1] == (1, p.Handoff((5, 6, 7), NOBODY))
    assert [(n, type(m).__name__, m.to) for n, m in out[:-1]] == [(1, "Ping", 2)]
    assert {b: (dict(d.blocks[b].holders), d.blocks[b].primary) for b in (5, 6)} == before
    assert 7 not in d.blocks
    assert (d.counters.handoffs, d.counters.handoffs_declined) == (1, 3)


def test_an_offer_to_itself_to_a_stranger_or_without_peer_reads_is_declined():
    for d, to in ((joined(1, 2), 1), (joined(1, 2), 9), (joined(1, 2, peer_reads=False), 2)):
        lock(d, 1, 1, (5,), Mode.S)
        assert d.on_handoff(1, p.Handoff((5,), to)) == [(1, p.Handoff((5,), NOBODY))]
        assert d.blocks[5].holders == {1: Mode.S}


def test_a_request_behind_a_handoff_is_served_from_the_blocks_new_home():
    d = joined(1, 2, 3)
    lock(d, 1, 1, (5,), Mode.S)
    d.on_handoff(1, p.Handoff((5,), 2))
    assert lock(d, 3, 3, (5,), Mode.X) == []  # queued behind the handoff
    out = done(d, 1, 5, 2, N)
    # 2 gets its grant, and at once the ping that takes the block to 3.
    assert out[0] == (2, p.Grant(H, (5,), S, 0, (), True))
    assert [(n, m.to, m.keep) for n, m in out[1:]] == [(2, 3, N)]
    assert done(d, 2, 5, 3, N) == [(3, p.Grant(3, (5,), X, 0, (), True))]
    assert d.blocks[5].holders == {3: Mode.X}


def test_a_giver_that_dies_mid_handoff_leaves_the_block_to_storage():
    """Node 1 dies before its PingDone: it held the block clean, in S, so
    no block is rebuilt (only its log is replayed); node 2's handoff is
    granted from storage (no transfer to wait for)."""
    d = joined(1, 2)
    lock(d, 1, 1, (5,), Mode.S)
    d.on_handoff(1, p.Handoff((5,), 2))
    out = d.fail(1)
    assert (2, p.Grant(H, (5,), S, 0)) in out
    assert all(5 not in m.blocks for _, m in out if isinstance(m, p.Recover))
    assert d.blocks[5].holders == {2: Mode.S}
