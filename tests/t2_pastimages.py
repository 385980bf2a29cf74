"""Past images: the keep-or-merge rule and the checkpoint bins (no I/O)."""

from __future__ import annotations

from sharedfs.pastimages import MAX_PER_BLOCK, PastImage, PastImages


def pi(version: int, first: int) -> PastImage:
    return PastImage(version, first, b"v%d" % version, None)


def test_a_second_version_in_the_open_bin_is_merged_into_the_first():
    pis = PastImages()
    pis.keep(7, pi(5, 3), boundary=0)
    pis.keep(7, pi(9, 8), boundary=0)
    (only,) = pis.of(7)
    # Newer contents, the older first-dirty time: it still holds back the
    # checkpoint from where the block was first dirtied (claim 46).
    assert (only.version, only.first, only.data) == (9, 3, b"v9")
    assert (pis.kept, pis.merged) == (1, 1)


def test_no_merge_across_a_write_in_flight():
    """Claims 41-45: a version at or below the being-written one stays apart
    from newer ones, and goes when that write is notified."""
    pis = PastImages()
    pis.keep(7, pi(5, 3), boundary=0)
    pis.keep(7, pi(9, 8), boundary=6)
    assert [p.version for p in pis.of(7)] == [5, 9]
    pis.covered(7, 6)
    assert [p.version for p in pis.of(7)] == [9]
    pis.covered(7, 9)
    assert 7 not in pis and pis.discarded == 2


def test_a_pi_in_a_closed_bin_is_kept_apart_since_the_checkpoint_covers_it_soon():
    pis = PastImages()
    pis.keep(7, pi(5, 3), boundary=0)
    pis.open_bin(6)
    pis.keep(7, pi(9, 8), boundary=0)
    assert [p.version for p in pis.of(7)] == [5, 9]
    assert [pis.bin_of(p) for p in pis.of(7)] == [0, 1]


def test_merging_is_forced_past_the_per_block_limit():
    pis = PastImages()
    for v in range(1, MAX_PER_BLOCK + 3):
        pis.open_bin(10 * v)
        pis.keep(7, pi(10 * v + 1, 10 * v), boundary=0)
    assert len(pis.of(7)) == MAX_PER_BLOCK
    assert pis.of(7)[-1].version == 10 * (MAX_PER_BLOCK + 2) + 1


def test_bin_entries_ask_for_the_newest_version_inside_the_bin():
    pis = PastImages()
    pis.keep(1, pi(4, 2), boundary=0)
    pis.keep(2, pi(5, 5), boundary=0)
    pis.open_bin(10)
    pis.keep(1, pi(12, 11), boundary=0)  # kept apart: bin 0 is closed
    pis.keep(3, pi(14, 13), boundary=0)
    assert sorted(pis.bin_entries(0)) == [(1, 4), (2, 5)]
    assert sorted(pis.bin_entries(1)) == [(1, 12), (3, 14)]


def test_emptying_a_bin_moves_what_the_write_did_not_cover_to_the_next():
    """Claim 5: covered entries are gone; one dirtied again after the
    request (newer than what was written) moves to the next bin."""
    pis = PastImages()
    pis.keep(1, pi(4, 2), boundary=0)
    pis.keep(2, pi(5, 5), boundary=0)
    pis.open_bin(10)
    pis.covered(1, 4)  # the bin write covered block 1 ...
    pis.covered(2, 3)  # ... but block 2 only up to an older version
    pis.empty_oldest_bin()
    assert pis.edges == [10] and pis.closed_bins == 0
    (left,) = pis.of(2)
    assert left.first == 10 and pis.bin_of(left) == 0
