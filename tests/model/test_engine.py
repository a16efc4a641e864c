"""The explorer on toy systems that know nothing of memory: lost updates, independent counters."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import pytest

from userfaultfd.model import ScheduleError
from userfaultfd.model import _engine as engine


@dataclass(frozen=True)
class Counters:
    """Shared variables, and each thread's (step, register)."""

    shared: tuple[int, ...]
    local: tuple[tuple[int, int], ...]


@dataclass
class Increments:
    """Thread i does ``r = shared[var[i]]; shared[var[i]] = r + 1`` in two steps."""

    var: Sequence[int]
    threads: Sequence[str] = field(init=False)

    def __post_init__(self) -> None:
        self.threads = [f"t{i}" for i in range(len(self.var))]

    def initial(self) -> Counters:
        return Counters((0,) * (max(self.var) + 1), ((0, 0),) * len(self.var))

    def move(self, state: Counters, thread: str) -> engine.Move[Counters, str] | None:
        i = self.threads.index(thread)
        pc, reg = state.local[i]
        x = self.var[i]
        local = list(state.local)
        shared = list(state.shared)
        if pc == 0:
            local[i] = (1, shared[x])
            return engine.Move(
                Counters(tuple(shared), tuple(local)), f"r = x{x}", frozenset({x}), frozenset()
            )
        if pc == 1:
            shared[x] = reg + 1
            local[i] = (2, 0)
            return engine.Move(
                Counters(tuple(shared), tuple(local)), f"x{x} = r + 1", frozenset(), frozenset({x})
            )
        return None

    def key(self, state: Counters) -> Hashable:
        return state

    def check(self, state: Counters) -> engine.Breach | None:
        if all(pc == 2 for pc, _ in state.local):
            want = [self.var.count(x) for x in range(len(state.shared))]
            if list(state.shared) != want:
                return engine.Breach("lost update", f"counters {state.shared}, want {want}")
        return None

    def finished(self, state: Counters) -> bool:
        return all(pc == 2 for pc, _ in state.local)

    def measure(self, state: Counters) -> int:
        return sum(state.shared)


def test_finds_a_lost_update_and_shrinks_it() -> None:
    found = engine.explore(Increments([0, 0]))
    cx = found.counterexample
    assert cx is not None
    assert cx.breach.invariant == "lost update"
    assert cx.schedule == "t0 t1 t0 t1"
    assert [label for _, label in cx.steps] == ["r = x0", "r = x0", "x0 = r + 1", "x0 = r + 1"]
    assert engine.replay(Increments([0, 0]), engine.parse_schedule(cx.schedule)).breach == cx.breach


@pytest.mark.parametrize("n", [2, 3, 4])
def test_independent_threads_every_state_fewer_transitions(n: int) -> None:
    on = engine.explore(Increments(list(range(n))), reduction="sleep")
    off = engine.explore(Increments(list(range(n))), reduction="none")
    assert on.counterexample is None and off.counterexample is None
    assert on.states == off.states == 3**n
    assert on.runs == off.runs == 1
    assert off.transitions == 2 * n * 3 ** (n - 1)
    assert on.transitions < off.transitions
    assert on.measure == n


def test_reduction_keeps_every_state_of_a_mixed_system() -> None:
    system = Increments([0, 1, 0, 1, 2])
    on = engine.explore(system, reduction="sleep")
    off = engine.explore(system, reduction="none")
    assert on.counterexample is not None and off.counterexample is not None
    full = Increments([0, 1, 2, 3])
    assert engine.explore(full).states == engine.explore(full, reduction="none").states


class ReducibleIncrements(Increments):
    """Increments that can say what each thread may still touch: its own counter."""

    def abstract(self, move: engine.Move[Counters, str]) -> engine.Footprint:
        return engine.Footprint(move.reads, move.writes)

    def future(self, state: Counters, thread: str, frozen: frozenset[str]) -> engine.Footprint:
        i = self.threads.index(thread)
        mine = frozenset({self.var[i]}) if state.local[i][0] < 2 else frozenset()
        return engine.Footprint(mine, mine)

    def visible(self, move: engine.Move[Counters, str]) -> bool:
        return bool(move.writes)  # a store can change the check; a load cannot

    def enablers(self, state: Counters, thread: str) -> frozenset[str] | None:
        return frozenset() if state.local[self.threads.index(thread)][0] == 2 else None


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_persistent_sets_cut_states_of_independent_threads(n: int) -> None:
    on = engine.explore(ReducibleIncrements(list(range(n))), reduction="persistent")
    off = engine.explore(ReducibleIncrements(list(range(n))), reduction="none")
    assert on.counterexample is None and off.counterexample is None
    assert off.states == 3**n
    # The loads go one thread at a time (n + 1 states), then the visible stores fully: 2**n.
    assert on.states == n + 2**n
    assert on.runs == off.runs == 1


