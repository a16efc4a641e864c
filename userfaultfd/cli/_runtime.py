"""``uffd serve`` and ``uffd lazy``: argument parsing for the runtime.

``uffd lazy`` touches the memory in a forked child: a page the store cannot read is poisoned
(never zero-filled), and reading it kills the reader with SIGBUS, which no Python code survives.
The child notes in shared memory the source offset of each page before it reads it, so the
parent can say which page failed and why (it reads that page from the store itself).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import pickle
import random
import signal
import struct
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeRemainingColumn
from rich.table import Table

from .. import memory
from ..runtime import Policy, lazy, serve_socket, server_of
from ..stores import Store, StoreError, open_store
from ._args import cpu, parse_policy, positive

__all__ = ["add_runtime_commands"]


def _serve(args: argparse.Namespace) -> int:
    store = open_store(args.store)
    parse_policy(args.policy)  # a bad policy fails now, not when the first client comes

    def listening() -> None:
        print(f"serving {args.store} ({store.size} bytes) on {args.socket}", file=sys.stderr)

    serve_socket(args.socket, store, policy_factory=lambda: parse_policy(args.policy),
                 once=args.once, on_listening=listening)  # fmt: skip
    return 0


_NOTE = struct.Struct("<qI")  # (source offset being read, or -1; length of a pickled error)


def _lazy(args: argparse.Namespace) -> int:
    policy, handler_cpu = parse_policy(args.policy), cpu(args.cpu)
    store = open_store(args.source)  # a bad source fails here, before the fork
    note = mmap.mmap(-1, 1 << 16)  # MAP_SHARED: what the child was doing when it died
    _NOTE.pack_into(note, 0, -1, 0)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            try:
                status = _touch(args, store, policy, handler_cpu, note)
            except BaseException as err:  # the parent raises it, as if it were its own
                try:
                    message = pickle.dumps(err)
                except Exception:
                    message = pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"))
                if len(message) > len(note) - _NOTE.size:
                    message = pickle.dumps(RuntimeError(f"{type(err).__name__}: {err}"[:4000]))
                offset, _ = _NOTE.unpack_from(note, 0)
                _NOTE.pack_into(note, 0, offset, len(message))
                note[_NOTE.size : _NOTE.size + len(message)] = message
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    try:
        _, wait_status = os.waitpid(pid, 0)
    except BaseException:  # Ctrl-C: the child got it too; make sure it is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    offset, length = _NOTE.unpack_from(note, 0)
    if length:
        raise pickle.loads(note[_NOTE.size : _NOTE.size + length])
    if os.WIFEXITED(wait_status):
        return os.WEXITSTATUS(wait_status)
    Console(stderr=True).show_cursor(True)  # the progress bar hid it
    signum = os.WTERMSIG(wait_status)
    if signum == signal.SIGBUS and offset >= 0:
        raise RuntimeError(
            f"page at offset {offset} of {args.source} could not be read "
            f"({_why_unreadable(store, offset)}); the memory there raises SIGBUS"
        )
    raise RuntimeError(f"the process touching {args.source} was killed by signal "
                       f"{signal.Signals(signum).name}")  # fmt: skip


_AHEAD = 8 << 20  # how far past the page a handler's read-ahead window may have reached


def _why_unreadable(store: Store, offset: int) -> str:
    """Why the store could not serve the page at ``offset``, as it says now: the page's own
    read, or else the first failing read in the read-ahead window the handler read with it."""
    page = memory.page_size()
    step = 16 * page
    buffer = memoryview(bytearray(step))
    starts = [offset, *range(offset + page, min(store.size, offset + _AHEAD), step)]
    for number, start in enumerate(starts):
        size = min(page if number == 0 else step, store.size - start)
        try:
            store.read_into(start, buffer[:size])
        except (StoreError, OSError) as err:
            reason = " ".join((err.strerror or str(err)).split()) or type(err).__name__
            if number == 0:
                return reason
            return f"the handler read it with bytes from {start} on, which failed: {reason}"
    return "the store failed while the handler read it"


def _touch(args: argparse.Namespace, store: Store, policy: Policy, cpu: int | str | None,
           note: mmap.mmap) -> int:  # fmt: skip
    """Map ``store`` lazily and read a byte of each page (``note``: the offset being read)."""
    data = lazy(store, policy=policy, cpu=cpu, record=args.record, prefetch=args.prefetch)
    base = server_of(data).regions[0].offset  # a .npy's data starts after its header
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
            _NOTE.pack_into(note, 0, base + index * page, 0)
            _ = data[index * page]  # the read is the point: it faults the page in
            if done % step == 0:
                progress.update(task, completed=done)
    seconds = time.perf_counter() - started
    stats = server_of(data).stats()
    del data  # this process ends in os._exit: dropping the memory stops its handler now
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
    lazy_cmd.add_argument("--pages", type=positive, default=None, help="touch only this many pages")
    lazy_cmd.add_argument("--cpu", default="same", help='handler CPU: a number, "same" or "none"')
    lazy_cmd.add_argument("--seed", type=int, default=1, help="seed of the random order")
    lazy_cmd.add_argument("--record", metavar="PATH", help="log the working set (fills in order)")
    lazy_cmd.add_argument(
        "--prefetch", metavar="PATH", help="install a working set --record wrote, ahead of faults"
    )
    lazy_cmd.set_defaults(func=_lazy)
