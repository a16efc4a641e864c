"""The kernel's history, from exploring: each preset against each scenario."""

from __future__ import annotations

from dataclasses import replace

import pytest

from userfaultfd._flags import Mode
from userfaultfd.model import PRESETS, REDUCTIONS, SCENARIOS, ScheduleError, explore, replay

# Tests may write verdicts down; the library may not.
HISTORY = {
    ("pre-patch", "wp-punch-hole"): "untracked write",
    ("pre-patch", "minor-fault-around"): "unnotified mapping",
    ("pre-patch", "missing-shared-cache"): None,
    ("as-posted", "wp-punch-hole"): None,
    ("as-posted", "minor-fault-around"): "unnotified mapping",
    ("as-posted", "missing-shared-cache"): None,
    ("markers-only", "wp-punch-hole"): None,
    ("markers-only", "minor-fault-around"): "unnotified mapping",
    ("markers-only", "missing-shared-cache"): None,
    ("upstream", "wp-punch-hole"): None,
    ("upstream", "minor-fault-around"): None,
    ("upstream", "missing-shared-cache"): None,
}


KERNEL_SCENARIOS = [name for name, s in SCENARIOS.items() if s.group == "history"]


def test_every_preset_and_scenario_is_in_the_history() -> None:
    assert set(HISTORY) == {(p, s) for p in PRESETS for s in KERNEL_SCENARIOS}
    assert list(PRESETS) == ["pre-patch", "as-posted", "markers-only", "upstream"]
    assert KERNEL_SCENARIOS == ["wp-punch-hole", "minor-fault-around", "missing-shared-cache"]


@pytest.mark.parametrize(("preset", "scenario"), sorted(HISTORY))
def test_verdict(preset: str, scenario: str) -> None:
    result = explore(scenario, preset)
    found = None if result.violation is None else result.violation.invariant
    assert found == HISTORY[(preset, scenario)]
    assert result.stuck == 0
    if result.violation is None:
        assert result.runs > 0


@pytest.mark.parametrize(("preset", "scenario"), sorted(HISTORY))
def test_sleep_sets_keep_verdicts_and_states_and_save_transitions(
    preset: str, scenario: str
) -> None:
    on = explore(scenario, preset, reduction="sleep")
    off = explore(scenario, preset, reduction="none")
    assert (on.violation is None) == (off.violation is None)
    if on.violation is None:
        assert on.states == off.states  # sleep sets prune transitions, never states
        assert on.runs == off.runs
        assert on.faults == off.faults
        assert on.transitions < off.transitions


@pytest.mark.parametrize(("preset", "scenario"), sorted(HISTORY))
def test_persistent_sets_keep_verdicts_and_every_end_state_and_cut_states(
    preset: str, scenario: str
) -> None:
    on = explore(scenario, preset, reduction="persistent")
    off = explore(scenario, preset, reduction="none")
    assert (on.violation is not None and off.violation is not None) or on.violation == off.violation
    if off.violation is not None:
        assert on.violation is not None and on.violation.invariant == off.violation.invariant
        assert on.states <= off.states
    else:
        # Persistent sets keep every terminal state, so complete runs and faults agree too.
        assert (on.runs, on.faults, on.stuck) == (off.runs, off.faults, off.stuck)
        assert on.states < off.states


def test_persistent_sets_cut_the_seed_scenario_at_least_fivefold() -> None:
    for preset in ("as-posted", "upstream"):
        on = explore("wp-punch-hole", preset, reduction="persistent")
        off = explore("wp-punch-hole", preset, reduction="none")
        assert on.violation is None and off.violation is None
        assert 5 * on.states < off.states


def test_as_posted_takes_more_faults_where_the_cache_was_filled_elsewhere() -> None:
    faults = {p: explore("missing-shared-cache", p).faults for p in PRESETS}
    assert faults["as-posted"] > faults["upstream"]
    assert faults["upstream"] == faults["pre-patch"] == faults["markers-only"]
    assert faults == {"pre-patch": 5, "as-posted": 8, "markers-only": 5, "upstream": 5}


