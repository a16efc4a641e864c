"""Pack chunk size for random access: what each chunk size costs in compression and in bytes moved.

    python3 benchmarks/pack_chunks.py [--size 256M] [--fraction 0.01] [--repeat 3]

The source is built to look like a memory image or a dataset: 40% a float32 NumPy array (a smooth
signal with noise, rounded as trained weights are), 30% text (log lines), 30% zeros in runs of
1-8 MiB. For each chunk size (64 KiB .. 1 MiB), with and without a trained zstd dictionary, it
packs the source and then reads a random --fraction of its 4 KiB pages, one page per read (what a
fault handler with the Single() policy asks for), in random order, through a ZstdStore with its
default in-memory cache of 8 chunks: over the local pack file, and over nginx on loopback
(HTTP range requests). Columns: the compression ratio; the pack time; for each transport the
bytes read from the pack (the frames fetched) and the best time of --repeat. The first row reads
the raw, uncompressed file the same way. Zero chunks are answered without a read (the handler asks
known_zero() first; here read_into answers them the same way).

Then the content-addressed layout (``pack(..., layout="chunks")``, ``--chunk`` chunks, 64 KiB by
default) read the same way through a ChunkedStore: the first pack, and a second one of the source
with 5% of its non-zero pages changed, scattered (each XORed with 0x5A: as compressible as before,
still position dependent). Its rows count the bytes the store fetched; the summary line gives
what each pack uploaded (``PackInfo.unique_bytes``) and its index. ``--only chunks`` runs these
rows alone.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.stores import _servers
from userfaultfd.cli._args import parse_size
from userfaultfd.stores import ChunkedStore, FileStore, FsspecStore, Store, ZstdStore, pack

PAGE = 4096
CHUNKS = (64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20)


class Counting(Store):
    """Counts the bytes ``inner`` is asked for."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.bytes = inner, 0

    @property
    def size(self) -> int:
        return self.inner.size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        self.bytes += len(buffer)
        return self.inner.read_into(offset, buffer)

    def close(self) -> None:
        self.inner.close()


