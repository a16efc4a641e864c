"""The exceptions, and the one place that makes system calls and turns errno into them.

Every error is an OSError, so ``except OSError`` keeps working; the subclasses name the outcomes a
fault handler must tell apart (a page another resolver already filled, a mapping that changed
under a pending event, a target process that is gone).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TypeVar

__all__ = [
    "FeatureUnavailableError",
    "MappingChangedError",
    "PageExistsError",
    "ProcessGoneError",
    "UserfaultfdError",
    "UserfaultfdPermissionError",
    "call",
]

T = TypeVar("T")


class UserfaultfdError(OSError):
    """Any failure of a userfaultfd operation."""


class PageExistsError(UserfaultfdError):
    """EEXIST: a page is already mapped there (another resolver won the race): wake and move on."""


class MappingChangedError(UserfaultfdError):
    """EAGAIN: the address space changed (an event is queued and unread).

    Read the pending events, then resume at the start address plus ``done`` bytes.
    """

    #: Bytes the operation completed before it stopped.
    done: int = 0


class ProcessGoneError(UserfaultfdError):
    """ESRCH: the process whose memory this userfaultfd serves has exited."""


class FeatureUnavailableError(UserfaultfdError):
    """A requested feature, mode or ioctl that this kernel does not offer."""


class UserfaultfdPermissionError(UserfaultfdError, PermissionError):
    """Creating a userfaultfd was refused (EPERM or EACCES)."""


# errno -> exception class for the errors every userfaultfd ioctl shares.
_BY_ERRNO: dict[int, type[UserfaultfdError]] = {
    errno.EEXIST: PageExistsError,
    errno.EAGAIN: MappingChangedError,
    errno.ESRCH: ProcessGoneError,
    errno.EPERM: UserfaultfdPermissionError,
    errno.EACCES: UserfaultfdPermissionError,
}


def error(code: int, message: str) -> UserfaultfdError:
    """The domain exception for ``code``, with ``message`` as its text."""
    cls = _BY_ERRNO.get(code, UserfaultfdError)
    return cls(code, message)


def call(
    operation: Callable[[], T],
    describe: Callable[[int], str],
) -> T:
    """Run ``operation`` (one syscall or ioctl), retrying EINTR.

    On failure raise the domain exception for its errno; ``describe(errno)`` supplies the message,
    so each call site explains what went wrong in its own terms.
    """
    while True:
        try:
            return operation()
        except InterruptedError:
            continue
        except OSError as err:
            code = err.errno if err.errno is not None else errno.EIO
            raise error(code, describe(code)) from err
