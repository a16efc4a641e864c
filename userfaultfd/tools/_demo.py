"""A live snapshot under fire: what ``uffd snapshot`` shows.

The writers write with ``ctypes.memmove``, which releases the GIL: they are native writes racing
the snapshot handler, as a real program's would be, not Python code taking turns with it.
"""

from __future__ import annotations

import ctypes
import hashlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from .. import memory
from ._live import SnapshotStats, check_destination, snapshot

__all__ = ["SnapshotDemoResult", "snapshot_demo"]


@final
@dataclass(frozen=True, slots=True)
class SnapshotDemoResult:
    """What :func:`snapshot_demo` did, and whether the image was exact."""

    #: The snapshot's own statistics.
    stats: SnapshotStats
    #: Bytes in the region, the writer threads, and the writes they made during the snapshot.
    size: int
    writers: int
    writes: int
    #: The image at DEST equals the region at the protect instant (read back and compared);
    #: None if it could not be read back.
    exact: bool | None


def snapshot_demo(
    dest: str,
    size: int = 256 << 20,
    *,
    writers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> SnapshotDemoResult:
    """Snapshot a region of ``size`` bytes (rounded down to pages) of this process to ``dest``
    (a path or an fsspec URL) while ``writers`` native threads keep writing to random pages of
    it, then read the image back and compare it with the region as it was when the snapshot
    began. ``progress(saved, pages)`` is called as the image grows. ``dest`` is checked before
    anything else: an unwritable one raises OSError at once."""
    if writers < 0:
        raise ValueError(f"writers must be zero or more, not {writers}")
    page = memory.page_size()
    size -= size % page
    check_destination(dest)  # before filling the region: a bad DEST fails at once
    with memory.anonymous(size) as mapping:
        for offset in range(0, size, 1 << 20):  # recognisable contents
            block = min(1 << 20, size - offset)
            mapping.view[offset : offset + block] = random.Random(offset).randbytes(block)
        expected = hashlib.sha256(mapping.view).hexdigest()
        stop = threading.Event()
        written = [0] * writers
        address, pages = mapping.address, size // page

        def writer(number: int) -> None:
            rng = random.Random(number)
            while not stop.is_set():
                ctypes.memmove(address + rng.randrange(pages) * page, b"written!", 8)
                written[number] += 1

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
        snap = snapshot(mapping, dest)  # the protect instant: the image must equal `expected`
        try:
            for thread in threads:
                thread.start()
            stats = snap.wait(progress=progress)
        finally:  # whatever happened, the writers stop (they would spin on forever)
            stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
    digest = _digest(dest)
    return SnapshotDemoResult(
        stats, size, writers, sum(written), None if digest is None else digest == expected
    )


def _digest(dest: str) -> str | None:
    """SHA-256 of the image at ``dest`` (a path or an fsspec URL); None if it cannot be read."""
    import fsspec

    digest = hashlib.sha256()
    try:
        with fsspec.open(dest, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except Exception:
        return None
    return digest.hexdigest()
