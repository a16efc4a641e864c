"""Write-protect tools: live snapshots and dirty-page tracking of a running program's memory."""

from .dirty import DeltaInfo as DeltaInfo
from .dirty import DirtyStats as DirtyStats
from .dirty import DirtyTracker as DirtyTracker
from .dirty import restore as restore
from .dirty import snapshot_delta as snapshot_delta
from .dirty import snapshot_full as snapshot_full
from .dirty import track as track
from .snapshot import Snapshot as Snapshot
from .snapshot import SnapshotStats as SnapshotStats
from .snapshot import snapshot as snapshot

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
