"""lazy_tensors(): the named arrays of a safetensors file or an .npz, each a view into one lazily
filled region, fetched only where touched.

Design note. The index (runtime/_tensor_index.py) comes from the header alone. Then ONE region is
mapped, over the file's bytes from the first selected tensor to the end of the last, by the same
two paths as :func:`~userfaultfd.runtime.lazy` (runtime/_direct.py): the kernel's own mapping of
a plain local file when nothing needs a handler, else anonymous memory that a handler fills
(:func:`~userfaultfd.runtime.serve`), with every guarantee that gives (right bytes or SIGBUS,
fork, a restarted handler, a pinned version). Each tensor is a read-only NumPy view at its
offset. So a tensor is fetched when, and where, it is touched; nothing else is read.

- A selection (``include``/``exclude``) that leaves tensors out is served through a handler
  whose store knows the bytes of no selected tensor as zero (``Store.known_zero``): a fault or a
  read-ahead window that reaches them maps zero pages there and reads nothing. No view covers
  them, so no caller sees those zeros; the kernel's read-ahead of a direct mapping would read
  them, hence the handler. Where the wrapped store is mapped (a local file), so is the
  selection (``Store.mapped()``: the selected bytes from the file's mapping, the rest zeros), and
  the native path answers its faults.
- Through a handler, a fault fills its tensor's chunk (``TensorChunks``, up to 64 MiB) unless
  ``policy`` says otherwise, not an adaptive window: a program copying a tensor often goes
  backwards through it (glibc's memcpy does, for a page-aligned source), and a window that
  grows only going forward then fills a page a fault: over HTTP a round trip a page; locally
  a fault a page (a copy of every tensor of a 256 MiB model through a handler: 0.80 s with
  ``Adaptive``, 0.17 s so). The native path takes the built-in policies only: a policy of
  the Python path that fills a tensor a fault beats a native path that fills a page a fault.
- ``prefetch`` is the runtime's working-set prefetch (``serve(prefetch=PATH)``): the selected
  tensors' byte ranges are written, in the order asked, as records of (store offset, length),
  merged where they touch, so contiguous tensors are read as large reads, many in flight. They
  are read behind any fault (a tensor touched first is served first) and installed without
  waking, one wake per run. serve() does not wait for them (``prefetch_timeout=0`` unless
  given): the program starts at once and uses what has arrived. The handler reads the file
  before serve() returns, so it is removed then.
- ``budget`` (models larger than memory) maps the tensors as an out-of-core array (_budgeted,
  _pager): at most that many bytes in memory, the oldest given back. Without it a page filled
  stays resident until the arrays go.
"""

from __future__ import annotations

import bisect
import fnmatch
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal, final

from .. import memory
from ..stores import FileStore, Store, open_store
from ._budgeted import parse_budget, served_paged
from ._direct import handler_needed, map_file
from ._inflight import RECORD
from ._lazy import _served
from ._policy import Policy
from ._tensor_index import Index, TensorInfo, read_index

__all__ = ["LazyTensors", "TensorChunks", "lazy_tensors", "select"]


