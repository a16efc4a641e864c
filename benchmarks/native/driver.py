"""Build and run ``fault_bench.c``: the C reference half of the runtime benchmark.

Importable by path (this directory is not a package; nothing here uses relative imports)::

    sys.path.insert(0, "benchmarks/native")
    from driver import build, run
    result = run(build(), "uffd", "seq", 4096, 64 << 20, "/var/tmp/source.bin")

As a script it builds the binary, writes a source file of ``--size`` bytes (default 1 GiB) to a
temporary directory on disk (``/var/tmp`` by default: ``/tmp`` may be tmpfs), reserves enough 2 MiB
huge pages through ``/proc/sys/vm/nr_hugepages`` (root; the old value is restored afterwards) and
prints a table of pages/s and GB/s (10**9 bytes/s) for every configuration::

    python3 benchmarks/native/driver.py [--size 1G] [--repeat 3] [--dir /var/tmp]

Each row is the best of ``--repeat`` runs: on a VM single runs are noisy (a first run on guest
memory the host has not backed yet, or writeback, can cost a row 3x).

Progress goes to stderr, the table to stdout. The source file is written just before the runs and
stays in the page cache, so uffd and eager modes measure copies from the page cache, not disk I/O.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_SOURCE = _HERE / "fault_bench.c"
_CFLAGS = ("-O2", "-Wall", "-Wextra", "-pthread")

SMALL_PAGE = 4096
HUGE_PAGE = 2 * 1024 * 1024

_NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
_MEMINFO = Path("/proc/meminfo")


def build(out_dir: str | None = None) -> str:
    """Compile fault_bench.c into ``out_dir`` (default: benchmarks/native/build/).

    Recompiles only when the source is newer than the binary. Returns the binary's path.
    Raises RuntimeError with gcc's output when compilation fails.
    """
    out = Path(out_dir) if out_dir is not None else _HERE / "build"
    out.mkdir(parents=True, exist_ok=True)
    binary = out / "fault_bench"
    if binary.exists() and binary.stat().st_mtime >= _SOURCE.stat().st_mtime:
        return str(binary)
    # Compile to a private name, then rename: a concurrent build never sees a half-written binary.
    tmp = out / f".fault_bench.{os.getpid()}"
    cmd = ["gcc", *_CFLAGS, "-o", str(tmp), str(_SOURCE)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    os.replace(tmp, binary)
    return str(binary)


def run(
    binary: str,
    mode: str,
    order: str,
    page: int,
    size: int,
    file: str | None,
    pin_same_cpu: bool = False,
    seed: int = 1,
    timeout: float = 600,
) -> dict[str, object]:
    """Run one measurement and return fault_bench's JSON line, parsed.

    Raises RuntimeError (with fault_bench's stderr) when it exits non-zero or prints no JSON,
    and subprocess.TimeoutExpired when it runs longer than ``timeout`` seconds.
    """
    cmd = [
        binary,
        f"--mode={mode}",
        f"--order={order}",
        f"--page={page}",
        f"--size={size}",
        f"--seed={seed}",
    ]
    if file is not None:
        cmd.append(f"--file={file}")
    if pin_same_cpu:
        cmd.append("--pin-same-cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed nothing; stderr: {proc.stderr.strip()}")
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise RuntimeError(f"{' '.join(cmd)} printed {lines[-1]!r}, not a JSON object")
    return result


# --- the script -------------------------------------------------------------------------------

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
    """``1073741824``, ``64M``, ``64MiB``, ``1G``, ``512k`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)(?:i?[bB])?\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1073741824, 64M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


_TAG = b"UFFDBNCH"
_GOLDEN = 0x9E3779B97F4A7C15


def _write_source(path: Path, size: int) -> None:
    """Write ``size`` bytes whose every 4 KiB block is recognisable.

    Bytes 0-7 of block n hold (n * golden ratio) mod 2**64 (so the first byte differs from page
    to page), bytes 8-15 the tag ``UFFDBNCH``, bytes 16-23 the block's file offset, all
    little-endian; the rest is a fixed pseudo-random 1 MiB pattern.
    """
    chunk_size = 1 << 20
    pattern = random.Random(0x5EED).randbytes(chunk_size)
    header = struct.Struct("<Q8sQ")
    with path.open("wb") as f:
        for base in range(0, size, chunk_size):
            n = min(chunk_size, size - base)
            chunk = bytearray(pattern[:n])
            for off in range(0, n - header.size + 1, SMALL_PAGE):
                block = (base + off) // SMALL_PAGE
                header.pack_into(chunk, off, (block * _GOLDEN) & (2**64 - 1), _TAG, base + off)
            f.write(chunk)
        # Write back now, so writeback does not compete with the measurements that follow.
        f.flush()
        os.fsync(f.fileno())


def _hugepages_free() -> int:
    for line in _MEMINFO.read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def _hugepage_size() -> int:
    for line in _MEMINFO.read_text().splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def _huge_pages(count: int) -> Iterator[str | None]:
    """Make ``count`` free default-size huge pages available; give them back afterwards.

    Yields None on success, or a reason why 2 MiB measurements cannot run. On exit it removes
    only the pages it added (not "write back the old value"), so a concurrent user that raised
    nr_hugepages meanwhile keeps its pages.
    """
    if _hugepage_size() != HUGE_PAGE:
        yield f"default huge page size is {_hugepage_size()} bytes, not 2 MiB"
        return
    try:
        old = int(_NR_HUGEPAGES.read_text())
    except OSError as err:
        yield f"cannot read {_NR_HUGEPAGES}: {err}"
        return
    missing = count - _hugepages_free()
    if missing <= 0:
        yield None
        return
    try:
        _NR_HUGEPAGES.write_text(f"{old + missing}\n")
    except OSError as err:
        yield f"cannot write {_NR_HUGEPAGES} (root needed): {err}"
        return
    added = max(0, int(_NR_HUGEPAGES.read_text()) - old)
    try:
        free = _hugepages_free()
        if free < count:
            yield (
                f"asked for {count} free 2 MiB huge pages, the kernel found {free} "
                "(memory too fragmented?)"
            )
        else:
            yield None
    finally:
        now = int(_NR_HUGEPAGES.read_text())
        _NR_HUGEPAGES.write_text(f"{max(0, now - added)}\n")


@dataclass(frozen=True, slots=True)
class _Config:
    label: str
    mode: str
    order: str
    page: int
    pin_same_cpu: bool = False


def _configs() -> list[_Config]:
    configs: list[_Config] = []
    for page in (SMALL_PAGE, HUGE_PAGE):
        for order in ("seq", "random"):
            configs.append(_Config("kernel", "kernel", order, page))
    for pin, label in ((False, "uffd cross-CPU"), (True, "uffd same-CPU")):
        for page in (SMALL_PAGE, HUGE_PAGE):
            for order in ("seq", "random"):
                configs.append(_Config(label, "uffd", order, page, pin))
    for page in (SMALL_PAGE, HUGE_PAGE):
        configs.append(_Config("eager", "eager", "seq", page))
    return configs


def _page_label(page: int) -> str:
    return "4 KiB" if page == SMALL_PAGE else "2 MiB"


def _best(binary: str, cfg: _Config, size: int, file: str, repeat: int) -> dict[str, object]:
    best: dict[str, object] | None = None
    for _ in range(repeat):
        result = run(binary, cfg.mode, cfg.order, cfg.page, size, file, cfg.pin_same_cpu)
        if best is None or _num(result["seconds"]) < _num(best["seconds"]):
            best = result
    assert best is not None
    return best


def _num(value: object) -> float:
    if not isinstance(value, int | float):
        raise RuntimeError(f"expected a number in fault_bench's output, got {value!r}")
    return float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size", type=_parse_size, default=1 << 30, help="bytes (e.g. 64M, 1G)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the best is shown")
    parser.add_argument("--dir", default="/var/tmp", help="where the source file is written")
    parser.add_argument("--out-dir", default=None, help="build directory")
    args = parser.parse_args()
    size: int = args.size
    if size <= 0 or size % HUGE_PAGE:
        parser.error(f"--size must be a positive multiple of 2 MiB, got {size}")

    t_start = time.monotonic()
    binary = build(args.out_dir)
    print(f"built {binary}", file=sys.stderr)

    rows: list[tuple[_Config, dict[str, object] | str]] = []
    with tempfile.TemporaryDirectory(prefix="fault_bench.", dir=args.dir) as tmp:
        source = Path(tmp) / "source.bin"
        t0 = time.monotonic()
        _write_source(source, size)
        print(f"wrote {size} bytes to {source} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        with _huge_pages(size // HUGE_PAGE) as huge_problem:
            # Warm-up, not shown: in a VM the first touch of freshly reserved guest memory also
            # pays the host's faults, which would land on whichever row happens to run first.
            for page in (SMALL_PAGE, HUGE_PAGE):
                if page == SMALL_PAGE or huge_problem is None:
                    run(binary, "kernel", "seq", page, size, None)
            for cfg in _configs():
                if cfg.page == HUGE_PAGE and huge_problem is not None:
                    rows.append((cfg, huge_problem))
                    continue
                print(
                    f"running {cfg.label} {cfg.order} {_page_label(cfg.page)} ...",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    rows.append((cfg, _best(binary, cfg, size, str(source), args.repeat)))
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    rows.append((cfg, str(err)))

    print(f"fault_bench, {size} bytes ({size / (1 << 30):g} GiB), best of {args.repeat}")
    header = (
        f"{'mode':<15} {'order':<7} {'page':<6} {'pages/s':>12} {'GB/s':>7} "
        f"{'seconds':>9} {'faults':>8}"
    )
    print(header)
    print("-" * len(header))
    for cfg, result in rows:
        prefix = f"{cfg.label:<15} {cfg.order:<7} {_page_label(cfg.page):<6}"
        if isinstance(result, str):
            print(f"{prefix} n/a: {result}")
            continue
        seconds = _num(result["seconds"])
        pages_per_s = _num(result["pages_per_s"])
        gb_per_s = pages_per_s * cfg.page / 1e9
        print(
            f"{prefix} {pages_per_s:>12,.0f} {gb_per_s:>7.2f} {seconds:>9.3f} "
            f"{int(_num(result['faults'])):>8}"
        )
    print(f"total time {time.monotonic() - t_start:.1f} s")


if __name__ == "__main__":
    main()
