"""A content-addressed pack: pages shared between packs, compressed and fetched a chunk at a time.

Layout: ``pack(source, "DIR/NAME.index", layout="chunks")`` writes bundles of new pages into
``DIR/bundles/`` and then ``DIR/NAME.index``; DIR is a local directory or an fsspec prefix
(s3://bucket/images, memory://...), which a reader may also read over HTTP (stores/_objects.py).
Packs written into the same DIR share their pages, so a new version of an image uploads only the
pages that changed (``PackInfo.unique_bytes``), however scattered, and a reader's
:class:`ChunkCache` keeps a frame once for every pack that has it.

Granularity. Deduplication is per page (4 KiB, or the whole chunk when the chunk size is not a
multiple of 4 KiB): a page that a pack in DIR already stored is not stored again. Compression and
fetching are per chunk: the new pages of each chunk-sized group of the source are compressed
together, as one zstd frame, so a first pack compresses as well as whole chunks do (pages alone
compress 8% worse on the benchmarks' data), and a reader fetches a page's whole frame, at most a
chunk, in one ranged GET. Frames follow each other in bundles (objects of about 4 MiB, named by
their blake2b-256), and frames a read needs that lie next to each other in a bundle come in one
GET. A group with one changed page is then served from two frames: the old one (its other
pages) and a new one-page frame.

Formats: the index's in _chunked_index.py (versions 2 and 1), the bundle manifests' (for writers
only) in _chunked_writer.py.

Integrity: the reader reads the index in one request and checks it against the trailer; every
frame it serves, fetched or from the cache, is decompressed and checked against its hash, so a
wrong bundle is a :class:`StoreError` naming the page read, never wrong bytes. Bundles never
change once written (their names are their hashes), so the reader pins only the index (as any
store does).

Threads: :meth:`ChunkedStore.read_into` may be called from many threads at once
(``parallel_reads``: 16 over a remote prefix): the in-memory frame cache is behind a lock, and
fetches and decompression run outside it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from typing import Any, Self

from ._base import Store, StoreError
from ._cache import ChunkCache
from ._chunked_index import HASH_SIZE, INDEX_MAGIC, NAME_SIZE, Index, parse_index, split_location
from ._chunked_writer import write_chunked  # pack() imports it from here
from ._chunks import Codec
from ._objects import Objects, open_objects
from ._raw import open_raw

__all__ = ["INDEX_MAGIC", "ChunkedStore", "write_chunked"]

_GAP = 16 << 10  # frames this close in one bundle are fetched in one GET (the gap too)
_MAX_RUN = 8 << 20  # but one GET brings at most about this many bytes


class ChunkedStore(Store):
    """The bytes of a content-addressed pack, read by its index (a path or a URL).

    ``storage_options`` are for both the index and the bundles (e.g. S3 keys). ``cache``: a
    :class:`ChunkCache` to look in before fetching a frame and to keep each fetched one in. The
    last ``cache_chunks`` decompressed frames are also kept in memory.
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        *,
        cache: ChunkCache | None = None,
        cache_chunks: int = 8,
        **storage_options: Any,
    ) -> None:
        location = os.fspath(index)
        raw = open_raw(location, storage_options)
        try:
            store = ChunkedStore.over(raw, location, storage_options, cache, cache_chunks)
        finally:
            raw.close()
        self._init(store._index, store._bundles, cache, cache_chunks)

    @classmethod
    def over(
        cls,
        raw: Store,
        location: str,
        options: dict[str, Any],
        cache: ChunkCache | None,
        cache_chunks: int = 8,
    ) -> ChunkedStore:
        """The pack whose index ``raw`` holds (read whole, then not needed); ``location`` is the
        index's path or URL, which the bundle prefix is relative to."""
        buffer = bytearray(raw.size)
        got = raw.read_into(0, memoryview(buffer))
        if got != len(buffer):
            raise StoreError(errno.EIO, f"{location}: not a complete pack index ({got} bytes)")
        index = parse_index(bytes(buffer))
        parent, _ = split_location(location)
        # The bundles are read as the index was: with the same retries, deadline and options.
        policy = {k: options[k] for k in ("tries", "backoff", "timeout") if k in options}
        transport = {k: v for k, v in options.items() if k not in policy}
        bundles = open_objects(f"{parent}/{index.prefix}", transport, **policy)
        store = cls.__new__(cls)
        store._init(index, bundles, cache, cache_chunks)
        return store

    def _init(
        self, index: Index, bundles: Objects, cache: ChunkCache | None, cache_chunks: int
    ) -> None:
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be at least 1, not {cache_chunks}")
        self._index = index
        self._bundles = bundles
        self._disk = cache
        self._codec = Codec(b"", NAME_SIZE if index.version == 1 else HASH_SIZE)
        self._cache_chunks = cache_chunks
        self._memory: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # guards the in-memory cache and the counters
        #: Requests made for frames (the cache's hits not counted) by this handle.
        self.fetches = 0
        #: Bytes those requests brought.
        self.fetched_bytes = 0

    @property
    def size(self) -> int:
        return self._index.size

    @property
    def chunk_size(self) -> int:
        return self._index.chunk_size

    @property
    def page_size(self) -> int:
        """The unit of deduplication (version 1: the chunk size)."""
        return self._index.page_size

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk_size)

    @property
    def zero_chunks(self) -> int:
        """Chunk-sized groups of the source that are all zero pages."""
        per = max(1, self.chunk_size // self.page_size)
        zero = self._index.zero
        return sum(1 for k in range(0, len(zero), per) if 0 not in zero[k : k + per])

    @property
    def parallel_reads(self) -> int:
        return self._bundles.parallel_reads

    def known_zero(self, offset: int, length: int) -> bool:
        end = offset + self.clamp(offset, length)
        if end == offset:
            return False
        step = self.page_size
        return 0 not in self._index.zero[offset // step : (end - 1) // step + 1]

    def read_range(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        index = self._index
        step = index.page_size
        pages = range(offset // step, -(-end // step))
        needed: dict[int, int] = {}  # frame -> the first page that needs it (for messages)
        for p in pages:
            if not index.zero[p]:
                needed.setdefault(index.page_frame[p], p)
        frames = self._frames(needed) if needed else {}
        for p in pages:
            lo, hi = max(offset, p * step), min(end, (p + 1) * step)
            if index.zero[p]:
                view[lo - offset : hi - offset] = bytes(hi - lo)
                continue
            f = index.page_frame[p]
            at = index.page_slot[p] * step - p * step  # page p's bytes start at p*step + at
            page_end = min(index.size, (p + 1) * step)
            if at + page_end > index.frame_raw[f]:
                raise StoreError(
                    errno.EIO,
                    f"{self._what(p)}: corrupt pack index: slot "
                    f"{index.page_slot[p]} lies outside frame {f}",
                )
            view[lo - offset : hi - offset] = memoryview(frames[f])[at + lo : at + hi]

    def _what(self, page: int) -> str:
        unit = "chunk" if self._index.version == 1 else "page"
        return f"pack {unit} {page} (bytes {page * self._index.page_size}..)"

    def _frames(self, needed: dict[int, int]) -> dict[int, bytes]:
        """The decoded frames ``needed`` (frame -> a page that needs it): from memory, the disk
        cache, or fetched, frames next to each other in one bundle in one request."""
        got: dict[int, bytes] = {}
        with self._lock:
            for f in needed:
                data = self._memory.get(f)
                if data is not None:
                    self._memory.move_to_end(f)
                    got[f] = data
        missing = [f for f in needed if f not in got]
        if self._disk is not None:
            for f in list(missing):
                frame = self._disk.get(self._index.frame_hash[f].hex())
                if frame is None:
                    continue
                try:
                    got[f] = self._decode(f, frame, needed[f], " from the cache")
                    missing.remove(f)
                except StoreError:
                    self._disk.discard(self._index.frame_hash[f].hex())  # a bad copy: fetch
        for run in self._runs(missing):
            self._fetch(run, needed, got)
        with self._lock:
            for f in needed:
                if f not in self._memory:
                    self._memory[f] = got[f]
                self._memory.move_to_end(f)
            while len(self._memory) > self._cache_chunks:
                self._memory.popitem(last=False)
        return got

    def _runs(self, frames: list[int]) -> list[list[int]]:
        """``frames`` as runs that one request each can fetch: same object, in order, apart by
        at most _GAP bytes, at most about _MAX_RUN bytes in all."""
        index = self._index
        ordered = sorted(frames, key=lambda f: (index.frame_object[f], index.frame_offset[f]))
        runs: list[list[int]] = []
        for f in ordered:
            if runs:
                last = runs[-1]
                first, prev = last[0], last[-1]
                prev_end = index.frame_offset[prev] + index.frame_length[prev]
                at = index.frame_offset[f]
                if (index.frame_object[f] == index.frame_object[prev]
                        and prev_end <= at <= prev_end + _GAP
                        and at - index.frame_offset[first] < _MAX_RUN):  # fmt: skip
                    last.append(f)
                    continue
            runs.append([f])
        return runs

    def _fetch(self, run: list[int], needed: dict[int, int], got: dict[int, bytes]) -> None:
        index = self._index
        name = index.names[index.frame_object[run[0]]]
        start = index.frame_offset[run[0]]
        stop = index.frame_offset[run[-1]] + index.frame_length[run[-1]]
        try:
            data = self._bundles.read(name, start, stop)
        except StoreError as err:
            raise StoreError(
                err.errno or errno.EIO, f"{self._what(needed[run[0]])}: {err.strerror}"
            ) from err
        with self._lock:
            self.fetches += 1
            self.fetched_bytes += len(data)
        for f in run:
            at = index.frame_offset[f] - start
            frame = data[at : at + index.frame_length[f]]
            got[f] = self._decode(f, frame, needed[f], "")
            if self._disk is not None:
                self._disk.put(index.frame_hash[f].hex(), frame)

    def _decode(self, f: int, frame: bytes, page: int, where: str) -> bytes:
        index = self._index
        what = self._what(page)
        if index.version == 1:
            expected = index.frame_length[f]
            if len(frame) != expected:
                raise StoreError(
                    errno.EIO,
                    f"{what}{where}: corrupt: object {index.names[f]} has "
                    f"{len(frame)} bytes, the index says {expected}",
                )
        else:
            name = index.names[index.frame_object[f]]
            start = index.frame_offset[f]
            what += f": frame {f} ({self._bundles.where}{name} bytes {start}..)"
        return self._codec.decode(frame, index.frame_raw[f], index.frame_hash[f], what + where)

    def __enter__(self) -> Self:
        return self

    def reopen(self) -> ChunkedStore:
        """The same index (parsed once), with the bundle prefix and the cache opened anew for
        this process. The index's bytes were read whole at open, so no source is pinned."""
        store = ChunkedStore.__new__(ChunkedStore)
        cache = self._disk.reopen() if self._disk is not None else None
        store._init(self._index, self._bundles.reopen(), cache, self._cache_chunks)
        return store

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
        self._bundles.close()

    def __repr__(self) -> str:
        return (f"<ChunkedStore {self.size} bytes, {self._index.pages} pages in "
                f"{len(self._index.frame_raw)} frames in {self._bundles.where!r}>")  # fmt: skip
