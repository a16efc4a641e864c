"""Write-protect tools: live snapshots and dirty-page tracking of a running program's memory;
and page-access maps of what the runtime recorded.

Everything public is here. Behind it: ``_live`` (``snapshot``: a live snapshot of a region while
the program writes), ``_dirty`` (``track``: the pages written since the last look, through
WP_ASYNC and PAGEMAP_SCAN), ``_delta`` (a base image plus deltas from a tracker, ``restore``),
``_demo`` (``snapshot_demo``: a snapshot while threads write, checked against memory) and
``_trace`` (``read_trace``, ``draw_trace``: each page of a source as a ``record=`` recording
tells, and its picture).

``_top`` (``Top``): what each server of a running program counts, read from outside, as
``uffd top`` shows it.
"""

from ._delta import DeltaInfo as DeltaInfo
from ._delta import restore as restore
from ._delta import snapshot_delta as snapshot_delta
from ._delta import snapshot_full as snapshot_full
from ._demo import SnapshotDemoResult as SnapshotDemoResult
from ._demo import snapshot_demo as snapshot_demo
from ._dirty import DirtyStats as DirtyStats
from ._dirty import DirtyTracker as DirtyTracker
from ._dirty import track as track
from ._live import Snapshot as Snapshot
from ._live import SnapshotStats as SnapshotStats
from ._live import check_destination as check_destination
from ._live import snapshot as snapshot
from ._top import ServerView as ServerView
from ._top import Top as Top
from ._top import TopFrame as TopFrame
from ._trace import PageFill as PageFill
from ._trace import PageTrace as PageTrace
from ._trace import draw_trace as draw_trace
from ._trace import parse_trace as parse_trace
from ._trace import read_trace as read_trace

__all__ = [
    "DeltaInfo",
    "DirtyStats",
    "DirtyTracker",
    "PageFill",
    "PageTrace",
    "ServerView",
    "Snapshot",
    "SnapshotDemoResult",
    "SnapshotStats",
    "Top",
    "TopFrame",
    "check_destination",
    "draw_trace",
    "parse_trace",
    "read_trace",
    "restore",
    "snapshot",
    "snapshot_delta",
    "snapshot_demo",
    "snapshot_full",
    "track",
]
