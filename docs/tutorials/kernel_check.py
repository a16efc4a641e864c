"""Tutorial, for kernel people: prove the running kernel's userfaultfd behaviour, then explore
the model of the fault path that explains it.

Runs as it is (root, Linux). The checks take their faults in forked children served by another
process; the model is pure Python and touches no memory of its own.
"""

from __future__ import annotations

from userfaultfd import model
from userfaultfd.check import CheckOptions, Status, run_checks


def main() -> None:
    # --8<-- [start:check]
    # `uffd check` from Python, with smaller bounds than the command's defaults.
    options = CheckOptions(race_iterations=300, race_seconds=3, layouts=50, seed=7)
    results = list(run_checks(options=options))
    for r in results:
        print(f"{r.status.name:4}  {r.check:9} {r.case:28} {r.reason[:60]}")
    failed = [r for r in results if r.status is Status.FAIL]
    assert failed == [], f"this kernel fails: {failed}"
    assert {r.check for r in results} == {"footprint", "race", "matrix", "semantics", "model"}
    # --8<-- [end:check]

    # --8<-- [start:explore]
    # The seed's race: before the patch, fault-around maps a page whose uffd-wp bit the hole
    # punch's pre-unmap just dropped, and a write lands without a WP message.
    found = model.explore("wp-punch-hole", "pre-patch")
    assert found.violation is not None and found.violation.invariant == "untracked write"
    for step in found.violation.trace:
        print(f"{step.number}. [{step.thread}] {step.function}: {step.change}")
    print("schedule:", found.violation.schedule)

    # The same schedule replayed step by step reaches the same violation ...
    again = model.replay("wp-punch-hole", found.violation.schedule, "pre-patch")
    assert again.violation is not None and again.violation.invariant == "untracked write"
    # ... and no interleaving breaks the invariant on the kernel as merged (5.19 and later).
    fixed = model.explore("wp-punch-hole", "upstream")
    assert fixed.violation is None, fixed.violation
    print(f"upstream: every interleaving holds ({fixed.states} states explored)")
    # --8<-- [end:explore]

    # --8<-- [start:table]
    # Every preset against the history's scenarios, as `uffd model table` prints it.
    held: dict[tuple[str, str], bool] = {}
    for row in model.table():
        run = row.result
        held[run.kernel.name, run.scenario] = run.violation is None
        verdict = "holds" if run.violation is None else f"violated: {run.violation.invariant}"
        print(f"{run.kernel.name:13} {run.scenario:21} {verdict:30} {run.states:6} states")
    assert held["upstream", "minor-fault-around"] and held["as-posted", "wp-punch-hole"]
    assert not held["as-posted", "minor-fault-around"] and not held["pre-patch", "wp-punch-hole"]
    # --8<-- [end:table]
    print("kernel check and model: every check passed")


if __name__ == "__main__":
    main()
