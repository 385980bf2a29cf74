"""The past images a host keeps, sorted into checkpoint bins (seed 000).

A past image (PI) is a dirty version of a block that this host shipped to
another host before it reached storage.  It is kept until a write
notification says storage has a version at least as new: until then it is
what recovery would rebuild the block from (claim 1).

Bins (claims 2-5): PIs sit in an ordered series of bins by the time (SCN)
this host first dirtied the block.  A checkpoint closes the open bin and
asks the master to write each closed bin: one request naming every block of
the bin.  Once written, the bin is emptied: PIs the writes covered are gone
(the notifications dropped them); PIs dirtied again since move on to a later
bin.

Keep or merge (claims 41-48): shipping a block that already has a PI here
either adds a second PI or merges the new version into the newest one (the
newer contents, the older first-dirty time).  A second one is kept when a
write of a version between the two is in flight (the older PI will be covered
by it and must be droppable then, claims 41-45), or when the older PI is in a
closed bin, so that the next checkpoint covers it soon (claims 46-48).
Otherwise merging saves the memory of a copy that would be covered by the
same write as the newer one anyway.

This module does no I/O; the cache drives it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from . import format as fmt

#: More than this many PIs of one block are merged whatever the rules say.
MAX_PER_BLOCK = 4


@dataclass(slots=True)
class PastImage:
    """version: the SCN of its last change; first: when this host first
    dirtied the block (picks the bin; a bin write that did not cover it
    moves it on); since: that time as it was, for the log's checkpoint."""

    version: int
    first: int
    data: bytes
    btype: fmt.BlockType | None
    since: int = 0

    def __post_init__(self) -> None:
        if not self.since:
            self.since = self.first


class PastImages:
    """Attributes:
    edges: bin i holds the PIs first dirtied in [edges[i], edges[i+1]); the
        last bin is open.
    kept, merged, discarded: counters.
    """

    def __init__(self) -> None:
        self._pis: dict[int, list[PastImage]] = {}  # each oldest first
        self.edges: list[int] = [0]
        self.kept = 0
        self.merged = 0
        self.discarded = 0

    def __contains__(self, block: int) -> bool:
        return block in self._pis

    def __len__(self) -> int:
        return len(self._pis)

    def __iter__(self) -> Iterator[int]:
        return iter(self._pis)

    def of(self, block: int) -> list[PastImage]:
        return self._pis.get(block, [])

    def newest(self, block: int) -> PastImage | None:
        pis = self._pis.get(block)
        return pis[-1] if pis else None

    def count(self) -> int:
        return sum(len(v) for v in self._pis.values())

    def keep(self, block: int, pi: PastImage, boundary: int) -> None:
        """Add `pi`, a version just shipped; `boundary` is the newest version
        of this block being written to storage right now (0 if none)."""
        pis = self._pis.setdefault(block, [])
        last = pis[-1] if pis else None
        if last is None or (
            len(pis) < MAX_PER_BLOCK
            and (last.version <= boundary < pi.version or last.first < self.edges[-1])
        ):
            pis.append(pi)
            self.kept += 1
        else:
            pis[-1] = PastImage(pi.version, last.first, pi.data, pi.btype, last.since)
            self.merged += 1

    def covered(self, block: int, version: int) -> None:
        """Storage has `version` of `block`: drop the PIs it covers."""
        pis = self._pis.get(block)
        if not pis:
            return
        left = [pi for pi in pis if pi.version > version]
        self.discarded += len(pis) - len(left)
        if left:
            self._pis[block] = left
        else:
            del self._pis[block]

    def oldest_since(self, skip: int = -1) -> int | None:
        """When the oldest change any PI here (but of block `skip`) holds
        was first dirtied."""
        return min(
            (pi.since for b, pis in self._pis.items() if b != skip for pi in pis), default=None
        )

    def newest_versions(self) -> list[tuple[int, int]]:
        return [(b, pis[-1].version) for b, pis in self._pis.items()]

    # -- bins ------------------------------------------------------------------
    def open_bin(self, scn: int) -> None:
        """Close the open bin: what is first dirtied from `scn` on goes into
        a new one."""
        if scn > self.edges[-1]:
            self.edges.append(scn)

    @property
    def closed_bins(self) -> int:
        return len(self.edges) - 1

    def bin_of(self, pi: PastImage) -> int:
        return bisect.bisect_right(self.edges, pi.first) - 1

    def bin_entries(self, i: int) -> list[tuple[int, int]]:
        """(block, version) whose write covers every PI in bin `i`."""
        out = []
        for b, pis in self._pis.items():
            inside = [pi.version for pi in pis if self.bin_of(pi) == i]
            if inside:
                out.append((b, max(inside)))
        return out

    def empty_oldest_bin(self) -> None:
        """Bin 0 was written: what is left in it moves to the next bin, and
        the next bin becomes the oldest (claim 5)."""
        assert self.closed_bins, "the open bin is never emptied"
        nxt = self.edges[1]
        for pis in self._pis.values():
            for pi in pis:
                if pi.first < nxt:
                    pi.first = nxt
        del self.edges[0]
