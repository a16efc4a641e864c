"""The part of the handler that reads a batch of events and answers what it can from bytes at hand.

Design note: one narrow interface, two implementations
-------------------------------------------------------
An answerer's :meth:`~Answerer.serve` reads one batch of a source's events and returns, in read
order, the events it left for the handler's loop. The pure-Python answerer answers nothing: it
reads, and the loop resolves every fault (that loop is the reference). The native one
(``userfaultfd._speedups``, built with the package where a C compiler exists) answers every fault
it can the way the loop would: a wake for a page already settled, a COPY of the policy's window
from the store's mapping for a missing one. It hands back anything else (a non-fault event and
all that was read after it, a dropped page, a page past the mapping, an ioctl that did not
simply succeed), so every decision that keeps the never-zeros invariant stays in one place.

The native path is used where it can answer from bytes in this process: a store that says
where its bytes are mapped (``Store.mapped()``: a local file, CRIU's pages image with the zero
gaps of its lazy VMAs), no reads in flight, no recording, and one of the built-in policies (it
keeps its own Adaptive stream state; the Python path's is separate, which only changes window
sizes, never bytes). A window stays inside the mapped run that holds the faulting page.
``UFFD_NATIVE=0`` in the environment forces the Python path (the tests run both).
"""

from __future__ import annotations

import select
import typing
from typing import Protocol, final

from .._events import Event, parse_events
from .._native import native_available, native_module
from ..stores import Store
from . import _stats
from ._fill import Source
from ._journal import Journal
from ._policy import Adaptive, Policy, Single, Window
from ._stats import StatsBlock

__all__ = ["Answerer", "answerer_for"]

if typing.TYPE_CHECKING or native_module() is not None:
    from .._speedups import RegionTable

#: The paths a handler can take, as ``Stats.path`` names them.
PYTHON, NATIVE = "python", "native"


#: What :meth:`Answerer.wait` found: descriptors ready (of ``others``, or a uffd whose poll
#: reported an error, or, for the Python answerer, any readable uffd), and each uffd's events
#: left for the loop.
Waited = tuple[list[int], list[tuple[int, list[Event]]]]


class Answerer(Protocol):
    """Reads a batch of a source's events and answers the faults it can (see the module text)."""

    path: str

    def serve(self, source: Source, batch: int) -> list[Event]:
        """One batch of ``source``'s events, less the faults answered, in read order."""

    def wait(self, sources: list[Source], others: list[int], timeout_ms: int, batch: int) -> Waited:
        """Wait up to ``timeout_ms`` for the uffds of ``sources`` or the descriptors ``others``,
        answering what it can meanwhile (the native one loops in C: no Python per fault)."""


@final
class ReadOnly:
    """The pure-Python answerer: reads, and leaves every fault to the loop."""

    path = PYTHON

    def __init__(self, journal: Journal | None) -> None:
        self._journal = journal
        self._polled: tuple[int, ...] = ()
        self._poller = select.poll()

    def serve(self, source: Source, batch: int) -> list[Event]:
        if self._journal is None:
            return source.uffd.read_events(batch)
        return self._journal.read(source.uffd.fileno(), source.key, batch)

    def wait(self, sources: list[Source], others: list[int], timeout_ms: int, batch: int) -> Waited:
        fds = (*(s.uffd.fileno() for s in sources), *others)
        if fds != self._polled:
            self._poller = select.poll()
            for fd in fds:
                self._poller.register(fd, select.POLLIN)
            self._polled = fds
        return [fd for fd, _mask in self._poller.poll(timeout_ms)], []


@final
class Native:
    """The native answerer over ``store``'s mapping at ``address`` (``length`` bytes)."""

    path = NATIVE

    def __init__(
        self,
        segments: list[tuple[int, int, int]],
        stats: StatsBlock,
        policy: Policy,
        journal: Journal | None,
    ) -> None:
        kind, window, min_pages, max_bytes = _policy_parameters(policy)
        indices = (_stats.FAULTS, _stats.PAGES, _stats.BYTES, _stats.WAKES, _stats.COPIES,
                   _stats.ZEROS, stats.histogram_index)  # fmt: skip
        speedups = native_module()
        assert speedups is not None
        self._native = speedups.Answerer(
            segments, stats.address, indices, kind, window, min_pages, max_bytes,
            0 if journal is None else journal.address,
        )  # fmt: skip

    def serve(self, source: Source, batch: int) -> list[Event]:
        left = self._native.serve(source.uffd.fileno(), _table(source), source.key, batch)
        return parse_events(left) if left else []

    def wait(self, sources: list[Source], others: list[int], timeout_ms: int, batch: int) -> Waited:
        entries = [(s.uffd.fileno(), _table(s), s.key) for s in sources]
        ready, left = self._native.wait(entries, others, timeout_ms, batch)
        return ready, [(fd, parse_events(data)) for fd, data in left]


def _table(source: Source) -> RegionTable:
    """The native view of ``source``'s regions, built again only after its map changed."""
    table = source.map.native
    if not isinstance(table, RegionTable):
        table = source.map.native = RegionTable(source.map.regions)
    return table


def _policy_parameters(policy: Policy) -> tuple[int, int, int, int]:
    """The native policy's (kind, window pages, min_pages, max_bytes)."""
    if type(policy) is Window:
        return 1, policy.pages, 1, 1
    if type(policy) is Adaptive:
        return 2, 1, policy.min_pages, policy.max_bytes
    return 0, 1, 1, 1


def answerer_for(
    store: Store | None, policy: Policy, stats: StatsBlock, journal: Journal | None, *,
    record: bool, in_flight: bool, paged: bool = False,
) -> Answerer:  # fmt: skip
    """The native answerer where it can serve (see the module text), else the Python one. Both
    read into ``journal`` (see _journal) when there is one. An out-of-core array (``paged``)
    takes the Python path: every fill there passes its pager."""
    if store is None or record or in_flight or paged or not native_available():
        return ReadOnly(journal)
    if type(policy) not in (Single, Window, Adaptive):
        return ReadOnly(journal)
    segments = store.mapped()
    if segments is None:
        return ReadOnly(journal)
    return Native(segments, stats, policy, journal)
