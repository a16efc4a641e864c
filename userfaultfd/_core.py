"""The userfaultfd object: one method per ioctl, arguments checked before the kernel sees them.

Design note: where faults are served
------------------------------------
A thread that touches a registered page sleeps in the kernel until the handler resolves the
fault. A Python thread sleeps there *holding the GIL*: it is inside a C-level memory access, not
at a bytecode boundary, so no other thread of the same interpreter runs again, a handler thread
included, and the interpreter deadlocks. Faults in memory that Python code touches must therefore
be served from another process: one that inherited the uffd over fork(), or received it over a
Unix socket (``socket.send_fds`` / ``socket.recv_fds``). A uffd stays bound to the address space
that created it, so the handler process resolves faults in the original process's memory.

Other kernel facts that shape this module:
- UFFDIO_API can be issued once per descriptor, and it fails if any requested feature is missing.
  So the requested features are all enabled or the descriptor is useless; on failure we probe a
  fresh descriptor to name each missing feature.
- COPY, ZEROPAGE, CONTINUE, POISON and MOVE report progress in the struct's last field even when
  they fail with EAGAIN; we pre-set it to 0 (a kernel that returns early leaves it alone) and hand
  it to the caller as ``MappingChangedError.done``.
- A blocking uffd reports POLLERR to poll(); the default here is O_NONBLOCK, so the object works
  with selectors and asyncio.
"""

from __future__ import annotations

import errno
import fcntl
import operator
import os
import struct
import warnings
from collections.abc import Callable
from typing import Final, final

from . import _abi, _libc
from ._buffer import pinned
from ._closing import Closing
from ._errors import (
    FeatureUnavailableError,
    MappingChangedError,
    UserfaultfdError,
    UserfaultfdPermissionError,
    call,
)
from ._events import Event, parse_events
from ._flags import FEATURE_SINCE, Feature, Ioctl, Mode

__all__ = ["Userfaultfd", "supported_features"]

_ADDRESS_LIMIT: Final = 1 << 64

_PERMISSION_HINT: Final = (
    "run as root (or with CAP_SYS_PTRACE), set vm.unprivileged_userfaultfd=1, pass "
    "user_mode_only=True (only faults from user space are handled), or get read/write access "
    f"to {_abi.DEVICE_PATH} (Linux 6.1+)"
)


def _open_by_syscall(flags: int) -> int:
    number = _abi.SYS_userfaultfd
    if number is None:
        raise FeatureUnavailableError(
            errno.ENOSYS, f"no userfaultfd syscall number known for {os.uname().machine}"
        )
    return _libc.syscall(
        number, flags, describe=lambda code: _describe_open(code, "the userfaultfd syscall")
    )


