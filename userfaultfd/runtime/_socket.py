"""The page-fault handler protocol of Firecracker's snapshot restore, over a Unix socket.

A client (a VMM, or any program in any language) connects and sends one message: a JSON array
of regions, ``[{"base_host_virt_addr": A, "size": N, "offset": O, "page_size": P}, ...]``, with
its userfaultfd attached as SCM_RIGHTS. Region byte i then comes from store byte O + i. The
server serves that client until it closes the connection; each client gets its own process,
so one client's faults never wait behind another's. That process is not this one's child (an
intermediate child forks it and exits at once, reaped here): nothing is left to reap, and the
caller's SIGCHLD disposition and its own children's exit statuses are left alone.

A client is refused at the handshake, before any of its faults is served, when its message is
malformed or a region reaches past the end of the store (those bytes would be served as zeros):
its connection is closed, the reason goes to ``on_refused`` (default: a line on stderr), and the
server goes on serving the others. Listening never deletes anything but a stale socket, and
its own socket when it stops.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from typing import final

from .._core import Userfaultfd
from ..stores import Store
from ._handler import Handler
from ._policy import Adaptive, Policy
from ._stats import StatsBlock

__all__ = ["GuestRegion", "check_regions", "parse_regions", "serve_socket"]

_MAX_MESSAGE = 1 << 20
_FIELDS = ("base_host_virt_addr", "size", "offset", "page_size")


@final
@dataclass(frozen=True, slots=True)
class GuestRegion:
    """One region of a client's message."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int


def parse_regions(data: bytes) -> list[GuestRegion]:
    """Decode a client's message; ValueError (saying what is wrong) for anything malformed."""
    try:
        items = json.loads(data)
    except (ValueError, RecursionError) as err:
        # ValueError covers bad JSON, bad UTF-8 and integers past Python's digit limit;
        # RecursionError a message nested deeper than the decoder's recursion limit.
        raise ValueError(f"the region message is not JSON: {err}") from None
    if not isinstance(items, list) or not items:
        raise ValueError("the region message must be a non-empty JSON array")
    regions = []
    for number, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"region {number} is not an object")
        values = []
        for name in _FIELDS:
            value = item.get(name)
            if type(value) is not int or value < 0:
                raise ValueError(f"region {number}: {name} must be a non-negative integer")
            values.append(value)
        region = GuestRegion(*values)
        page = region.page_size
        if page <= 0 or page & (page - 1):
            raise ValueError(f"region {number}: page_size {page} is not a power of two")
        if region.size == 0 or region.size % page or region.base_host_virt_addr % page:
            raise ValueError(f"region {number}: address and size must be non-zero page multiples")
        regions.append(region)
    return regions


def check_regions(regions: list[GuestRegion], store_size: int) -> None:
    """ValueError unless every region's bytes [offset, offset + size) lie in a store of
    ``store_size`` bytes, apart from less than one page of padding at the end of its last page
    (the handler fills that padding with zeros; anything past it would be zeros the store never
    held)."""
    for number, r in enumerate(regions):
        end = r.offset + r.size
        if end - store_size >= r.page_size:
            raise ValueError(
                f"region {number}: bytes [{r.offset}, {end}) lie past the end of the store "
                f"({store_size} bytes)"
            )


def _refused(reason: BaseException) -> None:
    print(f"uffd serve: refused a client: {reason}", file=sys.stderr, flush=True)


def _remove_stale_socket(path: str) -> None:
    """Delete ``path`` if it is a socket nobody listens on; OSError if anything else is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"cannot listen on {path}: it exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # stale: whoever listened there is gone
            os.unlink(path)
            return
        except OSError as err:
            reason = err.strerror or str(err)
            raise OSError(err.errno or errno.EINVAL, f"cannot listen on {path}: {reason}") from err
    raise OSError(errno.EADDRINUSE, f"cannot listen on {path}: a server is listening there")


def serve_socket(
    path: str,
    store: Store,
    *,
    policy_factory: Callable[[], Policy] = Adaptive,
    once: bool = False,
    on_listening: Callable[[], None] | None = None,
    on_refused: Callable[[BaseException], None] = _refused,
) -> None:
    """Listen on ``path`` and serve every client that connects (``once``: only the first
    client not refused, in this process). Each other client is served by a forked process of
    its own (not a child of this one: nothing to reap). A stale socket at ``path`` is
    replaced; anything else there is an OSError. However this ends (``once`` done, Ctrl-C, an
    exception the caller raises from a signal handler), the socket it made is removed, unless
    something else has taken its name since."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, ExitStack() as leaving:
        _remove_stale_socket(path)
        try:
            listener.bind(path)
        except OSError as err:
            reason = err.strerror or str(err)  # "AF_UNIX path too long" has no errno
            raise OSError(err.errno or errno.EINVAL, f"cannot listen on {path}: {reason}") from err
        leaving.callback(_remove_own_socket, path, os.lstat(path), os.getpid())
        listener.listen(8)
        if on_listening is not None:
            on_listening()
        while True:
            connection, _ = listener.accept()
            if once:
                with connection:
                    handshake = _handshake(connection, store, on_refused)
                    if handshake is None:
                        continue
                    _serve_client(connection, store, policy_factory(), *handshake)
                return
            middle = os.fork()
            if middle == 0:
                status = 1
                try:
                    listener.close()
                    if os.fork() == 0:  # the client's server, reaped by init
                        handshake = _handshake(connection, store, on_refused)
                        if handshake is not None:
                            _serve_client(connection, store.reopen(), policy_factory(), *handshake)
                    status = 0
                finally:
                    os._exit(status)
            connection.close()
            os.waitpid(middle, 0)  # at once: it only forks


def _remove_own_socket(path: str, bound: os.stat_result, owner: int) -> None:
    """Unlink ``path`` if it is still the socket that was ``bound`` there (same device and
    inode) and this is the process that bound it (a forked client's server never removes it)."""
    if os.getpid() != owner:
        return
    with suppress(OSError):  # gone already, or the directory with it
        there = os.lstat(path)
        if (there.st_dev, there.st_ino) == (bound.st_dev, bound.st_ino):
            os.unlink(path)


def _handshake(
    connection: socket.socket, store: Store, on_refused: Callable[[BaseException], None]
) -> tuple[Userfaultfd, list[GuestRegion]] | None:
    """The client's userfaultfd and regions; None (the client told why, the connection closed)
    for a client that must be refused."""
    try:
        data, fds, _flags, _address = socket.recv_fds(connection, _MAX_MESSAGE, 4)
    except OSError as err:
        on_refused(err)
        connection.close()
        return None
    for extra in fds[1:]:
        os.close(extra)
    try:
        if not fds:
            raise ValueError("the client sent no userfaultfd with its regions")
        regions = parse_regions(data)
        check_regions(regions, store.size)
    except ValueError as err:
        if fds:
            os.close(fds[0])
        on_refused(err)
        connection.close()
        return None
    return Userfaultfd.from_fd(fds[0]), regions


def _serve_client(connection: socket.socket, store: Store, policy: Policy, uffd: Userfaultfd,
                  regions: list[GuestRegion]) -> None:  # fmt: skip
    handler = Handler(store, policy, StatsBlock())
    handler.add(uffd, [(r.base_host_virt_addr, r.size, r.offset, r.page_size) for r in regions])
    handler.run(control=connection.fileno())  # until the client hangs up
