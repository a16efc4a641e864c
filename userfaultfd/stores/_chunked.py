"""A content-addressed pack: every chunk an object named by its hash, and an index per pack.

Layout: ``pack(source, "DIR/NAME.index", layout="chunks")`` writes ``DIR/chunks/<hash>`` for
every chunk not there already and then ``DIR/NAME.index``; DIR is a local directory or an fsspec
prefix (s3://bucket/images, memory://...). Packs written into the same DIR share their chunks,
so a new version of an image uploads only the chunks that changed (``PackInfo.unique_bytes``),
and a reader's :class:`ChunkCache` keeps a chunk once for every pack that has it.

Index format (all integers little-endian)::

    header   36 bytes   magic b"UFFDCIX1", u16 version (1), u16 flags (0), u32 chunk size,
                        u64 uncompressed size, u64 chunk count, u32 length of the chunk prefix
    prefix              UTF-8: where the chunk objects are, relative to the index ("chunks/")
    entries  36 bytes   per chunk: u32 length of its object (0: the chunk is all zero and has no
                        object), blake2b-256 of the uncompressed chunk; the object's name is
                        that hash in lowercase hex
    trailer  24 bytes   blake2b-128 of everything before it, magic b"UFFDCEND"

A chunk object is one zstd frame of the chunk (no dictionary: any pack may share it). A zero
entry must carry the hash of its zeros. The reader reads the index in one request and checks it
against the trailer; every chunk it serves, fetched or from the cache, is decompressed and
checked against its hash, so a wrong object is a :class:`StoreError` naming the chunk, never wrong
bytes. Chunks never change once written, so the reader pins only the index (as any store does).

Threads: :meth:`ChunkedStore.read_into` may be called from many threads at once
(``parallel_reads``: 16 over a remote prefix): the in-memory chunk cache is behind a lock, and
fetches and decompression run outside it.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import fsspec.utils

from ._base import Store, StoreError
from ._cache import ChunkCache
from ._chunks import Codec, PackInfo, digest, is_zero, read_chunks
from ._objects import Objects, is_url, open_objects

__all__ = ["INDEX_MAGIC", "ChunkedStore", "write_chunked"]

INDEX_MAGIC = b"UFFDCIX1"
_END_MAGIC = b"UFFDCEND"
_VERSION = 1
_HEADER = struct.Struct("<8sHHIQQI")
_ENTRY = struct.Struct("<I32s")
_TRAILER = struct.Struct("<16s8s")
_DIGEST_SIZE = 32
_PREFIX = "chunks/"

assert _HEADER.size == 36 and _ENTRY.size == 36 and _TRAILER.size == 24


def _split(dest: str) -> tuple[str, str]:
    """(directory or prefix, name) of a path or URL."""
    if is_url(dest):
        parent, _, name = dest.rpartition("/")
        return parent, name
    dest = os.path.abspath(dest.removeprefix("file://"))
    return os.path.dirname(dest), os.path.basename(dest)


def write_chunked(
    store: Store,
    dest: str,
    *,
    chunk_size: int,
    level: int,
    progress: Callable[[int, int], None] | None,
    options: dict[str, Any],
) -> PackInfo:
    """The content-addressed pack of ``store`` with its index at ``dest`` (see :func:`pack`)."""
    if is_url(dest) and fsspec.utils.get_protocol(dest) in ("http", "https"):
        raise ValueError(f"{dest}: HTTP is read-only; write the pack locally or to S3")
    parent, name = _split(dest)
    if not name:
        raise ValueError(f"{dest!r} does not name an index (e.g. DIR/image.index)")
    chunks = open_objects(f"{parent}/{_PREFIX}", options)
    here = open_objects(parent, options)
    try:
        existing = chunks.sizes()  # one listing, rather than a question per chunk
        compressor = Codec(b"", _DIGEST_SIZE).compressor(level)
        zeros = bytes(chunk_size)
        size = store.size
        count = -(-size // chunk_size)
        prefix = _PREFIX.encode()
        index = bytearray(_HEADER.pack(INDEX_MAGIC, _VERSION, 0, chunk_size, size, count,
                                       len(prefix)) + prefix)  # fmt: skip
        used: set[str] = set()
        zero_chunks = unique = total = 0
        # Uploads run parallel_reads at a time (one request each); at most twice that many
        # frames wait in memory.
        workers = chunks.parallel_reads
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pending: deque[Future[None]] = deque()
            for chunk in read_chunks(store, chunk_size, progress):
                hashed = digest(chunk, _DIGEST_SIZE)
                if is_zero(chunk, zeros):
                    index += _ENTRY.pack(0, hashed)
                    zero_chunks += 1
                    continue
                key = hashed.hex()
                if key not in existing:
                    frame = compressor.compress(chunk)
                    pending.append(pool.submit(chunks.put, key, frame))
                    existing[key] = len(frame)
                    unique += len(frame)
                    while len(pending) > 2 * workers or (pending and pending[0].done()):
                        pending.popleft().result()  # the first failure ends the pack
                if key not in used:
                    used.add(key)
                    total += existing[key]
                index += _ENTRY.pack(existing[key], hashed)
            while pending:
                pending.popleft().result()
        index += _TRAILER.pack(digest(index, 16), _END_MAGIC)
        here.put(name, bytes(index))  # last: an index only ever names chunks that are there
    finally:
        chunks.close()
        here.close()
    return PackInfo(
        path=dest,
        size=size,
        packed_size=total + len(index),
        chunk_size=chunk_size,
        chunks=count,
        level=level,
        zero_chunks=zero_chunks,
        unique_bytes=unique + len(index),
        dictionary=0,
        layout="chunks",
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Index:
    size: int
    chunk_size: int
    lengths: tuple[int, ...]  # object length per chunk, 0 for a zero chunk
    digests: tuple[bytes, ...]
    zero: bytes  # per chunk: 1 for a zero chunk
    prefix: str


def _parse(data: bytes) -> _Index:
    if len(data) < _HEADER.size + _TRAILER.size:
        raise StoreError(f"not a complete pack index: {len(data)} bytes")
    magic, version, flags, chunk_size, size, count, prefix_length = _HEADER.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise StoreError(f"not a uffd pack index: magic {magic[:8]!r}, expected {INDEX_MAGIC!r}")
    if version != _VERSION or flags != 0:
        raise StoreError(f"pack index version {version} flags {flags:#x} are not supported")
    entries_at = _HEADER.size + prefix_length
    if len(data) != entries_at + count * _ENTRY.size + _TRAILER.size:
        raise StoreError(f"not a complete pack index: {len(data)} bytes for {count} chunks")
    check, end_magic = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)
    if end_magic != _END_MAGIC or digest(data[: -_TRAILER.size], 16) != check:
        raise StoreError("corrupt pack index: it does not match its trailer's digest")
    if chunk_size == 0 or count != -(-size // chunk_size):
        raise StoreError(f"corrupt pack index: {count} chunks of {chunk_size} for {size} bytes")
    try:
        prefix = data[_HEADER.size : entries_at].decode()
    except UnicodeDecodeError as err:
        raise StoreError(f"corrupt pack index: chunk prefix: {err}") from err
    if prefix.startswith("/") or "://" in prefix or ".." in prefix.split("/"):
        raise StoreError(f"pack index: chunk prefix {prefix!r} leaves the index's directory")
    lengths, digests = [], []
    zero = bytearray(count)
    zero_digests: dict[int, bytes] = {}
    for i, (length, hashed) in enumerate(_ENTRY.iter_unpack(data[entries_at : -_TRAILER.size])):
        if length == 0:
            n = min(chunk_size, size - i * chunk_size)
            if n not in zero_digests:
                zero_digests[n] = digest(bytes(n), _DIGEST_SIZE)
            if hashed != zero_digests[n]:
                raise StoreError(f"corrupt pack index: chunk {i} has no object")
            zero[i] = 1
        lengths.append(length)
        digests.append(hashed)
    return _Index(size, chunk_size, tuple(lengths), tuple(digests), bytes(zero), prefix)


class ChunkedStore(Store):
    """The bytes of a content-addressed pack, read by its index (a path or a URL).

    ``storage_options`` are for both the index and the chunks (e.g. S3 keys). ``cache``: a
    :class:`ChunkCache` to look in before fetching a chunk and to keep each fetched one in. The
    last ``cache_chunks`` decompressed chunks are also kept in memory.
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        *,
        cache: ChunkCache | None = None,
        cache_chunks: int = 8,
        **storage_options: Any,
    ) -> None:
        from ._open import open_raw

        location = os.fspath(index)
        raw = open_raw(location, storage_options)
        try:
            store = ChunkedStore.over(raw, location, storage_options, cache, cache_chunks)
        finally:
            raw.close()
        self._init(store._index, store._objects, cache, cache_chunks)

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
        index's path or URL, which the chunk prefix is relative to."""
        buffer = bytearray(raw.size)
        got = raw.read_into(0, memoryview(buffer))
        if got != len(buffer):
            raise StoreError(f"{location}: not a complete pack index ({got} bytes)")
        index = _parse(bytes(buffer))
        parent, _ = _split(location)
        objects = open_objects(f"{parent}/{index.prefix}", options)
        store = cls.__new__(cls)
        store._init(index, objects, cache, cache_chunks)
        return store

    def _init(
        self, index: _Index, objects: Objects, cache: ChunkCache | None, cache_chunks: int
    ) -> None:
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be at least 1, not {cache_chunks}")
        self._index = index
        self._objects = objects
        self._disk = cache
        self._codec = Codec(b"", _DIGEST_SIZE)
        self._cache_chunks = cache_chunks
        self._memory: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # guards the in-memory cache only
        #: Chunk objects fetched from the chunk prefix (not the cache) by this handle.
        self.fetches = 0

    @property
    def size(self) -> int:
        return self._index.size

    @property
    def chunk_size(self) -> int:
        return self._index.chunk_size

    @property
    def chunks(self) -> int:
        return len(self._index.digests)

    @property
    def zero_chunks(self) -> int:
        return self._index.zero.count(1)

    @property
    def parallel_reads(self) -> int:
        return self._objects.parallel_reads

    def known_zero(self, offset: int, length: int) -> bool:
        end = offset + self.clamp(offset, length)
        if end == offset:
            return False
        step = self.chunk_size
        return 0 not in self._index.zero[offset // step : (end - 1) // step + 1]

    def read_into(self, offset: int, buffer: memoryview) -> int:
        end = offset + self.clamp(offset, len(buffer))
        step = self.chunk_size
        for i in range(offset // step, -(-end // step)):
            lo = max(offset, i * step)
            hi = min(end, (i + 1) * step)
            if self._index.zero[i]:
                buffer[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                chunk = self._chunk(i)
                buffer[lo - offset : hi - offset] = chunk[lo - i * step : hi - i * step]
        return end - offset

    def _chunk(self, i: int) -> bytes:
        with self._lock:
            data = self._memory.get(i)
            if data is not None:
                self._memory.move_to_end(i)
                return data
        data = self._load(i)
        with self._lock:
            self._memory[i] = data
            self._memory.move_to_end(i)
            while len(self._memory) > self._cache_chunks:
                self._memory.popitem(last=False)
        return data

    def _load(self, i: int) -> bytes:
        """Chunk i, from the disk cache if it is there and right, else fetched (and cached)."""
        index = self._index
        key = index.digests[i].hex()
        length = min(index.chunk_size, index.size - i * index.chunk_size)
        what = f"pack chunk {i} (bytes {i * index.chunk_size}..)"
        if self._disk is not None:
            frame = self._disk.get(key)
            if frame is not None:
                try:
                    return self._decode(frame, length, i, what + " from the cache")
                except StoreError:
                    self._disk.discard(key)  # a bad copy: fetch it again
        try:
            frame = self._objects.get(key)
        except StoreError as err:
            raise StoreError(f"{what}: {err.strerror}", code=err.errno or 5) from err
        with self._lock:
            self.fetches += 1
        data = self._decode(frame, length, i, what)
        if self._disk is not None:
            self._disk.put(key, frame)
        return data

    def _decode(self, frame: bytes, length: int, i: int, what: str) -> bytes:
        expected = self._index.lengths[i]
        if len(frame) != expected:
            raise StoreError(
                f"{what}: corrupt: object {self._index.digests[i].hex()} has {len(frame)} bytes,"
                f" the index says {expected}"
            )
        return self._codec.decode(frame, length, self._index.digests[i], what)

    def __enter__(self) -> Self:
        return self

    def reopen(self) -> ChunkedStore:
        """The same index (parsed once), with the chunk prefix and the cache opened anew for
        this process. The index's bytes were read whole at open, so no source is pinned."""
        store = ChunkedStore.__new__(ChunkedStore)
        cache = self._disk.reopen() if self._disk is not None else None
        store._init(self._index, self._objects.reopen(), cache, self._cache_chunks)
        return store

    def close(self) -> None:
        with self._lock:
            self._memory.clear()
        self._objects.close()

    def __repr__(self) -> str:
        return f"<ChunkedStore {self.size} bytes, {self.chunks} chunks in {self._objects.where!r}>"
