"""serve(): real faults in a forked target, filled by the runtime's handler process."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests._target import PAGE, Channel, Target, page_difference
from userfaultfd import memory
from userfaultfd.runtime import Adaptive, Policy, Region, Single, Window, serve
from userfaultfd.stores import BytesStore, FileStore, Store, StoreError

POLICIES: list[Policy] = [Single(), Window(16), Adaptive()]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mremap.restype = ctypes.c_void_p
_libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                         ctypes.c_void_p]  # fmt: skip
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def in_target(body: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run ``body`` in a forked process (which owns the served memory); return what it returns."""

    def run(channel: Channel) -> None:
        channel.send(("result", body()))

    with Target(run, timeout=timeout) as target:
        (_tag, value), _ = target.recv(timeout=timeout)
        assert target.exit_code() == 0
        return value


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A 256 MiB file of random bytes and its digest."""
    path = str(tmp_path_factory.mktemp("store") / "data")
    rng = random.Random(256)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(256):
            block = rng.randbytes(1 << 20)
            digest.update(block)
            f.write(block)
    return path, digest.hexdigest()


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_256_mib_file_is_served_byte_for_byte(big_file: tuple[str, str], policy: Policy) -> None:
    path, expected = big_file

    def body() -> tuple[str, int, int]:
        store = FileStore(path)
        mapping = memory.anonymous(store.size)
        with serve([mapping], store, policy=policy) as server:
            digest = hashlib.sha256(mapping.view).hexdigest()  # touches every page in order
            stats = server.stats()
        return digest, stats.pages, stats.faults

    digest, pages, faults = in_target(body)
    assert digest == expected
    assert pages == (256 << 20) // PAGE  # every page filled once, none twice
    if isinstance(policy, Single):
        assert faults == pages
    else:
        assert faults < pages // 8  # windows: far fewer faults than pages


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_random_order_is_served_correctly(policy: Policy) -> None:
    data = random.Random(5).randbytes(512 * PAGE)

    def body() -> str:
        mapping = memory.anonymous(len(data))
        order = list(range(512))
        random.Random(6).shuffle(order)
        with serve([mapping], BytesStore(data), policy=policy):
            pages = {i: bytes(mapping.view[i * PAGE : (i + 1) * PAGE]) for i in order}
        return page_difference(b"".join(pages[i] for i in range(512)), data)

    wrong = in_target(body)
    assert wrong == "", wrong


class FailingStore(Store):
    """Bytes whose page ``bad`` cannot be read."""

    def __init__(self, data: bytes, bad: int) -> None:
        self.data, self.bad = data, bad

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        if offset <= self.bad * PAGE < offset + len(buffer):
            raise StoreError(errno.EIO, f"page {self.bad} is unreadable")
        chunk = self.data[offset : offset + len(buffer)]
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_unreadable_page_is_poisoned_never_zeros() -> None:
    data = bytes(range(256)) * (8 * PAGE // 256)

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(len(data))
        server = serve([mapping], FailingStore(data, bad=5), policy=Single())
        channel.send(page_difference(mapping.view[: 5 * PAGE], data[: 5 * PAGE]))
        channel.send(mapping.view[5 * PAGE + 7])  # SIGBUS here
        server.stop()

    with Target(body) as target:
        wrong = target.recv()[0]
        assert wrong == "", f"before the unreadable page: {wrong}"
        status = target.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS


def test_stop_fills_the_pages_not_filled_yet() -> None:
    data = random.Random(9).randbytes(300 * PAGE + 123)

    def body() -> tuple[str, int]:
        mapping = memory.anonymous(301 * PAGE)
        server = serve([mapping], BytesStore(data), policy=Single())
        _ = mapping.view[0]
        stats = server.stop()  # drains: the handler fills all that is left, then exits
        return page_difference(mapping.view, data + bytes(PAGE - 123)), stats.pages

    assert in_target(body) == ("", 301)


def test_dropped_pages_read_zeros_as_without_a_handler() -> None:
    data = random.Random(10).randbytes(8 * PAGE)

    def body() -> tuple[bytes, bytes, bytes, int]:
        mapping = memory.anonymous(len(data))
        with serve([mapping], BytesStore(data), policy=Window(8)) as server:
            _ = mapping.view[0]  # fills all 8 pages
            mapping.madvise(mmap.MADV_DONTNEED, 2 * PAGE, 2 * PAGE)  # a REMOVE event
            dropped = bytes(mapping.view[2 * PAGE : 4 * PAGE])
            kept = bytes(mapping.view[: 2 * PAGE]) + bytes(mapping.view[4 * PAGE :])
            events = server.stats().events
        return dropped, kept, data[: 2 * PAGE] + data[4 * PAGE :], events

    dropped, kept, expected, events = in_target(body)
    assert dropped == bytes(2 * PAGE)
    assert kept == expected
    assert events == 1


def test_forked_child_of_the_program_is_served_too() -> None:
    data = random.Random(11).randbytes(16 * PAGE)

    def body() -> tuple[str, str]:
        mapping = memory.anonymous(len(data))
        with serve([mapping], BytesStore(data), policy=Single()):
            _ = mapping.view[0]
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child's copy is registered through the Fork event's uffd
                os.write(write, page_difference(mapping.view, data).encode() or b"ok")
                os._exit(0)
            os.close(write)
            status = os.waitpid(pid, 0)[1]
            child = os.read(read, 4096).decode() if status == 0 else f"wait status {status}"
            os.close(read)
            mine = page_difference(mapping.view, data)
        return child, mine

    child, mine = in_target(body)
    assert child == "ok", f"the forked child: {child}"
    assert mine == "", f"the program, after its child: {mine}"


def test_remapped_region_is_served_at_its_new_address() -> None:
    data = random.Random(12).randbytes(8 * PAGE)

    def body() -> str:
        mapping = memory.anonymous(len(data))
        with serve([mapping], BytesStore(data), policy=Single()):
            _ = mapping.view[0]
            spot = memory.anonymous(len(data))
            new = spot.address
            spot.close()
            moved = _libc.mremap(mapping.address, len(data), len(data), 3, new)  # MAYMOVE|FIXED
            assert moved == new
            return page_difference(ctypes.string_at(new, len(data)), data)

    wrong = in_target(body)
    assert wrong == "", f"at the new address: {wrong}"


def test_unmapped_part_is_forgotten_and_the_rest_still_served() -> None:
    data = random.Random(13).randbytes(8 * PAGE)

    def body() -> str:
        mapping = memory.anonymous(len(data))
        with serve([mapping], BytesStore(data), policy=Single()) as server:
            assert _libc.munmap(mapping.address, 4 * PAGE) == 0  # an UNMAP event
            rest = ctypes.string_at(mapping.address + 4 * PAGE, 4 * PAGE)
            assert server.stats().events == 1
        return page_difference(rest, data[4 * PAGE :])

    wrong = in_target(body)
    assert wrong == "", f"in the pages left mapped (page 0 is page 4 of the region): {wrong}"


def test_threads_faulting_on_one_page_all_get_it() -> None:
    data = random.Random(14).randbytes(4 * PAGE)

    def body() -> list[str]:
        import threading

        mapping = memory.anonymous(len(data))
        results: list[bytes] = []
        with serve([mapping], BytesStore(data), policy=Single()):

            def read() -> None:  # native read: the thread faults without the GIL
                buffer = ctypes.create_string_buffer(PAGE)
                ctypes.memmove(buffer, mapping.address + PAGE, PAGE)
                results.append(buffer.raw)

            threads = [threading.Thread(target=read) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
        return [page_difference(r, data[PAGE : 2 * PAGE]) for r in results]

    wrong = in_target(body)
    assert wrong == [""] * 8, f"what each of the 8 threads read of page 1: {wrong}"


def test_handler_ignores_ctrl_c() -> None:
    data = bytes(4 * PAGE)

    def body() -> bool:
        mapping = memory.anonymous(len(data))
        with serve([mapping], BytesStore(data)) as server:
            os.kill(server.pid, signal.SIGINT)
            time.sleep(0.1)
            return server.alive

    assert in_target(body)


def test_bad_regions_are_refused_before_anything_starts() -> None:
    store = BytesStore(bytes(4 * PAGE))
    with memory.anonymous(8 * PAGE) as mapping:
        with pytest.raises(ValueError, match="aligned"):
            serve([Region(mapping.address + 1, PAGE)], store)
        with pytest.raises(ValueError, match="the store has 16384 bytes"):
            serve([mapping], store)
        with pytest.raises(ValueError, match='"same" or None'):
            serve([Region(mapping.address, PAGE)], store, cpu="elsewhere")


def test_stats_and_lifecycle() -> None:
    data = random.Random(15).randbytes(64 * PAGE)

    def body() -> tuple[int, int, int, bool, str]:
        mapping = memory.anonymous(len(data))
        server = serve([mapping], BytesStore(data), policy=Window(16))
        _ = mapping.view[17 * PAGE]
        # The faulting page's run [17, 32) is copied first and wakes us; page 16 follows.
        deadline = time.monotonic() + 5
        while server.stats().pages < 16 and time.monotonic() < deadline:
            time.sleep(0.001)
        during = server.stats()
        assert server.alive
        final = server.stop()
        wrong = page_difference(mapping.view, data)
        return during.faults, during.pages, final.pages, server.alive, wrong

    faults, pages, final_pages, alive, wrong = in_target(body)
    assert (faults, pages) == (1, 16)
    assert (final_pages, alive) == (64, False)
    assert wrong == "", wrong


def test_same_cpu_placement_pins_the_caller_and_stop_restores_it() -> None:
    data = bytes(4 * PAGE)

    def body() -> tuple[set[int], set[int], set[int], set[int]]:
        before = os.sched_getaffinity(0)
        mapping = memory.anonymous(len(data))
        server = serve([mapping], BytesStore(data), cpu="same")
        during = os.sched_getaffinity(0)
        handler = os.sched_getaffinity(server.pid)
        server.stop()
        return before, during, handler, os.sched_getaffinity(0)

    before, during, handler, after = in_target(body)
    assert len(during) == 1 and handler == during  # one CPU, the same for both
    assert after == before  # the caller's affinity is back as it was


class SlowStore(BytesStore):
    """Bytes that take ``delay`` seconds per read: a far, slow server."""

    def __init__(self, data: bytes, delay: float) -> None:
        super().__init__(data)
        self.delay = delay

    def read_into(self, offset: int, buffer: memoryview) -> int:
        time.sleep(self.delay)
        return super().read_into(offset, buffer)


@pytest.mark.timeout(60)
def test_munmap_and_madvise_never_wait_for_a_slow_store() -> None:
    """The thread that causes UNMAP or REMOVE sleeps until the handler reads the event; a
    handler busy in a 2-second store read must still read it at once."""
    data = random.Random(16).randbytes(16 * PAGE)

    def body() -> tuple[float, float, str]:
        import threading

        mapping = memory.anonymous(len(data))
        with serve([mapping], SlowStore(data, delay=2.0), policy=Single()):
            first = ctypes.create_string_buffer(PAGE)
            reader = threading.Thread(  # faults page 0: keeps the handler in a 2 s read
                target=ctypes.memmove, args=(first, mapping.address, PAGE)
            )
            reader.start()
            time.sleep(0.2)
            started = time.monotonic()
            mapping.madvise(mmap.MADV_DONTNEED, 8 * PAGE, 2 * PAGE)  # a REMOVE event
            advised = time.monotonic() - started
            started = time.monotonic()
            assert _libc.munmap(mapping.address + 12 * PAGE, 4 * PAGE) == 0  # an UNMAP event
            unmapped = time.monotonic() - started
            reader.join(10)
            return advised, unmapped, page_difference(first.raw, data[:PAGE])

    advised, unmapped, wrong = in_target(body)
    assert advised < 0.5 and unmapped < 0.5, (advised, unmapped)
    assert wrong == "", f"page 0, read during the slow store read: {wrong}"
