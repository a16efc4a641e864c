"""Figures of the benchmark tables: each script's figure is drawn from the table it printed.

A script run as ``python3 benchmarks/NAME.py ... > results/NAME-DATE.txt`` writes its figure next
to its table (``results/NAME-DATE.svg`` and ``.png``), or where ``--figure PATH`` says (repeat it
for an SVG and a PNG); ``--replot RESULTS_FILE`` redraws a saved table of that script without
running anything. The figure is always made from the printed text (the same parser either way),
so a figure shows exactly what its table says; its caption names the results file, the machine
and the date the table gives (else the file name's date, else today).

matplotlib (the ``bench`` extra) is imported only to draw, with the Agg backend: without it a
benchmark still runs and prints its table, and says on stderr that no figure was drawn.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["add_options", "main_with_figure", "replot"]

_MACHINE = re.compile(r"Linux [^;)]*?CPUs|\d+\.\d+\.\d+-[\w-]+, \d+ vCPU")
_DATE = re.compile(r"20\d\d-\d\d-\d\d")


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--replot RESULTS_FILE`` and ``--figure PATH`` on a script's parser (for its --help;
    :func:`main_with_figure` acts on them)."""
    parser.add_argument(
        "--replot",
        metavar="RESULTS_FILE",
        help="draw the figure of a saved table of this script, run nothing",
    )
    parser.add_argument("--figure", metavar="PATH", action="append",
                        help="where the figure goes (.svg, .png; repeat for both); default:"
                        " next to the table when stdout is a file (or RESULTS_FILE)")  # fmt: skip


@dataclass
class _Tee(io.TextIOBase):
    """Writes go to ``out`` and are kept."""

    out: Any
    kept: io.StringIO

    def write(self, text: str) -> int:
        self.kept.write(text)
        return int(self.out.write(text))

    def flush(self) -> None:
        self.out.flush()


def _stdout_file() -> str | None:
    """The regular file stdout is redirected into, if it is one."""
    try:
        path = os.readlink("/proc/self/fd/1")
        return path if os.path.isfile(path) else None
    except OSError:
        return None


def _next_to(table: str) -> list[str]:
    stem = os.path.splitext(table)[0]
    return [stem + ".svg", stem + ".png"]


def main_with_figure(main: Callable[[], Any], name: str) -> None:
    """Run a benchmark script's ``main`` and draw its figure from what it printed; or, given
    ``--replot RESULTS_FILE``, only draw that file's figure. Exits with main's status."""
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    known, _ = parser.parse_known_args()
    if known.replot is not None:
        replot(name, known.replot, known.figure or _next_to(known.replot))
        sys.exit(0)
    table = _stdout_file()
    figures = known.figure or (_next_to(table) if table else [])
    tee = _Tee(sys.stdout, io.StringIO())
    sys.stdout = tee
    try:
        status = main()
    finally:
        sys.stdout = tee.out
    if figures:
        try:
            _draw(name, tee.kept.getvalue(), table or "this run", figures)
        except ImportError as err:
            print(f"no figure drawn: {err} (the bench extra has matplotlib)", file=sys.stderr)
    sys.exit(status if isinstance(status, int) else 0)


def replot(name: str, results: str, figures: list[str]) -> None:
    """Draw the figure of ``results`` (a table script ``name`` printed) into ``figures``."""
    with open(results) as f:
        text = f.read()
    _draw(name, text, results, figures)


def _caption(text: str, source: str) -> str:
    machine = _MACHINE.search(text)
    date = _DATE.search(text) or _DATE.search(os.path.basename(source))
    when = date[0] if date else datetime.date.today().isoformat()
    where = machine[0] if machine else "machine not stated"
    return f"{os.path.relpath(source) if os.path.exists(source) else source}; {where}; {when}"


def _draw(name: str, text: str, source: str, figures: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"svg.fonttype": "none", "font.size": 8, "svg.hashsalt": "uffd"}):
        figure = _FIGURES[name](plt, text)
        figure.text(0.01, 0.005, _caption(text, source), fontsize=7, color="#444444")
        for path in figures:
            figure.savefig(path, dpi=110, metadata={"Date": None} if path.endswith(".svg")
                           else None)  # fmt: skip
            print(f"figure: {path}", file=sys.stderr)
        plt.close(figure)


def _number(text: str) -> float:
    return float(text.replace(",", ""))


#: Colours: references grey, the native path blue, the pure-Python path orange (Okabe-Ito).
_REF, _NATIVE, _PYTHON, _OTHER = "#999999", "#0072b2", "#e69f00", "#009e73"


def _colour(label: str) -> str:
    if "native" in label or "uffd" in label or "lazy_tensors" in label:
        return _NATIVE if "python" not in label and "NATIVE=0" not in label else _PYTHON
    if "python" in label:
        return _PYTHON
    return _REF


