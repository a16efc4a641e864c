"""What runtime.py and local.py share: the source file's page-cache state, and the fault path.

- ``warm(path)`` reads the whole file before a timed run, and ``resident(path)`` says how much
  of it is in the page cache (mincore). On this VM a DAMON scheme (kdamond, ``paddr``, action
  ``pageout``, unmapped file pages idle for 12 aggregations of 5 s) evicts page cache that has
  not been touched for about a minute, with 22 GiB free: a source written once and read in
  bursts falls out of the cache between runs, and the run after that reads the disk. So every
  timed run starts from a warm source, and the steady mode prints the residency it found.
- ``use_path(native)`` sets UFFD_NATIVE for a handler started after it (the handler reads it
  in its own process, forked from the program): "0" forces the pure-Python fault path; unset,
  the native one when it is built. ``path_of(stats)`` is what the handler says it used.
"""

from __future__ import annotations

import ctypes
import mmap
import os

__all__ = ["path_of", "resident", "use_path", "warm"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mincore.restype = ctypes.c_int


def warm(path: str) -> None:
    """Read every byte of ``path`` (8 MiB at a time), so it is in the page cache."""
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def resident(path: str) -> float:
    """The fraction of ``path``'s pages in the page cache now (mincore of a fresh mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    # A private writable mapping only so that ctypes takes its address; nothing writes to it,
    # so every page mincore reports is the file's page-cache page.
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            failed = _libc.mincore(ctypes.addressof(anchor), size, vector) != 0
        finally:
            del anchor  # the mapping cannot close while ctypes holds its buffer
        if failed:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore({path}): {os.strerror(err)}")
    return sum(v & 1 for v in vector) / pages


def use_path(native: bool) -> None:
    """Choose the fault path of the handlers started after this, in this process."""
    if native:
        os.environ.pop("UFFD_NATIVE", None)
    else:
        os.environ["UFFD_NATIVE"] = "0"


def path_of(stats: object) -> str:
    """The fault path a handler's stats say it used ("python" until handlers report one)."""
    return str(getattr(stats, "path", "python"))
