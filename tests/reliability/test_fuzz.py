"""Fuzzing of every wire decoder: bytes from outside never raise anything but the promised error,
and never decode to something other than what they say.

The decoders and what each promises:

- ``parse_events`` (uffd_msg records from read()): a list of events, or ValueError.
- ``runtime.firecracker.parse_regions`` (a client's JSON message): a list of regions, or ValueError.
- ``ZstdStore`` over pack bytes, and its ``read_into``: StoreError (an OSError) for anything
  wrong with the bytes; ValueError is kept for bad arguments (``cache_chunks``), never for data.
  A read that does not raise returns the original bytes: a mutation is detected, never served.
- ``tools.restore`` over delta files: ValueError naming the file, or the memory the files
  describe, decoded here by an independent reference reader.

Inputs are random bytes and, to get past the first check, structure-aware: a valid message built
from its parts, then mutated (edits, truncation, extension), and for the checksummed formats
resealed (checksum recomputed) so the mutation reaches the parser behind the checksum.

Budget: ``MAX_EXAMPLES`` examples per test (``UFFD_FUZZ_EXAMPLES`` overrides it for a longer
run); ``EXECUTIONS`` counts the decoder runs, printed at the end with ``UFFD_FUZZ_REPORT=1``.
The same checks drive the atheris harnesses in ``fuzz/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from userfaultfd import (
    Event,
    FaultFlag,
    Fork,
    PageFault,
    Remap,
    Remove,
    Unmap,
    memory,
    parse_events,
)
from userfaultfd.runtime.firecracker import GuestRegion, parse_regions
from userfaultfd.stores import BytesStore, StoreError, ZstdStore, pack
from userfaultfd.tools import restore, snapshot_delta, track

#: Examples per fuzz test in the bounded (CI) run; 11 tests, a few seconds in all.
MAX_EXAMPLES: Final = int(os.environ.get("UFFD_FUZZ_EXAMPLES", "300"))
#: Decoder runs per target, over the whole module (each example runs one or more).
EXECUTIONS: Counter[str] = Counter()

FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

PAGE = memory.page_size()
Edits = Sequence[tuple[int, int]]


@pytest.fixture(scope="module", autouse=True)
def _report(pytestconfig: pytest.Config) -> Iterator[None]:
    yield
    if os.environ.get("UFFD_FUZZ_REPORT"):
        counts = ", ".join(f"{name} {n:,}" for name, n in sorted(EXECUTIONS.items()))
        total = sum(EXECUTIONS.values())
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        with getattr(capture, "global_and_fixture_disabled", contextlib.nullcontext)():
            print(f"fuzz executions: {counts}; total {total:,}")


def apply_edits(data: bytes, edits: Edits) -> bytes:
    """``data`` with byte ``position % len`` set to ``value`` for each edit."""
    out = bytearray(data)
    for position, value in edits:
        if out:
            out[position % len(out)] = value
    return bytes(out)


# -- parse_events ----------------------------------------------------------------------------------
_MSG: Final = struct.Struct("=BBHI24s")  # include/uapi/linux/userfaultfd.h, struct uffd_msg
_KINDS: Final = (0x12, 0x13, 0x14, 0x15, 0x16)


def _u64(arg: bytes, at: int) -> int:
    return int.from_bytes(arg[at : at + 8], sys.byteorder)


def reference_event(message: bytes) -> Event | None:
    """One uffd_msg decoded field by field, without the library's structs; None: unknown type."""
    kind, arg = message[0], message[8:32]
    if kind == 0x12:
        tid = int.from_bytes(arg[16:20], sys.byteorder)
        return PageFault(_u64(arg, 8), FaultFlag(_u64(arg, 0)), tid)
    if kind == 0x13:
        return Fork(int.from_bytes(arg[0:4], sys.byteorder))
    if kind == 0x14:
        return Remap(_u64(arg, 0), _u64(arg, 8), _u64(arg, 16))
    if kind in (0x15, 0x16):
        kind_type = Remove if kind == 0x15 else Unmap
        return kind_type(_u64(arg, 0), _u64(arg, 8))
    return None


