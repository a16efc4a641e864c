"""serve_adopted(): serve a uffd that another process opened and registered (CRIU's restore).

serve() registers memory of this process. A lazy restore is the other way round: the restored
task's uffd arrives ready (UFFDIO_API done, its ranges registered MISSING, see
userfaultfd.criu), and only needs serving. So this runs the same supervised handler as serve()
(a supervisor in a daemon process that restarts a handler that dies, and poisons what no handler
can fill: never zeros), and hands it the adopted descriptor instead of one registered here.

This process keeps no copy of the uffd once the supervisor holds it: the caller's ``uffd`` is
closed before this returns.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._core import Userfaultfd
from ..stores import Store
from ._policy import Policy
from ._server import Region, Server, plan, start

__all__ = ["serve_adopted"]


def serve_adopted(
    uffd: Userfaultfd,
    regions: Iterable[Region],
    store: Store,
    *,
    policy: Policy | None = None,
    cpu: int | str | None = None,
    batch: int = 64,
    buffer_bytes: int = 8 << 20,
) -> Server:
    """Serve the faults of ``uffd`` (registered elsewhere, with ``uffd.features`` enabled) on
    ``regions`` from ``store``, in a supervised handler; ``regions`` say where each registered
    range's bytes lie in the store. ``policy``, ``cpu``, ``batch`` and ``buffer_bytes`` as for
    :func:`~userfaultfd.runtime.serve` (``cpu`` "same" is refused: the faulting threads are in
    another process). Takes ``uffd`` over: it is closed when this returns."""
    try:
        if cpu == "same":
            raise ValueError('cpu "same" pins the caller; the faulting task is another process')
        resolved, options = plan(
            list(regions), store, policy=policy, batch=batch, buffer_bytes=buffer_bytes
        )
        return start(resolved, options, cpu, lambda: (uffd, uffd.features))
    finally:
        uffd.close()
