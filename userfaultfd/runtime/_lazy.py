"""lazy(): a NumPy array (or a memoryview) whose pages fill on demand from a source.

Two paths (runtime/_direct.py has the design note): a plain local file, when nothing that needs
a handler is asked for, is mapped directly by the kernel (private, copy on write); everything
else is anonymous memory registered with a uffd and served by a handler process (serve()).
"""

from __future__ import annotations

import ctypes
import io
import os
from typing import Any

from .. import memory
from ..stores import ChunkCache, FileStore, Store, open_store
from ._budgeted import paged_store, parse_budget, served_paged
from ._direct import handler_needed, map_file
from ._policy import Policy
from ._server import Region, Server, serve

__all__ = ["lazy", "server_of"]

_NPY_MAGIC = b"\x93NUMPY"
_HEADER_PROBE = 64 << 10


def lazy(
    source: Any,
    *,
    shape: int | tuple[int, ...] | None = None,
    dtype: Any = None,
    policy: Policy | None = None,
    cache: ChunkCache | None = None,
    direct: bool | None = None,
    budget: int | str | None = None,
    writable: bool = False,
    **serve_options: Any,
) -> Any:
    """Memory whose pages fill from ``source`` when first touched.

    ``source``: a path, an fsspec URL, a bytes-like object or a :class:`Store`; a ``.npy``
    file's header gives the shape and dtype. Returns a NumPy array of ``shape`` and ``dtype``
    (flat, when only a dtype is given), or a writable memoryview of the bytes when neither a
    dtype nor a .npy header says what they are. Writes to it stay private to the process.

    ``direct``: None (the default) maps a path to a plain local file directly with the kernel's
    own private file mapping (page cache and read-ahead, no handler) when no option that needs a
    handler is given (``policy``, ``cache``, or any option of :func:`serve`); True requires that
    (ValueError saying why it cannot); False always serves through a handler. Mapped directly,
    a page not written yet shows writes made to the file in place, and truncating the file
    raises SIGBUS on its pages past the new end.

    Through a handler, it serves the memory as long as it is mapped in this process or in a
    child forked from it; dropping the last view of it unmaps it here, and the handler ends
    once no process has it any more. ``cache``: a :class:`~userfaultfd.stores.ChunkCache` in
    front of a content-addressed pack. Other options go to :func:`serve` (``fetches``,
    ``record``, ``prefetch``, ``cpu``, ...).

    ``budget`` (bytes: an int, or a string such as ``"64M"``, ``"2G"``) makes an out-of-core
    array: its pages in memory never exceed the budget, whatever the size of the source; the
    oldest go when new ones come in, and come back from the source when touched again (see
    _pager). Without ``writable`` it is read-only (a write is SIGSEGV). ``writable=True`` (a
    local file only: ValueError otherwise) shares writes with forked children, like
    ``np.memmap(mode="r+")``, and writes dirty pages back to the file when they are evicted, on
    ``server_of(array).flush()`` (durable when it returns), when the server stops, and once no
    process maps the array; without ``budget`` it keeps the whole array in memory. Both need
    a kernel that keeps userspace in charge of a shmem range (FeatureUnavailableError
    otherwise, naming what is missing). After ``stop()``, pages not in memory raise SIGBUS.
    """
    paged = budget is not None or writable
    if paged and direct:
        raise ValueError(
            "direct=True maps the file with the kernel's page cache, which keeps no budget and "
            "writes back nothing: pass budget/writable without it"
        )
    if paged and serve_options.get("prefetch") is not None:
        raise ValueError("prefetch= installs a working set whole, past any budget: not with "
                         "budget/writable")  # fmt: skip
    limit = parse_budget(budget) if budget is not None else None
    store = paged_store(source, writable, cache) if paged else (
        open_store(source) if cache is None else open_store(source, cache=cache)
    )  # fmt: skip
    try:
        why: str | None = "direct=False"
        if paged:
            why = "budget/writable"
        elif direct is not False:
            options = dict(serve_options, policy=policy) if policy is not None else serve_options
            why = handler_needed(source, store, cache, options)
            if why is not None and direct:
                raise ValueError(f"direct=True cannot map {_name(source)}: {why}")
        offset, shape, dtype, nbytes = _layout(store, shape, dtype)
        holder = None
        if why is None:
            assert isinstance(store, FileStore)
            try:
                holder = map_file(store, offset, nbytes)
            except OSError as err:  # a file system that cannot map files (sysfs, some FUSE)
                if direct:
                    raise ValueError(f"direct=True cannot map {_name(source)}: the kernel "
                                     f"refuses to map it ({err.strerror})") from err  # fmt: skip
        if holder is None and paged:
            holder = served_paged(store, offset, nbytes, limit, writable, policy, serve_options)
        elif holder is None:
            holder = _served(store, offset, nbytes, policy, serve_options)
    finally:
        if store is not source:
            store.close()  # the supervisor (or the mapping) has its own handle; this needs none
    raw = memoryview(holder).cast("B")
    if paged and not writable:
        raw = raw.toreadonly()
    if dtype is None:
        return raw
    import numpy as np

    array = np.frombuffer(raw, dtype=dtype)
    return array.reshape(shape) if shape is not None else array


