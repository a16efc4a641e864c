"""Page-access maps: what a recording (``record=``) says about each page of a source, and its
picture.

What a recording holds (``runtime._inflight.RECORD``: little-endian u64 pairs, in the order the
handler wrote them): for each fault of the program, (the faulting page's store offset, 0); then,
if the fault asked for a fill, (the window's offset, its length): the faulting page and the
policy's read-ahead around it. Recordings made before fault marks existed hold windows only.
From that alone, each page of the source is:

- ``FAULT``: filled by the window its own fault asked for;
- ``READ_AHEAD``: filled in another page's window (or, touched, by a read still in flight when
  its fault came: the read-ahead past a window on the remote path);
- ``PREFETCH``: in the working set the run prefetched (``prefetch=``, given here) and in no
  fault's window;
- ``ZERO``: filled, and zeros the store knows of without a read (asked of the source, given here:
  the handler asked it the same);
- ``FILLED``: filled in a window of a recording without fault marks (fault or read-ahead: it
  does not say);
- ``UNTOUCHED``: in no window: the program never faulted on it (a fill at the end of the run,
  ``stop(drain=True)`` or ``fill_in_background()``, is not recorded).

*Touched* is what faults say, and nothing else: a page with a fault mark. A page filled ahead of
its use faults no more, so a read of it leaves no trace: the read-ahead pages without a fault of
their own (:attr:`PageTrace.wasted_bytes`) are an upper bound on what read-ahead wasted, exact
for a program that touches each page once in an order read-ahead cannot follow, zero only where
the program's faults themselves caught up with read-ahead in flight.

matplotlib draws the picture (the ``bench`` extra); it is imported by :func:`draw_trace` only.
"""

from __future__ import annotations

import enum
import os
import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, final

if TYPE_CHECKING:
    from ..stores import Store

__all__ = ["PageFill", "PageTrace", "draw_trace", "parse_trace", "read_trace"]

#: One record: (store offset, length), as ``runtime._inflight.RECORD`` (not imported: reading a
#: recording needs no runtime).
_RECORD = struct.Struct("<QQ")


class PageFill(enum.IntEnum):
    """How a page of the source was filled, as its recording tells (see the module's note)."""

    #: In no fault's window.
    UNTOUCHED = 0
    #: Filled by the window its own fault asked for.
    FAULT = 1
    #: Filled in another page's window, or by a read in flight when its fault came.
    READ_AHEAD = 2
    #: In the prefetched working set, in no fault's window.
    PREFETCH = 3
    #: Filled, and zeros the store knows of (mapped without a read).
    ZERO = 4
    #: Filled in a window of a recording without fault marks (fault or read-ahead).
    FILLED = 5


@final
@dataclass(frozen=True, slots=True)
class PageTrace:
    """Each page of a source as a recording tells: made by :func:`parse_trace`."""

    #: Bytes a page.
    page_size: int
    #: The store offset of the first page (a mapping may start off a page: a .npy's header).
    base: int
    #: A :class:`PageFill` value a page, in offset order.
    kinds: bytes
    #: For each page, the number of the fill (0, 1, ...: the recording's windows in order) that
    #: filled it first; -1 for a page no window filled.
    order: tuple[int, ...]
    #: 1 for each page a fault was on (touched), else 0.
    touched: bytes
    #: Fault marks in the recording (a page faulted on twice counts twice).
    faults: int
    #: Windows in the recording (fills a fault asked for).
    fills: int
    #: Whether the recording holds fault marks (one made before they existed does not).
    marked: bool

    @property
    def pages(self) -> int:
        """Pages of the source."""
        return len(self.kinds)

    def count(self, kind: PageFill) -> int:
        """Pages of ``kind``."""
        return self.kinds.count(kind)

    @property
    def touched_pages(self) -> int:
        """Distinct pages a fault was on."""
        return self.touched.count(1)

    @property
    def read_ahead_touched(self) -> int:
        """``READ_AHEAD`` pages a fault was on later (caught up with a read, or raced its fill)."""
        return sum(1 for k, t in zip(self.kinds, self.touched, strict=True)
                   if k == PageFill.READ_AHEAD and t)  # fmt: skip

    @property
    def wasted_bytes(self) -> int:
        """Bytes of ``READ_AHEAD`` pages no fault was on: filled, never touched as far as faults
        tell (an upper bound on read-ahead's waste; see the module's note)."""
        return (self.count(PageFill.READ_AHEAD) - self.read_ahead_touched) * self.page_size

    def summary(self) -> list[tuple[str, str]]:
        """The counts as (measure, value) lines, as ``uffd trace`` prints them."""
        mib = 1 << 20
        lines = [
            ("pages", f"{self.pages:,} of {self.page_size:,} bytes"),
            ("faults", f"{self.faults:,} ({self.touched_pages:,} pages touched)"),
            ("fills", f"{self.fills:,}"),
        ]
        for kind in PageFill:
            lines.append((_LABELS[kind], f"{self.count(kind):,} pages"))
        lines.append(("read-ahead touched later", f"{self.read_ahead_touched:,} pages"))
        lines.append(("read-ahead never touched", f"{self.wasted_bytes:,} bytes"
                      f" ({self.wasted_bytes / mib:,.2f} MiB, an upper bound)"))  # fmt: skip
        return lines