def check_events(data: bytes) -> None:
    """parse_events(data) decodes every record as the reference does, or raises ValueError
    exactly when the length is wrong or a record's type is unknown."""
    EXECUTIONS["events"] += 1
    whole = len(data) % _MSG.size == 0
    expected = [reference_event(data[i : i + 32]) for i in range(0, len(data) - 31, 32)]
    try:
        events = parse_events(data)
    except ValueError:
        assert not whole or None in expected, f"refused a valid read: {data.hex()}"
        return
    assert whole and None not in expected, f"accepted a malformed read: {data.hex()}"
    assert events == expected


def encode_event(event: Event) -> bytes:
    if isinstance(event, PageFault):
        arg = struct.pack("=QQI4x", event.flags, event.address, event.thread_id)
        return _MSG.pack(0x12, 0, 0, 0, arg)
    if isinstance(event, Fork):
        return _MSG.pack(0x13, 0, 0, 0, struct.pack("=I20x", event.uffd))
    if isinstance(event, Remap):
        return _MSG.pack(0x14, 0, 0, 0, struct.pack("=QQQ", event.old, event.new, event.length))
    kind = 0x15 if isinstance(event, Remove) else 0x16
    return _MSG.pack(kind, 0, 0, 0, struct.pack("=QQ8x", event.start, event.end))


_U64 = st.integers(0, (1 << 64) - 1)
_U32 = st.integers(0, (1 << 32) - 1)
events_strategy: st.SearchStrategy[Event] = st.one_of(
    st.builds(PageFault, _U64, _U64.map(FaultFlag), _U32),
    st.builds(Fork, _U32),
    st.builds(Remap, _U64, _U64, _U64),
    st.builds(Remove, _U64, _U64),
    st.builds(Unmap, _U64, _U64),
)
edits_strategy = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)


@FUZZ
@given(st.binary(max_size=256))
def test_parse_events_random_bytes(data: bytes) -> None:
    check_events(data)


@FUZZ
@given(st.lists(events_strategy, max_size=6), edits_strategy, st.integers(-40, 40))
def test_parse_events_valid_reads_then_mutated(
    events: list[Event], edits: Edits, resize: int
) -> None:
    data = b"".join(encode_event(e) for e in events)
    assert parse_events(data) == events  # round trip of the valid read
    check_events(data)
    mutated = apply_edits(data, edits)
    mutated = mutated[:resize] if resize < 0 else mutated + bytes(resize)
    check_events(mutated)


def test_parse_events_ignores_reserved_bytes_and_keeps_unknown_flag_bits() -> None:
    message = bytearray(encode_event(PageFault(0x7000, FaultFlag(1 << 40 | 1), 7)))
    message[1:8] = b"\xff" * 7  # reserved1..3
    message[28:32] = b"\xff" * 4  # the pagefault arm's padding
    (event,) = parse_events(bytes(message))
    assert event == PageFault(0x7000, FaultFlag.WRITE | FaultFlag(1 << 40), 7)
    with pytest.raises(ValueError, match="unknown userfaultfd event type 0x00"):
        parse_events(bytes(32))
    with pytest.raises(ValueError, match="33 bytes is not a whole number of 32-byte"):
        parse_events(bytes(message) + b"\0")


# -- parse_regions ---------------------------------------------------------------------------------
_FIELDS: Final = ("base_host_virt_addr", "size", "offset", "page_size")


def reference_regions(data: bytes) -> list[GuestRegion] | None:
    """The regions a message describes, or None where the protocol says it is malformed."""
    try:
        items = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(items, list) or not items:
        return None
    regions = []
    for item in items:
        if not isinstance(item, dict):
            return None
        values = [item.get(name) for name in _FIELDS]
        if not all(type(v) is int and v >= 0 for v in values):
            return None
        address, size, offset, page = (v for v in values if isinstance(v, int))
        if page == 0 or page & (page - 1) or size == 0 or size % page or address % page:
            return None
        regions.append(GuestRegion(address, size, offset, page))
    return regions


def check_regions(data: bytes) -> None:
    """parse_regions(data) returns what the reference reads, or ValueError where it reads none."""
    EXECUTIONS["regions"] += 1
    expected = reference_regions(data)
    try:
        regions = parse_regions(data)
    except ValueError:
        assert expected is None, f"refused a valid message: {data!r}"
        return
    assert regions == expected


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_power_of_two = st.integers(0, 30).map(lambda n: 1 << n)


