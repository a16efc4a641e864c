"""Dirty-page tracking: WP_ASYNC + PAGEMAP_SCAN against soft-dirty and a plain pagemap read.

    python3 benchmarks/dirty.py [--size 1G] [--pages 1000,10000,100000] [--repeat 3]

On one populated anonymous region, each round writes one byte to each of N random pages (NumPy,
native code) and then asks which pages were written, resetting the tracking:
  wp_async    userfaultfd.tools.track: tracker.dirty(reset=True), one PAGEMAP_SCAN that reports
              and re-protects the written pages in the same walk
  soft-dirty  the classic method: "4" to /proc/self/clear_refs to reset (it resets the whole
              process, not just the region), then /proc/self/pagemap for the region, bit 55
  pm+wp       the same uffd-wp async protection, read through /proc/self/pagemap (bit 57 clear:
              written) and reset with one UFFDIO_WRITEPROTECT of the whole region; racy (a write
              between the read and the reset is lost), shown for what PAGEMAP_SCAN saves
Scan columns: milliseconds per scan, including its reset, and the pages it reported (asserted to
equal N where the method works). Writer columns: milliseconds to write the N pages with tracking
off (pages already present and writable) and on (the first write to each protected page is a
kernel fault). Best of --repeat for each number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from userfaultfd import Feature, Mode, Userfaultfd, memory
from userfaultfd.tools import track

PAGE = memory.page_size()
SOFT_DIRTY = np.uint64(1 << 55)
UFFD_WP = np.uint64(1 << 57)


def parse_size(text: str) -> int:
    """``"1G"``, ``"256M"``, ``"64K"`` or a number of bytes (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale > 1 else text) * scale


@dataclass(frozen=True, slots=True)
class Row:
    pages: int
    write_off: float
    write_wp_async: float
    write_soft_dirty: float
    scan_wp_async: float
    found_wp_async: int
    scan_soft_dirty: float
    found_soft_dirty: int
    scan_pm_wp: float
    found_pm_wp: int


def _timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return (time.perf_counter() - started) * 1e3, result


def _best(repeat: int, round_: Callable[[], tuple[float, float, int]]) -> tuple[float, float, int]:
    """Best writer and scan milliseconds over ``repeat`` rounds; the pages each round found."""
    results = [round_() for _ in range(repeat)]
    found = {r[2] for r in results}
    assert len(found) == 1, f"rounds disagree on the pages found: {found}"
    return min(r[0] for r in results), min(r[1] for r in results), found.pop()


class _Pagemap:
    """The region's /proc/self/pagemap entries as one uint64 array per read."""

    def __init__(self, region: memory.Mapping) -> None:
        self.fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self.offset = region.address // PAGE * 8
        self.size = region.length // PAGE * 8

    def entries(self) -> np.ndarray:
        data = os.pread(self.fd, self.size, self.offset)
        assert len(data) == self.size
        return np.frombuffer(data, dtype=np.uint64)

    def close(self) -> None:
        os.close(self.fd)


def _clear_refs() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")  # 4: clear the soft-dirty bits of every page of the process


def soft_dirty_works() -> bool:
    """Does this kernel keep soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)? One write, one look."""
    with memory.anonymous(PAGE) as probe:
        probe.view[0] = 1
        _clear_refs()
        probe.view[0] = 2
        pagemap = _Pagemap(probe)
        try:
            return bool(pagemap.entries()[0] & SOFT_DIRTY)
        finally:
            pagemap.close()