def _name(source: Any) -> str:
    """``source`` as an error message names it."""
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(source))
    return f"a {type(source).__name__}"


def _layout(
    store: Store, shape: int | tuple[int, ...] | None, dtype: Any
) -> tuple[int, int | tuple[int, ...] | None, Any, int]:
    """(offset, shape, dtype, length in bytes) of the memory ``store`` is mapped as."""
    offset, header_shape, header_dtype = _npy_header(store)
    if header_dtype is not None:
        if dtype is not None or shape is not None:
            raise ValueError("a .npy source defines its own shape and dtype; pass neither")
        shape, dtype = header_shape, header_dtype
    nbytes = store.size - offset
    if dtype is not None:
        import numpy as np

        itemsize = np.dtype(dtype).itemsize
        count = nbytes // itemsize if shape is None else int(np.prod(shape))
        nbytes = count * itemsize
        if offset + nbytes > store.size:
            raise ValueError(f"shape {shape} of {dtype} needs {nbytes} bytes; the source has "
                             f"{store.size - offset}")  # fmt: skip
    if nbytes <= 0:
        raise ValueError("the source is empty: there is nothing to map")
    return offset, shape, dtype, nbytes


def _served(
    store: Store, offset: int, nbytes: int, policy: Policy | None, serve_options: dict[str, Any]
) -> Any:
    """``nbytes`` of anonymous memory served from ``store`` at ``offset`` by a handler: a ctypes
    array that owns the mapping and the server."""
    page = memory.page_size()
    # No commit charge up front: a source may be larger than memory; pages count as they fill.
    mapping = memory.anonymous(-(-nbytes // page) * page, noreserve=True)
    try:
        server = serve([Region(mapping.address, mapping.length, offset, page)], store,
                       policy=policy, **serve_options)  # fmt: skip
    except BaseException:
        mapping.close()
        raise
    holder = (ctypes.c_char * nbytes).from_buffer(mapping.view)
    # The holder owns the mapping and the server. When the last view of it goes, the mapping is
    # unmapped (the handler reads that UNMAP and lets the range go) and the program lets go of
    # the server; the handler still serves forked children that have a copy.
    holder.mapping = mapping  # type: ignore[attr-defined]
    holder.server = server  # type: ignore[attr-defined]
    return holder


def server_of(array: Any) -> Server:
    """The handler behind an object :func:`lazy` returned (for its ``stats()``). ValueError
    for memory the kernel maps directly from a file (no handler: ``lazy(..., direct=False)``
    serves it through one)."""
    base = array
    while base is not None and not hasattr(base, "mapping"):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is None:
        raise ValueError("not memory returned by lazy()")
    if hasattr(base, "direct"):
        raise ValueError(
            f"this memory is mapped directly from {base.direct} by the kernel: there is no"
            " handler; lazy(..., direct=False) serves it through one"
        )
    server: Server = base.server
    return server


def _npy_header(store: Store) -> tuple[int, tuple[int, ...] | None, Any]:
    """(data offset, shape, dtype) of a .npy store; (0, None, None) for anything else."""
    probe = bytearray(min(store.size, _HEADER_PROBE))
    got = store.read_into(0, memoryview(probe))
    if not probe[:got].startswith(_NPY_MAGIC):
        return 0, None, None
    import numpy as np

    stream = io.BytesIO(bytes(probe[:got]))
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if fortran:
        raise ValueError("Fortran-ordered .npy files are not supported; save C-ordered")
    if dtype.hasobject:
        raise ValueError("a .npy of Python objects cannot be mapped")
    return stream.tell(), tuple(shape), dtype
