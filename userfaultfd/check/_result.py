"""What a check reports: records, and the options that bound its work."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import final

__all__ = ["CheckOptions", "CheckResult", "Status"]


class Status(enum.Enum):
    """The verdict of one check: it passed, failed, or could not run here (and why)."""

    PASS = "PASS"
    FAIL = "FAIL"
    SKIP = "SKIP"


@final
@dataclass(frozen=True, slots=True)
class CheckResult:
    """One case of one check: its verdict and the one-line reason behind it."""

    #: The check it belongs to ("footprint", "race", "matrix", "semantics", "model").
    check: str
    #: What was tried, e.g. "shmem-shared/WP".
    case: str
    status: Status
    reason: str
    seconds: float = 0.0


@final
@dataclass(frozen=True, slots=True)
class CheckOptions:
    """Bounds and knobs; the defaults keep a whole run under a minute on a 2-CPU machine."""

    #: Deadline for any one child process of a check.
    timeout: float = 20.0
    #: The live race: at most this many iterations, and this many seconds.
    race_iterations: int = 3000
    race_seconds: float = 10.0
    #: Model agreement: random layouts to compare, and the seed that makes them.
    layouts: int = 300
    seed: int = 1
    #: fault_around_bytes of the running kernel; None: read debugfs, else the default 65536.
    fault_around_bytes: int | None = None
    #: A directory on a disk file system, for the regular-file footprint; None: looked up.
    scratch_dir: str | None = None
    #: Where /proc is.
    proc: str = "/proc"
