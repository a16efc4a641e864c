"""Lifecycles of lazy() memory: every page reads the right bytes or the access gets SIGBUS;
never zeros (a zero page is silent corruption).

Each case is a whole program (a function of tests/runtime/_lifecycle_prog.py) run with its own
session and process group, and a deadline: a program that outlives it is killed, group and all,
and the case fails as hung. The program reads an int32 array whose element i holds i + 1 and
verifies every element it reads; its JSON report names the first wrong element, its page and
what it held. The test then asserts the exact outcome (exit code or death by SIGBUS, the report)
and that no process of the case is left (the session is scanned in /proc; zombies count as
gone).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import pytest

import userfaultfd
from tests.runtime import _lifecycle_prog as prog

N = prog.N
PER_PAGE = prog.PER_PAGE
REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIR = os.path.dirname(os.path.abspath(userfaultfd.__file__))
#: A program's deadline: a case takes 1-3 s when it works.
DEADLINE = 20.0
#: How long the processes of a case may take to go once the program and its children have.
GRACE = 5.0
SIGBUS = -signal.SIGBUS


@pytest.fixture(scope="module")
def npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test array: 4,000,000 int32, element i holding i + 1 (16 MB, 3,907 pages)."""
    path = tmp_path_factory.mktemp("lifecycle") / "values.npy"
    np.save(path, np.arange(1, N + 1, dtype=np.int32))
    return path


@pytest.fixture
def own_npy(npy: Path, tmp_path: Path) -> Path:
    """A copy of the test array for a case that changes its source."""
    path = tmp_path / "values.npy"
    shutil.copyfile(npy, path)
    return path


