"""The ``uffd`` command: it parses arguments and calls the library, nothing else.

One module per command group (``_check``, ``_model``, ``_runtime``, ``_stores``, ``_tools``,
``_criu``), the argument types they share in ``_args``, the table of commands in ``_commands``
(a command's module is imported only when that command is parsed: ``uffd --help`` imports
none), and ``_main``: the parser, ``main``, and ``run_command``, the one place where a failure
becomes one line on stderr and an exit status.
"""

from ._main import build_parser as build_parser
from ._main import main as main
from ._main import run_command as run_command

__all__ = ["build_parser", "main", "run_command"]
