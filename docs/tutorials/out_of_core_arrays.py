"""Tutorial: an array eight times larger than the memory it may use.

Runs as it is (root, Linux 5.19+, NumPy installed): it writes a 64 MiB .npy of int64, maps it
with an 8 MiB budget, reads it, sorts it in place and checks the file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from userfaultfd.runtime import lazy, server_of

N = 8 << 20  # int64 elements: 64 MiB


def main() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        # --8<-- [start:source]
        path = Path(tmp) / "big.npy"
        rng = np.random.default_rng(22)
        values = rng.integers(1, 1 << 62, N)  # never zero, every element its own
        np.save(path, values)
        # --8<-- [end:source]

        # --8<-- [start:read]
        a = lazy(path, budget="8M")  # read-only: a write would be SIGSEGV
        assert int(a.sum(dtype=np.uint64)) == int(values.sum(dtype=np.uint64))
        stats = server_of(a).stats()
        print(f"read 64 MiB within 8 MiB: {stats.resident} pages in memory, "
              f"{stats.evicted} given back")  # fmt: skip
        assert stats.resident * 4096 <= 8 << 20
        del a
        # --8<-- [end:read]

        # --8<-- [start:sort]
        w = lazy(path, budget="8M", writable=True)  # like np.memmap(mode="r+")
        w.sort()  # pages come and go; dirty ones are written back when they go
        server = server_of(w)
        server.flush()  # every write is in the file now, fsynced
        stats = server.stats()
        print(f"sorted in place: {stats.written_back} pages written back, "
              f"{stats.dirty} dirty, {stats.write_errors} write errors")  # fmt: skip
        assert stats.dirty == 0 and stats.write_errors == 0
        # --8<-- [end:sort]

        # --8<-- [start:check]
        on_disk = np.load(path, mmap_mode="r")
        assert bool(np.all(on_disk[:-1] <= on_disk[1:])), "the file is not sorted"
        assert np.array_equal(on_disk, np.sort(values)), "the file lost or changed a value"
        server.stop()
        print("the file holds the sorted values: every check passed")
        # --8<-- [end:check]


if __name__ == "__main__":
    main()
