"""Check 5: does the model predict the pages the running kernel maps?

For random layouts (where the VMA starts relative to a page table, its size, its file offset,
which file pages are cached, whether it is shared, how it is registered, which page is read), a
child process builds the layout for real and reads the page; the model's ``upstream`` preset is
given the same layout. The sets of mapped pages must be equal. A disagreement prints the layout,
and the seed replays the whole run.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from .. import _libc, memory, model
from .._buffer import pinned
from .._core import Userfaultfd
from .._flags import Feature, Mode
from .._forked import Channel, Forked
from ._result import CheckOptions, CheckResult, Status
from ._serve import pagemap_refusal

__all__ = ["Layout", "agreement", "measure_layouts", "model_prediction", "random_layouts"]

_PTRS_PER_PTE = 512
_MODEL_BASE = 1 << 30  # where the model puts the page table the VMA starts in
_MODEL_PAGE = 4096  # the model's pages are 4 KiB, as x86-64's and most arm64 kernels'


@dataclass(frozen=True, slots=True)
class Layout:
    """One experiment: a memfd of ``file_pages`` pages (``cached`` ones in the page cache),
    mapped ``pages`` pages long from file page ``pgoff`` at page ``offset`` of a page table,
    registered in ``register`` mode (or not), and page ``read`` of the mapping read."""

    file_pages: int
    cached: tuple[int, ...]
    offset: int
    pages: int
    pgoff: int
    shared: bool
    register: Mode | None
    read: int


def random_layouts(count: int, seed: int) -> list[Layout]:
    rng = random.Random(seed)
    layouts = []
    for _ in range(count):
        file_pages = rng.randint(1, 96)
        pgoff = rng.randint(0, file_pages - 1)
        pages = rng.randint(1, 96)
        read = rng.randint(0, min(pages, file_pages - pgoff) - 1)
        # Half the mappings start near the end of a page table, so the window gets clipped there.
        offset = rng.randint(0, _PTRS_PER_PTE - 1) if rng.random() < 0.5 else (
            _PTRS_PER_PTE - rng.randint(1, 40)
        )  # fmt: skip
        register = rng.choice([None, None, Mode.WP, Mode.MISSING])
        density = rng.random()
        cached = {i for i in range(file_pages) if rng.random() < density}
        if register == Mode.MISSING:
            cached.add(pgoff + read)  # an uncached page would block the reader on the handler
        shared = rng.random() < 0.7
        layouts.append(
            Layout(file_pages, tuple(sorted(cached)), offset, pages, pgoff, shared, register, read)
        )
    return layouts


def model_prediction(layout: Layout, fault_around_bytes: int) -> list[int]:
    kernel = model.Kernel("upstream", fault_around_bytes=fault_around_bytes)
    page = _MODEL_PAGE
    file = kernel.shmem_file(layout.file_pages, cached=layout.cached)
    vma = kernel.mmap(
        file, _MODEL_BASE + layout.offset * page, layout.pages,
        pgoff=layout.pgoff, shared=layout.shared, register=layout.register,
    )  # fmt: skip
    kernel.read(vma, layout.read)
    return sorted(kernel.mapped(vma))


_MAP_FIXED = 0x10
_PROT_NONE = 0  # not in the mmap module


def _map_at(address: int, length: int, prot: int, flags: int, fd: int, offset: int) -> None:
    _libc.mmap(address, length, prot, flags | _MAP_FIXED, fd, offset,
               describe=lambda code: f"mmap at 0x{address:x}: {os.strerror(code)}")  # fmt: skip


def _live_child(layouts: list[Layout], channel: Channel) -> None:
    page = memory.page_size()
    table = _PTRS_PER_PTE * page
    # Reserve two page tables' worth of address space, starting on a page-table boundary.
    reservation = mmap.mmap(-1, 3 * table, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=_PROT_NONE)  # fmt: skip
    with pinned(reservation) as (reserved, _):
        base = (reserved + table - 1) // table * table
    rw = mmap.PROT_READ | mmap.PROT_WRITE
    scratch = ctypes.create_string_buffer(8)
    features = Feature.WP_HUGETLBFS_SHMEM | Feature.MISSING_SHMEM
    results = []
    for layout in layouts:
        fd = os.memfd_create("uffd-model", os.MFD_CLOEXEC)
        os.ftruncate(fd, layout.file_pages * page)
        for index in layout.cached:
            os.pwrite(fd, b"\x01" * page, index * page)
        start, length = base + layout.offset * page, layout.pages * page
        flags = mmap.MAP_SHARED if layout.shared else mmap.MAP_PRIVATE
        _map_at(start, length, rw, flags, fd, layout.pgoff * page)
        uffd = None
        if layout.register is not None:
            uffd = Userfaultfd(features, user_mode_only=True)
            uffd.register(start, length, layout.register)
        ctypes.memmove(scratch, start + layout.read * page, 1)
        present = memory.resident(start, length)
        results.append([i for i, p in enumerate(present) if p])
        if uffd is not None:
            uffd.close()
        _map_at(start, length, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        os.close(fd)
    channel.send(results)


def kernel_fault_around_bytes(options: CheckOptions) -> int:
    """The running kernel's fault_around_bytes: the option, debugfs if mounted, else 64 KiB."""
    if options.fault_around_bytes is not None:
        return options.fault_around_bytes
    try:
        with open("/sys/kernel/debug/fault_around_bytes") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65536


def measure_layouts(layouts: list[Layout], options: CheckOptions) -> list[list[int]]:
    """Build each layout for real in a child, read its page; the pages the kernel mapped."""
    with Forked(partial(_live_child, layouts), timeout=options.timeout) as child:
        live, _ = child.recv()
        child.exit_code()
    return list(live)


def agreement(
    options: CheckOptions,
    measure: Callable[[list[Layout], CheckOptions], list[list[int]]] = measure_layouts,
) -> Iterator[CheckResult]:
    """Check 5. ``measure`` is the live measurement; a test can pass a fake one."""
    started = time.monotonic()
    layouts = random_layouts(options.layouts, options.seed)
    fault_around = kernel_fault_around_bytes(options)
    case = f"{len(layouts)} layouts, seed {options.seed}"
    refusal = pagemap_refusal(options.proc) if measure is measure_layouts else None
    if refusal:
        yield CheckResult("model", case, Status.SKIP, refusal)
        return
    try:
        live = measure(layouts, options)
    except (OSError, TimeoutError, RuntimeError) as err:
        yield CheckResult("model", case, Status.FAIL, f"could not run the layouts: {err}")
        return
    for layout, mapped in zip(layouts, live, strict=True):
        predicted = model_prediction(layout, fault_around)
        if predicted != mapped:
            yield CheckResult("model", case, Status.FAIL, (
                f"the model predicted pages {predicted}, the kernel mapped {mapped} for {layout}"
            ), time.monotonic() - started)  # fmt: skip
            return
    yield CheckResult("model", case, Status.PASS, (
        f"{len(layouts)}/{len(layouts)} layouts agree (fault_around_bytes={fault_around})"
    ), time.monotonic() - started)  # fmt: skip
