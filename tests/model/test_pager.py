"""The out-of-core pager's protocol (issue 22) as model threads, against the kernel presets.

The pager keeps a file's pages in shmem registered MISSING + WP: a fault fills the page from the
store write-protected, the first write raises a WP fault (the handler marks the page dirty and
lifts the protection), and eviction write-protects the page, writes it back if dirty and punches
it out. Invariant, *lost write*: every page holds the last value written to it (in its frame
while cached, in the store once evicted), and no read returns zeros.

Which presets should lose the write: the lost write needs a page mapped again after the punch's
pre-unmap and before its truncation, without protection. shmem_fault() waits for the punch, so
only fault-around can map it; and fault-around maps only into pte_none() slots, so a PTE marker
left by the pre-unmap stops it too. pre-patch has fault-around in a MISSING + WP range and no
markers: it alone loses the write; as-posted (no fault-around there), markers-only (markers)
and upstream (both) hold.
"""

from __future__ import annotations

import dataclasses

import pytest

from userfaultfd import Mode, model
from userfaultfd.model import (
    PRESETS,
    SCENARIOS,
    Kernel,
    Punch,
    Read,
    Serve,
    Sizes,
    Write,
    WriteBack,
    WriteProtect,
    explore,
    replay,
)

PAGER = SCENARIOS["pager-evict"]

#: (states, transitions) of the default sizes: persistent sets, then plain DFS. A change here
#: is a change of the model's rules, of the scenario, or of the reduction: say which.
COUNTS = {
    "pre-patch": ((362, 552), (437, 787)),
    "as-posted": ((374, 502), (619, 1142)),
    "markers-only": ((600, 929), (728, 1382)),
    "upstream": ((374, 502), (626, 1155)),
}


def test_pager_evict_is_a_protocol_scenario() -> None:
    assert PAGER.protocol and PAGER.invariant == "lost write"
    assert PAGER.sized() == Sizes(readers=1, writers=1, pages=2)
    with pytest.raises(ValueError, match="no punchers to size"):
        PAGER.sized(Sizes(punchers=1))
    with pytest.raises(ValueError, match="one writer per page: at most 2 writers"):
        explore(PAGER, sizes=Sizes(writers=3))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_only_pre_patch_loses_the_write_and_the_counts_are_pinned(preset: str) -> None:
    on = explore("pager-evict", preset)
    off = explore("pager-evict", preset, reduction="none")
    lost = preset == "pre-patch"
    for r in (on, off):
        assert (r.violation is not None) == lost, f"{preset} {r.reduction}: {r.violation}"
        assert r.stuck == 0, f"{preset} {r.reduction}: {r.stuck} runs where a thread never ended"
    if not lost:  # where it holds, the reduction keeps every complete run and the most faults
        assert (on.runs, on.faults) == (off.runs, off.faults) == (7, 6)
    assert ((on.states, on.transitions), (off.states, off.transitions)) == COUNTS[preset]


def test_the_counterexample_names_the_zap_and_the_fault_around_behind_the_handler() -> None:
    v = explore("pager-evict", "pre-patch").violation
    assert v is not None and v.invariant == "lost write"
    assert v.message == (
        "page 0 was written 'v2', but it was evicted and the store holds 'v1': the write is lost"
    )
    assert v.schedule == "handler*4 read*2 handler write*3 handler"
    steps = [(s.thread, s.function, s.change) for s in v.trace]
    # the eviction's protect and write-back went first, in order
    assert steps[0][:2] == ("handler", "UFFDIO_WRITEPROTECT")
    assert steps[1] == ("handler", "write back", "page 0: frame #1 ('v1') to the store; clean")
    # the punch's pre-unmap loses the protection, the read's fault-around maps the doomed page
    zap = steps.index(
        ("handler", "unmap_mapping_range", "VMA 0: page 0 zapped, its uffd-wp bit lost")
    )
    around = next(i for i, s in enumerate(steps) if s[1] == "do_fault_around")
    assert zap < around and "mapped 0 read-only (page 0 inside the hole" in steps[around][2]
    # ... and the write goes through it without a WP fault, onto the frame the punch drops
    functions = [f for _, f, _ in steps]
    assert "handle_userfault" not in functions
    assert steps[-2][1:] == (
        "store",
        "page 0: frame #1 'v1' -> 'v2' (a frame the punch in progress will drop)",
    )
    assert steps[-1][1] == "truncate_inode_folio" and "('v2') removed" in steps[-1][2]
    again = replay("pager-evict", v.schedule, "pre-patch")
    assert again.violation is not None and again.violation.message == v.message
    with pytest.raises(model.ScheduleError, match="step 10: thread 'write' cannot move"):
        replay("pager-evict", v.schedule, "upstream")  # the write sleeps: see below


#: Upstream, the same start (evict up to the pre-unmap, the read faults), then to the end.
UPSTREAM_RUN = (
    "handler*4 read*2 handler write*2 handler*3 write*3 handler*2 write*2 handler*2 write*3 "
    "read handler*2 read"
)


