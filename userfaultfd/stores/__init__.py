"""Stores: where lazily filled memory gets its bytes.

One small interface, :class:`Store` (``size``, ``read_into(offset, buffer)``), and its
implementations. :func:`open_store` picks one for a path, a URL or a bytes-like object.

:class:`FsspecStore` is imported when first named, and fsspec only when a URL other than plain
HTTP is opened (:class:`HttpStore` reads HTTP without it): importing fsspec registers an at-fork
hook in every process that does, local files or not.
"""

import typing

from ._base import Store as Store
from ._base import StoreError as StoreError
from ._cache import ChunkCache as ChunkCache
from ._chunked import ChunkedStore as ChunkedStore
from ._chunks import PackInfo as PackInfo
from ._http_store import HttpStore as HttpStore
from ._open import open_store as open_store
from ._pack import pack as pack
from ._simple import BytesStore as BytesStore
from ._simple import FileStore as FileStore
from ._zstd import ZstdStore as ZstdStore

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
    from ._fsspec import FsspecStore as FsspecStore


def __getattr__(name: str) -> typing.Any:
    if name == "FsspecStore":
        from ._fsspec import FsspecStore

        return FsspecStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
