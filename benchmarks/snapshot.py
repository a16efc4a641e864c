"""Live snapshot (uffd write-protect) against fork() and stop-the-world, with a writer running.

    python3 benchmarks/snapshot.py [--size 1G] [--repeat 3]

A region of --size bytes is filled, then one writer thread stamps random pages (native writes:
ctypes.memmove releases the GIL) while the region is saved to a file on disk three ways:
  uffd live       userfaultfd.tools.snapshot(): write-protect, save-then-unprotect on faults,
                  background copy in another process
  fork            fork(); the child writes the region (its copy-on-write view) and exits; the
                  parent's writes take copy-on-write faults meanwhile
  stop-the-world  the writer is paused while the region is written out
Reported: snapshot seconds and GB/s; the writer's writes/s during the snapshot against the same
writer alone, and its per-write latency (p50, p99, max). Best of --repeat by snapshot time.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from userfaultfd import memory
from userfaultfd.tools import snapshot

PAGE = memory.page_size()


@dataclass(frozen=True, slots=True)
class Result:
    method: str
    seconds: float
    writes_per_s: float
    p50_us: float
    p99_us: float
    max_us: float


class Writer:
    """A thread stamping random pages and timing each write, until stopped."""

    def __init__(self, mapping: memory.Mapping) -> None:
        self.mapping = mapping
        self.latencies: list[int] = []
        self.running = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(7)
        pages = self.mapping.length // PAGE
        base = self.mapping.address
        clock = time.perf_counter_ns
        while not self.stop.is_set():
            self.running.wait()
            before = clock()
            ctypes.memmove(base + rng.randrange(pages) * PAGE, b"stamped!", 8)
            self.latencies.append(clock() - before)

    def measure(self, during: Callable[[], None]) -> tuple[float, float, float, float, float]:
        """Run ``during`` with the writer going; returns (seconds, writes/s, p50, p99, max us)."""
        self.latencies.clear()
        self.running.set()
        started = time.perf_counter()
        during()
        seconds = time.perf_counter() - started
        self.running.clear()
        time.sleep(0.01)
        lat = np.array(self.latencies, dtype=np.int64) / 1000.0 if self.latencies else np.zeros(1)
        return (seconds, len(self.latencies) / seconds, float(np.percentile(lat, 50)),
                float(np.percentile(lat, 99)), float(lat.max()))  # fmt: skip


def _write_out(mapping: memory.Mapping, path: str) -> None:
    with open(path, "wb") as f:
        for offset in range(0, mapping.length, 8 << 20):
            f.write(mapping.view[offset : offset + (8 << 20)])
        f.flush()
        os.fsync(f.fileno())


def run(size: int, repeat: int, directory: str) -> list[Result]:
    mapping = memory.anonymous(size)
    array = mapping.numpy()
    array[:] = np.random.default_rng(1).integers(0, 255, size=size, dtype=np.uint8)
    path = os.path.join(directory, "uffd-snapshot-bench.img")
    writer = Writer(mapping)
    writer.thread.start()
    results: list[Result] = []

    def idle() -> None:
        time.sleep(1.0)

    def live() -> None:
        snapshot(mapping, path).wait(timeout=600)

    def forked() -> None:
        pid = os.fork()
        if pid == 0:
            try:
                _write_out(mapping, path)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    def stop_the_world() -> None:
        writer.running.clear()  # paused: every write waits for the whole copy
        time.sleep(0.001)
        paused = time.perf_counter_ns()
        _write_out(mapping, path)
        writer.latencies.append(time.perf_counter_ns() - paused)
        writer.running.set()

    for method, action in [("writer alone", idle), ("uffd live", live), ("fork", forked),
                           ("stop-the-world", stop_the_world)]:  # fmt: skip
        best = min((writer.measure(action) for _ in range(repeat)), key=lambda r: r[0])
        results.append(Result(method, *best))
        print(f"  {method}: {best[0]:.2f} s", file=sys.stderr)
    writer.stop.set()
    writer.running.set()
    writer.thread.join()
    os.unlink(path)
    del array
    mapping.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="region size, e.g. 256M or 1G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp", help="where the image goes (disk)")
    args = parser.parse_args()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = args.size.upper().rstrip("IB")
    size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    results = run(size, args.repeat, args.dir)
    alone = results[0].writes_per_s
    uname = os.uname()
    print(f"# {size >> 20} MiB region, best of {args.repeat}; Linux {uname.release} "
          f"{uname.machine}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'method':16} {'seconds':>8} {'GB/s':>6} {'writes/s':>11} {'vs alone':>9} "
          f"{'p50 us':>7} {'p99 us':>8} {'max us':>9}")  # fmt: skip
    for r in results:
        rate = "" if r.method == "writer alone" else f"{size / r.seconds / 1e9:.2f}"
        print(f"{r.method:16} {r.seconds:>8.2f} {rate:>6} {r.writes_per_s:>11,.0f} "
              f"{r.writes_per_s / alone:>8.2f}x {r.p50_us:>7.1f} {r.p99_us:>8.1f} "
              f"{r.max_us:>9,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
