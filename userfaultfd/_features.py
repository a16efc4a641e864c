"""What this kernel offers, as records a report or a test can read."""

from __future__ import annotations

from dataclasses import dataclass

from ._core import supported_features
from ._flags import FEATURE_SINCE, Feature

__all__ = ["FeatureStatus", "feature_table"]


@dataclass(frozen=True, slots=True)
class FeatureStatus:
    """One feature: its flag, whether the running kernel offers it, and since which release."""

    feature: Feature
    supported: bool
    since: str


def feature_table(supported: Feature | None = None) -> list[FeatureStatus]:
    """Every feature this library knows, in bit order, against ``supported`` (default: probed)."""
    offered = supported_features() if supported is None else supported
    return [
        FeatureStatus(feature, bool(offered & feature), FEATURE_SINCE[feature])
        for feature in sorted(FEATURE_SINCE, key=int)
    ]
