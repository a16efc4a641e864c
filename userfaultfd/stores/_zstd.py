"""A seekable zstd pack: independently compressed chunks with an index, read through any Store.

Format (all integers little-endian)::

    header   32 bytes   magic b"UFFDZST1", u16 version (1 or 2), u16 flags, u32 chunk size,
                        u64 uncompressed size, u64 chunk count
    dictionary          version 2 with flag 2 only: u32 length, then a zstd dictionary that every
                        frame was compressed with
    chunks              chunk i is one zstd frame holding bytes [i * chunk size, (i + 1) * chunk
                        size) of the source (the last one may be shorter); frames follow each
                        other, from the end of the header (or dictionary), with no gaps
    index    28 bytes   per chunk: u64 offset of its frame, u32 frame length, blake2b-128 of the
                        uncompressed chunk
    footer   40 bytes   u64 offset of the index, u64 chunk count, blake2b-128 of header +
                        dictionary + index, magic b"UFFDZEND"

Version 2 adds two flags: 1, zero chunks: a chunk that is all zero has no frame (frame length 0,
its offset where the next frame starts, and the hash of its zeros), and 2, a dictionary. A pack
that uses neither is written as version 1, byte for byte what earlier writers wrote, and both
versions are read.

A reader reads the header, then the index and the footer in one read (the header's chunk count says
how long the index is; a third read for the dictionary), and checks them against each other and the
footer's digest; a truncated or foreign file fails there. Every chunk it then serves is
decompressed and checked against its hash, so a corrupted pack raises :class:`StoreError` naming
the chunk: a page fault handler poisons that page rather than mapping wrong bytes. A zero chunk is
served without any read, and :meth:`ZstdStore.known_zero` tells the handler so before it asks.
Chunks are independent so a random page costs one chunk, and the index sits at the end so
:func:`pack` can stream the source without knowing compressed sizes up front.

Threads: :meth:`ZstdStore.read_into` may be called from many threads at once (as many as the raw
store's ``parallel_reads``): the chunk cache is behind a lock, reads and decompression run
outside it, and every read decodes into buffers of its own.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import BinaryIO

from .._replacing import replacing
from ._base import Store, StoreError
from ._chunks import Codec, PackInfo, digest, is_zero, read_chunks, train

__all__ = ["MAGIC", "ZstdStore", "write_pack"]

MAGIC = b"UFFDZST1"
_END_MAGIC = b"UFFDZEND"
_VERSIONS = (1, 2)
_ZERO_CHUNKS = 1  #: flag: entries of frame length 0 are zero chunks (version 2)
_DICTIONARY = 2  #: flag: a dictionary follows the header (version 2)
_HEADER = struct.Struct("<8sHHIQQ")
_DICT_LENGTH = struct.Struct("<I")
_ENTRY = struct.Struct("<QI16s")
_FOOTER = struct.Struct("<QQ16s8s")
_DIGEST_SIZE = 16

assert _HEADER.size == 32 and _ENTRY.size == 28 and _FOOTER.size == 40


@dataclasses.dataclass(frozen=True, slots=True)
class _Layout:
    """A pack's parsed header and index; shared by a store and its reopened copies."""

    size: int
    chunk_size: int
    offsets: tuple[int, ...]  # chunk count + 1 entries: frame i is offsets[i]:offsets[i + 1]
    digests: tuple[bytes, ...]
    zero: bytes  # per chunk: 1 for a zero chunk (no frame), else 0
    codec: Codec


