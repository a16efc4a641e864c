"""Packs for random access: zero chunks, the dictionary, content-addressed packs, the chunk cache,
and reads from many threads."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import os
import random
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import fsspec
import pytest
import zstandard

from tests.stores._checks import CountingStore, assert_range
from tests.stores.conftest import S3, Served
from userfaultfd.stores import (
    BytesStore,
    ChunkCache,
    ChunkedStore,
    FileStore,
    Store,
    StoreError,
    ZstdStore,
    open_store,
    pack,
)

PAGE = 4096
CHUNK = 16 << 10
HEADER, FOOTER, ENTRY = 32, 40, 28


def image(size: int, seed: int, zero_chunks: tuple[int, ...] = (), chunk: int = CHUNK) -> bytes:
    """Position-dependent bytes with no zero page, like a memory image: records that name their
    own offset, and text; all zero only in the chunks ``zero_chunks``."""
    rng = random.Random(seed)
    words = [rng.randbytes(6).hex() for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        if (len(out) // 8192) % 2:
            out += " ".join(rng.choice(words) for _ in range(200)).encode()
        else:
            for _ in range(256):
                out += struct.pack("<QI", len(out) + 1, seed | 1)
    data = bytearray(out[:size])
    for i in zero_chunks:
        data[i * chunk : (i + 1) * chunk] = bytes(len(data[i * chunk : (i + 1) * chunk]))
    for offset in range(0, size, PAGE):  # the point of the helper: zeros only where asked
        page = data[offset : offset + PAGE]
        assert any(page) or offset // chunk in zero_chunks, f"an accidental zero page at {offset}"
    return bytes(data)


# --- zero chunks ---------------------------------------------------------------------------------

# 10 chunks and 1000 bytes: chunks 2, 3, 7 and the short last one (10) are zero.
ZEROED = image(10 * CHUNK + 1000, seed=3, zero_chunks=(2, 3, 7, 10))


@pytest.fixture
def zero_pack(tmp_path: Path) -> Path:
    info = pack(BytesStore(ZEROED), tmp_path / "z.pack", chunk_size=CHUNK)
    assert (info.chunks, info.zero_chunks) == (11, 4), "zero chunks were not found"
    return tmp_path / "z.pack"


def test_zero_chunks_have_no_frame_and_mark_the_format(zero_pack: Path) -> None:
    raw = zero_pack.read_bytes()
    version, flags = struct.unpack_from("<HH", raw, 8)
    assert (version, flags) == (2, 1), "a pack with zero chunks must be version 2, flag 1"
    index, count = struct.unpack_from("<QQ", raw, len(raw) - FOOTER)
    lengths = [struct.unpack_from("<QI", raw, index + i * ENTRY)[1] for i in range(count)]
    assert [i for i, n in enumerate(lengths) if n == 0] == [2, 3, 7, 10]


def test_zero_chunks_are_served_without_a_read(zero_pack: Path) -> None:
    raw = CountingStore(FileStore(zero_pack))
    with ZstdStore(raw) as store:
        assert store.zero_chunks == 4
        opened = len(raw.reads)
        assert_range(store, ZEROED, 2 * CHUNK, 2 * CHUNK)  # chunks 2 and 3
        assert_range(store, ZEROED, 7 * CHUNK + 5, 100)
        assert_range(store, ZEROED, 10 * CHUNK, PAGE)  # the short last chunk, and past the end
        assert raw.reads[opened:] == [], "a zero chunk was read from the raw store"
        assert_range(store, ZEROED, 0, len(ZEROED))
        assert len(raw.reads) == opened + 1, "the non-zero chunks come in one raw read"


def test_known_zero(zero_pack: Path) -> None:
    with ZstdStore(FileStore(zero_pack)) as store:
        assert store.known_zero(2 * CHUNK, 2 * CHUNK)
        assert store.known_zero(7 * CHUNK + PAGE, PAGE)
        assert store.known_zero(10 * CHUNK, PAGE), "the last page: its bytes in the store are zero"
        assert not store.known_zero(2 * CHUNK, 2 * CHUNK + 1), "reaches into chunk 4"
        assert not store.known_zero(CHUNK, PAGE)
        assert not store.known_zero(len(ZEROED), PAGE), "past the end nothing is known"
        assert not store.known_zero(2 * CHUNK, 0)
        with pytest.raises(StoreError, match="negative"):
            store.known_zero(-1, PAGE)


def test_a_pack_without_zero_chunks_is_still_version_1(tmp_path: Path) -> None:
    data = image(5 * CHUNK, seed=4)
    pack(BytesStore(data), tmp_path / "p", chunk_size=CHUNK)
    assert struct.unpack_from("<HH", (tmp_path / "p").read_bytes(), 8) == (1, 0)


def test_an_all_zero_source_is_header_index_and_footer(tmp_path: Path) -> None:
    info = pack(BytesStore(bytes(3 * CHUNK)), tmp_path / "p", chunk_size=CHUNK)
    assert info.packed_size == HEADER + 3 * ENTRY + FOOTER
    with ZstdStore(FileStore(tmp_path / "p")) as store:
        assert_range(store, bytes(3 * CHUNK), 0, 3 * CHUNK)


def _reseal(raw: bytearray) -> None:
    """Recompute the footer's digest over header + index (version 1 and 2 without dictionary)."""
    import hashlib

    index, count = struct.unpack_from("<QQ", raw, len(raw) - FOOTER)
    body = bytes(raw[:HEADER]) + bytes(raw[index : index + count * ENTRY])
    struct.pack_into("<16s", raw, len(raw) - 24, hashlib.blake2b(body, digest_size=16).digest())


