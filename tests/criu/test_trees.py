"""Real ``criu dump`` and ``criu restore --lazy-pages`` of process trees and region counts
that CRIU's own daemon serves (issue 21, item 8), served by ``uffd lazy-pages``: a tree with a
zombie in it at dump time, programs of 10,000 and 50,000 one-page regions, and a tree of 16
tasks (tests/criu/regions.c). The restored program checks every byte of every region (words
derived from their address, never zero) and reports the first wrong one; with "fork", a child
checks half of them through its own uffd (the handler adopts 5,000 to 25,000 ranges at once);
with "tasks", every task checks its own regions, whose words also depend on the task."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ._restore import Dumped, Restored, dump, restore, restore_log
from .test_lazy_pages import _pack, _summary

pytestmark = pytest.mark.timeout(300)


def _assert_checked(restored: Restored, dumped: Dumped, regions: int, *, child: bool) -> None:
    """The restore worked, the program found every byte of its ``regions`` regions right
    (and its forked child its half), and the daemon served them all without poisoning."""
    assert restored.restore_status == 0, (
        f"criu restore failed ({restored.restore_status}):\n{restore_log(dumped)}\n"
        f"daemon:\n{restored.daemon_log}"
    )
    assert restored.result.startswith("PASS "), (
        f"the restored program found wrong memory: {restored.result or '(no report)'}; its "
        f"child: {restored.child_result or '(no report)'}; it ended with {restored.ending!r}; "
        f"daemon:\n{restored.daemon_log}"
    )
    assert restored.result.split()[1] == str(regions), restored.result
    if child:
        assert restored.child_result == "PASS", f"the forked child: {restored.child_result}"
    assert restored.ending == "exit 0", f"the program ended with {restored.ending!r}"
    assert restored.daemon_status == 0, (
        f"uffd lazy-pages exited {restored.daemon_status}:\n{restored.daemon_log}"
    )
    counts = _summary(restored)
    assert counts["poisoned"] == 0, restored.summary
    assert counts["on_demand"] + counts["background"] >= regions, restored.summary


def _lazy_ranges(restored: Restored) -> int:
    match = re.search(r"task \d+: (\d+) lazy ranges", restored.daemon_log)
    assert match, f"the daemon reported no task:\n{restored.daemon_log}"
    return int(match[1])


def test_a_zombie_in_the_tree(criu: str, regions_program: str, tmp_path: Path) -> None:
    """A child that exited and was not reaped at dump time: CRIU writes no memory images for
    it and sends it as a negative pid. The daemon serves the live task, counts the zombie,
    and the restored program reaps it with the exit status it had (7)."""
    dumped = dump(criu, regions_program, tmp_path, "64", "zombie")
    restored = restore(dumped)
    _assert_checked(restored, dumped, 64, child=False)
    assert restored.summary.startswith("uffd lazy-pages: 1 task (+1 zombie),"), restored.summary


def test_a_zombie_in_the_tree_from_a_pack(criu: str, regions_program: str, tmp_path: Path) -> None:
    """``uffd pack --criu`` packs the live task's pages (the zombie has none), and the restore
    is served from the pack."""
    dumped = dump(criu, regions_program, tmp_path, "64", "zombie")
    packs = _pack(dumped)
    restored = restore(dumped, "--pages", str(packs))
    _assert_checked(restored, dumped, 64, child=False)
    assert restored.summary.startswith("uffd lazy-pages: 1 task (+1 zombie),"), restored.summary


@pytest.mark.parametrize("regions", [10_000, 50_000])
def test_many_regions(criu: str, regions_program: str, tmp_path: Path, regions: int) -> None:
    """Each region is a lazy range of its own: the ranges reach the supervisor whatever their
    number (as one message they died with EMSGSIZE from about 7,000), and so does the forked
    child's map when the handler adopts it."""
    dumped = dump(criu, regions_program, tmp_path, str(regions), "fork")
    restored = restore(dumped)
    _assert_checked(restored, dumped, regions, child=True)
    assert _lazy_ranges(restored) >= regions


