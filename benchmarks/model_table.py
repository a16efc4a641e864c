"""How the model's explorer scales, with each reduction, side by side with Spin.

Two tables:

1. Every kernel preset x history scenario at the default sizes: states and transitions with
   no reduction (plain DFS), sleep sets, and persistent sets.
2. Scaling: wp-punch-hole on a kernel preset (default upstream) as threads and pages grow. For
   each configuration, states stored, transitions and time for plain DFS, sleep sets and
   persistent sets (each in its own process, given ``--budget`` seconds), and Spin on the same
   configuration written in Promela at the model's own step granularity
   (benchmarks/promela/wp_punch_hole.py), with its partial-order reduction and without
   (-DNOREDUCE), both compiled with ``spin -a -o2`` (keep every variable: Spin otherwise hides
   write-only ones the model keeps in its state, such as the fault counters).

    python3 benchmarks/model_table.py [--budget SECONDS] [--kernel PRESET] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from userfaultfd import model

sys.path.insert(0, str(Path(__file__).parent / "promela"))
import wp_punch_hole  # the generator sits beside this file

#: (readers, writers, punchers, pages, punch ranges): threads = the sum of the first three + 1.
Config = tuple[int, int, int, int, tuple[tuple[int, int], ...] | None]
CONFIGS: tuple[Config, ...] = (
    (1, 1, 1, 4, None),
    (2, 1, 1, 4, None),
    (2, 1, 1, 8, None),
    (3, 1, 1, 4, None),
    (2, 2, 1, 8, None),
    (1, 2, 2, 8, None),
    (2, 2, 2, 8, None),
    (2, 2, 1, 8, ((1, 3),)),
)


@dataclass(frozen=True, slots=True)
class Run:
    """One exploration: None counts mean it did not finish within the budget."""

    states: int | None
    transitions: int | None
    seconds: float
    verdict: str = ""


def _explore(
    kernel: str, sizes: model.Sizes, reduction: str, out: multiprocessing.Queue[Run]
) -> None:
    t0 = time.perf_counter()
    r = model.explore("wp-punch-hole", kernel, reduction=reduction, sizes=sizes)
    verdict = r.violation.invariant if r.violation else "holds"
    out.put(Run(r.states, r.transitions, time.perf_counter() - t0, verdict))


def explore_within(kernel: str, sizes: model.Sizes, reduction: str, budget: float) -> Run:
    """Explore in a child process; give up after ``budget`` seconds."""
    queue: multiprocessing.Queue[Run] = multiprocessing.Queue()
    child = multiprocessing.Process(target=_explore, args=(kernel, sizes, reduction, queue))
    t0 = time.perf_counter()
    child.start()
    child.join(budget)
    if child.is_alive():
        child.kill()
        child.join()
        return Run(None, None, time.perf_counter() - t0, "out of budget")
    return queue.get()


def spin_within(kernel: str, sizes: model.Sizes, reduce: bool, budget: float) -> Run | None:
    """Spin on the generated Promela (None if spin or a C compiler is missing)."""
    if shutil.which("spin") is None or shutil.which("gcc") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="uffd-spin.") as tmp:
        pml = Path(tmp) / "model.pml"
        pml.write_text(wp_punch_hole.promela(kernel, sizes))
        subprocess.run(["spin", "-a", "-o2", "model.pml"], cwd=tmp, check=True, capture_output=True)
        flags = ["-DSAFETY"] + ([] if reduce else ["-DNOREDUCE"])
        subprocess.run(["gcc", "-w", "-O2", *flags, "-o", "pan", "pan.c"], cwd=tmp, check=True)
        t0 = time.perf_counter()
        try:
            done = subprocess.run(
                ["./pan", "-m10000000", "-w26"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=budget,
            )
        except subprocess.TimeoutExpired:
            return Run(None, None, budget, "out of budget")
        seconds = time.perf_counter() - t0
    stored = re.search(r"(\d+) states, stored", done.stdout)
    moves = re.search(r"(\d+) transitions", done.stdout)
    errors = re.search(r"errors: (\d+)", done.stdout)
    assert stored and moves and errors, done.stdout
    verdict = "holds" if errors.group(1) == "0" else "violated"
    return Run(int(stored.group(1)), int(moves.group(1)), seconds, verdict)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in (header, *rows)
    )


def history_table() -> str:
    rows = []
    for preset in model.PRESETS:
        for scenario, scen in model.SCENARIOS.items():
            if scen.group != "history":
                continue
            cells = [preset, scenario]
            verdict = ""
            for reduction in ("none", "sleep", "persistent"):
                r = model.explore(scenario, preset, reduction=reduction)
                verdict = r.violation.invariant if r.violation else "holds"
                cells += [str(r.states), str(r.transitions)]
            rows.append((*cells[:2], verdict, *cells[2:]))
    header = (
        "kernel",
        "scenario",
        "verdict",
        "plain st",
        "plain tr",
        "sleep st",
        "sleep tr",
        "persist st",
        "persist tr",
    )
    return _table(header, rows, 3)


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _secs(r: Run) -> str:
    return f"{'>' if r.states is None else ''}{r.seconds:.1f}s"


def scaling_table(kernel: str, budget: float, configs: tuple[Config, ...]) -> str:
    rows = []
    for readers, writers, punchers, pages, punch in configs:
        sizes = model.Sizes(readers, writers, punchers, pages, punch)
        threads = readers + writers + punchers + 1
        holes = ",".join(f"{s}+{n}" for s, n in punch) if punch else "own"
        cells = [f"{readers}/{writers}/{punchers}", str(threads), str(pages), holes]
        verdicts = set()
        for reduction in ("none", "sleep", "persistent"):
            r = explore_within(kernel, sizes, reduction, budget)
            if r.states is not None:
                verdicts.add(r.verdict)
            cells += [_count(r.states), _count(r.transitions), _secs(r)]
        for reduce in (True, False):
            s = spin_within(kernel, sizes, reduce, budget)
            cells += ["n/a", "n/a"] if s is None else [_count(s.states), _secs(s)]
        cells.insert(4, "/".join(sorted(verdicts)))
        rows.append(tuple(cells))
        print(f"  done {cells[:4]}", file=sys.stderr, flush=True)
    header = (
        "R/W/N",
        "threads",
        "pages",
        "punch",
        "verdict",
        "plain st",
        "plain tr",
        "plain t",
        "sleep st",
        "sleep tr",
        "sleep t",
        "persist st",
        "persist tr",
        "persist t",
        "spin-por st",
        "spin-por t",
        "spin-full st",
        "spin-full t",
    )
    return _table(header, rows, 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per exploration")
    parser.add_argument("--kernel", default="upstream")
    parser.add_argument("--quick", action="store_true", help="only the first four configurations")
    args = parser.parse_args()
    print(f"presets x scenarios (default sizes), {os.cpu_count()} CPUs")
    print(history_table())
    print()
    print(
        f"scaling: wp-punch-hole on {args.kernel}; R/W/N = readers/writers/punchers "
        f"(threads include the server); budget {args.budget:.0f}s per run"
    )
    configs = CONFIGS[:4] if args.quick else CONFIGS
    print(scaling_table(args.kernel, args.budget, configs))


if __name__ == "__main__":
    main()
