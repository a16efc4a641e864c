"""pack() and ZstdStore: round trips, edge sizes, corruption, truncation, the chunk cache."""

from __future__ import annotations

import dataclasses
import errno
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.stores._checks import CountingStore, assert_range, ranges
from tests.stores.conftest import make_payload
from userfaultfd.stores import BytesStore, FileStore, PackInfo, StoreError, ZstdStore, pack

DATA = make_payload(300_001, seed=7)
HEADER, FOOTER, ENTRY = 32, 40, 28


def _pack_bytes(tmp_path: Path, data: bytes, chunk_size: int) -> tuple[Path, PackInfo]:
    src = tmp_path / f"src-{chunk_size}"
    src.write_bytes(data)
    info = pack(src, tmp_path / f"out-{chunk_size}.pack", chunk_size=chunk_size)
    return Path(info.path), info


@pytest.fixture(scope="module", params=[4096, 65536, 100_000, 1 << 20])
def packed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 4096 and 65536 do not divide 300_001; 100_000 nearly does (a 1-byte last chunk); 1 MiB is
    # larger than the whole source (one short chunk).
    path, _ = _pack_bytes(tmp_path_factory.mktemp("packs"), DATA, request.param)
    return path


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rng=ranges(len(DATA), 250_000))
def test_zstd_round_trip(packed: Path, rng: tuple[int, int]) -> None:
    with ZstdStore(FileStore(packed), cache_chunks=2) as store:
        assert store.size == len(DATA)
        assert_range(store, DATA, *rng)


@settings(max_examples=60, deadline=None)
@given(rng=ranges(len(DATA), 20_000))
def test_bytes_store_round_trip(rng: tuple[int, int]) -> None:
    assert_range(BytesStore(DATA), DATA, *rng)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rng=ranges(len(DATA), 20_000))
def test_file_store_round_trip(tmp_path: Path, rng: tuple[int, int]) -> None:
    path = tmp_path / "data"
    if not path.exists():
        path.write_bytes(DATA)
    with FileStore(path) as store:
        assert_range(store, DATA, *rng)


def test_every_chunk_boundary_is_crossed_correctly(tmp_path: Path) -> None:
    path, info = _pack_bytes(tmp_path, DATA, 10_000)
    assert info.chunks == 31  # 30 full chunks and one of 1 byte
    with ZstdStore(FileStore(path)) as store:
        for boundary in range(10_000, len(DATA), 10_000):
            assert_range(store, DATA, boundary - 3, 7)
        assert_range(store, DATA, len(DATA) - 1, 4096)
        assert_range(store, DATA, 0, len(DATA) + 4096)


@pytest.mark.parametrize(
    ("size", "chunk_size", "chunks"),
    [(0, 4096, 0), (1, 4096, 1), (8192, 4096, 2), (8193, 4096, 3), (4095, 4096, 1)],
)
def test_pack_sizes(tmp_path: Path, size: int, chunk_size: int, chunks: int) -> None:
    data = make_payload(size, seed=size)
    path, info = _pack_bytes(tmp_path, data, chunk_size)
    assert (info.size, info.chunk_size, info.chunks, info.level) == (size, chunk_size, chunks, 3)
    assert info.packed_size == path.stat().st_size
    assert path.read_bytes()[:8] == b"UFFDZST1"
    with ZstdStore(FileStore(path)) as store:
        assert (store.size, store.chunks, store.chunk_size) == (size, chunks, chunk_size)
        assert_range(store, data, 0, size + 100)
        assert_range(store, data, size, 10)
        assert_range(store, data, size + 5000, 10)


def test_empty_pack_is_header_index_and_footer_only(tmp_path: Path) -> None:
    path, info = _pack_bytes(tmp_path, b"", 4096)
    assert info.packed_size == HEADER + FOOTER
    assert info.ratio == 0.0
    with ZstdStore(FileStore(path)) as store:
        assert store.read_into(0, memoryview(bytearray(4096))) == 0


