"""The ``uffd`` parser, its ``features`` command, and ``main``: the one place a failure becomes a
line on stderr and an exit status. The other commands are in their own modules, imported only
when they are parsed (``_commands``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from .._features import feature_table as _feature_table
from .._native import path_in_use
from ._args import UsageError
from ._commands import add_commands as _add_commands

__all__ = ["Terminated", "build_parser", "define_features", "main", "run_command"]


class Terminated(BaseException):
    """SIGTERM arrived while a command ran: raised in the main thread, as Ctrl-C raises
    KeyboardInterrupt, so that what the command cleans up on its way out (the socket ``serve``
    listens on, a half-written pack or snapshot image) is cleaned up. Not an Exception: no
    ``except Exception`` of the library swallows it."""


def _features(args: argparse.Namespace) -> int:
    rows = _feature_table()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": r.feature.name,
                        "bit": int(r.feature).bit_length() - 1,
                        "supported": r.supported,
                        "since": r.since,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    width = max(len(r.feature.name or "") for r in rows)
    print(f"fault path: {path_in_use()}")
    print(f"userfaultfd features of Linux {os.uname().release}")
    print(f"{'bit':>3}  {'feature':<{width}}  {'here':<4}  since")
    for r in rows:
        bit = int(r.feature).bit_length() - 1
        print(
            f"{bit:>3}  {r.feature.name:<{width}}  {'yes' if r.supported else 'no':<4}  {r.since}"
        )
    return 0


def define_features(features: argparse.ArgumentParser) -> None:
    """Define ``features [--json]`` on its parser."""
    features.add_argument("--json", action="store_true", help="print JSON instead of a table")
    features.set_defaults(func=_features)


def build_parser() -> argparse.ArgumentParser:
    """The ``uffd`` parser. Each command's arguments are defined, and its module imported, when
    the command is parsed (see ``_commands``): building it imports no command."""
    parser = argparse.ArgumentParser(prog="uffd", description="Linux userfaultfd toolkit")
    _add_commands(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command (see :func:`run_command`). A bad argument is argparse's
    usage message and exit status 2."""
    return run_command(build_parser().parse_args(argv))


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.func``. Commands raise; this is the only place a failure is
    printed: one line on stderr starting with ``uffd: `` (``uffd model: `` for a usage error a
    command group names) and a non-zero exit status, never a traceback: 2 for a usage error (a
    bad value found after parsing), 130 for Ctrl-C, 143 for SIGTERM (see :class:`Terminated`),
    1 for anything else. ``UFFD_TRACEBACK=1`` shows the traceback of an unexpected exception (a
    bug) instead of its one-line summary."""
    try:
        with _sigterm_raises():
            status: int = args.func(args)
    except KeyboardInterrupt:
        print("uffd: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("uffd: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except UsageError as err:
        print(f"uffd{' ' + err.command if err.command else ''}: {_one_line(err)}", file=sys.stderr)
        return 2
    except argparse.ArgumentTypeError as err:  # a value checked inside a command (e.g. --size)
        print(f"uffd: {_one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, EOFError, ImportError) as err:
        # OSError covers TimeoutError, every UserfaultfdError and StoreError.
        print(f"uffd: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if os.environ.get("UFFD_TRACEBACK"):
            raise
        print(f"uffd: internal error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return 1
    return status


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` within the block, when it would have killed the
    process (its disposition was the default) and this is the main thread; else nothing."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _sigterm_default_in_child() -> None:
    """A process a command forks (a handler, a client's server, a child that touches pages)
    dies of SIGTERM as it did before: the exception is for the command's own process."""
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to undo
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_sigterm_default_in_child)


def _one_line(err: BaseException) -> str:
    """The exception's message on one line (some carry a child's traceback or an HTTP body)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__
