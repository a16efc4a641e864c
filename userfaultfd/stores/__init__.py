"""Stores: where lazily filled memory gets its bytes.

One small interface, :class:`Store` (``size``, ``read_into(offset, buffer)``), and its
implementations. :func:`open_store` picks one for a path, a URL or a bytes-like object.
"""

from ._base import Store as Store
from ._base import StoreError as StoreError
from ._cache import ChunkCache as ChunkCache
from ._chunked import ChunkedStore as ChunkedStore
from ._chunks import PackInfo as PackInfo
from ._fsspec import FsspecStore as FsspecStore
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
    "PackInfo",
    "Store",
    "StoreError",
    "ZstdStore",
    "open_store",
    "pack",
]