def test_pack_from_a_store_reports_progress(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    info = pack(
        BytesStore(DATA),
        tmp_path / "p",
        chunk_size=100_000,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(0, len(DATA)), (100_000, len(DATA)), (200_000, len(DATA)),
                     (300_000, len(DATA)), (len(DATA), len(DATA))]  # fmt: skip
    assert info.ratio == pytest.approx(len(DATA) / (tmp_path / "p").stat().st_size)
    assert 1 < info.ratio < 10  # half the payload is repetitive, half random


def test_pack_info_is_a_frozen_record(tmp_path: Path) -> None:
    _, info = _pack_bytes(tmp_path, b"x", 4096)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.size = 2  # type: ignore[misc]
    assert not hasattr(info, "__dict__")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chunk_size": 0}, "chunk size 0 is out of range"),
        ({"chunk_size": 1 << 31}, "chunk size 2147483648 is out of range"),
        ({"level": 0}, "compression level 0 is out of range"),
        ({"level": 23}, "compression level 23 is out of range"),
    ],
)
def test_pack_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack(
            BytesStore(b"abc"),
            tmp_path / "p",
            chunk_size=kwargs.get("chunk_size", 4096),
            level=kwargs.get("level", 3),
        )
    assert os.listdir(tmp_path) == []


def test_failed_pack_leaves_no_file(tmp_path: Path) -> None:
    source = CountingStore(BytesStore(DATA))
    source.fail_from = 200_000
    with pytest.raises(StoreError, match="injected failure"):
        pack(source, tmp_path / "p", chunk_size=4096)
    assert os.listdir(tmp_path) == []


def _chunk_offsets(path: Path) -> list[tuple[int, int]]:
    raw = path.read_bytes()
    index_offset, count = struct.unpack_from("<QQ", raw, len(raw) - FOOTER)
    return [struct.unpack_from("<QI", raw, index_offset + i * ENTRY) for i in range(count)]


