"""Check 4: kernel behaviours that write-protect and lazy-restore tools rely on.

- wp-unpopulated: with WP_UNPOPULATED, protecting a range also protects pages never touched, so
  the first write to one raises a WP fault (a snapshot misses nothing).
- pte-markers: on shmem, MADV_DONTNEED of a protected page leaves a PTE marker that keeps the
  protection: the next write still raises a WP fault.
- wp-after-punch: on shmem, a hole punched over a protected page keeps its marker too (the
  truncation drops markers only of a page still mapped): the write to the new page raises a WP
  fault. The out-of-core pager's eviction relies on it.
- eagain: while a REMOVE event is queued and unread, COPY fails with EAGAIN, so a handler cannot
  fill a page the program is discarding.
- close-wakes: closing the last descriptor of a uffd wakes a blocked fault (MISSING anonymous
  memory then reads zeros) instead of leaving the program hung.
"""

from __future__ import annotations

import ctypes
import mmap
import select
import time
from collections.abc import Callable, Iterator
from functools import partial

from .. import memory
from .._core import Userfaultfd
from .._errors import MappingChangedError
from .._events import Event, PageFault, Remove
from .._flags import FaultFlag, Feature, Mode
from .._forked import Channel, Forked
from ._result import CheckOptions, CheckResult, Status
from ._serve import resolve_simply, serve_until_report

__all__ = ["expect_wp_fault", "semantics"]

_WP = FaultFlag.WP | FaultFlag.WRITE


def _write_after_protect(kind: str, channel: Channel, *, punch: bool = False) -> None:
    """Register 4 pages WP, let the server protect them, then write page 1 natively. On shmem
    page 1 is dropped first: MADV_DONTNEED, or with ``punch`` a hole punched (fallocate), which
    also frees the page, so the write lands on a new one."""
    page = memory.page_size()
    mapping = memory.anonymous(4 * page) if kind == "anonymous" else memory.memfd(4 * page)
    features = Feature.PAGEFAULT_FLAG_WP | Feature.WP_UNPOPULATED | Feature.WP_HUGETLBFS_SHMEM
    uffd = Userfaultfd(features, user_mode_only=True)
    uffd.register(mapping.address, mapping.length, Mode.WP)
    if kind == "shmem":
        mapping.view[:] = bytes([7]) * mapping.length  # populated: protection sits in the PTEs
    uffd.writeprotect(mapping.address, mapping.length)
    if kind == "shmem" and punch:  # the pre-unmap zaps the PTE, the truncation the page
        mapping.punch_hole(page, page)
    elif kind == "shmem":  # drop the PTE of page 1: only a marker can keep its protection
        mapping.madvise(mmap.MADV_DONTNEED, page, page)
    channel.send(mapping.address, [uffd.fileno()])
    uffd.close()
    channel.recv()
    ctypes.memmove(mapping.address + page, b"written!", 8)
    channel.send(bytes(mapping.view[page : page + 8]))


def expect_wp_fault(kind: str, options: CheckOptions, *, punch: bool = False) -> tuple[Status, str]:
    page = memory.page_size()
    body = partial(_write_after_protect, kind, punch=punch)
    with Forked(body, timeout=options.timeout) as child:
        base, fds = child.recv()
        uffd = Userfaultfd.from_fd(fds[0])
        child.send("write")
        written, events = serve_until_report(
            child, uffd, lambda u, f: resolve_simply(u, f, page), options.timeout
        )
        uffd.close()
        child.exit_code()
    faults = [e for e in events if isinstance(e, PageFault)]
    if written != b"written!":
        return Status.FAIL, "the write did not land after the WP fault was resolved"
    if faults == [PageFault(base + page, _WP, 0)]:
        return Status.PASS, "the write raised a WP fault before it landed"
    what = "no fault at all" if not faults else f"{faults}"
    return Status.FAIL, f"expected one WP fault at page 1, got {what}: a write went untracked"