@st.composite
def region_items(draw: st.DrawFn) -> dict[str, object]:
    page = draw(_power_of_two)
    item: dict[str, object] = {
        "base_host_virt_addr": draw(st.integers(0, 1 << 20)) * page,
        "size": draw(st.integers(1, 64)) * page,
        "offset": draw(st.integers(0, 1 << 40)),
        "page_size": page,
    }
    if draw(st.booleans()):  # one field off: wrong type, negative, misaligned, or missing
        name = draw(st.sampled_from(_FIELDS))
        item[name] = draw(st.one_of(_json_values, st.integers(-(1 << 70), 1 << 70), st.just(None)))
    return item


@FUZZ
@given(st.binary(max_size=200))
def test_parse_regions_random_bytes(data: bytes) -> None:
    check_regions(data)


@FUZZ
@given(st.one_of(_json_values, st.lists(region_items(), max_size=4)), edits_strategy)
def test_parse_regions_structured_then_mutated(items: object, edits: Edits) -> None:
    data = json.dumps(items).encode()
    check_regions(data)
    check_regions(apply_edits(data, edits))


def test_parse_regions_deep_nesting_is_a_value_error() -> None:
    """Found by this fuzzing: a deeply nested message raised RecursionError out of json.loads."""
    for data in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(ValueError, match="the region message is not JSON"):
            parse_regions(data)


def test_parse_regions_oversized_integer_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"not JSON.*integer string conversion"):
        parse_regions(b'[{"size": ' + b"1" * 5000 + b"}]")


# -- the zstd pack ---------------------------------------------------------------------------------
# The format, from the docstring of userfaultfd/stores/_zstd.py (written out again here on purpose).
_HEADER: Final = struct.Struct("<8sHHIQQ")
_ENTRY: Final = struct.Struct("<QI16s")
_FOOTER: Final = struct.Struct("<QQ16s8s")


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def assemble_pack(
    frames: Sequence[bytes],
    digests: Sequence[bytes],
    size: int,
    chunk_size: int,
    *,
    count: int | None = None,
    version: int = 1,
) -> bytes:
    """A pack from its parts, with a correct index and footer for whatever parts it is given."""
    count = len(frames) if count is None else count
    header = _HEADER.pack(b"UFFDZST1", version, 0, chunk_size, size, count)
    index = bytearray()
    position = _HEADER.size
    for frame, digest in zip(frames, digests, strict=True):
        index += _ENTRY.pack(position, len(frame), digest)
        position += len(frame)
    footer = _FOOTER.pack(position, count, _digest(header + index), b"UFFDZEND")
    return header + b"".join(frames) + index + footer


def pack_parts(data: bytes, chunk_size: int) -> tuple[list[bytes], list[bytes]]:
    """Frames and chunk digests of ``data``, compressed as pack() does."""
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=False)
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    return [compressor.compress(c) for c in chunks], [_digest(c) for c in chunks]


def reseal_pack(blob: bytes) -> bytes:
    """``blob`` with its footer digest recomputed, where the footer says where the index is."""
    if len(blob) < _HEADER.size + _FOOTER.size:
        return blob
    index_offset, count, _digest_old, end = _FOOTER.unpack(blob[-_FOOTER.size :])
    index_end = index_offset + count * _ENTRY.size
    if index_end + _FOOTER.size != len(blob):
        return blob
    digest = _digest(blob[: _HEADER.size] + blob[index_offset:index_end])
    return blob[: -_FOOTER.size] + _FOOTER.pack(index_offset, count, digest, end)


def _source(seed: int, size: int) -> bytes:
    """Half compressible, half not: frames of both kinds. The compressible half is a repeated
    non-zero byte: a chunk of zeros is stored without a frame (format version 2), which
    assemble_pack does not write."""
    noise = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size // 2)
    flat = b"\x5a" * size
    return (noise + flat)[:size] if seed % 2 else (flat + noise)[-size:]


#: (original bytes, chunk size, a valid pack of them).
SEED_PACKS: Final = [
    (data, chunk, assemble_pack(*pack_parts(data, chunk), len(data), chunk))
    for data, chunk in (
        (_source(1, 5000), 1000),
        (_source(2, 3 * 4096), 4096),
        (_source(3, 700), 1024),
        (b"", 4096),
    )
]


