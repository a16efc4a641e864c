"""``uffd snapshot``: argument parsing for the write-protect tools, and the summary line.

The tools and rich are imported by the command that runs, not by its parser."""

from __future__ import annotations

import argparse

from ._args import count, parse_size
from ._commands import add_command

__all__ = ["add_tool_commands", "define_snapshot"]


def _snapshot_demo(args: argparse.Namespace) -> int:
    from ..tools import snapshot_demo
    from ._progress import ProgressBar

    bar = ProgressBar("snapshot")
    try:
        result = snapshot_demo(args.dest, parse_size(args.size), writers=args.writers, progress=bar)
    finally:
        bar.close()
    stats = result.stats
    if result.exact is None:
        verdict = "image written; it could not be read back to compare with memory"
    else:
        verdict = f"image {'equals' if result.exact else 'DIFFERS FROM'} memory"
    print(
        f"uffd snapshot: {stats.pages} pages in {stats.seconds:.2f} s "
        f"({result.size / stats.seconds / 1e9:.2f} GB/s) while {result.writers} writers made "
        f"{result.writes:,} writes; {stats.early:,} pages saved early for a write; writer stall "
        f"p50/p90/p99 {stats.stall_p50_us:.0f}/{stats.stall_p90_us:.0f}/"
        f"{stats.stall_p99_us:.0f} us; {verdict} at the protect instant"
    )
    return 0 if result.exact else 1


def add_tool_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``snapshot`` to ``commands``, defined at once (for a parser of one's own)."""
    add_command(commands, "snapshot")


def define_snapshot(snap: argparse.ArgumentParser) -> None:
    """Define ``snapshot DEST [--size SIZE] [--writers N]`` on its parser."""
    snap.add_argument("dest", help="image path, or an fsspec URL to upload it to")
    snap.add_argument("--size", default="256M", help="demo region size, e.g. 256M or 1G")
    snap.add_argument("--writers", type=count, default=2, help="writer threads during the snapshot")
    snap.set_defaults(func=_snapshot_demo)
