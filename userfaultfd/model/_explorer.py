"""Explore a scenario under a kernel preset: the glue between the kernel rules and the engine."""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import final

from . import _engine as engine
from . import _future
from ._kernel import Kernel as _Kernel
from ._kernel import advance as _advance
from ._kernel import faults as _faults
from ._kernel import finished as _finished
from ._ops import Label as _Label
from ._presets import PRESETS as _PRESETS
from ._presets import Preset as _Preset
from ._presets import get_preset as _get_preset
from ._scenarios import SCENARIOS as _SCENARIOS
from ._scenarios import Scenario as _Scenario
from ._scenarios import Sizes as _Sizes
from ._scenarios import get_scenario as _get_scenario
from ._state import World as _World

__all__ = [
    "Replay",
    "Result",
    "TableRow",
    "TraceStep",
    "Violation",
    "build",
    "explore",
    "replay",
    "table",
]


@final
@dataclass(frozen=True, slots=True)
class TraceStep:
    """Step ``number`` of a trace: which thread moved, in which kernel function, what changed."""

    number: int
    thread: str
    function: str
    change: str


@final
@dataclass(frozen=True, slots=True)
class Violation:
    """A state that breaks the scenario's invariant, and the schedule that reaches it."""

    invariant: str
    message: str
    trace: tuple[TraceStep, ...]
    #: The schedule as a string for ``replay`` (``thread*count`` runs, space separated).
    schedule: str
    #: The run continued past the violation (first runnable thread first): what became of it.
    aftermath: tuple[TraceStep, ...] = ()


@final
@dataclass(frozen=True, slots=True)
class Result:
    """The verdict of one exploration and its size."""

    scenario: str
    #: The invariant explored (the scenario's), broken or not.
    invariant: str
    kernel: _Preset
    fault_around_bytes: int
    #: The reduction explored with: "none", "sleep" or "persistent" (engine.REDUCTIONS).
    reduction: str
    violation: Violation | None
    states: int
    transitions: int
    #: Page faults taken by the scenario's threads: the most in any complete run (or in the
    #: violating run).
    faults: int
    #: Complete runs explored (terminal states).
    runs: int
    #: Terminal states where a thread never finished (deadlocks: a model bug if nonzero).
    stuck: int
    #: The sizes it was built at (the scenario's defaults filled in).
    sizes: _Sizes = field(default_factory=_Sizes)


@final
@dataclass(frozen=True, slots=True)
class Replay:
    """A schedule replayed: its steps, and the violation it reached, if any."""

    scenario: str
    kernel: _Preset
    schedule: str
    trace: tuple[TraceStep, ...]
    violation: Violation | None
    #: No thread could move after the last step.
    complete: bool


@final
@dataclass(frozen=True, slots=True)
class TableRow:
    """One cell of the history table: a result and the wall time it took."""

    result: Result
    seconds: float


class _System:
    """The engine's view of a built kernel: its frozen configuration, the World it starts from,
    and the scenario's invariant. It holds no Kernel: exploring changes nothing but Worlds."""

    def __init__(self, kernel: _Kernel, scenario: _Scenario) -> None:
        self.config = kernel.config
        self.start = kernel.world
        self.scenario = scenario
        self.threads: Sequence[str] = tuple(self.config.programs)

    def initial(self) -> _World:
        return self.start

    def move(self, state: _World, thread: str) -> engine.Move[_World, _Label] | None:
        return _advance(self.config, state, thread)

    def key(self, state: _World) -> Hashable:
        return state.key()

    def abstract(self, move: engine.Move[_World, _Label]) -> engine.Footprint:
        w = move.state
        return engine.Footprint(_future.abstract(w, move.reads), _future.abstract(w, move.writes))

    def future(self, state: _World, thread: str, frozen: frozenset[str]) -> engine.Footprint:
        return engine.Footprint(*_future.future(self.config, state, thread, frozen))

    def enablers(self, state: _World, thread: str) -> frozenset[str] | None:
        return _future.enablers(self.config, state, thread)

    def visible(self, move: engine.Move[_World, _Label]) -> bool:
        return any(self.scenario.watches(self.config, key) for key in move.writes)

    def check(self, state: _World) -> engine.Breach | None:
        message = self.scenario.check(self.config, state)
        return None if message is None else engine.Breach(self.scenario.invariant, message)

    def finished(self, state: _World) -> bool:
        return _finished(self.config, state)

    def measure(self, state: _World) -> int:
        return _faults(state)


