"""Text renderings of the model's results: traces, verdicts, the history table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ._explorer import Replay as _Replay
from ._explorer import Result as _Result
from ._explorer import TableRow as _TableRow
from ._explorer import TraceStep as _TraceStep
from ._presets import PRESETS as _PRESETS
from ._scenarios import SCENARIOS as _SCENARIOS

__all__ = [
    "render_list",
    "render_replay",
    "render_result",
    "render_table",
    "render_trace",
    "verdict",
]


_REDUCTION = {
    "none": "reduction off",
    "sleep": "reduction: sleep sets",
    "persistent": "reduction: persistent sets",
}


def _quote(text: str) -> str:
    return f"'{text}'" if " " in text else text


def verdict(result: _Result) -> str:
    """``violated: <invariant>`` or ``holds``."""
    return f"violated: {result.violation.invariant}" if result.violation else "holds"


def render_trace(steps: Iterable[_TraceStep]) -> str:
    steps = list(steps)
    width = max((len(s.thread) for s in steps), default=0)
    fn_width = max((len(s.function) for s in steps), default=0)
    return "\n".join(
        f"{s.number:3}. {s.thread:<{width}}  {s.function:<{fn_width}}  {s.change}" for s in steps
    )


def render_result(result: _Result) -> str:
    z = result.sizes
    shown = [
        f"{name}={value}"
        for name, value in (
            ("readers", z.readers),
            ("writers", z.writers),
            ("punchers", z.punchers),
            ("pages", z.pages),
        )
        if value is not None
    ]
    if z.punch:
        shown.append("punch=" + ",".join(f"{s}+{n}" for s, n in z.punch))
    head = (
        f"{result.scenario} on {result.kernel.name} "
        f"[{' '.join(shown)}] "
        f"(fault_around_bytes={result.fault_around_bytes}, "
        f"{_REDUCTION[result.reduction]})"
    )
    v = result.violation
    if v is None:
        return (
            f"{head}\nno violation: no {result.invariant} in any reachable state\n"
            f"{result.states} states, {result.transitions} transitions explored; "
            f"{result.runs} complete runs; at most {result.faults} page faults in a run"
        )
    steps = render_trace(v.trace + v.aftermath).splitlines()
    lines = [head, f"VIOLATION ({v.invariant}): {v.message}", *steps[: len(v.trace)]]
    if v.aftermath:
        lines += ["     -- violation above; the run goes on --", *steps[len(v.trace) :]]
    lines += [
        f"replay: uffd model replay {result.scenario} --kernel {result.kernel.name} "
        f"{_quote(v.schedule)}",
        f"{result.states} states, {result.transitions} transitions explored; "
        f"page faults in the violating run: {result.faults}",
    ]
    return "\n".join(lines)


def render_replay(run: _Replay) -> str:
    lines = [f"{run.scenario} on {run.kernel.name}: replay {_quote(run.schedule)}"]
    if run.trace:
        lines.append(render_trace(run.trace))
    if run.violation is not None:
        lines.append(f"VIOLATION ({run.violation.invariant}): {run.violation.message}")
    else:
        end = "the run is complete" if run.complete else "threads can still move"
        lines.append(f"no violation after {len(run.trace)} steps; {end}")
    return "\n".join(lines)


def render_table(rows: Sequence[_TableRow]) -> str:
    header = ("kernel", "scenario", "verdict", "states", "transitions", "faults", "time")
    body = [
        (
            r.result.kernel.name,
            r.result.scenario,
            verdict(r.result),
            str(r.result.states),
            str(r.result.transitions),
            str(r.result.faults),
            f"{r.seconds:.2f}s",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]
    numeric = {3, 4, 5, 6}

    def fmt(row: Sequence[str]) -> str:
        cells = (
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        return "  ".join(cells).rstrip()

    total = sum(r.seconds for r in rows)
    return "\n".join([fmt(header), *(fmt(row) for row in body), f"total {total:.2f}s"])


def render_list() -> str:
    lines = ["kernel presets:"]
    width = max(len(n) for n in (*_PRESETS, *_SCENARIOS))
    lines += [f"  {p.name:<{width}}  {p.summary}" for p in _PRESETS.values()]
    for group, title in (
        ("history", "scenarios (the seed's history):"),
        ("kernel", "more kernel scenarios:"),
        ("protocol", "the runtime's protocols:"),
    ):
        lines.append(title)
        lines += [
            f"  {s.name:<{width}}  {s.summary} [invariant: {s.invariant}]"
            for s in _SCENARIOS.values()
            if s.group == group
        ]
    return "\n".join(lines)
