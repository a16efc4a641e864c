"""``uffd serve`` and ``uffd lazy``: argument parsing for the runtime, and the stats table.

The runtime, the stores and rich are imported by the command that runs, not by its parser:
``uffd serve --help`` imports none of them."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from array import array

from ._args import UsageError, cpu, parse_policy, positive
from ._commands import add_command

__all__ = ["add_runtime_commands", "define_lazy", "define_serve"]


def _serve(args: argparse.Namespace) -> int:
    from ..runtime.firecracker import serve_socket
    from ..stores import open_store

    store = open_store(args.store)
    parse_policy(args.policy)  # a bad policy fails now, not when the first client comes

    def listening() -> None:
        print(f"serving {args.store} ({store.size} bytes) on {args.socket}", file=sys.stderr)

    serve_socket(args.socket, store, policy_factory=lambda: parse_policy(args.policy),
                 once=args.once, on_listening=listening)  # fmt: skip
    return 0


def _lazy(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..runtime import touch_pages
    from ._progress import ProgressBar, show_cursor

    policy = parse_policy(args.policy)
    if args.prefetch is not None:
        check_working_set(args.prefetch, args.source)
    try:
        result = touch_pages(
            args.source,
            policy=policy,
            cpu=args.cpu,
            order=args.order,
            pages=args.pages,
            seed=args.seed,
            record=args.record,
            prefetch=args.prefetch,
            progress=ProgressBar("touching"),  # drawn by the child that touches the pages
        )
    finally:
        show_cursor()
    stats, seconds = result.stats, result.seconds
    print(f"uffd lazy {args.source}: {result.pages} pages, {args.order}, {args.policy}")
    table = Table()
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("seconds", f"{seconds:.3f}"),
        ("pages touched / s", f"{result.pages / seconds:,.0f}"),
        ("faults", f"{stats.faults:,}"),
        ("pages filled", f"{stats.pages:,}"),
        ("MB filled", f"{stats.bytes / 1e6:,.1f}"),
        ("store errors", f"{stats.errors}"),
        ("pages prefetched", f"{stats.prefetched:,}"),
        ("zero pages mapped without a read", f"{stats.zeros:,}"),
        ("fault latency p50 / p90 / p99 (us)",
         f"{stats.latency_p50_us:.0f} / {stats.latency_p90_us:.0f} / {stats.latency_p99_us:.0f}"),
        ("fault path", stats.path),
    ]  # fmt: skip
    if stats.last_error:
        rows.append(("last error", stats.last_error))
    for name, value in rows:
        table.add_row(name, value)
    Console(width=None if sys.stdout.isatty() else 100).print(table)
    return 0


def check_working_set(path: str, source: str) -> None:
    """UsageError (naming ``--prefetch``, ``path`` and what is wrong) unless ``path`` is a working
    set ``--record`` could have written for ``source``: a regular file of 16-byte records
    (``runtime._inflight.RECORD``: offset and length, little-endian u64), each within the
    source (its last page may reach past the end, to the page boundary). The handler would
    otherwise skip what it cannot use without a word, and prefetch the wrong pages of another
    source's working set."""
    from .. import memory
    from ..runtime._inflight import RECORD
    from ..stores import open_store

    def refuse(why: str) -> UsageError:
        return UsageError(f"--prefetch {path}: {why}", command="lazy")

    try:
        # Looked at before it is opened: opening a FIFO would wait for a writer.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise refuse("not a regular file (a working set --record wrote is one)")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise refuse(err.strerror or str(err)) from None
    if len(data) % RECORD.size:
        raise refuse(
            f"{len(data)} bytes is not a whole number of {RECORD.size}-byte records (offset,"
            " length): not a working set --record wrote"
        )
    with open_store(source) as store:
        size = store.size
    page = memory.page_size()
    limit = -(-size // page) * page  # the end of the source's last page
    words = array("Q", data)
    if sys.byteorder != "little":
        words.byteswap()
    offsets, lengths = words[0::2], words[1::2]
    if offsets and max(map(int.__add__, offsets, lengths)) > limit:
        number = next(i for i, end in enumerate(map(int.__add__, offsets, lengths)) if end > limit)
        offset, length = offsets[number], lengths[number]
        raise refuse(
            f"record {number} (offset {offset}, length {length}) reaches past the end of"
            f" {source} ({size} bytes): a working set of another source?"
        )


def add_runtime_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``lazy`` to ``commands``, defined at once (for a parser of one's own)."""
    add_command(commands, "serve")
    add_command(commands, "lazy")


def define_serve(serve_cmd: argparse.ArgumentParser) -> None:
    """Define ``serve --socket PATH [--policy P] [--once] STORE`` on its parser."""
    serve_cmd.add_argument("--socket", required=True, help="Unix socket path to listen on")
    serve_cmd.add_argument("store", help="a path, an fsspec URL, or a pack made by uffd pack")
    serve_cmd.add_argument("--policy", default="adaptive", help="single, window:N or adaptive")
    serve_cmd.add_argument("--once", action="store_true", help="serve one client, then exit")
    serve_cmd.set_defaults(func=_serve)


def define_lazy(lazy_cmd: argparse.ArgumentParser) -> None:
    """Define ``lazy SOURCE [--order O] [--policy P] [--pages N] [--cpu C] [--seed N]
    [--record PATH] [--prefetch PATH]`` on its parser."""
    lazy_cmd.add_argument("source", help="a path, an fsspec URL, a .npy file or a pack")
    lazy_cmd.add_argument("--order", choices=["seq", "random"], default="seq")
    lazy_cmd.add_argument("--policy", default="adaptive", help="single, window:N or adaptive")
    lazy_cmd.add_argument("--pages", type=positive, default=None, help="touch only this many pages")
    lazy_cmd.add_argument(
        "--cpu", type=cpu, default="same", help='handler CPU: a number, "same" or "none"'
    )
    lazy_cmd.add_argument("--seed", type=int, default=1, help="seed of the random order")
    lazy_cmd.add_argument("--record", metavar="PATH", help="log the working set (fills in order)")
    lazy_cmd.add_argument(
        "--prefetch",
        metavar="PATH",
        help="install a working set --record wrote, ahead of faults (checked first: a file of"
        " 16-byte records, each within SOURCE)",
    )
    lazy_cmd.set_defaults(func=_lazy)