@final
class LazyTensors(Mapping[str, Any]):
    """A read-only mapping from tensor name to NumPy array (a read-only view into the lazily
    filled region), in file order; ``metadata``: safetensors' ``__metadata__``."""

    def __init__(self, index: Index, selected: list[TensorInfo], raw: Any, low: int) -> None:
        import numpy as np

        self.format: Literal["safetensors", "npz"] = index.format
        self.metadata: Mapping[str, str] = MappingProxyType(dict(index.metadata))
        self.infos: Mapping[str, TensorInfo] = MappingProxyType({t.name: t for t in selected})
        whole = np.frombuffer(raw, dtype=np.uint8) if raw is not None else np.empty(0, np.uint8)
        arrays = {}
        for info in selected:
            flat = whole[info.start - low : info.end - low].view(info.dtype)
            array = flat.reshape(info.shape[::-1]).T if info.fortran else flat.reshape(info.shape)
            array.flags.writeable = False
            arrays[info.name] = array
        self._arrays = arrays

    def __getitem__(self, name: str) -> Any:
        return self._arrays[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def __repr__(self) -> str:
        size = sum(t.nbytes for t in self.infos.values())
        return f"<LazyTensors {self.format}: {len(self)} tensors, {size:,} bytes>"


def lazy_tensors(
    source: Any,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    prefetch: Literal["all"] | Iterable[str] | None = None,
    direct: bool | None = None,
    budget: int | str | None = None,
    **serve_options: Any,
) -> LazyTensors:
    """The tensors of a safetensors file or an .npz (stored members), by name, each a read-only
    NumPy array whose pages are fetched from ``source`` when first touched.

    ``source``: anything :func:`~userfaultfd.runtime.lazy` takes (a path, an fsspec or HTTP URL,
    a :class:`~userfaultfd.stores.Store`). The header is read and checked first (ValueError
    naming the tensor and what is wrong, nothing mapped). ``include``/``exclude``: names or
    :mod:`fnmatch` patterns; an include pattern that matches nothing is an error; a tensor not
    selected is never fetched. ``prefetch``: None (on demand only), ``"all"`` (every selected
    tensor, in file order) or a list of names in the order they will be used: read in the
    background, behind any fault, while the program already uses what has arrived. bfloat16
    and float8 tensors are ml_dtypes' dtypes (ImportError without it). ``direct`` and the
    other options are :func:`~userfaultfd.runtime.lazy`'s (``policy``, ``cache``, ``fetches``,
    ``cpu``, ...). A plain local file with no option is mapped by the kernel directly.
    Through a handler the default policy is ``TensorChunks`` (a fault fills its tensor, up to
    64 MiB of it); ``policy=Adaptive()`` for random access inside large tensors.

    ``budget`` (bytes, or a string such as ``"8G"``): a model larger than memory; at most that
    much of it is in memory at once, the tensors touched longest ago go first and come back
    from ``source`` when touched again (an out-of-core array: see ``lazy(budget=...)``; the
    fill unit is then that of ``lazy``, not a whole tensor). A torch tensor
    without a copy: ``torch.from_numpy(array)``; for bfloat16,
    ``torch.from_numpy(array.view(numpy.uint16)).view(torch.bfloat16)``.
    """
    limit = None
    if budget is not None:
        limit = parse_budget(budget)
        if direct:
            raise ValueError("direct=True maps the file with the kernel's page cache, which "
                             "keeps no budget")  # fmt: skip
        if prefetch is not None:
            raise ValueError("prefetch= reads the tensors in whole, past any budget: not with "
                             "budget=")  # fmt: skip
    cache = serve_options.pop("cache", None)
    store = open_store(source) if cache is None else open_store(source, cache=cache)
    try:
        index = read_index(store, _name(source))
        selected = select(index.tensors, include, exclude)
        records = _working_set(selected, prefetch)
        placed = [t for t in selected if t.nbytes]
        if not placed:
            return LazyTensors(index, selected, None, 0)
        low, high = min(t.start for t in placed), max(t.end for t in placed)
        served: Store = store
        if len(selected) < len(index.tensors):
            if direct:
                raise ValueError("direct=True cannot leave tensors out: the kernel's read-ahead"
                                 " would read them; a handler serves a selection")  # fmt: skip
            served = _Selected(store, placed)
        if limit is not None:
            policy = serve_options.pop("policy", None)
            holder = served_paged(served, low, high - low, limit, False, policy, serve_options)
        else:
            holder = _map(source, store, served, low, high - low, records, direct, cache,
                          serve_options, TensorChunks(placed, low))  # fmt: skip
    finally:
        if store is not source:
            store.close()  # the supervisor (or the mapping) has its own handle
    return LazyTensors(index, selected, memoryview(holder).cast("B").toreadonly(), low)


def select(
    tensors: Iterable[TensorInfo], include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
) -> list[TensorInfo]:  # fmt: skip
    """The tensors ``include`` names (all, if None) and ``exclude`` does not, in file order.
    ValueError for an include pattern that matches no tensor (a typo would select nothing)."""
    tensors = list(tensors)
    chosen = tensors
    if include is not None:
        patterns = _patterns(include, "include")
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(t.name, pattern) for t in tensors):
                raise ValueError(f"include {pattern!r} matches no tensor")
        chosen = [t for t in tensors if any(fnmatch.fnmatchcase(t.name, p) for p in patterns)]
    if exclude is not None:
        dropped = _patterns(exclude, "exclude")
        chosen = [t for t in chosen if not any(fnmatch.fnmatchcase(t.name, p) for p in dropped)]
    if not chosen:
        raise ValueError("include/exclude leave no tensor")
    return chosen