@pytest.mark.parametrize(
    ("preset", "switch", "scenario"),
    [
        ("markers-only", {"pte_markers": False}, "wp-punch-hole"),
        ("as-posted", {"no_fault_around": Mode.MISSING}, "wp-punch-hole"),
        ("upstream", {"no_fault_around": Mode.WP}, "minor-fault-around"),
        ("pre-patch", {"no_fault_around": Mode.MINOR}, "minor-fault-around"),
        ("pre-patch", {"pte_markers": True}, "wp-punch-hole"),
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_flipping_one_switch_flips_the_verdict(
    preset: str, switch: dict[str, object], scenario: str, reduction: str
) -> None:
    base = PRESETS[preset]
    flipped = replace(base, name=f"{preset}*", **switch)  # type: ignore[arg-type]
    before = explore(scenario, base, reduction=reduction).violation
    after = explore(scenario, flipped, reduction=reduction).violation
    assert (before is None) != (after is None)
    # and each reduction finds what plain DFS finds
    plain = explore(scenario, flipped, reduction="none").violation
    assert (after is None) == (plain is None)
    if after is not None and plain is not None:
        assert after.invariant == plain.invariant


def test_upstream_keeps_its_verdicts_without_markers_thanks_to_the_exclusion() -> None:
    # Only the second half of the 5.19 fix is needed against this scenario.
    no_markers = replace(PRESETS["upstream"], pte_markers=False)
    assert explore("wp-punch-hole", no_markers).violation is None


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scenario", ["wp-punch-hole", "minor-fault-around"])
def test_no_fault_around_no_violation(scenario: str, reduction: str) -> None:
    found = explore(scenario, "pre-patch", fault_around_bytes=4096, reduction=reduction)
    assert found.violation is None


def test_counterexample_shows_the_write_landing_on_the_doomed_page() -> None:
    v = explore("wp-punch-hole", "pre-patch").violation
    assert v is not None
    functions = [(s.thread, s.function) for s in v.trace]
    assert functions == [
        ("punch", "shmem_fallocate"),
        ("punch", "unmap_mapping_range"),
        ("read", "handle_mm_fault"),
        ("read", "do_fault_around"),
        ("write", "handle_mm_fault"),
        ("write", "wp_page_reuse"),
        ("write", "store"),
    ]
    assert "uffd-wp bit lost" in v.trace[1].change
    assert "will drop" in v.trace[-1].change
    assert [s.number for s in v.trace + v.aftermath] == list(range(1, 1 + 7 + len(v.aftermath)))
    dropped = [s for s in v.aftermath if s.function == "truncate_inode_folio"]
    assert dropped and "'v2'" in dropped[0].change
    assert v.schedule == "punch*2 read*2 write*3"


@pytest.mark.parametrize(
    ("preset", "scenario"), [k for k, verdict in sorted(HISTORY.items()) if verdict]
)
def test_replaying_a_counterexample_reproduces_it(preset: str, scenario: str) -> None:
    v = explore(scenario, preset).violation
    assert v is not None
    again = replay(scenario, v.schedule, preset)
    assert again.violation is not None
    assert (again.violation.invariant, again.violation.message) == (v.invariant, v.message)
    assert again.trace == v.trace


def test_the_seed_schedule_cannot_run_upstream() -> None:
    with pytest.raises(ScheduleError, match="step 7: thread 'write' cannot move"):
        replay("wp-punch-hole", "punch*2 read*2 write*3", "upstream")


def test_a_harmless_schedule_replays_without_violation() -> None:
    run = replay("wp-punch-hole", "punch*6 read*3 write*5", "pre-patch")
    assert run.violation is None
    assert len(run.trace) == 14
    assert run.complete


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_exploring_is_deterministic(reduction: str) -> None:
    for preset in PRESETS:
        for scenario in KERNEL_SCENARIOS:
            first = explore(scenario, preset, reduction=reduction)
            assert first == explore(scenario, preset, reduction=reduction)
