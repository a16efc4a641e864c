"""Check 3: what UFFDIO_REGISTER answers for each mode on each kind of memory.

No fault is taken: registration alone says which ioctls a range supports. A mode the kernel's
feature bits promise must register, and one they rule out must be refused.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext

from .. import memory
from .._core import Userfaultfd, supported_features
from .._errors import UserfaultfdError
from .._flags import Feature, Ioctl, Mode
from ._result import CheckOptions, CheckResult, Status

__all__ = ["expected_modes", "judge_matrix", "matrix"]

_MODES = (Mode.MISSING, Mode.WP, Mode.MINOR)


def expected_modes(kind: str, features: Feature) -> dict[Mode, bool]:
    """Which modes the advertised features say ``kind`` memory can be registered in."""
    if kind == "anonymous":
        return {Mode.MISSING: True, Mode.WP: bool(features & Feature.PAGEFAULT_FLAG_WP),
                Mode.MINOR: False}  # fmt: skip
    if kind == "shmem":
        return {Mode.MISSING: bool(features & Feature.MISSING_SHMEM),
                Mode.WP: bool(features & Feature.WP_HUGETLBFS_SHMEM),
                Mode.MINOR: bool(features & Feature.MINOR_SHMEM)}  # fmt: skip
    return {Mode.MISSING: bool(features & Feature.MISSING_HUGETLBFS),
            Mode.WP: bool(features & Feature.WP_HUGETLBFS_SHMEM),
            Mode.MINOR: bool(features & Feature.MINOR_HUGETLBFS)}  # fmt: skip


def judge_matrix(
    kind: str, outcomes: Mapping[Mode, Ioctl | None], features: Feature
) -> tuple[Status, str]:
    """``outcomes``: the ioctls each mode registered with, or None where it was refused."""
    expected = expected_modes(kind, features)
    wrong = [str(m.name) for m in _MODES if (outcomes[m] is not None) != expected[m]]
    parts = []
    for mode in _MODES:
        got = outcomes[mode]
        names = "refused" if got is None else "|".join(str(i.name) for i in Ioctl if i & got)
        parts.append(f"{mode.name}: {names}")
    summary = "; ".join(parts)
    if wrong:
        return Status.FAIL, f"{', '.join(wrong)} contradict the feature bits. {summary}"
    return Status.PASS, summary


def _register_each(make: Callable[[], memory.Mapping]) -> dict[Mode, Ioctl | None]:
    outcomes: dict[Mode, Ioctl | None] = {}
    for mode in _MODES:
        with make() as mapping, Userfaultfd(user_mode_only=True) as uffd:
            try:
                outcomes[mode] = uffd.register(mapping.address, mapping.length, mode)
            except UserfaultfdError as err:
                if err.errno != errno.EINVAL:
                    raise
                outcomes[mode] = None
    return outcomes


def matrix(options: CheckOptions) -> Iterator[CheckResult]:
    """Check 3."""
    features = supported_features()
    page = memory.page_size()
    kinds: list[tuple[str, Callable[[], memory.Mapping]]] = [
        ("anonymous", lambda: memory.anonymous(4 * page)),
        ("shmem", lambda: memory.memfd(4 * page)),
    ]
    for kind, make in kinds:
        started = time.monotonic()
        status, reason = judge_matrix(kind, _register_each(make), features)
        yield CheckResult("matrix", kind, status, reason, time.monotonic() - started)
    started = time.monotonic()
    huge = memory.huge_page_size(proc=options.proc)
    reserve: AbstractContextManager[object]
    if os.geteuid() == 0:
        reserve = memory.huge_pages(2, proc=options.proc)
    elif memory.free_huge_pages(proc=options.proc) >= 1:
        reserve = nullcontext()
    else:
        yield CheckResult("matrix", "hugetlbfs", Status.SKIP,
                          "no free huge pages, and reserving some needs root")  # fmt: skip
        return
    with reserve:
        outcomes = _register_each(lambda: memory.memfd(huge, hugetlb=True))
    status, reason = judge_matrix("hugetlbfs", outcomes, features)
    yield CheckResult("matrix", "hugetlbfs", status, reason, time.monotonic() - started)
