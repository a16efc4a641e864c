"""The table of ``uffd`` commands, and the subparsers action that defines a command's arguments
only when that command is parsed.

``uffd --help`` lists each command's name and one-line help, and that is all it needs: the table
below holds them, and importing it imports no command. Each command's arguments are defined by a
function of its own module (``define_*``), which imports what that command needs; the action calls
it once the command's name is parsed, for a run or for ``uffd COMMAND --help``. So a command
imports its own module and the library behind it, and no other command's. Each definer touches
only its own parser: the order of the table is the order of the listing, and nothing else.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

__all__ = ["COMMANDS", "Command", "Commands", "add_command", "add_commands"]


@final
@dataclass(frozen=True, slots=True)
class Command:
    """One ``uffd`` command, as the top-level parser knows it."""

    #: The line ``uffd --help`` shows for it.
    help: str
    #: ``"module:function"``: the module of this package, and its function that defines the
    #: command's arguments on the command's parser.
    define: str


#: The commands, in the order ``uffd --help`` lists them.
COMMANDS: dict[str, Command] = {
    "features": Command("the userfaultfd features of this kernel", "_main:define_features"),
    "check": Command(
        "prove on this kernel that userspace governs every page of a uffd range",
        "_check:define_check",
    ),
    "model": Command(
        "explore the executable model of the seed's fault-around race", "_model:define_model"
    ),
    "serve": Command(
        "serve page faults of clients (Firecracker's handler protocol) from a store",
        "_runtime:define_serve",
    ),
    "lazy": Command("map a source lazily and touch its pages", "_runtime:define_lazy"),
    "trace": Command(
        "draw the page-access map of a recording (record=): fault, read-ahead, zero, untouched",
        "_trace:define_trace",
    ),
    "lazy-tensors": Command(
        "list the tensors of a safetensors file or .npz; --touch reads them lazily",
        "_tensors:define_lazy_tensors",
    ),
    "pack": Command("compress a file or URL into a seekable zstd pack", "_stores:define_pack"),
    "snapshot": Command(
        "live snapshot of a demo region while threads keep writing to it", "_tools:define_snapshot"
    ),
    "lazy-pages": Command(
        "serve a CRIU lazy restore (a drop-in for criu lazy-pages -D IMAGES_DIR)",
        "_criu:define_lazy_pages",
    ),
    "top": Command("watch the lazy memory of a running program, live", "_top:define_top"),
}

if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction


@final
class Commands(_SubParsers):
    """The subparsers action of ``uffd``: a command's parser is made with its help at once, and
    its arguments are defined (its module imported) when the command's name is parsed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._undefined: set[str] = set()

    def add_command(self, name: str) -> None:
        """Add the command ``name`` of :data:`COMMANDS`, its arguments not yet defined."""
        self.add_parser(name, help=COMMANDS[name].help)
        self._undefined.add(name)

    def define(self, name: str) -> argparse.ArgumentParser:
        """The parser of command ``name``, with its arguments (defined now if not yet)."""
        parser = self.choices[name]
        if name in self._undefined:
            self._undefined.discard(name)
            _define(name, parser)
        return parser

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        # values: the command's name, then every argument after it.
        if values and values[0] in self._undefined:
            self.define(values[0])
        super().__call__(parser, namespace, values, option_string)


def _define(name: str, parser: argparse.ArgumentParser) -> None:
    module, _, function = COMMANDS[name].define.partition(":")
    getattr(importlib.import_module(f"{__package__}.{module}"), function)(parser)


def add_command(subparsers: _SubParsers, name: str) -> argparse.ArgumentParser:
    """Add the command ``name`` of :data:`COMMANDS` to any subparsers action (of a parser that
    holds only some of the commands), its arguments defined at once."""
    parser = subparsers.add_parser(name, help=COMMANDS[name].help)
    _define(name, parser)
    return parser


def add_commands(parser: argparse.ArgumentParser) -> Commands:
    """Add every command of :data:`COMMANDS` to ``parser``, none of them defined yet."""
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", action=Commands
    )
    assert isinstance(commands, Commands)
    for name in COMMANDS:
        commands.add_command(name)
    return commands
