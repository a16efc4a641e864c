"""The explorer on toy systems that know nothing of memory: lost updates, independent counters."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import pytest

from userfaultfd.model import ScheduleError, engine


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
    on = engine.explore(Increments(list(range(n))), reduction=True)
    off = engine.explore(Increments(list(range(n))), reduction=False)
    assert on.counterexample is None and off.counterexample is None
    assert on.states == off.states == 3**n
    assert on.runs == off.runs == 1
    assert off.transitions == 2 * n * 3 ** (n - 1)
    assert on.transitions < off.transitions
    assert on.measure == n


def test_reduction_keeps_every_state_of_a_mixed_system() -> None:
    system = Increments([0, 1, 0, 1, 2])
    on = engine.explore(system, reduction=True)
    off = engine.explore(system, reduction=False)
    assert on.counterexample is not None and off.counterexample is not None
    full = Increments([0, 1, 2, 3])
    assert engine.explore(full).states == engine.explore(full, reduction=False).states


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