def _patterns(value: str | Iterable[str], what: str) -> list[str]:
    patterns = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what} must be names or glob patterns (str), not {value!r}")
    return patterns


def _working_set(
    selected: list[TensorInfo], prefetch: Literal["all"] | Iterable[str] | None
) -> list[tuple[int, int]]:
    """The byte ranges to prefetch, in order, merged where one ends where the next starts."""
    if prefetch is None:
        return []
    if isinstance(prefetch, str) and prefetch != "all":
        raise ValueError(f'prefetch must be None, "all" or a list of names, not {prefetch!r}')
    by_name = {t.name: t for t in selected}
    if prefetch == "all":
        order = selected
    else:
        names = list(prefetch)
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"prefetch names {missing[:5]!r}, not among the selected tensors")
        order = [by_name[n] for n in names]
    ranges: list[tuple[int, int]] = []
    for t in order:
        if not t.nbytes:
            continue
        if ranges and ranges[-1][0] + ranges[-1][1] == t.start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + t.nbytes)
        else:
            ranges.append((t.start, t.nbytes))
    return ranges


def _map(
    source: Any, store: Store, served: Store, offset: int, nbytes: int,
    records: list[tuple[int, int]], direct: bool | None, cache: Any, options: dict[str, Any],
    chunks: Policy | None,
) -> Any:  # fmt: skip
    """The region's holder: the kernel's mapping of the file, or memory a handler fills (by
    ``policy`` if given, else ``chunks``)."""
    policy = options.pop("policy", None)
    if served is store and direct is not False:
        asked = dict(options, policy=policy) if policy is not None else dict(options)
        if records:
            asked["prefetch"] = "prefetch"
        why = handler_needed(source, store, cache, asked)
        if why is not None and direct:
            raise ValueError(f"direct=True cannot map {_name(source)}: {why}")
        if why is None:
            assert isinstance(store, FileStore)
            try:
                return map_file(store, offset, nbytes)
            except OSError as err:
                if direct:
                    raise ValueError(f"direct=True cannot map {_name(source)}: the kernel"
                                     f" refuses to map it ({err.strerror})") from err  # fmt: skip
    policy = policy if policy is not None else chunks
    if not records:
        return _served(served, offset, nbytes, policy, options)
    # The handler reads the working set before serve() returns: the file can go then.
    fd, path = tempfile.mkstemp(prefix="uffd-tensors-", suffix=".workingset")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(RECORD.pack(start, length) for start, length in records))
        options = dict(options, prefetch=path)
        options.setdefault("prefetch_timeout", 0.0)
        return _served(served, offset, nbytes, policy, options)
    finally:
        os.unlink(path)


