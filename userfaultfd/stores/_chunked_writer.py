"""Writing a content-addressed pack (see _chunked.py): the new pages into bundles, each with
its manifest, then the index (format in _chunked_index.py).

Bundle manifest ``bundles/<name>.pages`` (for writers; readers never fetch it)::

    header   24 bytes   magic b"UFFDCMF1", u16 version (1), u16 flags (0), u32 page size,
                        u32 frame count, u32 page count
    frames   24 bytes   per frame, in bundle order (frame 0 at offset 0, the next where it ends):
                        u32 compressed length, u32 uncompressed length, blake2b-128 of the
                        uncompressed frame
    pages    16 bytes   per page, frame by frame, slot by slot: blake2b-128 of the page
    trailer  24 bytes   blake2b-128 of everything before it, magic b"UFFDMEND"

A writer reads every manifest whose bundle is listed (written after its bundle, so a manifest
always has one) and reuses a page it finds there by naming its frame and slot.
"""

from __future__ import annotations

import errno
import itertools
import struct
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .._location import is_http
from ._base import Store, StoreError
from ._chunked_index import (
    HASH_SIZE,
    MAX_FRAME,
    NAME_SIZE,
    PREFIX,
    TRAILER,
    Frame,
    index_bytes,
    split_location,
)
from ._chunks import MAX_CHUNK_SIZE, Codec, PackInfo, digest, is_zero, read_chunks
from ._objects import Objects, open_objects

__all__ = ["page_size_for", "write_chunked"]

_MANIFEST_MAGIC = b"UFFDCMF1"
_MANIFEST_END = b"UFFDMEND"
_MANIFEST_SUFFIX = ".pages"
_MANIFEST_HEADER = struct.Struct("<8sHHIII")
_MANIFEST_FRAME = struct.Struct("<II16s")
_PAGE = 4096
_BUNDLE_SIZE = 4 << 20  # a bundle is uploaded once its frames pass this many bytes

assert _MANIFEST_HEADER.size == 24 and _MANIFEST_FRAME.size == 24


def page_size_for(chunk_size: int) -> int:
    """The unit of deduplication for packs of ``chunk_size`` chunks: 4 KiB, or the whole chunk
    when the chunk size is not a multiple of it."""
    return _PAGE if chunk_size % _PAGE == 0 else chunk_size


def _manifest(page_size: int, frames: list[Frame], pages: list[bytes]) -> bytes:
    out = bytearray(_MANIFEST_HEADER.pack(_MANIFEST_MAGIC, 1, 0, page_size, len(frames),
                                          len(pages)))  # fmt: skip
    for frame in frames:
        out += _MANIFEST_FRAME.pack(frame.length, frame.raw, frame.hashed)
    out += b"".join(pages)
    out += TRAILER.pack(digest(out, 16), _MANIFEST_END)
    return bytes(out)


