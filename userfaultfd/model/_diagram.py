"""A counterexample as a sequence diagram, in SVG written by hand (no dependency).

One lane per thread, one row per step, top to bottom. Left of the lanes, a strip shows the
state after each step: per page of each VMA, its PTE (none, present read-only, writable,
uffd-wp, marker) over its page-cache slot (the frame number, or empty), with a red bar under
the pages of a hole being punched. The step that breaks
the invariant is drawn in red; the steps after it, which show what became of the violation,
are grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

from . import _engine as engine
from ._explorer import Result as _Result
from ._explorer import build as _build
from ._kernel import Kernel as _Kernel
from ._ops import Label as _Label
from ._presets import Preset as _Preset
from ._scenarios import Scenario as _Scenario
from ._scenarios import Sizes as _Sizes
from ._scenarios import get_scenario as _get_scenario
from ._state import Marker as _Marker
from ._state import Present as _Present
from ._state import World as _World

__all__ = ["Drawn", "frames", "render_svg", "violation_svg"]

_ROW = 46
_LANE = 230
_CELL = 22
_TOP = 64
_PAD = 12
_FONT = "font-family='DejaVu Sans Mono, Menlo, monospace'"
_PTE_STYLE = {
    "none": ("#ffffff", "#999999", ""),
    "ro": ("#cfe3ff", "#3b6fb6", "r"),
    "rw": ("#bfeabf", "#2e7d32", "w"),
    "wp": ("#ffd8a8", "#d9480f", "p"),
    "marker": ("#e5dbff", "#6741d9", "M"),
}


@dataclass(frozen=True, slots=True)
class Drawn:
    """One drawn step: who moved, what it did, and the World after it."""

    thread: str
    label: _Label
    world: _World


def frames(
    scenario: _Scenario | str,
    threads: Sequence[str],
    kernel: _Preset | str = "upstream",
    *,
    fault_around_bytes: int = 65536,
    sizes: _Sizes | None = None,
) -> tuple[_Kernel, _World, list[Drawn]]:
    """Run ``threads`` (one name per step) from the scenario's start: the kernel, the initial
    World and each step with the World after it."""
    k = _build(_get_scenario(scenario), kernel, fault_around_bytes=fault_around_bytes, sizes=sizes)
    start = world = k.world
    out = []
    for n, t in enumerate(threads, 1):
        moved = k.advance(world, t)
        if moved is None:
            raise engine.ScheduleError(f"step {n}: thread {t!r} cannot move")
        world = moved.state
        out.append(Drawn(t, moved.label, world))
    return k, start, out


def _pte_kind(world: _World, vma: int, index: int) -> str:
    pte = world.pte(vma, index)
    if isinstance(pte, _Present):
        return "wp" if pte.uffd_wp else "rw" if pte.writable else "ro"
    return "marker" if isinstance(pte, _Marker) else "none"


def _cut(text: str, width: int) -> list[str]:
    """Wrap ``text`` into at most two lines of ``width`` characters."""
    if len(text) <= width:
        return [text]
    cut = text.rfind(" ", 0, width)
    cut = width if cut <= 0 else cut
    rest = text[cut:].strip()
    return [text[:cut], rest if len(rest) <= width else rest[: width - 1] + "…"]


def _state(k: _Kernel, world: _World, x: int, y: int) -> list[str]:
    out = []
    for v in k.vmas:
        for i in range(v.pages):
            kind = _pte_kind(world, v.id, i)
            fill, stroke, mark = _PTE_STYLE[kind]
            cx = x + i * (_CELL + 2)
            out.append(
                f"<rect x='{cx}' y='{y}' width='{_CELL}' height='{_CELL - 6}' fill='{fill}' "
                f"stroke='{stroke}'><title>VMA {v.id} page {i}: PTE {kind}</title></rect>"
            )
            if mark:
                out.append(
                    f"<text x='{cx + _CELL / 2}' y='{y + 12}' text-anchor='middle' "
                    f"font-size='10' fill='{stroke}' {_FONT}>{mark}</text>"
                )
            span = world.punching(v.file)
            if span is not None and span[0] <= v.pgoff + i < span[1]:
                out.append(
                    f"<rect x='{cx}' y='{y + _CELL - 5}' width='{_CELL}' height='2' "
                    "fill='#c92a2a'><title>inside the hole being punched</title></rect>"
                )
            fid = world.cached(v.file, v.pgoff + i)
            text = "·" if fid is None else f"#{fid}"
            data = "" if fid is None else f" {world.frame(fid).data!r}"
            out.append(
                f"<text x='{cx + _CELL / 2}' y='{y + _CELL + 6}' text-anchor='middle' "
                f"font-size='9' fill='#555' {_FONT}><title>file page {v.pgoff + i}: "
                f"{'absent' if fid is None else f'frame {text}{data}'}</title>{text}</text>"
            )
        x += v.pages * (_CELL + 2) + _PAD
    return out


def render_svg(
    k: _Kernel,
    start: _World,
    steps: Sequence[Drawn],
    *,
    breach: int | None = None,
    title: str = "",
    note: str = "",
) -> str:
    """The diagram of ``steps`` from ``start``; ``breach`` is the 1-based step that breaks the
    invariant (drawn red; later steps grey)."""
    threads = list(k.thread_names)
    pages = sum(v.pages for v in k.vmas)
    state_w = pages * (_CELL + 2) + _PAD * (len(k.vmas) + 1) + 40
    width = state_w + len(threads) * _LANE + _PAD
    height = _TOP + (len(steps) + 1) * _ROW + 70
    lane_x = {t: state_w + i * _LANE for i, t in enumerate(threads)}
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}'>",
        f"<rect width='{width}' height='{height}' fill='#ffffff'/>",
        f"<text x='{_PAD}' y='20' font-size='14' font-weight='bold' {_FONT}>{escape(title)}</text>",
        f"<text x='{_PAD}' y='38' font-size='11' fill='#444' {_FONT}>{escape(note)}</text>",
        f"<text x='{_PAD}' y='{_TOP - 6}' font-size='10' fill='#444' {_FONT}>"
        "PTE (r/w/p/M) over cache frame</text>",
    ]
    for t, x in lane_x.items():
        mid = x + _LANE // 2
        out.append(
            f"<text x='{mid}' y='{_TOP - 6}' text-anchor='middle' font-size='12' "
            f"font-weight='bold' {_FONT}>{escape(t)}</text>"
        )
        out.append(
            f"<line x1='{mid}' y1='{_TOP}' x2='{mid}' y2='{height - 60}' stroke='#ccc' "
            "stroke-dasharray='4 3'/>"
        )
    out += _state(k, start, _PAD, _TOP + 8)
    out.append(
        f"<text x='{state_w - 34}' y='{_TOP + 20}' font-size='10' fill='#888' {_FONT}>start</text>"
    )
    for n, step in enumerate(steps, 1):
        y = _TOP + n * _ROW
        late = breach is not None and n > breach
        bad = breach is not None and n == breach
        stroke = "#c92a2a" if bad else "#adb5bd" if late else "#495057"
        fill = "#fff5f5" if bad else "#f8f9fa" if late else "#ffffff"
        ink = "#999" if late else "#222"
        x = lane_x[step.thread] + 6
        out.append(
            f"<rect x='{x}' y='{y}' width='{_LANE - 12}' height='{_ROW - 6}' rx='4' "
            f"fill='{fill}' stroke='{stroke}' stroke-width='{2 if bad else 1}'>"
            f"<title>{escape(step.label.change)}</title></rect>"
        )
        out.append(
            f"<text x='{x + 6}' y='{y + 13}' font-size='11' font-weight='bold' fill='{ink}' "
            f"{_FONT}>{n}. {escape(step.label.function)}</text>"
        )
        for j, line in enumerate(_cut(step.label.change, 36)):
            out.append(
                f"<text x='{x + 6}' y='{y + 26 + 11 * j}' font-size='9' fill='{ink}' {_FONT}>"
                f"{escape(line)}</text>"
            )
        out += _state(k, step.world, _PAD, y + 8)
        if bad:
            out.append(
                f"<text x='{state_w - 34}' y='{y + 20}' font-size='10' fill='#c92a2a' "
                f"font-weight='bold' {_FONT}>&#9888;</text>"
            )
    y = _TOP + (len(steps) + 1) * _ROW
    legend = [("none", "none"), ("ro", "read-only"), ("rw", "writable")]
    legend += [("wp", "uffd-wp"), ("marker", "marker")]
    x = _PAD
    for kind, words in legend:
        fill, stroke, mark = _PTE_STYLE[kind]
        out.append(
            f"<rect x='{x}' y='{y}' width='{_CELL}' height='{_CELL - 6}' fill='{fill}' "
            f"stroke='{stroke}'/>"
        )
        out.append(
            f"<text x='{x + _CELL + 4}' y='{y + 12}' font-size='10' {_FONT}>"
            f"{mark + ' ' if mark else ''}{words}</text>"
        )
        x += _CELL + 24 + 8 * len(words)
    out.append(
        f"<text x='{_PAD}' y='{y + 32}' font-size='10' {_FONT}>#n: frame in the page cache; "
        "red bar: inside the hole being punched; red step: the violation; grey: after it</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def violation_svg(result: _Result) -> str | None:
    """The diagram of a result's counterexample (None if it has none)."""
    v = result.violation
    if v is None:
        return None
    threads = engine.parse_schedule(v.schedule) + [s.thread for s in v.aftermath]
    k, start, steps = frames(
        result.scenario,
        threads,
        result.kernel,
        fault_around_bytes=result.fault_around_bytes,
        sizes=result.sizes,
    )
    title = f"{result.scenario} on {result.kernel.name}: violated: {v.invariant}"
    return render_svg(k, start, steps, breach=len(v.trace), title=title, note=v.message)