def write_pack(
    store: Store,
    dest: str,
    *,
    chunk_size: int,
    level: int,
    dictionary: int,
    progress: Callable[[int, int], None] | None,
) -> PackInfo:
    """The single-file pack of ``store`` at the local path ``dest`` (see :func:`pack`)."""
    with replacing(dest) as out:
        zero_chunks, dict_size = _write(store, out, chunk_size, level, dictionary, progress)
        packed_size = out.tell()
    size = store.size
    return PackInfo(
        path=dest,
        size=size,
        packed_size=packed_size,
        chunk_size=chunk_size,
        chunks=-(-size // chunk_size),
        level=level,
        zero_chunks=zero_chunks,
        unique_bytes=packed_size,
        dictionary=dict_size,
        layout="file",
    )


def _write(
    store: Store,
    out: BinaryIO,
    chunk_size: int,
    level: int,
    dictionary: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[int, int]:
    """Write the pack; (zero chunks, dictionary bytes)."""
    size = store.size
    count = -(-size // chunk_size)
    trained = train(store, chunk_size, dictionary, level) if dictionary else b""
    codec = Codec(trained, _DIGEST_SIZE)
    # The header is rewritten at the end, once the flags are known (zero chunks show up late).
    out.write(bytes(_HEADER.size))
    section = _DICT_LENGTH.pack(len(trained)) + trained if trained else b""
    out.write(section)
    compressor = codec.compressor(level)
    zeros = bytes(chunk_size)
    index = bytearray()
    position = _HEADER.size + len(section)
    zero_chunks = 0
    for chunk in read_chunks(store, chunk_size, progress):
        if is_zero(chunk, zeros):
            index += _ENTRY.pack(position, 0, digest(chunk, _DIGEST_SIZE))
            zero_chunks += 1
            continue
        frame = compressor.compress(chunk)
        out.write(frame)
        index += _ENTRY.pack(position, len(frame), digest(chunk, _DIGEST_SIZE))
        position += len(frame)
    flags = (_ZERO_CHUNKS if zero_chunks else 0) | (_DICTIONARY if trained else 0)
    header = _HEADER.pack(MAGIC, 2 if flags else 1, flags, chunk_size, size, count)
    out.write(index)
    out.write(_FOOTER.pack(position, count, digest(header + section + index, _DIGEST_SIZE),
                           _END_MAGIC))  # fmt: skip
    out.seek(0)
    out.write(header)
    out.seek(0, os.SEEK_END)
    return zero_chunks, len(trained)


class ZstdStore(Store):
    """The uncompressed bytes of a pack made by :func:`pack`, read through ``raw``.

    ``raw`` can be any Store (a file, HTTP, S3), and this store owns it: closing this closes that.
    The last ``cache_chunks`` decompressed chunks are kept, so a reader walking a chunk page by page
    decompresses it once. Zero chunks are never read (:meth:`known_zero`). Safe to call from
    ``raw.parallel_reads`` threads at once.
    """

    def __init__(self, raw: Store, *, cache_chunks: int = 8) -> None:
        self._init(raw, _read_layout(raw), cache_chunks)

    def _init(self, raw: Store, layout: _Layout, cache_chunks: int) -> None:
        if cache_chunks < 1:
            raise ValueError(f"cache_chunks must be at least 1, not {cache_chunks}")
        self._raw = raw
        self._layout = layout
        self._cache_chunks = cache_chunks
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()  # guards the cache only; reads run in parallel

    @property
    def size(self) -> int:
        return self._layout.size

    @property
    def chunk_size(self) -> int:
        return self._layout.chunk_size

    @property
    def chunks(self) -> int:
        return len(self._layout.digests)

    @property
    def zero_chunks(self) -> int:
        """How many chunks are all zero (stored without a frame)."""
        return self._layout.zero.count(1)

    @property
    def dictionary(self) -> int:
        """Size of the pack's zstd dictionary in bytes (0: none)."""
        return len(self._layout.codec.dictionary)

    @property
    def parallel_reads(self) -> int:
        return self._raw.parallel_reads

    def known_zero(self, offset: int, length: int) -> bool:
        end = offset + self.clamp(offset, length)
        if end == offset:
            return False
        step = self.chunk_size
        return 0 not in self._layout.zero[offset // step : (end - 1) // step + 1]

    def read_range(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        step = self.chunk_size
        first, last = offset // step, (end - 1) // step
        chunks = self._chunks(first, last)
        for i, chunk in zip(range(first, last + 1), chunks, strict=True):
            lo = max(offset, i * step)
            hi = min(end, (i + 1) * step)
            if chunk is None:  # a zero chunk
                view[lo - offset : hi - offset] = bytes(hi - lo)
            else:
                view[lo - offset : hi - offset] = chunk[lo - i * step : hi - i * step]

    def _chunks(self, first: int, last: int) -> list[bytes | None]:
        """Decompressed chunks first..last (None for a zero chunk), from the cache or from one
        read of ``raw``."""
        zero = self._layout.zero
        with self._lock:
            found: dict[int, bytes | None] = {}
            for i in range(first, last + 1):
                if zero[i]:
                    found[i] = None
                elif i in self._cache:
                    found[i] = self._cache[i]
                    self._cache.move_to_end(i)
        missing = [i for i in range(first, last + 1) if i not in found]
        if missing:
            # Frames are contiguous: one raw read covers every missing one (one request on HTTP).
            # Cached chunks between them are read again rather than split the request.
            lo, hi = missing[0], missing[-1]
            offsets = self._layout.offsets
            frames = bytearray(offsets[hi + 1] - offsets[lo])
            got = self._read_raw(offsets[lo], memoryview(frames), lo, hi)
            decoded = {}
            for i in missing:
                start = offsets[i] - offsets[lo]
                stop = offsets[i + 1] - offsets[lo]
                if stop > got:
                    raise StoreError(
                        errno.EIO, f"pack chunk {i}: truncated (the pack ends inside it)"
                    )
                decoded[i] = self._decode(i, memoryview(frames)[start:stop])
            found.update(decoded)
            with self._lock:
                for i, data in decoded.items():
                    self._cache[i] = data
                    self._cache.move_to_end(i)
                while len(self._cache) > self._cache_chunks:
                    self._cache.popitem(last=False)
        return [found[i] for i in range(first, last + 1)]

    def _read_raw(self, offset: int, view: memoryview, lo: int, hi: int) -> int:
        try:
            return self._raw.read_into(offset, view)
        except StoreError as err:
            which = f"chunk {lo}" if lo == hi else f"chunks {lo}..{hi}"
            raise StoreError(err.errno or errno.EIO, f"pack {which}: {err.strerror}") from err

    def _decode(self, i: int, frame: memoryview) -> bytes:
        step = self.chunk_size
        length = min(step, self.size - i * step)
        what = f"pack chunk {i} (bytes {i * step}..)"
        return self._layout.codec.decode(frame, length, self._layout.digests[i], what)

    def reopen(self) -> ZstdStore:
        # The layout is immutable and shared; only the transport needs a fresh handle, and the
        # raw store's reopen() pins it to the bytes this store opened (or raises StoreError).
        # Should those bytes change anyway, every chunk is checked against its hash.
        store = ZstdStore.__new__(ZstdStore)
        store._init(self._raw.reopen(), self._layout, self._cache_chunks)
        return store

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        self._raw.close()

    def __repr__(self) -> str:
        return f"<ZstdStore {self.size} bytes, {self.chunks} chunks over {self._raw!r}>"


def read_exact(raw: Store, offset: int, length: int, what: str) -> bytes:
    buf = bytearray(length)
    got = raw.read_into(offset, memoryview(buf))
    if got != length:
        raise StoreError(
            errno.EIO, f"not a complete pack: {what} is cut short ({got} of {length} bytes)"
        )
    return bytes(buf)


def _read_layout(raw: Store) -> _Layout:
    """Parse and cross-check the header, footer and index; see the module docstring."""
    total = raw.size
    if total < _HEADER.size + _FOOTER.size:
        if total >= len(MAGIC) and read_exact(raw, 0, len(MAGIC), "magic") != MAGIC:
            raise StoreError(errno.EIO, f"not a uffd zstd pack: no {MAGIC!r} magic at the start")
        raise StoreError(
            errno.EIO, f"not a complete pack: {total} bytes is shorter than header + footer"
        )
    header = read_exact(raw, 0, _HEADER.size, "header")
    magic, version, flags, chunk_size, size, count = _HEADER.unpack(header)
    if magic != MAGIC:
        raise StoreError(errno.EIO, f"not a uffd zstd pack: magic {magic!r}, expected {MAGIC!r}")
    if version not in _VERSIONS:
        raise StoreError(
            errno.EIO, f"pack format version {version} is not supported (only 1 and 2)"
        )
    if version == 1:
        flags = 0  # version 1 wrote 0 and never read them
    elif flags & ~(_ZERO_CHUNKS | _DICTIONARY):
        raise StoreError(errno.EIO, f"pack flags {flags:#x} are not supported (only 0x1 and 0x2)")
    if chunk_size == 0 or count != -(-size // chunk_size):
        raise StoreError(
            errno.EIO, f"corrupt pack header: {count} chunks of {chunk_size} for {size} bytes"
        )
    index_size = count * _ENTRY.size
    if _HEADER.size + index_size + _FOOTER.size > total:
        raise StoreError(errno.EIO, f"not a complete pack: {count} chunks need a {index_size}-byte"
                         f" index, and the pack has {total} bytes")  # fmt: skip
    # The header says how long the index is: the index and the footer in one read (one request).
    tail = read_exact(raw, total - index_size - _FOOTER.size, index_size + _FOOTER.size,
                      "index and footer")  # fmt: skip
    index, footer = tail[:index_size], tail[index_size:]
    index_offset, footer_count, footer_digest, end_magic = _FOOTER.unpack(footer)
    if end_magic != _END_MAGIC or footer_count != count:
        raise StoreError(
            errno.EIO, f"not a complete pack: no valid footer at the end ({total} bytes)"
        )
    if index_offset + index_size + _FOOTER.size != total:
        raise StoreError(
            errno.EIO, f"not a complete pack: index at {index_offset} does not fit {total} bytes"
        )
    entries = list(_ENTRY.iter_unpack(index))
    start = entries[0][0] if entries else index_offset
    section = b""
    if flags & _DICTIONARY:
        if not _HEADER.size + _DICT_LENGTH.size < start <= index_offset:
            raise StoreError(
                errno.EIO, f"corrupt pack: the dictionary ends at {start}, past the index"
            )
        section = read_exact(raw, _HEADER.size, start - _HEADER.size, "dictionary")
        (length,) = _DICT_LENGTH.unpack_from(section)
        if length != len(section) - _DICT_LENGTH.size:
            raise StoreError(
                errno.EIO, f"corrupt pack: a dictionary of {length} bytes in {len(section)}"
            )
    if digest(header + section + index, _DIGEST_SIZE) != footer_digest:
        raise StoreError(
            errno.EIO, "corrupt pack: header or index does not match the footer's digest"
        )
    offsets = [_HEADER.size + len(section)]
    zero = bytearray(count)
    zero_digests: dict[int, bytes] = {}
    for i, (offset, length, chunk_digest) in enumerate(entries):
        if offset != offsets[-1]:
            raise StoreError(
                errno.EIO, f"corrupt pack index: chunk {i} at {offset}, expected {offsets[-1]}"
            )
        if length == 0:
            # A zero chunk must say so twice: the flag, and the hash of exactly its zeros.
            n = min(chunk_size, size - i * chunk_size)
            if n not in zero_digests:
                zero_digests[n] = digest(bytes(n), _DIGEST_SIZE)
            if not flags & _ZERO_CHUNKS or chunk_digest != zero_digests[n]:
                raise StoreError(errno.EIO, f"corrupt pack index: chunk {i} has no frame")
            zero[i] = 1
        offsets.append(offset + length)
    if offsets[-1] != index_offset:
        raise StoreError(
            errno.EIO, f"corrupt pack index: frames end at {offsets[-1]}, index at {index_offset}"
        )
    dictionary = section[_DICT_LENGTH.size :]
    return _Layout(size, chunk_size, tuple(offsets), tuple(d for _, _, d in entries), bytes(zero),
                   Codec(dictionary, _DIGEST_SIZE))  # fmt: skip
