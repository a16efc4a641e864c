"""``uffd lazy-tensors``: the tensors of a safetensors file or an .npz from its header alone, and
with ``--touch``, how fast they are read through :func:`~userfaultfd.runtime.lazy_tensors`.

The runtime, the stores and rich are imported by the command when it runs, not by its parser."""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import sys
import time
from typing import Any

from ._args import UsageError

__all__ = ["define_lazy_tensors"]


def define_lazy_tensors(command: argparse.ArgumentParser) -> None:
    """Define ``lazy-tensors SOURCE [--include P]... [--exclude P]... [--touch]
    [--prefetch all]`` on its parser."""
    command.add_argument("source", help="a path or URL of a safetensors file or an .npz")
    add = command.add_argument
    add("--include", action="append", metavar="PATTERN",
        help="a tensor name or glob pattern (repeatable)")  # fmt: skip
    add("--exclude", action="append", metavar="PATTERN",
        help="a tensor name or glob pattern to leave out (repeatable)")  # fmt: skip
    add("--touch", action="store_true",
        help="read every tensor selected; print throughput and bytes moved")  # fmt: skip
    add("--prefetch", choices=["all"],
        help="with --touch: read every tensor selected ahead, in file order")  # fmt: skip
    command.set_defaults(func=_lazy_tensors)


def _lazy_tensors(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..runtime._tensor_index import read_index
    from ..runtime._tensors import select
    from ..stores import open_store

    if args.prefetch and not args.touch:
        raise UsageError("--prefetch reads ahead of --touch: give both", command="lazy-tensors")
    with open_store(args.source) as store:
        index = read_index(store, repr(args.source))
    chosen = select(index.tensors, args.include, args.exclude)
    table = Table(title=f"{args.source}: {index.format}, {len(chosen)} of {len(index.tensors)}"
                        " tensors")  # fmt: skip
    for column in ("name", "dtype", "shape", "bytes"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for info in chosen:
        table.add_row(info.name, info.dtype_name, str(list(info.shape)), f"{info.nbytes:,}")
    total = sum(t.nbytes for t in chosen)
    table.add_row("total", "", "", f"{total:,}")
    console = Console(width=None if sys.stdout.isatty() else 100)
    console.print(table)
    for key, value in index.metadata.items():
        print(f"metadata {key}: {value}")
    if not args.touch:
        return 0
    seconds, moved, how = touch_tensors(args.source, args.include, args.exclude, args.prefetch)
    print(f"read {total:,} bytes of {len(chosen)} tensors in {seconds:.3f} s:"
          f" {total / seconds / 1e6 if seconds else 0:,.1f} MB/s; {how}"
          f" {moved:,} bytes ({moved / max(total, 1):.2f}x the tensors')")  # fmt: skip
    return 0


def touch_tensors(
    source: str, include: list[str] | None, exclude: list[str] | None, prefetch: str | None
) -> tuple[float, int, str]:
    """Map the tensors and read every one in a forked child (a page the store cannot give
    raises SIGBUS, which only the child dies of): (seconds, bytes moved, what moved them)."""
    from ..runtime import lazy_tensors, server_of

    tensors = lazy_tensors(source, include=include, exclude=exclude, prefetch=prefetch)
    read, write = os.pipe()
    start = time.perf_counter()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child's own exit
        try:
            os.close(read)
            for array in tensors.values():
                array.tobytes()
            os.write(write, pickle.dumps(time.perf_counter() - start))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(child, 0)
    handler: Any = None
    try:
        handler = server_of(next(iter(tensors.values())))
    except ValueError:  # the kernel's own mapping of a local file: no handler
        pass
    if not data:
        why = handler.stats().last_error if handler is not None else ""
        code = os.waitstatus_to_exitcode(status)
        dead = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        raise RuntimeError(f"reading the tensors failed ({dead}){': ' + why if why else ''}")
    seconds: float = pickle.loads(data)
    if handler is None:
        return seconds, sum(t.nbytes for t in tensors.infos.values()), "the kernel mapped"
    return seconds, handler.stats().bytes, "the handler filled"