def _read_manifest(
    data: bytes, name: str, bundle: int, bundle_size: int, page_size: int
) -> list[tuple[bytes, Frame, int]] | None:
    """(page hash, frame, slot) for every page in bundle ``name`` (numbered ``bundle``), or None
    when it was written for another page size. A manifest that does not check out is a
    StoreError: a page reused on its word would be served as another page's bytes."""
    what = f"bundle manifest {name}{_MANIFEST_SUFFIX}"
    if len(data) < _MANIFEST_HEADER.size + TRAILER.size:
        raise StoreError(errno.EIO, f"{what}: corrupt: {len(data)} bytes")
    magic, version, flags, size, count, pages = _MANIFEST_HEADER.unpack_from(data)
    check, end = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if (magic, version, flags, end) != (_MANIFEST_MAGIC, 1, 0, _MANIFEST_END) or check != digest(
        data[: -TRAILER.size], 16
    ):
        raise StoreError(errno.EIO, f"{what}: corrupt: it does not match its trailer's digest")
    if size != page_size:
        return None
    frames_at = _MANIFEST_HEADER.size
    pages_at = frames_at + count * _MANIFEST_FRAME.size
    if len(data) != pages_at + pages * HASH_SIZE + TRAILER.size:
        raise StoreError(
            errno.EIO, f"{what}: corrupt: {len(data)} bytes for {count} frames, {pages} pages"
        )
    found = []
    offset = 0
    hashes = (data[pages_at + k * HASH_SIZE : pages_at + (k + 1) * HASH_SIZE]
              for k in range(pages))  # fmt: skip
    for length, raw, hashed in _MANIFEST_FRAME.iter_unpack(data[frames_at:pages_at]):
        if not 0 < raw <= MAX_CHUNK_SIZE or not 0 < length <= MAX_FRAME:
            raise StoreError(errno.EIO, f"{what}: corrupt: a frame of {length} bytes for {raw}")
        frame = Frame(bundle, offset, length, raw, hashed)
        for slot in range(-(-raw // page_size)):
            page_hash = next(hashes, None)
            if page_hash is None:
                raise StoreError(
                    errno.EIO, f"{what}: corrupt: its frames hold more than {pages} pages"
                )
            found.append((page_hash, frame, slot))
        offset += length
    if len(found) != pages or offset != bundle_size:
        raise StoreError(
            errno.EIO,
            f"{what}: corrupt: {len(found)} pages in {offset} bytes of frames; it says {pages}"
            f" pages, and the bundle has {bundle_size} bytes",
        )
    return found


def _known_pages(
    bundles: Objects, page_size: int, names: list[str]
) -> dict[bytes, tuple[Frame, int]]:
    """Page hash -> (frame, slot) of every page the manifests in ``bundles`` list; the bundles'
    names are appended to ``names`` (a frame's ``bundle`` numbers them)."""
    listed = bundles.sizes()  # one listing, rather than a question per page
    manifests = sorted(n for n in listed if n.endswith(_MANIFEST_SUFFIX)
                       and n.removesuffix(_MANIFEST_SUFFIX) in listed)  # fmt: skip
    known: dict[bytes, tuple[Frame, int]] = {}
    with ThreadPoolExecutor(max_workers=bundles.parallel_reads) as pool:
        fetched = pool.map(bundles.get, manifests)
        for manifest, data in zip(manifests, fetched, strict=True):
            name = manifest.removesuffix(_MANIFEST_SUFFIX)
            found = _read_manifest(data, name, len(names), listed[name], page_size)
            if found is None:
                continue
            names.append(name)
            for page_hash, frame, slot in found:
                known.setdefault(page_hash, (frame, slot))
    return known


class _Bundles:
    """The bundle being filled, and the uploads of the ones already full."""

    def __init__(self, objects: Objects, names: list[str], page_size: int) -> None:
        self._objects = objects
        self._names = names
        self._page_size = page_size
        self._workers = objects.parallel_reads
        self._pool = ThreadPoolExecutor(max_workers=self._workers)
        self._pending: deque[Future[None]] = deque()
        self._start()
        #: Bytes of bundles and manifests written.
        self.written = 0

    def _start(self) -> None:
        self._data = bytearray()
        self._frames: list[Frame] = []
        self._pages: list[bytes] = []
        self._number = len(self._names)
        self._names.append("")  # named when full: its name is its hash

    def add(self, frame: bytes, raw: bytes, page_hashes: list[bytes]) -> Frame:
        made = Frame(self._number, len(self._data), len(frame), len(raw), digest(raw, 16))
        self._data += frame
        self._frames.append(made)
        self._pages += page_hashes
        if len(self._data) >= _BUNDLE_SIZE:
            self.flush()
        return made

    def flush(self) -> None:
        """Upload the bundle being filled (if it has a frame), then its manifest."""
        if not self._frames:
            return
        data = bytes(self._data)
        name = digest(data, NAME_SIZE).hex()
        manifest = _manifest(self._page_size, self._frames, self._pages)
        self._names[self._number] = name
        self.written += len(data) + len(manifest)

        def upload() -> None:
            self._objects.put(name, data)
            self._objects.put(name + _MANIFEST_SUFFIX, manifest)  # after: it vouches for it

        self._pending.append(self._pool.submit(upload))
        # parallel_reads uploads at a time, one request each; at most that many more wait.
        while len(self._pending) > 2 * self._workers or (self._pending and self._pending[0].done()):
            self._pending.popleft().result()  # the first failure ends the pack
        self._start()

    def finish(self) -> None:
        self.flush()
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
    if is_http(dest):
        raise ValueError(f"{dest}: HTTP is read-only; write the pack locally or to S3")
    parent, name = split_location(dest)
    if not name:
        raise ValueError(f"{dest!r} does not name an index (e.g. DIR/image.index)")
    page_size = page_size_for(chunk_size)
    objects = open_objects(f"{parent}/{PREFIX}", options)
    here = open_objects(parent, options)
    names: list[str] = []
    try:
        known = _known_pages(objects, page_size, names)
        bundles = _Bundles(objects, names, page_size)
        try:
            compressor = Codec(b"", HASH_SIZE).compressor(level)
            zeros = bytes(chunk_size)
            frames: dict[Frame, int] = {}  # this index's frame numbers, in order of first use
            page_frame, page_slot, zero_pages = array("q"), array("I"), bytearray()
            zero_chunks = 0
            for chunk in read_chunks(store, chunk_size, progress):
                if is_zero(chunk, zeros):
                    count = -(-len(chunk) // page_size)
                    page_frame.extend(itertools.repeat(-1, count))
                    page_slot.extend(itertools.repeat(0, count))
                    zero_pages += b"\1" * count
                    zero_chunks += 1
                    continue
                new: list[memoryview] = []
                new_hashes: list[bytes] = []
                refs: list[tuple[Frame, int] | int | None] = []  # None: zero; int: new slot
                group: dict[bytes, int] = {}
                for start in range(0, len(chunk), page_size):
                    page = chunk[start : start + page_size]
                    if is_zero(page, zeros):
                        refs.append(None)
                        continue
                    hashed = digest(page, HASH_SIZE)
                    ref: tuple[Frame, int] | int | None = known.get(hashed, group.get(hashed))
                    if ref is None:
                        ref = group[hashed] = len(new)
                        new.append(page)
                        new_hashes.append(hashed)
                    refs.append(ref)
                made: Frame | None = None
                if new:
                    raw = b"".join(new)
                    made = bundles.add(compressor.compress(raw), raw, new_hashes)
                    for slot, hashed in enumerate(new_hashes):
                        known[hashed] = (made, slot)
                for ref in refs:
                    if ref is None:
                        page_frame.append(-1)
                        page_slot.append(0)
                        zero_pages.append(1)
                        continue
                    frame, slot = (made, ref) if isinstance(ref, int) else ref
                    assert frame is not None
                    page_frame.append(frames.setdefault(frame, len(frames)))
                    page_slot.append(slot)
                    zero_pages.append(0)
            bundles.finish()
        finally:
            bundles.close()
        index = index_bytes(store.size, chunk_size, page_size, names, frames, page_frame, page_slot,
                       zero_pages)  # fmt: skip
        here.put(name, index)  # last: an index only ever names bundles that are there
    finally:
        objects.close()
        here.close()
    return PackInfo(
        path=dest,
        size=store.size,
        packed_size=sum(frame.length for frame in frames) + len(index),
        chunk_size=chunk_size,
        chunks=-(-store.size // chunk_size),
        level=level,
        zero_chunks=zero_chunks,
        unique_bytes=bundles.written + len(index),
        dictionary=0,
        layout="chunks",
    )
