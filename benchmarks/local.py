"""lazy() of a local .npy against NumPy's own memory map of it, in one run.

    python3 benchmarks/local.py [--size 256M] [--repeat 5] [--dir /var/tmp]

The source is a .npy of int64 values 1..n (``--size`` bytes of data), read into the page cache
before every run (see _source.py: this VM evicts idle page cache). Each row is measured in a
forked child (a fresh program), ``--repeat`` times; the table prints the median (and the min
and max) and the ratio to the NumPy row it is compared with:
  sum: np.load(mmap_mode="r")    np.load(path, mmap_mode="r").sum(), open included
  sum: lazy ...                  lazy(path).sum(), lazy() included
  gather 1%: ...                 the same two, then a[idx].sum() for one element of 1% of the
                                 pages, in a random order (the same pages for every row)
  lazy() setup, first call       lazy(path) in a program that has not called it yet
  lazy() setup, later calls      the median of 10 more calls in that program (each array is
                                 dropped before the next call)
  first fault after lazy()       reading one element in the middle right after lazy() returned
                                 (every call of the setup rows: the median of all of them)
"lazy ..." rows run once per way lazy() can map the file: directly (``direct=True``, the
kernel's own private file mapping, when lazy() has the keyword) and through the handler
(``direct=False``) on each fault path (UFFD_NATIVE unset: native when built; UFFD_NATIVE=0:
pure Python), labelled with the path the handler reports. Then the targets of issue 20, PASS
or FAIL: sum <= 1.2x np.load's, gather <= 2x, later setups <= 2 ms, first fault <= 100 us.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "native"))
sys.path.insert(0, os.path.dirname(HERE))

from _source import path_of, use_path, warm  # noqa: E402 - benchmarks/_source.py
from driver import _parse_size  # noqa: E402 - benchmarks/native/driver.py

from userfaultfd._forked import Channel, Forked  # noqa: E402
from userfaultfd.runtime import lazy, server_of  # noqa: E402

LATER_CALLS = 10


@dataclass(frozen=True, slots=True)
class Way:
    """One way lazy() maps the file: its keyword arguments and the fault path asked for."""

    name: str
    kwargs: dict[str, Any]
    native: bool


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    values: tuple[float, ...]  # seconds (or microseconds, by unit)
    unit: str  # "ms" or "us"
    against: str | None = None  # the row it is compared with

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def ways() -> list[Way]:
    found: list[Way] = []
    handler_kwargs: dict[str, Any] = {}
    if "direct" in inspect.signature(lazy).parameters:
        found.append(Way("direct", {"direct": True}, True))
        handler_kwargs = {"direct": False}
    for label, native in (("native", True), ("python", False)):
        found.append(Way(f"handler {label}", handler_kwargs, native))
    return found


def _in_child(body: Callable[[], Any]) -> Any:
    def run(channel: Channel) -> None:
        channel.send(body())

    with Forked(run, timeout=300) as child:
        result, _ = child.recv(timeout=300)
        child.exit_code()
    return result


def _label(way: Way, array: Any) -> str:
    """The way's name, with the path the handler reports (none for a direct mapping)."""
    try:
        server = server_of(array)
    except ValueError:
        return way.name
    return f"handler {path_of(server.stats())}"


def _drop(array: Any) -> None:
    """Let the handler go at once (its pages not filled are poisoned), then the array."""
    try:
        server_of(array).stop(drain=False)
    except ValueError:
        pass  # mapped directly: no handler


def _sum_lazy(path: str, way: Way) -> tuple[float, int, str]:
    use_path(way.native)
    started = time.perf_counter()
    array = lazy(path, **way.kwargs)
    total = int(array.sum())
    seconds = time.perf_counter() - started
    label = _label(way, array)
    _drop(array)
    return seconds, total, label


def _sum_mmap(path: str) -> tuple[float, int, str]:
    started = time.perf_counter()
    total = int(np.load(path, mmap_mode="r").sum())
    return time.perf_counter() - started, total, "np.load"


def _gather(path: str, way: Way | None, pages: Any) -> tuple[float, int, str]:
    if way is not None:
        use_path(way.native)
    started = time.perf_counter()
    array = np.load(path, mmap_mode="r") if way is None else lazy(path, **way.kwargs)
    total = int(array[pages].sum())
    seconds = time.perf_counter() - started
    label = "np.load" if way is None else _label(way, array)
    if way is not None:
        _drop(array)
    return seconds, total, label