def _open_by_device(flags: int) -> int:
    def attempt() -> int:
        device = os.open(_abi.DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
        try:
            return fcntl.ioctl(device, _abi.USERFAULTFD_IOC_NEW, flags)
        finally:
            os.close(device)

    return call(attempt, lambda code: _describe_open(code, _abi.DEVICE_PATH))


def _describe_open(code: int, how: str) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return f"creating a userfaultfd through {how} was refused: {_PERMISSION_HINT}"
    if code in (errno.ENOSYS, errno.ENOENT, errno.ENODEV):
        return f"{how} is not available: this kernel was built without CONFIG_USERFAULTFD"
    return f"creating a userfaultfd through {how} failed: {os.strerror(code)}"


def _open(flags: int, device: bool | None) -> int:
    if device:
        return _open_by_device(flags)
    try:
        return _open_by_syscall(flags)
    except UserfaultfdPermissionError:
        usable = os.access(_abi.DEVICE_PATH, os.R_OK | os.W_OK)
        if device is None and usable:
            return _open_by_device(flags)
        raise


def _describe_api(code: int, features: Feature) -> str:
    failed = f"UFFDIO_API with features {features!r} failed: {os.strerror(code)}"
    if code == errno.EPERM and Feature.EVENT_FORK in features:
        # fs/userfaultfd.c: EVENT_FORK hands the handler the child's memory, so it asks for
        # the right to trace processes.
        return f"{failed}: EVENT_FORK needs CAP_SYS_PTRACE, which this process lacks"
    return failed


def _handshake(fd: int, features: int) -> tuple[int, int]:
    """UFFDIO_API: returns the (features available, ioctls) the kernel reports."""
    buf = bytearray(_abi.UFFDIO_API_STRUCT.pack(_abi.UFFD_API, features, 0))
    call(lambda: fcntl.ioctl(fd, _abi.UFFDIO_API, buf, True),
         lambda code: _describe_api(code, Feature(features)))  # fmt: skip
    _api, available, ioctls = _abi.UFFDIO_API_STRUCT.unpack(buf)
    return available, ioctls


def _feature_names(features: int) -> str:
    names = []
    for bit in range(64):
        flag = 1 << bit
        if not features & flag:
            continue
        known = Feature(flag)
        if known in FEATURE_SINCE:
            names.append(f"{known.name} (Linux {FEATURE_SINCE[known]})")
        else:
            names.append(f"bit {bit} (unknown to this library)")
    return ", ".join(names)


def supported_features(*, device: bool | None = None) -> Feature:
    """The features this kernel offers, probed on a fresh, short-lived userfaultfd."""
    # User-mode-only needs no privilege, and the features reported do not depend on it.
    fd = _open(_abi.O_CLOEXEC | _abi.UFFD_USER_MODE_ONLY, device)
    try:
        available, _ioctls = _handshake(fd, 0)
    finally:
        os.close(fd)
    return Feature(available)


def _mode(wake: bool, dontwake: int, flag: int = 0, with_flag: bool = False) -> int:
    """An ioctl's mode field: its DONTWAKE bit unless ``wake``, and ``flag`` if ``with_flag``."""
    return (0 if wake else dontwake) | (flag if with_flag else 0)


def _index(value: int, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, not {type(value).__name__}") from None


@final
class Userfaultfd(Closing):
    """A userfaultfd: register memory, read its fault events, resolve them.

    Faults are served from another process than the one touching the memory: a Python thread
    blocked in a fault holds the GIL, so a handler thread in the same interpreter never runs.
    Fork a handler (it inherits this descriptor) or send ``fileno()`` over a Unix socket.

    The object behaves like a file: ``fileno()``, an idempotent ``close()``, a context manager.
    Every method takes addresses and lengths as ints, checks alignment before any syscall, and
    raises a :class:`UserfaultfdError` subclass when the kernel refuses.
    """

    def __init__(
        self,
        features: Feature = Feature(0),
        *,
        nonblocking: bool = True,
        cloexec: bool = True,
        user_mode_only: bool = False,
        device: bool | None = None,
    ) -> None:
        self._fd = -1
        requested = _index(features, "features")
        if not 0 <= requested < 1 << 64:
            raise ValueError(f"features must be a 64-bit mask, not {requested}")
        flags = (
            (_abi.O_NONBLOCK if nonblocking else 0)
            | (_abi.O_CLOEXEC if cloexec else 0)
            | (_abi.UFFD_USER_MODE_ONLY if user_mode_only else 0)
        )
        fd = _open(flags, device)
        try:
            _handshake(fd, requested)
        except UserfaultfdError as err:
            os.close(fd)
            missing = requested & ~int(supported_features(device=device))
            if missing:
                raise FeatureUnavailableError(
                    errno.EINVAL,
                    f"this kernel ({os.uname().release}) lacks {_feature_names(missing)}",
                ) from err
            raise
        self._fd = fd
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        #: The features enabled on this descriptor (UFFDIO_API grants all requested or none).
        self.features = Feature(requested)

    @classmethod
    def from_fd(cls, fd: int, features: Feature = Feature(0)) -> Userfaultfd:
        """Adopt a descriptor that already went through UFFDIO_API.

        For a uffd received over a Unix socket or carried by a Fork event. The kernel does not
        repeat what UFFDIO_API granted, so ``features`` is what the sender says it enabled.
        The object owns ``fd`` from now on and closes it.
        """
        self = cls.__new__(cls)
        self._fd = _index(fd, "fd")
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self.features = Feature(features)
        return self

    # -- file behaviour ----------------------------------------------------------------------------
    def fileno(self) -> int:
        return self._require_open()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the descriptor. Idempotent.

        Closing the last descriptor of a uffd unregisters its ranges and wakes every blocked
        fault; MISSING faults on anonymous memory then fill with zeros.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        """Close a descriptor nobody closed, with a ResourceWarning, as io.FileIO does: the
        moment a uffd closes decides whether blocked faults get their pages or zeros."""
        if getattr(self, "_fd", -1) >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=2, source=self)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Userfaultfd {state} features={self.features!r}>"

    # -- registration ------------------------------------------------------------------------------
    def register(self, addr: int, length: int, mode: Mode = Mode.MISSING) -> Ioctl:
        """Register [addr, addr+length) in ``mode``; returns the ioctls that range supports."""
        start, size = self._range(addr, length)
        mode_bits = _index(mode, "mode")
        if not mode_bits or mode_bits & ~int(Mode.MISSING | Mode.WP | Mode.MINOR):
            raise ValueError(f"mode must be a combination of MISSING, WP and MINOR, not {mode!r}")
        buf = bytearray(_abi.UFFDIO_REGISTER_STRUCT.pack(start, size, mode_bits, 0))
        self._ioctl(
            _abi.UFFDIO_REGISTER,
            buf,
            lambda code: _describe_register(code, start, size, Mode(mode_bits)),
        )
        return Ioctl(_abi.UFFDIO_REGISTER_STRUCT.unpack(buf)[3])

    def unregister(self, addr: int, length: int) -> None:
        """Unregister [addr, addr+length); faults blocked there are woken."""
        start, size = self._range(addr, length)
        buf = bytearray(_abi.UFFDIO_RANGE.pack(start, size))
        self._ioctl(_abi.UFFDIO_UNREGISTER, buf, _describer("UFFDIO_UNREGISTER", start, size))

    def wake(self, addr: int, length: int) -> None:
        """Wake threads blocked on faults in [addr, addr+length) so they retry the access."""
        start, size = self._range(addr, length)
        buf = bytearray(_abi.UFFDIO_RANGE.pack(start, size))
        self._ioctl(_abi.UFFDIO_WAKE, buf, _describer("UFFDIO_WAKE", start, size))

    # -- resolving faults --------------------------------------------------------------------------
    def copy(
        self,
        dst: int,
        src: int | bytes | bytearray | memoryview,
        length: int | None = None,
        *,
        wp: bool = False,
        wake: bool = True,
    ) -> int:
        """Copy ``length`` bytes from ``src`` into the missing pages at ``dst``; returns the count.

        ``src`` is an address in this process, or any contiguous bytes-like object (its address
        is taken and held for the call); ``length`` defaults to the object's size. ``wp=True``
        installs the pages write-protected.
        """
        mode = _mode(wake, _abi.UFFDIO_COPY_MODE_DONTWAKE, _abi.UFFDIO_COPY_MODE_WP, wp)
        if isinstance(src, int):
            if length is None:
                raise TypeError("copy() from an address needs a length")
            return self._copy_from(dst, src, length, mode)
        with pinned(src) as (address, available):
            size = available if length is None else _index(length, "length")
            if size > available:
                raise ValueError(f"length {size} exceeds the {available}-byte source buffer")
            return self._copy_from(dst, address, size, mode)

    def _copy_from(self, dst: int, src: int, length: int, mode: int) -> int:
        start, size = self._range(dst, length)
        source = _index(src, "src")
        if not 0 < source < _ADDRESS_LIMIT - size:
            raise ValueError(f"source address 0x{source:x} is not a valid user address")
        return self._fill(
            _abi.UFFDIO_COPY,
            _abi.UFFDIO_COPY_STRUCT,
            (start, source, size, mode),
            _describer("UFFDIO_COPY", start, size),
        )

    def zeropage(self, addr: int, length: int, *, wake: bool = True) -> int:
        """Map zero pages at the missing pages of [addr, addr+length); returns bytes mapped."""
        start, size = self._range(addr, length)
        mode = _mode(wake, _abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE)
        return self._fill(
            _abi.UFFDIO_ZEROPAGE,
            _abi.UFFDIO_ZEROPAGE_STRUCT,
            (start, size, mode),
            _describer("UFFDIO_ZEROPAGE", start, size),
        )

    def continue_(self, addr: int, length: int, *, wp: bool = False, wake: bool = True) -> int:
        """Map the page-cache pages behind a MINOR fault; returns bytes mapped."""
        start, size = self._range(addr, length)
        mode = _mode(wake, _abi.UFFDIO_CONTINUE_MODE_DONTWAKE, _abi.UFFDIO_CONTINUE_MODE_WP, wp)
        return self._fill(
            _abi.UFFDIO_CONTINUE,
            _abi.UFFDIO_CONTINUE_STRUCT,
            (start, size, mode),
            _describer("UFFDIO_CONTINUE", start, size),
        )

    def writeprotect(
        self, addr: int, length: int, protect: bool = True, *, wake: bool = True
    ) -> None:
        """Write-protect [addr, addr+length), or with ``protect=False`` lift it (waking writers)."""
        start, size = self._range(addr, length)
        mode = _mode(
            wake, _abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE, _abi.UFFDIO_WRITEPROTECT_MODE_WP, protect
        )
        buf = bytearray(_abi.UFFDIO_WRITEPROTECT_STRUCT.pack(start, size, mode))
        self._ioctl(_abi.UFFDIO_WRITEPROTECT, buf, _describer("UFFDIO_WRITEPROTECT", start, size))

    def poison(self, addr: int, length: int, *, wake: bool = True) -> int:
        """Mark [addr, addr+length) poisoned: any access gets SIGBUS. Returns bytes poisoned."""
        start, size = self._range(addr, length)
        mode = _mode(wake, _abi.UFFDIO_POISON_MODE_DONTWAKE)
        return self._fill(
            _abi.UFFDIO_POISON,
            _abi.UFFDIO_POISON_STRUCT,
            (start, size, mode),
            _describer("UFFDIO_POISON", start, size),
        )

    def move(
        self,
        dst: int,
        src: int,
        length: int,
        *,
        allow_src_holes: bool = False,
        wake: bool = True,
    ) -> int:
        """Move pages from ``src`` to the missing range at ``dst``; returns bytes moved.

        Private anonymous memory only, and only from the process that owns it: the kernel
        refuses moves issued through a uffd of another process (EINVAL).
        """
        start, size = self._range(dst, length)
        source, _ = self._range(src, length)
        mode = _mode(
            wake, _abi.UFFDIO_MOVE_MODE_DONTWAKE, _abi.UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
            allow_src_holes,
        )  # fmt: skip
        return self._fill(
            _abi.UFFDIO_MOVE,
            _abi.UFFDIO_MOVE_STRUCT,
            (start, source, size, mode),
            _describer("UFFDIO_MOVE", start, size, _MOVE_REASONS),
        )

    # -- events ------------------------------------------------------------------------------------
    def read_events(self, max_events: int = 64) -> list[Event]:
        """Read up to ``max_events`` pending events in one read().

        Nonblocking: an empty list when nothing is pending. Blocking: waits for at least one.
        """
        count = _index(max_events, "max_events")
        if count < 1:
            raise ValueError(f"max_events must be at least 1, not {count}")
        fd = self._require_open()
        size = count * _abi.UFFD_MSG.size

        def attempt() -> bytes:
            try:
                return os.read(fd, size)
            except BlockingIOError:  # nonblocking and nothing pending
                return b""

        data = call(attempt, lambda code: f"reading userfaultfd events: {os.strerror(code)}")
        return parse_events(data)

    # -- the one path to the kernel ----------------------------------------------------------------
    def _require_open(self) -> int:
        if self._fd < 0:
            raise ValueError("operation on a closed Userfaultfd")
        return self._fd

    def _ioctl(self, request: int, buf: bytearray, describe: Callable[[int], str]) -> None:
        fd = self._require_open()
        call(lambda: fcntl.ioctl(fd, request, buf, True), describe)

    def _fill(
        self,
        request: int,
        layout: struct.Struct,
        fields: tuple[int, ...],
        describe: Callable[[int], str],
    ) -> int:
        """An ioctl whose struct ends in an s64 progress field: returns it, or raises with .done."""
        buf = bytearray(layout.pack(*fields, 0))
        try:
            self._ioctl(request, buf, describe)
        except MappingChangedError as err:
            err.done = max(layout.unpack(buf)[-1], 0)
            raise
        result: int = layout.unpack(buf)[-1]
        return result

    def _range(self, addr: int, length: int) -> tuple[int, int]:
        start = _index(addr, "address")
        size = _index(length, "length")
        page = self._page_size
        if size <= 0:
            raise ValueError(f"length must be positive, not {size}")
        if start < 0 or start + size > _ADDRESS_LIMIT:
            raise ValueError(f"range 0x{start:x} + {size} lies outside the 64-bit address space")
        if start % page or size % page:
            raise ValueError(
                f"address 0x{start:x} and length {size} must be multiples of the page size {page}"
            )
        return start, size


def _describer(
    operation: str, start: int, size: int, reasons: dict[int, str] | None = None
) -> Callable[[int], str]:
    """The message for ``operation`` on [start, start+size) failing with an errno."""

    def describe(code: int) -> str:
        where = f"[0x{start:x}, 0x{start + size:x})"
        reason = (reasons or _REASONS).get(code) or _REASONS.get(code) or os.strerror(code)
        return f"{operation} on {where}: {reason}"

    return describe


_REASONS: Final = {
    errno.EEXIST: "a page is already mapped there (another resolver got there first)",
    errno.EAGAIN: "the address space is changing (read the pending events, then resume at .done)",
    errno.ESRCH: "the process that owns this memory has exited",
    errno.ENOENT: "no mapping registered with this userfaultfd covers the whole range",
    errno.EINVAL: (
        "the kernel rejected the range or mode (misaligned for the mapping's page size, "
        "not registered in a mode allowing this ioctl, or a mode flag this range does not support)"
    ),
    errno.EFAULT: "a page it needs is not there (CONTINUE: no page in the page cache)",
    errno.ENOMEM: "out of memory",
}


# fs/userfaultfd.c refuses cross-mm moves: MOVE must come from the process owning the memory.
_MOVE_REASONS: Final = {
    errno.EINVAL: (
        "the kernel refused the move: UFFDIO_MOVE works only from the process that owns the "
        "memory (no cross-process moves), between private anonymous mappings with the same "
        "protection, page aligned"
    ),
}


def _describe_register(code: int, start: int, size: int, mode: Mode) -> str:
    where = f"UFFDIO_REGISTER {mode!r} on [0x{start:x}, 0x{start + size:x})"
    if code == errno.EINVAL:
        return (
            f"{where}: this memory cannot be registered in this mode. userfaultfd registers "
            "anonymous, shmem/memfd and hugetlbfs mappings (not regular files on disk); MINOR "
            "needs shmem or hugetlbfs; the range must lie in mappings and be page aligned"
        )
    if code == errno.EBUSY:
        return f"{where}: part of the range is registered with another userfaultfd"
    if code == errno.EPERM:
        return (
            f"{where}: the mapping cannot be written (no VM_MAYWRITE), so it cannot be registered"
        )
    if code == errno.ENOMEM:
        return f"{where}: part of the range is not mapped"
    return f"{where}: {os.strerror(code)}"
