"""``uffd trace``: a page-access map of a recording (``record=`` or ``uffd lazy --record``), and
its counts as text; also what ``uffd lazy --trace`` draws with.

The tools, the stores and matplotlib are imported by the command that runs, not by its parser."""

from __future__ import annotations

import argparse
import os
import stat
from typing import TYPE_CHECKING

from ._args import UsageError, integer_between
from ._commands import add_command

if TYPE_CHECKING:
    from ..tools import PageTrace

__all__ = ["add_trace_commands", "check_figure", "define_trace", "print_counts"]


def check_figure(path: str, option: str, command: str) -> None:
    """UsageError (naming ``option`` and ``path``) unless a figure can be written at ``path``:
    a suffix matplotlib writes, a directory that exists, no directory at ``path``. Checked
    before anything runs, so a long run does not end in a figure that cannot be saved."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".svg", ".png", ".pdf"):
        raise UsageError(f"{option} {path}: name a .svg, .png or .pdf file", command=command)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: no directory {parent}", command=command)
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: a directory, not a file", command=command)


def print_counts(name: str, trace: PageTrace) -> None:
    """The counts of ``trace``, one per line."""
    print(f"uffd trace {name}")
    if not trace.marked:
        print("  (a recording without fault marks: filled pages are fault or read-ahead)")
    for measure, value in trace.summary():
        print(f"  {measure + ':':<28}{value}")


def _trace(args: argparse.Namespace) -> int:
    from ..tools import draw_trace, read_trace

    outputs = [p for p in (args.svg, args.png) if p is not None]
    for option, path in (("--svg", args.svg), ("--png", args.png)):
        if path is not None:
            check_figure(path, option, "trace")
    try:
        if not stat.S_ISREG(os.stat(args.record).st_mode):  # a FIFO would wait for a writer
            raise UsageError(f"{args.record}: not a regular file (a recording is one)",
                             command="trace")  # fmt: skip
        trace = read_trace(args.record, source=args.source, prefetch=args.prefetch,
                           page_size=args.page_size)  # fmt: skip
    except OSError as err:
        raise UsageError(f"{err.filename or args.record}: {err.strerror or err}",
                         command="trace") from None  # fmt: skip
    except ValueError as err:
        raise UsageError(f"{args.record}: {err}", command="trace") from None
    print_counts(args.record, trace)
    if outputs:
        draw_trace(trace, *outputs, title=f"uffd trace {os.path.basename(args.record)}")
        for path in outputs:
            print(f"  {'written:':<28}{path}")
    return 0


def add_trace_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``trace`` to ``commands``, defined at once (for a parser of one's own)."""
    add_command(commands, "trace")


def define_trace(trace_cmd: argparse.ArgumentParser) -> None:
    """Define ``trace RECORD [--svg OUT] [--png OUT] [--source SOURCE] [--prefetch PATH]
    [--page-size N]`` on its parser."""
    trace_cmd.add_argument("record", help="a recording: record= or uffd lazy --record wrote it")
    trace_cmd.add_argument("--svg", metavar="OUT", help="draw the page-access map into OUT (SVG)")
    trace_cmd.add_argument("--png", metavar="OUT", help="draw it into OUT as a PNG too")
    trace_cmd.add_argument(
        "--source",
        help="the source recorded (path, URL or pack): its size, and its pages known to be zero",
    )
    trace_cmd.add_argument(
        "--prefetch", metavar="PATH", help="the working set that run prefetched (prefetch=)"
    )
    trace_cmd.add_argument(
        "--page-size",
        type=integer_between(1 << 12, 1 << 30),
        default=None,
        help="bytes a page of the recording (default: this machine's page size)",
    )
    trace_cmd.set_defaults(func=_trace)
