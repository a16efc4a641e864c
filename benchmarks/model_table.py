"""How fast the model explores, and what the sleep-set reduction saves.

For every kernel preset and scenario: states and transitions explored with the reduction on,
states per second, and states / transitions with it off. Times are the best of ``--repeat`` runs.

    python3 benchmarks/model_table.py [--repeat N] [--fault-around-bytes N]
"""

from __future__ import annotations

import argparse
import time

from userfaultfd import model


def _best(
    scenario: str, preset: str, reduction: str, repeat: int, fab: int
) -> tuple[float, model.Result]:
    best = float("inf")
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = model.explore(scenario, preset, fault_around_bytes=fab, reduction=reduction)
        best = min(best, time.perf_counter() - t0)
    assert result is not None
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fault-around-bytes", type=int, default=65536)
    args = parser.parse_args()
    header = (
        "kernel",
        "scenario",
        "verdict",
        "states",
        "transitions",
        "states/s",
        "states(off)",
        "transitions(off)",
        "saved",
    )
    rows = []
    total = 0.0
    for preset in model.PRESETS:
        for scenario in model.SCENARIOS:
            t_on, on = _best(scenario, preset, "sleep", args.repeat, args.fault_around_bytes)
            _, off = _best(scenario, preset, "none", args.repeat, args.fault_around_bytes)
            total += t_on
            saved = 1 - on.transitions / off.transitions if off.transitions else 0.0
            rows.append(
                (
                    preset,
                    scenario,
                    on.violation.invariant if on.violation else "holds",
                    str(on.states),
                    str(on.transitions),
                    f"{on.states / t_on:,.0f}",
                    str(off.states),
                    str(off.transitions),
                    f"{saved:.0%}",
                )
            )
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print(
            "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    print(f"total (reduction on, best runs): {total:.2f}s")


if __name__ == "__main__":
    main()
