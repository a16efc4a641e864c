"""The store interface: where the bytes of lazily filled memory come from."""

from __future__ import annotations

import abc
import errno

__all__ = ["Store", "StoreError"]


class StoreError(OSError):
    """A range of a store could not be read. The handler poisons the page; never zero-fills."""

    def __init__(self, message: str, *, code: int = errno.EIO) -> None:
        super().__init__(code, message)


class Store(abc.ABC):
    """Random-access bytes of a known size.

    The fault handler runs in a forked process: it calls :meth:`reopen` there once, so a store
    holding fork-unsafe state (a network session, an event loop) makes a fresh handle.
    """

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Length in bytes."""

    @abc.abstractmethod
    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill ``buffer`` with bytes [offset, offset + len(buffer)).

        Returns the number of bytes read: ``len(buffer)``, or less only where the store ends.
        Raises :class:`StoreError` when the range cannot be read (I/O error, corruption, a
        network failure after retries).
        """

    def address(self, offset: int, length: int) -> int | None:
        """Where bytes [offset, offset + length) lie in this process's memory, if they do.

        A store that can map its bytes (a local file) answers with an address, and the handler
        copies from there straight into the faulting range: one copy instead of two. Default:
        None (use :meth:`read_into`). The range must lie inside the store.
        """
        return None

    def reopen(self) -> Store:
        """A handle usable in this process (called after fork). Default: this one."""
        return self

    def close(self) -> None:  # noqa: B027 - optional hook, most stores hold nothing
        """Release what the store holds."""

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
