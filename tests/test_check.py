"""``uffd check``: every check passes on this kernel, and each fails when the kernel is wrong."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from userfaultfd import FeatureUnavailableError, Ioctl, Mode, _libc, supported_features
from userfaultfd.check import (
    CHECKS,
    CheckOptions,
    CheckResult,
    PagerGuarantees,
    Status,
    _pager,
    pager_guarantees,
    run_checks,
)
from userfaultfd.check._agreement import Layout, agreement, model_prediction, random_layouts
from userfaultfd.check._footprint import FAULTED, footprint, judge_footprint
from userfaultfd.check._matrix import judge_matrix
from userfaultfd.check._race import RaceTally, judge_race
from userfaultfd.cli import main

FAST = CheckOptions(race_iterations=300, race_seconds=3.0, layouts=120)


@pytest.mark.parametrize("name", list(CHECKS))
def test_every_check_passes_on_this_kernel(name: str) -> None:
    results = list(run_checks([name], FAST))
    assert results, f"check {name} reported nothing"
    failed = [r for r in results if r.status is not Status.PASS]
    assert not failed, failed


def test_footprint_cases_cover_every_kind_and_mode() -> None:
    cases = [r.case for r in run_checks(["footprint"], FAST)]
    assert cases == [
        "shmem-shared/none", "shmem-shared/WP", "shmem-shared/MINOR", "shmem-shared/MISSING",
        "shmem-private/none", "shmem-private/WP", "shmem-private/MINOR", "shmem-private/MISSING",
        "file/none",
    ]  # fmt: skip


# -- a wrong kernel answer makes a check fail ------------------------------------------------


def test_footprint_fails_when_a_wp_range_is_faulted_around() -> None:
    window = list(range(16, 32))

    def fake(kind: str, mode: Mode | None, options: CheckOptions, scratch: str) -> list[int]:
        return window  # as the kernel before 5.19 did: fault-around everywhere

    results = {r.case: r for r in footprint(FAST, measure=fake)}
    assert results["shmem-shared/none"].status is Status.PASS
    assert results["shmem-shared/WP"].status is Status.FAIL
    assert "behind the handler's back" in results["shmem-shared/WP"].reason
    assert results["shmem-shared/MINOR"].status is Status.FAIL
    assert results["shmem-shared/MISSING"].status is Status.PASS


def test_footprint_judge_rules() -> None:
    assert judge_footprint("shmem-shared", Mode.WP, [FAULTED], FAULTED, 16)[0] is Status.PASS
    assert judge_footprint("shmem-shared", Mode.WP, [3], FAULTED, 16)[0] is Status.FAIL
    assert judge_footprint("shmem-shared", Mode.MINOR, [FAULTED], FAULTED, 1)[0] is Status.SKIP
    status, reason = judge_footprint("file", None, list(range(16, 32)), FAULTED, None)
    assert status is Status.PASS and "64 KiB window" in reason


def test_race_fails_on_an_untracked_write() -> None:
    status, reason = judge_race(RaceTally(iterations=100, tracked=60, untracked=2))
    assert status is Status.FAIL and "2 of 100 iterations" in reason
    assert judge_race(RaceTally(iterations=100, tracked=60, untracked=0))[0] is Status.PASS
    assert judge_race(RaceTally(iterations=0, tracked=0, untracked=0))[0] is Status.FAIL


def test_matrix_fails_when_registration_contradicts_the_features() -> None:
    everything = supported_features()
    minor_accepted = {Mode.MISSING: Ioctl.COPY, Mode.WP: Ioctl.COPY, Mode.MINOR: Ioctl.CONTINUE}
    status, reason = judge_matrix("anonymous", minor_accepted, everything)
    assert status is Status.FAIL and reason.startswith("MINOR contradict")
    wp_refused = {Mode.MISSING: Ioctl.COPY, Mode.WP: None, Mode.MINOR: Ioctl.CONTINUE}
    assert judge_matrix("shmem", wp_refused, everything)[0] is Status.FAIL


def test_model_agreement_fails_and_prints_the_layout_on_a_wrong_footprint() -> None:
    options = CheckOptions(layouts=20, seed=7)

    def wrong(layouts: list[Layout], options: CheckOptions) -> list[list[int]]:
        answers = [model_prediction(layout, 65536) for layout in layouts]
        answers[5] = answers[5] + [10_000]  # the kernel "mapped" one page more
        return answers

    [result] = list(agreement(options, measure=wrong))
    assert result.status is Status.FAIL
    assert repr(random_layouts(20, 7)[5]) in result.reason


def test_layouts_are_reproducible_from_the_seed() -> None:
    assert random_layouts(50, 3) == random_layouts(50, 3)
    assert random_layouts(50, 3) != random_layouts(50, 4)


# -- the command ------------------------------------------------------------------------------


def test_cli_json_lists_every_case(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--only", "matrix", "--only", "semantics", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["check"], r["status"]) for r in rows] == [
        ("matrix", "PASS"), ("matrix", "PASS"), ("matrix", "PASS"),
        ("semantics", "PASS"), ("semantics", "PASS"), ("semantics", "PASS"), ("semantics", "PASS"),
        ("semantics", "PASS"),
    ]  # fmt: skip
    cases = [r["case"] for r in rows if r["check"] == "semantics"]
    assert cases == ["wp-unpopulated", "pte-markers", "wp-after-punch", "eagain", "close-wakes"]


def test_cli_exits_nonzero_on_a_fail(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def failing(options: CheckOptions) -> Iterator[CheckResult]:
        yield CheckResult("matrix", "anonymous", Status.FAIL, "made to fail")

    monkeypatch.setitem(CHECKS, "matrix", failing)
    assert main(["check", "--only", "matrix"]) == 1
    assert "made to fail" in capsys.readouterr().out


def test_unknown_check_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown check nope"):
        list(run_checks(["nope"]))


@pytest.mark.parametrize("dumpable", [True, False], ids=["user", "setuid-without-dumpable"])
def test_an_unprivileged_user_gets_passes_and_stated_skips(dumpable: bool) -> None:
    """As a user without privileges every check runs with user-mode-only uffds, or is skipped
    with its reason; none fails and nothing crashes."""
    import os

    from tests._target import Channel, Target

    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user needs root")

    def body(channel: Channel) -> None:
        os.chdir("/")
        os.setgid(65534)
        os.setuid(65534)
        if dumpable:  # as a process the user started: it may read its own /proc files
            _libc.prctl(4, 1)  # PR_SET_DUMPABLE
        options = CheckOptions(race_iterations=200, race_seconds=2.0, layouts=40)
        channel.send(
            [(r.check, r.case, r.status.value, r.reason) for r in run_checks(None, options)]
        )

    with Target(body, timeout=120) as target:
        rows, _ = target.recv(timeout=120)
        assert target.exit_code() == 0
    assert [r for r in rows if r[2] == "FAIL"] == []
    skipped = {(r[0], r[3]) for r in rows if r[2] == "SKIP"}
    if dumpable:
        assert skipped <= {("matrix", "no free huge pages, and reserving some needs root")}
        passed = [r for r in rows if r[2] == "PASS"]
        assert (len(rows), len(passed)) == (19, 19 - len(skipped)), rows
    else:
        assert (
            "footprint",
            "this process may not read /proc/self/pagemap (Permission denied)",
        ) in skipped


# -- the out-of-core pager's guarantees -------------------------------------------------------


def test_the_pager_guarantees_hold_here_and_are_probed_once() -> None:
    first = pager_guarantees()
    assert first.ok, first.missing
    assert (first.no_fault_around.case, first.wp_survives_punch.case) == (
        "no-fault-around",
        "wp-survives-punch",
    )
    assert first.no_fault_around.reason == (
        "only the faulted page mapped (no fault-around in a MISSING|WP range)"
    )
    assert first.wp_survives_punch.reason == "the write raised a WP fault before it landed"
    assert pager_guarantees() is first  # cached: no second probe
    first.require()  # nothing missing: no error


def test_a_budget_is_refused_naming_the_missing_guarantee() -> None:
    holds = CheckResult("pager", "no-fault-around", Status.PASS, "only the faulted page mapped")
    lost = CheckResult("pager", "wp-survives-punch", Status.FAIL, "expected one WP fault, got none")
    guarantees = PagerGuarantees(holds, lost)
    assert not guarantees.ok and guarantees.missing == (lost,)
    with pytest.raises(FeatureUnavailableError, match=r"lazy\(budget=\.\.\.\)") as caught:
        guarantees.require()
    assert isinstance(caught.value, OSError)
    assert "not proved here: wp-survives-punch: expected one WP fault, got none" in str(
        caught.value
    )
    assert "no-fault-around" not in str(caught.value).split("not proved here:")[1]


def test_the_probe_fails_when_the_kernel_maps_around_a_fault_in_the_pagers_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake(kind: str, mode: Mode | None, options: CheckOptions, scratch: str) -> list[int]:
        return list(range(16, 32))  # as the kernel before 5.19 did: fault-around everywhere

    monkeypatch.setattr(_pager, "measure_footprint", fake)
    got = _pager.probe_pager_guarantees(FAST)
    assert got.no_fault_around.status is Status.FAIL
    assert "behind the handler's back" in got.no_fault_around.reason
    assert got.missing == (got.no_fault_around,)


def test_the_wp_after_punch_probe_fails_when_the_write_goes_untracked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def untracked(kind: str, options: CheckOptions, *, punch: bool = False) -> tuple[Status, str]:
        assert (kind, punch) == ("shmem", True)
        return Status.FAIL, "expected one WP fault at page 1, got no fault at all"

    monkeypatch.setattr(_pager, "expect_wp_fault", untracked)
    got = _pager.probe_pager_guarantees(FAST)
    assert got.missing == (got.wp_survives_punch,)
    with pytest.raises(FeatureUnavailableError, match="wp-survives-punch: expected one WP"):
        got.require()
