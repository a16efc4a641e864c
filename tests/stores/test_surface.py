"""The public surface of userfaultfd.stores, pinned: a change here is a change of the API."""

from __future__ import annotations

import userfaultfd.stores


def test_stores_surface() -> None:
    assert sorted(userfaultfd.stores.__all__) == [
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
    for name in userfaultfd.stores.__all__:
        assert getattr(userfaultfd.stores, name).__module__.startswith("userfaultfd.stores.")
