"""The protobuf wire format, as far as CRIU's images need it: varints and length-delimited fields.

A message decodes to ``{field number: [values]}``: an int for a varint (wire type 0) or a
fixed 32/64-bit field (types 5 and 1, read little-endian), bytes for a length-delimited one
(type 2: a string, a nested message, or a packed repeated field, see :func:`packed`). Groups
(types 3, 4) are not used by CRIU and are refused. Every error is a :class:`WireError` saying
at which byte the message broke.
"""

from __future__ import annotations

__all__ = ["WireError", "decode", "first", "packed", "signed64"]

Fields = dict[int, list[int | bytes]]


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    end = len(data)
    while at < end:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, at
        shift += 7
        if shift > 63:
            raise WireError(f"a varint longer than 10 bytes at byte {at}")
    raise WireError(f"a varint runs past the end of the message (byte {at})")


def decode(data: bytes) -> Fields:
    """The fields of one message."""
    fields: Fields = {}
    at = 0
    end = len(data)
    while at < end:
        key = data[at]  # one byte for every field number below 16 (all CRIU needs)
        if key < 0x80:
            at += 1
        else:
            key, at = _varint(data, at)
        number, kind = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {at}")
        value: int | bytes
        if kind == 0:
            if at < end and data[at] < 0x80:  # a small number: one byte
                value = data[at]
                at += 1
            else:
                value, at = _varint(data, at)
        elif kind == 1 or kind == 5:
            width = 8 if kind == 1 else 4
            if at + width > end:
                raise WireError(f"field {number}: a fixed{width * 8} runs past the end")
            value = int.from_bytes(data[at : at + width], "little")
            at += width
        elif kind == 2:
            length, at = _varint(data, at)
            if at + length > end:
                raise WireError(
                    f"field {number}: {length} bytes announced at byte {at}, {end - at} left"
                )
            value = bytes(data[at : at + length])
            at += length
        else:
            raise WireError(f"field {number}: wire type {kind} (groups are not supported)")
        if number in fields:
            fields[number].append(value)
        else:
            fields[number] = [value]
    return fields


def first(fields: Fields, number: int, name: str, *, default: int | None = None) -> int:
    """The last value (protobuf's rule for a repeated scalar) of int field ``number``; a
    WireError naming ``name`` when it is missing (and has no default) or is not an int."""
    values = fields.get(number)
    if not values:
        if default is None:
            raise WireError(f"required field {name} ({number}) is missing")
        return default
    value = values[-1]
    if not isinstance(value, int):
        raise WireError(f"field {name} ({number}) is length-delimited, expected a number")
    return value


def packed(fields: Fields, number: int, name: str) -> list[int]:
    """Every value of a repeated varint field, packed or not."""
    out: list[int] = []
    for value in fields.get(number, []):
        if isinstance(value, int):
            out.append(value)
            continue
        at = 0
        while at < len(value):
            item, at = _varint(value, at)
            out.append(item)
    return out


def signed64(value: int) -> int:
    """A varint read as int64 (two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value
