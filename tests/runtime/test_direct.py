"""lazy() of a plain local file maps it directly (the kernel's private file mapping, no handler)
when nothing that needs a handler is asked for; everything else goes through a handler.

The data is position-dependent with no zero element (int32, the value at index i is i + 1): a
page read from the wrong place, or not read at all, fails the check, which names the first wrong
element. Which path was taken is asked of ``server_of`` before any element is read, so a
handler's memory is never touched in the pytest process (it is, in forked targets).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests._target import PAGE, Channel, Target
from tests.runtime.test_serve import in_target
from userfaultfd.runtime import Single, _lazy, lazy, server_of
from userfaultfd.stores import FileStore, pack

COUNT = 256 * PAGE // 4  # 256 pages of int32
VALUES = np.arange(1, COUNT + 1, dtype=np.int32)
SHAPE = (256, PAGE // 4)  # one row a page
PER_PAGE = PAGE // 4


def first_wrong(got: Any, want: Any) -> str:
    """Empty when every element of ``got`` equals ``want``; else which element first differs, what
    it held and what it should have held."""
    got, want = np.asarray(got).ravel(), np.asarray(want).ravel()
    if got.shape != want.shape:
        return f"{got.size} elements where {want.size} were expected"
    wrong = np.flatnonzero(got != want)
    if not wrong.size:
        return ""
    at = int(wrong[0])
    return (f"element {at} (page {at * got.itemsize // PAGE}) holds {got[at]}, expected "
            f"{want[at]}; {wrong.size} elements wrong")  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """values.npy (SHAPE, int32, i + 1), raw.bin (the same values, no header), raw.pack."""
    root = tmp_path_factory.mktemp("direct")
    np.save(root / "values.npy", VALUES.reshape(SHAPE))
    (root / "raw.bin").write_bytes(VALUES.tobytes())
    pack(root / "raw.bin", root / "raw.pack", chunk_size=256 << 10)
    return root


@pytest.fixture
def copy(sources: Path, tmp_path: Path) -> Path:
    """A copy of values.npy that the test may write, truncate or map."""
    path = tmp_path / "values.npy"
    shutil.copyfile(sources / "values.npy", path)
    return path


def is_direct(array: Any) -> bool:
    """True for memory mapped directly, False for memory a handler serves."""
    try:
        server_of(array)
    except ValueError as err:
        assert "mapped directly" in str(err) and "direct=False" in str(err), str(err)
        return True
    return False


def data_offset(path: Path) -> int:
    """Where the data of the .npy at ``path`` starts."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def test_a_plain_npy_is_mapped_directly(sources: Path) -> None:
    array = lazy(sources / "values.npy")
    assert is_direct(array), "lazy() of a plain .npy with no options went through a handler"
    assert (array.shape, array.dtype, array.flags.writeable) == (SHAPE, np.int32, True)
    assert not (wrong := first_wrong(array, VALUES)), wrong


def test_a_raw_file_with_a_dtype_is_mapped_directly(sources: Path) -> None:
    path = str(sources / "raw.bin")
    flat = lazy(path, dtype=np.int32)
    assert is_direct(flat), "lazy() of a raw file with a dtype went through a handler"
    assert flat.shape == (COUNT,)
    assert not (wrong := first_wrong(flat, VALUES)), wrong
    shaped = lazy(f"file://{path}", dtype=np.int32, shape=(3, 5))  # fewer bytes than the file
    assert is_direct(shaped), "lazy() of a file:// URL went through a handler"
    assert not (wrong := first_wrong(shaped, VALUES[:15])), wrong
    raw = lazy(path)  # no dtype: a memoryview of the bytes
    assert is_direct(raw) and isinstance(raw, memoryview) and not raw.readonly
    assert not (wrong := first_wrong(np.frombuffer(raw, np.int32), VALUES)), wrong


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("raw.pack", {"dtype": np.int32}),
        ("values.npy", {"policy": Single()}),
        ("values.npy", {"record": "RECORD"}),
        ("values.npy", {"direct": False}),
    ],
    ids=["pack", "policy", "record", "direct=False"],
)
def test_a_handler_serves_what_needs_one(
    sources: Path, tmp_path: Path, name: str, options: dict[str, Any]
) -> None:
    if options.get("record") == "RECORD":
        options = dict(options, record=str(tmp_path / "working-set"))

    def body() -> tuple[bool, str]:
        array = lazy(str(sources / name), **options)
        if is_direct(array):
            return True, ""
        return False, first_wrong(array, VALUES)  # only read once a handler serves it

    direct, wrong = in_target(body)
    assert not direct, f"lazy({name}, {options}) was mapped directly, not through a handler"
    assert not wrong, wrong