@pytest.mark.parametrize("chunk", [0, 3, 7])
def test_corrupted_chunk_raises_naming_it(tmp_path: Path, chunk: int) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 40_000)
    offset, length = _chunk_offsets(path)[chunk]
    raw = bytearray(path.read_bytes())
    raw[offset + length // 2] ^= 0xFF
    path.write_bytes(raw)
    with ZstdStore(FileStore(path)) as store:
        # The chunks around it still read; the corrupted one never serves bytes.
        assert_range(store, DATA, (chunk + 1) * 40_000, 100)
        buffer = bytearray(4096)
        with pytest.raises(StoreError, match=rf"pack chunk {chunk} .*corrupt"):
            store.read_into(chunk * 40_000 + 5000, memoryview(buffer))
        with pytest.raises(StoreError, match=rf"pack chunk {chunk} "):
            store.read_into(0, memoryview(bytearray(len(DATA))))


@settings(max_examples=80, deadline=None)
@given(position=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_no_corruption_serves_wrong_bytes(position: int, flip: int) -> None:
    data = DATA[:20_000]
    raw = bytearray(_PACKED_SMALL)
    raw[position % len(raw)] ^= flip
    try:
        store = ZstdStore(BytesStore(bytes(raw)))
        buffer = bytearray(len(data))
        got = store.read_into(0, memoryview(buffer))
    except StoreError:
        return
    # A flip the format does not read (e.g. a reserved frame header bit) changed nothing.
    assert (got, bytes(buffer)) == (len(data), data)


def _packed_small() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path, _ = _pack_bytes(Path(tmp), DATA[:20_000], 4096)
        return path.read_bytes()


_PACKED_SMALL = _packed_small()


@pytest.mark.parametrize("cut", [1, 20, 39, 40, 41, 500, 5000])
def test_truncated_pack_fails_at_open(tmp_path: Path, cut: int) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 40_000)
    path.write_bytes(path.read_bytes()[:-cut])
    with pytest.raises(StoreError, match="not a complete pack"), ZstdStore(FileStore(path)):
        pass


def test_pack_shrunk_after_open_fails_at_read(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 40_000)
    with ZstdStore(FileStore(path)) as store:
        offset, _ = _chunk_offsets(path)[5]
        os.truncate(path, offset + 10)
        with pytest.raises(StoreError, match=r"pack chunk 5: .*the file ends there now") as caught:
            store.read_into(5 * 40_000, memoryview(bytearray(4096)))
        assert caught.value.errno == errno.ESTALE, "a shrunk pack is a stale source"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a pack, just some text that is long enough to hold a header and footer" * 2,
         r"not a uffd zstd pack: magic b'not a pa'"),
        (b"short", "not a complete pack: 5 bytes"),
        (b"GIF89a" + bytes(60), "not a uffd zstd pack: no b'UFFDZST1' magic"),
    ],
)  # fmt: skip
def test_wrong_magic_is_a_clear_error(content: bytes, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        ZstdStore(BytesStore(content))


def test_unknown_version_is_refused(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, b"abc", 4096)
    raw = bytearray(path.read_bytes())
    raw[8] = 3
    with pytest.raises(StoreError, match="pack format version 3 is not supported"):
        ZstdStore(BytesStore(bytes(raw)))


def test_corrupted_index_fails_at_open(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 40_000)
    raw = bytearray(path.read_bytes())
    raw[-FOOTER - 1] ^= 1  # last byte of the last chunk's hash
    with pytest.raises(StoreError, match="does not match the footer's digest"):
        ZstdStore(BytesStore(bytes(raw)))


def test_opening_reads_only_header_then_index_and_footer(tmp_path: Path) -> None:
    path, info = _pack_bytes(tmp_path, DATA, 40_000)
    raw = CountingStore(FileStore(path))
    with ZstdStore(raw):
        index = info.packed_size - FOOTER - info.chunks * ENTRY
        # Two reads (two requests over HTTP): the header's chunk count places the index.
        assert raw.reads == [(0, HEADER), (index, info.chunks * ENTRY + FOOTER)], raw.reads


def test_sequential_pages_decompress_each_chunk_once(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 65536)
    raw = CountingStore(FileStore(path))
    with ZstdStore(raw, cache_chunks=2) as store:
        opened = len(raw.reads)
        page = bytearray(4096)
        for offset in range(0, len(DATA), 4096):
            store.read_into(offset, memoryview(page))
            assert page[: len(DATA) - offset] == DATA[offset : offset + 4096]
        assert len(raw.reads) - opened == 5  # ceil(300_001 / 65536) chunks, one read each


def test_a_multi_chunk_read_is_one_raw_read(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 4096)
    offsets = _chunk_offsets(path)
    raw = CountingStore(FileStore(path))
    with ZstdStore(raw) as store:
        del raw.reads[:]
        assert_range(store, DATA, 4096 * 3 + 100, 4096 * 10)
        first, last = offsets[3], offsets[13]
        assert raw.reads == [(first[0], last[0] + last[1] - first[0])]


def test_raw_store_error_names_the_chunk(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 40_000)
    raw = CountingStore(FileStore(path))
    with ZstdStore(raw) as store:
        raw.fail_from = 0
        with pytest.raises(StoreError, match="pack chunk 2: injected failure"):
            store.read_into(80_000, memoryview(bytearray(100)))
        with pytest.raises(StoreError, match=r"pack chunks 0\.\.1: injected failure"):
            store.read_into(0, memoryview(bytearray(50_000)))


def test_reopen_shares_the_layout_and_reopens_raw(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 40_000)
    with ZstdStore(CountingStore(FileStore(path))) as store:
        again = store.reopen()
        assert isinstance(again, ZstdStore) and again is not store
        new_raw = again._raw
        assert isinstance(new_raw, CountingStore) and new_raw is not store._raw
        assert_range(again, DATA, 39_000, 5000)
        # No header, footer or index reads: only the two chunks' frames, in one read.
        assert len(new_raw.reads) == 1


def test_negative_offset_is_an_error(tmp_path: Path) -> None:
    path, _ = _pack_bytes(tmp_path, DATA, 40_000)
    with ZstdStore(FileStore(path)) as store, pytest.raises(StoreError, match="negative"):
        store.read_into(-1, memoryview(bytearray(1)))


def test_cache_size_is_checked() -> None:
    with pytest.raises(ValueError, match="cache_chunks must be at least 1"):
        ZstdStore(BytesStore(_PACKED_SMALL), cache_chunks=0)
