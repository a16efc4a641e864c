"""The kernel's own mapping: :func:`lazy` of a plain local file, with no handler.

Design note. A regular file on a local file system is already memory filled on demand: a private
file mapping (MAP_PRIVATE) faults each page in from the page cache, with the kernel's read-ahead
and fault-around (a read fault maps the cached pages around it too), and needs no handler
process, no uffd and no copy. So when nothing that needs a handler is asked for (a policy,
``record``, ``prefetch``, ``fetches``, a chunk cache, any serve option), :func:`lazy` maps such a
file directly. What the caller gets behaves as the handler's memory does: writable, the writes
private to the process (copy on write: the file never changes), a forked child sees the same
bytes and keeps its writes to itself, and it stays mapped as long as any view of it lives.

Kernel facts that make the two paths differ, and which the README states:

- A page of a private file mapping that this process has not written is the page cache's page:
  a write to the file in place (``write()``, a shared mapping) shows through it, even on a page
  read before. A page the handler filled is an anonymous copy that never changes again.
- Truncating the file removes its pages past the new end from every mapping of it, private
  copies included (truncate_pagecache unmaps "even COWs"): touching them raises SIGBUS. Through
  the handler, the pages not filled yet are poisoned (SIGBUS); those filled stay.
- A private writable mapping is charged against the commit limit up front unless it is mapped
  MAP_NORESERVE; as for the handler's memory, it is, so a file larger than memory maps and
  only written pages are charged.
- The mapping holds the open file (the store's descriptor, duplicated by mmap): a file replaced
  with ``os.replace`` or unlinked after the open is still the one mapped.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import stat
from typing import Any

from .. import _abi
from ..stores import ChunkCache, ChunkedStore, FileStore, Store, ZstdStore

__all__ = ["handler_needed", "map_file"]


def handler_needed(
    source: Any, store: Store, cache: ChunkCache | None, options: dict[str, Any]
) -> str | None:
    """Why ``source`` (opened as ``store``) must be served by a handler, or None when the kernel
    can map it directly. ``options``: the serve options the caller gave (``policy`` among them,
    when not None)."""
    if isinstance(source, Store):
        return "a Store object needs a handler (only a path to a local file is mapped directly)"
    if not isinstance(source, str | os.PathLike):
        return "bytes in memory need a handler (only a path to a local file is mapped directly)"
    if cache is not None:
        return "a chunk cache needs a handler"
    if options:
        return f"{', '.join(sorted(options))} need{'s' if len(options) == 1 else ''} a handler"
    if isinstance(store, ZstdStore | ChunkedStore):
        return "a pack needs a handler (its chunks are compressed)"
    if type(store) is not FileStore:
        return f"{type(store).__name__} is not a local file: it needs a handler"
    mode = os.fstat(_descriptor(store)).st_mode
    if not stat.S_ISREG(mode):
        return f"{store.path} is not a regular file: it needs a handler"
    return None


def map_file(store: FileStore, offset: int, nbytes: int) -> Any:
    """``nbytes`` of the file from ``offset`` on, mapped private and writable (copy on write):
    a ctypes array that owns the mapping (it is unmapped when the last view of it goes)."""
    page = mmap.ALLOCATIONGRANULARITY
    start = offset - offset % page
    flags = mmap.MAP_PRIVATE | _abi.MAP_NORESERVE
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    mapping = mmap.mmap(_descriptor(store), offset + nbytes - start, flags=flags, prot=prot,
                        offset=start)  # fmt: skip
    holder = (ctypes.c_char * nbytes).from_buffer(mapping, offset - start)
    holder.mapping = mapping  # type: ignore[attr-defined]
    holder.direct = store.path  # type: ignore[attr-defined]  # for server_of's message
    return holder


def _descriptor(store: FileStore) -> int:
    # The store's own open file, so the file mapped is the file the store opened and checked (a
    # path opened again could name another file by now).
    return store.fileno()
