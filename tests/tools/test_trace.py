"""Page-access maps: parse_trace on recordings written by hand (no kernel), and on a real
lazy() run with record= in a forked child, drawn by ``uffd trace`` and ``uffd lazy --trace``.

Lazily filled memory is read only in forked targets with a deadline (in_target)."""

from __future__ import annotations

import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._target import PAGE, Channel, Target
from userfaultfd.tools import PageFill, parse_trace, read_trace

np = pytest.importorskip("numpy")
pytest.importorskip("matplotlib")

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
PAGES = 64
PER_PAGE = PAGE // 8  # int64 elements a page
#: The pages the program touches, with Window(4) (aligned windows of 4 pages): 1 faults and
#: fills 0-3, 2 is then there already (no fault), 9 fills 8-11, 18 fills 16-19, 40 fills 40-43,
#: 42 is there already, 63 fills 60-63.
TOUCHED = [1, 2, 9, 18, 40, 42, 63]
FAULTED = [1, 9, 18, 40, 63]


def _records(*pairs: tuple[int, int]) -> bytes:
    return b"".join(struct.pack("<QQ", o, n) for o, n in pairs)


def test_a_fault_mark_names_its_page_in_the_window_after_it() -> None:
    data = _records((5 * PAGE, 0), (4 * PAGE, 4 * PAGE), (6 * PAGE, 0), (12 * PAGE, 0))
    trace = parse_trace(data, page_size=PAGE, size=16 * PAGE)
    kinds = [PageFill(k) for k in trace.kinds]
    assert kinds[4:8] == [PageFill.READ_AHEAD, PageFill.FAULT, PageFill.READ_AHEAD,
                          PageFill.READ_AHEAD], kinds  # fmt: skip
    # Page 6 faulted after its window filled it (a raced fill): read-ahead, touched later.
    # Page 12 faulted with no window: a read in flight (read-ahead past the window) filled it.
    assert kinds[12] == PageFill.READ_AHEAD and trace.order[12] == -1, (kinds[12], trace.order)
    assert (trace.faults, trace.fills, trace.touched_pages) == (3, 1, 3)
    assert trace.read_ahead_touched == 2, "pages 6 and 12 were faulted on"
    assert trace.wasted_bytes == 2 * PAGE, "pages 4 and 7: filled, no fault of their own"
    assert trace.count(PageFill.UNTOUCHED) == 16 - 5


def test_prefetch_known_zero_and_a_recording_without_marks() -> None:
    old = parse_trace(_records((0, 2 * PAGE)), page_size=PAGE, size=4 * PAGE)
    assert not old.marked and [PageFill(k) for k in old.kinds] == [
        PageFill.FILLED, PageFill.FILLED, PageFill.UNTOUCHED, PageFill.UNTOUCHED,
    ], "windows without marks: fault or read-ahead, not told apart"  # fmt: skip
    new = parse_trace(_records((0, 0), (0, 2 * PAGE)), page_size=PAGE, size=4 * PAGE,
                      prefetch=_records((PAGE, 3 * PAGE)),
                      known_zero=lambda offset, length: offset == PAGE)  # fmt: skip
    assert [PageFill(k) for k in new.kinds] == [
        PageFill.FAULT, PageFill.ZERO, PageFill.PREFETCH, PageFill.PREFETCH,
    ], "page 1: a known zero in the window; pages 2-3 prefetched and in no window"  # fmt: skip
    assert new.wasted_bytes == 0, "a known zero read nothing"


def test_bytes_no_recording_holds_are_refused() -> None:
    with pytest.raises(ValueError, match="not a whole number of 16-byte records"):
        parse_trace(b"\0" * 24, page_size=PAGE)
    with pytest.raises(ValueError, match="not on a 4096-byte page of the recording"):
        parse_trace(_records((0, PAGE), (100, PAGE)), page_size=PAGE)
    with pytest.raises(ValueError, match="reaches past the source's"):
        parse_trace(_records((0, 8 * PAGE)), page_size=PAGE, size=4 * PAGE)


def in_target(body: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Run ``body`` in a forked process (which owns the served memory); return what it returns."""

    def run(channel: Channel) -> None:
        channel.send(("result", body()))

    with Target(run, timeout=timeout) as target:
        (_tag, value), _ = target.recv(timeout=timeout)
        assert target.exit_code() == 0
        return value


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A .npy of PAGES pages of int64, element i holding i + 1 (no zero; its header puts every
    page of the mapping 128 bytes past a page of the file)."""
    path = tmp_path / "values.npy"
    np.save(path, np.arange(1, PAGES * PER_PAGE + 1, dtype=np.int64))
    return path


def test_uffd_trace_of_a_lazy_run_counts_what_was_touched(source: Path, tmp_path: Path) -> None:
    from userfaultfd.runtime import Window, lazy, server_of

    record = tmp_path / "recording"

    def body() -> str:
        array = lazy(str(source), policy=Window(4), record=str(record))
        wrong = [p for p in TOUCHED if int(array[p * PER_PAGE + 5]) != p * PER_PAGE + 6]
        server_of(array).stop()  # the recording moves over `record` when the server ends
        return f"pages {wrong} read wrong values" if wrong else ""

    assert in_target(body) == ""
    svg, png = tmp_path / "map.svg", tmp_path / "map.png"
    done = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "trace", str(record), "--svg", str(svg),
         "--png", str(png), "--source", str(source)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = dict(line.strip().split(":", 1) for line in done.stdout.splitlines()[1:])
    counts = {name: value.split()[0] for name, value in lines.items()}
    windows = {w for p in FAULTED for w in range(p // 4 * 4, p // 4 * 4 + 4)}
    assert counts["faults"] == str(len(FAULTED)), done.stdout
    assert counts["fault"] == str(len(FAULTED)), done.stdout
    assert counts["read-ahead"] == str(len(windows) - len(FAULTED)), done.stdout
    assert counts["never touched"] == str(PAGES - len(windows)), done.stdout
    assert counts["read-ahead never touched"] == f"{(len(windows) - len(FAULTED)) * PAGE:,}"
    root = ET.parse(svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
    text = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
    assert f"fault: {len(FAULTED)}" in text, f"the legend's counts are not in the SVG: {text!r}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "the PNG is no PNG"
    trace = read_trace(record, source=str(source))
    faulted = [p for p in range(PAGES) if trace.kinds[p] == PageFill.FAULT]
    assert faulted == FAULTED, f"pages drawn as faults {faulted}, the program faulted {FAULTED}"
    assert trace.base == 128, f"the mapping starts {trace.base} bytes past a page, not 128"


@pytest.mark.timeout(180)
def test_uffd_lazy_trace_draws_the_run(source: Path, tmp_path: Path) -> None:
    svg = tmp_path / "run.svg"
    done = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "lazy", str(source), "--policy", "window:8",
         "--trace", str(svg)],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "  faults:                     8 (8 pages touched)" in done.stdout, done.stdout
    assert f"  read-ahead:                 {PAGES - 8} pages" in done.stdout, done.stdout
    assert ET.parse(svg).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    bad = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "lazy", str(source), "--trace", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "--trace" in bad.stderr, (bad.returncode, bad.stderr)
