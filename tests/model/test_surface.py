"""The public surface of userfaultfd.model, and its distance from the live kernel binding."""

from __future__ import annotations

import ast
import pathlib

import userfaultfd.model as model

MODEL_DIR = pathlib.Path(model.__file__).parent


def test_all_is_exactly_what_init_exports() -> None:
    public = {n for n in vars(model) if not n.startswith("_")} - {
        "engine",
        "explorer",
        "kernel",
        "ops",
        "presets",
        "scenarios",
        "state",
        "report",
        "diagram",
    }
    assert set(model.__all__) == public
    for name in ("PRESETS", "SCENARIOS", "explore", "replay", "Kernel", "WouldBlock", "Result"):
        assert name in model.__all__


def test_the_model_never_imports_the_live_core() -> None:
    forbidden = {"ctypes", "mmap", "os", "userfaultfd._core", "userfaultfd.memory", "fcntl"}
    for path in sorted(MODEL_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 2:  # from .. import X / from ..X import Y
                    mod = f"userfaultfd.{mod}" if mod else "userfaultfd"
                names = {mod} | {f"{mod}.{a.name}" for a in node.names}
            else:
                continue
            bad = {n for n in names if n in forbidden or n.startswith("userfaultfd._core")}
            assert not bad, f"{path.name} imports {bad}"
            up = {n for n in names if n.startswith("userfaultfd.") and n != "userfaultfd."}
            assert up <= {"userfaultfd._flags", "userfaultfd._flags.Mode"}, (path.name, up)