def test_direct_true_refuses_what_needs_a_handler(sources: Path) -> None:
    with pytest.raises(ValueError, match=r"direct=True cannot map .*a pack needs a handler"):
        lazy(sources / "raw.pack", dtype=np.int32, direct=True)
    with pytest.raises(ValueError, match="policy needs a handler"):
        lazy(sources / "values.npy", policy=Single(), direct=True)
    with pytest.raises(ValueError, match="cpu, record need a handler"):
        lazy(sources / "values.npy", record="/nonexistent/x", cpu=None, direct=True)
    with pytest.raises(ValueError, match="a bytes: bytes in memory need a handler"):
        lazy(VALUES.tobytes(), dtype=np.int32, direct=True)
    store = FileStore(sources / "values.npy")
    try:
        with pytest.raises(ValueError, match="a Store object needs a handler"):
            lazy(store, direct=True)
    finally:
        store.close()
    with pytest.raises(ValueError, match="/dev/zero is not a regular file"):
        lazy("/dev/zero", dtype=np.int32, shape=(4,), direct=True)
    array = lazy(sources / "values.npy", direct=True)
    assert is_direct(array), "direct=True on a plain .npy went through a handler"
    assert not (wrong := first_wrong(array, VALUES)), wrong


def test_a_file_the_kernel_refuses_to_map_goes_through_a_handler(
    sources: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mmap fails with ENODEV on a file system that cannot map files (sysfs, some FUSE); none
    is at hand that also reads as a whole file, so the refusal is made here."""

    def refuse(store: FileStore, offset: int, nbytes: int) -> Any:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    monkeypatch.setattr(_lazy, "map_file", refuse)
    with pytest.raises(ValueError, match=r"the kernel refuses to map it \(No such device\)"):
        lazy(sources / "values.npy", direct=True)

    def body() -> tuple[bool, str]:
        array = lazy(sources / "values.npy")
        if is_direct(array):
            return True, ""
        return False, first_wrong(array, VALUES)

    direct, wrong = in_target(body)
    assert not direct, "a file mmap refused was mapped directly"
    assert not wrong, f"served by the handler instead: {wrong}"


def test_writes_stay_private_to_the_memory(copy: Path) -> None:
    before = copy.read_bytes()
    array = lazy(copy)
    assert is_direct(array)
    array[:] = -array  # every element written, every page copied on write
    assert not (wrong := first_wrong(array, -VALUES)), f"after the writes: {wrong}"
    assert copy.read_bytes() == before, "writes to the array reached the file"
    again = lazy(copy)
    assert not (wrong := first_wrong(again, VALUES)), f"a second lazy() of the file: {wrong}"


def test_a_forked_child_reads_the_same_bytes_and_keeps_its_writes(copy: Path) -> None:
    array = lazy(copy)
    assert is_direct(array)
    array[0, 7] = 10_000_000  # a write before the fork: the child sees it
    want = VALUES.reshape(SHAPE).copy()
    want[0, 7] = 10_000_000

    def child(channel: Channel) -> None:
        seen = first_wrong(array, want)
        array[:] = -want
        channel.send(("child", seen, first_wrong(array, -want)))

    with Target(child, timeout=20) as target:
        (_tag, seen, written), _ = target.recv()
        assert target.exit_code() == 0
    assert not seen, f"the forked child read: {seen}"
    assert not written, f"the forked child's own writes: {written}"
    assert not (wrong := first_wrong(array, want)), f"after the child's writes, the parent: {wrong}"


def test_a_write_to_the_file_in_place_shows_through_the_direct_mapping(copy: Path) -> None:
    """The difference the README states: an unwritten page of a private file mapping is the
    page cache's page, so a write to the file in place shows through it, even on a page read
    before; a page a handler filled is a copy that does not change."""
    start = data_offset(copy)

    def write_row(row: int, first: int) -> np.ndarray[Any, Any]:
        """Write the values first, first + 1, ... over one row (one page) of the file, in place;
        return the values the whole file holds now."""
        new = np.arange(first, first + PER_PAGE, dtype=np.int32)
        fd = os.open(copy, os.O_WRONLY)
        try:
            assert os.pwrite(fd, new.tobytes(), start + row * PAGE) == PAGE
        finally:
            os.close(fd)
        now: np.ndarray[Any, Any] = np.load(copy)
        return now

    def served() -> str:
        array = lazy(copy, direct=False)
        assert not is_direct(array)
        before = first_wrong(array, VALUES)  # every page filled
        write_row(50, 2_000_001)
        return before or first_wrong(array, VALUES)

    wrong = in_target(served)
    assert not wrong, f"through a handler, after the write in place: {wrong}"
    array = lazy(copy)
    assert is_direct(array)
    now = np.load(copy)
    assert not (wrong := first_wrong(array, now)), wrong  # every page read
    now = write_row(100, 3_000_001)
    assert not (wrong := first_wrong(array, now)), f"mapped directly: {wrong}"
    assert now[100, 0] == 3_000_001 and now[50, 0] == 2_000_001, "the writes did not happen"


@pytest.mark.parametrize("before", ["read", "written"])
def test_truncating_the_file_gives_sigbus(copy: Path, before: str) -> None:
    """Past the new end, a page read before the truncation and a page the process wrote (its
    private copy) both go: the kernel drops them from every mapping of the file."""

    def child(channel: Channel) -> None:
        array = lazy(copy)
        assert is_direct(array)
        channel.send(("read", first_wrong(array, VALUES.reshape(SHAPE))))  # every page read
        if before == "written":
            array[200] = -array[200]
        os.truncate(copy, data_offset(copy) + 128 * PAGE)  # half the rows remain
        channel.send(("kept", first_wrong(array[:128], VALUES[: 128 * PER_PAGE])))
        _ = int(array[200, 0])  # a page past the new end: SIGBUS
        channel.send(("past the end", int(array[200, 0])))

    with Target(child, timeout=20) as target:
        (_, read), _ = target.recv()
        assert not read, f"before the truncation: {read}"
        (_, kept), _ = target.recv()
        assert not kept, f"a page before the new end, after the truncation: {kept}"
        status = target.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (
        f"reading a page {before} before, past the new end, ended with wait status {status},"
        " not SIGBUS"
    )


def test_a_file_replaced_or_unlinked_after_the_open_is_still_the_one_mapped(copy: Path) -> None:
    array = lazy(copy)  # no page read yet
    assert is_direct(array)
    other = copy.with_name("other.npy")
    np.save(other, (VALUES + 5_000_000).reshape(SHAPE))  # other values, none zero
    os.replace(other, copy)
    assert not (wrong := first_wrong(array, VALUES)), f"after the file was replaced: {wrong}"
    unlinked = lazy(copy)  # the new file, no page read yet
    assert is_direct(unlinked)
    os.unlink(copy)
    wrong = first_wrong(unlinked, VALUES + 5_000_000)
    assert not wrong, f"after the file was unlinked: {wrong}"
