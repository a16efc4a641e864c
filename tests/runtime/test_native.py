"""Which path answers faults, and the cases the native fast path hands back to the Python loop.

The whole runtime suite runs on both paths (the README's test command runs it again with
UFFD_NATIVE=0); these tests pin which path a handler takes and drive the native answerer through
the messages it must leave to Python: several threads on one page, a page the program dropped, a
range that moved, the store's last partial page.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import threading
from pathlib import Path

import pytest

from tests.runtime.test_serve import _libc, in_target
from userfaultfd import memory
from userfaultfd._libc import madvise as _madvise
from userfaultfd._native import native_available
from userfaultfd.runtime import Adaptive, Policy, Region, Single, Window, serve
from userfaultfd.stores import BytesStore, FileStore

PAGE = mmap.PAGESIZE
EXPECTED = "python" if os.environ.get("UFFD_NATIVE") == "0" else "native"


def _data(pages: int, tail: int = 0) -> bytes:
    """Position-dependent bytes, no zero among them: byte k of page i is 1 + (i * 13 + k) % 251."""
    whole = bytes(1 + (i * 13 + k) % 251 for i in range(pages) for k in range(PAGE))
    return whole + bytes(1 + (pages * 13 + k) % 251 for k in range(tail))


def _first_wrong(got: bytes, want: bytes) -> str:
    if got == want:
        return ""
    bad = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), len(want))
    held = got[bad] if bad < len(got) else None
    return f"page {bad // PAGE} byte {bad % PAGE} held {held}, not {want[bad]}"


@pytest.fixture
def source_file(tmp_path: Path) -> tuple[str, bytes]:
    data = _data(256)
    path = tmp_path / "source"
    path.write_bytes(data)
    return str(path), data


def test_the_native_extension_is_built_where_a_compiler_is() -> None:
    # CI installs gcc (.ci/run): a missing extension there is a broken build, not a skip.
    if EXPECTED == "native":
        assert native_available(), "userfaultfd._speedups did not import: the build hook failed"
    else:
        assert not native_available(), "UFFD_NATIVE=0 did not switch the native path off"


@pytest.mark.parametrize("policy", [Single(), Window(16), Adaptive()], ids=repr)
def test_a_local_file_is_answered_by_the_expected_path(
    source_file: tuple[str, bytes], policy: Policy
) -> None:
    path, data = source_file

    def body() -> tuple[str, str, int]:
        store = FileStore(path)
        mapping = memory.anonymous(len(data))
        with serve([mapping], store, policy=policy) as server:
            got = bytes(mapping.view)
            stats = server.stats()
        return _first_wrong(got, data), stats.path, stats.pages

    wrong, used, pages = in_target(body, timeout=60)
    assert not wrong, wrong
    assert used == EXPECTED, f"{policy!r} over a local file was answered by the {used} path"
    assert pages == 256, f"{pages} pages filled, not 256 (each once)"


class _Custom(Policy):
    """A policy the native path does not know: the Python loop must answer."""

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        return index, min(index + 3, pages)


@pytest.mark.parametrize("case", ["custom-policy", "bytes-store", "record"])
def test_what_the_native_path_cannot_answer_goes_to_python(
    source_file: tuple[str, bytes], tmp_path: Path, case: str
) -> None:
    path, data = source_file

    def body() -> tuple[str, str]:
        store = BytesStore(data) if case == "bytes-store" else FileStore(path)
        options = {"record": str(tmp_path / "ws")} if case == "record" else {}
        policy = _Custom() if case == "custom-policy" else Adaptive()
        mapping = memory.anonymous(len(data))
        with serve([mapping], store, policy=policy, **options) as server:  # type: ignore[arg-type]
            got = bytes(mapping.view)
            used = server.stats().path
        return _first_wrong(got, data), used

    wrong, used = in_target(body, timeout=60)
    assert not wrong, wrong
    assert used == "python", f"{case}: answered by the {used} path"


def test_threads_faulting_on_the_same_pages_all_read_the_right_bytes(
    source_file: tuple[str, bytes],
) -> None:
    path, data = source_file

    def body() -> tuple[list[str], int, int]:
        store = FileStore(path)
        mapping = memory.anonymous(len(data))
        wrong: list[str] = []
        with serve([mapping], store, policy=Single()) as server:

            def read(order: range) -> None:
                for page in order:  # ctypes releases the GIL: the threads fault together
                    got = ctypes.string_at(mapping.address + page * PAGE, PAGE)
                    if got != data[page * PAGE : (page + 1) * PAGE]:
                        wrong.append(
                            f"page {page}: {_first_wrong(got, data[page * PAGE :][:PAGE])}"
                        )

            threads = [threading.Thread(target=read, args=(range(256),)) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            stats = server.stats()
        return wrong, stats.pages, stats.poisoned

    wrong, pages, poisoned = in_target(body, timeout=60)
    assert not wrong, wrong[:3]
    assert (pages, poisoned) == (256, 0), f"{pages} pages filled (not 256), {poisoned} poisoned"


def test_dropped_pages_read_zeros_and_a_moved_range_keeps_its_bytes(
    source_file: tuple[str, bytes],
) -> None:
    path, data = source_file

    def body() -> list[str]:
        store = FileStore(path)
        mapping = memory.anonymous(len(data))
        wrong: list[str] = []
        with serve([mapping], store, policy=Window(16)):
            head = bytes(mapping.view[: 32 * PAGE])  # pages 0-31 in
            if head != data[: 32 * PAGE]:
                wrong.append(f"before: {_first_wrong(head, data[: 32 * PAGE])}")
            # A REMOVE event: the native answerer leaves it (and the faults after it) to Python.
            _madvise(mapping.address + 8 * PAGE, 8 * PAGE, mmap.MADV_DONTNEED)
            dropped = bytes(mapping.view[8 * PAGE : 16 * PAGE])
            if dropped != bytes(8 * PAGE):
                wrong.append(f"dropped pages 8-15 read {dropped[:8]!r}..., not zeros")
            # Move pages 128-255 elsewhere (mremap, MAYMOVE|FIXED onto a fresh reservation).
            target = mmap.mmap(-1, 128 * PAGE)
            where = ctypes.addressof(ctypes.c_char.from_buffer(target))
            moved = _libc.mremap(mapping.address + 128 * PAGE, 128 * PAGE, 128 * PAGE, 3, where)
            if moved != where:
                wrong.append(f"mremap failed: errno {ctypes.get_errno()}")
                return wrong
            got = ctypes.string_at(where, 128 * PAGE)
            if got != data[128 * PAGE :]:
                wrong.append(f"moved range: {_first_wrong(got, data[128 * PAGE :])}")
            rest = bytes(mapping.view[16 * PAGE : 128 * PAGE])
            if rest != data[16 * PAGE : 128 * PAGE]:
                wrong.append(f"pages 16-127: {_first_wrong(rest, data[16 * PAGE : 128 * PAGE])}")
        return wrong

    wrong = in_target(body, timeout=60)
    assert not wrong, wrong


def test_the_last_partial_page_is_the_store_tail_then_zeros(tmp_path: Path) -> None:
    data = _data(64, tail=1000)
    path = tmp_path / "tail"
    path.write_bytes(data)

    def body() -> tuple[str, str]:
        store = FileStore(str(path))
        mapping = memory.anonymous(65 * PAGE)
        with serve([Region(mapping.address, mapping.length)], store, policy=Adaptive()) as server:
            got = bytes(mapping.view)
            used = server.stats().path
        return _first_wrong(got, data + bytes(65 * PAGE - len(data))), used

    wrong, used = in_target(body, timeout=60)
    assert not wrong, wrong
    assert used == EXPECTED, used


def _criu_dump(tmp_path: Path) -> Path:
    """Images of a task with two lazy VMAs of 8 pages each: pages 0-2, 6-9 and 12 present."""
    from tests.criu.test_images import BASE, LAZY, _dump

    return _dump(tmp_path, [(BASE, 3, LAZY), (BASE + 6 * PAGE, 4, LAZY),
                            (BASE + 12 * PAGE, 1, LAZY)])  # fmt: skip


def test_criu_pages_say_where_each_run_is_mapped(tmp_path: Path) -> None:
    from tests.criu.test_images import BASE
    from userfaultfd.criu import CriuPages

    with CriuPages(_criu_dump(tmp_path), 7) as store:
        runs = store.mapped()
        assert runs is not None, "a local pages image is mapped: the native path can serve it"
        covered = [(offset, offset + length) for offset, length, _ in runs]
        assert covered[0][0] == BASE and covered[-1][1] == BASE + 16 * PAGE, covered
        assert all(a[1] == b[0] for a, b in itertools.pairwise(covered)), f"gaps: {covered}"
        for offset, length, address in runs:
            want = bytearray(length)
            store.read_into(offset, memoryview(want))
            got = bytes(length) if address == 0 else ctypes.string_at(address, length)
            page = (offset - BASE) // PAGE
            assert got == want, f"run at page {page}: {_first_wrong(got, bytes(want))}"
        zero_pages = sum(length for _, length, address in runs if address == 0) // PAGE
        assert zero_pages == 8, f"{zero_pages} pages of zeros, not the 8 holes"


@pytest.mark.parametrize("policy", [Single(), Window(4)], ids=repr)
def test_a_criu_task_is_served_with_its_holes_as_zeros(tmp_path: Path, policy: Policy) -> None:
    from tests.criu.test_images import BASE
    from userfaultfd.criu import CriuPages

    images = _criu_dump(tmp_path)
    with CriuPages(images, 7) as store:
        want = bytearray(16 * PAGE)
        store.read_into(BASE, memoryview(want))

    def body() -> tuple[str, str, int, int, int]:
        mapping = memory.anonymous(16 * PAGE)
        with (
            CriuPages(images, 7) as pages,
            serve([Region(mapping.address, 16 * PAGE, BASE)], pages, policy=policy) as server,
        ):
            got = bytes(mapping.view)
            stats = server.stats()
        return _first_wrong(got, bytes(want)), stats.path, stats.pages, stats.zeros, stats.poisoned

    wrong, used, pages, zeros, poisoned = in_target(body, timeout=60)
    assert not wrong, wrong
    assert used == EXPECTED, f"a CRIU task was answered by the {used} path"
    assert (pages, zeros, poisoned) == (8, 8, 0), (
        f"pages {pages}, zeros {zeros}, poisoned {poisoned}"
    )
