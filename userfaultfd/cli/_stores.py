"""``uffd pack``: argument parsing and a progress bar; the work is in userfaultfd.stores.pack
(and, with ``--criu``, in userfaultfd.criu.pack_images)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

from .._location import is_url
from ..stores import open_store, pack
from ..stores._chunks import check_arguments
from ..stores._pack import DEFAULT_CHUNK_SIZE
from ._args import parse_size
from ._commands import add_command

__all__ = ["add_store_commands", "define_pack"]


def add_store_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``pack`` to ``subparsers``, defined at once (for a parser of one's own)."""
    add_command(subparsers, "pack")


def define_pack(p: argparse.ArgumentParser) -> None:
    """Define ``pack SOURCE DEST [--chunk-size N] [--level N] [--layout L] [--dictionary N]
    [--criu]`` on its parser."""
    p.description = (
        "Compress SOURCE (a path or a URL such as s3://bucket/key) into a pack of"
        " independently compressed chunks that any store can serve page by page."
        " With --layout chunks, DEST is the index of a content-addressed pack (a path or a"
        " URL such as s3://bucket/images/vm.index) and the pages no earlier pack there has go,"
        " compressed a chunk at a time, into bundles/ next to it."
    )
    p.add_argument("source", metavar="SOURCE", help="a path or a URL")
    p.add_argument("dest", metavar="DEST", help="the pack file (or the index) to write")
    p.add_argument(
        "--chunk-size",
        type=parse_size,
        default=DEFAULT_CHUNK_SIZE,
        metavar="N",
        help="uncompressed bytes per chunk; K, M, G suffixes allowed"
        f" (default: {DEFAULT_CHUNK_SIZE >> 10}K)",
    )
    p.add_argument("--level", type=int, default=3, metavar="N", help="zstd level (default: 3)")
    p.add_argument(
        "--layout",
        choices=("file", "chunks"),
        default="file",
        help="one pack file, or content-addressed chunk objects and an index (default: file)",
    )
    p.add_argument(
        "--dictionary",
        type=parse_size,
        default=0,
        metavar="N",
        help="train a zstd dictionary of N bytes on the source and store it (file layout only;"
        " default: none)",
    )
    p.add_argument(
        "--criu",
        action="store_true",
        help=(
            "SOURCE is a CRIU images directory: pack each pages-ID.img of the dump into the"
            " directory DEST, for uffd lazy-pages --pages DEST"
        ),
    )
    p.set_defaults(func=_pack)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_pack_arguments(args: argparse.Namespace) -> None:
    """Everything about ``pack``'s arguments that can be known before reading SOURCE: each
    number within its bounds (ValueError naming the option), and DEST a place a pack can be
    written (OSError naming DEST): a failure after the whole source was packed wastes the work,
    and the pack's own error named the hidden temporary file it writes first."""
    alone = {
        "--chunk-size": (args.chunk_size, 3, 0),
        "--level": (DEFAULT_CHUNK_SIZE, args.level, 0),
        "--dictionary": (DEFAULT_CHUNK_SIZE, 3, args.dictionary),
    }  # each number checked with valid others, so the error names the option that is wrong
    for option, numbers in alone.items():
        try:
            check_arguments(*numbers)
        except ValueError as err:
            raise ValueError(f"{option}: {err}") from None
    if args.criu:
        if os.path.exists(args.dest) and not os.path.isdir(args.dest):
            raise NotADirectoryError(
                f"cannot write the packs to {args.dest}: it exists and is not a directory"
            )
        return
    if not is_url(args.dest):
        # A content-addressed pack makes the directories of its index (and bundles/) itself.
        _check_writable_file(args.dest, "the pack", make_parents=args.layout == "chunks")


def _check_writable_file(dest: str, what: str, *, make_parents: bool = False) -> None:
    """OSError naming ``dest`` unless a file can be made at ``dest`` (by a rename from its own
    directory, as the pack is): not a directory, in a directory that exists (``make_parents``:
    or can be made in the nearest one that does) and takes a new file (not /proc, not
    read-only). Leaves nothing behind."""
    folder = os.path.dirname(dest) or "."
    if os.path.isdir(dest):
        raise IsADirectoryError(f"cannot write {what} to {dest}: it is a directory")
    if make_parents:
        while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder) or "."
    if not os.path.isdir(folder):
        why = "does not exist" if not os.path.exists(folder) else "is not a directory"
        raise FileNotFoundError(f"cannot write {what} to {dest}: {folder} {why}")
    try:
        fd, probe = tempfile.mkstemp(
            dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=".probe"
        )
    except OSError as err:
        reason = err.strerror or str(err)
        failure = type(err)(f"cannot write {what} to {dest}: cannot make a file in {folder}"
                            f" ({reason})")  # fmt: skip
        failure.errno = err.errno
        raise failure from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _pack(args: argparse.Namespace) -> int:
    check_pack_arguments(args)  # before SOURCE is opened, let alone read
    if args.criu:
        return _pack_criu(args)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    started = time.monotonic()
    # The bar goes to stderr, keeping stdout for the summary; off a terminal rich draws nothing.
    with (
        open_store(args.source) as source,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        ) as bar,
    ):
        task = bar.add_task("packing", total=source.size)
        info = pack(
            source,
            args.dest,
            chunk_size=args.chunk_size,
            level=args.level,
            layout=args.layout,
            dictionary=args.dictionary,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    seconds = time.monotonic() - started
    extras = [f"{info.zero_chunks} zero"] if info.zero_chunks else []
    if info.dictionary:
        extras.append(f"a {_human(info.dictionary)} dictionary")
    print(
        f"{args.source} -> {info.path}: {_human(info.size)} -> {_human(info.packed_size)}"
        f" (ratio {info.ratio:.2f}x), {info.chunks} chunks of {_human(info.chunk_size)}"
        f"{' (' + ', '.join(extras) + ')' if extras else ''}, level {info.level},"
        f" {_human(info.unique_bytes)} written, {seconds:.2f} s",
        file=sys.stdout,
    )
    return 0


def _pack_criu(args: argparse.Namespace) -> int:
    """``pack --criu IMAGES_DIR DEST``: --chunk-size and --level apply; --layout and
    --dictionary do not."""
    from ..criu import pack_images

    started = time.monotonic()
    from ._progress import ProgressBar

    bar = ProgressBar("packing")  # a bar for each pages image, on stderr (only on a terminal)
    try:
        infos = pack_images(args.source, args.dest, chunk_size=args.chunk_size, level=args.level,
                            progress=bar)  # fmt: skip
    finally:
        bar.close()
    for info in infos:
        print(f"{info.path}: {info.size} bytes -> {info.packed_size} (ratio {info.ratio:.2f}x), "
              f"{info.chunks} chunks")  # fmt: skip
    print(f"uffd pack --criu: {len(infos)} pages images in {time.monotonic() - started:.2f} s")
    return 0
