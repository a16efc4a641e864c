"""Waiting for descriptors with poll(2), not select(2).

select() cannot watch a descriptor numbered 1024 or more (FD_SETSIZE: Python raises ValueError),
and a program with a few hundred lazy arrays holds that many: each server keeps a pipe, a pidfd
and the watchdog's descriptors. Every wait of the runtime goes through here.
"""

from __future__ import annotations

import math
import select
from collections.abc import Iterable

__all__ = ["readable"]


def readable(fds: Iterable[int], timeout: float | None) -> list[int]:
    """The descriptors of ``fds`` that are readable (or closed at the other end, or have
    exited: a pidfd), waiting up to ``timeout`` seconds (None: for ever)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    wait = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [fd for fd, _events in poller.poll(wait)]
