"""The ``uffd`` command. It parses arguments and calls the library; nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from ._features import feature_table

__all__ = ["main"]


def _features(args: argparse.Namespace) -> int:
    rows = feature_table()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uffd", description="Linux userfaultfd toolkit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    features = commands.add_parser("features", help="the userfaultfd features of this kernel")
    features.add_argument("--json", action="store_true", help="print JSON instead of a table")
    features.set_defaults(func=_features)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except (OSError, ValueError) as err:
        # A one-line message for a user, not a traceback.
        print(f"uffd: {err}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
