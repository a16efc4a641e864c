"""Write-protect tools: live snapshots and dirty-page tracking of a running program's memory.

Three modules: :mod:`.live` (``snapshot``: a live snapshot of a region while the program writes),
:mod:`.dirty` (``track``: the pages written since the last look, through WP_ASYNC and
PAGEMAP_SCAN) and :mod:`.delta` (a base image plus deltas from a tracker, and ``restore``).
"""

from .delta import DeltaInfo as DeltaInfo
from .delta import restore as restore
from .delta import snapshot_delta as snapshot_delta
from .delta import snapshot_full as snapshot_full
from .dirty import DirtyStats as DirtyStats
from .dirty import DirtyTracker as DirtyTracker
from .dirty import track as track
from .live import Snapshot as Snapshot
from .live import SnapshotStats as SnapshotStats
from .live import snapshot as snapshot

__all__ = [
    "DeltaInfo",
    "DirtyStats",
    "DirtyTracker",
    "Snapshot",
    "SnapshotStats",
    "restore",
    "snapshot",
    "snapshot_delta",
    "snapshot_full",
    "track",
]