def _setups(path: str, way: Way) -> tuple[list[float], list[float], str]:
    """Seconds of each lazy() call (the first, then LATER_CALLS more), and of the first fault
    after each returned; the path label."""
    use_path(way.native)
    setups: list[float] = []
    faults: list[float] = []
    label = way.name
    for _ in range(1 + LATER_CALLS):
        started = time.perf_counter()
        array = lazy(path, **way.kwargs)
        returned = time.perf_counter()
        value = int(array[len(array) // 2])  # one fault, in the middle
        faulted = time.perf_counter()
        if value != len(array) // 2 + 1:
            raise AssertionError(f"element {len(array) // 2} reads {value}")
        setups.append(returned - started)
        faults.append(faulted - returned)
        label = _label(way, array)
        _drop(array)
        del array
        gc.collect()
    return setups, faults, label


def measure(path: str, count: int, repeat: int) -> list[Row]:
    expected = count * (count + 1) // 2
    element_pages = np.random.default_rng(1).permutation(count * 8 // 4096)[: count * 8 // 409600]
    idx = element_pages * (4096 // 8)  # one element on each of 1% of the pages
    gathered = int((idx + 1).sum())
    rows: list[Row] = []

    def run(what: str, body: Callable[[], tuple[float, int, str]], want: int,
            against: str | None) -> None:  # fmt: skip
        values, label = [], ""
        for _ in range(repeat):
            warm(path)
            seconds, total, label = _in_child(body)
            if total != want:
                raise AssertionError(f"{what}: {total}, expected {want}")
            values.append(seconds * 1e3)
        rows.append(Row(what.replace("{label}", label), tuple(values), "ms", against))
        print(f"  {rows[-1].what:40} {rows[-1].median:10.2f} ms", file=sys.stderr, flush=True)

    run("sum: np.load(mmap_mode='r')", partial(_sum_mmap, path), expected, None)
    for way in ways():
        run("sum: lazy, {label}", partial(_sum_lazy, path, way), expected,
            "sum: np.load(mmap_mode='r')")  # fmt: skip
    run("gather 1%: np.load(mmap_mode='r')", partial(_gather, path, None, idx), gathered, None)
    for way in ways():
        run("gather 1%: lazy, {label}", partial(_gather, path, way, idx),
            gathered, "gather 1%: np.load(mmap_mode='r')")  # fmt: skip
    for way in ways():
        warm(path)
        firsts: list[float] = []
        laters: list[float] = []
        faults: list[float] = []
        label = way.name
        for _ in range(repeat):
            setups, faulted, label = _in_child(partial(_setups, path, way))
            firsts.append(setups[0] * 1e3)
            laters.append(statistics.median(setups[1:]) * 1e3)
            faults.extend(f * 1e6 for f in faulted)
        rows.append(Row(f"lazy() setup, first call, {label}", tuple(firsts), "ms"))
        rows.append(Row(f"lazy() setup, later calls, {label}", tuple(laters), "ms"))
        rows.append(Row(f"first fault after lazy(), {label}", tuple(faults), "us"))
        print(f"  setup {label}: first {statistics.median(firsts):.2f} ms, later "
              f"{statistics.median(laters):.2f} ms, fault {statistics.median(faults):.0f} us",
              file=sys.stderr, flush=True)  # fmt: skip
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'':48} {'median':>10} {'min':>10} {'max':>10}  {'vs NumPy':>8}"]
    for row in rows:
        other = next((r for r in rows if r.what == row.against), None)
        ratio = f"{row.median / other.median:.2f}x" if other else ""
        lines.append(f"{row.what:48} {row.median:>7.2f} {row.unit} {min(row.values):>7.2f} "
                     f"{row.unit} {max(row.values):>7.2f} {row.unit}  {ratio:>8}")  # fmt: skip
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    lines: list[str] = []

    def check(row: Row, value: float, limit: float, unit: str) -> None:
        verdict = "PASS" if value <= limit else "FAIL"
        lines.append(f"{verdict}  {row.what:48} {value:8.2f}{unit} (<= {limit:g}{unit})")

    for row in rows:
        if row.against is not None:
            other = next(r for r in rows if r.what == row.against)
            check(row, row.median / other.median, 1.2 if row.what.startswith("sum") else 2.0,
                  "x")  # fmt: skip
        elif row.what.startswith("lazy() setup, later"):
            check(row, row.median, 2.0, " ms")
        elif row.what.startswith("first fault"):
            check(row, row.median, 100.0, " us")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="bytes of int64 data, e.g. 256M")
    parser.add_argument("--repeat", type=int, default=5, help="runs per row (median shown)")
    parser.add_argument("--dir", default="/var/tmp", help="where the .npy goes (disk)")
    from _plots import add_options  # benchmarks/_plots.py: the figure of the table

    add_options(parser)
    args = parser.parse_args()
    size = _parse_size(args.size)
    if size < 1 << 20 or args.repeat < 1:
        parser.error("--size must be at least 1M and --repeat at least 1")
    count = size // 8
    path = os.path.join(args.dir, "uffd-local-bench.npy")
    started = time.monotonic()
    np.save(path, np.arange(1, count + 1, dtype=np.int64))
    try:
        rows = measure(path, count, args.repeat)
    finally:
        os.unlink(path)
    uname = os.uname()
    print(f"# lazy() of a local .npy: {size >> 20} MiB of int64 in the page cache, {args.repeat} "
          f"runs a row (median, min, max); Linux {uname.release} {uname.machine}, "
          f"{os.cpu_count()} CPUs; {time.monotonic() - started:.0f} s")  # fmt: skip
    print(table(rows))
    print("\n# targets (issue 20), from the medians")
    print("\n".join(targets(rows)))


if __name__ == "__main__":
    from _plots import main_with_figure

    main_with_figure(main, "local")