def test_many_regions_on_demand(criu: str, regions_program: str, tmp_path: Path) -> None:
    """No background fill: every region the program reads is a fault, the child's half on
    the child's own uffd."""
    dumped = dump(criu, regions_program, tmp_path, "10000", "fork")
    restored = restore(dumped, "--no-background", "--policy", "single")
    _assert_checked(restored, dumped, 10_000, child=True)
    assert _summary(restored)["background"] == 0, restored.summary


TASKS = 16
TASK_REGIONS = 300


def _task_results(dumped: Dumped, tasks: int) -> list[str]:
    """Each task's DIR/result-TASK, "(no report)" where a task wrote none."""
    results = []
    for task in range(tasks):
        path = dumped.work / f"result-{task}"
        results.append(path.read_text() if path.exists() else "(no report)")
    return results


def _assert_every_task_checked(restored: Restored, dumped: Dumped) -> None:
    """Every one of the TASKS tasks found every byte of its own TASK_REGIONS regions right,
    task 0 reaped every child with exit 0, and the daemon served 16 tasks, each through a
    handler of its own, all their pages, without poisoning."""
    results = _task_results(dumped, TASKS)
    wrong = [f"task {t}: {r}" for t, r in enumerate(results) if not r.startswith("PASS ")]
    assert restored.restore_status == 0, (
        f"criu restore failed ({restored.restore_status}):\n{restore_log(dumped)}\n"
        f"daemon:\n{restored.daemon_log}"
    )
    assert not wrong and restored.result.startswith("PASS "), (
        f"restored tasks found wrong memory or did not report: {wrong}; task 0's verdict on "
        f"the tree: {restored.result or '(no report)'}; it ended with {restored.ending!r}; "
        f"daemon:\n{restored.daemon_log}"
    )
    checked = [r.split()[1] for r in results]
    assert checked == [str(TASK_REGIONS)] * TASKS, f"regions checked per task: {checked}"
    assert restored.ending == "exit 0", f"task 0 ended with {restored.ending!r}"
    assert restored.daemon_status == 0, (
        f"uffd lazy-pages exited {restored.daemon_status}:\n{restored.daemon_log}"
    )
    assert restored.summary.startswith(f"uffd lazy-pages: {TASKS} tasks,"), restored.summary
    served = re.findall(r"task (\d+): (\d+) lazy ranges", restored.daemon_log)
    pids = {pid for pid, _ in served}
    assert len(pids) == TASKS, f"handlers for {len(pids)} tasks:\n{restored.daemon_log}"
    assert all(int(ranges) >= TASK_REGIONS for _, ranges in served), served
    counts = _summary(restored)
    assert counts["poisoned"] == 0, restored.summary
    assert counts["on_demand"] + counts["background"] >= TASKS * TASK_REGIONS, restored.summary


def test_a_tree_of_many_tasks(criu: str, regions_program: str, tmp_path: Path) -> None:
    """16 tasks, each with 300 regions of its own at the same addresses as its siblings'
    (forked before mapping: the same layout) but holding different words: CRIU sends 16
    uffds, the daemon serves each task from its own pagemap (a page of another task would
    read wrong: serving every task from task 0's images fails here), while all 16 check at
    once and the background fill runs."""
    dumped = dump(criu, regions_program, tmp_path, str(TASK_REGIONS), "tasks", str(TASKS))
    restored = restore(dumped)
    _assert_every_task_checked(restored, dumped)


def test_a_tree_of_many_tasks_on_demand(criu: str, regions_program: str, tmp_path: Path) -> None:
    """The same tree with no background fill: every page every task reads is a fault on that
    task's own uffd, served by that task's handler."""
    dumped = dump(criu, regions_program, tmp_path, str(TASK_REGIONS), "tasks", str(TASKS))
    restored = restore(dumped, "--no-background", "--policy", "single")
    _assert_every_task_checked(restored, dumped)
    counts = _summary(restored)
    assert counts["background"] == 0, restored.summary
    assert counts["on_demand"] >= TASKS * TASK_REGIONS, restored.summary
