"""The public surface, pinned: a change here is a change of the API.

Like trio's test_exports: every public module (no underscore anywhere in its dotted name) is found
by walking the package, and nothing public-looking may exist in it outside its ``__all__``: a name
without a leading underscore that is not a module and was not imported from another package.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import userfaultfd
from userfaultfd import memory


def _public_modules() -> list[str]:
    found = ["userfaultfd"]
    for info in pkgutil.walk_packages(userfaultfd.__path__, "userfaultfd."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            found.append(info.name)
    return sorted(found)


def _stray_names(module: ModuleType) -> list[str]:
    """Public-looking names of ``module`` missing from its ``__all__``."""
    listed = set(getattr(module, "__all__", ()))
    stray = []
    for name, value in vars(module).items():
        if name.startswith("_") or name in listed or inspect.ismodule(value):
            continue
        owner = getattr(value, "__module__", None)
        if isinstance(owner, str) and owner.partition(".")[0] != "userfaultfd":
            continue  # imported from another package (typing, dataclasses, ...)
        stray.append(name)
    return sorted(stray)


@pytest.mark.parametrize("name", _public_modules())
def test_nothing_public_outside_all(name: str) -> None:
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert missing == [], f"{name}.__all__ names what {name} does not define: {missing}"
    assert _stray_names(module) == [], (
        f"{name} exposes names outside its __all__: underscore them, or list them in __all__"
    )


def test_the_walk_finds_the_public_modules() -> None:
    found = _public_modules()
    for name in ("userfaultfd.memory", "userfaultfd.tools", "userfaultfd.runtime"):
        assert name in found, f"{name} missing from the walk: {found}"
    assert "userfaultfd.tools._dirty" not in found, found


def test_package_surface() -> None:
    assert sorted(userfaultfd.__all__) == sorted(
        [
            "FEATURE_SINCE",
            "Event",
            "FaultFlag",
            "Feature",
            "FeatureUnavailableError",
            "Fork",
            "Ioctl",
            "MappingChangedError",
            "Mode",
            "PageCategory",
            "PageExistsError",
            "PageFault",
            "ProcessGoneError",
            "Remap",
            "Remove",
            "ScanFlag",
            "Unmap",
            "Userfaultfd",
            "UserfaultfdError",
            "UserfaultfdPermissionError",
            "parse_events",
            "supported_features",
        ]
    )


def test_memory_surface() -> None:
    assert sorted(memory.__all__) == sorted(
        [
            "Mapping",
            "MappingKind",
            "PageRegion",
            "ScanResult",
            "anonymous",
            "free_huge_pages",
            "huge_page_size",
            "huge_pages",
            "hugetlb",
            "memfd",
            "page_size",
            "pagemap_scan",
            "resident",
            "write_protected",
        ]
    )


def test_every_error_is_an_oserror() -> None:
    for cls in (
        userfaultfd.PageExistsError,
        userfaultfd.MappingChangedError,
        userfaultfd.ProcessGoneError,
        userfaultfd.FeatureUnavailableError,
        userfaultfd.UserfaultfdPermissionError,
    ):
        assert issubclass(cls, userfaultfd.UserfaultfdError)
        assert issubclass(cls, OSError)
    assert issubclass(userfaultfd.UserfaultfdPermissionError, PermissionError)


def test_subpackage_surfaces() -> None:
    import userfaultfd.check
    import userfaultfd.cli
    import userfaultfd.runtime
    import userfaultfd.tools

    assert sorted(userfaultfd.runtime.__all__) == [
        "Adaptive", "DEFAULT_CPU", "PageUnreadableError", "Policy", "Region", "Server", "Single",
        "Stats", "TouchResult", "Window", "lazy", "serve", "serve_adopted", "server_of",
        "touch_pages",
    ]  # fmt: skip
    assert sorted(userfaultfd.tools.__all__) == [
        "DeltaInfo", "DirtyStats", "DirtyTracker", "Snapshot", "SnapshotDemoResult",
        "SnapshotStats", "check_destination", "restore", "snapshot", "snapshot_delta",
        "snapshot_demo", "snapshot_full", "track",
    ]  # fmt: skip
    assert sorted(userfaultfd.check.__all__) == [
        "CHECKS", "CheckOptions", "CheckResult", "Status", "run_checks",
    ]  # fmt: skip
    assert sorted(userfaultfd.cli.__all__) == ["build_parser", "main", "run_command"]
    assert callable(userfaultfd.tools.snapshot), "userfaultfd.tools.snapshot is the function"