@pytest.mark.parametrize("var", [[0, 0], [0, 1, 0], [0, 1, 0, 1, 2], [1, 0, 0]])
def test_persistent_sets_find_the_lost_update_plain_dfs_finds(var: list[int]) -> None:
    on = engine.explore(ReducibleIncrements(var), reduction="persistent")
    off = engine.explore(ReducibleIncrements(var), reduction="none")
    assert on.counterexample is not None and off.counterexample is not None
    assert on.counterexample.breach.invariant == "lost update"
    assert on.states <= off.states


@dataclass
class Ignoring:
    """Thread ``spin`` toggles x forever; thread ``set`` sets y once; y = 1 breaks the invariant.

    From the start {spin} alone is persistent (its step is independent of everything ``set``
    can do), and spin's toggles close a cycle: without the cycle proviso the search would go
    round it and never run ``set`` (the ignoring problem). The proviso expands fully there.
    """

    threads: Sequence[str] = ("spin", "set")

    def initial(self) -> tuple[int, int]:
        return (0, 0)

    def move(self, state: tuple[int, int], thread: str) -> engine.Move[tuple[int, int], str] | None:
        x, y = state
        if thread == "spin":
            return engine.Move((1 - x, y), "toggle x", frozenset({"x"}), frozenset({"x"}))
        if y == 0:
            return engine.Move((x, 1), "y = 1", frozenset(), frozenset({"y"}))
        return None

    def key(self, state: tuple[int, int]) -> Hashable:
        return state

    def check(self, state: tuple[int, int]) -> engine.Breach | None:
        return engine.Breach("y set", "y is 1") if state[1] else None

    def finished(self, state: tuple[int, int]) -> bool:
        return True

    def measure(self, state: tuple[int, int]) -> int:
        return 0

    def abstract(self, move: engine.Move[tuple[int, int], str]) -> engine.Footprint:
        return engine.Footprint(move.reads, move.writes)

    def future(
        self, state: tuple[int, int], thread: str, frozen: frozenset[str]
    ) -> engine.Footprint:
        mine = frozenset({"x"} if thread == "spin" else {"y"} if state[1] == 0 else set())
        return engine.Footprint(mine, mine)

    def visible(self, move: engine.Move[tuple[int, int], str]) -> bool:
        return "y" in move.writes

    def enablers(self, state: tuple[int, int], thread: str) -> frozenset[str] | None:
        return frozenset() if thread == "set" and state[1] else None


def test_the_cycle_proviso_keeps_a_step_the_cycle_would_ignore() -> None:
    found = engine.explore(Ignoring(), reduction="persistent")
    assert found.counterexample is not None
    assert found.counterexample.schedule == "set"


def test_persistent_sets_need_a_reducible_system() -> None:
    with pytest.raises(TypeError, match="persistent-set reduction needs"):
        engine.explore(Increments([0, 1]), reduction="persistent")
    with pytest.raises(ValueError, match="unknown reduction 'dpor'"):
        engine.explore(Increments([0, 1]), reduction="dpor")


def test_schedule_strings_round_trip() -> None:
    threads = ["a", "a", "b", "a", "c", "c", "c"]
    text = engine.format_schedule(threads)
    assert text == "a*2 b a c*3"
    assert engine.parse_schedule(text) == threads
    assert engine.parse_schedule("a, a,b") == ["a", "a", "b"]
    with pytest.raises(ScheduleError, match="bad schedule token"):
        engine.parse_schedule("a*x")


def test_replay_refuses_a_thread_that_cannot_move() -> None:
    with pytest.raises(ScheduleError, match="step 3: thread 't0' cannot move"):
        engine.replay(Increments([0, 1]), ["t0", "t0", "t0"])
    with pytest.raises(ScheduleError, match="no thread 'zz'"):
        engine.replay(Increments([0, 1]), ["zz"])
