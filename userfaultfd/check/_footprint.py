"""Check 1: how many pages does one read fault map, with and without a userfaultfd?

A child maps a 64-page file whose pages are all in the page cache, reads one page, and reports
its own pagemap. With no userfaultfd the kernel maps the cached neighbours too (fault-around);
in a range registered WP or MINOR the seed's promise is that it maps only the faulted page.
MISSING ranges keep fault-around upstream on purpose (a cached page raises no MISSING fault, so
mapping it early hides nothing from the handler).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial

from .. import memory
from .._core import Userfaultfd
from .._flags import Feature, Mode
from .._forked import Channel, Forked
from ._result import CheckOptions, CheckResult, Status
from ._serve import pagemap_refusal, resolve_simply, serve_until_report

__all__ = ["KINDS", "footprint", "judge_footprint"]

PAGES = 64
FAULTED = 20
#: Mapping kinds: shmem through a memfd (shared and private mappings), a regular file on disk.
KINDS = ("shmem-shared", "shmem-private", "file")
_FEATURES = Feature.WP_HUGETLBFS_SHMEM | Feature.MINOR_SHMEM | Feature.MISSING_SHMEM


def judge_footprint(
    kind: str, mode: Mode | None, mapped: list[int], faulted: int, baseline: int | None
) -> tuple[Status, str]:
    """The verdict on one footprint: ``mapped`` are the page indexes present after reading page
    ``faulted``; ``baseline`` is how many pages the same read mapped with no userfaultfd."""
    count = len(mapped)
    if faulted not in mapped:
        return Status.FAIL, f"the faulted page {faulted} is not mapped after the read"
    if mode is None:
        if count == 1:
            return Status.PASS, "1 page mapped: fault-around is off on this kernel"
        return Status.PASS, (
            f"{count} pages mapped (pages {mapped[0]}-{mapped[-1]}): fault-around is on, "
            f"a {count * memory.page_size() // 1024} KiB window"
        )
    if baseline is not None and baseline <= 1:
        return Status.SKIP, "fault-around is off here, so there is nothing for it to bypass"
    if mode & (Mode.WP | Mode.MINOR):
        if count == 1:
            return (
                Status.PASS,
                f"only the faulted page mapped (no fault-around in a {mode.name} range)",
            )
        return Status.FAIL, (
            f"{count} pages mapped around the fault in a {mode.name}-registered range: "
            "the kernel mapped pages behind the handler's back"
        )
    if count > 1:
        return Status.PASS, (
            f"{count} pages mapped: fault-around is kept for MISSING on purpose (a cached "
            "page raises no MISSING fault anyway)"
        )
    return Status.PASS, "only the faulted page mapped: this kernel skips fault-around for MISSING"


def _footprint_child(kind: str, mode: Mode | None, scratch: str, channel: Channel) -> None:
    page = memory.page_size()
    length = PAGES * page
    if kind == "file":
        backing = tempfile.TemporaryFile(dir=scratch)  # noqa: SIM115 - lives as long as the child
        fd = backing.fileno()
    else:
        fd = os.memfd_create("uffd-check", os.MFD_CLOEXEC)
    os.pwrite(fd, b"\x5a" * length, 0)  # every page in the page cache, uptodate
    flags = mmap.MAP_PRIVATE if kind == "shmem-private" else mmap.MAP_SHARED
    what = memory.MappingKind.FILE if kind == "file" else memory.MappingKind.SHMEM
    mapping = memory.Mapping(mmap.mmap(fd, length, flags=flags), length, kind=what)
    if mode is None:
        channel.send("ready")
    else:
        uffd = Userfaultfd(_FEATURES, user_mode_only=True)
        uffd.register(mapping.address, length, mode)
        channel.send("ready", [uffd.fileno()])
        uffd.close()
    channel.recv()
    # Native code reads the page: the GIL is released while it faults.
    ctypes.memmove(ctypes.create_string_buffer(8), mapping.address + FAULTED * page, 8)
    present = memory.resident(mapping.address, length)
    channel.send([i for i, p in enumerate(present) if p])


def measure_footprint(
    kind: str, mode: Mode | None, options: CheckOptions, scratch: str
) -> list[int]:
    """Run one case in a child; returns the page indexes it had mapped after its read."""
    page = memory.page_size()
    body = partial(_footprint_child, kind, mode, scratch)
    with Forked(body, timeout=options.timeout) as child:
        _ready, fds = child.recv()
        uffd = Userfaultfd.from_fd(fds[0]) if fds else None
        child.send("read")
        mapped, _events = serve_until_report(
            child, uffd, lambda u, f: resolve_simply(u, f, page), options.timeout
        )
        if uffd is not None:
            uffd.close()
        child.exit_code()
    return list(mapped)


def footprint(
    options: CheckOptions,
    measure: Callable[[str, Mode | None, CheckOptions, str], list[int]] = measure_footprint,
) -> Iterator[CheckResult]:
    """Check 1. ``measure`` is the live measurement; a test can pass a fake one."""
    scratch = options.scratch_dir or disk_directory(options.proc)
    refusal = pagemap_refusal(options.proc) if measure is measure_footprint else None
    if refusal:
        yield CheckResult("footprint", "all", Status.SKIP, refusal)
        return
    for kind in KINDS:
        modes: list[Mode | None] = [None]
        if kind != "file":  # a regular file on disk cannot be registered
            modes += [Mode.WP, Mode.MINOR, Mode.MISSING]
        baseline: int | None = None
        for mode in modes:
            case = f"{kind}/{mode.name if mode else 'none'}"
            started = time.monotonic()
            try:
                mapped = measure(kind, mode, options, scratch)
            except (OSError, TimeoutError, RuntimeError) as err:
                yield CheckResult("footprint", case, Status.FAIL, f"could not measure: {err}")
                continue
            status, reason = judge_footprint(kind, mode, mapped, FAULTED, baseline)
            if mode is None:
                baseline = len(mapped)
            yield CheckResult("footprint", case, status, reason, time.monotonic() - started)


def disk_directory(proc: str = "/proc") -> str:
    """A writable directory that is not on tmpfs (a tmpfs file is shmem, not a regular file)."""
    candidates = ["/var/tmp", os.getcwd(), tempfile.gettempdir(), os.path.expanduser("~")]
    for path in candidates:
        if os.access(path, os.W_OK) and _filesystem(path, proc) not in ("tmpfs", "ramfs"):
            return path
    return candidates[0]


def _filesystem(path: str, proc: str) -> str:
    """The file system type of the mount that holds ``path``."""
    real = os.path.realpath(path)
    best, kind = "", ""
    with open(f"{proc}/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind
