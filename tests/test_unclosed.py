"""An open Userfaultfd that is garbage-collected closes with a ResourceWarning, as io.FileIO
does; a closed one is collected silently."""

from __future__ import annotations

import gc
import os
import warnings

import pytest

from userfaultfd import Userfaultfd


def collected() -> tuple[list[warnings.WarningMessage], int]:
    """The warnings raised while an open uffd is dropped and collected, and its descriptor."""
    gc.collect()  # garbage of earlier tests (an exception that kept a uffd alive) goes first
    uffd = Userfaultfd()
    fd = uffd.fileno()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del uffd
        gc.collect()
    return caught, fd


def test_an_open_uffd_collected_warns_and_closes() -> None:
    caught, fd = collected()
    assert [w.category for w in caught] == [ResourceWarning], (
        f"expected one ResourceWarning, got {[str(w.message) for w in caught]}"
    )
    assert str(caught[0].message).startswith(f"unclosed <Userfaultfd fd={fd} "), caught[0].message
    with pytest.raises(OSError):  # closed, not leaked
        os.fstat(fd)


def test_a_closed_uffd_collected_is_silent() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Userfaultfd():
            pass
        Userfaultfd().close()
        gc.collect()
    assert caught == [], f"warned for closed uffds: {[str(w.message) for w in caught]}"