def measure(size: int, counts: list[int], repeat: int, soft_dirty: bool) -> list[Row]:
    region = memory.anonymous(size)
    pagemap = _Pagemap(region)
    try:
        arr = region.numpy()
        arr[::PAGE] = 1  # every page present: the methods compare on resident memory
        rng = np.random.default_rng(0)
        rows = []
        for count in counts:
            offsets = np.sort(rng.choice(size // PAGE, size=count, replace=False)) * PAGE
            rows.append(_row(region, arr, offsets, pagemap, repeat, soft_dirty))
        del arr  # the mapping cannot close while a NumPy view of it lives
        return rows
    finally:
        pagemap.close()
        region.close()


def _row(
    region: memory.Mapping,
    arr: np.ndarray,
    offsets: np.ndarray,
    pagemap: _Pagemap,
    repeat: int,
    soft_dirty: bool,
) -> Row:
    count = len(offsets)
    value = iter(range(2, 1 << 30))

    def write() -> None:
        arr[offsets] = next(value) & 0xFF

    write()
    write_off = min(_timed(write)[0] for _ in range(repeat))

    with track(region) as tracker:

        def wp_async_round() -> tuple[float, float, int]:
            tracker.dirty()
            writing, _ = _timed(write)
            scanning, pages = _timed(tracker.dirty)
            assert isinstance(pages, list)
            return writing, scanning, len(pages)

        wp_writer, wp_scan, wp_found = _best(repeat, wp_async_round)

    def soft_dirty_round() -> tuple[float, float, int]:
        _clear_refs()
        writing, _ = _timed(write)

        def scan() -> int:
            found = int(np.count_nonzero(pagemap.entries() & SOFT_DIRTY))
            _clear_refs()
            return found

        scanning, found = _timed(scan)
        assert isinstance(found, int)
        return writing, scanning, found

    sd_writer, sd_scan, sd_found = _best(repeat, soft_dirty_round)

    features = Feature.WP_ASYNC | Feature.WP_UNPOPULATED | Feature.PAGEFAULT_FLAG_WP
    with Userfaultfd(features, user_mode_only=True) as uffd:
        uffd.register(region.address, region.length, Mode.WP)

        def pm_wp_round() -> tuple[float, float, int]:
            uffd.writeprotect(region.address, region.length)
            writing, _ = _timed(write)

            def scan() -> int:
                found = int(np.count_nonzero((pagemap.entries() & UFFD_WP) == 0))
                uffd.writeprotect(region.address, region.length)
                return found

            scanning, found = _timed(scan)
            assert isinstance(found, int)
            return writing, scanning, found

        _, pm_scan, pm_found = _best(repeat, pm_wp_round)

    assert wp_found == count, f"PAGEMAP_SCAN found {wp_found} of {count} written pages"
    assert pm_found == count, f"pagemap bit 57 found {pm_found} of {count} written pages"
    if soft_dirty:
        assert sd_found == count, f"soft-dirty found {sd_found} of {count} written pages"
    return Row(count, write_off, wp_writer, sd_writer, wp_scan, wp_found, sd_scan, sd_found,
               pm_scan, pm_found)  # fmt: skip


def table(rows: list[Row], soft_dirty: bool) -> str:
    sd = "" if soft_dirty else "*"
    lines = [
        f"{'N pages':>8} | {'writer ms':>9} {'writer ms':>9} {'writer ms':>10} | "
        f"{'scan ms':>8} {'found':>7} | {'scan ms':>8} {'found':>7} | {'scan ms':>8} {'found':>7}",
        f"{'':>8} | {'off':>9} {'wp_async':>9} {'soft-dirty':>10} | "
        f"{'wp_async':>16} | {'soft-dirty' + sd:>16} | {'pm+wp (racy)':>16}",
    ]
    for r in rows:
        lines.append(
            f"{r.pages:>8,} | {r.write_off:>9.2f} {r.write_wp_async:>9.2f} "
            f"{r.write_soft_dirty:>10.2f} | {r.scan_wp_async:>8.2f} {r.found_wp_async:>7,} | "
            f"{r.scan_soft_dirty:>8.2f} {r.found_soft_dirty:>7,} | "
            f"{r.scan_pm_wp:>8.2f} {r.found_pm_wp:>7,}"
        )
    if not soft_dirty:
        lines.append(
            "* this kernel has no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY unset): the column times "
            "clear_refs + the pagemap read + the mask, which find nothing"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="region size, e.g. 256M or 1G")
    parser.add_argument("--pages", default="1000,10000,100000", help="pages written per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per number (best kept)")
    args = parser.parse_args()
    size = parse_size(args.size)
    if size % PAGE:
        parser.error(f"--size must be a multiple of the page size ({PAGE})")
    counts = [int(n) for n in args.pages.split(",")]
    skipped = [n for n in counts if n > size // PAGE]
    counts = [n for n in counts if n <= size // PAGE]
    uname = os.uname()
    print(f"# Linux {uname.release} {uname.machine}, {os.cpu_count()} CPUs; region "
          f"{size >> 20} MiB ({size // PAGE:,} pages), best of {args.repeat}")  # fmt: skip
    soft_dirty = soft_dirty_works()
    started = time.monotonic()
    rows = measure(size, counts, args.repeat, soft_dirty)
    print(table(rows, soft_dirty))
    if skipped:
        print(f"# skipped (more pages than the region has): {skipped}")
    print(f"# {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