def check_pack(blob: bytes, original: bytes, reads: Iterable[tuple[int, int]]) -> None:
    """A store over ``blob`` raises StoreError, or every read returns ``original``'s bytes (or
    raises StoreError); nothing else escapes."""
    EXECUTIONS["pack"] += 1
    try:
        store = ZstdStore(BytesStore(blob))
    except StoreError:
        return
    with store:
        for offset, length in reads:
            buffer = bytearray(length)
            try:
                got = store.read_into(offset, memoryview(buffer))
            except StoreError:
                continue
            assert 0 <= got <= length
            assert got == max(0, min(length, store.size - offset))
            assert bytes(buffer[:got]) == original[offset : offset + got], (
                f"wrong bytes at {offset}+{got} from a mutated pack"
            )


_reads = st.lists(st.tuples(st.integers(-2, 13000), st.integers(0, 5000)), min_size=1, max_size=4)


def test_assembled_packs_are_what_pack_writes(tmp_path: Path) -> None:
    for data, chunk, blob in SEED_PACKS:
        path = tmp_path / "p"
        pack(BytesStore(data), path, chunk_size=chunk)
        with open(path, "rb") as f:
            assert f.read() == blob
        check_pack(blob, data, [(0, len(data) + 1)])
        with ZstdStore(BytesStore(blob)) as store:
            buffer = bytearray(len(data))
            assert store.read_into(0, memoryview(buffer)) == len(data)
            assert buffer == data


@FUZZ
@given(st.binary(max_size=300), _reads)
def test_pack_random_bytes(blob: bytes, reads: list[tuple[int, int]]) -> None:
    check_pack(blob, b"", reads)


@FUZZ
@given(
    st.sampled_from(SEED_PACKS),
    edits_strategy,
    st.integers(-80, 80),
    st.booleans(),
    st.sampled_from(["anywhere", "header", "frames", "index+footer"]),
    _reads,
)
def test_pack_mutated(
    seed: tuple[bytes, int, bytes],
    edits: Edits,
    resize: int,
    reseal: bool,
    where: str,
    reads: list[tuple[int, int]],
) -> None:
    original, _chunk, blob = seed
    index_offset = _FOOTER.unpack(blob[-_FOOTER.size :])[0]
    lo, hi = {
        "anywhere": (0, len(blob)),
        "header": (0, _HEADER.size),
        "frames": (_HEADER.size, max(index_offset, _HEADER.size + 1)),
        "index+footer": (index_offset, len(blob)),
    }[where]
    mutated = apply_edits(blob, [(lo + p % (hi - lo), v) for p, v in edits])
    if resize:
        mutated = mutated[:resize] if resize < 0 else mutated + bytes(resize)
    check_pack(reseal_pack(mutated) if reseal else mutated, original, reads)


@FUZZ
@given(
    st.sampled_from(SEED_PACKS[:3]),
    st.data(),
    _reads,
)
def test_pack_rebuilt_from_mutated_parts(
    seed: tuple[bytes, int, bytes], data: st.DataObject, reads: list[tuple[int, int]]
) -> None:
    """Packs with a consistent index and footer around wrong parts: the layout checks pass, and
    the chunk checks must catch the rest."""
    original, chunk, _blob = seed
    frames, digests = pack_parts(original, chunk)
    size, count, version = len(original), len(frames), 1
    change = data.draw(
        st.sampled_from(["frame", "swap", "declared", "drop", "size", "chunk", "count", "ver"])
    )
    i = data.draw(st.integers(0, len(frames) - 1))
    if change == "frame":  # any bytes where a frame was
        frames[i] = data.draw(st.binary(max_size=64) | st.just(apply_edits(frames[i], [(9, 1)])))
    elif change == "swap":
        j = data.draw(st.integers(0, len(frames) - 1))
        frames[i], frames[j] = frames[j], frames[i]
    elif change == "declared":  # a frame header declaring another content size (8-byte field)
        declared = data.draw(st.sampled_from([0, 1, chunk + 1, 1 << 33, 1 << 40, (1 << 63) - 1]))
        frames[i] = declared_frame(original[i * chunk : (i + 1) * chunk], declared)
    elif change == "drop":
        del frames[i], digests[i]
    elif change == "size":
        size = data.draw(st.integers(0, 4 * size))
    elif change == "chunk":
        chunk = data.draw(st.integers(0, (1 << 32) - 1))
    elif change == "count":
        count = data.draw(st.integers(0, 1 << 20))
    else:
        version = data.draw(st.integers(0, 0xFFFF))
    blob = assemble_pack(frames, digests, size, chunk, count=count, version=version)
    check_pack(blob, original, reads)