_LABELS = {
    PageFill.UNTOUCHED: "never touched",
    PageFill.FAULT: "fault",
    PageFill.READ_AHEAD: "read-ahead",
    PageFill.PREFETCH: "prefetch",
    PageFill.ZERO: "known zero",
    PageFill.FILLED: "fault or read-ahead",
}


def _pairs(data: bytes) -> list[tuple[int, int]]:
    if len(data) % _RECORD.size:
        raise ValueError(f"{len(data)} bytes is not a whole number of {_RECORD.size}-byte records"
                         " (offset, length): not a recording record= wrote")  # fmt: skip
    words = array("Q", data)
    if sys.byteorder != "little":
        words.byteswap()
    return list(zip(words[0::2], words[1::2], strict=True))


def parse_trace(
    data: bytes,
    *,
    page_size: int,
    size: int | None = None,
    prefetch: bytes = b"",
    known_zero: Callable[[int, int], bool] | None = None,
) -> PageTrace:
    """Each page of a source, from the bytes of a recording (``record=``): see the module's note.

    ``size``: the source's length (default: the end of the recording's last fill); ``prefetch``:
    the bytes of the working set the run prefetched; ``known_zero(offset, length)``: the store's
    answer, asked for each filled page (default: no page is known zero). Raises ValueError for
    bytes no recording holds (not whole records, an offset off a page, a fill past ``size``)."""
    if page_size <= 0 or page_size & (page_size - 1):
        raise ValueError(f"page_size {page_size}: a power of two is a page size")
    records = _pairs(data)
    ahead = _pairs(prefetch)
    # Pages lie where the mapping put them: a region may start off a page of the store (a .npy
    # after its header), and every offset the handler writes is on that region's pages.
    base = records[0][0] % page_size if records else 0
    if size is None:
        size = max((o + n for o, n in records + ahead), default=0)
    pages = max(0, -(-(size - base) // page_size))
    kinds = bytearray(pages)
    touched = bytearray(pages)
    order = [-1] * pages
    faults = fills = 0
    marked = False
    mark = -1  # the page of the last fault mark, until a window takes it
    for number, (offset, length) in enumerate(records):
        if offset % page_size != base:
            raise ValueError(f"record {number}: offset {offset} is not on a {page_size}-byte"
                             f" page of the recording (at {base} past a page)")  # fmt: skip
        first, last = (offset - base) // page_size, -(-(offset - base + length) // page_size)
        if last > pages or (length == 0 and first >= pages):
            raise ValueError(f"record {number} (offset {offset}, length {length}) reaches past"
                             f" the source's {size} bytes")  # fmt: skip
        if length == 0:  # a fault on page `first`
            faults += 1
            marked = True
            touched[first] = 1
            if kinds[first] == PageFill.UNTOUCHED:  # filled by no window (yet): a read in flight
                kinds[first] = PageFill.READ_AHEAD
            mark = first
            continue
        for page in range(first, last):
            if order[page] < 0:
                order[page] = fills
                kinds[page] = PageFill.READ_AHEAD if marked else PageFill.FILLED
        if first <= mark < last and order[mark] == fills:
            kinds[mark] = PageFill.FAULT
        mark = -1
        fills += 1
    for offset, length in ahead:
        first = max(0, offset - base) // page_size
        for page in range(first, min(-(-(offset - base + length) // page_size), pages)):
            if order[page] < 0 and kinds[page] in (PageFill.UNTOUCHED, PageFill.READ_AHEAD):
                kinds[page] = PageFill.PREFETCH
    if known_zero is not None:
        for page in range(pages):
            at = base + page * page_size
            if kinds[page] != PageFill.UNTOUCHED and known_zero(at, min(page_size, size - at)):
                kinds[page] = PageFill.ZERO
    return PageTrace(page_size=page_size, base=base, kinds=bytes(kinds), order=tuple(order),
                     touched=bytes(touched), faults=faults, fills=fills, marked=marked)  # fmt: skip


def read_trace(
    record: str | os.PathLike[str],
    *,
    source: Store | str | None = None,
    prefetch: str | os.PathLike[str] | None = None,
    page_size: int | None = None,
) -> PageTrace:
    """:func:`parse_trace` of the recording at ``record``. ``source`` (a store, or a path or URL
    :func:`~userfaultfd.stores.open_store` opens): its size, and which pages it knows are zero;
    ``prefetch``: the working set the run prefetched; ``page_size``: the pages the recording
    was made with (default: this machine's page size)."""
    from .. import memory

    with open(record, "rb") as f:
        data = f.read()
    ahead = b""
    if prefetch is not None:
        with open(prefetch, "rb") as f:
            ahead = f.read()
    page = page_size if page_size is not None else memory.page_size()
    if source is None:
        return parse_trace(data, page_size=page, prefetch=ahead)
    from ..stores import open_store

    store = open_store(source) if isinstance(source, str) else source
    try:
        return parse_trace(data, page_size=page, size=store.size, prefetch=ahead,
                           known_zero=store.known_zero)  # fmt: skip
    finally:
        if isinstance(source, str):
            store.close()


#: Colours of the kinds (colour-blind-safe: Okabe and Ito's palette), and of pages never filled.
_COLOURS = {
    PageFill.UNTOUCHED: "#f2f2f2",
    PageFill.FAULT: "#d55e00",
    PageFill.READ_AHEAD: "#e69f00",
    PageFill.PREFETCH: "#0072b2",
    PageFill.ZERO: "#999999",
    PageFill.FILLED: "#cc79a7",
}


def _row_pages(pages: int) -> int:
    """Pages a row: a power of two, at least 64, and at most 128 rows."""
    row = 64
    while -(-pages // row) > 128:
        row *= 2
    return row


def draw_trace(trace: PageTrace, *paths: str | os.PathLike[str], title: str = "") -> None:
    """Draw ``trace`` into each of ``paths`` (the format from the suffix: .svg, .png, .pdf): one
    row a chunk of the source, the fill kind of each page on the left, the order of fills on the
    right (pages never filled in grey), the counts below. Needs matplotlib (the ``bench`` extra);
    text stays text in an SVG (searchable, the counts readable by a program)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    row = _row_pages(trace.pages)
    rows = max(1, -(-trace.pages // row))
    cells = rows * row
    kinds = [float(k) for k in trace.kinds] + [float("nan")] * (cells - trace.pages)
    order = [float(o) if o >= 0 else float("nan") for o in trace.order]
    order += [float("nan")] * (cells - trace.pages)
    grid_kinds = [kinds[r * row : (r + 1) * row] for r in range(rows)]
    grid_order = [order[r * row : (r + 1) * row] for r in range(rows)]
    kind_map = ListedColormap([_COLOURS[k] for k in PageFill])
    order_map: Any = matplotlib.colormaps["viridis"].copy()
    order_map.set_bad("#e0e0e0")
    with plt.rc_context({"svg.fonttype": "none", "font.size": 8}):
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3 + rows * 0.04),
                                             sharey=True, layout="constrained")  # fmt: skip
        extent = (0, row, rows, 0)
        left.imshow(grid_kinds, cmap=kind_map, vmin=-0.5, vmax=len(PageFill) - 0.5,
                    interpolation="nearest", aspect="auto", extent=extent)  # fmt: skip
        picture = right.imshow(grid_order, cmap=order_map, interpolation="nearest",
                               aspect="auto", extent=extent)  # fmt: skip
        row_bytes = row * trace.page_size
        past = f" past {trace.base:,} B" if trace.base else ""
        left.set_ylabel(f"offset{past} (rows of {row} pages, {_size(row_bytes)})")
        ticks = sorted({0, rows // 4, rows // 2, 3 * rows // 4, rows})
        left.set_yticks(ticks, [_size(t * row_bytes) for t in ticks])
        for axes, name in ((left, "fill kind"), (right, "fill order (the recording's fills)")):
            axes.set_xlabel("page in row")
            axes.set_title(name)
        figure.colorbar(picture, ax=right, label="fill number")
        shown = [k for k in PageFill if trace.count(k) or k is not PageFill.FILLED]
        figure.legend(handles=[Patch(facecolor=_COLOURS[k], edgecolor="#555555",
                                     label=f"{_LABELS[k]}: {trace.count(k):,}") for k in shown],
                      loc="outside lower center", ncol=len(shown), frameon=False)  # fmt: skip
        counts = "; ".join(f"{name} {value}" for name, value in trace.summary()[:2])
        counts += (f"; read-ahead never touched: {_size(trace.wasted_bytes)} (an upper bound:"
                   " a filled page faults no more)")  # fmt: skip
        figure.suptitle(f"{title}\n{counts}" if title else counts)
        for path in paths:
            figure.savefig(os.fspath(path), metadata={"Date": None} if str(path).endswith(
                ".svg") else None)  # fmt: skip
        plt.close(figure)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
