"""Argument types shared by the commands: each turns one string into a value or says why not.
Importing this imports no part of the library (every command's parser imports it)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..runtime import Policy

__all__ = [
    "MAX_ADAPTIVE_BYTES",
    "MAX_WINDOW_PAGES",
    "UsageError",
    "count",
    "cpu",
    "cpu_number",
    "integer_between",
    "parse_policy",
    "parse_size",
    "positive",
    "seconds_between",
    "size_between",
    "storage_option",
]

#: The largest ``window:N`` (pages) and ``adaptive:MAX_BYTES`` a command takes: 1 GiB of 4 KiB
#: pages either way. A window is clipped to its region, so a larger one changes nothing but the
#: arithmetic, which the handler does in 64 bits (``window:2**63`` killed every handler).
MAX_WINDOW_PAGES = 1 << 18
MAX_ADAPTIVE_BYTES = 1 << 30


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
    if match is not None:
        try:
            return int(match[1]) * _UNITS[match[2].lower()]
        except ValueError:  # more digits than int() takes (4,300)
            pass
    raise argparse.ArgumentTypeError(f"{_shown(text)} is not a size (e.g. 65536, 64K, 1M)")


def parse_policy(text: str) -> Policy:
    """``single``, ``window:N`` (N from 1 to :data:`MAX_WINDOW_PAGES`) or
    ``adaptive[:MAX_BYTES]`` (MAX_BYTES from 1 to :data:`MAX_ADAPTIVE_BYTES`)."""
    from ..runtime import Adaptive, Single, Window  # the runtime only for a command that runs it

    name, _, argument = text.partition(":")
    try:
        if name == "single" and not argument:
            return Single()
        if name == "window":
            pages = int(argument or 16)
            if pages > MAX_WINDOW_PAGES:
                raise ValueError(f"a window has at most {MAX_WINDOW_PAGES} pages, not {pages}")
            return Window(pages)
        if name == "adaptive":
            if not argument:
                return Adaptive()
            most = int(argument)
            if most > MAX_ADAPTIVE_BYTES:
                raise ValueError(f"MAX_BYTES is at most {MAX_ADAPTIVE_BYTES} (1G), not {most}")
            return Adaptive(max_bytes=most)
    except ValueError as err:
        raise ValueError(f"bad policy {_shown(text)}: {_shown(str(err), 200)}") from None
    raise ValueError(f"bad policy {_shown(text)}: use single, window:N or adaptive[:MAX_BYTES]")


def cpu(text: str) -> int | str | None:
    """A handler CPU: a number (one this process may run on: :func:`cpu_number`), ``same``
    (the CPU of the faulting thread) or ``none``."""
    if text in ("none", "same"):
        return None if text == "none" else text
    try:
        return cpu_number(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f'{err} (or "same", or "none")') from None


def cpu_number(text: str) -> int:
    """A CPU this process may run on (its affinity), checked before anything starts."""
    allowed = sorted(os.sched_getaffinity(0))
    value = _integer(text, "a CPU number")
    if value not in allowed:
        raise argparse.ArgumentTypeError(
            f"CPU {value} is not one this process may run on: {_ranges(allowed)}"
        )
    return value


def positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return value


def count(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, not {value}")
    return value


def integer_between(low: int, high: int) -> Callable[[str], int]:
    """An argument type: a whole number from ``low`` to ``high``; argparse reports anything else
    as ``argument --NAME: must be from LOW to HIGH, not VALUE``."""

    def between(text: str) -> int:
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, not {_shown(text)}")
        return value

    return between


def seconds_between(high: float) -> Callable[[str], float]:
    """An argument type: a number of seconds, more than 0 and at most ``high`` (not nan, not
    inf: a deadline that far is past what a clock can hold)."""

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_shown(text)} is not a number of seconds") from None
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(
                f"must be more than 0 and at most {high:g} seconds, not {_shown(text)}"
            )
        return value

    return seconds


def size_between(low: int, high: int) -> Callable[[str], int]:
    """An argument type: a size (:func:`parse_size`) from ``low`` to ``high`` bytes."""

    def size(text: str) -> int:
        value = parse_size(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be from {_human(low)} to {_human(high)}, not {_shown(text.strip())}"
            )
        return value

    return size


def _integer(text: str, what: str = "a whole number") -> int:
    try:
        return int(text)
    except ValueError:  # not a number, or more digits than int() takes
        raise argparse.ArgumentTypeError(f"{_shown(text)} is not {what}") from None


def _shown(text: str, limit: int = 40) -> str:
    """``text`` quoted as a message shows it; a value of 5,000 digits is cut short."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def _human(size: int) -> str:
    """``size`` in the units :func:`parse_size` reads, exactly (4K, 11G, 65537)."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``, as taskset and /sys/devices/system/cpu print them."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


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
