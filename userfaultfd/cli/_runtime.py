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
    if args.trace is not None:
        from ._trace import check_figure

        check_figure(args.trace, "--trace", "lazy")
    record, scratch = args.record, None
    if args.trace is not None and record is None:  # the map needs a recording: a scratch one
        import tempfile

        scratch = tempfile.mkdtemp(prefix="uffd-trace-")
        record = os.path.join(scratch, "recording")
    ahead = None  # the working set prefetched, as it was (--record may replace it)
    if args.trace is not None and args.prefetch is not None:
        with open(args.prefetch, "rb") as f:
            ahead = f.read()
    try:
        result = touch_pages(
            args.source,
            policy=policy,
            cpu=args.cpu,
            order=args.order,
            pages=args.pages,
            seed=args.seed,
            record=record,
            prefetch=args.prefetch,
            progress=ProgressBar("touching"),  # drawn by the child that touches the pages
        )
    except BaseException:
        if scratch is not None:
            import shutil

            shutil.rmtree(scratch, ignore_errors=True)
        raise
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
    if args.trace is not None:
        _draw(args, record, ahead, scratch)
    return 0


def _draw(args: argparse.Namespace, record: str, ahead: bytes | None, scratch: str | None) -> None:
    """``--trace``: the page-access map of the run just made (its counts printed too)."""
    import shutil

    from .. import memory
    from ..stores import open_store
    from ..tools import draw_trace, parse_trace
    from ._trace import print_counts

    try:
        with open(record, "rb") as f:
            data = f.read()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    with open_store(args.source) as store:
        trace = parse_trace(data, page_size=memory.page_size(), size=store.size,
                            prefetch=ahead or b"", known_zero=store.known_zero)  # fmt: skip
    print_counts(args.record or "(this run)", trace)
    draw_trace(trace, args.trace, title=f"uffd lazy {args.source} --order {args.order}"
               f" --policy {args.policy}")  # fmt: skip
    print(f"  {'written:':<28}{args.trace}")


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
    [--record PATH] [--trace FILE.svg] [--prefetch PATH]`` on its parser."""
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
        "--trace",
        metavar="FILE.svg",
        help="draw the run's page-access map into FILE (.svg, .png or .pdf), as uffd trace does",
    )
    lazy_cmd.add_argument(
        "--prefetch",
        metavar="PATH",
        help="install a working set --record wrote, ahead of faults (checked first: a file of"
        " 16-byte records, each within SOURCE)",
    )
    lazy_cmd.set_defaults(func=_lazy)