def test_a_frameless_chunk_must_carry_the_hash_of_zeros(zero_pack: Path) -> None:
    raw = bytearray(zero_pack.read_bytes())
    index, _ = struct.unpack_from("<QQ", raw, len(raw) - FOOTER)
    raw[index + 2 * ENTRY + 12] ^= 1  # chunk 2's hash
    _reseal(raw)
    with pytest.raises(StoreError, match="corrupt pack index: chunk 2 has no frame"):
        ZstdStore(BytesStore(bytes(raw)))


def test_a_frameless_chunk_without_the_flag_is_refused(zero_pack: Path) -> None:
    raw = bytearray(zero_pack.read_bytes())
    struct.pack_into("<HH", raw, 8, 1, 0)  # claim version 1, which has no zero chunks
    _reseal(raw)
    with pytest.raises(StoreError, match="chunk 2 has no frame"):
        ZstdStore(BytesStore(bytes(raw)))


# --- the dictionary ------------------------------------------------------------------------------


def test_a_dictionary_makes_small_chunks_smaller_and_reads_back(tmp_path: Path) -> None:
    data = image(256 * PAGE, seed=5)
    plain = pack(BytesStore(data), tmp_path / "plain", chunk_size=PAGE)
    info = pack(BytesStore(data), tmp_path / "dict", chunk_size=PAGE, dictionary=4096)
    assert 0 < info.dictionary <= 4096
    # Measured: 160 KB against 202 KB, the dictionary included.
    assert info.packed_size < plain.packed_size * 0.85, (
        f"a dictionary saved too little: {info.packed_size} vs {plain.packed_size}"
    )
    raw = (tmp_path / "dict").read_bytes()
    assert struct.unpack_from("<HH", raw, 8) == (2, 2)
    with ZstdStore(FileStore(tmp_path / "dict")) as store:
        assert store.dictionary == info.dictionary
        assert_range(store, data, 0, len(data))
        assert_range(store, data, 5 * PAGE + 7, 3 * PAGE)


