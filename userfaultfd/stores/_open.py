"""open_store: the Store for a Store, bytes, a path or a URL; packs are recognised by magic."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._base import Store
from ._chunked_index import INDEX_MAGIC
from ._raw import open_raw
from ._simple import BytesStore
from ._zstd import MAGIC, ZstdStore

if TYPE_CHECKING:
    from ._cache import ChunkCache

__all__ = ["open_store"]

assert len(MAGIC) == len(INDEX_MAGIC)


def open_store(
    source: Store | bytes | bytearray | memoryview | str | os.PathLike[str],
    *,
    cache: ChunkCache | None = None,
    **options: Any,
) -> Store:
    """A Store for ``source``.

    - a Store: itself;
    - bytes-like: a :class:`BytesStore` over it (not copied);
    - a path or a ``file://`` URL: a :class:`FileStore`, inside a :class:`ZstdStore` if the file
      starts with the pack magic, or a :class:`ChunkedStore` if it is a content-addressed
      pack's index;
    - an ``http://`` or ``https://`` URL: an :class:`HttpStore` (no fsspec), or an
      :class:`FsspecStore` where the options need fsspec's client (aiohttp objects, proxies,
      cookies); any other URL: an :class:`FsspecStore`. ``options`` are its storage options
      (and ``tries``, ``backoff``, ``timeout``); a pack over it is opened as over a file.

    ``cache``: where a content-addressed pack keeps the chunks it fetched (other sources do
    not use it).
    """
    if isinstance(source, Store | bytes | bytearray | memoryview):
        if options:
            raise TypeError(f"options {sorted(options)} apply only to URLs")
        return source if isinstance(source, Store) else BytesStore(source)
    text = os.fspath(source)
    raw = open_raw(text, options)
    try:
        head = bytearray(len(MAGIC))
        got = raw.read_into(0, memoryview(head))
        if got == len(MAGIC) and head == MAGIC:
            return ZstdStore(raw)
        if got == len(MAGIC) and head == INDEX_MAGIC:
            from ._chunked import ChunkedStore  # its bundles may be remote: HTTP, fsspec

            try:
                return ChunkedStore.over(raw, text, options, cache)
            finally:
                raw.close()  # read whole: the chunks are read by name from here on
    except BaseException:
        raw.close()
        raise
    return raw
