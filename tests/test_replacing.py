"""The one temp-then-rename writer (userfaultfd/_replacing.py), through its users: the delta
tool's images (tools/_delta.py) and the stores' files (a pack, a cached chunk)."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from userfaultfd import memory
from userfaultfd._replacing import replacing
from userfaultfd.stores import ChunkCache, pack
from userfaultfd.tools import snapshot_full

PAGE = memory.page_size()


def _filled(pages: int) -> memory.Mapping:
    """Anonymous memory whose byte i is (i % 251) + 1: position-dependent, never zero."""
    mapping = memory.anonymous(pages * PAGE)
    mapping.view[:] = bytes((i % 251) + 1 for i in range(pages * PAGE))
    return mapping


def _failing_open(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int) -> None:
    """open() of a new file in ``folder`` fails with ``code`` (as it would with no descriptor
    left, EMFILE); every other open() is the real one."""
    real_open = builtins.open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode and os.path.dirname(os.fspath(file)) == str(folder):
            raise OSError(code, os.strerror(code), os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_a_failed_open_raises_its_own_error_not_the_cleanups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _filled(2) as mapping:
        _failing_open(monkeypatch, tmp_path, errno.EMFILE)
        with pytest.raises(OSError) as caught:
            snapshot_full(mapping, tmp_path / "base.img")
    assert caught.value.errno == errno.EMFILE, (
        f"the open's EMFILE was hidden by {caught.value!r} (the cleanup removed a temporary file"
        " that was never made)"
    )
    assert sorted(os.listdir(tmp_path)) == [], "a failed write left files behind"


def _syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (of the path its descriptor names) and rename, in order, from now on."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append(("rename", os.fspath(dst)))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_a_delta_image_is_synced_then_renamed_then_its_directory_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _filled(3) as mapping:
        events = _syncs(monkeypatch)
        snapshot_full(mapping, tmp_path / "base.img")
        expected = bytes(mapping.view)
    assert (tmp_path / "base.img").read_bytes() == expected, "the image is not the memory"
    assert len(events) == 3, f"expected fsync, rename, fsync of the directory; got {events}"
    (kind0, synced), (kind1, renamed), (kind2, folder) = events
    assert (kind0, kind1, kind2) == ("fsync", "rename", "fsync"), events
    assert os.path.dirname(synced) == str(tmp_path) and synced != renamed, (
        f"the file synced before the rename is not the temporary beside it: {events}"
    )
    assert renamed == str(tmp_path / "base.img") and folder == str(tmp_path), events
    assert os.listdir(tmp_path) == ["base.img"], "a temporary file was left"


def test_a_pack_is_durable_and_a_cache_entry_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = bytes((i % 251) + 1 for i in range(5 * PAGE))
    (tmp_path / "src").write_bytes(source)
    events = _syncs(monkeypatch)
    pack(tmp_path / "src", tmp_path / "src.pack", chunk_size=PAGE)
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"], events
    assert events[-1] == ("fsync", str(tmp_path)), f"the directory was not synced: {events}"
    events.clear()
    ChunkCache(tmp_path / "cache", 1 << 20).put("a" * 64, source[:PAGE])
    assert [kind for kind, _ in events] == ["rename"], f"a cache entry was synced: {events}"


def test_a_failed_body_removes_the_temporary_and_keeps_the_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "kept"
    dest.write_bytes(b"old bytes")
    with pytest.raises(RuntimeError, match="the writer failed"), replacing(str(dest)) as out:
        out.write(b"new bytes, half")
        raise RuntimeError("the writer failed")
    assert dest.read_bytes() == b"old bytes", "a failed write replaced the file"
    assert os.listdir(tmp_path) == ["kept"], "the temporary file was left"
