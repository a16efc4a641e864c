"""The public surface, pinned: a change here is a change of the API."""

from __future__ import annotations

import userfaultfd
from userfaultfd import memory


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
    for name in userfaultfd.__all__:
        assert getattr(userfaultfd, name) is not None


def test_memory_surface() -> None:
    assert sorted(memory.__all__) == sorted(
        [
            "Mapping",
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
    import userfaultfd.runtime
    import userfaultfd.tools

    assert sorted(userfaultfd.runtime.__all__) == [
        "Adaptive", "DEFAULT_CPU", "GuestRegion", "Handler", "Policy", "Region", "Server",
        "Single", "Stats", "Window", "lazy", "parse_regions", "serve", "serve_socket",
        "server_of",
    ]  # fmt: skip
    assert sorted(userfaultfd.tools.__all__) == [
        "DeltaInfo", "DirtyStats", "DirtyTracker", "Snapshot", "SnapshotStats", "restore",
        "snapshot", "snapshot_delta", "snapshot_full", "track",
    ]  # fmt: skip
    assert sorted(userfaultfd.check.__all__) == [
        "CHECKS", "CheckOptions", "CheckResult", "Status", "run_checks",
    ]  # fmt: skip
    for module in (userfaultfd.runtime, userfaultfd.tools, userfaultfd.check):
        for name in module.__all__:
            assert getattr(module, name) is not None
