"""Supervision: a handler killed at any moment costs a restart, never wrong data or a hang."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests._target import PAGE, Channel, Target
from tests.runtime.test_serve import in_target
from userfaultfd import memory
from userfaultfd.runtime import Adaptive, Single, serve
from userfaultfd.stores import BytesStore, FileStore, StoreError

SIZE = 256 << 20


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    path = str(tmp_path_factory.mktemp("supervised") / "source")
    digest = hashlib.sha256()
    rng = random.Random(77)
    with open(path, "wb") as f:
        for _ in range(SIZE >> 20):
            block = rng.randbytes(1 << 20)
            digest.update(block)
            f.write(block)
    return path, digest.hexdigest()


@pytest.mark.timeout(300)
def test_twenty_loads_survive_handlers_killed_at_random_moments(source: tuple[str, str]) -> None:
    path, expected = source

    def body() -> list[tuple[bool, int, int]]:
        outcomes = []
        for run in range(20):
            mapping = memory.anonymous(SIZE)
            server = serve([mapping], FileStore(path), policy=Adaptive(max_bytes=1 << 20))
            killer = os.fork()
            if killer == 0:  # kills whichever handler is running, three times, at random
                rng = random.Random(run)
                victims = set()
                for _ in range(3):
                    time.sleep(rng.uniform(0.001, 0.04))
                    handler = server.handler_pid
                    try:
                        os.kill(handler, signal.SIGKILL)
                        victims.add(handler)  # a handler not yet replaced is hit once
                    except ProcessLookupError:
                        pass
                os._exit(len(victims))
            digest = hashlib.sha256(mapping.view).hexdigest()  # the load: every page, in order
            killed = os.WEXITSTATUS(os.waitpid(killer, 0)[1])
            stats = server.stop()
            outcomes.append((digest == expected, killed, stats.restarts))
            mapping.close()
        return outcomes

    outcomes = in_target(body, timeout=280)
    assert len(outcomes) == 20
    assert all(correct for correct, _, _ in outcomes), outcomes
    kills = sum(k for _, k, _ in outcomes)
    restarts = sum(r for _, _, r in outcomes)
    # Every load lost at least one handler on average; each replaced handler was a victim (a
    # victim that had already finished its work when the signal came needs no replacement).
    assert restarts >= 20
    assert restarts <= kills


def test_stop_after_a_crash_still_fills_everything(source: tuple[str, str]) -> None:
    path, expected = source

    def body() -> tuple[bool, int]:
        mapping = memory.anonymous(SIZE)
        server = serve([mapping], FileStore(path), policy=Single())
        _ = mapping.view[0]
        os.kill(server.handler_pid, signal.SIGKILL)
        stats = server.stop()  # the supervisor repeats "fill the rest" to the new handler
        return hashlib.sha256(mapping.view).hexdigest() == expected, stats.restarts

    assert in_target(body) == (True, 1)


class _Vanishing(BytesStore):
    """Bytes that cannot be had again once opened: reopen() fails, as a remote object whose
    version changed does."""

    def reopen(self) -> BytesStore:
        if os.path.exists(self.gone):
            raise StoreError(errno.ESTALE, "the object changed since it was opened")
        return self

    def __init__(self, data: bytes, gone: Path) -> None:
        super().__init__(data)
        self.gone = gone


def test_when_the_store_is_gone_missing_pages_are_poisoned(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(64 * PAGE)
    gone = tmp_path / "gone"

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(len(data))
        server = serve([mapping], _Vanishing(data, gone), policy=Single())
        first = bytes(mapping.view[:PAGE])
        gone.touch()  # a restarted handler cannot open the store again
        os.kill(server.handler_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while server.alive and time.monotonic() < deadline:
            time.sleep(0.01)  # the supervisor poisons what is missing, then exits
        channel.send((first == data[:PAGE], server.alive, server.stats().poisoned))
        channel.send(mapping.view[5 * PAGE])  # never filled: SIGBUS, not a zero

    with Target(body) as target:
        (first_ok, still_alive, poisoned), _ = target.recv()
        assert first_ok, "page 0, filled before the store went, lost its bytes"
        assert not still_alive, "the supervisor did not give up on a store that is gone"
        assert poisoned == 63, f"{poisoned} pages poisoned; expected the 63 never filled"
        status = target.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (
            f"reading page 5 after the store went ended with status {status}, not SIGBUS"
        )


def test_a_restarted_handler_knows_the_ranges_as_the_program_moved_them() -> None:
    """REMAP, REMOVE and UNMAP read by a handler that then dies are not lost: the supervisor
    kept the map, so the next handler serves the moved range and zeros for dropped pages."""
    import ctypes
    import mmap

    data = random.Random(23).randbytes(16 * PAGE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mremap.restype = ctypes.c_void_p
    libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                            ctypes.c_void_p]  # fmt: skip

    def body() -> tuple[bool, bool, int]:
        from userfaultfd.stores import BytesStore

        mapping = memory.anonymous(len(data))
        server = serve([mapping], BytesStore(data), policy=Single())
        _ = mapping.view[0]
        mapping.madvise(mmap.MADV_DONTNEED, 0, PAGE)  # page 0 now reads zeros
        spot = memory.anonymous(len(data))
        new = spot.address
        spot.close()
        assert libc.mremap(mapping.address, len(data), len(data), 3, new) == new
        time.sleep(0.1)  # the handler has read both events and reported them
        os.kill(server.handler_pid, signal.SIGKILL)
        moved = ctypes.string_at(new, len(data))  # served by the restarted handler
        stats = server.stop()
        return moved[:PAGE] == bytes(PAGE), moved[PAGE:] == data[PAGE:], stats.restarts

    assert in_target(body) == (True, True, 1)
