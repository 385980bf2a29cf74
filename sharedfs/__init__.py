"""sharedfs: a shared-disk cluster filesystem over FUSE with Cache Fusion coherence."""

from __future__ import annotations

__version__ = "0.1.0"
