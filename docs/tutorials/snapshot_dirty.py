"""Tutorial: a live snapshot while the program writes, and dirty-page tracking with deltas.

Runs as it is (root, Linux 6.7 or later for ``track``: WP_ASYNC and PAGEMAP_SCAN). Everything
happens in this process's own memory; the snapshot's handler is a process of its own.
"""

from __future__ import annotations

# --8<-- [start:setup]
import tempfile
import threading
from pathlib import Path

import numpy as np

from userfaultfd import memory
from userfaultfd.tools import restore, snapshot, snapshot_delta, snapshot_full, track

PAGE = memory.page_size()
WORDS = PAGE // 8


def numbered(pages: int) -> tuple[memory.Mapping, np.ndarray]:
    """Anonymous memory whose 8-byte word i holds i + 1: every page differs, no word is zero."""
    mapping = memory.anonymous(pages * PAGE)
    words = np.frombuffer(mapping.view, dtype=np.uint64)
    words[:] = np.arange(1, words.size + 1, dtype=np.uint64)
    return mapping, words


# --8<-- [end:setup]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # --8<-- [start:snapshot]
        mapping, words = numbered(4096)  # 16 MiB
        before = words.copy()

        # Write-protect the region now; a handler process saves each page before a write to it
        # goes through, and copies the rest in the background. snapshot() returns at once.
        snap = snapshot(mapping, f"{tmp}/memory.img")

        def writer(words: np.ndarray) -> None:  # goes on writing while the image is written
            for page in range(0, 4096, 7):
                words[page * WORDS + page % WORDS] = 10**12 + page

        thread = threading.Thread(target=writer, args=(words,))
        thread.start()
        stats = snap.wait(timeout=60)
        thread.join(timeout=60)

        image = np.fromfile(f"{tmp}/memory.img", dtype=np.uint64)
        assert np.array_equal(image, before), "the image is not memory at the protect instant"
        assert words[7 * WORDS + 7] == 10**12 + 7, "a write was lost"
        print(f"snapshot: {stats.pages} pages, {stats.early} saved early for a write,"
              f" writer stall p99 {stats.stall_p99_us:.0f} us")  # fmt: skip
        del words  # the view into the mapping goes before the mapping is closed
        mapping.close()
        # --8<-- [end:snapshot]

        # --8<-- [start:track]
        region, words = numbered(256)
        with track(region) as tracker:  # WP_ASYNC: writes never wait for anyone
            base, deltas = Path(tmp) / "base.img", [Path(tmp) / "1.delta", Path(tmp) / "2.delta"]
            snapshot_full(tracker, base)  # the whole region, and every page clean again

            for page in (3, 100, 200):
                words[page * WORDS] = 5_000 + page
            assert tracker.dirty(reset=False) == [3, 100, 200]  # look, do not reset
            info = snapshot_delta(tracker, deltas[0])  # those pages, re-protected atomically
            assert info.pages == 3, info
            print(f"delta 1: {info.pages} pages, {info.bytes:,} bytes")

            words[100 * WORDS + 1] = 6_000
            words[255 * WORDS : 256 * WORDS] = 7_000  # the last page, all of it
            snapshot_delta(tracker, deltas[1])
            assert tracker.dirty() == [], "nothing was written since the last delta"

            rebuilt = restore(base, deltas)  # the base, then each delta in order
            assert bytes(rebuilt.view) == bytes(region.view), "base + deltas != memory"
            assert np.frombuffer(rebuilt.view, dtype=np.uint64)[255 * WORDS] == 7_000
            rebuilt.close()
        del words
        region.close()
        # --8<-- [end:track]
    print("snapshot and dirty tracking: every check passed")


if __name__ == "__main__":
    main()
