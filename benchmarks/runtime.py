"""The runtime's two fault paths against the kernel's demand faults and a C reference handler.

    python3 benchmarks/runtime.py [--size 1G] [--repeat 3]
    python3 benchmarks/runtime.py --steady [--size 256M] [--cpu same|none|N]

Every row fills the same source file's bytes (warmed into the page cache before each run) into
fresh memory, touching one byte a page in order (seq) or in a random page order, with 4 KiB and
2 MiB pages; each row prints the min / median / max pages/s of ``--repeat`` runs, and its
ratios use the median:
  kernel demand faults   anonymous memory, no uffd: the kernel zero-fills (C, benchmarks/native)
  C ref, same CPU        a C handler thread in the faulting process, pread + UFFDIO_COPY of one
  C ref, other CPU       page per fault, pinned to the faulting CPU / on the other CPU
  mmap of the file       NumPy over a read-only mapping of the file: page-cache faults with the
                         kernel's fault-around (2 MiB rows: every 4 KiB page of each 2 MiB block)
  runtime <path> <pol>   userfaultfd.runtime.serve with policy Adaptive (the default) or Single,
                         cpu="same" (the default); "any CPU": cpu=None. <path>: the fault path
                         the handler reports (Stats.path), asked for with UFFD_NATIVE unset
                         (native when built) or UFFD_NATIVE=0 (pure Python); the faulting side
                         is NumPy touching one byte a page (native code)
  eager read (C)         pread the whole file into memory up front
  memcpy                 NumPy copy of the whole (mapped, populated) file into faulted memory
Then the targets of issue 20, PASS/FAIL, from the medians. ``--steady`` repeats the sequential
4 KiB load with the default policy 10 times per path and prints each run (pages/s, the CPU it
ran on, the handler's run-queue wait, the source's page-cache residency before warming) and
min / median / max, and whether all 10 are within 20% of each other. Times are noisy on a
shared VM: compare the ratios of one run. Needs root (huge pages, pinning).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "native"))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import driver  # noqa: E402 - benchmarks/native/driver.py, importable by path
from _source import path_of, resident, use_path, warm  # noqa: E402 - benchmarks/_source.py

from userfaultfd import _libc, memory  # noqa: E402
from userfaultfd._forked import Channel, Forked  # noqa: E402
from userfaultfd.runtime import Adaptive, Policy, Region, Single, serve  # noqa: E402
from userfaultfd.stores import FileStore  # noqa: E402

SMALL = 4096
HUGE = 2 << 20
PATHS = (("native", True), ("python", False))  # (label asked for, UFFD_NATIVE unset?)


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    order: str
    page: int
    rates: tuple[float, ...]  # pages/s of each run
    faults: int

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def _positions(size: int, page: int, order: str, step: int) -> Any:
    """Byte offsets to touch: one every ``step`` bytes, pages of ``page`` bytes in ``order``."""
    blocks = np.arange(size // page, dtype=np.int64) * page
    if order == "random":
        np.random.default_rng(1).shuffle(blocks)
    return (blocks[:, None] + np.arange(0, page, step, dtype=np.int64)[None, :]).ravel()


def _in_child(body: Callable[[], tuple[float, int, str]]) -> tuple[float, int, str]:
    """Run ``body`` in a forked child (fresh memory, its own pins); (seconds, faults, path)."""

    def run(channel: Channel) -> None:
        channel.send(body())

    with Forked(run, timeout=600) as child:
        result, _ = child.recv(timeout=600)
        child.exit_code()
    seconds, faults, path = result
    return float(seconds), int(faults), str(path)


def _runtime_once(source: str, size: int, page: int, order: str, policy: Policy,
                  cpu: int | str | None, native: bool,
                  probe: dict[str, Any] | None = None) -> tuple[float, int, str]:  # fmt: skip
    """Seconds to touch every page of a lazily served copy of ``source``, faults, and path.
    ``probe``: filled with where the run ran and the handler's run-queue wait (ms)."""

    def body() -> tuple[float, int, str]:
        use_path(native)
        mapping = memory.hugetlb(size) if page == HUGE else memory.anonymous(size)
        positions = _positions(size, page, order, page)
        array = mapping.numpy()
        server = serve([Region(mapping.address, size, 0, page)], FileStore(source),
                       policy=policy, cpu=cpu)  # fmt: skip
        waited = _run_queue_wait(server.handler_pid)
        started = time.perf_counter()
        _ = int(array[positions].sum())  # one byte a page, in order: native code
        seconds = time.perf_counter() - started
        waited = _run_queue_wait(server.handler_pid) - waited
        where = (_libc.sched_getcpu(), _cpu_of(server.handler_pid))
        stats = server.stop(drain=False)
        _spot_check(source, mapping.view, page, size // page)
        del array
        return seconds, stats.faults, f"{path_of(stats)} {where[0]} {where[1]} {waited:.1f}"

    seconds, faults, said = _in_child(body)
    path, program_cpu, handler_cpu, waited = said.split()
    if probe is not None:
        probe.update(program_cpu=program_cpu, handler_cpu=handler_cpu, wait_ms=float(waited))
    return seconds, faults, path


def _runtime_made(source: str, size: int, page: int, order: str, make: Callable[[], Policy],
                  cpu: int | str | None, native: bool) -> tuple[float, int, str]:  # fmt: skip
    return _runtime_once(source, size, page, order, make(), cpu, native)


def _run_queue_wait(pid: int) -> float:
    """Milliseconds ``pid`` has spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return float("nan")


def _cpu_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[36]  # field 39: the CPU it last ran on
    except (OSError, IndexError):
        return "?"


def _spot_check(source: str, view: memoryview, page: int, pages: int) -> None:
    """64 random pages against the file, outside the timing."""
    with open(source, "rb") as f:
        for index in random.Random(2).sample(range(pages), min(pages, 64)):
            f.seek(index * page)
            if f.read(64) != bytes(view[index * page : index * page + 64]):
                raise AssertionError(f"page {index} does not hold the source's bytes")


def _mmap_once(source: str, size: int, page: int, order: str) -> tuple[float, int, str]:
    def body() -> tuple[float, int, str]:
        array = np.memmap(source, dtype=np.uint8, mode="r", shape=(size,))
        positions = _positions(size, page, order, SMALL)
        started = time.perf_counter()
        _ = int(array[positions].sum())
        seconds = time.perf_counter() - started
        return seconds, 0, "-"

    return _in_child(body)


def _memcpy_once(source: str, size: int, page: int) -> tuple[float, int, str]:
    def body() -> tuple[float, int, str]:
        src = np.fromfile(source, dtype=np.uint8, count=size)  # in memory, faulted
        dst_map = memory.hugetlb(size) if page == HUGE else memory.anonymous(size)
        dst = np.frombuffer(dst_map.view, dtype=np.uint8)
        dst[:] = 1  # fault it in
        started = time.perf_counter()
        np.copyto(dst, src)
        seconds = time.perf_counter() - started
        if not np.array_equal(dst[:: 1 << 20], src[:: 1 << 20]):
            raise AssertionError("the copy differs from the source")
        del dst
        return seconds, 0, "-"

    return _in_child(body)


def measure(size: int, repeat: int, directory: str) -> list[Row]:
    binary = driver.build()
    source = os.path.join(directory, "uffd-runtime-bench.bin")
    driver._write_source(Path(source), size)
    rows: list[Row] = []

    def add(what: str, order: str, page: int, runs: Callable[[], tuple[float, int, str]]) -> None:
        results = []
        try:
            for _ in range(repeat):
                warm(source)
                results.append(runs())
        except (OSError, RuntimeError) as err:  # e.g. huge pages taken by another program
            print(f"  {what} {order} {_page(page)}: not measured: {err}", file=sys.stderr)
            return
        path = results[0][2]
        label = what.replace("{path}", path)
        rates = tuple(size // page / seconds for seconds, _, _ in results)
        rows.append(Row(label, order, page, rates, results[0][1]))
        print(f"  {label:33} {order:6} {page // 1024:>5} KiB  {statistics.median(rates):>12,.0f}"
              " pages/s", file=sys.stderr, flush=True)  # fmt: skip

    def native(mode: str, order: str, page: int, pinned: bool = False) -> Callable[[], Any]:
        def run() -> tuple[float, int, str]:
            result = driver.run(binary, mode, order, page, size, source, pin_same_cpu=pinned)
            return float(str(result["seconds"])), int(str(result.get("faults", 0))), "-"

        return run

    try:
        with memory.huge_pages(size // HUGE + 2):
            driver.run(binary, "kernel", "seq", SMALL, size, None)  # warm-up, not shown
            for page in (SMALL, HUGE):
                for order in ("seq", "random"):
                    add("kernel demand faults", order, page, native("kernel", order, page))
                    add("C ref, same CPU", order, page, native("uffd", order, page, True))
                    add("C ref, other CPU", order, page, native("uffd", order, page))
                    add("mmap of the file", order, page,
                        partial(_mmap_once, source, size, page, order))  # fmt: skip
                    for asked, unset in PATHS:
                        for name, make, cpu in (("Adaptive", Adaptive, "same"),
                                                ("Single", Single, "same"),
                                                ("Adaptive, any CPU", Adaptive, None)):  # fmt: skip
                            run = partial(_runtime_made, source, size, page, order, make,
                                          cpu, unset)  # fmt: skip
                            add(f"runtime {{path}} {name}", order, page, run)
                            used = rows[-1].what.split()[1]
                            if used != asked:  # e.g. native asked for, but not built
                                what = f"runtime {used} (asked {asked}) {name}"
                                rows[-1] = replace(rows[-1], what=what)
                add("eager read (C)", "seq", page, native("eager", "seq", page))
                add("memcpy", "seq", page, partial(_memcpy_once, source, size, page))
    finally:
        os.unlink(source)
    return rows


def _find(rows: list[Row], what: str, order: str, page: int) -> Row | None:
    return next((r for r in rows if r.what == what and r.order == order and r.page == page), None)


def table(rows: list[Row]) -> str:
    lines = [
        f"{'':33} {'order':6} {'page':>6} {'min':>10} {'median':>10} {'max':>10} "
        f"{'GB/s':>6} {'faults':>8} {'vs C pin':>8} {'vs kern':>8}",
    ]
    for row in rows:
        ref = _find(rows, "C ref, same CPU", row.order, row.page)
        kernel = _find(rows, "kernel demand faults", row.order, row.page)
        vs_ref = f"{row.median / ref.median:.2f}x" if ref else ""
        vs_kernel = f"{row.median / kernel.median:.2f}x" if kernel else ""
        lines.append(
            f"{row.what:33} {row.order:6} {_page(row.page):>6} {min(row.rates):>10,.0f} "
            f"{row.median:>10,.0f} {max(row.rates):>10,.0f} {row.median * row.page / 1e9:>6.2f} "
            f"{row.faults:>8,} {vs_ref:>8} {vs_kernel:>8}"
        )
    return "\n".join(lines)


def _page(page: int) -> str:
    return "4 KiB" if page == SMALL else "2 MiB"


def targets(rows: list[Row]) -> list[str]:
    """Issue 20's targets, per fault path, from the medians (default policy, default cpu)."""
    lines: list[str] = []

    def check(name: str, row: Row | None, other: Row | None, at_least: float) -> None:
        if row is None or other is None:
            lines.append(f"n/a   {name}: a row is missing")
            return
        ratio = row.median / other.median
        verdict = "PASS" if ratio >= at_least else "FAIL"
        lines.append(f"{verdict}  {name:58} {ratio:6.2f}x (>= {at_least}x)")

    for path in sorted({r.what.split()[1] for r in rows if r.what.startswith("runtime ")}):
        adaptive = f"runtime {path} Adaptive"
        check(f"{path}: random 4 KiB vs the pinned C pread handler",
              _find(rows, adaptive, "random", SMALL),
              _find(rows, "C ref, same CPU", "random", SMALL), 1.2)  # fmt: skip
        check(f"{path}: sequential 4 KiB vs the kernel's demand faults",
              _find(rows, adaptive, "seq", SMALL),
              _find(rows, "kernel demand faults", "seq", SMALL), 1.5)  # fmt: skip
        check(f"{path}: sequential 4 KiB vs memcpy",
              _find(rows, adaptive, "seq", SMALL),
              _find(rows, "memcpy", "seq", SMALL), 0.3)  # fmt: skip
        for order in ("seq", "random"):
            check(f"{path}: {order} 2 MiB vs the pinned C ref",
                  _find(rows, adaptive, order, HUGE),
                  _find(rows, "C ref, same CPU", order, HUGE), 1.0)  # fmt: skip
    return lines


def steady(size: int, directory: str, runs: int, cpu: int | str | None) -> list[str]:
    """The sequential 4 KiB load ``runs`` times per path: each run, then the spread."""
    source = os.path.join(directory, "uffd-runtime-steady.bin")
    driver._write_source(Path(source), size)
    lines: list[str] = []
    try:
        for asked, unset in PATHS:
            rates: list[float] = []
            lines.append(f"# sequential 4 KiB, Adaptive, cpu={cpu!r}, UFFD_NATIVE "
                         f"{'unset' if unset else '0'} ({asked} asked for)")  # fmt: skip
            lines.append(f"{'run':>4} {'pages/s':>10} {'path':>7} {'prog CPU':>8} "
                         f"{'handler CPU':>11} {'run-queue wait ms':>17} "
                         f"{'cached before':>13}")  # fmt: skip
            for index in range(runs):
                cached = resident(source)
                warm(source)
                probe: dict[str, Any] = {}
                seconds, _, path = _runtime_once(source, size, SMALL, "seq", Adaptive(), cpu,
                                                 unset, probe)  # fmt: skip
                rates.append(size // SMALL / seconds)
                lines.append(f"{index + 1:>4} {rates[-1]:>10,.0f} {path:>7} "
                             f"{probe['program_cpu']:>8} {probe['handler_cpu']:>11} "
                             f"{probe['wait_ms']:>17.1f} {cached:>12.0%}")  # fmt: skip
                print(lines[-1], file=sys.stderr, flush=True)
            spread = max(rates) / min(rates)
            lines.append(f"min {min(rates):,.0f}  median {statistics.median(rates):,.0f}  "
                         f"max {max(rates):,.0f} pages/s; max/min {spread:.2f}: "
                         f"{'all' if spread <= 1.2 else 'NOT all'} {runs} within 20%")  # fmt: skip
    finally:
        os.unlink(source)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="bytes to fill, e.g. 256M or 1G")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (min/median/max)")
    parser.add_argument("--dir", default="/var/tmp", help="where the source file goes (disk)")
    parser.add_argument("--steady", action="store_true",
                        help="only the sequential load, 10 times per path")  # fmt: skip
    parser.add_argument("--runs", type=int, default=10, help="runs of --steady")
    parser.add_argument("--cpu", default="same", help="runtime cpu= for --steady: same, none, N")
    from _plots import add_options  # benchmarks/_plots.py: the figure of the table

    add_options(parser)
    args = parser.parse_args()
    size = driver._parse_size(args.size)
    if size <= 0 or size % HUGE or args.repeat < 1 or args.runs < 2:
        parser.error("--size must be a positive multiple of 2 MiB, --repeat >= 1, --runs >= 2")
    started = time.monotonic()
    uname = os.uname()
    where = f"Linux {uname.release} {uname.machine}, {os.cpu_count()} CPUs"
    if args.steady:
        cpu: int | str | None = int(args.cpu) if args.cpu.isdigit() else args.cpu
        lines = steady(size, args.dir, args.runs, None if cpu == "none" else cpu)
        print(f"# {size >> 20} MiB; {where}; {time.monotonic() - started:.0f} s")
        print("\n".join(lines))
        return
    rows = measure(size, args.repeat, args.dir)
    print(f"# {size >> 20} MiB, {args.repeat} runs a row (min / median / max pages/s; ratios of "
          f"medians); {where}; {time.monotonic() - started:.0f} s")  # fmt: skip
    print(table(rows))
    print("\n# targets (issue 20), default policy and cpu, from the medians")
    print("\n".join(targets(rows)))


if __name__ == "__main__":
    from _plots import main_with_figure

    main_with_figure(main, "runtime")
