"""The ``uffd`` command. It parses arguments and calls the library; nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import check as _checks
from ._cli_criu import add_criu_commands as _add_criu_commands
from ._cli_model import add_model_commands as _add_model_commands
from ._cli_runtime import add_runtime_commands as _add_runtime_commands
from ._cli_stores import add_store_commands as _add_store_commands
from ._cli_tools import add_tool_commands as _add_tool_commands
from ._features import feature_table as _feature_table

__all__ = ["build_parser", "main"]

_DEFAULTS = _checks.CheckOptions()


def _features(args: argparse.Namespace) -> int:
    rows = _feature_table()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": r.feature.name,
                        "bit": int(r.feature).bit_length() - 1,
                        "supported": r.supported,
                        "since": r.since,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    width = max(len(r.feature.name or "") for r in rows)
    print(f"userfaultfd features of Linux {os.uname().release}")
    print(f"{'bit':>3}  {'feature':<{width}}  {'here':<4}  since")
    for r in rows:
        bit = int(r.feature).bit_length() - 1
        print(
            f"{bit:>3}  {r.feature.name:<{width}}  {'yes' if r.supported else 'no':<4}  {r.since}"
        )
    return 0


def _check(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .check._report import render_json, render_table

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uffd", description="Linux userfaultfd toolkit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    features = commands.add_parser("features", help="the userfaultfd features of this kernel")
    features.add_argument("--json", action="store_true", help="print JSON instead of a table")
    features.set_defaults(func=_features)

    check = commands.add_parser(
        "check", help="prove on this kernel that userspace governs every page of a uffd range"
    )
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
        type=int,
        default=_DEFAULTS.layouts,
        help="random layouts the model is compared on",
    )
    check.add_argument(
        "--race-seconds",
        type=float,
        default=_DEFAULTS.race_seconds,
        help="time bound of the live race",
    )
    check.add_argument(
        "--race-iterations",
        type=int,
        default=_DEFAULTS.race_iterations,
        help="iteration bound of the live race",
    )
    check.set_defaults(func=_check)

    _add_model_commands(commands)
    _add_runtime_commands(commands)
    _add_store_commands(commands)
    _add_tool_commands(commands)
    _add_criu_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A failure is one line on stderr starting with ``uffd: `` and a non-zero
    exit status, never a traceback: 2 for a usage error (argparse's own, or a bad value found
    later), 130 for Ctrl-C, 1 for anything else. ``UFFD_TRACEBACK=1`` shows the traceback of an
    unexpected exception (a bug) instead of its one-line summary."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print("uffd: interrupted", file=sys.stderr)
        return 130
    except argparse.ArgumentTypeError as err:  # a value checked inside a command (e.g. --size)
        print(f"uffd: {_one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, EOFError, ImportError) as err:
        # OSError covers TimeoutError, every UserfaultfdError and StoreError.
        print(f"uffd: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get("UFFD_TRACEBACK"):
            raise
        print(f"uffd: internal error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 1
    return status


def _one_line(err: BaseException) -> str:
    """The exception's message on one line (some carry a child's traceback or an HTTP body)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
