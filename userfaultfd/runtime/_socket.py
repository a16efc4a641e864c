"""The page-fault handler protocol of Firecracker's snapshot restore, over a Unix socket.

A client (a VMM, or any program in any language) connects and sends one message: a JSON array
of regions, ``[{"base_host_virt_addr": A, "size": N, "offset": O, "page_size": P}, ...]``, with
its userfaultfd attached as SCM_RIGHTS. Region byte i then comes from store byte O + i. The
server serves that client until it closes the connection; each client gets its own process,
so one client's faults never wait behind another's.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from .._core import Userfaultfd
from ..stores import Store
from ._handler import Handler
from ._policy import Adaptive, Policy
from ._stats import StatsBlock

__all__ = ["GuestRegion", "parse_regions", "serve_socket"]

_MAX_MESSAGE = 1 << 20
_FIELDS = ("base_host_virt_addr", "size", "offset", "page_size")


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


def serve_socket(
    path: str,
    store: Store,
    *,
    policy_factory: Callable[[], Policy] = Adaptive,
    once: bool = False,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Listen on ``path`` and serve every client that connects (``once``: only the first,
    in this process). Each other client is served by a forked process of its own."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        if os.path.exists(path):
            os.unlink(path)
        try:
            listener.bind(path)
        except OSError as err:
            reason = err.strerror or str(err)  # "AF_UNIX path too long" has no errno
            raise OSError(err.errno or errno.EINVAL, f"cannot listen on {path}: {reason}") from err
        listener.listen(8)
        if on_listening is not None:
            on_listening()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reap client processes automatically
        while True:
            connection, _ = listener.accept()
            if once:
                with connection:
                    _serve_client(connection, store, policy_factory())
                return
            if os.fork() == 0:
                status = 1
                try:
                    listener.close()
                    _serve_client(connection, store.reopen(), policy_factory())
                    status = 0
                finally:
                    os._exit(status)
            connection.close()


def _serve_client(connection: socket.socket, store: Store, policy: Policy) -> None:
    data, fds, _flags, _address = socket.recv_fds(connection, _MAX_MESSAGE, 4)
    if not fds:
        raise ValueError("the client sent no userfaultfd with its regions")
    for extra in fds[1:]:
        os.close(extra)
    uffd = Userfaultfd.from_fd(fds[0])
    regions = parse_regions(data)
    handler = Handler(store, policy, StatsBlock())
    handler.add(uffd, [(r.base_host_virt_addr, r.size, r.offset, r.page_size) for r in regions])
    handler.run(control=connection.fileno())  # until the client hangs up
