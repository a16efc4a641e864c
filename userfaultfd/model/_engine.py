"""A small explicit-state explorer of thread interleavings. It knows nothing of memory management.

A *system* offers named threads and a ``move(state, thread)`` function returning the next state,
a label saying what changed, and the step's footprint (objects read and written), or None when
the thread cannot move. States are immutable values with a canonical hashable ``key``.

The search is a depth-first walk (an explicit stack, no recursion) with a visited-state table
(two schedules that reach the same state are explored once) and one of three reductions:

- ``none``: every enabled thread from every state.
- ``sleep``: sleep sets (Godefroid 1996). After exploring thread ``t`` from a state, its sibling
  branches need not try ``t`` first again until some step that conflicts with ``t``'s footprint
  has run, since swapping two independent steps reaches the same state. A state revisited with
  a smaller sleep set re-explores just the threads it had slept on, which keeps every reachable
  state visited (only transitions are saved, never states).
- ``persistent``: persistent sets (Godefroid 1996, ch. 4) for a ``Reducible`` system, which
  can say what each thread may still touch (``future``). From a state only the next steps of a
  set P of threads are taken, where nothing the other threads can do while P's threads stay
  put conflicts with those steps: every path that avoids them commutes with them, so no
  terminal state is lost. Two provisos keep it exact for the invariant: a step that may change
  the invariant (``visible``) is never postponed, and a step that closes a cycle on the search
  stack forces every enabled step (the stack proviso, against the ignoring problem that makes
  naive reduction with a state table unsound). This one cuts states.

Threads are state machines whose position is part of the state, so nothing is re-executed to
backtrack. The search stops at the first state that breaks the invariant; its schedule (which
thread moved at each step) is shrunk greedily by replay and then is a string one can replay.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, final, runtime_checkable

__all__ = [
    "REDUCTIONS",
    "Breach",
    "Counterexample",
    "Exploration",
    "Footprint",
    "Move",
    "Reducible",
    "Replayed",
    "ScheduleError",
    "System",
    "explore",
    "format_schedule",
    "parse_schedule",
    "replay",
]

_S = TypeVar("_S")
_L = TypeVar("_L")
_L_co = TypeVar("_L_co", covariant=True)


@final
class ScheduleError(ValueError):
    """A schedule names a thread that does not exist or cannot move at that step."""


@dataclass(frozen=True, slots=True)
class Move(Generic[_S, _L]):
    """One step: the state after it, what changed, and the objects it read and wrote."""

    state: _S
    label: _L
    reads: frozenset[Hashable]
    writes: frozenset[Hashable]


@dataclass(frozen=True, slots=True)
class Breach:
    """An invariant a state breaks, and how."""

    invariant: str
    message: str


class System(Protocol[_S, _L]):
    """What the explorer needs from a model."""

    @property
    def threads(self) -> Sequence[str]: ...

    def initial(self) -> _S: ...

    def move(self, state: _S, thread: str) -> Move[_S, _L] | None: ...

    def key(self, state: _S) -> Hashable: ...

    def check(self, state: _S) -> Breach | None: ...

    def finished(self, state: _S) -> bool: ...

    def measure(self, state: _S) -> int: ...


@dataclass(frozen=True, slots=True)
class Footprint:
    """Objects read and written, in the vocabulary a system uses to speak of futures."""

    reads: frozenset[Hashable]
    writes: frozenset[Hashable]


@runtime_checkable
class Reducible(System[_S, _L], Protocol[_S, _L]):
    """What persistent-set reduction needs on top of a System.

    ``future(state, thread, frozen)`` over-approximates what ``thread`` may touch in any number
    of its own steps from ``state`` while the threads in ``frozen`` do not move (None: cannot
    tell); ``abstract(move)`` is the move's footprint in the same vocabulary; ``visible(move)``
    says whether the move may change the value of the invariant; ``enablers(state, thread)``,
    for a thread that cannot move, names every thread whose step could let it (and ``future``
    must then be empty while those are frozen), None if it can move.
    """

    def abstract(self, move: Move[_S, _L]) -> Footprint: ...

    def future(self, state: _S, thread: str, frozen: frozenset[str]) -> Footprint | None: ...

    def visible(self, move: Move[_S, _L]) -> bool: ...

    def enablers(self, state: _S, thread: str) -> frozenset[str] | None: ...


@dataclass(frozen=True, slots=True)
class Counterexample(Generic[_L_co]):
    """A schedule that breaks the invariant; ``aftermath`` runs on from there, for the story."""

    breach: Breach
    steps: tuple[tuple[str, _L_co], ...]
    aftermath: tuple[tuple[str, _L_co], ...]
    measure: int

    @property
    def schedule(self) -> str:
        return format_schedule([t for t, _ in self.steps])


@dataclass(frozen=True, slots=True)
class Exploration(Generic[_L_co]):
    """What a search found: a counterexample or none, and how much it explored."""

    counterexample: Counterexample[_L_co] | None
    states: int
    transitions: int
    #: Terminal states (no thread can move) reached.
    runs: int
    #: Terminal states where some thread had not finished (a deadlock in the model).
    stuck: int
    #: The largest measure over terminal states (or the measure at the breach).
    measure: int


@dataclass(frozen=True, slots=True)
class Replayed(Generic[_L_co]):
    """The steps a schedule took, the first breach on the way, whether it ended the run."""

    steps: tuple[tuple[str, _L_co], ...]
    breach: Breach | None
    terminal: bool
    measure: int


def _independent(a: Move[_S, _L], b: Move[_S, _L]) -> bool:
    return (
        a.writes.isdisjoint(b.reads)
        and a.writes.isdisjoint(b.writes)
        and b.writes.isdisjoint(a.reads)
    )


def _conflicts(step: Footprint, future: Footprint) -> bool:
    return not (
        step.writes.isdisjoint(future.reads)
        and step.writes.isdisjoint(future.writes)
        and step.reads.isdisjoint(future.writes)
    )


def _persistent(
    system: Reducible[_S, _L],
    state: _S,
    moves: list[tuple[str, Move[_S, _L]]],
    threads: Sequence[str],
    on_stack: set[Hashable],
) -> list[tuple[str, Move[_S, _L]]]:
    """The smallest persistent subset of ``moves`` (all of them if none is smaller).

    A set P of enabled threads is persistent when no thread outside P can, in any number of
    its own future steps taken while P's threads stay put, touch what P's next steps touch: then
    every path that avoids P's steps commutes with them. P grows from one thread by adding each
    enabled thread whose future conflicts with it, and fails on a disabled one. A visible step
    (one that can change the invariant) or a step back onto the search stack (the cycle
    proviso) forces the full set.
    """
    if len(moves) <= 1:
        return moves
    enabled = dict(moves)
    steps = {t: system.abstract(m) for t, m in moves}
    visible = {t for t, m in moves if system.visible(m)}
    best: list[str] | None = None
    for p in enabled:
        if p in visible:
            continue
        members = [p]
        ok = True
        grown = True
        while ok and grown:
            grown = False
            frozen = frozenset(members)
            for q in threads:
                if q in frozen:
                    continue
                future = system.future(state, q, frozen)
                if future is not None and not any(_conflicts(steps[x], future) for x in members):
                    continue
                if future is None:
                    ok = False
                elif q in enabled:
                    # q's own next step must come into the set.
                    members.append(q)
                else:
                    # q cannot move yet: take in whoever could let it (then it stays put).
                    waking = (system.enablers(state, q) or frozenset()) - frozen
                    members.extend(sorted(waking))
                    ok = bool(waking) and waking <= enabled.keys()
                ok = ok and not visible.intersection(members)
                grown = ok
                break
        if ok and len(members) < len(moves) and (best is None or len(members) < len(best)):
            best = members
            if len(best) == 1:
                break
    if best is None:
        return moves
    chosen = [(t, m) for t, m in moves if t in best]
    if any(system.key(m.state) in on_stack for _, m in chosen):
        return moves
    return chosen


@dataclass(slots=True)
class _Frame(Generic[_S, _L]):
    """One state on the explicit search stack: what is left to try from it."""

    key: Hashable
    todo: list[tuple[str, Move[_S, _L]]]
    sleep: dict[str, Move[_S, _L]]
    done: dict[str, Move[_S, _L]]
    #: The move that led here (None at the initial state).
    entry: tuple[str, Move[_S, _L]] | None
    next: int = 0


#: The reductions ``explore`` knows: none (plain DFS), sleep sets, persistent sets.
REDUCTIONS = ("none", "sleep", "persistent")


def explore(system: System[_S, _L], *, reduction: str = "sleep") -> Exploration[_L]:
    """Visit every reachable state (in a fixed order) until one breaks the invariant.

    ``reduction`` is ``"none"`` (every enabled thread from every state), ``"sleep"`` (sleep
    sets: the same states, fewer transitions) or ``"persistent"`` (persistent sets with the
    cycle proviso: fewer states; ``system`` must be ``Reducible``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r} (choose from {', '.join(REDUCTIONS)})")
    reducible: Reducible[_S, _L] | None = None
    if reduction == "persistent":
        if not isinstance(system, Reducible):
            raise TypeError("persistent-set reduction needs abstract(), future() and visible()")
        reducible = system
    threads = tuple(system.threads)
    # state key -> the sleep set it was last explored with (empty unless sleep sets are on)
    visited: dict[Hashable, frozenset[str]] = {}
    on_stack: set[Hashable] = set()
    path: list[str] = []
    stack: list[_Frame[_S, _L]] = []
    states = transitions = runs = stuck = measure = 0
    found: tuple[Breach, _S] | None = None

    def enter(
        state: _S, sleep: dict[str, Move[_S, _L]], entry: tuple[str, Move[_S, _L]] | None
    ) -> bool:
        """Push ``state`` if it needs exploring; True if it breaks the invariant."""
        nonlocal states, runs, stuck, measure, found
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
            if reduction != "sleep" or before <= asleep:
                return False
            # Explored before with these threads asleep; now some are awake: try just those.
            retry = before - asleep
            visited[key] = before & asleep
        moves = [(t, m) for t in threads if (m := system.move(state, t)) is not None]
        if not moves and before is None:
            runs += 1
            stuck += not system.finished(state)
            measure = max(measure, system.measure(state))
        if reducible is not None:
            on_stack.add(key)
            moves = _persistent(reducible, state, moves, threads, on_stack)
        todo = [(t, m) for t, m in moves if t not in sleep and (retry is None or t in retry)]
        stack.append(_Frame(key, todo, sleep, {}, entry))
        return False

    if enter(system.initial(), {}, None):
        stack.clear()
    while stack:
        frame = stack[-1]
        if frame.next == len(frame.todo):
            stack.pop()
            on_stack.discard(frame.key)
            if frame.entry is not None:
                path.pop()
                stack[-1].done[frame.entry[0]] = frame.entry[1]
            continue
        t, m = frame.todo[frame.next]
        frame.next += 1
        child: dict[str, Move[_S, _L]] = {}
        if reduction == "sleep":
            for u, mu in (*frame.sleep.items(), *frame.done.items()):
                if _independent(mu, m):
                    child[u] = mu
        transitions += 1
        path.append(t)
        depth = len(stack)
        if enter(m.state, child, (t, m)):
            break
        if len(stack) == depth:  # not pushed: visited before
            path.pop()
            frame.done[t] = m
    counterexample = None
    if found is not None:
        breach, state = found
        counterexample = _counterexample(system, path, breach)
        measure = system.measure(state)
    return Exploration(counterexample, states, transitions, runs, stuck, measure)


def replay(system: System[_S, _L], schedule: Sequence[str]) -> Replayed[_L]:
    """Run ``schedule`` (thread names, one per step); stop at the first breach."""
    state = system.initial()
    steps: list[tuple[str, _L]] = []
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


def _counterexample(system: System[_S, _L], path: list[str], breach: Breach) -> Counterexample[_L]:
    schedule = _shrink(system, path, breach.invariant)
    run = replay(system, schedule)
    assert run.breach is not None
    # Run on from the breach, first thread first, so the trace shows what became of it.
    state = system.initial()
    for t in schedule:
        m = system.move(state, t)
        assert m is not None
        state = m.state
    after: list[tuple[str, _L]] = []
    for _ in range(1000):
        moves = ((t, m) for t in system.threads if (m := system.move(state, t)) is not None)
        first = next(moves, None)
        if first is None:
            break
        after.append((first[0], first[1].label))
        state = first[1].state
    return Counterexample(run.breach, run.steps, tuple(after), run.measure)


def _shrink(system: System[_S, _L], path: list[str], invariant: str) -> list[str]:
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
