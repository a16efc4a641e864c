"""``uffd check``: argument parsing for userfaultfd.check, and its report on the terminal."""

from __future__ import annotations

import argparse
import sys

from .. import check as _checks
from ._args import integer_between, seconds_between
from ._commands import add_command

__all__ = ["add_check_command", "define_check"]

_DEFAULTS = _checks.CheckOptions()
#: The bounds of the options: each keeps a run finite and its deadlines within what a clock
#: holds (``--race-seconds 1e308`` was an OverflowError, ``--layouts 10**26`` never ended).
MAX_LAYOUTS = 100_000
MAX_RACE_ITERATIONS = 1_000_000_000
MAX_RACE_SECONDS = 86_400.0


def add_check_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``check`` to ``commands``, defined at once (for a parser of one's own)."""
    add_command(commands, "check")


def define_check(check: argparse.ArgumentParser) -> None:
    """Define ``check [--only NAME]... [--json] [--seed N] [--layouts N] [--race-seconds S]
    [--race-iterations N]`` on its parser."""
    check.add_argument(
        "--only",
        action="append",
        choices=list(_checks.CHECKS),
        metavar="NAME",
        help=f"run only this check (repeatable): {', '.join(_checks.CHECKS)}",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.add_argument(
        "--seed",
        type=int,
        default=_DEFAULTS.seed,
        help="seed of the model-agreement layouts (replays a run)",
    )
    check.add_argument(
        "--layouts",
        type=integer_between(1, MAX_LAYOUTS),
        default=_DEFAULTS.layouts,
        metavar="N",
        help=f"random layouts the model is compared on (1 to {MAX_LAYOUTS})",
    )
    check.add_argument(
        "--race-seconds",
        type=seconds_between(MAX_RACE_SECONDS),
        default=_DEFAULTS.race_seconds,
        metavar="S",
        help=f"time bound of the live race (more than 0, at most {MAX_RACE_SECONDS:g})",
    )
    check.add_argument(
        "--race-iterations",
        type=integer_between(1, MAX_RACE_ITERATIONS),
        default=_DEFAULTS.race_iterations,
        metavar="N",
        help=f"iteration bound of the live race (1 to {MAX_RACE_ITERATIONS})",
    )
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..check._report import render_json, render_table

    options = _checks.CheckOptions(
        race_iterations=args.race_iterations,
        race_seconds=args.race_seconds,
        layouts=args.layouts,
        seed=args.seed,
    )
    console = Console(stderr=True)
    results: list[_checks.CheckResult] = []
    for name in args.only or list(_checks.CHECKS):
        with console.status(f"uffd check: {name}", spinner="dots"):
            results.extend(_checks.run_checks([name], options))
    if args.json:
        print(render_json(results))
    else:
        # A pipe gets a wide table rather than rich's 80 columns.
        render_table(results, Console(width=None if sys.stdout.isatty() else 160))
    return 1 if any(r.status is _checks.Status.FAIL for r in results) else 0
