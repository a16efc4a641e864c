"""parse_events: a pure decoder, tested without a kernel."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from userfaultfd import FaultFlag, Fork, PageFault, Remap, Remove, Unmap, parse_events


def message(event: int, payload: bytes) -> bytes:
    return struct.pack("=BBHI", event, 0, 0, 0) + payload.ljust(24, b"\0")


def test_each_event_type_decodes_to_its_record() -> None:
    data = b"".join(
        [
            message(0x12, struct.pack("=QQI", 3, 0x7F0000001000, 4242)),
            message(0x13, struct.pack("=I", 17)),
            message(0x14, struct.pack("=QQQ", 0x1000, 0x9000, 0x3000)),
            message(0x15, struct.pack("=QQ", 0x2000, 0x4000)),
            message(0x16, struct.pack("=QQ", 0x5000, 0x6000)),
        ]
    )
    assert parse_events(data) == [
        PageFault(0x7F0000001000, FaultFlag.WRITE | FaultFlag.WP, 4242),
        Fork(17),
        Remap(0x1000, 0x9000, 0x3000),
        Remove(0x2000, 0x4000),
        Unmap(0x5000, 0x6000),
    ]


def test_empty_read_is_no_events() -> None:
    assert parse_events(b"") == []


def test_partial_message_is_refused() -> None:
    with pytest.raises(ValueError, match="whole number of 32-byte"):
        parse_events(bytes(33))


def test_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown userfaultfd event type 0x17"):
        parse_events(message(0x17, b""))


def test_records_are_frozen() -> None:
    fault = PageFault(0x1000, FaultFlag.MINOR, 0)
    with pytest.raises(AttributeError):
        fault.address = 0  # type: ignore[misc]


@settings(deadline=None)
@given(st.binary(max_size=32 * 8))
def test_arbitrary_bytes_give_events_or_value_error(data: bytes) -> None:
    try:
        events = parse_events(data)
    except ValueError:
        return
    assert len(events) == len(data) // 32


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x12, 0x13, 0x14, 0x15, 0x16]), st.binary(min_size=24, max_size=24)
        ),
        max_size=8,
    )
)
def test_well_formed_messages_always_decode(messages: list[tuple[int, bytes]]) -> None:
    events = parse_events(b"".join(message(kind, payload) for kind, payload in messages))
    assert len(events) == len(messages)
