"""The runtime's live-snapshot protocol as model threads, against the kernel presets.

The protocol (userfaultfd.tools.snapshot): write-protect the range at one instant; the fault
thread saves a page before lifting its protection; a background copy saves the rest in order,
skipping pages the fault thread saved. Invariant, *stale snapshot*: every page the snapshot saved
holds what it held at the protect instant, unless the program dropped that frame (punched it)
since, which the tool's contract allows.
"""

from __future__ import annotations

import pytest

from userfaultfd.model import SCENARIOS, Sizes, explore, replay

# writers of page 1 (mapped at the instant) and page 3 (only cached), no punch, no reader
UNMAPPED = Sizes(readers=0, writers=2, punchers=0, pages=4)


@pytest.mark.parametrize("preset", ["pre-patch", "as-posted", "markers-only", "upstream"])
def test_the_fill_path_holds_on_every_preset(preset: str) -> None:
    # Copy the faulting page first (EEXIST: filled by someone else), then prefetch, stopping
    # at a page already there: no read ever sees zeros, whatever fault-around does.
    on = explore("missing-fill", preset)
    off = explore("missing-fill", preset, reduction="none")
    assert on.violation is None and off.violation is None
    assert (on.runs, on.faults, on.stuck) == (off.runs, off.faults, off.stuck) and on.stuck == 0


def test_the_fill_path_meets_eexist_and_a_stopped_prefetch() -> None:
    run = replay("missing-fill", "read*4 handler*4", "upstream")
    changes = [s.change for s in run.trace if s.function == "UFFDIO_COPY"]
    assert changes[0].startswith("page 0: new frame")
    assert changes[1].startswith("prefetch page 1: already there: the copy stops")
    assert changes[2].startswith("prefetch page 2: new frame")


def test_live_snapshot_is_a_protocol_scenario_outside_the_history_table() -> None:
    assert SCENARIOS["live-snapshot"].protocol
    assert SCENARIOS["live-snapshot"].invariant == "stale snapshot"


def test_live_snapshot_holds_upstream_with_a_writer_a_punch_and_a_reader() -> None:
    r = explore("live-snapshot", "upstream")
    assert r.violation is None
    assert r.stuck == 0 and r.runs > 100


@pytest.mark.parametrize("preset", ["upstream", "markers-only"])
def test_live_snapshot_holds_with_markers_for_a_page_not_mapped_at_the_instant(
    preset: str,
) -> None:
    on = explore("live-snapshot", preset, sizes=UNMAPPED)
    off = explore("live-snapshot", preset, sizes=UNMAPPED, reduction="none")
    assert on.violation is None and off.violation is None
    assert (on.runs, on.faults, on.stuck) == (off.runs, off.faults, off.stuck)
    assert on.states < off.states


@pytest.mark.parametrize("preset", ["pre-patch", "as-posted"])
def test_without_markers_a_page_not_mapped_at_the_instant_is_not_protected(preset: str) -> None:
    for reduction in ("persistent", "none"):
        v = explore("live-snapshot", preset, sizes=UNMAPPED, reduction=reduction).violation
        assert v is not None and v.invariant == "stale snapshot"
        assert "saved page 3 holding 'v2'" in v.message and "it held 'p3'" in v.message
        # the write went through without a WP fault: no handler step in the trace
        assert [s.function for s in v.trace].count("handle_userfault") == 0


def test_pre_patch_loses_a_write_to_the_seed_race_mid_snapshot() -> None:
    v = explore("live-snapshot", "pre-patch").violation
    assert v is not None
    assert "saved page 1 holding 'v2'" in v.message and "it held 'v1'" in v.message
    functions = [s.function for s in v.trace]
    assert "do_fault_around" in functions and "unmap_mapping_range" in functions
    again = replay("live-snapshot", v.schedule, "pre-patch")
    assert again.violation is not None and again.violation.message == v.message


def test_as_posted_misses_a_page_punched_before_the_instant_then_written() -> None:
    v = explore("live-snapshot", "as-posted").violation
    assert v is not None
    assert "saved page 1 holding 'v2'" in v.message and "it held '0'" in v.message
