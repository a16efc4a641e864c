"""What each ``uffd`` command imports: ``uffd --help`` lists the commands without importing any of
them, and a command imports its own module and the library behind it, no other command's.

Each case runs the command in a fresh interpreter and compares ``sys.modules`` before and after
``main``: a test of module sets, not of time (the times are in the report of issue 19)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from userfaultfd.cli._commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

#: Runs ``main(argv)`` and prints the modules it imported (those present before are left out,
#: so nothing the interpreter or the environment imports at start-up counts).
PROGRAM = """\
import contextlib, io, json, sys
before = set(sys.modules)
from userfaultfd.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        status = main(sys.argv[1:])
    except SystemExit as exit:
        status = exit.code
print(json.dumps({"status": status, "imported": sorted(set(sys.modules) - before)}))
"""

#: What the library's heavy parts are: third-party packages and the library's own big modules.
HEAVY = (
    "numpy",
    "rich",
    "fsspec",
    "zstandard",
    "userfaultfd.model",
    "userfaultfd.check",
    "userfaultfd.runtime",
    "userfaultfd.stores",
    "userfaultfd.criu",
    "userfaultfd.tools",
)


def imported_by(*argv: str) -> set[str]:
    """The modules ``uffd ARGV`` imports, run in a fresh interpreter from this checkout; the
    command must succeed (``--help`` exits 0)."""
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == 0, f"uffd {' '.join(argv)} exited {result['status']}"
    return set(result["imported"])


def within(modules: set[str], *packages: str) -> list[str]:
    """The packages of ``packages`` that ``modules`` holds (the package or a module inside it)."""
    return [p for p in packages if any(m == p or m.startswith(p + ".") for m in modules)]


def command_modules(modules: set[str]) -> set[str]:
    """The modules of userfaultfd.cli that define a command, among ``modules``."""
    defining = {f"userfaultfd.cli.{c.define.partition(':')[0]}" for c in COMMANDS.values()}
    return modules & defining


@pytest.mark.timeout(60)
def test_help_imports_no_command_and_nothing_heavy() -> None:
    imported = imported_by("--help")
    assert within(imported, "numpy", "rich", "fsspec", "userfaultfd.model") == [], "imported"
    assert within(imported, *HEAVY) == [], "imported"
    # _main is the parser's own module (it holds `features`); no other command's is imported.
    assert command_modules(imported) == {"userfaultfd.cli._main"}


@pytest.mark.timeout(60)
def test_lazy_pages_help_imports_no_numpy_and_no_other_command() -> None:
    imported = imported_by("lazy-pages", "--help")
    assert within(imported, "numpy") == [], "imported"
    assert within(imported, "rich", "userfaultfd.model", "userfaultfd.check") == [], "imported"
    assert command_modules(imported) == {"userfaultfd.cli._main", "userfaultfd.cli._criu"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_imports_its_own_module_and_no_other_commands(name: str) -> None:
    """``uffd NAME --help``: the module that defines NAME is imported, and no other command's
    (``_main``, the parser's own module, holds ``features``)."""
    own = f"userfaultfd.cli.{COMMANDS[name].define.partition(':')[0]}"
    assert command_modules(imported_by(name, "--help")) == {"userfaultfd.cli._main", own}


@pytest.mark.timeout(60)
def test_features_imports_nothing_heavy() -> None:
    """``uffd features`` runs (exit 0) on the binding alone."""
    assert within(imported_by("features"), *HEAVY) == [], "imported"
