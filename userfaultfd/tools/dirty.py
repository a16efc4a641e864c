"""The tracker's old import path, kept for ``benchmarks/dirty.py``: use userfaultfd.tools."""

from ._dirty import DirtyStats as DirtyStats
from ._dirty import DirtyTracker as DirtyTracker
from ._dirty import track as track

__all__ = ["DirtyStats", "DirtyTracker", "track"]
