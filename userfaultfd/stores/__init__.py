"""Stores: where lazily filled memory gets its bytes.

One small interface, :class:`Store` (``size``, ``read_into(offset, buffer)``), and its
implementations. :func:`open_store` picks one for a path, a URL or a bytes-like object.
"""

from ._base import Store as Store
from ._base import StoreError as StoreError
from ._fsspec import FsspecStore as FsspecStore
from ._open import open_store as open_store
from ._simple import BytesStore as BytesStore
from ._simple import FileStore as FileStore
from ._zstd import PackInfo as PackInfo
from ._zstd import ZstdStore as ZstdStore
from ._zstd import pack as pack

__all__ = [
    "BytesStore",
    "FileStore",
    "FsspecStore",
    "PackInfo",
    "Store",
    "StoreError",
    "ZstdStore",
    "open_store",
    "pack",
]
