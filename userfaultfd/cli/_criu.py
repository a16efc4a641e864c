"""``uffd lazy-pages``: argument parsing for userfaultfd.criu (``uffd pack --criu`` is an
option of ``pack``, in ``_stores``).

userfaultfd.criu and the runtime are imported by the command that runs, not by its parser."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ._args import UsageError, cpu_number, parse_policy, storage_option
from ._commands import add_command

if TYPE_CHECKING:
    from ..runtime import Server

__all__ = ["add_criu_commands", "define_lazy_pages"]


def add_criu_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``lazy-pages`` to ``subparsers``, defined at once (for a parser of one's own)."""
    add_command(subparsers, "lazy-pages")


def define_lazy_pages(p: argparse.ArgumentParser) -> None:
    """Define ``lazy-pages [--policy P] [--no-background] [--pages URL] [--storage-option KV]...
    [--socket PATH] [--cpu N] IMAGES_DIR`` on its parser."""
    p.description = (
        "Listen on IMAGES_DIR/lazy-pages.socket, then serve the page faults of every task"
        " that `criu restore --lazy-pages -D IMAGES_DIR` restores, from the dump's pages"
        " (or from --pages). After the restore, the pages left are filled in the background"
        " unless --no-background. Exits when every task is gone or every page is in, with"
        " a one-line summary."
    )
    p.add_argument("images", metavar="IMAGES_DIR", help="the directory criu dump wrote")
    p.add_argument(
        "--policy",
        default="adaptive",
        help="fault-around: single, window:N or adaptive[:MAX_BYTES] (default: adaptive)",
    )
    p.add_argument(
        "--no-background",
        dest="background",
        action="store_false",
        help="serve only on demand: no background fill after the restore",
    )
    p.add_argument(
        "--pages",
        metavar="URL",
        help=(
            "where the pages images are: a directory or URL prefix holding pages-ID.img (raw, or"
            " written by uffd pack --criu), or a template with {id}"
        ),
    )
    p.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        type=storage_option,
        help=(
            "a storage option for the --pages URL, repeatable; a dotted KEY nests (for S3:"
            " key=..., secret=..., client_kwargs.endpoint_url=http://HOST:PORT,"
            " client_kwargs.region_name=...); a VALUE that is a JSON number, true, false or null"
            " is that, anything else a string"
        ),
    )
    p.add_argument("--socket", metavar="PATH", help="default: IMAGES_DIR/lazy-pages.socket")
    p.add_argument(
        "--cpu", type=cpu_number, default=None, metavar="N", help="pin the handlers to this CPU"
    )
    p.set_defaults(func=_lazy_pages)


def _nested_options(pairs: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """``--storage-option`` pairs as the nested dict fsspec takes (``a.b=1`` -> {"a": {"b": 1}})."""
    options: dict[str, Any] = {}
    for path, value in pairs:
        into = options
        for part in path[:-1]:
            nested = into.setdefault(part, {})
            if not isinstance(nested, dict):
                raise UsageError(
                    f"--storage-option {'.'.join(path)}: {part} is already a value",
                    command="lazy-pages",
                )
            into = nested
        into[path[-1]] = value
    return options


def _lazy_pages(args: argparse.Namespace) -> int:
    from ..criu import lazy_pages

    policy = parse_policy(args.policy)

    def listening(path: str) -> None:
        print(f"uffd lazy-pages: listening on {path}", file=sys.stderr, flush=True)

    def task(pid: int, server: Server) -> None:
        print(f"uffd lazy-pages: task {pid}: {len(server.regions)} lazy ranges, handler "
              f"{server.handler_pid}, supervisor {server.pid}", file=sys.stderr,
              flush=True)  # fmt: skip

    options = _nested_options(args.storage_option)
    if options and args.pages is None:
        raise UsageError("--storage-option applies only with --pages URL", command="lazy-pages")
    from ._progress import ProgressBar

    bar = ProgressBar("background fill")  # on stderr, and only on a terminal
    try:
        summary = lazy_pages(args.images, pages=args.pages, storage_options=options,
                             policy=policy, background=args.background, socket_path=args.socket,
                             cpu=args.cpu, on_listening=listening, on_task=task,
                             progress=bar)  # fmt: skip
    finally:
        bar.close()
    print(summary.line(), flush=True)
    return 1 if summary.poisoned else 0
