"""Serving a forked child's faults until it reports, the way every check needs it."""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable
from typing import Any

from .._core import Userfaultfd
from .._errors import PageExistsError
from .._events import Event, PageFault
from .._flags import FaultFlag
from .._forked import Forked

__all__ = ["pagemap_refusal", "resolve_simply", "serve_until_report"]


def pagemap_refusal(proc: str = "/proc") -> str | None:
    """Why this process may not read its own pagemap, or None if it may. (A process that
    changed its user id without PR_SET_DUMPABLE, for one, finds /proc/self owned by root.)"""
    try:
        os.close(os.open(f"{proc}/self/pagemap", os.O_RDONLY))
    except OSError as err:
        return f"this process may not read {proc}/self/pagemap ({err.strerror})"
    return None


def resolve_simply(uffd: Userfaultfd, fault: PageFault, page: int) -> None:
    """Let the faulting access through: continue a MINOR fault, unprotect a WP fault, and map a
    zero page for a MISSING one. Another resolver winning the race is fine."""
    address = fault.address - fault.address % page
    try:
        if fault.flags & FaultFlag.MINOR:
            uffd.continue_(address, page)
        elif fault.flags & FaultFlag.WP:
            uffd.writeprotect(address, page, protect=False)
        else:
            uffd.zeropage(address, page)
    except PageExistsError:
        uffd.wake(address, page)


def serve_until_report(
    child: Forked,
    uffd: Userfaultfd | None,
    resolve: Callable[[Userfaultfd, PageFault], None],
    timeout: float,
) -> tuple[Any, list[Event]]:
    """Serve ``uffd`` with ``resolve`` until ``child`` sends a message; returns it and the events
    seen. Raises TimeoutError after ``timeout`` seconds."""
    seen: list[Event] = []
    deadline = time.monotonic() + timeout
    sources: list[Any] = [child.channel.sock] + ([uffd] if uffd is not None else [])
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the child sent no report within {timeout} s")
        ready, _, _ = select.select(sources, [], [], remaining)
        if uffd is not None and uffd in ready:
            for event in uffd.read_events():
                seen.append(event)
                if isinstance(event, PageFault):
                    resolve(uffd, event)
        if child.channel.sock in ready:
            message, _fds = child.recv(timeout=0)
            return message, seen
