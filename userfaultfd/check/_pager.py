"""What the out-of-core pager needs of the running kernel, proved once per process.

The pager (issue 22) keeps pages in shmem registered MISSING + WP, fills them write-protected,
learns of the first write from its WP fault, and evicts by protecting, writing back and punching
a hole. The model (``uffd model run pager-evict``) shows the write it loses on a kernel that maps
a page around a fault behind the handler while the punch's pre-unmap has wiped the page's
protection. Two probes of ``uffd check`` prove the guarantees that close it, here on the running
kernel:

- *no fault-around*: a read fault in a shmem range registered MISSING + WP (the pager's own
  registration) maps only the faulted page (the seed's promise; check 1's measurement);
- *WP survives a punch*: a write to a protected shmem page after a hole was punched over it
  still raises a WP fault (PTE markers; check 4's ``wp-after-punch``).

In the model either one closes the pager's race (tests/model/test_pager.py); a budget asks for
both, as the kernels that merged them (5.19) have both, and the second also guards the paths the
model leaves out. :func:`pager_guarantees` runs the probes the first time it is called in a
process (a few hundredths of a second here: each forks a child) and keeps the answer.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass
from typing import final

from .._errors import FeatureUnavailableError
from .._flags import Mode
from ._footprint import FAULTED, disk_directory, judge_footprint, measure_footprint
from ._result import CheckOptions, CheckResult, Status
from ._semantics import expect_wp_fault
from ._serve import pagemap_refusal

__all__ = ["PagerGuarantees", "pager_guarantees", "probe_pager_guarantees"]

#: The pager's registration.
PAGER_MODE = Mode.MISSING | Mode.WP


@final
@dataclass(frozen=True, slots=True)
class PagerGuarantees:
    """The out-of-core pager's preconditions on this kernel, each the result of its probe."""

    #: A read fault in a MISSING + WP shmem range maps only the faulted page.
    no_fault_around: CheckResult
    #: A protected shmem page keeps its protection across a hole punch (PTE markers).
    wp_survives_punch: CheckResult

    @property
    def missing(self) -> tuple[CheckResult, ...]:
        """The guarantees that were not proved (failed, or could not be probed)."""
        return tuple(
            r for r in (self.no_fault_around, self.wp_survives_punch) if r.status is not Status.PASS
        )

    @property
    def ok(self) -> bool:
        return not self.missing

    def require(self, what: str = "an out-of-core array (lazy(budget=...))") -> None:
        """Raise FeatureUnavailableError naming every missing guarantee, if any is missing."""
        if self.ok:
            return
        named = "; ".join(f"{r.case}: {r.reason}" for r in self.missing)
        raise FeatureUnavailableError(
            errno.EOPNOTSUPP,
            f"{what} needs a kernel that never maps a page behind the handler in a "
            f"write-protected shmem range and keeps write protection across a hole punch "
            f"(Linux 5.19+); not proved here: {named}",
        )


def _no_fault_around(options: CheckOptions) -> CheckResult:
    case = "no-fault-around"
    started = time.monotonic()
    refusal = pagemap_refusal(options.proc)
    if refusal:
        return CheckResult("pager", case, Status.SKIP, f"could not probe: {refusal}")
    scratch = options.scratch_dir or disk_directory(options.proc)
    try:
        baseline = measure_footprint("shmem-shared", None, options, scratch)
        mapped = measure_footprint("shmem-shared", PAGER_MODE, options, scratch)
    except (OSError, TimeoutError, RuntimeError) as err:
        return CheckResult("pager", case, Status.FAIL, f"could not probe: {err}")
    status, reason = judge_footprint("shmem-shared", PAGER_MODE, mapped, FAULTED, len(baseline))
    if status is Status.SKIP:  # fault-around is off: nothing is mapped around any fault
        status = Status.PASS
        reason = "1 page mapped by a read fault: fault-around is off on this kernel"
    return CheckResult("pager", case, status, reason, time.monotonic() - started)


def _wp_survives_punch(options: CheckOptions) -> CheckResult:
    started = time.monotonic()
    try:
        status, reason = expect_wp_fault("shmem", options, punch=True)
    except (OSError, TimeoutError, RuntimeError) as err:
        status, reason = Status.FAIL, f"could not probe: {err}"
    return CheckResult("pager", "wp-survives-punch", status, reason, time.monotonic() - started)


def probe_pager_guarantees(options: CheckOptions | None = None) -> PagerGuarantees:
    """Run both probes now (uncached)."""
    chosen = options or CheckOptions()
    return PagerGuarantees(_no_fault_around(chosen), _wp_survives_punch(chosen))


_lock = threading.Lock()
_cached: PagerGuarantees | None = None


def pager_guarantees() -> PagerGuarantees:
    """The pager's guarantees on the running kernel: probed on the first call in this process
    (threads that call meanwhile wait for that answer), the same record after that."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = probe_pager_guarantees()
        return _cached
