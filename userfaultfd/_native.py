"""Whether the native fast path (``userfaultfd._speedups``, runtime/_answer.py) is here and on.

It is built with the package where a C compiler exists (hatch_build.py); without it, or with
``UFFD_NATIVE=0`` in the environment, every fault is answered by the pure-Python path.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["native_available", "native_module", "path_in_use"]

_speedups: ModuleType | None
try:
    from . import _speedups
except ImportError:  # built without a compiler: the pure-Python path serves
    _speedups = None


def native_module() -> ModuleType | None:
    """The extension, if it was built (whether or not it is switched off)."""
    return _speedups


def native_available() -> bool:
    """Whether the native fast path was built and is not switched off (``UFFD_NATIVE=0``)."""
    return _speedups is not None and os.environ.get("UFFD_NATIVE", "1") != "0"


def path_in_use() -> str:
    """A line saying which path a handler started now would take for a local file, and why."""
    if _speedups is None:
        return "python (the native fast path was not built: no C compiler when installed)"
    if not native_available():
        return "python (the native fast path is switched off: UFFD_NATIVE=0)"
    return "native (userfaultfd._speedups; UFFD_NATIVE=0 switches it off)"
