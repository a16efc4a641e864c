"""What both pack layouts share: cutting a source into chunks, zero chunks, the dictionary, and
decoding a chunk with its hash checked.

Threads: a reader's :meth:`Codec.decode` runs in as many threads as the handler reads with. A
zstd decompressor object is not safe to share between threads, so each thread gets its own
(``threading.local``); the dictionary they decompress with is immutable. Nothing here keeps a
scratch buffer between calls.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Literal

import zstandard

from ._base import Store, StoreError

__all__ = ["Codec", "PackInfo", "digest", "read_chunks", "train"]

MAX_CHUNK_SIZE = 1 << 30  # a frame length must fit an index's u32 even if incompressible
_READ_SPAN = 8 << 20  # the source is read this many bytes at a time at most
_SAMPLE_BUDGET = 100  # a dictionary is trained on up to this many times its size of samples

Layout = Literal["file", "chunks"]


def digest(data: bytes | bytearray | memoryview, size: int) -> bytes:
    """blake2b of ``data``, ``size`` bytes long."""
    return hashlib.blake2b(data, digest_size=size).digest()


@dataclasses.dataclass(frozen=True, slots=True)
class PackInfo:
    """What :func:`pack` wrote."""

    #: The pack file, or the index of a ``layout="chunks"`` pack.
    path: str
    #: Uncompressed size in bytes.
    size: int
    #: Bytes a reader of the whole pack would fetch: header, frames, index (and dictionary).
    packed_size: int
    chunk_size: int
    chunks: int
    level: int
    #: Chunks stored without a frame because they are all zero.
    zero_chunks: int = 0
    #: Bytes this pack wrote: all of ``packed_size`` for a file; for ``layout="chunks"``, the
    #: frames of the pages that were not in the directory already (in new bundles), the
    #: bundles' manifests, and the index.
    unique_bytes: int = 0
    #: Size of the zstd dictionary stored in the pack (0: none).
    dictionary: int = 0
    layout: Layout = "file"

    @property
    def ratio(self) -> float:
        """Uncompressed size over packed size (above 1 means it shrank)."""
        return self.size / self.packed_size if self.packed_size else 0.0


def check_arguments(chunk_size: int, level: int, dictionary: int) -> None:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk size {chunk_size} is out of range: 1 .. {MAX_CHUNK_SIZE}")
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise ValueError(
            f"compression level {level} is out of range: 1 .. {zstandard.MAX_COMPRESSION_LEVEL}"
        )
    if dictionary != 0 and not 256 <= dictionary <= 1 << 24:
        raise ValueError(f"dictionary size {dictionary} is out of range: 0 (none) or 256 .. 16M")


def is_zero(chunk: memoryview, zeros: bytes) -> bool:
    """Whether ``chunk`` is all zero (``zeros`` at least as long). A copy and a memcmp: 50x
    faster than comparing the memoryview itself, which goes item by item."""
    return chunk.tobytes() == zeros[: len(chunk)]


def read_chunks(
    store: Store, chunk_size: int, progress: Callable[[int, int], None] | None
) -> Iterator[memoryview]:
    """The chunks of ``store`` in order (the last may be short), read many at a time: a Store
    read may be a network round trip. Each view is valid until the next one is asked for."""
    size = store.size
    # Every span but the last is a whole number of chunks, so chunks never straddle two reads.
    span = bytearray(min(size, max(1, _READ_SPAN // chunk_size) * chunk_size))
    done = 0
    if progress is not None:
        progress(0, size)
    while done < size:
        want = min(len(span), size - done)
        view = memoryview(span)[:want]
        got = store.read_into(done, view)
        if got != want:
            raise StoreError(errno.EIO, f"source ended at {done + got} bytes, its size said {size}")
        for start in range(0, want, chunk_size):
            chunk = view[start : start + chunk_size]
            yield chunk
            done += len(chunk)
            if progress is not None:
                progress(done, size)


def train(store: Store, chunk_size: int, dict_size: int, level: int) -> bytes:
    """A zstd dictionary of ``dict_size`` bytes trained on chunks spread evenly over ``store``
    (zero chunks left out), or b"" when there is too little to train on."""
    count = -(-store.size // chunk_size)
    if count == 0:
        return b""
    zeros = bytes(chunk_size)
    budget = _SAMPLE_BUDGET * dict_size
    # Samples of at most 16 KiB each from evenly spaced chunks: many samples train better
    # than few long ones, and a small chunk is compressed alone, much like a sample.
    sample = min(chunk_size, 16 << 10)
    picks = min(count, max(1, budget // sample))
    samples: list[bytes | bytearray | memoryview] = []
    for k in range(picks):
        i = k * count // picks
        buffer = bytearray(min(sample, store.size - i * chunk_size))
        got = store.read_into(i * chunk_size, memoryview(buffer))
        if got != len(buffer):
            raise StoreError(errno.EIO, f"source ended at {i * chunk_size + got} bytes")
        if not is_zero(memoryview(buffer), zeros):
            samples.append(bytes(buffer))
    if len(samples) < 8:
        return b""
    try:
        trained = zstandard.train_dictionary(dict_size, samples, level=level, steps=4)
    except zstandard.ZstdError:
        return b""  # not enough variety to learn from: the pack goes without
    return trained.as_bytes()


class Codec:
    """Compression of a pack's chunks (with its dictionary, if any) and the checked decoding."""

    def __init__(self, dictionary: bytes, digest_size: int) -> None:
        self.dictionary = dictionary
        self.digest_size = digest_size
        self._dict = zstandard.ZstdCompressionDict(dictionary) if dictionary else None
        self._local = threading.local()

    def compressor(self, level: int) -> zstandard.ZstdCompressor:
        """A compressor for one writer (not shared between threads)."""
        if self._dict is None:
            return zstandard.ZstdCompressor(level=level, write_checksum=False)
        return zstandard.ZstdCompressor(level=level, dict_data=self._dict, write_checksum=False)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        made: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if made is None:
            if self._dict is None:
                made = zstandard.ZstdDecompressor()
            else:
                made = zstandard.ZstdDecompressor(dict_data=self._dict)
            self._local.d = made
        return made

    def decode(self, frame: bytes | memoryview, length: int, expected: bytes, what: str) -> bytes:
        """The ``length`` bytes in ``frame``, whose hash must be ``expected``; else StoreError
        naming ``what`` ("pack chunk 3 (bytes 196608..)")."""
        try:
            # max_output_size bounds a frame that does not declare its size; one that does is
            # decompressed into a buffer of the declared size, so a corrupt header declaring
            # terabytes would raise MemoryError: check the declaration first.
            declared = zstandard.frame_content_size(frame)
            if declared not in (length, -1):
                raise StoreError(
                    errno.EIO,
                    f"{what}: corrupt: its frame declares {declared} bytes, the chunk has {length}",
                )
            data = self._decompressor().decompress(frame, max_output_size=length)
        except zstandard.ZstdError as err:
            raise StoreError(errno.EIO, f"{what}: corrupt: {err}") from err
        if len(data) != length or digest(data, self.digest_size) != expected:
            raise StoreError(errno.EIO, f"{what}: corrupt: hash mismatch")
        return data
