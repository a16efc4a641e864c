"""Stores: where lazily filled memory gets its bytes.

One small interface, :class:`Store` (``size``, ``read_into(offset, buffer)``), and its
implementations. :func:`open_store` picks one for a path, a URL or a bytes-like object.

:class:`FsspecStore` and the other stores beyond the local file are imported when first named,
and fsspec only when a URL other than plain HTTP is opened (:class:`HttpStore` reads HTTP
without it): importing fsspec registers an at-fork hook in every process that does, local files
or not.
"""

import importlib
import typing

from ._base import Store as Store
from ._base import StoreError as StoreError
from ._simple import BytesStore as BytesStore
from ._simple import FileStore as FileStore

__all__ = [
    "BytesStore",
    "ChunkCache",
    "ChunkedStore",
    "FileStore",
    "FsspecStore",
    "HttpStore",
    "PackInfo",
    "Store",
    "StoreError",
    "ZstdStore",
    "open_store",
    "pack",
]

if typing.TYPE_CHECKING:
    from ._cache import ChunkCache as ChunkCache
    from ._chunked import ChunkedStore as ChunkedStore
    from ._chunks import PackInfo as PackInfo
    from ._fsspec import FsspecStore as FsspecStore
    from ._http_store import HttpStore as HttpStore
    from ._open import open_store as open_store
    from ._pack import pack as pack
    from ._zstd import ZstdStore as ZstdStore

# Imported when first named: a program that reads local files (CRIU's lazy-pages daemon, a
# handler over a FileStore) never pays for HTTP, TLS, zstd or the pack formats (about 60 ms).
_LAZY = {
    "ChunkCache": "._cache", "ChunkedStore": "._chunked", "PackInfo": "._chunks",
    "FsspecStore": "._fsspec", "HttpStore": "._http_store", "open_store": "._open",
    "pack": "._pack", "ZstdStore": "._zstd",
}  # fmt: skip


def __getattr__(name: str) -> typing.Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
