"""The runtime against the kernel's own demand faults and a C reference handler, in one run.

    python3 benchmarks/runtime.py [--size 1G] [--repeat 3]

Rows, each the best of ``--repeat`` runs, all filling the same source file's bytes (from the
page cache) into fresh memory, sequentially or in a random page order, with 4 KiB and 2 MiB
pages:
  kernel        the kernel's demand faults on anonymous memory (no uffd; C, benchmarks/native)
  C ref         a C handler thread in the faulting process, one page per fault: the common C
                design, on another CPU (cross-CPU wakeups) and pinned to the faulting CPU
  runtime       userfaultfd.runtime.serve: the handler in another process, with the policies
                Single, Window(16) and Adaptive, on the faulting CPU (the default) and, for
                Single, left to the scheduler
  eager         read the whole file into memory up front (C)
The faulting side of the runtime rows is NumPy touching one byte a page (native code).
Times are noisy on a VM: compare the ratios of one run. Needs root (huge pages, pinning).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "native"))
sys.path.insert(0, os.path.dirname(HERE))

import driver  # noqa: E402 - benchmarks/native/driver.py, importable by path

from userfaultfd import memory  # noqa: E402
from userfaultfd._forked import Channel, Forked  # noqa: E402
from userfaultfd.runtime import Adaptive, Policy, Region, Single, Window, serve  # noqa: E402
from userfaultfd.stores import FileStore  # noqa: E402

HUGE = 2 << 20


@dataclass(frozen=True, slots=True)
class Row:
    what: str
    order: str
    page: int
    pages_per_s: float
    gb_per_s: float
    faults: int


def _runtime_once(path: str, size: int, page: int, order: str, policy: Policy,
                  cpu: int | str | None) -> tuple[float, int]:  # fmt: skip
    """Seconds to touch every page of a lazily served copy of ``path``, and faults taken."""

    def body(channel: Channel) -> None:
        mapping = memory.hugetlb(size) if page == HUGE else memory.anonymous(size)
        pages = size // page
        positions = np.arange(pages, dtype=np.int64) * page
        if order == "random":
            np.random.default_rng(1).shuffle(positions)
        array = mapping.numpy()
        server = serve([Region(mapping.address, size, 0, page)], FileStore(path),
                       policy=policy, cpu=cpu)  # fmt: skip
        started = time.perf_counter()
        touched = int(array[positions].sum())  # one byte a page, in order: native code
        seconds = time.perf_counter() - started
        stats = server.stop(drain=False)
        with open(path, "rb") as f:  # spot-check the contents outside the timing
            for index in random.Random(2).sample(range(pages), min(pages, 64)):
                f.seek(index * page)
                assert f.read(64) == bytes(mapping.view[index * page : index * page + 64])
        del array
        channel.send((seconds, stats.faults, touched))

    with Forked(body, timeout=600) as child:
        (seconds, faults, _), _ = child.recv(timeout=600)
        child.exit_code()
    return seconds, faults


def _best_runtime(path: str, size: int, page: int, order: str, make: Callable[[], Policy],
                  cpu: int | str | None, repeat: int) -> tuple[float, int]:  # fmt: skip
    return min(_runtime_once(path, size, page, order, make(), cpu) for _ in range(repeat))


def measure(size: int, repeat: int, directory: str) -> list[Row]:
    binary = driver.build()
    path = os.path.join(directory, "uffd-runtime-bench.bin")
    driver._write_source(Path(path), size)
    rows: list[Row] = []

    def add(what: str, order: str, page: int, seconds: float, faults: int) -> None:
        pages = size // page
        rows.append(Row(what, order, page, pages / seconds, size / seconds / 1e9, faults))
        print(f"  {what:28} {order:6} {page // 1024:>5} KiB  {pages / seconds:>12,.0f} pages/s",
              file=sys.stderr)  # fmt: skip

    def native(mode: str, order: str, page: int, pinned: bool = False) -> None:
        best = min(
            (driver.run(binary, mode, order, page, size, path, pin_same_cpu=pinned)
             for _ in range(repeat)),
            key=lambda r: float(str(r["seconds"])),
        )  # fmt: skip
        label = {"kernel": "kernel demand faults", "eager": "eager read (C)"}.get(mode) or (
            "C ref, same CPU" if pinned else "C ref, other CPU"
        )
        add(label, order, page, float(str(best["seconds"])), int(str(best.get("faults", 0))))

    try:
        with memory.huge_pages(size // HUGE + 2):
            for page in (4096, HUGE):
                for order in ("seq", "random"):
                    native("kernel", order, page)
                    native("uffd", order, page, pinned=False)
                    native("uffd", order, page, pinned=True)
                    for label, make, cpu in [
                        ("runtime Single", Single, "same"),
                        ("runtime Single, any CPU", Single, None),
                        ("runtime Window(16)", lambda: Window(16), "same"),
                        ("runtime Adaptive", Adaptive, "same"),
                    ]:
                        seconds, faults = _best_runtime(path, size, page, order, make, cpu,
                                                        repeat)  # fmt: skip
                        add(label, order, page, seconds, faults)
                native("eager", "seq", page)
    finally:
        os.unlink(path)
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        f"{'':28} {'order':6} {'page':>7} {'pages/s':>12} {'GB/s':>7} {'faults':>9} "
        f"{'vs C ref':>9} {'vs kernel':>9}",
    ]
    for row in rows:
        ref = next(r for r in rows if r.what == "C ref, other CPU" and r.order == row.order
                   and r.page == row.page) if row.what != "eager read (C)" else None  # fmt: skip
        kernel = next((r for r in rows if r.what == "kernel demand faults"
                       and r.order == row.order and r.page == row.page), None)  # fmt: skip
        vs_ref = f"{row.pages_per_s / ref.pages_per_s:.2f}x" if ref else ""
        vs_kernel = f"{row.pages_per_s / kernel.pages_per_s:.2f}x" if kernel else ""
        page = "4 KiB" if row.page == 4096 else "2 MiB"
        lines.append(
            f"{row.what:28} {row.order:6} {page:>7} {row.pages_per_s:>12,.0f} "
            f"{row.gb_per_s:>7.2f} {row.faults:>9,} {vs_ref:>9} {vs_kernel:>9}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="bytes to fill, e.g. 64M or 1G")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row (the best is kept)")
    parser.add_argument("--dir", default="/var/tmp", help="where the source file goes (disk)")
    args = parser.parse_args()
    size = driver._parse_size(args.size)
    started = time.monotonic()
    rows = measure(size, args.repeat, args.dir)
    uname = os.uname()
    print(f"# {size >> 20} MiB, best of {args.repeat}; Linux {uname.release} {uname.machine}, "
          f"{os.cpu_count()} CPUs; {time.monotonic() - started:.0f} s")  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