@pytest.fixture(scope="module")
def small_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 pages of the same values."""
    path = tmp_path_factory.mktemp("lifecycle-small") / "small.npy"
    np.save(path, np.arange(1, 16 * PER_PAGE + 1, dtype=np.int32))
    return path


# -- processes ----------------------------------------------------------------------------------
class Proc(NamedTuple):
    comm: str
    state: str
    ppid: int
    session: int
    #: Clock ticks after boot when it started (tells a reused pid from the process it was).
    start: int


def processes() -> dict[int, Proc]:
    """Every process, from /proc/PID/stat."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
        fields = rest.split()
        found[int(name)] = Proc(comm, fields[0], int(fields[1]), int(fields[3]), int(fields[19]))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def describe(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        return f"died of {signal.Signals(-returncode).name}"
    return f"exited {returncode}"


class Program:
    """One case's program, running in a session of its own."""

    def __init__(
        self, case: str, function: str, args: list[str], workdir: Path, deadline: float = DEADLINE,
        *, module: str = "tests.runtime._lifecycle_prog",
    ) -> None:  # fmt: skip
        self.case = case
        self.report = workdir / f"{function}.report"
        self.report.unlink(missing_ok=True)
        self._stderr = workdir / f"{function}.stderr"
        self.deadline = time.monotonic() + deadline
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *sys.path[1:]]))
        command = [sys.executable, "-m", module, str(self.report), function, *args]
        with open(workdir / f"{function}.stdout", "wb") as out, open(self._stderr, "wb") as err:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,
            )  # fmt: skip
        self.sid = self.proc.pid
        self.start = processes()[self.sid].start

    def __enter__(self) -> Program:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL whatever is left of the case: its process group, and its processes."""
        try:
            os.killpg(self.sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.members():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(5)

    def members(self) -> dict[int, Proc]:
        """The case's running processes: those of its session; every process it reported
        (the supervisor runs in a session of its own); and their descendants. Only processes
        started after the program: a pid reused since is not the case's."""
        table = processes()
        reported = {self.sid}
        for record in self.records():
            for key in ("supervisor", "handler", "child", "reader"):
                if isinstance(record.get(key), int):
                    reported.add(record[key])
        newer = {pid: p for pid, p in table.items() if p.start >= self.start}
        ours = {pid for pid, p in newer.items() if p.session == self.sid or pid in reported}
        # The sessions they lead or joined (not the test's own), and their descendants.
        sessions = {newer[pid].session for pid in ours} - {os.getsid(0)}
        ours |= {pid for pid, p in newer.items() if p.session in sessions}
        while True:
            more = {pid for pid, p in newer.items() if p.ppid in ours and pid not in ours}
            if not more:
                break
            ours |= more
        return {pid: table[pid] for pid in ours if table[pid].state not in "ZX"}

    # -- what it reported ---------------------------------------------------------------------
    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        try:
            text = self.report.read_text()
        except FileNotFoundError:
            return []
        lines = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
        return [r for r in lines if kind is None or r["kind"] == kind]

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace")

    def summary(self) -> str:
        tail = self.stderr().strip().splitlines()[-6:]
        records = [json.dumps(r) for r in self.records()[-6:]]
        indent = "\n    "
        return (
            f"\n  program: {describe(self.proc.poll())}\n  last records:{indent}"
            f"{indent.join(records)}\n  stderr (tail):{indent}{indent.join(tail)}"
        )

    def hung(self, what: str) -> None:
        summary = self.summary()
        self.kill()
        pytest.fail(f"{self.case}: hung ({what}); killed its process group{summary}")

    def await_record(self, kind: str, *, by: int | None = None) -> dict[str, Any]:
        """The first record of ``kind`` (from process ``by``, if given), waiting for it; fails
        once the program (or ``by``) is gone without writing one, or at the deadline."""
        while True:
            gone = self.proc.poll() is not None if by is None else not alive(by)
            for record in self.records(kind):
                if by is None or record["pid"] == by:
                    return record
            if gone:
                who = "the program" if by is None else f"process {by}"
                pytest.fail(f"{self.case}: {who} ended without reporting {kind!r}{self.summary()}")
            if time.monotonic() > self.deadline:
                self.hung(f"waiting for {kind!r}")
            time.sleep(0.005)

    def finish(self) -> int:
        """The program's return code, waiting for it until the deadline."""
        try:
            return self.proc.wait(max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.hung("the program did not end")
            raise  # not reached: pytest.fail raised

    # -- assertions ---------------------------------------------------------------------------
    def assert_right(self) -> None:
        """Every element every process of the case read held i + 1."""
        self.finish()
        for r in self.records("check"):
            if r["bad"]:
                pytest.fail(
                    f"{self.case}: {r['who']} read element {r['index']} (page {r['page']}) as "
                    f"{r['held']}, not {r['expected']}; {r['bad']} of the elements "
                    f"[{r['lo']}, {r['hi']}) wrong{self.summary()}"
                )

    def assert_exit(self, code: int) -> None:
        got = self.finish()
        if got != code:
            pytest.fail(f"{self.case}: the program {describe(got)}, expected: {describe(code)}"
                        f"{self.summary()}")  # fmt: skip

    def assert_checked(self, who: str, lo: int, hi: int) -> None:
        """A process of the case verified elements [lo, hi) as ``who``."""
        if not [r for r in self.records("check") if (r["who"], r["lo"], r["hi"]) == (who, lo, hi)]:
            pytest.fail(f"{self.case}: {who!r} never verified [{lo}, {hi}){self.summary()}")

    def assert_gone(self) -> None:
        """No process of the case is left, within GRACE seconds of the last one we waited for."""
        deadline = time.monotonic() + GRACE
        while True:
            left = self.members()
            if not left:
                return
            if time.monotonic() > deadline:
                roles = {}
                for r in self.records("pids"):
                    roles[r["supervisor"]] = f"supervisor of {r['array']}"
                    roles[r["handler"]] = f"first handler of {r['array']}"
                listed = ", ".join(
                    f"{pid} ({roles.get(pid, p.comm)}, state {p.state}, ppid {p.ppid})"
                    for pid, p in sorted(left.items())
                )
                pytest.fail(f"{self.case}: processes left over {GRACE} s after the case ended: "
                            f"{listed}{self.summary()}")  # fmt: skip
            time.sleep(0.02)


def handler_under(run: Program, supervisor: int, killed: list[int]) -> int | None:
    """The supervisor's running child that is not one of ``killed`` (None: the program ended)."""
    while True:
        for pid, p in processes().items():
            if p.ppid == supervisor and p.state not in "ZX" and pid not in killed:
                return pid
        if run.proc.poll() is not None:
            return None
        if not alive(supervisor):
            pytest.fail(f"{run.case}: the supervisor died{run.summary()}")
        if time.monotonic() > run.deadline:
            run.hung(f"no new handler after killing {killed}")
        time.sleep(0.005)


# -- 1. a forked child exits while the parent uses the array ------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("how", ["sys.exit", "end", "exception", "del+os._exit"])
def test_a_forked_child_exits_while_the_parent_reads(npy: Path, tmp_path: Path, how: str) -> None:
    case = f"1. child exits by {how}"
    with Program(case, "child_exits", [str(npy), how], tmp_path) as run:
        run.assert_right()
        run.assert_exit(0)
        [status] = run.records("child-status")
        assert status["code"] == (1 if how == "exception" else 0), f"{case}: {run.summary()}"
        run.assert_checked("child", N // 2, N)
        run.assert_checked("parent after the child exited", 0, N)
        stderr = run.stderr()
        if how == "exception":  # its own traceback, and nothing from the runtime
            noise = [line for line in stderr.splitlines()
                     if PACKAGE_DIR in line or "ChildProcessError" in line
                     or "Exception ignored" in line]  # fmt: skip
            assert prog.PLANNED in stderr and not noise, f"{case}: stderr:\n{stderr}"
        else:
            assert stderr == "", f"{case}: stderr:\n{stderr}"
        run.assert_gone()


# -- 2. the parent exits while a forked child (or a daemon grandchild) uses the array -----------
@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("how", ["end", "sys.exit", "daemon"])
def test_the_parent_exits_while_a_forked_child_reads(npy: Path, tmp_path: Path, how: str) -> None:
    case = f"2. parent exits by {how}" if how != "daemon" else "2. parent exits, daemon reads"
    with Program(case, "parent_exits", [str(npy), how], tmp_path) as run:
        run.assert_exit(0)
        reader = run.await_record("reader")
        run.await_record("done", by=reader["pid"])
        run.assert_right()
        run.assert_checked("grandchild" if how == "daemon" else "child", 0, N)
        run.assert_gone()


# -- 3. multiprocessing with the fork start method ----------------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
def test_a_fork_pool_reads_slices_the_parent_never_touched(npy: Path, tmp_path: Path) -> None:
    case = "3. multiprocessing fork pool"
    with Program(case, "pool", [str(npy)], tmp_path) as run:
        run.assert_right()
        run.assert_exit(0)
        slices = {(r["lo"], r["hi"]) for r in run.records("check")
                  if r["who"].startswith("pool worker")}  # fmt: skip
        assert slices == {(N // 4, N // 2), (N // 2, 3 * N // 4)}, f"{case}: {run.summary()}"
        run.assert_checked("parent after the pool", 0, N)
        run.assert_gone()


# -- 4. a signal to the whole process group mid-load --------------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_to_the_process_group_mid_load(npy: Path, tmp_path: Path, name: str) -> None:
    case = f"4. {name} to the process group mid-load"
    with Program(case, "group_signal", [str(npy), name], tmp_path) as run:
        run.await_record("loading")
        time.sleep(0.1)
        os.killpg(run.sid, signal.Signals[name])
        early = run.records("signals")
        run.assert_right()
        run.assert_exit(0)
        [received] = run.records("signals")
        assert received["received"] == [signal.Signals[name]], f"{case}: {run.summary()}"
        assert not early, f"{case}: the load had ended before the signal was sent"
        run.assert_checked("parent", 0, N)
        run.assert_gone()


# -- 5. the supervisor or the handler SIGKILLed mid-load ----------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize(("victim", "times"), [("supervisor", 1), ("handler", 1), ("handler", 5)])
def test_sigkill_mid_load(npy: Path, tmp_path: Path, victim: str, times: int) -> None:
    case = f"5. {victim} SIGKILLed {times}x mid-load"
    with Program(case, "slow_load", [str(npy)], tmp_path) as run:
        pids = run.await_record("pids")
        run.await_record("loading")
        killed: list[int] = []
        if victim == "supervisor":
            time.sleep(0.05)
            os.kill(pids["supervisor"], signal.SIGKILL)
            killed.append(pids["supervisor"])
        else:
            for _ in range(times):
                handler = handler_under(run, pids["supervisor"], killed)
                if handler is None:
                    break
                time.sleep(0.05)
                os.kill(handler, signal.SIGKILL)
                killed.append(handler)
        early = run.records("stats")
        run.assert_right()
        run.assert_exit(0)
        assert len(killed) == times and not early, (
            f"{case}: the load ended before the last kill ({len(killed)} of {times} made)"
        )
        run.assert_checked("parent", 0, N)
        if victim == "handler":
            [stats] = run.records("stats")
            assert stats["restarts"] >= 1, f"{case}: stats {stats}"
        run.assert_gone()


# -- 6. a forked child reads its copy after a handler restart -----------------------------------
@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["killed-at-once", "killed-after-0.2s"])
def test_a_forked_child_reads_its_copy_after_a_handler_restart(
    npy: Path, tmp_path: Path, delay: float
) -> None:
    case = f"6. forked child, handler killed {delay} s after the fork"
    with Program(case, "restart_then_child", [str(npy), str(delay)], tmp_path) as run:
        run.assert_right()
        run.assert_exit(0)
        [restart] = run.records("restart")
        assert restart["changed"], f"{case}: no new handler: {restart}"
        [status] = run.records("child-status")
        assert status["code"] == 0, f"{case}: the child {describe(status['code'])}{run.summary()}"
        run.assert_checked("child", 0, N)
        run.assert_checked("parent", 0, N)
        run.assert_gone()


# -- 7. the source changes under a live array ---------------------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
def test_a_truncated_source_gives_sigbus_beyond_its_new_end(own_npy: Path, tmp_path: Path) -> None:
    case = "7a. source truncated to half"
    keep = prog.PAGES // 2
    with Program(case, "truncated", [str(own_npy)], tmp_path) as run:
        run.assert_right()
        run.assert_checked("filled before, read after the truncation", 0, N // 4)
        run.assert_checked("inside the new end", N // 4, keep * PER_PAGE)
        run.assert_exit(SIGBUS)
        last = run.records()[-1]
        assert (last["kind"], last.get("page")) == ("touch", keep), f"{case}: {run.summary()}"
        run.assert_gone()


@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("change", ["replaced", "unlinked"])
def test_a_changed_source_path_keeps_the_original_bytes(
    own_npy: Path, tmp_path: Path, change: str
) -> None:
    case = f"7{'b' if change == 'replaced' else 'c'}. source {change}, then a handler restart"
    with Program(case, change, [str(own_npy)], tmp_path) as run:
        run.assert_right()
        run.assert_exit(0)
        [restart] = run.records("restart")
        assert restart["changed"], f"{case}: no new handler: {restart}{run.summary()}"
        noun = {"replaced": "replacement", "unlinked": "unlink"}[change]
        run.assert_checked(f"after the {noun} and a restart", 0, N)
        run.assert_gone()


@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("mode", ["short", "raises"])
def test_a_store_that_cannot_read_a_region_gives_sigbus_there(
    npy: Path, tmp_path: Path, mode: str
) -> None:
    case = "7d. short reads in one region" if mode == "short" else "7e. RuntimeError in one region"
    bad_lo, bad_hi = (p * PER_PAGE for p in prog.BAD_PAGES)
    with Program(case, "flaky_store", [str(npy), mode], tmp_path) as run:
        run.assert_right()
        [status] = run.records("child-status")
        assert status["code"] == SIGBUS, (
            f"{case}: the child touching a bad page {describe(status['code'])}, expected: "
            f"died of SIGBUS{run.summary()}"
        )
        run.assert_checked("before the bad region", 0, bad_lo)
        run.assert_checked("after the bad region", bad_hi, N)
        [stats] = run.records("stats")
        [pids] = run.records("pids")
        if mode == "raises":  # the handler survives it, and counts it
            assert stats["errors"] >= 1, f"{case}: stats {stats}"
            assert (stats["restarts"], stats["handler"]) == (0, pids["handler"]), (
                f"{case}: the handler did not survive: {stats}, first handler {pids['handler']}"
            )
        run.assert_exit(SIGBUS)
        last = run.records()[-1]
        assert (last["kind"], last.get("who")) == ("touch", "parent"), f"{case}: {run.summary()}"
        run.assert_gone()


# -- 8. two arrays, one dropped; a double stop --------------------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
def test_dropping_one_array_leaves_the_other_right(npy: Path, tmp_path: Path) -> None:
    case = "8. one of two arrays dropped"
    with Program(case, "two_arrays", [str(npy)], tmp_path) as run:
        run.assert_right()
        run.assert_exit(0)
        run.assert_checked("b after a was dropped", 0, N)
        run.assert_gone()


@pytest.mark.timeout(DEADLINE + 30)
def test_a_second_stop_does_nothing(npy: Path, tmp_path: Path) -> None:
    case = "8. double stop"
    with Program(case, "double_stop", [str(npy)], tmp_path) as run:
        run.assert_right()
        run.assert_exit(0)
        [second] = run.records("second-stop")
        assert second["error"] is None, f"{case}: the second stop raised {second['error']}"
        closed = [fd for fd, ok in zip(second["opened"], second["valid"], strict=True) if not ok]
        assert not closed, f"{case}: the second stop closed descriptors {closed}, not its own"
        assert run.stderr() == "", f"{case}: stderr:\n{run.stderr()}"
        run.assert_checked("after the stops", 0, N)
        run.assert_gone()


# -- 9. many create/drop cycles; affinity ---------------------------------------------------------
@pytest.mark.timeout(120)
def test_200_create_drop_cycles_leak_nothing(small_npy: Path, tmp_path: Path) -> None:
    case = "9. 200 lazy() create/drop cycles"
    with Program(case, "cycles", [str(small_npy), "200"], tmp_path, deadline=80) as run:
        run.assert_exit(0)
        [r] = run.records("cycles")
        assert r["nwrong"] == 0, f"{case}: (cycle, index, held) wrong: {r['wrong']}"
        assert abs(r["fds_after"] - r["fds_before"]) <= 2, (
            f"{case}: {r['fds_before']} descriptors open before, {r['fds_after']} after"
        )
        assert r["children_after"] == r["children_before"], (
            f"{case}: children left running: {r['children_after']} ({r['zombies']} zombies)"
        )
        assert r["affinity_after"] == r["affinity_before"], (
            f"{case}: affinity {r['affinity_before']} before, {r['affinity_after']} after"
        )
        run.assert_gone()


@pytest.mark.timeout(DEADLINE + 30)
def test_servers_stopped_out_of_order_restore_the_affinity(small_npy: Path, tmp_path: Path) -> None:
    case = "9. two servers stopped out of creation order"
    with Program(case, "stop_order", [str(small_npy)], tmp_path) as run:
        run.assert_exit(0)
        [r] = run.records("affinity")
        assert r["after"] == r["before"], (
            f"{case}: affinity {r['before']} before, {r['during']} while serving, "
            f"{r['after']} after both stops"
        )
        run.assert_gone()


# -- 10. a sparse source larger than memory -------------------------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
def test_a_sparse_64_gib_source_maps_quickly(tmp_path: Path) -> None:
    case = "10. sparse 64 GiB source"
    path = tmp_path / "sparse.bin"
    try:
        with Program(case, "sparse", [str(path)], tmp_path) as run:
            run.assert_right()
            run.assert_exit(0)
            [opened] = run.records("opened")
            assert opened["length"] == prog.SPARSE_SIZE
            assert opened["seconds"] < 10, f"{case}: lazy() took {opened['seconds']:.1f} s"
            for page in prog.SPARSE_PAGES:
                run.assert_checked(f"pattern page {page}", page * prog.PAGE, (page + 1) * prog.PAGE)
            run.assert_gone()
    finally:
        path.unlink(missing_ok=True)


# -- 11. bad options are refused up front --------------------------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("option", sorted(prog.BAD_OPTIONS))
def test_a_bad_option_is_refused_up_front(npy: Path, tmp_path: Path, option: str) -> None:
    case = f"11. lazy(..., {option}={prog.BAD_OPTIONS[option]!r})"
    with Program(case, "bad_option", [str(npy), option], tmp_path) as run:
        run.assert_exit(0)
        refused = run.records("refused")
        assert refused, f"{case}: accepted{run.summary()}"
        [r] = refused
        assert r["type"] in ("ValueError", "TypeError") and option in r["message"], (
            f"{case}: refused with {r['type']}: {r['message']!r}; expected a ValueError or "
            f"TypeError naming {option!r}"
        )
        run.assert_gone()


# -- 12. a slow store, four native threads faulting at once ---------------------------------------
@pytest.mark.timeout(DEADLINE + 30)
@pytest.mark.parametrize("attempt", [1, 2, 3])
def test_four_native_threads_fault_on_a_slow_store(tmp_path: Path, attempt: int) -> None:
    case = f"12. 4 native threads, a 10 ms store (run {attempt})"
    with Program(case, "slow_threads", [], tmp_path) as run:
        run.assert_right()
        hung = run.records("hung")
        if hung:
            pytest.fail(f"{case}: hung: {hung[0]['pages_read']} of {hung[0]['of']} pages read "
                        f"after 10 s{run.summary()}")  # fmt: skip
        run.assert_exit(0)
        pages = 4 * prog.SLOW_PAGES_PER_THREAD
        run.assert_checked("4 threads", 0, pages * PER_PAGE)
        run.assert_gone()
