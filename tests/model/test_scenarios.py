"""The kernel scenarios beyond the seed's history: what exploring finds, against plain DFS."""

from __future__ import annotations

import pytest

from userfaultfd.model import PRESETS, SCENARIOS, Sizes, explore, table

KERNEL = [name for name, s in SCENARIOS.items() if s.group == "kernel"]


def test_the_groups() -> None:
    assert KERNEL == [
        "overlapping-punches",
        "wp-punch-pmd-edge",
        "minor-continue-punch",
        "private-cow-punch",
    ]
    protocols = [n for n, s in SCENARIOS.items() if s.group == "protocol"]
    assert protocols == ["missing-fill", "pager-evict", "live-snapshot"]
    rows = table(group="kernel", reduction="persistent")
    assert {r.result.scenario for r in rows} == set(KERNEL)


def test_overlapping_punches_serialize_and_pre_patch_still_races() -> None:
    v = explore("overlapping-punches", "pre-patch").violation
    assert v is not None and v.invariant == "untracked write"
    assert explore("overlapping-punches", "as-posted").violation is None


@pytest.mark.parametrize("preset", list(PRESETS))
def test_fault_around_stops_at_the_page_table_boundary(preset: str) -> None:
    # The read faults in the page table before the doomed page: its window cannot reach it.
    on = explore("wp-punch-pmd-edge", preset)
    off = explore("wp-punch-pmd-edge", preset, reduction="none")
    assert on.violation is None and off.violation is None
    assert (on.runs, on.faults) == (off.runs, off.faults)


def test_a_read_in_the_same_page_table_races_again_pre_patch() -> None:
    v = explore("wp-punch-pmd-edge", "pre-patch", sizes=Sizes(readers=2)).violation
    assert v is not None and v.invariant == "untracked write"
    assert v.schedule == "punch*2 read2*2 write*3"
    assert explore("wp-punch-pmd-edge", "upstream", sizes=Sizes(readers=2)).violation is None


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("scenario", ["minor-continue-punch", "private-cow-punch"])
def test_continue_and_cow_survive_a_punch(scenario: str, preset: str) -> None:
    on = explore(scenario, preset)
    off = explore(scenario, preset, reduction="none")
    assert on.violation is None and off.violation is None
    assert (on.runs, on.faults, on.stuck) == (off.runs, off.faults, off.stuck) and on.stuck == 0
