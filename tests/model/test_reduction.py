"""Persistent sets against plain DFS beyond the default sizes: the same verdicts and end states.

The reduction may explore fewer states, but never change a verdict, and since persistent sets
keep every terminal state, the complete runs, their most faults and the deadlocks agree too.
"""

from __future__ import annotations

import re

import pytest

from userfaultfd.model import PRESETS, Sizes, explore

SIZED = [
    ("wp-punch-hole", Sizes(punch=((0, 3),))),
    ("wp-punch-hole", Sizes(punchers=2)),
    ("wp-punch-hole", Sizes(writers=0)),
    ("wp-punch-hole", Sizes(readers=2, pages=8)),
    ("minor-fault-around", Sizes(readers=3)),
    ("minor-fault-around", Sizes(readers=2, pages=8)),
    ("missing-shared-cache", Sizes(writers=2, pages=6)),
    ("overlapping-punches", Sizes(readers=0)),
    ("live-snapshot", Sizes(readers=0)),
    ("live-snapshot", Sizes(punchers=0)),
    ("wp-punch-pmd-edge", Sizes(readers=2)),
]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize(("scenario", "sizes"), SIZED)
def test_persistent_sets_agree_with_plain_dfs(scenario: str, sizes: Sizes, preset: str) -> None:
    on = explore(scenario, preset, sizes=sizes, reduction="persistent")
    off = explore(scenario, preset, sizes=sizes, reduction="none")
    if off.violation is None:
        assert on.violation is None
        assert (on.runs, on.faults, on.stuck) == (off.runs, off.faults, off.stuck)
        assert off.stuck == 0
    else:
        assert on.violation is not None and on.violation.invariant == off.violation.invariant
    assert on.states <= off.states


def test_the_reduction_grows_with_the_threads() -> None:
    # upstream wp-punch-hole: plain DFS grows about 7x per reader, persistent sets barely.
    one = explore("wp-punch-hole", "upstream", reduction="persistent")
    two = explore("wp-punch-hole", "upstream", sizes=Sizes(readers=2), reduction="persistent")
    plain = explore("wp-punch-hole", "upstream", sizes=Sizes(readers=2), reduction="none")
    assert plain.violation is None and two.violation is None
    assert two.states < 2 * one.states
    assert 40 * two.states < plain.states


def test_a_bigger_race_is_still_found() -> None:
    r = explore("wp-punch-hole", "pre-patch", sizes=Sizes(readers=2, writers=2, pages=8))
    assert r.violation is not None and r.violation.invariant == "untracked write"


@pytest.mark.parametrize(
    ("scenario", "sizes", "message"),
    [
        ("minor-fault-around", Sizes(punchers=1), "has no punchers to size"),
        ("minor-fault-around", Sizes(punch=((0, 1),)), "has no punchers"),
        ("wp-punch-hole", Sizes(pages=1), "pages must be between 2 and 64"),
        ("wp-punch-hole", Sizes(writers=65), "writers must be between 0 and 64"),
        ("wp-punch-hole", Sizes(punch=((3, 2),)), "punch range 3+2 is outside the file's 4"),
    ],
)
def test_sizes_a_scenario_cannot_take_are_refused(
    scenario: str, sizes: Sizes, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        explore(scenario, "upstream", sizes=sizes)
