"""--peer-reads in the master's directory, message by message (sans I/O):
a read of a block another host caches clean is shipped from that host's
cache, the receiver's copy is marked a copy, and when the primary lets go
a copy becomes primary (cluster-aware replacement, seed 001)."""

from __future__ import annotations

from t1_directory import lock

from sharedfs import protocol as p
from sharedfs.directory import NOBODY, Directory
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
