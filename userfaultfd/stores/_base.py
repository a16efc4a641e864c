"""The store interface: where the bytes of lazily filled memory come from."""

from __future__ import annotations

import abc
import errno
from typing import Self

__all__ = ["PARALLEL_REQUESTS", "Store", "StoreError"]


#: How many requests a remote store keeps in flight (its ``parallel_reads``).
PARALLEL_REQUESTS = 16


class StoreError(OSError):
    """A range of a store could not be read: ``StoreError(errno.EIO, message)``, in OSError's
    order (so ``errno`` and ``strerror`` are set, and a pickled one comes back the same). The
    handler poisons the page; never zero-fills."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)


class Store(abc.ABC):
    """Random-access bytes of a known size: a store implements :attr:`size` and
    :meth:`read_range`; :meth:`read_into`, which callers use, checks and clamps the range first.

    The fault handler runs in a forked process: it calls :meth:`reopen` there once, so a store
    holding fork-unsafe state (a network session, an event loop) makes a fresh handle.

    Pinned: a store serves the bytes it opened, or fails. A restarted handler calls
    :meth:`reopen` again, maybe long after the first open, and memory filled from two versions
    of a source is silently wrong; so a store that cannot keep reading the version it opened
    (the file shrank, the object was replaced) raises :class:`StoreError` (errno ESTALE or EIO)
    and the handler poisons the page, rather than mixing versions or padding with zeros.
    """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Length in bytes."""

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill ``buffer`` with bytes [offset, offset + len(buffer)).

        Returns the number of bytes read: ``len(buffer)``, except where the range passes
        :attr:`size` (as recorded at open): then ``size - offset``, or 0 at or past the end, and
        the rest of ``buffer`` is left as it was. Any other short read is an error, never a short
        count: the caller must be able to trust that the bytes it got are all there are.
        Raises :class:`StoreError` when the range cannot be read (I/O error, corruption, a
        network failure after retries, a source that changed since it was opened) or
        ``offset`` is negative.

        The check and the clamping happen here, once for every store (:meth:`clamp`); what lies
        inside the store is read by :meth:`read_range`, which a store implements.
        """
        length = self.clamp(offset, len(buffer))
        if length:
            self.read_range(offset, buffer[:length])
        return length

    def read_range(self, offset: int, view: memoryview) -> None:
        """Fill all of ``view`` with bytes [offset, offset + len(view)): a range that
        :meth:`read_into` checked, inside the store and not empty. Raises :class:`StoreError`
        when it cannot (never fills part of it silently)."""
        raise NotImplementedError(f"{type(self).__name__} implements neither read_range nor"
                                  " read_into")  # fmt: skip

    def clamp(self, offset: int, length: int) -> int:
        """How many of the bytes [offset, offset + length) lie inside the store (``length``,
        less where the range passes :attr:`size`, 0 at or past it). A negative offset is a
        :class:`StoreError` (EINVAL)."""
        if offset < 0:
            raise StoreError(errno.EINVAL, f"offset {offset} is negative")
        return max(0, min(length, self.size - offset))

    def address(self, offset: int, length: int) -> int | None:
        """Where bytes [offset, offset + length) lie in this process's memory, if they do.

        A store that can map its bytes (a local file) answers with an address, and the handler
        copies from there straight into the faulting range: one copy instead of two. Default:
        None (use :meth:`read_into`). The range must lie inside the store.
        """
        return None

    def mapped(self) -> list[tuple[int, int, int]] | None:
        """Where this store's bytes lie in this process's memory, for the native fault path:
        runs (store offset, length, address) in offset order; address 0 for a run known to be
        zeros. A run may end past :attr:`size` up to the next page (the kernel maps a file's
        last page whole). Offsets in no run are read through :meth:`read_into`. Default: None
        (nothing mapped)."""
        return None

    def known_zero(self, offset: int, length: int) -> bool:
        """Whether bytes [offset, offset + length) are known to be all zero without reading
        them (a pack's zero chunks, a hole). The handler then maps zero pages and fetches
        nothing. Default: False."""
        return False

    @property
    def parallel_reads(self) -> int:
        """How many :meth:`read_into` calls this store serves usefully at once, from as many
        threads (a remote store: many requests in flight hide the latency). 1 (the default):
        the handler calls it from one thread only."""
        return 1

    def will_need(self, offset: int, length: int) -> None:  # noqa: B027 - an optional hint
        """A hint that bytes [offset, offset + length) will be read soon (a local file starts
        reading them in the background: POSIX_FADV_WILLNEED). Default: nothing."""

    def dont_need(self, offset: int, length: int, *, wait: bool = False) -> None:  # noqa: B027
        """A hint that bytes [offset, offset + length) will not be read again soon (a local
        file starts writing what was written there, and drops them from the page cache: an
        out-of-core array's pager keeps its own copy, and a second one would count against its
        memory); ``wait``: for the writing first, so that they do go. Default: nothing."""

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_from` takes bytes back (an out-of-core array's dirty pages:
        ``lazy(..., writable=True)``). Default: False."""
        return False

    def write_from(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` (inside :attr:`size`), all of it or raise
        :class:`StoreError`. Durable only after :meth:`sync`. Default: EROFS."""
        raise StoreError(errno.EROFS, f"{self!r} cannot be written")

    def sync(self) -> None:  # noqa: B027 - optional hook, a store that cannot be written
        """Make every :meth:`write_from` so far durable (fsync)."""

    def reopen(self) -> Store:
        """A handle usable in this process (called after fork), over the same bytes as this one.

        Raises :class:`StoreError` (errno ESTALE) when a store can tell that its source changed
        since it was opened. Default: this one."""
        return self

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release what the store holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
