"""``uffd snapshot``: argument parsing for the write-protect tools, and the summary line.

The tools and rich are imported by the command that runs, not by its parser."""

from __future__ import annotations

import argparse
import os

from ._args import integer_between, size_between
from ._commands import add_command

__all__ = ["MAX_WRITERS", "add_tool_commands", "define_snapshot"]

#: Writer threads ``snapshot`` starts at most: beyond the CPUs they only take turns, and
#: ``--writers 100000`` started that many threads without a word.
MAX_WRITERS = 64


def _max_size() -> int:
    """The largest demo region: half this machine's memory. The region is filled in memory
    before the snapshot (and the image may go to a tmpfs): more would end in the OOM killer."""
    half = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    return max(half >> 20 << 20, 1 << 20)  # whole MiB, as --help shows it


def _snapshot_demo(args: argparse.Namespace) -> int:
    from ..tools import snapshot_demo
    from ._progress import ProgressBar

    bar = ProgressBar("snapshot")
    try:
        result = snapshot_demo(args.dest, args.size, writers=args.writers, progress=bar)
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
    page, most = os.sysconf("SC_PAGE_SIZE"), _max_size()
    snap.add_argument(
        "--size",
        type=size_between(page, most),
        default="256M",
        help=f"demo region size, e.g. 256M or 1G (from a page to half the memory: {most >> 20}M)",
    )
    snap.add_argument(
        "--writers",
        type=integer_between(0, MAX_WRITERS),
        default=2,
        help=f"writer threads during the snapshot (0 to {MAX_WRITERS})",
    )
    snap.set_defaults(func=_snapshot_demo)
