"""Lock modes and resource names shared by the lock master and the host agent.

The cluster messages (requests, grants, pings, write requests and
notifications) join these definitions here when hosts talk over the network.
"""

from __future__ import annotations

import enum
from typing import NewType

HostId = NewType("HostId", int)


class Mode(enum.IntEnum):
    """N: no access; S: shared, read; X: exclusive, write.  Ordered: X > S > N."""

    N = 0
    S = 1
    X = 2

    def compatible(self, other: Mode) -> bool:
        return self is Mode.N or other is Mode.N or (self is Mode.S and other is Mode.S)


#: A lockable resource: ("block", blockno) or a named one such as ("llol", 0).
Resource = tuple[str, int]


def block_resource(blockno: int) -> Resource:
    return ("block", blockno)