def test_a_corrupted_dictionary_fails_at_open(tmp_path: Path) -> None:
    data = image(64 * PAGE, seed=6)
    pack(BytesStore(data), tmp_path / "d", chunk_size=PAGE, dictionary=4096)
    raw = bytearray((tmp_path / "d").read_bytes())
    raw[HEADER + 4 + 100] ^= 1
    with pytest.raises(StoreError, match="does not match the footer's digest"):
        ZstdStore(BytesStore(bytes(raw)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dictionary": 100}, "dictionary size 100 is out of range"),
        ({"dictionary": 4096, "layout": "chunks"}, "a dictionary is for layout='file' only"),
        ({"layout": "tar"}, "layout 'tar' is not one of"),
    ],
)
def test_bad_pack_options(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack(BytesStore(b"abc"), tmp_path / "p", **kwargs)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


# --- content-addressed packs ---------------------------------------------------------------------

SOURCE = image(256 * CHUNK, seed=8, zero_chunks=(10, 11, 200))  # 4 MiB, 1024 pages
PAGES_PER_CHUNK = CHUNK // PAGE


@dataclasses.dataclass(frozen=True)
class Index:
    """A version 2 index as the format in stores/_chunked.py describes it, parsed here again."""

    size: int
    page_size: int
    bundles: list[str]
    frame_bundle: list[int]
    frame_offset: list[int]
    frame_length: list[int]
    frame_raw: list[int]
    frame_hash: list[bytes]
    zero: bytes
    page_frame: list[int]
    page_slot: list[int]

    def frame_of(self, page: int) -> tuple[str, int, int, bytes]:
        """(bundle name, offset, length, hash) of the frame holding ``page``."""
        f = self.page_frame[page]
        name = self.bundles[self.frame_bundle[f]]
        return name, self.frame_offset[f], self.frame_length[f], self.frame_hash[f]


def read_index(path: Path) -> Index:
    raw = path.read_bytes()
    magic, version, flags, _, size, page, bundles, frames, prefix, packed = struct.unpack_from(
        "<8sHHIQIIIII", raw
    )
    assert (magic, version, flags) == (b"UFFDCIX1", 2, 0), "not a version 2 index"
    assert len(raw) == 44 + packed + 24 and raw[-8:] == b"UFFDCEND"
    body = zstandard.ZstdDecompressor().decompress(raw[44 : 44 + packed])
    assert body[:prefix] == b"bundles/"
    at = prefix

    def take(code: str, n: int) -> list[int]:
        nonlocal at
        values = list(struct.unpack_from(f"<{n}{code}", body, at))
        at += n * struct.calcsize(code)
        return values

    names = [body[at + 32 * k : at + 32 * (k + 1)].hex() for k in range(bundles)]
    at += 32 * bundles
    frame_bundle, frame_offset = take("I", frames), take("Q", frames)
    frame_length, frame_raw = take("I", frames), take("I", frames)
    hashes = [body[at + 16 * k : at + 16 * (k + 1)] for k in range(frames)]
    at += 16 * frames
    pages = -(-size // page)
    zero = body[at : at + pages]
    at += pages
    page_frame = list(itertools.accumulate(take("i", pages)))
    page_slot = take("I", pages)
    assert at == len(body)
    return Index(size, page, names, frame_bundle, frame_offset, frame_length, frame_raw, hashes,
                 zero, page_frame, page_slot)  # fmt: skip


def scattered(data: bytes, seed: int, fraction: float = 0.05) -> tuple[bytes, list[int]]:
    """``data`` with a seeded ``fraction`` of its non-zero pages rewritten one by one, scattered
    (position-dependent new bytes, never zero); and those pages, in order."""
    rng = random.Random(seed)
    live = [p for p in range(len(data) // PAGE) if any(data[p * PAGE : (p + 1) * PAGE])]
    pages = sorted(rng.sample(live, int(len(data) // PAGE * fraction)))
    out = bytearray(data)
    for p in pages:
        # image() marks its records with seed | 1: odd seeds, or neighbours would be equal.
        out[p * PAGE : (p + 1) * PAGE] = image(PAGE, seed=seed * 100_000 + 2 * p + 1)
    return bytes(out), pages


def _bundles(directory: Path) -> set[str]:
    return set(os.listdir(directory / "bundles"))


def _manifest_size(frames: int, pages: int) -> int:
    return 24 + 24 * frames + 16 * pages + 24


def test_scattered_changes_upload_their_pages_and_the_index(tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = pack(BytesStore(SOURCE), out / "a.index", chunk_size=CHUNK, layout="chunks")
    assert (a.layout, a.chunks, a.zero_chunks) == ("chunks", 256, 3)
    assert a.unique_bytes == a.packed_size + _manifest_size(253, 253 * PAGES_PER_CHUNK), (
        "the first pack writes every frame, one manifest, and the index"
    )
    before = _bundles(out)
    source_b, changed = scattered(SOURCE, seed=9)
    assert len(changed) == 51  # 5% of 1024 pages, in 45 of the 256 chunks
    b = pack(BytesStore(source_b), out / "b.index", chunk_size=CHUNK, layout="chunks")
    # What B must write, computed here: per chunk with changed pages, one frame of them.
    groups: dict[int, list[int]] = {}
    for p in changed:
        groups.setdefault(p // PAGES_PER_CHUNK, []).append(p)
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=False)
    frames = [
        compressor.compress(b"".join(source_b[p * PAGE : (p + 1) * PAGE] for p in pages))
        for pages in groups.values()
    ]
    new = _bundles(out) - before
    bundle = next(n for n in new if not n.endswith(".pages"))
    assert new == {bundle, bundle + ".pages"}, f"pack B wrote {sorted(new)}"
    assert (out / "bundles" / bundle).read_bytes() == b"".join(frames), (
        "the new bundle is not the changed pages' frames, chunk by chunk"
    )
    index_size = (out / "b.index").stat().st_size
    expected = sum(map(len, frames)) + _manifest_size(len(frames), len(changed)) + index_size
    assert b.unique_bytes == expected
    assert b.unique_bytes <= 0.10 * a.unique_bytes, (
        f"pack B wrote {b.unique_bytes} bytes, {b.unique_bytes / a.unique_bytes:.1%} of A's"
    )
    index = read_index(out / "b.index")
    for p in range(len(SOURCE) // PAGE):  # every unchanged page is A's, every changed one new
        name = index.frame_of(p)[0] if not index.zero[p] else None
        if p in changed:
            assert name == bundle, f"changed page {p} is in {name}, not the new bundle"
        elif any(SOURCE[p * PAGE : (p + 1) * PAGE]):
            assert name is not None and name != bundle, f"unchanged page {p} was stored again"
    for name, data in (("a", SOURCE), ("b", source_b)):
        with open_store(out / f"{name}.index") as store:
            assert isinstance(store, ChunkedStore) and store.size == len(data)
            assert_range(store, data, 0, len(data))


def test_a_sequential_read_coalesces_and_a_random_page_fetches_its_frame(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pack(BytesStore(SOURCE), out / "a.index", chunk_size=CHUNK, layout="chunks")
    source_b, changed = scattered(SOURCE, seed=12)
    pack(BytesStore(source_b), out / "b.index", chunk_size=CHUNK, layout="chunks")
    index = read_index(out / "b.index")
    with ChunkedStore(out / "b.index", cache_chunks=1) as store:
        assert_range(store, source_b, 0, len(source_b))
        assert store.fetches == 2, "the whole pack: one GET from each of its two bundles"
    with ChunkedStore(out / "b.index", cache_chunks=1) as store:
        for p in (changed[3], changed[3] + 1 if changed[3] % 4 < 3 else changed[3] - 1, 900):
            fetched = store.fetched_bytes
            assert_range(store, source_b, p * PAGE, PAGE)
            length = index.frame_of(p)[2]
            assert store.fetched_bytes - fetched == length, (
                f"page {p}: fetched {store.fetched_bytes - fetched} bytes, its frame has {length}"
            )
        assert store.fetches == 3


def test_the_same_chunk_twice_in_one_pack_is_one_frame(tmp_path: Path) -> None:
    one = image(CHUNK, seed=10)
    info = pack(BytesStore(one * 5), tmp_path / "x.index", chunk_size=CHUNK, layout="chunks")
    assert len(_bundles(tmp_path)) == 2, "one bundle and its manifest"
    frame = len(zstandard.ZstdCompressor(level=3, write_checksum=False).compress(one))
    index = (tmp_path / "x.index").stat().st_size
    assert info.packed_size == frame + index
    assert info.unique_bytes == frame + _manifest_size(1, PAGES_PER_CHUNK) + index


def test_pages_repeated_across_chunks_are_stored_once(tmp_path: Path) -> None:
    pages = [image(PAGE, seed=21 + 2 * k) for k in range(6)]  # odd: seed | 1 differs
    # Chunk 1 repeats chunk 0's pages 1 and 3 and has one of its own; chunk 2 is all old pages.
    data = b"".join(pages[:4]) + pages[1] + pages[4] + pages[3] + pages[5] + b"".join(pages[:4])
    pack(BytesStore(data), tmp_path / "r.index", chunk_size=CHUNK, layout="chunks")
    index = read_index(tmp_path / "r.index")
    assert index.frame_raw == [4 * PAGE, 2 * PAGE], "chunk 1's frame has its 2 new pages only"
    assert (index.page_frame, index.page_slot) == (
        [0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0],
        [0, 1, 2, 3, 1, 0, 3, 1, 0, 1, 2, 3],
    )
    with open_store(tmp_path / "r.index") as store:
        assert_range(store, data, 0, len(data))


def test_zero_pages_fetch_nothing(tmp_path: Path) -> None:
    data = bytearray(image(8 * CHUNK, seed=13))
    zero_pages = (1, 2, 9, 31)  # inside chunks that also hold data
    for p in zero_pages:
        data[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
    pack(BytesStore(bytes(data)), tmp_path / "z.index", chunk_size=CHUNK, layout="chunks")
    assert read_index(tmp_path / "z.index").frame_raw[0] == 2 * PAGE, "zeros are not in a frame"
    with ChunkedStore(tmp_path / "z.index") as store:
        assert store.zero_chunks == 0
        assert store.known_zero(PAGE, 2 * PAGE)
        assert store.known_zero(9 * PAGE, PAGE) and store.known_zero(31 * PAGE, PAGE)
        assert not store.known_zero(0, 2 * PAGE), "page 0 holds data"
        for p in zero_pages:
            assert_range(store, bytes(data), p * PAGE, PAGE)
        assert store.fetches == 0, "a zero page was fetched"
        assert_range(store, bytes(data), 0, len(data))


def test_a_content_addressed_pack_over_s3(s3: S3) -> None:
    prefix = "s3://test/cas"
    a = pack(BytesStore(SOURCE), f"{prefix}/a.index", chunk_size=CHUNK, layout="chunks",
             **s3.options)  # fmt: skip
    source_b, _ = scattered(SOURCE, seed=11)
    b = pack(BytesStore(source_b), f"{prefix}/b.index", chunk_size=CHUNK, layout="chunks",
             **s3.options)  # fmt: skip
    assert a.unique_bytes > a.packed_size, "the first pack also writes its manifest"
    assert b.unique_bytes <= 0.10 * a.unique_bytes
    with open_store(f"{prefix}/b.index", **s3.options) as store:
        assert isinstance(store, ChunkedStore)
        assert store.parallel_reads == 16, "bundles over S3: many requests in flight"
        assert_range(store, source_b, 0, len(source_b) // 4)
        assert_range(store, source_b, len(source_b) - 2 * CHUNK - 5, 3 * CHUNK)
    with ChunkedStore(f"{prefix}/a.index", **s3.options) as store:
        assert_range(store, SOURCE, 3 * CHUNK - 10, 5 * CHUNK)


def test_a_content_addressed_pack_over_memory_and_http(tmp_path: Path, served: Served) -> None:
    url = f"memory://cas-{os.getpid()}/packs/m.index"
    try:
        info = pack(BytesStore(SOURCE), url, chunk_size=CHUNK, layout="chunks")
        assert info.unique_bytes > info.packed_size
        with open_store(url) as store:
            assert isinstance(store, ChunkedStore)
            assert_range(store, SOURCE, CHUNK * 9, CHUNK * 4)
    finally:
        fsspec.filesystem("memory").rm(f"memory://cas-{os.getpid()}", recursive=True)
    pack(BytesStore(SOURCE), served.root / "cas-http" / "h.index", chunk_size=CHUNK,
         layout="chunks")  # fmt: skip
    with open_store(served.url("cas-http/h.index")) as store:
        assert isinstance(store, ChunkedStore) and store.parallel_reads == 16
        assert_range(store, SOURCE, 0, len(SOURCE))
    with pytest.raises(ValueError, match="HTTP is read-only"):
        pack(BytesStore(SOURCE), served.url("cas-http/new.index"), layout="chunks")


@pytest.fixture
def cas(tmp_path: Path) -> Path:
    pack(BytesStore(SOURCE), tmp_path / "c.index", chunk_size=CHUNK, layout="chunks")
    return tmp_path


def _frame_file(directory: Path, page: int) -> tuple[Path, int, int]:
    """(bundle path, offset, length) of the frame holding ``page`` in c.index."""
    name, offset, length, _ = read_index(directory / "c.index").frame_of(page)
    return directory / "bundles" / name, offset, length


def test_a_corrupted_frame_is_an_error_naming_the_page(cas: Path) -> None:
    bundle, offset, length = _frame_file(cas, 21)  # chunk 5, pages 20..23
    data = bytearray(bundle.read_bytes())
    data[offset + length // 2] ^= 0x10
    bundle.write_bytes(data)
    with open_store(cas / "c.index") as store:
        assert_range(store, SOURCE, 4 * CHUNK, CHUNK)
        assert_range(store, SOURCE, 6 * CHUNK, CHUNK)
        with pytest.raises(StoreError, match=r"pack page 21 \(bytes 86016\.\.\): frame .*corrupt"):
            store.read_into(21 * PAGE + 100, memoryview(bytearray(PAGE)))


def test_a_swapped_frame_is_a_hash_mismatch(cas: Path) -> None:
    # Same length, another chunk's frame: only the hash can tell.
    bundle, five, length = _frame_file(cas, 20)
    _, six, _ = _frame_file(cas, 24)
    data = bytearray(bundle.read_bytes())
    data[five : five + length] = data[six : six + length]
    bundle.write_bytes(data)
    with (
        open_store(cas / "c.index") as store,
        pytest.raises(StoreError, match=r"pack page 20 .*corrupt"),
    ):
        store.read_into(5 * CHUNK, memoryview(bytearray(PAGE)))


def test_a_missing_bundle_is_enoent(cas: Path) -> None:
    _frame_file(cas, 28)[0].unlink()
    with open_store(cas / "c.index") as store:
        with pytest.raises(StoreError, match="pack page 28 ") as caught:
            store.read_into(28 * PAGE, memoryview(bytearray(PAGE)))
        assert caught.value.errno == errno.ENOENT


def test_over_http_a_short_bundle_is_eio_and_a_missing_one_enoent(served: Served) -> None:
    """The bundles of a pack read over HTTP (stores/_objects.py, by ranged GETs): a bundle
    shorter than the index says is EIO, one that is gone ENOENT, each naming the page."""
    where = served.root / f"cas-broken-{os.getpid()}"
    pack(BytesStore(SOURCE), where / "c.index", chunk_size=CHUNK, layout="chunks")
    bundle, at, _ = _frame_file(where, 28)
    with open_store(served.url(f"{where.name}/c.index")) as store:
        assert_range(store, SOURCE, 28 * PAGE, PAGE)  # whole: read right
        bundle.write_bytes(bundle.read_bytes()[: at + 1])  # page 28's frame cut after a byte
        with pytest.raises(StoreError, match="pack page 28 ") as cut:
            store.reopen().read_into(28 * PAGE, memoryview(bytearray(PAGE)))
        assert cut.value.errno == errno.EIO, str(cut.value)
        bundle.unlink()
        with pytest.raises(StoreError, match="pack page 28 ") as missing:
            store.reopen().read_into(28 * PAGE, memoryview(bytearray(PAGE)))
        assert missing.value.errno == errno.ENOENT, str(missing.value)


def test_a_corrupted_manifest_stops_the_next_pack(cas: Path) -> None:
    (manifest,) = (cas / "bundles").glob("*.pages")
    data = bytearray(manifest.read_bytes())
    data[100] ^= 1
    manifest.write_bytes(data)
    with pytest.raises(StoreError, match=r"bundle manifest .*\.pages: corrupt"):
        pack(BytesStore(SOURCE), cas / "d.index", chunk_size=CHUNK, layout="chunks")
    assert not (cas / "d.index").exists()


def test_a_corrupted_or_cut_index_fails_at_open(cas: Path) -> None:
    raw = (cas / "c.index").read_bytes()
    flipped = bytearray(raw)
    flipped[200] ^= 1
    (cas / "bad.index").write_bytes(flipped)
    with pytest.raises(StoreError, match="does not match its trailer's digest"):
        open_store(cas / "bad.index")
    (cas / "cut.index").write_bytes(raw[:-30])
    with pytest.raises(StoreError, match="not a complete pack index"):
        open_store(cas / "cut.index")


def test_zero_chunks_of_a_content_addressed_pack(cas: Path) -> None:
    with open_store(cas / "c.index") as store:
        assert isinstance(store, ChunkedStore) and store.zero_chunks == 3
        assert store.known_zero(10 * CHUNK, 2 * CHUNK)
        assert not store.known_zero(9 * CHUNK, 2 * CHUNK)
        assert_range(store, SOURCE, 10 * CHUNK, 2 * CHUNK)
        assert store.fetches == 0, "a zero chunk was fetched"


def test_a_version_1_index_is_still_read(tmp_path: Path) -> None:
    """The format before pages were shared: one object per chunk, named by its blake2b-256."""
    data = image(6 * CHUNK + 1000, seed=14, zero_chunks=(2,))
    compressor = zstandard.ZstdCompressor(level=3)
    (tmp_path / "chunks").mkdir()
    entries = b""
    for i in range(0, len(data), CHUNK):
        chunk = data[i : i + CHUNK]
        hashed = hashlib.blake2b(chunk, digest_size=32).digest()
        frame = b"" if not any(chunk) else compressor.compress(chunk)
        if frame:
            (tmp_path / "chunks" / hashed.hex()).write_bytes(frame)
        entries += struct.pack("<I32s", len(frame), hashed)
    body = struct.pack("<8sHHIQQI", b"UFFDCIX1", 1, 0, CHUNK, len(data), 7, 7) + b"chunks/"
    body += entries
    (tmp_path / "old.index").write_bytes(
        body + hashlib.blake2b(body, digest_size=16).digest() + b"UFFDCEND"
    )
    with open_store(tmp_path / "old.index") as store:
        assert isinstance(store, ChunkedStore) and store.zero_chunks == 1
        assert_range(store, data, 0, len(data))
        assert store.fetches == 6
    obj = tmp_path / "chunks" / hashlib.blake2b(data[CHUNK : 2 * CHUNK], digest_size=32).hexdigest()
    obj.write_bytes(obj.read_bytes()[:-1] + b"\0")
    with (
        ChunkedStore(tmp_path / "old.index") as store,
        pytest.raises(StoreError, match=r"pack chunk 1 \(bytes 16384\.\.\): corrupt"),
    ):
        store.read_into(CHUNK + 5, memoryview(bytearray(PAGE)))


# --- the chunk cache -----------------------------------------------------------------------------


def _bundle_gets(served: Served, directory: str) -> int:
    lines = served.server.access_log.read_text().splitlines()
    return sum(1 for line in lines if line.split(" ")[1].startswith(f"/{directory}/bundles/"))


def test_the_cache_spares_requests_across_stores_and_processes(
    tmp_path: Path, served: Served
) -> None:
    name = f"cached-{os.getpid()}"
    pack(BytesStore(SOURCE), served.root / name / "c.index", chunk_size=CHUNK, layout="chunks")
    url = served.url(f"{name}/c.index")
    pages = [3, 100, 101, 500, 777, 1023]  # chunks 0, 25, 125, 194, 255
    cache = ChunkCache(tmp_path / "cache", 64 << 20)
    with open_store(url, cache=cache) as store:
        for p in pages:
            assert_range(store, SOURCE, p * PAGE, PAGE)
    assert _bundle_gets(served, name) == 5, "each chunk's frame should be fetched once"
    # A restarted handler: another process, another cache object over the same directory.
    program = (
        "import sys\n"
        "from userfaultfd.stores import ChunkCache, open_store\n"
        f"store = open_store({url!r}, cache=ChunkCache({str(tmp_path / 'cache')!r}, 64 << 20))\n"
        "buf = bytearray(4096)\n"
        f"for p in {pages!r}:\n"
        "    store.read_into(p * 4096, memoryview(buf))\n"
        "    sys.stdout.buffer.write(buf)\n"
        "assert store.fetches == 0, store.fetches\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60,
                          cwd=Path(__file__).parents[2])  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"".join(SOURCE[p * PAGE : (p + 1) * PAGE] for p in pages)
    assert _bundle_gets(served, name) == 5, "the second process fetched what the cache had"


def test_a_bad_cached_frame_is_fetched_again(cas: Path, tmp_path: Path) -> None:
    cache = ChunkCache(tmp_path / "cache", 64 << 20)
    key = read_index(cas / "c.index").frame_of(16)[3].hex()  # chunk 4's frame
    with ChunkedStore(cas / "c.index", cache=cache) as store:
        assert_range(store, SOURCE, 4 * CHUNK, CHUNK)
        assert store.fetches == 1
    cached = tmp_path / "cache" / key
    good = cached.read_bytes()
    cached.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with ChunkedStore(cas / "c.index", cache=cache) as store:
        assert_range(store, SOURCE, 4 * CHUNK, CHUNK)
        assert store.fetches == 1, "the bad cached copy should have been replaced by a fetch"
    assert cached.read_bytes() == good


def test_the_cache_honours_its_cap(cas: Path, tmp_path: Path) -> None:
    index = read_index(cas / "c.index")
    chunks = range(20, 80)  # 60 chunks, none of them zero
    sizes = [index.frame_of(i * PAGES_PER_CHUNK)[2] for i in chunks]
    cap = sum(sizes[:20])  # room for about 20 of the 60 frames read
    cache = ChunkCache(tmp_path / "cache", cap)
    with ChunkedStore(cas / "c.index", cache=cache) as store:
        for i in chunks:
            assert_range(store, SOURCE, i * CHUNK, PAGE)
            assert cache.size() <= cap, f"cache at {cache.size()} bytes after chunk {i}, cap {cap}"
        assert store.fetches == 60
    kept = set(os.listdir(tmp_path / "cache"))
    assert index.frame_of(79 * PAGES_PER_CHUNK)[3].hex() in kept, "the newest frame was evicted"
    assert index.frame_of(20 * PAGES_PER_CHUNK)[3].hex() not in kept, "the oldest was kept"
    assert len(kept) >= 10, f"only {len(kept)} frames kept: eviction went too far"


# --- many threads ---------------------------------------------------------------------------------


def _hammer(store: Store, data: bytes, threads: int = 8, reads: int = 150) -> None:
    """``threads`` threads reading random ranges at once; every byte checked."""
    errors: list[str] = []
    start = threading.Barrier(threads)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        start.wait()
        for _ in range(reads):
            offset = rng.randrange(0, len(data))
            length = rng.choice([PAGE, 3 * PAGE, CHUNK + 17, 2 * CHUNK])
            buffer = bytearray(length)
            try:
                got = store.read_into(offset, memoryview(buffer))
            except Exception as err:
                errors.append(f"{type(err).__name__}: {err}")
                return
            if bytes(buffer[:got]) != data[offset : offset + length]:
                errors.append(f"wrong bytes at {offset}+{length}")

    workers = [threading.Thread(target=work, args=(s,)) for s in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    assert not any(w.is_alive() for w in workers), "a reader thread hung"
    assert errors == [], errors[:5]


def test_zstd_store_from_8_threads(tmp_path: Path) -> None:
    pack(BytesStore(SOURCE), tmp_path / "p", chunk_size=CHUNK, dictionary=4096)
    with ZstdStore(FileStore(tmp_path / "p"), cache_chunks=2) as store:
        assert store.parallel_reads == 1, "over a local file: the raw store's 1"
        _hammer(store, SOURCE)


def test_chunked_store_with_a_cache_from_8_threads(cas: Path, tmp_path: Path) -> None:
    cap = 40 * CHUNK // 3  # small enough that threads evict while others read
    with open_store(cas / "c.index", cache=ChunkCache(tmp_path / "cache", cap)) as store:
        _hammer(store, SOURCE)


def test_packs_over_http_from_8_threads(http_store: Callable[..., Store], served: Served) -> None:
    raw = http_store(served.url("data.pack"))
    assert raw.parallel_reads == 16
    with ZstdStore(raw, cache_chunks=2) as store:
        assert store.parallel_reads == 16, "a pack over HTTP takes the raw store's value"
        _hammer(store, served.payload, reads=40)
