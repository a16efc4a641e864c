"""The seed's scenarios: a system built with the kernel API, threads, and one invariant each.

No scenario says what its outcome should be: verdicts come only from exploring.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from .._flags import Mode
from .kernel import Kernel, Punch, Read, Serve, Write
from .presets import UnknownNameError
from .state import Present, World

__all__ = ["SCENARIOS", "Scenario", "get_scenario"]

# 256 MiB: aligned to a page table (2 MiB), so windows clip to the VMA, not to the PMD.
_BASE = 0x1000_0000


@dataclass(frozen=True, slots=True)
class Scenario:
    """A system to explore: ``build`` sets up a Kernel and spawns its threads; ``check`` returns
    a message if a state breaks ``invariant``."""

    name: str
    summary: str
    invariant: str
    build: Callable[[Kernel], None]
    check: Callable[[Kernel, World], str | None]
    #: Whether writing this footprint object can change what ``check`` says (a visible step:
    #: persistent sets never postpone one).
    watches: Callable[[Kernel, Hashable], bool]


# -- wp-punch-hole --------------------------------------------------------------------------------
def _build_wp_punch_hole(k: Kernel) -> None:
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, _BASE, 4, register=Mode.WP)
    k.write(v, 1, "v1")  # the application wrote page 1 (mapping only that page) ...
    k.writeprotect(v, 1)  # ... and the server write-protected it to track it
    k.spawn("punch", Punch(f.id, 1, 1))
    k.spawn("read", Read(v.id, 2))
    k.spawn("write", Write(v.id, 1, "v2"))
    k.spawn("server", Serve())


def _untracked_write(k: Kernel, w: World) -> str | None:
    for fid, data in w.protected.items():
        frame = w.frames[fid]
        if frame.data != data and fid not in w.saved:
            return (
                f"frame #{fid} (file page {frame.index}) was write-protected holding {data!r} "
                f"and now holds {frame.data!r}, but the server got no WP message for it"
            )
    return None


def _watches_untracked(k: Kernel, obj: Hashable) -> bool:
    # The check reads frame contents, the protected frames and the saved ones.
    return isinstance(obj, tuple) and (
        obj[0] == "data" or obj in (("log", "saved"), ("log", "protected"))
    )


# -- minor-fault-around ---------------------------------------------------------------------------
def _build_minor_fault_around(k: Kernel) -> None:
    f = k.shmem_file(4, cached=range(4))
    v = k.mmap(f, _BASE, 4, register=Mode.MINOR)
    k.spawn("read0", Read(v.id, 0))
    k.spawn("read2", Read(v.id, 2))
    k.spawn("server", Serve())


def _unnotified_mapping(k: Kernel, w: World) -> str | None:
    for (vid, i), pte in sorted(w.ptes.items(), key=lambda item: item[0]):
        if (
            k.vmas[vid].register & Mode.MINOR
            and isinstance(pte, Present)
            and (vid, i) not in w.resolved
        ):
            data = w.frames[pte.frame].data
            return (
                f"page {i} of VMA {vid} is mapped to frame #{pte.frame} ({data!r}) "
                "but the server never resolved a MINOR message for it"
            )
    return None


def _watches_unnotified(k: Kernel, obj: Hashable) -> bool:
    # The check reads PTEs of MINOR VMAs and the resolved addresses.
    if not isinstance(obj, tuple):
        return False
    if obj[0] == "pte":
        return bool(k.vmas[obj[1]].register & Mode.MINOR)
    return obj == ("log", "resolved")


# -- missing-shared-cache -------------------------------------------------------------------------
def _build_missing_shared_cache(k: Kernel) -> None:
    f = k.shmem_file(8)
    filler = k.mmap(f, _BASE, 8, mm=0)
    reader = k.mmap(f, _BASE, 8, mm=1, register=Mode.MISSING)
    for i in range(4):
        k.write(filler, i, f"a{i}")  # another process filled half the page cache
    k.spawn("read", *(Read(reader.id, i) for i in range(6)))
    k.spawn("fill", Write(filler.id, 5, "a5"))
    k.spawn("server", Serve())


def _silent_missing(k: Kernel, w: World) -> str | None:
    for fid, frame in sorted(w.frames.items()):
        if frame.origin == "fault" and frame.vma >= 0 and k.vmas[frame.vma].register & Mode.MISSING:
            return (
                f"file page {frame.index} was absent, yet a fault in VMA {frame.vma} "
                f"(registered MISSING) allocated frame #{fid} without a MISSING message"
            )
    return None


def _watches_silent(k: Kernel, obj: Hashable) -> bool:
    # The check reads the frames that exist: only an allocation adds one.
    return obj == ("alloc",)


#: Every scenario, in a stable order.
SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "wp-punch-hole",
            "the seed: punch a hole over a write-protected shmem page while a neighbour's read "
            "fault faults around and another thread writes the page",
            "untracked write",
            _build_wp_punch_hole,
            _untracked_write,
            _watches_untracked,
        ),
        Scenario(
            "minor-fault-around",
            "two readers of a MINOR-registered shmem range whose pages are all cached",
            "unnotified mapping",
            _build_minor_fault_around,
            _unnotified_mapping,
            _watches_unnotified,
        ),
        Scenario(
            "missing-shared-cache",
            "a MISSING-registered mapping reads pages another process half filled in the cache, "
            "while that process writes one more",
            "silent missing page",
            _build_missing_shared_cache,
            _silent_missing,
            _watches_silent,
        ),
    )
}


def get_scenario(scenario: Scenario | str) -> Scenario:
    """The scenario of that name (a Scenario passes through)."""
    if isinstance(scenario, Scenario):
        return scenario
    try:
        return SCENARIOS[scenario]
    except KeyError:
        raise UnknownNameError(
            f"unknown scenario {scenario!r} (choose from {', '.join(SCENARIOS)})"
        ) from None
