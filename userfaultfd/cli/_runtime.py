"""``uffd serve`` and ``uffd lazy``: argument parsing for the runtime, and the stats table.

The runtime, the stores and rich are imported by the command that runs, not by its parser:
``uffd serve --help`` imports none of them."""

from __future__ import annotations

import argparse
import sys

from ._args import cpu, parse_policy, positive
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

    try:
        result = touch_pages(
            args.source,
            policy=parse_policy(args.policy),
            cpu=cpu(args.cpu),
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
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    Console(width=None if sys.stdout.isatty() else 100).print(table)
    return 0


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
    lazy_cmd.add_argument("--cpu", default="same", help='handler CPU: a number, "same" or "none"')
    lazy_cmd.add_argument("--seed", type=int, default=1, help="seed of the random order")
    lazy_cmd.add_argument("--record", metavar="PATH", help="log the working set (fills in order)")
    lazy_cmd.add_argument(
        "--prefetch", metavar="PATH", help="install a working set --record wrote, ahead of faults"
    )
    lazy_cmd.set_defaults(func=_lazy)
