"""``uffd snapshot``: argument parsing for the write-protect tools."""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import random
import threading

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn

from .. import memory
from ..tools import check_destination, snapshot
from ._args import count, parse_size

__all__ = ["add_tool_commands"]


def _snapshot_demo(args: argparse.Namespace) -> int:
    """Snapshot a demo region of this process while native threads keep writing to it."""
    size = parse_size(args.size)
    page = memory.page_size()
    size -= size % page
    check_destination(args.dest)  # before filling the demo region: a bad DEST fails at once
    console = Console(stderr=True)
    mapping = memory.anonymous(size)
    for offset in range(0, size, 1 << 20):  # recognisable contents
        block = min(1 << 20, size - offset)
        mapping.view[offset : offset + block] = random.Random(offset).randbytes(block)
    expected = hashlib.sha256(mapping.view).hexdigest()
    stop = threading.Event()
    written = [0] * args.writers

    def writer(number: int) -> None:
        rng = random.Random(number)
        while not stop.is_set():
            ctypes.memmove(mapping.address + rng.randrange(size // page) * page, b"written!", 8)
            written[number] += 1

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(args.writers)]
    snap = snapshot(mapping, args.dest)
    try:
        for thread in threads:
            thread.start()
        columns = (BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("snapshot", total=size // page)
            stats = snap.wait(progress=lambda done, total: progress.update(task, completed=done))
    finally:  # whatever happened, the writers stop (they would spin on forever)
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join()
    digest = _digest(args.dest)
    if digest is None:
        verdict = "image written; it could not be read back to compare with memory"
    else:
        verdict = f"image {'equals' if digest == expected else 'DIFFERS FROM'} memory"
    print(
        f"uffd snapshot: {stats.pages} pages in {stats.seconds:.2f} s "
        f"({size / stats.seconds / 1e9:.2f} GB/s) while {args.writers} writers made "
        f"{sum(written):,} writes; {stats.early:,} pages saved early for a write; writer stall "
        f"p50/p90/p99 {stats.stall_p50_us:.0f}/{stats.stall_p90_us:.0f}/"
        f"{stats.stall_p99_us:.0f} us; {verdict} at the protect instant"
    )
    return 0 if digest == expected else 1


def _digest(dest: str) -> str | None:
    """SHA-256 of the image at ``dest`` (a path or an fsspec URL); None if it cannot be read."""
    import fsspec

    digest = hashlib.sha256()
    try:
        with fsspec.open(dest, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    except Exception:
        return None
    return digest.hexdigest()


def add_tool_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snap = commands.add_parser(
        "snapshot", help="live snapshot of a demo region while threads keep writing to it"
    )
    snap.add_argument("dest", help="image path, or an fsspec URL to upload it to")
    snap.add_argument("--size", default="256M", help="demo region size, e.g. 256M or 1G")
    snap.add_argument("--writers", type=count, default=2, help="writer threads during the snapshot")
    snap.set_defaults(func=_snapshot_demo)
