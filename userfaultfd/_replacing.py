"""The one writer of files that appear whole or not at all (packs, delta images, cached chunks)."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["replacing"]


@contextlib.contextmanager
def replacing(dest: str | os.PathLike[str], *, durable: bool = True) -> Iterator[BinaryIO]:
    """A file to write that appears at ``dest`` only once complete: it is written under a
    temporary name in the same directory (unique to this process and thread) and renamed over
    ``dest`` at the end; on any failure it is removed and ``dest`` is left as it was. Readers,
    other processes included, see the old file or the whole new one, never a part.

    ``durable``: the file is fsynced before the rename and its directory after it, so after a
    crash ``dest`` is the old file or the whole new one. Not durable (a cache entry): neither.

    The error raised is always the one that stopped the write (an open that failed, the caller's,
    a full disk), never a cleanup's.
    """
    final = os.fspath(dest)
    folder, name = os.path.split(final)
    folder = folder or "."
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
    out = open(tmp, "wb")  # noqa: SIM115 - a failed open has nothing to clean up
    try:
        with out:
            yield out
            if durable:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _sync_directory(folder)


def _sync_directory(folder: str) -> None:
    """fsync ``folder``, so a rename in it survives a crash. A filesystem that cannot sync a
    directory (EINVAL: some FUSE and network filesystems) has nothing more to give."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)
