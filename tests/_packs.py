"""A pack with one chunk corrupted, for tests of what a bad chunk does to the pages it holds."""

from __future__ import annotations

import struct
from pathlib import Path


def corrupt_chunk(path: Path, chunk: int) -> None:
    """Flip one byte in the middle of ``chunk``'s compressed bytes in the pack at ``path``."""
    raw = bytearray(path.read_bytes())
    # The pack's footer and index (see userfaultfd/stores/_zstd.py): <QQ> index offset and
    # chunk count in the last 40 bytes; <QI> offset and length of each chunk, 28 bytes apart.
    index, _count = struct.unpack_from("<QQ", raw, len(raw) - 40)
    offset, length = struct.unpack_from("<QI", raw, index + chunk * 28)
    raw[offset + length // 2] ^= 0xFF
    path.write_bytes(raw)
