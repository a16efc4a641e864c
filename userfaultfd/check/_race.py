"""Check 2: the seed's data-loss race, run live.

A shmem range is registered WP and a tracking server (another process) unprotects each page it
gets a WP event for, counting the events in memory it shares with the owner. Each iteration the
owner write-protects a tracked page T (mapped, so the protection holds even without PTE
markers), then three native threads race: one punches a hole at T, one reads the neighbour R
(unmapped, so its read fault is the one that could fault around onto T), one writes a marker
into T. Afterwards, a write that completed, raised no WP event and is not in T any more landed
on the frame the punch dropped: an untracked write, the "ghostly data corruption" of the seed.

Native threads: the reads and writes go through ctypes.memmove and the punch through ctypes
fallocate, which release the GIL, so the three really run at once.
"""

from __future__ import annotations

import ctypes
import mmap
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

from .. import _libc, memory
from .._core import Userfaultfd
from .._errors import PageExistsError
from .._events import PageFault
from .._flags import FaultFlag, Feature, Mode
from .._forked import Channel, Forked
from ._result import CheckOptions, CheckResult, Status

__all__ = ["RaceTally", "judge_race", "race"]

PAGES = 16
TRACKED = 8
NEIGHBOUR = 9
#: Upper bound of each thread's random head start, in microseconds.
MAX_DELAY_US = 200


@dataclass(frozen=True, slots=True)
class RaceTally:
    iterations: int
    #: Writes that completed after a WP event for their page: the server saw them.
    tracked: int
    #: Writes that completed, raised no WP event, and whose data the punch then dropped.
    untracked: int
    #: Tracked writes that the punch then dropped (the write came first, legitimately lost).
    punched_after: int = 0


def judge_race(tally: RaceTally) -> tuple[Status, str]:
    if tally.iterations == 0:
        return Status.FAIL, "no iteration ran"
    if tally.untracked:
        return Status.FAIL, (
            f"{tally.untracked} of {tally.iterations} iterations wrote a protected page with no "
            "WP event, and the punch dropped the write: data loss the server never saw"
        )
    survived = tally.tracked - tally.punched_after
    return Status.PASS, (
        f"0 untracked writes in {tally.iterations} iterations; {tally.tracked} writes raised a "
        f"WP event first ({tally.punched_after} then dropped by the punch, {survived} kept)"
    )


def _tracking_server(uffd_fd: int, log: mmap.mmap, base: int, channel: Channel) -> None:
    """Unprotect every page that raises a WP fault, counting the faults per page in ``log``."""
    page = memory.page_size()
    uffd = Userfaultfd.from_fd(uffd_fd)
    counts = memoryview(log).cast("Q")
    sources: list[Userfaultfd | socket.socket] = [uffd, channel.sock]
    while True:
        ready, _, _ = select.select(sources, [], [], 1.0)
        if uffd in ready:
            for event in uffd.read_events():
                if isinstance(event, PageFault) and event.flags & FaultFlag.WP:
                    index = (event.address - base) // page
                    counts[index] += 1
                    try:
                        uffd.writeprotect(base + index * page, page, protect=False)
                    except PageExistsError:
                        uffd.wake(base + index * page, page)
        if channel.sock in ready:
            return


def _owner(iterations: int, seconds: float, timeout: float, channel: Channel) -> None:
    page = memory.page_size()
    log = mmap.mmap(-1, page)  # MAP_SHARED: the server's counts, seen here
    counts = memoryview(log).cast("Q")
    mapping = memory.memfd(PAGES * page)
    uffd = Userfaultfd(Feature.WP_HUGETLBFS_SHMEM, user_mode_only=True)
    uffd.register(mapping.address, mapping.length, Mode.WP)
    server = Forked(partial(_tracking_server, uffd.fileno(), log, mapping.address), timeout=timeout)
    tracked_at = mapping.address + TRACKED * page
    baseline = bytes([0x11]) * mapping.length
    tally = RaceTally(0, 0, 0)
    rng = random.Random(iterations)
    deadline = time.monotonic() + seconds
    try:
        for iteration in range(1, iterations + 1):
            if time.monotonic() > deadline:
                break
            uffd.writeprotect(mapping.address, mapping.length, protect=False)
            mapping.view[:] = baseline  # every page in the cache and mapped
            mapping.madvise(mmap.MADV_DONTNEED, NEIGHBOUR * page, page)
            uffd.writeprotect(tracked_at, page)
            before = counts[TRACKED]
            marker = struct.pack("<Q", (1 << 63) | iteration)
            delays = [rng.randrange(MAX_DELAY_US) for _ in range(3)]
            wrote = _race_once(mapping, marker, delays, timeout)
            events = counts[TRACKED] - before
            landed = bytes(mapping.view[TRACKED * page : TRACKED * page + 8]) == marker
            tally = RaceTally(
                iteration,
                tally.tracked + (1 if events else 0),
                tally.untracked + (1 if wrote and not events and not landed else 0),
                tally.punched_after + (1 if events and not landed else 0),
            )
    finally:
        server.send("stop")
        server.wait()
    channel.send(tally)


def _race_once(mapping: memory.Mapping, marker: bytes, delays: list[int], timeout: float) -> bool:
    """Punch T, read R and write ``marker`` into T from three native threads at once, each after
    its random head start (microseconds). Returns whether the write completed."""
    page = memory.page_size()
    start = threading.Barrier(3)
    wrote = threading.Event()
    scratch = ctypes.create_string_buffer(8)

    def punch() -> None:
        start.wait()
        _libc.usleep(delays[0])
        mapping.punch_hole(TRACKED * page, page)

    def read() -> None:
        start.wait()
        _libc.usleep(delays[1])
        ctypes.memmove(scratch, mapping.address + NEIGHBOUR * page, 8)

    def write() -> None:
        start.wait()
        _libc.usleep(delays[2])
        ctypes.memmove(mapping.address + TRACKED * page, marker, 8)
        wrote.set()

    threads = [threading.Thread(target=f, daemon=True) for f in (punch, read, write)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError("a racing thread is stuck in a fault nobody serves")
    return wrote.is_set()


def run_race(options: CheckOptions) -> RaceTally:
    body = partial(_owner, options.race_iterations, options.race_seconds, options.timeout)
    with Forked(body, timeout=options.race_seconds + 2 * options.timeout) as owner:
        tally, _ = owner.recv(timeout=options.race_seconds + options.timeout)
        owner.exit_code()
    assert isinstance(tally, RaceTally)
    return tally


def race(options: CheckOptions) -> Iterator[CheckResult]:
    """Check 2."""
    started = time.monotonic()
    try:
        tally = run_race(options)
    except (OSError, TimeoutError, RuntimeError) as err:
        yield CheckResult("race", "wp-punch-hole", Status.FAIL, f"could not run: {err}")
        return
    status, reason = judge_race(tally)
    yield CheckResult("race", "wp-punch-hole", status, reason, time.monotonic() - started)
