"""``uffd serve`` and ``uffd lazy``: argument parsing for the runtime."""

from __future__ import annotations

import argparse
import random
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn
from rich.table import Table

from . import memory
from .runtime import Adaptive, Policy, Single, Window, lazy, serve_socket, server_of
from .stores import open_store

__all__ = ["add_runtime_commands", "parse_policy"]


def parse_policy(text: str) -> Policy:
    """``single``, ``window:N`` or ``adaptive[:MAX_BYTES]``."""
    name, _, argument = text.partition(":")
    try:
        if name == "single" and not argument:
            return Single()
        if name == "window":
            return Window(int(argument or 16))
        if name == "adaptive":
            return Adaptive(max_bytes=int(argument)) if argument else Adaptive()
    except ValueError as err:
        raise ValueError(f"bad policy {text!r}: {err}") from None
    raise ValueError(f"bad policy {text!r}: use single, window:N or adaptive[:MAX_BYTES]")


def _cpu(text: str) -> int | str | None:
    if text == "none":
        return None
    return text if text == "same" else int(text)


def _serve(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    parse_policy(args.policy)  # a bad policy fails now, not when the first client comes

    def listening() -> None:
        print(f"serving {args.store} ({store.size} bytes) on {args.socket}", file=sys.stderr)

    serve_socket(args.socket, store, policy_factory=lambda: parse_policy(args.policy),
                 once=args.once, on_listening=listening)  # fmt: skip
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {value}")
    return value


def _lazy(args: argparse.Namespace) -> int:
    data = lazy(args.source, policy=parse_policy(args.policy), cpu=_cpu(args.cpu))
    page = memory.page_size()
    pages = -(-len(data) // page)
    count = pages if args.pages is None else min(args.pages, pages)
    order = list(range(count))
    if args.order == "random":
        random.Random(args.seed).shuffle(order)
    console = Console(stderr=True)
    started = time.perf_counter()
    columns = (BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("touching", total=count)
        step = max(1, count // 200)
        for done, index in enumerate(order, 1):
            _ = data[index * page]  # the read is the point: it faults the page in
            if done % step == 0:
                progress.update(task, completed=done)
    seconds = time.perf_counter() - started
    stats = server_of(data).stats()
    print(f"uffd lazy {args.source}: {count} pages, {args.order}, {args.policy}")
    table = Table()
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("seconds", f"{seconds:.3f}"),
        ("pages touched / s", f"{count / seconds:,.0f}"),
        ("faults", f"{stats.faults:,}"),
        ("pages filled", f"{stats.pages:,}"),
        ("MB filled", f"{stats.bytes / 1e6:,.1f}"),
        ("store errors", f"{stats.errors}"),
        ("fault latency p50 / p90 / p99 (us)",
         f"{stats.latency_p50_us:.0f} / {stats.latency_p90_us:.0f} / {stats.latency_p99_us:.0f}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    Console(width=None if sys.stdout.isatty() else 100).print(table)
    return 0


def add_runtime_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve_cmd = commands.add_parser(
        "serve", help="serve page faults of clients (Firecracker's handler protocol) from a store"
    )
    serve_cmd.add_argument("--socket", required=True, help="Unix socket path to listen on")
    serve_cmd.add_argument("store", help="a path, an fsspec URL, or a pack made by uffd pack")
    serve_cmd.add_argument("--policy", default="adaptive", help="single, window:N or adaptive")
    serve_cmd.add_argument("--once", action="store_true", help="serve one client, then exit")
    serve_cmd.set_defaults(func=_serve)

    lazy_cmd = commands.add_parser("lazy", help="map a source lazily and touch its pages")
    lazy_cmd.add_argument("source", help="a path, an fsspec URL, a .npy file or a pack")
    lazy_cmd.add_argument("--order", choices=["seq", "random"], default="seq")
    lazy_cmd.add_argument("--policy", default="adaptive", help="single, window:N or adaptive")
    lazy_cmd.add_argument(
        "--pages", type=_positive, default=None, help="touch only this many pages"
    )
    lazy_cmd.add_argument("--cpu", default="same", help='handler CPU: a number, "same" or "none"')
    lazy_cmd.add_argument("--seed", type=int, default=1, help="seed of the random order")
    lazy_cmd.set_defaults(func=_lazy)
