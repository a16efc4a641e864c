"""snapshot_demo: a snapshot while native threads write, read back and compared with memory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._target import Channel, Target
from userfaultfd.tools import SnapshotDemoResult, snapshot_demo


def in_target(dest: str, size: int, writers: int) -> SnapshotDemoResult:
    """snapshot_demo in a forked target: its writers take write-protect faults there, not here."""

    def body(channel: Channel) -> None:
        channel.send(snapshot_demo(dest, size, writers=writers))

    with Target(body, timeout=60) as target:
        result, _ = target.recv(timeout=60)
        assert target.exit_code() == 0
    assert isinstance(result, SnapshotDemoResult)
    return result


@pytest.mark.timeout(90)
def test_the_image_equals_memory_at_the_protect_instant(tmp_path: Path) -> None:
    dest = tmp_path / "demo.img"
    result = in_target(str(dest), (16 << 20) + 123, writers=2)  # rounded down to pages
    assert (result.size, result.writers, result.exact) == (16 << 20, 2, True)
    assert result.stats.pages == result.stats.saved == (16 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert result.writes > 0, "the writers never ran during the snapshot"
    assert os.listdir(tmp_path) == ["demo.img"] and dest.stat().st_size == 16 << 20


@pytest.mark.timeout(90)
def test_with_no_writers_nothing_is_saved_early(tmp_path: Path) -> None:
    result = in_target(str(tmp_path / "demo.img"), 1 << 20, writers=0)
    assert (result.writes, result.stats.early, result.exact) == (0, 0, True)


def test_a_bad_destination_fails_before_anything_is_mapped(tmp_path: Path) -> None:
    dest = tmp_path / "no" / "such" / "dir" / "image"
    with pytest.raises(FileNotFoundError, match=f"cannot write the snapshot to {dest}"):
        snapshot_demo(str(dest), 1 << 20)
    with pytest.raises(ValueError, match="writers must be zero or more, not -1"):
        snapshot_demo(str(tmp_path / "image"), 1 << 20, writers=-1)