def _bars(axes: Any, labels: list[str], median: list[float], low: list[float] | None = None,
          high: list[float] | None = None, log: bool = True) -> None:  # fmt: skip
    positions = list(range(len(labels)))[::-1]
    errors = None
    if low is not None and high is not None:
        errors = [[m - lo for m, lo in zip(median, low, strict=True)],
                  [hi - m for m, hi in zip(median, high, strict=True)]]  # fmt: skip
    axes.barh(positions, median, xerr=errors, color=[_colour(x) for x in labels],
              error_kw={"elinewidth": 0.8, "capsize": 2})  # fmt: skip
    axes.set_yticks(positions, labels)
    if log:
        axes.set_xscale("log")
    axes.grid(axis="x", alpha=0.3)


_RUNTIME_ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<order>seq|random)\s+(?P<page>\d+) KiB\s+"
                          r"(?P<min>[\d,]+)\s+(?P<median>[\d,]+)\s+(?P<max>[\d,]+)\s")  # fmt: skip


def _runtime(plt: Any, text: str) -> Any:
    """Fault throughput by path and policy against the C reference and the kernel's faults."""
    rows = [m for m in map(_RUNTIME_ROW.match, text.splitlines()) if m]
    panels = [(o, p) for p in ("4", "2048") for o in ("seq", "random")
              if any(r["order"] == o and r["page"] == p for r in rows)]  # fmt: skip
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 2.1 * len(panels) + 0.8),
                                layout="constrained", squeeze=False)  # fmt: skip
    for ax, (order, page) in zip(axes[:, 0], panels, strict=True):
        chosen = [r for r in rows if r["order"] == order and r["page"] == page]
        _bars(ax, [r["label"] for r in chosen], [_number(r["median"]) for r in chosen],
              [_number(r["min"]) for r in chosen], [_number(r["max"]) for r in chosen])  # fmt: skip
        size = "4 KiB" if page == "4" else "2 MiB"
        ax.set_title(f"{'sequential' if order == 'seq' else 'random'} order, {size} pages",
                     loc="left")  # fmt: skip
        ax.set_xlabel("pages/s (median; bars: min-max)")
    figure.suptitle("Fault throughput: the runtime (native blue, Python orange) against the C"
                    " reference handler and the kernel (grey)")  # fmt: skip
    figure.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))
    return figure


_LOCAL_ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<median>[\d.]+) (?P<unit>ms|us)\s+"
                        r"(?P<min>[\d.]+) (?:ms|us)\s+(?P<max>[\d.]+) (?:ms|us)")  # fmt: skip


def _local(plt: Any, text: str) -> Any:
    """lazy() of a local .npy, direct and through the handler, against np.load(mmap_mode)."""
    rows = [m for m in map(_LOCAL_ROW.match, text.splitlines()) if m]
    groups: list[tuple[str, Callable[[str], bool]]] = [
        ("sum", lambda x: x.startswith("sum")),
        ("gather 1%", lambda x: x.startswith("gather")),
        ("setup and first fault", lambda x: not x.startswith(("sum", "gather"))),
    ]
    figure, axes = plt.subplots(len(groups), 1, figsize=(8, 7), layout="constrained")
    for ax, (title, keep) in zip(axes, groups, strict=True):
        chosen = [r for r in rows if keep(r["label"])]
        scale = [1e-3 if r["unit"] == "us" else 1.0 for r in chosen]
        _bars(ax, [r["label"] for r in chosen],
              [float(r["median"]) * s for r, s in zip(chosen, scale, strict=True)],
              [float(r["min"]) * s for r, s in zip(chosen, scale, strict=True)],
              [float(r["max"]) * s for r, s in zip(chosen, scale, strict=True)])  # fmt: skip
        ax.set_title(title, loc="left")
        ax.set_xlabel("ms (median; bars: min-max; lower is better)")
    figure.suptitle("lazy() of a local .npy against np.load(mmap_mode='r')")
    figure.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))
    return figure


_REMOTE_ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<rtt>[\d.]+) ms\s+(?P<value>[\d,.]+) "
                         r"(?P<unit>MB/s|pages/s|ms)")  # fmt: skip


def _remote(plt: Any, text: str) -> Any:
    """Remote throughput and first byte against RTT, raw and packed."""
    rows = [m for m in map(_REMOTE_ROW.match, text.splitlines()) if m]
    panels = [("MB/s", "throughput, MB/s"), ("pages/s", "random and working-set rows, pages/s"),
              ("ms", "first byte, ms (lower is better)")]  # fmt: skip
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.4), layout="constrained")
    for ax, (unit, title) in zip(axes, panels, strict=True):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r["unit"] == unit:
                series.setdefault(r["label"], []).append((float(r["rtt"]), _number(r["value"])))
        for label, points in series.items():
            points.sort()
            style = "--" if "(pack)" in label else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o",
                    markersize=3, label=label)  # fmt: skip
        ax.set_xlabel("RTT, ms")
        ax.set_title(title, loc="left")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    figure.suptitle("Remote lazy memory against the round-trip time (raw: solid; pack: dashed)")
    figure.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))
    return figure


