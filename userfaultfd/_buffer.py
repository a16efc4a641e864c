"""Addresses of Python buffers, taken through the buffer protocol.

``PyObject_GetBuffer`` pins the exporter (an mmap cannot be closed, a bytearray cannot be resized)
until ``PyBuffer_Release``, so an address handed to the kernel stays valid for the whole ioctl.
The stdlib has no call for this; ctypes reaches the C API directly.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["pinned"]

_PyBUF_SIMPLE = 0  # contiguous bytes, no format
_PyBUF_WRITABLE = 1


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


@contextmanager
def pinned(obj: object, *, writable: bool = False) -> Iterator[tuple[int, int]]:
    """Yield ``(address, length)`` of ``obj``'s contiguous buffer, pinned until the block ends.

    Raises TypeError when ``obj`` does not export a contiguous (and, if asked, writable) buffer.
    """
    view = _PyBuffer()
    flags = _PyBUF_WRITABLE if writable else _PyBUF_SIMPLE
    try:
        _get_buffer(obj, ctypes.byref(view), flags)
    except (BufferError, TypeError) as err:
        need = "a writable" if writable else "a"
        raise TypeError(
            f"expected {need} contiguous bytes-like object, not {type(obj).__name__}: {err}"
        ) from err
    try:
        yield (view.buf or 0), view.len
    finally:
        _release_buffer(ctypes.byref(view))