def declared_frame(chunk: bytes, declared: int) -> bytes:
    """A zstd frame of ``chunk`` whose header declares ``declared`` bytes (an 8-byte field)."""
    frame = zstandard.ZstdCompressor(level=3, write_checksum=False).compress(chunk)
    descriptor = frame[4]
    assert descriptor & 0x20, "a single-segment frame (small chunks are)"
    field = (0, 2, 4, 8)[descriptor >> 6] or 1  # single segment: flag 0 means a 1-byte size
    return (
        frame[:4] + bytes([descriptor | 0xC0]) + declared.to_bytes(8, "little") + frame[5 + field :]
    )


def test_pack_frame_declaring_a_terabyte_is_a_store_error() -> None:
    """Found by this fuzzing: zstandard sizes its output by the frame's declared content size, not
    by max_output_size, so a corrupt header declaring 1 TiB raised MemoryError out of read_into."""
    original, chunk, _ = SEED_PACKS[0]
    frames, digests = pack_parts(original, chunk)
    frames[1] = declared_frame(original[chunk : 2 * chunk], 1 << 40)
    with ZstdStore(BytesStore(assemble_pack(frames, digests, len(original), chunk))) as store:
        buffer = bytearray(chunk)
        assert store.read_into(0, memoryview(buffer)) == chunk  # chunk 0 is intact
        assert buffer == original[:chunk]
        with pytest.raises(StoreError, match=r"chunk 1 .*frame declares 1099511627776 bytes"):
            store.read_into(chunk, memoryview(buffer))


# -- dirty-tracker deltas --------------------------------------------------------------------------
_DELTA: Final = struct.Struct("<8sQQQ")
BASE_PAGES: Final = 4


def encode_delta(unit: int, length: int, pages: dict[int, bytes]) -> bytes:
    """A delta file as snapshot_delta writes it (the format of userfaultfd/tools/_delta.py)."""
    indexes = sorted(pages)
    body = _DELTA.pack(b"UFFDDLT1", unit, length, len(indexes))
    body += b"".join(i.to_bytes(8, "little") for i in indexes)
    body += b"".join(pages[i] for i in indexes)
    return body + _digest(body)


def reseal_delta(blob: bytes) -> bytes:
    return blob[:-16] + _digest(blob[:-16]) if len(blob) >= 16 else blob


def reference_delta(blob: bytes, length: int) -> tuple[int, list[int], bytes] | None:
    """(page size, page indexes, page bytes) of a valid delta for a ``length``-byte region."""
    if len(blob) < _DELTA.size + 16 or _digest(blob[:-16]) != blob[-16:]:
        return None
    magic, unit, region, count = _DELTA.unpack(blob[: _DELTA.size])
    if magic != b"UFFDDLT1" or region != length or unit == 0 or length % unit:
        return None
    if len(blob) != _DELTA.size + count * (8 + unit) + 16:
        return None
    raw = blob[_DELTA.size : _DELTA.size + 8 * count]
    indexes = [int.from_bytes(raw[k : k + 8], "little") for k in range(0, len(raw), 8)]
    if any(b <= a for a, b in itertools.pairwise(indexes)):
        return None
    if indexes and indexes[-1] >= length // unit:
        return None
    return unit, indexes, blob[_DELTA.size + 8 * count : -16]


