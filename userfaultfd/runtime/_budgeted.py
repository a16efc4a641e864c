"""The program's side of an out-of-core array: ``lazy(source, budget=..., writable=...)``.

The memory is a memfd mapped MAP_SHARED here (read-only unless ``writable``), registered
MISSING (+ WP, the whole range protected at once: see _pager's design note) and served by a
handler whose pager keeps at most ``budget`` bytes of it in memory.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import mmap
import os
import re
from collections import deque
from typing import Any, final

from .. import _abi, _libc, memory
from .._buffer import pinned
from .._core import Userfaultfd, supported_features
from .._errors import FeatureUnavailableError
from .._flags import Feature, Mode
from .._location import is_url, local_path
from ..stores import FileStore, Store, open_store
from ._pager import PagerSetup, eviction_unit
from ._policy import Policy
from ._server import DEFAULT_CPU, Region, open_uffd, plan, start

__all__ = ["NearBlocks", "paged_store", "parse_budget", "served_paged"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
#: The smallest budget: a few eviction units of the smallest size.
_SMALLEST = 64 << 10
#: The default fill unit of an out-of-core array, in pages (256 KiB).
_FILL_UNIT_PAGES = 64
#: How many recent faults NearBlocks remembers (streams it follows at once).
_STREAMS = 4
#: The most blocks one fault of a stream fills.
_LONGEST_RUN = 16


@final
class NearBlocks(Policy):
    """An out-of-core array's default fill unit (UMap's lever): a fault near one of the last
    few (in the same aligned block of ``pages``, or a neighbouring one) fills its whole block;
    any other fault, its page alone. A scan going up or down, or the two ends of a sort's
    partition, fault once per block (Adaptive's forward window resets at every turn between
    them: a sort in place 3.6x slower in benchmarks/out_of_core.py); random writes under a
    small budget do not evict a block each."""

    def __init__(self, pages: int, most: int | None = None) -> None:
        self.pages = pages
        #: The most pages one fault fills (an eighth of the budget: a window that evicted
        #: its own first pages would fault again for ever).
        self.most = most if most is not None else pages * _LONGEST_RUN
        # (stream, first block, last block filled) of the last few windows.
        self._recent: deque[tuple[int, int, int]] = deque(maxlen=_STREAMS)

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        block = index // self.pages
        low, high = block, block + 1
        near = [r for r in self._recent if r[0] == stream and r[1] - 1 <= block <= r[2] + 1]
        if near:
            _s, first, last = near[-1]
            run = min(2 * (last - first + 1), _LONGEST_RUN)  # a stream: twice as far each time
            if block > last:
                high = block + run
            elif block < first:
                low = block - run + 1
            self._recent.remove(near[-1])
        self._recent.append((stream, low, high - 1))
        if not near:
            return index, index + 1
        start = max(0, low * self.pages)
        if block < first:  # going down: the window ends at the faulting block
            start = max(start, (block + 1) * self.pages - self.most)
            return start, min((block + 1) * self.pages, pages)
        return start, min(high * self.pages, start + self.most, pages)

    def __repr__(self) -> str:
        return f"NearBlocks({self.pages})"


def parse_budget(budget: int | str) -> int:
    """Bytes from an int or a string such as ``"64M"``, ``"2G"``, ``"512KiB"`` (binary units)."""
    if isinstance(budget, bool) or not isinstance(budget, int | str):
        raise TypeError(f"budget must be bytes (an int, or a string such as '64M'), not {budget!r}")
    if isinstance(budget, str):
        found = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", budget)
        if found is None:
            raise ValueError(f"budget {budget!r} is not a size (e.g. 67108864, '64M', '2G')")
        budget = int(found[1]) * _UNITS[found[2].lower()]
    if budget < _SMALLEST:
        raise ValueError(f"budget must be at least {_SMALLEST} bytes, not {budget}")
    return budget


def paged_store(source: Any, writable: bool, cache: Any) -> Store:
    """The store of a budgeted array: opened for writing when ``writable``, or a clear error
    saying why it cannot be written."""
    if not writable:
        return open_store(source) if cache is None else open_store(source, cache=cache)
    if isinstance(source, str | os.PathLike) and not is_url(text := os.fspath(source)):
        with open_store(text) as opened:  # (a pack over a local file is no plain file)
            plain = type(opened) is FileStore
        if plain:
            return FileStore(local_path(text), writable=True)
    elif isinstance(source, Store) and source.writable:
        return source
    raise ValueError(
        f"writable=True needs a source its dirty pages can be written back to: a local file "
        f"(a path, or FileStore(path, writable=True)); {_named(source)} cannot be written"
    )


def _named(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    return repr(source) if isinstance(source, Store) else f"a {type(source).__name__}"


def _require_kernel(writable: bool) -> None:
    if writable:
        from ..check import pager_guarantees  # probed once per process

        pager_guarantees().require()
        if Feature.WP_HUGETLBFS_SHMEM not in supported_features():
            raise FeatureUnavailableError(
                errno.EOPNOTSUPP, "a writable out-of-core array needs write-protect on shmem "
                "(UFFD_FEATURE_WP_HUGETLBFS_SHMEM, Linux 5.19)")  # fmt: skip
    elif Feature.MISSING_SHMEM not in supported_features():
        raise FeatureUnavailableError(
            errno.EOPNOTSUPP, "an out-of-core array needs userfaultfd on shmem "
            "(UFFD_FEATURE_MISSING_SHMEM, Linux 4.11)")  # fmt: skip


def served_paged(
    store: Store, offset: int, nbytes: int, budget: int | None, writable: bool,
    policy: Policy | None, serve_options: dict[str, Any],
) -> Any:  # fmt: skip
    """``nbytes`` of a memfd served from ``store`` at ``offset`` with at most ``budget`` bytes in
    memory (None: all of it): a ctypes array that owns the mapping and the server."""
    _require_kernel(writable)
    page = memory.page_size()
    length = -(-nbytes // page) * page
    budget_pages = length // page if budget is None else max(1, min(budget, length) // page)
    fd = os.memfd_create("uffd-out-of-core", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, length)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapped = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=prot)
        with pinned(mapped) as (address, _size):
            pass  # (the address stays valid while ``mapped`` lives)
        setup = PagerSetup(
            memfd=fd, length=length, offset=offset, page=page, budget_pages=budget_pages,
            unit_pages=eviction_unit(budget_pages * page, page), writable=writable,
            states=mmap.mmap(-1, length // page),  # MAP_SHARED: the daemons see it
        )  # fmt: skip
        server = _serve(setup, store, address, policy, serve_options)
    finally:
        os.close(fd)  # the mapping, the supervisor and its handlers have their own
    holder = (ctypes.c_char * nbytes).from_address(address)
    # As in _lazy._served: the holder owns the mapping and the server (dropping the last view
    # unmaps it; the handler writes the dirty pages back once no process maps it).
    holder.mapping = mapped  # type: ignore[attr-defined]
    holder.server = server  # type: ignore[attr-defined]
    holder.writable = writable  # type: ignore[attr-defined]
    return holder


def _serve(
    setup: PagerSetup, store: Store, address: int, policy: Policy | None,
    serve_options: dict[str, Any],
) -> Any:  # fmt: skip
    options = dict(serve_options)
    cpu = options.pop("cpu", DEFAULT_CPU)
    user_mode_only = options.pop("user_mode_only", False)
    prefetch_timeout = options.get("prefetch_timeout", 60.0)
    options.setdefault("batch", 64)
    # A fill never brings in more than 2 MiB or an eighth of the budget at once (the handler's
    # buffer is memory outside the budget, which a memory cgroup counts too), nor do the reads
    # in flight (each up to 2 MiB: runtime/_handler.py's fetch unit) hold more than a quarter:
    # read-ahead that the budget evicts before the program gets to it is read twice.
    budget = setup.budget_pages * setup.page
    options.setdefault("buffer_bytes", max(setup.page, min(2 << 20, budget // 8)))
    if options.get("fetches") is None and store.parallel_reads > 1:
        options["fetches"] = max(1, min(store.parallel_reads, budget // 4 // (2 << 20)))
    if policy is None:
        policy = NearBlocks(max(1, min(_FILL_UNIT_PAGES, setup.budget_pages // 16)),
                            max(1, setup.budget_pages // 8))  # fmt: skip
    region = Region(address, setup.length, setup.offset, setup.page)
    resolved, planned = plan([region], store, policy=policy, **options)
    planned = dataclasses.replace(planned, pager=setup)
    wanted = (
        Feature.WP_HUGETLBFS_SHMEM | Feature.PAGEFAULT_FLAG_WP if setup.writable else Feature(0)
    )

    def register() -> tuple[Userfaultfd, Feature]:
        uffd, features = open_uffd(user_mode_only, wanted & supported_features())
        try:
            if Feature.EVENT_FORK not in features:  # (see _server's design note)
                _libc.madvise(address, setup.length, _abi.MADV_DONTFORK)
            mode = Mode.MISSING | (Mode.WP if setup.writable else Mode(0))
            uffd.register(address, setup.length, mode)
            if setup.writable:  # a marker in every empty PTE: see _pager's design note
                uffd.writeprotect(address, setup.length, True)
        except BaseException:
            uffd.close()
            raise
        return uffd, features

    return start(resolved, planned, cpu, register, prefetch_timeout, paged=True)
