"""pack(): a source into a single-file pack or a content-addressed one."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ._base import Store
from ._chunks import Layout, PackInfo, check_arguments
from ._simple import FileStore

__all__ = ["DEFAULT_CHUNK_SIZE", "pack"]

#: The default chunk size, chosen for random access by benchmarks/pack_chunks.py (see the README).
DEFAULT_CHUNK_SIZE = 64 << 10


def pack(
    source: str | os.PathLike[str] | Store,
    dest: str | os.PathLike[str],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = 3,
    layout: Layout = "file",
    dictionary: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **storage_options: Any,
) -> PackInfo:
    """Compress ``source`` (a path or a Store) into a pack at ``dest``.

    ``layout="file"``: one file at the local path ``dest`` (format in stores/_zstd.py), written
    under a temporary name and renamed at the end, so a failed pack leaves no half-written file.
    ``layout="chunks"``: content-addressed (described in stores/_chunked.py, the index's format
    in stores/_chunked_index.py): ``dest`` names the pack's index (a local path or an fsspec URL
    such as ``s3://bucket/images/vm.index``, with ``storage_options``); the pages that no earlier
    pack in that directory stored are compressed a chunk at a time into bundles, objects named by
    their hash in ``bundles/`` next to it, and the index is written last.
    ``PackInfo.unique_bytes`` says how many bytes were new.

    Chunks that are all zero get no frame. ``dictionary``: the size of a zstd dictionary to
    train on the source and store in the pack, which helps small chunks compress (0: none; file
    layout only). ``progress(bytes_done, bytes_total)`` is called after every chunk.
    """
    check_arguments(chunk_size, level, dictionary)
    if layout not in ("file", "chunks"):
        raise ValueError(f"layout {layout!r} is not one of 'file', 'chunks'")
    if layout == "file" and storage_options:
        raise TypeError(f"options {sorted(storage_options)} apply only to layout='chunks'")
    if layout == "chunks" and dictionary:
        raise ValueError("a dictionary is for layout='file' only: chunks shared between packs"
                         " must decode without one")  # fmt: skip
    store = source if isinstance(source, Store) else FileStore(source)
    try:
        if layout == "file":
            from ._zstd import write_pack

            return write_pack(store, os.fspath(dest), chunk_size=chunk_size, level=level,
                              dictionary=dictionary, progress=progress)  # fmt: skip
        from ._chunked import write_chunked

        return write_chunked(store, os.fspath(dest), chunk_size=chunk_size, level=level,
                             progress=progress, options=storage_options)  # fmt: skip
    finally:
        if store is not source:
            store.close()
