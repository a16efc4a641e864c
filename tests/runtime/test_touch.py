"""touch_pages: every page of a lazily filled source read once, in a forked child."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from tests import _packs
from tests._target import PAGE, pattern
from userfaultfd.runtime import PageUnreadableError, Single, touch_pages
from userfaultfd.stores import BytesStore, pack

CHUNK = 4 * PAGE
DATA = b"".join(pattern(i + 1) for i in range(64))  # position-dependent, no zero page


def packed(tmp_path: Path, corrupt_chunk: int | None = None) -> Path:
    """DATA as a pack of 16 chunks of 4 pages; ``corrupt_chunk``: one byte flipped inside it."""
    path = tmp_path / "data.pack"
    pack(BytesStore(DATA), path, chunk_size=CHUNK)
    if corrupt_chunk is not None:
        _packs.corrupt_chunk(path, corrupt_chunk)
    return path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("order", ["seq", "random"])
def test_every_page_is_read_once(tmp_path: Path, order: Literal["seq", "random"]) -> None:
    result = touch_pages(str(packed(tmp_path)), order=order, policy=Single())
    assert (result.pages, result.stats.pages, result.stats.faults) == (64, 64, 64)
    assert (result.stats.errors, result.stats.poisoned) == (0, 0)
    assert result.seconds > 0


@pytest.mark.timeout(60)
def test_pages_limits_the_reads(tmp_path: Path) -> None:
    result = touch_pages(str(packed(tmp_path)), pages=10, policy=Single())
    assert (result.pages, result.stats.pages) == (10, 10)


@pytest.mark.timeout(60)
def test_the_first_unreadable_page_is_named_with_its_reason(tmp_path: Path) -> None:
    path = packed(tmp_path, corrupt_chunk=5)
    with pytest.raises(PageUnreadableError) as caught:
        touch_pages(str(path), policy=Single())
    assert caught.value.offset == 5 * CHUNK
    assert caught.value.reason == f"pack chunk 5 (bytes {5 * CHUNK}..): corrupt: hash mismatch"
    assert str(caught.value).startswith(f"page at offset {5 * CHUNK} of {path} could not be read")
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.EIO, caught.value


@pytest.mark.timeout(60)
def test_a_npy_is_read_page_by_page_whatever_its_dtype(tmp_path: Path) -> None:
    """uffd lazy indexed a .npy's elements, not its bytes: of float64 it read 1 page in 8."""
    path = tmp_path / "data.npy"
    array = np.frombuffer(DATA, dtype=np.float64).reshape(8, -1)
    np.save(path, array)
    result = touch_pages(str(path), policy=Single())
    assert result.pages == 64
    assert result.stats.pages == 64


@pytest.mark.timeout(60)
def test_progress_is_reported_up_to_the_last_page(tmp_path: Path) -> None:
    """progress runs in the child that reads: it reports here through a file."""
    log = tmp_path / "progress.log"

    def progress(done: int, total: int) -> None:
        with open(log, "a") as f:
            f.write(f"{done} {total}\n")

    touch_pages(str(packed(tmp_path)), policy=Single(), progress=progress)
    calls = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    assert calls[-1] == (64, 64), calls
    assert [done for done, _ in calls] == sorted({done for done, _ in calls}), calls


def test_a_bad_count_or_source_fails_before_the_fork(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pages must be a positive number, not 0"):
        touch_pages(str(packed(tmp_path)), pages=0)
    with pytest.raises(FileNotFoundError):
        touch_pages(str(tmp_path / "missing"))
