"""Argument types shared by the commands: each turns one string into a value or says why not.
Importing this imports no part of the library (every command's parser imports it)."""

from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runtime import Policy

__all__ = [
    "UsageError",
    "count",
    "cpu",
    "parse_policy",
    "parse_size",
    "positive",
    "storage_option",
]


class UsageError(Exception):
    """A bad value a command found after parsing (a name, a combination of options): ``main``
    prints it as one line, ``uffd COMMAND: message`` (or ``uffd: message`` without a command),
    and exits with status 2, as argparse does for the values it checks itself."""

    def __init__(self, message: str, *, command: str = "") -> None:
        super().__init__(message)
        self.command = command


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``"65536"``, ``"64K"``, ``"1M"``, ``"1MiB"`` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 65536, 64K, 1M)")
    return int(match[1]) * _UNITS[match[2].lower()]


def parse_policy(text: str) -> Policy:
    """``single``, ``window:N`` or ``adaptive[:MAX_BYTES]``."""
    from ..runtime import Adaptive, Single, Window  # the runtime only for a command that runs it

    name, _, argument = text.partition(":")
    try:
        if name == "single" and not argument:
            return Single()
        if name == "window":
            return Window(int(argument or 16))
        if name == "adaptive":
            return Adaptive(max_bytes=int(argument)) if argument else Adaptive()
    except ValueError as err:
        raise ValueError(f"bad policy {text!r}: {err}") from None
    raise ValueError(f"bad policy {text!r}: use single, window:N or adaptive[:MAX_BYTES]")


def cpu(text: str) -> int | str | None:
    """A handler CPU: a number, ``same`` (the CPU of the faulting thread) or ``none``."""
    if text == "none":
        return None
    return text if text == "same" else int(text)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return value


def count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, not {value}")
    return value


def storage_option(text: str) -> tuple[list[str], Any]:
    """``KEY=VALUE`` (KEY dotted for nesting) -> (the key's path, the value: a JSON number,
    true, false or null as that, anything else as the string)."""
    key, equals, value = text.partition("=")
    path = key.split(".")
    if not equals or not all(path):
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE (KEY may be dotted: a.b)")
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return path, parsed if parsed is None or isinstance(parsed, bool | int | float) else value