def source(size: int, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    parts: list[bytes] = []
    left = size
    while left > 0:
        kind = rng.choice(3, p=[0.4, 0.3, 0.3])
        n = min(left, int(rng.integers(1, 9)) << 20)
        if kind == 0:
            t = np.arange(n // 4, dtype=np.float32)
            signal = np.sin(t / 500.0) + rng.normal(0, 0.05, n // 4).astype(np.float32)
            parts.append(np.round(signal, 3).astype(np.float32).tobytes())
        elif kind == 1:
            words = [b"GET", b"POST", b"/api/v1/items", b"200", b"404", b"user=", b"latency_ms="]
            lines = []
            total = 0
            while total < n:
                line = b"%d %s %d\n" % (
                    int(rng.integers(10**9, 2 * 10**9)),
                    b" ".join(words[int(i)] for i in rng.integers(0, len(words), 6)),
                    int(rng.integers(0, 100000)),
                )
                lines.append(line)
                total += len(line)
            parts.append(b"".join(lines)[:n])
        else:
            parts.append(bytes(n))
        left -= len(parts[-1])
    return b"".join(parts)[:size]


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    ratio: float
    pack_s: float
    local_bytes: int
    local_s: float
    http_bytes: int
    http_s: float


def measure(
    open_raw: Callable[[], Store], wrap: bool, pages: list[int], repeat: int
) -> tuple[int, float]:
    """(bytes read from the raw store, best seconds) for reading ``pages`` one by one."""
    best, moved = float("inf"), 0
    buffer = memoryview(bytearray(PAGE))
    for _ in range(repeat):
        raw = Counting(open_raw())
        store: Store = ZstdStore(raw) if wrap else raw
        opened = raw.bytes
        started = time.perf_counter()
        for p in pages:
            store.read_into(p * PAGE, buffer)
        best = min(best, time.perf_counter() - started)
        moved = raw.bytes - opened
        store.close()
    return moved, best


def measure_chunked(location: str, pages: list[int], repeat: int) -> tuple[int, float]:
    """(bytes a ChunkedStore fetched, best seconds) for reading ``pages`` one by one."""
    best, moved = float("inf"), 0
    buffer = memoryview(bytearray(PAGE))
    for _ in range(repeat):
        with ChunkedStore(location) as store:
            started = time.perf_counter()
            for p in pages:
                store.read_into(p * PAGE, buffer)
            best = min(best, time.perf_counter() - started)
            moved = store.fetched_bytes
    return moved, best


def scattered(data: bytes, fraction: float, seed: int = 3) -> tuple[bytes, int]:
    """``data`` with a seeded ``fraction`` of its pages changed, chosen among its non-zero
    pages, each XORed with 0x5A; and how many."""
    pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE)
    live = np.flatnonzero(pages.any(axis=1))
    rng = np.random.default_rng(seed)
    picked = rng.choice(live, size=min(live.size, int(pages.shape[0] * fraction)), replace=False)
    out = pages.copy()
    out[picked] ^= 0x5A
    return out.tobytes(), int(picked.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=256 << 20)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk", type=parse_size, default=64 << 10,
                        help="chunk size of the content-addressed rows")  # fmt: skip
    parser.add_argument("--only", choices=["chunks"], help="chunks: the content-addressed rows")
    args = parser.parse_args()
    data = source(args.size)
    count = len(data) // PAGE
    pages = random.Random(2).sample(range(count), max(1, int(count * args.fraction)))
    touched = len(pages) * PAGE
    rows: list[Row] = []
    summary: list[str] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        (root / "raw").write_bytes(data)
        with _servers.nginx(root, Path(tmp) / "prefix") as server:
            url = f"{server.url}"
            lb, ls = measure(lambda: FileStore(root / "raw"), False, pages, args.repeat)
            hb, hs = measure(lambda: FsspecStore(f"{url}/raw"), False, pages, args.repeat)
            rows.append(Row("raw file", 1.0, 0.0, lb, ls, hb, hs))
            for chunk in CHUNKS if args.only is None else ():
                for dictionary in (0, 64 << 10):
                    name = f"c{chunk}-d{dictionary}"
                    started = time.perf_counter()
                    info = pack(root / "raw", root / name, chunk_size=chunk, dictionary=dictionary)
                    pack_s = time.perf_counter() - started
                    path, remote = root / name, f"{url}/{name}"
                    lb, ls = measure(partial(FileStore, path), True, pages, args.repeat)
                    hb, hs = measure(partial(FsspecStore, remote), True, pages, args.repeat)
                    label = f"{chunk >> 10} KiB"
                    if info.dictionary:
                        label += f" + {info.dictionary >> 10} KiB dict"
                    rows.append(Row(label, info.ratio, pack_s, lb, ls, hb, hs))
                    (root / name).unlink()
            (root / "changed").write_bytes(scattered(data, 0.05)[0])
            changed = scattered(data, 0.05)[1]
            uploads = []
            for name, what in (("a", "raw"), ("b", "changed")):
                started = time.perf_counter()
                info = pack(root / what, root / "cas" / f"{name}.index", chunk_size=args.chunk,
                            layout="chunks")  # fmt: skip
                pack_s = time.perf_counter() - started
                uploads.append(info.unique_bytes)
                index = (root / "cas" / f"{name}.index").stat().st_size
                lb, ls = measure_chunked(str(root / "cas" / f"{name}.index"), pages, args.repeat)
                hb, hs = measure_chunked(f"{url}/cas/{name}.index", pages, args.repeat)
                label = f"{args.chunk >> 10} KiB content-addressed"
                if name == "b":
                    label += ", 5% pages changed"
                rows.append(Row(label, info.ratio, pack_s, lb, ls, hb, hs))
                summary.append(f"{label}: uploaded {info.unique_bytes / 1e6:.2f} MB"
                               f" ({100 * info.unique_bytes / uploads[0]:.1f}% of the first),"
                               f" index {index / 1e3:.1f} kB")  # fmt: skip
    mib = 1 << 20
    print(
        f"# source {len(data) / mib:.0f} MiB, {len(pages)} random 4 KiB pages"
        f" ({touched / mib:.1f} MiB) read one at a time; best of {args.repeat}"
    )
    print(
        f"# {os.uname().sysname} {os.uname().release} {os.uname().machine}, {os.cpu_count()} CPUs"
    )
    print("| chunks | ratio | pack s | local MiB moved | local ms | HTTP MiB moved | HTTP ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r.label} | {r.ratio:.2f} | {r.pack_s:.2f} | {r.local_bytes / mib:.1f}"
            f" | {r.local_s * 1e3:.0f} | {r.http_bytes / mib:.1f} | {r.http_s * 1e3:.0f} |"
        )
    print(f"# {changed:,} pages changed; " + "; ".join(summary))


if __name__ == "__main__":
    main()
