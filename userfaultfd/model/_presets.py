"""Kernel policies: the switches the seed patch and its successors turned, and named presets.

A preset is a set of switches, not a kernel version: a test can flip one switch with
``dataclasses.replace`` and watch a verdict flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

from .._flags import Mode as _Mode

__all__ = ["PRESETS", "Preset", "UnknownNameError", "get_preset"]


@final
class UnknownNameError(LookupError):
    """A preset or scenario name the model does not know."""


@final
@dataclass(frozen=True, slots=True)
class Preset:
    """Kernel policy switches that decide the seed's scenarios."""

    name: str
    #: Registration modes for which should_fault_around() says no (uffd_disable_fault_around()).
    no_fault_around: _Mode
    #: Zapping a uffd-wp protected PTE leaves PTE_MARKER_UFFD_WP instead of pte_none().
    pte_markers: bool
    summary: str = ""


#: Every preset, oldest policy first.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "pre-patch",
            _Mode(0),
            pte_markers=False,
            summary="fault-around wherever the VMA has map_pages; no PTE markers (5.10)",
        ),
        Preset(
            "as-posted",
            _Mode.MISSING | _Mode.WP,
            pte_markers=False,
            summary="the patch as posted (Nov 2020): no fault-around if registered MISSING or WP",
        ),
        Preset(
            "markers-only",
            _Mode(0),
            pte_markers=True,
            summary="PTE markers keep uffd-wp across zaps; fault-around unchanged",
        ),
        Preset(
            "upstream",
            _Mode.WP | _Mode.MINOR,
            pte_markers=True,
            summary="5.19: uffd_disable_fault_around() for WP or MINOR, plus PTE markers",
        ),
    )
}


def get_preset(preset: Preset | str) -> Preset:
    """The preset of that name (a Preset passes through)."""
    if isinstance(preset, Preset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise UnknownNameError(
            f"unknown kernel preset {preset!r} (choose from {', '.join(PRESETS)})"
        ) from None