_CRIU_ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<restore>[\d.]+)s\s+(?P<touch>[\d.]+)s\s+"
                       r"(?P<total>[\d.]+)s")  # fmt: skip


def _criu(plt: Any, text: str) -> Any:
    """CRIU lazy restore: each daemon's restore, touch (or read) and total, per table of the
    first run in the file (a file may hold several runs, each under its own '# python3' line)."""
    groups: list[tuple[str, list[re.Match[str]]]] = []
    runs = 0
    for line in text.splitlines():
        if line.startswith("# python3") or line.startswith("redis-server restored"):
            runs += 1
            if runs > 1 and not line.startswith("redis"):
                break
        if line.startswith("#") or not line.strip() or line.startswith(("daemon", "redis-server")):
            continue
        match = _CRIU_ROW.match(line)
        if match is None:
            groups.append((line.strip(), []))
        else:
            if not groups:
                groups.append(("", []))
            groups[-1][1].append(match)
    groups = [g for g in groups if g[1]]
    figure, axes = plt.subplots(len(groups), 1, figsize=(8, 1.0 + sum(0.32 * len(g[1]) + 0.6
                                                                     for g in groups)),
                                layout="constrained", squeeze=False)  # fmt: skip
    for ax, (title, rows) in zip(axes[:, 0], groups, strict=True):
        labels = [r["label"] for r in rows]
        positions = list(range(len(rows)))[::-1]
        restore = [float(r["restore"]) for r in rows]
        touch = [float(r["touch"]) for r in rows]
        total = [float(r["total"]) for r in rows]
        ax.barh(positions, restore, color="#cccccc", label="restore")
        ax.barh(positions, touch, left=restore, color=[_colour(x) for x in labels],
                label="touch / read")  # fmt: skip
        ax.scatter(total, positions, marker="|", s=200, color="black", label="total", zorder=3)
        ax.set_yticks(positions, labels)
        ax.set_title(title, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("seconds (restore, then touch; | total: until every page is in)")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    figure.suptitle("CRIU lazy restore: uffd lazy-pages (blue) against criu lazy-pages (grey)")
    figure.get_layout_engine().set(rect=(0, 0.03, 1, 0.97))
    return figure


_TENSOR_ROW = re.compile(r"^(?P<label>\S.*?)\s+(?P<median>[\d.]+)\s+(?P<min>[\d.]+)\s+"
                         r"(?P<max>[\d.]+)\s+(?P<gbs>[\d.]+)\s+(?P<ratio>[\d.]+)x")  # fmt: skip


def _tensors(plt: Any, text: str) -> Any:
    """Tensor loading: lazy_tensors against safe_open (the streamers' read-it-all approach)."""
    rows = [m for m in map(_TENSOR_ROW.match, text.splitlines()) if m]
    figure, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * len(rows)), layout="constrained")
    _bars(ax, [r["label"] for r in rows], [float(r["median"]) for r in rows],
          [float(r["min"]) for r in rows], [float(r["max"]) for r in rows], log=False)  # fmt: skip
    ax.set_xlabel("seconds to load every tensor (median; bars: min-max; lower is better)")
    figure.suptitle("Model weights: lazy_tensors against safetensors' safe_open")
    figure.get_layout_engine().set(rect=(0, 0.04, 1, 0.96))
    return figure


def _out_of_core(plt: Any, text: str) -> Any:
    """The array's memory over time, a panel per work: np.memmap in a cgroup of the budget
    against lazy(budget=...), with the budget drawn across."""
    budget = re.search(r"budget (\d+) MiB", text)
    rows: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    for line in text.splitlines():
        if line.startswith("# series|"):
            _tag, work, way, points = line.split("|", 3)
            pairs = [p.split(":") for p in points.split(",") if p]
            seconds = [float(t) / 1000 for t, _m in pairs]
            mib = [float(m) for _t, m in pairs]
            rows.setdefault(work, []).append((way, seconds, mib))
    if not rows:
        raise ValueError("no '# series|' lines: a table of benchmarks/out_of_core.py has them")
    figure, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 2.8), squeeze=False)
    for axis, (work, ways) in zip(axes[0], rows.items(), strict=True):
        for way, seconds, mib in ways:
            colour = "#1f77b4" if way.startswith("lazy") else "#555555"
            axis.plot(seconds, mib, label=way, color=colour, linewidth=1.2)
        if budget:
            axis.axhline(float(budget[1]), color="#888888", linestyle="--", linewidth=0.8,
                         label="budget")  # fmt: skip
        axis.set_title(work)
        axis.set_xlabel("seconds")
        axis.set_ylabel("array in memory (MiB)")
        axis.legend(fontsize=6)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    return figure


_FIGURES: dict[str, Callable[[Any, str], Any]] = {
    "runtime": _runtime, "local": _local, "remote": _remote, "criu": _criu, "tensors": _tensors,
    "out_of_core": _out_of_core,
}  # fmt: skip
