"""The remote benchmark's source: its values (the value at index i is i + 1: position
dependent, never zero), how it is written, and the checks every row makes of what it read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from userfaultfd import memory

PAGE = memory.page_size()
PER_PAGE = PAGE // 8  # int64 values per page
RANDOM_FRACTION, RANDOM_SEED = 0.01, 1
WORKING_FRACTION, WORKING_SEED = 0.02, 2
CHANGED_FRACTION, CHANGED_SEED = 0.05, 3
_BLOCK = 1 << 22  # values compared (or written) at a time


def expected(start: int, stop: int) -> Any:
    """Values [start, stop) of the source: index i holds i + 1."""
    return np.arange(start + 1, stop + 1, dtype=np.int64)


def first_bad_page(array: Any, pages: Any = None) -> int | None:
    """The first page of ``array`` (of ``pages``, or of all) not holding the expected values."""
    if pages is None:
        for start in range(0, array.size, _BLOCK):
            block = array[start : start + _BLOCK]
            bad = np.flatnonzero(block != expected(start, start + block.size))
            if bad.size:
                return (start + int(bad[0])) // PER_PAGE
        return None
    index = (np.sort(np.asarray(pages, dtype=np.int64))[:, None] * PER_PAGE
             + np.arange(PER_PAGE, dtype=np.int64)).ravel()  # fmt: skip
    index = index[index < array.size]
    bad = np.flatnonzero(array[index] != index + 1)
    return int(index[bad[0]]) // PER_PAGE if bad.size else None


def sample(pages: int, fraction: float, seed: int) -> Any:
    """A seeded ``fraction`` of ``pages`` page numbers, distinct, in a random order."""
    count = max(1, int(pages * fraction))
    return np.random.default_rng(seed).choice(pages, size=count, replace=False).astype(np.int64)


def write_source(path: Path, size: int, changed: Any = None) -> None:
    """``size`` bytes of the expected values; the pages in ``changed`` negated."""
    count = size // 8
    with path.open("wb") as f:
        for start in range(0, count, _BLOCK):
            block = expected(start, min(count, start + _BLOCK))
            if changed is not None:
                first, last = start // PER_PAGE, (start + block.size - 1) // PER_PAGE
                for page in changed[(changed >= first) & (changed <= last)]:
                    lo = int(page) * PER_PAGE - start
                    block[lo : lo + PER_PAGE] *= -1
            block.tofile(f)


def changed_runs(pages: int, run: int) -> Any:
    """A seeded ``CHANGED_FRACTION`` of ``pages`` in runs of ``run`` pages (1: scattered)."""
    runs = sample(max(1, pages // run), CHANGED_FRACTION, CHANGED_SEED)
    shift = run // 2 if run > 1 else 0  # runs not aligned to chunks
    changed = (runs[:, None] * run + shift + np.arange(run)).ravel()
    return np.unique(changed[changed < pages])
