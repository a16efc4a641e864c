"""``uffd top PID``: argument parsing, and the frames drawn from userfaultfd.tools.Top.

The tools and rich are imported by the command that runs, not by its parser."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ._args import positive, seconds_between
from ._commands import add_command

if TYPE_CHECKING:
    from rich.console import Group

    from ..tools import TopFrame

__all__ = ["add_top_command", "define_top", "render"]

#: The width of a frame printed off a terminal (rich would fold the table into 80 columns).
_TEXT_WIDTH = 160


def add_top_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``top`` to ``subparsers``, defined at once (for a parser of one's own)."""
    add_command(subparsers, "top")


def define_top(p: argparse.ArgumentParser) -> None:
    """Define ``top PID [--interval S] [--once]`` on its parser."""
    p.description = (
        "Show the lazy memory of the running program PID, live: one row for each of its"
        " servers (faults/s, fill MB/s, pages filled, zero, prefetched and poisoned, store"
        " errors, restarts, fault latency), read from the counters the runtime keeps in shared"
        " memory; nothing in the program changes. Ends when the program exits, or on Ctrl-C."
    )
    p.add_argument("pid", type=positive, metavar="PID", help="the program (or one of its servers)")
    p.add_argument(
        "--interval",
        type=seconds_between(3600),
        default=1.0,
        metavar="S",
        help="seconds between frames, and what the rates are over (default: 1)",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="print one frame as text and exit (its rates over --interval)",
    )
    p.set_defaults(func=_top)


def _top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from ..tools import Top

    try:
        top = Top(args.pid)
    except ProcessLookupError:
        raise ProcessLookupError(f"no process {args.pid}") from None
    with top:
        if args.once:
            top.frame()  # the counters before: the rates are over the interval that follows
            if not top.wait(args.interval):
                raise ProcessLookupError(f"process {args.pid} exited")
            frame = top.frame()
            Console(width=None if sys.stdout.isatty() else _TEXT_WIDTH).print(
                render(frame, args.interval)
            )
            return 0
        console = Console()
        try:
            with Live(render(top.frame(), args.interval), console=console,
                      auto_refresh=False) as live:  # fmt: skip
                while top.wait(args.interval):
                    try:
                        frame = top.frame()
                    except ProcessLookupError:
                        break
                    live.update(render(frame, args.interval), refresh=True)
        except KeyboardInterrupt:
            return 0  # Ctrl-C is how one leaves a live view
        except ProcessLookupError:  # exited before the first frame
            pass
        console.print(f"uffd top: process {args.pid} exited")
    return 0


def render(frame: TopFrame, interval: float) -> Group:
    """One frame: a line about the program, a row per server, and each server's last error."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    mib = 1 << 20
    head = Text.assemble(
        ("uffd top", "bold"),
        f"  {frame.command} ({frame.pid})  {len(frame.servers)} server"
        f"{'' if len(frame.servers) == 1 else 's'}  lazy memory {frame.registered_bytes / mib:,.1f}"
        f" MiB registered, {frame.resident_bytes / mib:,.1f} MiB resident  every {interval:g} s",
    )
    if not frame.servers:
        return Group(head, Text(
            f"no lazy memory served by a handler in process {frame.pid} (what lazy() maps"
            " directly from a local file has none)"
        ))  # fmt: skip
    evicted = any(hasattr(s.stats, "evicted") for s in frame.servers)
    table = Table(box=None, pad_edge=False, header_style="bold")
    columns = ["handler", "state", "path", "faults", "faults/s", "filled", "fill MB/s", "zero",
               "prefetched", "poisoned"] + (["evicted"] if evicted else []) + [
               "errors", "restarts", "p50/p90/p99 us"]  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name in ("state", "path") else "right")
    notes = []
    for server in frame.servers:
        s = server.stats
        row = [str(server.handler_pid), server.state, s.path, f"{s.faults:,}",
               _per_s(server.faults_per_s, 1), f"{s.pages:,}",
               _per_s(server.fill_bytes_per_s, 1e6), f"{s.zeros:,}", f"{s.prefetched:,}",
               f"{s.poisoned:,}"]  # fmt: skip
        if evicted:
            row.append(f"{getattr(s, 'evicted', 0):,}")
        latency = f"{s.latency_p50_us:.0f}/{s.latency_p90_us:.0f}/{s.latency_p99_us:.0f}"
        row += [f"{s.errors:,}", f"{s.restarts:,}", latency]
        table.add_row(*row, style="red" if s.poisoned or s.errors else None)
        if s.last_error:
            notes.append(Text(f"handler {server.handler_pid}: {s.last_error}", style="red"))
    return Group(head, table, *notes)


def _per_s(value: float | None, unit: float) -> str:
    return "-" if value is None else f"{value / unit:,.1f}"