def build(
    scenario: _Scenario | str,
    kernel: _Preset | str = "upstream",
    *,
    fault_around_bytes: int = 65536,
    sizes: _Sizes | None = None,
) -> _Kernel:
    """A Kernel set up for ``scenario`` (at ``sizes``) with its threads spawned, not yet run."""
    k = _Kernel(_get_preset(kernel), fault_around_bytes)
    _get_scenario(scenario).build(k, sizes)
    return k


def _trace(steps: Sequence[tuple[str, _Label]], first: int = 1) -> tuple[TraceStep, ...]:
    return tuple(
        TraceStep(n, t, label.function, label.change) for n, (t, label) in enumerate(steps, first)
    )


def explore(
    scenario: _Scenario | str,
    kernel: _Preset | str = "upstream",
    *,
    fault_around_bytes: int = 65536,
    reduction: str = "persistent",
    sizes: _Sizes | None = None,
) -> Result:
    """Explore every interleaving of ``scenario``'s threads under ``kernel``."""
    scen = _get_scenario(scenario)
    preset = _get_preset(kernel)
    k = build(scen, preset, fault_around_bytes=fault_around_bytes, sizes=sizes)
    system = _System(k, scen)
    found = engine.explore(system, reduction=reduction)
    violation = None
    if found.counterexample is not None:
        cx = found.counterexample
        violation = Violation(
            cx.breach.invariant,
            cx.breach.message,
            _trace(cx.steps),
            cx.schedule,
            _trace(cx.aftermath, len(cx.steps) + 1),
        )
    return Result(
        scen.name,
        scen.invariant,
        preset,
        fault_around_bytes,
        reduction,
        violation,
        found.states,
        found.transitions,
        found.measure,
        found.runs,
        found.stuck,
        scen.sized(sizes),
    )


def replay(
    scenario: _Scenario | str,
    schedule: str,
    kernel: _Preset | str = "upstream",
    *,
    fault_around_bytes: int = 65536,
    sizes: _Sizes | None = None,
) -> Replay:
    """Replay a schedule string (as a Violation gives it); raises engine.ScheduleError if a step
    names a thread that cannot move."""
    scen = _get_scenario(scenario)
    preset = _get_preset(kernel)
    k = build(scen, preset, fault_around_bytes=fault_around_bytes, sizes=sizes)
    system = _System(k, scen)
    threads = engine.parse_schedule(schedule)
    run = engine.replay(system, threads)
    trace = _trace(run.steps)
    text = engine.format_schedule([t for t, _ in run.steps])
    violation = None
    if run.breach is not None:
        violation = Violation(run.breach.invariant, run.breach.message, trace, text)
    return Replay(scen.name, preset, text, trace, violation, run.terminal)


def table(
    *, fault_around_bytes: int = 65536, reduction: str = "persistent", group: str = "history"
) -> tuple[TableRow, ...]:
    """Every preset against every scenario of ``group`` (scenarios.Scenario.group), timed."""
    rows = []
    for preset in _PRESETS.values():
        for scen in _SCENARIOS.values():
            if scen.group != group:
                continue
            t0 = time.perf_counter()
            result = explore(
                scen, preset, fault_around_bytes=fault_around_bytes, reduction=reduction
            )
            rows.append(TableRow(result, time.perf_counter() - t0))
    return tuple(rows)
