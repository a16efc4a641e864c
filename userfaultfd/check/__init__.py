"""``uffd check``: prove on the running kernel that userspace governs every page of a
userfaultfd range, and that the features tools rely on behave.

Five checks, each a generator of :class:`CheckResult` records: ``footprint`` (what one read
fault maps), ``race`` (the seed's data-loss race, live), ``matrix`` (registration per memory
type and mode), ``semantics`` (WP_UNPOPULATED, PTE markers, EAGAIN, close wakes), ``model``
(the kernel model's predictions against the kernel). :func:`pager_guarantees` runs the probes
the out-of-core pager relies on, once per process. Verdicts are decided by small pure
``judge_*`` functions, so a test can feed them a wrong kernel answer and watch them fail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ._agreement import agreement as _agreement
from ._footprint import footprint as _footprint
from ._matrix import matrix as _matrix
from ._pager import PagerGuarantees as PagerGuarantees
from ._pager import pager_guarantees as pager_guarantees
from ._race import race as _race
from ._result import CheckOptions as CheckOptions
from ._result import CheckResult as CheckResult
from ._result import Status as Status
from ._semantics import semantics as _semantics

__all__ = [
    "CHECKS",
    "CheckOptions",
    "CheckResult",
    "PagerGuarantees",
    "Status",
    "pager_guarantees",
    "run_checks",
]

#: The checks by name, in the order they run.
CHECKS: dict[str, Callable[[CheckOptions], Iterator[CheckResult]]] = {
    "footprint": _footprint,
    "race": _race,
    "matrix": _matrix,
    "semantics": _semantics,
    "model": _agreement,
}


def run_checks(
    only: Iterable[str] | None = None, options: CheckOptions | None = None
) -> Iterator[CheckResult]:
    """Run the named checks (all by default), yielding each result as soon as it is known."""
    names = list(CHECKS) if only is None else list(only)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown check {', '.join(unknown)}; the checks are {', '.join(CHECKS)}")
    chosen = options or CheckOptions()
    for name in names:
        yield from CHECKS[name](chosen)