def reference_restore(base: bytes, deltas: Sequence[bytes]) -> bytes | int:
    """The restored memory, or the index of the first delta restore() must refuse."""
    memory_now = bytearray(base)
    chain_unit: int | None = None
    decoded = []
    for number, blob in enumerate(deltas):
        delta = reference_delta(blob, len(base))
        if delta is None or (chain_unit is not None and delta[0] != chain_unit):
            return number
        chain_unit = delta[0]
        decoded.append(delta)
    for unit, indexes, pages in decoded:
        for k, index in enumerate(indexes):
            memory_now[index * unit : (index + 1) * unit] = pages[k * unit : (k + 1) * unit]
    return bytes(memory_now)


def check_delta(base: bytes, deltas: Sequence[bytes]) -> None:
    """restore() builds the reference's memory, or raises ValueError naming the delta the
    reference refuses."""
    EXECUTIONS["delta"] += 1
    expected = reference_restore(base, deltas)
    with tempfile.TemporaryDirectory(prefix="uffd-fuzz-") as folder:
        base_path = os.path.join(folder, "base.img")
        with open(base_path, "wb") as f:
            f.write(base)
        paths = []
        for number, blob in enumerate(deltas):
            paths.append(os.path.join(folder, f"delta{number}.bin"))
            with open(paths[-1], "wb") as f:
                f.write(blob)
        try:
            restored = restore(base_path, paths)
        except ValueError as err:
            assert isinstance(expected, int), f"refused a valid chain: {err}"
            assert paths[expected] in str(err), f"{err} does not name {paths[expected]}"
            return
        with restored:
            assert not isinstance(expected, int), f"accepted delta {expected}, which is invalid"
            assert bytes(restored.view) == expected, "restore() built the wrong memory"


def _page_bytes(seed: int, unit: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(unit)


BASE: Final = b"".join(_page_bytes(1000 + n, PAGE) for n in range(BASE_PAGES))


@st.composite
def delta_blobs(draw: st.DrawFn) -> bytes:
    length = len(BASE)
    unit = draw(st.sampled_from([PAGE, PAGE // 4, 2 * PAGE, 512]))
    indexes = draw(st.sets(st.integers(0, length // unit - 1), max_size=4))
    return encode_delta(unit, length, {i: _page_bytes(i, unit) for i in indexes})


@FUZZ
@given(st.lists(delta_blobs(), max_size=3))
def test_restore_valid_deltas(deltas: list[bytes]) -> None:
    check_delta(BASE, deltas)


@FUZZ
@given(
    st.lists(delta_blobs(), min_size=1, max_size=2),
    st.integers(0, 1),
    st.sampled_from(["header", "indexes", "anywhere"]),
    edits_strategy,
    st.integers(-40, 40),
    st.booleans(),
)
def test_restore_mutated_deltas(
    deltas: list[bytes], which: int, where: str, edits: Edits, resize: int, reseal: bool
) -> None:
    which %= len(deltas)
    blob = deltas[which]
    count = _DELTA.unpack(blob[: _DELTA.size])[3]
    lo, hi = {
        "header": (0, _DELTA.size),
        "indexes": (_DELTA.size, _DELTA.size + max(8 * count, 1)),
        "anywhere": (0, len(blob)),
    }[where]
    blob = apply_edits(blob, [(lo + p % (hi - lo), v) for p, v in edits])
    if resize:
        blob = blob[:resize] if resize < 0 else blob + bytes(resize)
    deltas[which] = reseal_delta(blob) if reseal else blob
    check_delta(BASE, deltas)


@FUZZ
@given(st.binary(max_size=300))
def test_restore_random_delta_bytes(blob: bytes) -> None:
    check_delta(BASE, [blob])


def test_encode_delta_is_what_snapshot_delta_writes(tmp_path: Path) -> None:
    """The fuzzer's delta encoder writes exactly what the tracker does, so mutations of its
    output are mutations of real deltas."""
    with memory.anonymous(BASE_PAGES * PAGE) as mapping, track(mapping) as tracker:
        mapping.view[:] = BASE
        tracker.dirty()  # start clean
        pages = {1: _page_bytes(1, PAGE), 3: _page_bytes(3, PAGE)}
        for index, page in pages.items():
            mapping.view[index * PAGE : (index + 1) * PAGE] = page
        path = tmp_path / "delta.bin"
        snapshot_delta(tracker, path)
    assert path.read_bytes() == encode_delta(PAGE, len(BASE), pages)
    check_delta(BASE, [path.read_bytes()])
