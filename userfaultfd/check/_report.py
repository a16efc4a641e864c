"""Check results for people (a rich table) and for machines (JSON)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from ._result import CheckResult, Status

__all__ = ["render_json", "render_table"]

_STYLE = {Status.PASS: "green", Status.FAIL: "bold red", Status.SKIP: "yellow"}


def render_table(results: Iterable[CheckResult], console: Console) -> None:
    table = Table(title="uffd check", show_lines=False)
    table.add_column("check")
    table.add_column("case")
    table.add_column("result")
    table.add_column("s", justify="right")
    table.add_column("why", overflow="fold")
    for r in results:
        style = _STYLE[r.status]
        table.add_row(
            r.check, r.case, f"[{style}]{r.status.value}[/]", f"{r.seconds:.2f}", r.reason
        )
    console.print(table)


def render_json(results: Iterable[CheckResult]) -> str:
    return json.dumps(
        [
            {"check": r.check, "case": r.case, "status": r.status.value, "reason": r.reason,
             "seconds": round(r.seconds, 3)}
            for r in results
        ],
        indent=2,
    )  # fmt: skip
