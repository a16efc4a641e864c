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

import os
from collections.abc import Iterable
from typing import Any

from .. import memory
from .._core import Userfaultfd
from .._forked import Channel
from ..stores import Store
from . import _supervisor
from ._launch import Launched, launch
from ._policy import Adaptive, Policy
from ._server import Region, Server, _checked, _place, _refuse_overlaps, _unpin
from ._stats import StatsBlock

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
        wanted = list(regions)
        if not wanted:
            raise ValueError("serve_adopted() needs at least one region")
        chosen = Adaptive() if policy is None else policy
        if not isinstance(chosen, Policy):
            raise TypeError(f"policy must be Single(), Window(n) or Adaptive(), not {chosen!r}")
        if not isinstance(store, Store):
            raise TypeError(f"store must be a userfaultfd.stores.Store, not {type(store).__name__}")
        if cpu == "same":
            raise ValueError('cpu "same" pins the caller; the faulting task is another process')
        resolved = [_checked(r, store) for r in wanted]
        _refuse_overlaps(resolved)
        largest_page = max(r.page_size or memory.page_size() for r in resolved)
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch (events read at once) must be a positive int, not {batch!r}")
        if (
            isinstance(buffer_bytes, bool)
            or not isinstance(buffer_bytes, int)
            or (buffer_bytes < largest_page)
        ):
            raise ValueError(f"buffer_bytes must be at least one page ({largest_page})")
        handler_cpu, pinned = _place(cpu)
        assert pinned is None
        stats = StatsBlock()
        control_read, control_write = os.pipe2(os.O_CLOEXEC)

        def body(channel: Channel) -> None:
            os.close(control_write)
            _supervise(channel, control_read, store, chosen, stats, handler_cpu, batch,
                       buffer_bytes)  # fmt: skip

        launched: Launched | None = None
        try:
            launched = launch(body)
            os.close(control_read)
            control_read = -1
            launched.channel.send(
                (int(uffd.features),
                 [(r.address, r.length, r.offset, r.page_size) for r in resolved]),
                [uffd.fileno()],
            )  # fmt: skip
            uffd.close()  # the supervisor holds it now
            (ready, _pid), _ = launched.channel.recv(timeout=30)
            if ready != "ready":
                raise RuntimeError(f"the handler did not start: {ready}")
        except BaseException:
            if launched is not None:
                launched.kill()
                os.close(launched.pidfd)
            for fd in (control_read, control_write):
                if fd >= 0:
                    os.close(fd)
            if pinned is not None:
                _unpin(pinned)
            raise
        finally:
            if launched is not None:
                launched.channel.sock.close()
        return Server(launched, control_write, stats, resolved, None)
    finally:
        uffd.close()


def _supervise(
    channel: Channel, control: int, store: Store, policy: Policy, stats: StatsBlock,
    cpu: int | None, batch: int, buffer_bytes: int,
) -> None:  # fmt: skip
    """The supervisor, whichever of its two signatures the runtime has (it is being reworked:
    an Options record replaces the loose arguments)."""
    supervise: Any = _supervisor.supervise
    options_type: Any = getattr(_supervisor, "Options", None)
    if options_type is not None:
        supervise(channel, control, options_type(store, policy, stats, batch, buffer_bytes), cpu)
    else:
        supervise(channel, control, store, policy, stats, cpu, batch, buffer_bytes)
