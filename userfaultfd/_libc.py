"""The C library, loaded once: a typed wrapper for each call the package makes through ctypes.

Every wrapper checks the C result, and on failure raises through :func:`._errors.call` with the
errno the call left (``use_errno=True`` saves it per thread right after the call), retrying
EINTR. ``describe(errno)`` words the message; each wrapper has a default naming the call and its
arguments. The Python standard library covers everything else (os, mmap, fcntl).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from ._errors import call

__all__ = [
    "fallocate",
    "madvise",
    "mmap",
    "mremap",
    "munmap",
    "prctl",
    "sched_getcpu",
    "sync_file_range",
    "syscall",
    "usleep",
]

#: sync_file_range(2) flags (include/uapi/linux/fs.h).
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4

_libc = ctypes.CDLL(None, use_errno=True)

_syscall = _libc.syscall
_syscall.restype = ctypes.c_long  # variadic: the arguments are passed as c_long each

_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int

_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

_sched_getcpu = _libc.sched_getcpu
_sched_getcpu.argtypes = []
_sched_getcpu.restype = ctypes.c_int

_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int

_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_long]  # fmt: skip
_mmap.restype = ctypes.c_void_p

_mremap = _libc.mremap
_mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                    ctypes.c_void_p]  # fmt: skip
_mremap.restype = ctypes.c_void_p

_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int

_usleep = _libc.usleep
_usleep.argtypes = [ctypes.c_uint]
_usleep.restype = ctypes.c_int

#: (void *) -1, what mmap and mremap return on failure.
_MAP_FAILED = ctypes.c_void_p(-1).value


def _checked(
    attempt: Callable[[], int | None],
    failed: Callable[[int | None], bool],
    describe: Callable[[int], str],
) -> int:
    """Run ``attempt`` through the errno boundary; ``failed(result)`` says it set errno."""

    def once() -> int:
        result = attempt()
        if failed(result):
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        assert result is not None
        return result

    return call(once, describe)


def _negative(result: int | None) -> bool:
    return result is None or result < 0


def _map_failed(result: int | None) -> bool:
    return result is None or result == _MAP_FAILED


def _default(what: str) -> Callable[[int], str]:
    return lambda code: f"{what}: {os.strerror(code)}"


def syscall(number: int, *args: int, describe: Callable[[int], str] | None = None) -> int:
    """syscall(2) ``number`` with integer ``args``; returns its (non-negative) result."""
    values = [ctypes.c_long(arg) for arg in args]
    return _checked(
        lambda: int(_syscall(ctypes.c_long(number), *values)),
        _negative,
        describe or _default(f"syscall {number}{tuple(args)}"),
    )


def madvise(
    address: int, length: int, advice: int, *, describe: Callable[[int], str] | None = None
) -> None:
    """madvise(2) on [address, address+length)."""
    _checked(
        lambda: int(_madvise(address, length, advice)),
        _negative,
        describe or _default(f"madvise({advice}) on 0x{address:x}+{length:#x}"),
    )


def prctl(
    option: int,
    arg2: int = 0,
    arg3: int = 0,
    arg4: int = 0,
    arg5: int = 0,
    *,
    describe: Callable[[int], str] | None = None,
) -> int:
    """prctl(2); returns its result (0 for most options)."""
    return _checked(
        lambda: int(_prctl(option, arg2, arg3, arg4, arg5)),
        _negative,
        describe or _default(f"prctl({option}, {arg2}, {arg3}, {arg4}, {arg5})"),
    )


def sched_getcpu(*, describe: Callable[[int], str] | None = None) -> int:
    """The CPU the calling thread runs on."""
    return _checked(lambda: int(_sched_getcpu()), _negative, describe or _default("sched_getcpu"))


def fallocate(
    fd: int, mode: int, offset: int, length: int, *, describe: Callable[[int], str] | None = None
) -> None:
    """fallocate(2) on [offset, offset+length) of ``fd``."""
    _checked(
        lambda: int(_fallocate(fd, mode, offset, length)),
        _negative,
        describe or _default(f"fallocate({mode:#x}) at {offset}+{length}"),
    )


def sync_file_range(
    fd: int, offset: int, length: int, flags: int, *, describe: Callable[[int], str] | None = None
) -> None:
    """sync_file_range(2) on [offset, offset+length) of ``fd``."""
    _checked(
        lambda: int(_sync_file_range(fd, offset, length, flags)),
        _negative,
        describe or _default(f"sync_file_range({flags}) at {offset}+{length}"),
    )


def mmap(
    address: int,
    length: int,
    prot: int,
    flags: int,
    fd: int = -1,
    offset: int = 0,
    *,
    describe: Callable[[int], str] | None = None,
) -> int:
    """mmap(2); returns the address mapped (unlike :mod:`mmap`, it can place it, MAP_FIXED)."""
    return _checked(
        lambda: _mmap(address or None, length, prot, flags, fd, offset),
        _map_failed,
        describe or _default(f"mmap at 0x{address:x}+{length:#x}"),
    )


def mremap(
    address: int,
    old_length: int,
    new_length: int,
    flags: int,
    new_address: int = 0,
    *,
    describe: Callable[[int], str] | None = None,
) -> int:
    """mremap(2); returns the new address."""
    return _checked(
        lambda: _mremap(address, old_length, new_length, flags, new_address or None),
        _map_failed,
        describe or _default(f"mremap of 0x{address:x}+{old_length:#x}"),
    )


def munmap(address: int, length: int, *, describe: Callable[[int], str] | None = None) -> None:
    """munmap(2) of [address, address+length)."""
    _checked(
        lambda: int(_munmap(address, length)),
        _negative,
        describe or _default(f"munmap of 0x{address:x}+{length:#x}"),
    )


def usleep(microseconds: int) -> None:
    """Sleep in C: the GIL is released for the whole wait (ctypes drops it around the call)."""
    _checked(lambda: int(_usleep(microseconds)), _negative, _default(f"usleep({microseconds})"))
