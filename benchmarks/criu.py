"""CRIU lazy restore: ``criu lazy-pages`` against ``uffd lazy-pages``, on the same dump.

    python3 benchmarks/criu.py [--size-mib 256] [--repeat 3]

A C program maps one private anonymous region of ``--size-mib``, fills every page with words
derived from its address, and is dumped once. Each row restores it lazily, served by one
daemon, and the restored program reads every page in order and checks it. Columns, the best of
``--repeat`` runs:
  restore   criu restore --lazy-pages -d, until it returns (the restore's own faults served)
  touch     the restored program reading and checking every page (in-program clock)
  total     from the restore's start until the daemon exits (every page in)
Rows: criu lazy-pages (CRIU 4.1.1, which fills in the background after the restore), uffd
lazy-pages with its default background fill, and with --no-background (on demand only; the
program's reads are then all faults). CRIU comes from tests/criu/install_criu.sh. Needs root.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAPER = ROOT / "tests" / "criu" / "_reaper.py"

PROGRAM = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static uint64_t word(uintptr_t a) { return (uint64_t)a * 0x9E3779B97F4A7C15ULL + 1; }
int main(int argc, char **argv) {
    size_t size = (size_t)atol(argv[2]) << 20;
    char path[4096];
    uint64_t *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return 4;
    for (size_t k = 0; k < size / 8; k++) m[k] = word((uintptr_t)&m[k]);
    snprintf(path, sizeof path, "%s/ready", argv[1]); close(open(path, O_CREAT | O_WRONLY, 0644));
    snprintf(path, sizeof path, "%s/go", argv[1]);
    while (access(path, F_OK) != 0) usleep(2000);
    struct timespec a, b; clock_gettime(CLOCK_MONOTONIC, &a);
    size_t bad = 0;
    for (size_t k = 0; k < size / 8; k++) bad += m[k] != word((uintptr_t)&m[k]);
    clock_gettime(CLOCK_MONOTONIC, &b);
    char text[128];
    int n = snprintf(text, sizeof text, "%zu %.6f", bad,
                     (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    snprintf(path, sizeof path, "%s/result", argv[1]);
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (write(fd, text, n) != n) return 5;
    close(fd);
    return bad != 0;
}
"""


@dataclass(frozen=True, slots=True)
class Row:
    restore: float
    touch: float
    total: float


def _wait(what: str, done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.002)


def _run(criu: str, program: str, work: Path, size_mib: int, daemon: list[str]) -> Row:
    shutil.rmtree(work, ignore_errors=True)
    images = work / "img"
    images.mkdir(parents=True)
    target = subprocess.Popen([program, str(work), str(size_mib)], cwd=work,
                              start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _wait("the program's ready file", (work / "ready").exists, 120)
    subprocess.run([criu, "dump", "-t", str(target.pid), "-D", str(images), "-o", "dump.log"],
                   check=True, timeout=300, capture_output=True)  # fmt: skip
    target.wait(timeout=30)
    command = [part.replace("IMAGES", str(images)) for part in daemon]
    served = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        _wait("the daemon's socket", (images / "lazy-pages.socket").exists, 60)
        started = time.monotonic()
        restore = [criu, "restore", "-D", str(images), "--lazy-pages", "-d", "-o", "restore.log"]
        reaper = subprocess.Popen([sys.executable, str(REAPER), str(target.pid), "300", "--",
                                   *restore], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert reaper.stdout is not None
        line = reaper.stdout.readline().split()
        restored = time.monotonic() - started
        if line != ["restored", "0"]:
            raise RuntimeError(f"criu restore failed: {line}; see {images}/restore.log")
        (work / "go").touch()
        ending = reaper.stdout.readline().strip()
        reaper.wait(timeout=60)
        served.wait(timeout=300)
        total = time.monotonic() - started
    finally:
        if served.poll() is None:
            os.killpg(served.pid, signal.SIGKILL)
            served.wait()
    bad, touch = (work / "result").read_text().split()
    if ending != "exit 0" or bad != "0":
        raise RuntimeError(f"the restored program saw {bad} wrong words and ended {ending!r}")
    return Row(restored, float(touch), total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    criu = subprocess.run([str(ROOT / "tests" / "criu" / "install_criu.sh")], check=True,
                          capture_output=True, text=True).stdout.split()[-1]  # fmt: skip
    uffd = [sys.executable, "-m", "userfaultfd", "lazy-pages"]
    daemons = {
        "criu lazy-pages": [criu, "lazy-pages", "-D", "IMAGES", "-o", "lazy.log"],
        "uffd lazy-pages": [*uffd, "IMAGES"],
        "uffd --no-background": [*uffd, "--no-background", "IMAGES"],
    }
    with tempfile.TemporaryDirectory(prefix="uffd-criu-bench.") as tmp:
        program = f"{tmp}/program"
        source = Path(f"{tmp}/program.c")
        source.write_text(PROGRAM)
        subprocess.run(["gcc", "-O2", "-o", program, str(source)], check=True)
        print(f"{args.size_mib} MiB of private anonymous memory, best of {args.repeat}")
        print(f"{'daemon':<22} {'restore':>9} {'touch':>9} {'total':>9}  touch rate")
        for name, command in daemons.items():
            rows = [_run(criu, program, Path(tmp) / "work", args.size_mib, command)
                    for _ in range(args.repeat)]  # fmt: skip
            best = Row(*(min(getattr(r, f) for r in rows) for f in ("restore", "touch", "total")))
            rate = args.size_mib / best.touch if best.touch else float("inf")
            print(f"{name:<22} {best.restore:>8.3f}s {best.touch:>8.3f}s {best.total:>8.3f}s"
                  f"  {rate:8.0f} MiB/s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
