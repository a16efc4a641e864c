"""open_store: the Store for a Store, bytes, a path or a URL; packs are recognised by magic."""

from __future__ import annotations

import os
import re
from typing import Any

from ._base import Store
from ._fsspec import FsspecStore
from ._simple import BytesStore, FileStore
from ._zstd import MAGIC, ZstdStore

__all__ = ["open_store"]

# A scheme as RFC 3986 spells it; fsspec chains ("simplecache::s3://...") start with one too.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")


def open_store(
    source: Store | bytes | bytearray | memoryview | str | os.PathLike[str], **options: Any
) -> Store:
    """A Store for ``source``.

    - a Store: itself;
    - bytes-like: a :class:`BytesStore` over it (not copied);
    - a path or a ``file://`` URL: a :class:`FileStore`, inside a :class:`ZstdStore` if the file
      starts with the pack magic;
    - any other URL: an :class:`FsspecStore` (``options`` are its storage options), inside a
      :class:`ZstdStore` if the object starts with the pack magic.
    """
    if isinstance(source, Store | bytes | bytearray | memoryview):
        if options:
            raise TypeError(f"options {sorted(options)} apply only to URLs")
        return source if isinstance(source, Store) else BytesStore(source)
    text = os.fspath(source)
    if _URL.match(text) and not text.startswith("file://"):
        return _unpacked(FsspecStore(text, **options))
    if options:
        raise TypeError(f"options {sorted(options)} apply only to URLs")
    return _unpacked(FileStore(text.removeprefix("file://")))


def _unpacked(raw: Store) -> Store:
    """``raw``, or a ZstdStore over it when it holds a pack."""
    try:
        head = bytearray(len(MAGIC))
        if raw.read_into(0, memoryview(head)) == len(MAGIC) and head == MAGIC:
            return ZstdStore(raw)
    except BaseException:
        raw.close()
        raise
    return raw
