"""``uffd model ...``: argument parsing for the kernel model; the work is in userfaultfd.model."""

from __future__ import annotations

import argparse
import shutil
import subprocess

from .. import model
from ..model import _diagram, _report
from ._args import UsageError
from ._commands import add_command

__all__ = ["add_model_commands", "define_model"]


def add_model_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``model`` to ``subparsers``, defined at once (for a parser of one's own)."""
    add_command(subparsers, "model")


def define_model(parser: argparse.ArgumentParser) -> None:
    """Define ``model`` with its sub-commands (list, run, table, replay) on its parser."""
    parser.description = (
        "Explore thread interleavings of the kernel model under each kernel policy."
    )
    sub = parser.add_subparsers(dest="model_command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list kernel presets and scenarios")
    p.set_defaults(func=_list)

    p = sub.add_parser("run", help="explore one scenario under one kernel preset")
    p.add_argument("scenario", metavar="SCENARIO")
    _kernel_options(p)
    _reduction_options(p)
    p.add_argument(
        "--no-reduction", action="store_true", help="plain DFS (same as --reduction none)"
    )
    p.add_argument(
        "--svg", metavar="FILE", help="draw the counterexample as a sequence diagram (SVG)"
    )
    p.add_argument(
        "--png", metavar="FILE", help="the same diagram as PNG (needs rsvg-convert, librsvg2-bin)"
    )
    p.set_defaults(func=_run)

    p = sub.add_parser("table", help="every preset against every scenario")
    p.add_argument("--fault-around-bytes", type=int, default=65536, metavar="N")
    p.add_argument(
        "--group",
        choices=("history", "kernel", "protocol"),
        default="history",
        help="the seed's history (default), more kernel scenarios, or the runtime's protocols",
    )
    _reduction_options(p)
    p.set_defaults(func=_table)

    p = sub.add_parser("replay", help="replay a schedule a violation printed")
    p.add_argument("scenario", metavar="SCENARIO")
    p.add_argument("schedule", metavar="SCHEDULE", help='e.g. "punch*2 read*2 write*3"')
    _kernel_options(p)
    p.set_defaults(func=_replay)


def _kernel_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default="upstream", metavar="PRESET", help="default: upstream")
    p.add_argument("--fault-around-bytes", type=int, default=65536, metavar="N")
    for name in ("readers", "writers", "punchers", "pages"):
        p.add_argument(f"--{name}", type=int, metavar="N", help="default: the scenario's own")
    p.add_argument(
        "--punch",
        action="append",
        metavar="START+PAGES",
        help="a puncher's hole in file pages (repeat for each puncher), e.g. 1+2",
    )


def _sizes(args: argparse.Namespace) -> model.Sizes:
    punch = None
    if args.punch:
        ranges = []
        for text in args.punch:
            start, plus, pages = text.partition("+")
            if not (plus and start.isdigit() and pages.isdigit()):
                raise ValueError(f"bad --punch {text!r} (want START+PAGES, e.g. 1+2)")
            ranges.append((int(start), int(pages)))
        punch = tuple(ranges)
    punchers = args.punchers if args.punchers is not None or punch is None else len(punch)
    if punch is not None and punchers != len(punch):
        raise ValueError(f"--punchers {punchers} but {len(punch)} --punch ranges")
    return model.Sizes(args.readers, args.writers, punchers, args.pages, punch)


def _reduction_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reduction",
        choices=model.REDUCTIONS,
        default="persistent",
        help="persistent sets (default; fewer states), sleep sets (fewer transitions) or none",
    )


def _usage(err: Exception) -> UsageError:
    """A name or size the model refused, as the usage error ``main`` reports (status 2)."""
    return UsageError(str(err.args[0] if err.args else err), command="model")


def _list(args: argparse.Namespace) -> int:
    print(_report.render_list())
    return 0


def _run(args: argparse.Namespace) -> int:
    converter = shutil.which("rsvg-convert") if args.png else None
    if args.png and converter is None:
        raise UsageError("--png needs rsvg-convert (apt-get install librsvg2-bin)", command="model")
    try:
        result = model.explore(
            args.scenario,
            args.kernel,
            fault_around_bytes=args.fault_around_bytes,
            reduction="none" if args.no_reduction else args.reduction,
            sizes=_sizes(args),
        )
    except (model.UnknownNameError, ValueError) as err:
        raise _usage(err) from err
    print(_report.render_result(result))
    if args.svg or args.png:
        drawing = _diagram.violation_svg(result)
        if drawing is None:
            print("no counterexample: nothing to draw")
            return 0
        if args.svg:
            with open(args.svg, "w", encoding="utf-8") as out:
                out.write(drawing)
            print(f"diagram: {args.svg}")
        if converter is not None:
            subprocess.run(
                [converter, "-o", args.png], input=drawing.encode(), check=True, timeout=60
            )
            print(f"diagram: {args.png}")
    return 0


def _table(args: argparse.Namespace) -> int:
    try:
        rows = model.table(
            fault_around_bytes=args.fault_around_bytes,
            reduction=args.reduction,
            group=args.group,
        )
    except ValueError as err:
        raise _usage(err) from err
    print(_report.render_table(rows))
    return 0


def _replay(args: argparse.Namespace) -> int:
    try:
        run = model.replay(
            args.scenario,
            args.schedule,
            args.kernel,
            fault_around_bytes=args.fault_around_bytes,
            sizes=_sizes(args),
        )
    except (model.UnknownNameError, ValueError) as err:
        raise _usage(err) from err
    print(_report.render_replay(run))
    return 0