@final
class TensorChunks(Policy):
    """The fault-around of a tensor mapping: a fault fills its tensor's chunk, the
    tensor's pages in chunks of ``chunk_bytes`` counted from its first page, so one round trip
    brings what a program reading the tensor will read next, whichever way it goes. (A large
    memcpy goes backwards through a page-aligned source: glibc copies backwards when the
    source and destination lie at the same offset in their pages, to avoid 4K aliasing, so
    ``np.array(t)`` of a page-aligned tensor faults on its last page first, then page by page
    down; an adaptive window, which grows only on faults going forward, then fills one page a
    round trip.) A page in no tensor (alignment padding) is filled alone."""

    def __init__(self, placed: Iterable[TensorInfo], low: int, chunk_bytes: int = 64 << 20,
                 page_size: int | None = None) -> None:  # fmt: skip
        page = page_size or memory.page_size()
        bounds = sorted(((t.start - low) // page, -(-(t.end - low) // page)) for t in placed)
        self._firsts = [a for a, _ in bounds]
        self._bounds = bounds
        self.chunk_pages = max(1, chunk_bytes // page)

    def window(self, index: int, pages: int, page_size: int, stream: int = 0) -> tuple[int, int]:
        at = bisect.bisect_right(self._firsts, index) - 1
        if at < 0 or index >= self._bounds[at][1]:
            return index, index + 1
        first, last = self._bounds[at]
        start = first + (index - first) // self.chunk_pages * self.chunk_pages
        return start, min(start + self.chunk_pages, last, pages)

    def __repr__(self) -> str:
        return f"TensorChunks({len(self._bounds)} tensors, {self.chunk_pages} pages a chunk)"


def _name(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    return f"a {type(source).__name__}"


class _Selected(Store):
    """``store`` as the handler of a selection sees it: the bytes of no selected tensor are
    known zero, so they are never read (no view shows them)."""

    def __init__(self, store: Store, placed: list[TensorInfo]) -> None:
        self._store = store
        spans: list[tuple[int, int]] = []
        for t in sorted(placed, key=lambda t: t.start):
            if spans and t.start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], t.end))
            else:
                spans.append((t.start, t.end))
        self._starts = [a for a, _ in spans]
        self._spans = spans
        self._mapped: list[tuple[int, int, int]] | None = None
        self._mapped_known = False

    @property
    def size(self) -> int:
        return self._store.size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        return self._store.read_into(offset, buffer)

    def address(self, offset: int, length: int) -> int | None:
        return self._store.address(offset, length)

    def mapped(self) -> list[tuple[int, int, int]] | None:
        """The wrapped store's mapped runs, cut where the selection is: the selected tensors'
        bytes where the wrapped store maps them, every other byte a run of zeros (address 0),
        so the native path copies the selection from the mapping and reads nothing else. A
        page that holds both is in neither kind of run whole: the Python path reads it. None
        when the wrapped store maps nothing. Worked out once per handle."""
        if not self._mapped_known:
            self._mapped, self._mapped_known = self._cut(self._store.mapped()), True
        return self._mapped

    def _cut(self, runs: list[tuple[int, int, int]] | None) -> list[tuple[int, int, int]] | None:
        if runs is None:
            return None
        cut: list[tuple[int, int, int]] = []
        for start, length, address in runs:
            end = start + length
            at = start
            i = max(0, bisect.bisect_right(self._starts, at) - 1)
            while at < end:
                span = self._spans[i] if i < len(self._spans) else None
                if span is not None and span[1] <= at:
                    i += 1
                    continue
                if span is not None and span[0] <= at:  # selected: where the store has it
                    stop = min(end, span[1])
                    cut.append((at, stop - at, address + (at - start) if address else 0))
                else:  # no selected tensor's bytes: zeros
                    stop = min(end, span[0]) if span is not None else end
                    cut.append((at, stop - at, 0))
                at = stop
        # Neighbouring zero runs (a zero run of the store next to an unselected gap) as one.
        merged: list[tuple[int, int, int]] = []
        for run in cut:
            last = merged[-1] if merged else None
            if last is not None and last[2] == 0 == run[2] and last[0] + last[1] == run[0]:
                merged[-1] = (last[0], last[1] + run[1], 0)
            else:
                merged.append(run)
        return merged

    def known_zero(self, offset: int, length: int) -> bool:
        # The last span starting before the range's end is the only one that can reach into it.
        at = bisect.bisect_left(self._starts, offset + length) - 1
        if at < 0 or self._spans[at][1] <= offset:
            return True
        return self._store.known_zero(offset, length)

    @property
    def parallel_reads(self) -> int:
        return self._store.parallel_reads

    def reopen(self) -> Store:
        reopened = _Selected.__new__(_Selected)
        reopened._store = self._store.reopen()
        reopened._starts, reopened._spans = self._starts, self._spans
        reopened._mapped, reopened._mapped_known = None, False
        return reopened

    def close(self) -> None:
        self._store.close()
