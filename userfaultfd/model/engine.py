"""A small explicit-state explorer of thread interleavings. It knows nothing of memory management.

A *system* offers named threads and a ``move(state, thread)`` function returning the next state,
a label saying what changed, and the step's footprint (objects read and written), or None when
the thread cannot move. States are immutable values with a canonical hashable ``key``.

The search is a depth-first walk over interleavings with

- a visited-state table (two schedules that reach the same state are explored once), and
- sleep sets (Godefroid 1996): after exploring thread ``t`` from a state, its sibling branches
  need not try ``t`` first again until some step that conflicts with ``t``'s footprint has run,
  since swapping two independent steps reaches the same state. Combined with the state table,
  a state revisited with a smaller sleep set re-explores just the threads it had slept on, which
  keeps every reachable state visited (only transitions are saved, never states).

Threads are state machines whose position is part of the state, so nothing is re-executed to
backtrack. The search stops at the first state that breaks the invariant; its schedule (which
thread moved at each step) is shrunk greedily by replay and then is a string one can replay.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

__all__ = [
    "Breach",
    "Counterexample",
    "Exploration",
    "Move",
    "Replayed",
    "ScheduleError",
    "System",
    "explore",
    "format_schedule",
    "parse_schedule",
    "replay",
]

S = TypeVar("S")
L = TypeVar("L")
L_co = TypeVar("L_co", covariant=True)


class ScheduleError(ValueError):
    """A schedule names a thread that does not exist or cannot move at that step."""


@dataclass(frozen=True, slots=True)
class Move(Generic[S, L]):
    """One step: the state after it, what changed, and the objects it read and wrote."""

    state: S
    label: L
    reads: frozenset[Hashable]
    writes: frozenset[Hashable]


@dataclass(frozen=True, slots=True)
class Breach:
    """An invariant a state breaks, and how."""

    invariant: str
    message: str


class System(Protocol[S, L]):
    """What the explorer needs from a model."""

    @property
    def threads(self) -> Sequence[str]: ...

    def initial(self) -> S: ...

    def move(self, state: S, thread: str) -> Move[S, L] | None: ...

    def key(self, state: S) -> Hashable: ...

    def check(self, state: S) -> Breach | None: ...

    def finished(self, state: S) -> bool: ...

    def measure(self, state: S) -> int: ...


@dataclass(frozen=True, slots=True)
class Counterexample(Generic[L_co]):
    """A schedule that breaks the invariant; ``aftermath`` runs on from there, for the story."""

    breach: Breach
    steps: tuple[tuple[str, L_co], ...]
    aftermath: tuple[tuple[str, L_co], ...]
    measure: int

    @property
    def schedule(self) -> str:
        return format_schedule([t for t, _ in self.steps])


@dataclass(frozen=True, slots=True)
class Exploration(Generic[L_co]):
    """What a search found: a counterexample or none, and how much it explored."""

    counterexample: Counterexample[L_co] | None
    states: int
    transitions: int
    #: Terminal states (no thread can move) reached.
    runs: int
    #: Terminal states where some thread had not finished (a deadlock in the model).
    stuck: int
    #: The largest measure over terminal states (or the measure at the breach).
    measure: int


@dataclass(frozen=True, slots=True)
class Replayed(Generic[L_co]):
    """The steps a schedule took, the first breach on the way, whether it ended the run."""

    steps: tuple[tuple[str, L_co], ...]
    breach: Breach | None
    terminal: bool
    measure: int


def _independent(a: Move[S, L], b: Move[S, L]) -> bool:
    return (
        a.writes.isdisjoint(b.reads)
        and a.writes.isdisjoint(b.writes)
        and b.writes.isdisjoint(a.reads)
    )


def explore(system: System[S, L], *, reduction: bool = True) -> Exploration[L]:
    """Visit every reachable state (in a fixed order) until one breaks the invariant."""
    threads = tuple(system.threads)
    # state key -> the sleep set it was last explored with (None: not yet)
    visited: dict[Hashable, frozenset[str]] = {}
    path: list[str] = []
    states = transitions = runs = stuck = measure = 0
    found: tuple[Breach, S] | None = None

    def visit(state: S, sleep: dict[str, Move[S, L]]) -> bool:
        nonlocal states, transitions, runs, stuck, measure, found
        key = system.key(state)
        asleep = frozenset(sleep)
        before = visited.get(key)
        if before is None:
            states += 1
            breach = system.check(state)
            if breach is not None:
                found = (breach, state)
                return True
            visited[key] = asleep
            retry: frozenset[str] | None = None
        else:
            if before <= asleep:
                return False
            # Explored before with these threads asleep; now some are awake: try just those.
            retry = before - asleep
            visited[key] = before & asleep
        moves = [(t, m) for t in threads if (m := system.move(state, t)) is not None]
        if not moves and before is None:
            runs += 1
            stuck += not system.finished(state)
            measure = max(measure, system.measure(state))
        done: dict[str, Move[S, L]] = {}
        for t, m in moves:
            if t in sleep or (retry is not None and t not in retry):
                continue
            child: dict[str, Move[S, L]] = {}
            if reduction:
                for u, mu in (*sleep.items(), *done.items()):
                    if _independent(mu, m):
                        child[u] = mu
            transitions += 1
            path.append(t)
            if visit(m.state, child):
                return True
            path.pop()
            done[t] = m
        return False

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        visit(system.initial(), {})
    finally:
        sys.setrecursionlimit(limit)
    counterexample = None
    if found is not None:
        breach, state = found
        counterexample = _counterexample(system, path, breach)
        measure = system.measure(state)
    return Exploration(counterexample, states, transitions, runs, stuck, measure)


def replay(system: System[S, L], schedule: Sequence[str]) -> Replayed[L]:
    """Run ``schedule`` (thread names, one per step); stop at the first breach."""
    state = system.initial()
    steps: list[tuple[str, L]] = []
    breach = system.check(state)
    for n, t in enumerate(schedule, 1):
        if breach is not None:
            break
        if t not in system.threads:
            raise ScheduleError(f"step {n}: no thread {t!r} (threads: {', '.join(system.threads)})")
        m = system.move(state, t)
        if m is None:
            raise ScheduleError(f"step {n}: thread {t!r} cannot move (asleep, blocked or done)")
        state = m.state
        steps.append((t, m.label))
        breach = system.check(state)
    terminal = all(system.move(state, t) is None for t in system.threads)
    return Replayed(tuple(steps), breach, terminal, system.measure(state))


def _counterexample(system: System[S, L], path: list[str], breach: Breach) -> Counterexample[L]:
    schedule = _shrink(system, path, breach.invariant)
    run = replay(system, schedule)
    assert run.breach is not None
    # Run on from the breach, first thread first, so the trace shows what became of it.
    state = system.initial()
    for t in schedule:
        m = system.move(state, t)
        assert m is not None
        state = m.state
    after: list[tuple[str, L]] = []
    for _ in range(1000):
        moves = ((t, m) for t in system.threads if (m := system.move(state, t)) is not None)
        first = next(moves, None)
        if first is None:
            break
        after.append((first[0], first[1].label))
        state = first[1].state
    return Counterexample(run.breach, run.steps, tuple(after), run.measure)


def _shrink(system: System[S, L], path: list[str], invariant: str) -> list[str]:
    """Drop steps one at a time while the schedule still breaks the same invariant."""
    best = list(path)
    i = 0
    while i < len(best):
        trial = best[:i] + best[i + 1 :]
        try:
            run = replay(system, trial)
        except ScheduleError:
            run = None
        if run is not None and run.breach is not None and run.breach.invariant == invariant:
            best = [t for t, _ in run.steps]
        else:
            i += 1
    return best


def format_schedule(threads: Sequence[str]) -> str:
    """``["a", "a", "b"]`` -> ``"a*2 b"``."""
    out: list[str] = []
    i = 0
    while i < len(threads):
        j = i
        while j < len(threads) and threads[j] == threads[i]:
            j += 1
        out.append(threads[i] if j - i == 1 else f"{threads[i]}*{j - i}")
        i = j
    return " ".join(out)


def parse_schedule(text: str) -> list[str]:
    """``"a*2 b"`` (or ``"a,a,b"``) -> ``["a", "a", "b"]``."""
    out: list[str] = []
    for token in text.replace(",", " ").split():
        name, star, count = token.partition("*")
        if not name or (star and not count.isdigit()):
            raise ScheduleError(f"bad schedule token {token!r} (want NAME or NAME*COUNT)")
        out.extend([name] * (int(count) if star else 1))
    return out