def test_upstream_serves_the_racing_write_through_a_refill_and_a_wp_fault() -> None:
    run = replay("pager-evict", UPSTREAM_RUN, "upstream")
    assert run.violation is None and run.complete
    steps = [(s.thread, s.function, s.change) for s in run.trace]
    assert steps[3] == (
        "handler",
        "unmap_mapping_range",
        "VMA 0: page 0 zapped, uffd-wp marker left",
    )
    assert steps[4][2] == "read fault on page 1 (PTE none): do_read_fault, no fault-around"
    assert (
        steps[8][2] == "file page 0 is in the hole [0, 1) being punched: shmem_falloc_wait sleeps"
    )
    # after the punch: a MISSING fault refills the written-back 'v1', write-protected; the write
    # raises a WP fault, the handler marks the page dirty and lets it through
    assert steps[16][1:] == (
        "UFFDIO_COPY",
        "page 0 (MODE_WP): new frame #2 ('v1') cached and mapped write-protected; woke write",
    )
    assert steps[20][2] == "page 0 marked dirty, then unprotected: uffd-wp cleared; woke write"
    assert steps[23] == ("write", "store", "page 0: frame #2 'v1' -> 'v2'")
    assert steps[-1] == ("read", "load", "page 1 reads 's1' (frame #3)")


@pytest.mark.parametrize(
    ("preset", "switch"),
    [
        ("pre-patch", {"pte_markers": True}),
        ("pre-patch", {"no_fault_around": Mode.WP}),
        ("markers-only", {"pte_markers": False}),
        ("upstream", {"pte_markers": False, "no_fault_around": Mode.MINOR}),
    ],
)
def test_either_guarantee_alone_closes_the_race_and_neither_loses_it(
    preset: str, switch: dict[str, object]
) -> None:
    flipped = dataclasses.replace(PRESETS[preset], **switch)  # type: ignore[arg-type]
    lost = explore("pager-evict", flipped).violation is not None
    assert lost == (not flipped.pte_markers and not flipped.no_fault_around & Mode.WP), flipped


def _pager(
    k: Kernel,
    z: Sizes,
    *,
    register: Mode,
    evict: tuple[str, ...] = ("protect", "back", "punch"),
    writer: bool = True,
) -> None:
    """The pager-evict layout with the eviction's steps in another order, or some left out."""
    f = k.shmem_file(2)
    v = k.mmap(f, 0x1000_0000, 2, register=register)
    k.copy(v, 0, wp=True)
    k.writeprotect(v, 0, protect=False)
    k.mark_dirty(v, 0)
    k.write(v, 0, "v1")
    ops: dict[str, WriteProtect | WriteBack | Punch] = {
        "protect": WriteProtect(v.id, 0),
        "back": WriteBack(v.id, 0),
        "punch": Punch(f.id, 0, 1),
    }
    k.spawn("handler", *(ops[e] for e in evict), Serve(pager=True))
    if writer:
        k.spawn("write", Write(v.id, 0, "v2"))
    k.spawn("read", Read(v.id, 1))


def _variant(name: str, **how: object) -> model.Scenario:
    return dataclasses.replace(
        PAGER,
        name=name,
        build_sized=lambda k, z: _pager(k, z, **how),  # type: ignore[arg-type]
    )


def test_the_same_layout_built_by_hand_explores_the_same() -> None:
    mine = explore(_variant("by-hand", register=Mode.MISSING | Mode.WP), "upstream")
    theirs = explore("pager-evict", "upstream")
    assert (mine.states, mine.transitions, mine.runs) == (theirs.states, theirs.transitions, 7)


@pytest.mark.parametrize(
    ("evict", "message"),
    [
        # written back before the protection: a write between the two is never written back
        (("back", "protect", "punch"), "it was evicted and the store holds 'v1'"),
        # never written back: the dirty 'v1' goes with the punch
        (("protect", "punch"), "was written 'v1', but it was evicted and the store holds 's0'"),
    ],
)
def test_the_invariant_catches_a_wrong_eviction_on_upstream(
    evict: tuple[str, ...], message: str
) -> None:
    wrong = _variant("wrong-eviction", register=Mode.MISSING | Mode.WP, evict=evict)
    v = explore(wrong, "upstream").violation
    assert v is not None and message in v.message, v


def test_the_invariant_catches_a_read_of_zeros_and_a_refault_behind_the_handler() -> None:
    # Registered WP alone, an absent page is allocated zeroed behind the handler: the read of
    # page 1 sees zeros, and the write after the eviction lands on a zero page, not on 'v1'.
    v = explore(_variant("no-missing", register=Mode.WP, writer=False), "upstream").violation
    assert v is not None and v.message == "read read zeros from page 1", v
    v = explore(_variant("no-missing", register=Mode.WP), "upstream").violation
    assert v is not None and v.message == (
        "page 0 was written 'v1', but its page in the cache holds '0'"
    ), v
