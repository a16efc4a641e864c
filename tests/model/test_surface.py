"""The public surface of userfaultfd.model, and its distance from the live kernel binding."""

from __future__ import annotations

import ast
import pathlib

import userfaultfd.model as model

MODEL_DIR = pathlib.Path(model.__file__).parent


#: The model's face: the explorer's three calls and their records, the presets and scenarios,
#: and the direct-use Kernel with the ops its threads run, its PTE values and its errors.
SURFACE = {
    "PAGE_SIZE",
    "PRESETS",
    "PTRS_PER_PTE",
    "REDUCTIONS",
    "SCENARIOS",
    "CopyPages",
    "File",
    "Kernel",
    "Marker",
    "Present",
    "Preset",
    "Protect",
    "Punch",
    "Read",
    "Replay",
    "Result",
    "Scenario",
    "ScheduleError",
    "Serve",
    "SigBusError",
    "Sizes",
    "UnknownNameError",
    "Violation",
    "Vma",
    "WouldBlock",
    "Write",
    "WriteBack",
    "WriteProtect",
    "explore",
    "replay",
    "table",
}


def test_the_surface_is_pinned() -> None:
    listed = set(model.__all__)
    assert listed == SURFACE, f"added: {sorted(listed - SURFACE)}, gone: {sorted(SURFACE - listed)}"
    public = {n for n in vars(model) if not n.startswith("_")}
    assert public == SURFACE, f"public outside __all__: {sorted(public - SURFACE)}"
    for gone in ("Frame", "Label", "TableRow", "TraceStep", "get_preset", "get_scenario", "build"):
        assert not hasattr(model, gone), f"model.{gone} is exported again"


def test_every_submodule_is_private() -> None:
    public = sorted(p.name for p in MODEL_DIR.glob("*.py") if not p.name.startswith("_"))
    assert public == [], f"public model submodules: {public} (underscore them)"


def test_public_classes_are_final() -> None:
    classes = [getattr(model, n) for n in sorted(SURFACE) if isinstance(getattr(model, n), type)]
    assert len(classes) == 23, [c.__name__ for c in classes]
    open_ = [c.__name__ for c in classes if not getattr(c, "__final__", False)]
    assert open_ == [], f"not @typing.final: {open_}"


def test_no_type_only_imports_in_the_model() -> None:
    """A TYPE_CHECKING import in the model is an import circle in hiding (the rules once took
    the Kernel that imports them)."""
    for path in sorted(MODEL_DIR.glob("*.py")):
        assert "TYPE_CHECKING" not in path.read_text(), f"{path.name} imports for types only"


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