def _remove_pending(channel: Channel) -> None:
    page = memory.page_size()
    mapping = memory.anonymous(4 * page)
    uffd = Userfaultfd(Feature.EVENT_REMOVE, user_mode_only=True)
    uffd.register(mapping.address, mapping.length, Mode.MISSING)
    channel.send(mapping.address, [uffd.fileno()])
    uffd.close()
    channel.recv()
    mapping.madvise(mmap.MADV_DONTNEED, 0, page)  # waits until the server reads the event
    channel.send("advised")
    channel.recv()


def _expect_eagain(options: CheckOptions) -> tuple[Status, str]:
    page = memory.page_size()
    with Forked(_remove_pending, timeout=options.timeout) as child:
        base, fds = child.recv()
        uffd = Userfaultfd.from_fd(fds[0])
        child.send("advise")
        if not select.select([uffd], [], [], options.timeout)[0]:
            return Status.FAIL, "madvise(DONTNEED) raised no REMOVE event"
        try:
            uffd.copy(base + 2 * page, bytes(page))
            outcome: tuple[Status, str] = (
                Status.FAIL, "COPY succeeded while a REMOVE event was unread"
            )  # fmt: skip
        except MappingChangedError as err:
            outcome = (Status.PASS, f"COPY failed with EAGAIN (done={err.done}) until the "
                       "REMOVE event was read")  # fmt: skip
        events: list[Event] = uffd.read_events()
        if events != [Remove(base, base + page)]:
            outcome = (Status.FAIL, f"expected the REMOVE event of page 0, read {events}")
        child.recv()
        child.send("done")
        uffd.close()
        child.exit_code()
    return outcome


def _read_missing(channel: Channel) -> None:
    page = memory.page_size()
    mapping = memory.anonymous(page)
    uffd = Userfaultfd(user_mode_only=True)
    uffd.register(mapping.address, mapping.length, Mode.MISSING)
    channel.send(mapping.address, [uffd.fileno()])
    uffd.close()  # the server holds the last descriptor
    channel.recv()
    buffer = ctypes.create_string_buffer(page)
    ctypes.memmove(buffer, mapping.address, page)
    channel.send(buffer.raw == bytes(page))


def _expect_close_wakes(options: CheckOptions) -> tuple[Status, str]:
    with Forked(_read_missing, timeout=options.timeout) as child:
        base, fds = child.recv()
        uffd = Userfaultfd.from_fd(fds[0])
        child.send("read")
        deadline = time.monotonic() + options.timeout
        while not (events := uffd.read_events()) and time.monotonic() < deadline:
            select.select([uffd], [], [], 0.1)
        if events != [PageFault(base, FaultFlag(0), 0)]:
            return Status.FAIL, f"expected one MISSING fault at the page, got {events}"
        uffd.close()
        try:
            zeros, _ = child.recv(timeout=min(options.timeout, 5.0))
        except TimeoutError:
            return Status.FAIL, "closing the last descriptor left the faulting thread blocked"
        child.exit_code()
    if zeros:
        return Status.PASS, "closing the last descriptor woke the fault; the page read zeros"
    return Status.FAIL, "the woken fault read something other than zeros"


def semantics(options: CheckOptions) -> Iterator[CheckResult]:
    """Check 4."""
    cases: list[tuple[str, Callable[[CheckOptions], tuple[Status, str]]]] = [
        ("wp-unpopulated", partial(expect_wp_fault, "anonymous")),
        ("pte-markers", partial(expect_wp_fault, "shmem")),
        ("wp-after-punch", partial(expect_wp_fault, "shmem", punch=True)),
        ("eagain", _expect_eagain),
        ("close-wakes", _expect_close_wakes),
    ]
    for case, run in cases:
        started = time.monotonic()
        try:
            status, reason = run(options)
        except (OSError, TimeoutError, RuntimeError) as err:
            status, reason = Status.FAIL, f"could not run: {err}"
        yield CheckResult("semantics", case, status, reason, time.monotonic() - started)
