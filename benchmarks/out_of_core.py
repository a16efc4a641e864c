"""Out-of-core arrays: lazy(budget=...) against np.memmap in a memory cgroup of the same budget.

    python3 benchmarks/out_of_core.py [--budget 64M] [--times 8] [--repeat 3] [--dir /var/tmp]

The source is a .npy of int64 values (``--times`` x the budget of data) on this machine's disk.
Every row is a fresh program (this script with ``--row``) in a cgroup v1 memory group of its own,
limited to what the program uses once the array is open (its imports, and lazy()'s supervisor
and handler) + the budget + 16 MiB (the slack the issue allows), after
``echo 3 > /proc/sys/vm/drop_caches`` (a cold run); the clock starts there. Its memory is
sampled every 2 ms from outside: the array's pages mapped in the program (RssFile for memmap,
RssShmem for lazy, less what the program had mapped before it began) and the group's peak
(page cache included).
  scan                 a.sum()
  gather 1%            a[idx].sum(): one element of 1% of the pages, in a random order
  sort in place        a.sort(), then the writes made durable (np.memmap.flush / flush())
  scan over HTTP       the file served by nginx: lazy(url, budget=...).sum(), against
                       downloading it first (one GET to disk) then np.load(mmap_mode="r").sum()
The table prints the median seconds (min, max) and the ratio to the memmap row of the same work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CGROUP = Path("/sys/fs/cgroup/memory")
SLACK = 16 << 20


# -- one row, in its own program ---------------------------------------------------------------
def row(args: argparse.Namespace) -> None:
    """Join the group, report the memory used after the imports, wait for "go", run, report."""
    with open(os.path.join(args.group, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    import numpy as np

    from userfaultfd.runtime import lazy, server_of

    budget, kind, work = args.budget, args.kind, args.work
    # The array is opened before the baseline is taken (and the clock started): the limit is
    # then what each way uses to run at all (lazy's supervisor and handler included) + the
    # budget + the slack, the same room for the data whichever way holds it.
    a: Any = None
    if kind == "memmap":
        a = np.load(args.path, mmap_mode="r+" if work == "sort" else "r")
    elif kind != "download":
        source = args.url if kind == "lazy-url" else args.path
        from userfaultfd.cli._args import parse_policy

        policy = parse_policy(args.policy) if args.policy else None
        a = lazy(source, budget=budget, writable=work == "sort", policy=policy)
    with open(os.path.join(args.group, "memory.usage_in_bytes")) as f:
        print(json.dumps({"baseline": int(f.read())}), flush=True)
    sys.stdin.readline()
    started = time.perf_counter()
    if kind == "download":
        local = os.path.join(args.scratch, "downloaded.npy")
        with urllib.request.urlopen(args.url) as response, open(local, "wb") as out:
            while chunk := response.read(8 << 20):
                out.write(chunk)
        a = np.load(local, mmap_mode="r")
    if work == "scan":
        answer = int(a.sum())
    elif work == "gather":
        pages = a.size * 8 // 4096
        rng = np.random.default_rng(1)
        chosen = rng.choice(pages, max(1, pages // 100), replace=False)
        answer = int(a[chosen * 512].sum())
    else:
        a.sort()
        if kind == "memmap":
            a.flush()
        else:
            server_of(a).flush()
        answer = 0
    seconds = time.perf_counter() - started
    check = ""
    if work == "sort":
        # In pieces: a whole-array comparison would allocate the array's size in the cgroup.
        step = 1 << 20
        last = a.size - 1
        ordered = all(bool(np.all(a[i : min(i + step, last)] <= a[i + 1 : min(i + step, last) + 1]))
                      for i in range(0, last, step))  # fmt: skip
        check = "sorted" if ordered else "NOT SORTED"
    stats = {}
    if kind.startswith("lazy"):
        s = server_of(a).stats()
        stats = {"evicted": s.evicted, "written_back": s.written_back, "faults": s.faults}
    print(json.dumps({"seconds": seconds, "answer": answer, "check": check, **stats}), flush=True)


# -- the driver --------------------------------------------------------------------------------
@contextlib.contextmanager
def group(name: str) -> Iterator[Path]:
    path = CGROUP / name
    path.mkdir(exist_ok=True)
    try:
        yield path
    finally:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def status(pid: int) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssFile", "RssShmem", "RssAnon"):
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def measure(args: argparse.Namespace, kind: str, work: str, path: str, url: str) -> dict[str, Any]:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3")
    with group(f"uffd-out-of-core-{os.getpid()}") as cg, tempfile.TemporaryDirectory(
        dir=args.dir
    ) as scratch:  # fmt: skip
        command = [sys.executable, __file__, "--row", "--group", str(cg), "--kind", kind,
                   "--work", work, "--path", path, "--url", url, "--scratch", scratch,
                   "--budget", str(args.budget), "--policy", args.policy]  # fmt: skip
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        baseline = json.loads(proc.stdout.readline())["baseline"]
        limit = baseline + args.budget + SLACK
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        peak = {"array": 0}
        series: list[tuple[float, int]] = []  # (seconds since go, array bytes)
        done = threading.Event()
        key = "RssFile" if kind in ("memmap", "download") else "RssShmem"
        before = status(proc.pid).get(key, 0)  # (the interpreter's own files: not the array)

        def sample() -> None:
            began = time.perf_counter()
            while not done.wait(0.002):
                now = status(proc.pid).get(key, 0) - before
                peak["array"] = max(peak["array"], now)
                series.append((time.perf_counter() - began, now))

        sampler = threading.Thread(target=sample)
        sampler.start()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        done.set()
        sampler.join()
        code = proc.wait()
        group_peak = int((cg / "memory.max_usage_in_bytes").read_text())
        failcnt = int((cg / "memory.failcnt").read_text())
    if not line:
        return {"failed": f"exited {code}", "limit": limit}
    result: dict[str, Any] = json.loads(line)
    result.update(limit=limit, array_peak=peak["array"], group_peak=group_peak, failcnt=failcnt,
                  series=series)  # fmt: skip
    return result


def make_source(directory: str, size: int, random: bool) -> str:
    import numpy as np

    path = os.path.join(directory, f"out-of-core-{'random' if random else 'ramp'}-{size}.npy")
    if not os.path.exists(path):
        n = size // 8
        values = (np.random.default_rng(7).integers(1, 1 << 62, n) if random
                  else np.arange(1, n + 1, dtype=np.int64))  # fmt: skip
        np.save(path, values)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="64M")
    parser.add_argument("--times", type=int, default=8, help="source size / budget")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--works", default="scan,gather,sort,http")
    parser.add_argument("--policy", default="", help="lazy()'s policy (default: its own)")
    sys.path.insert(0, HERE)
    from _plots import add_options  # benchmarks/_plots.py: the figure of the table

    add_options(parser)
    parser.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--group", "--kind", "--work", "--path", "--url", "--scratch"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from userfaultfd.runtime._budgeted import parse_budget

    args.budget = parse_budget(args.budget)
    if args.row:
        row(args)
        return
    size = args.budget * args.times
    works = args.works.split(",")
    ramp = make_source(args.dir, size, random=False)
    shuffled = make_source(args.dir, size, random=True) if "sort" in works else ""
    uname = os.uname()
    print(
        f"# out-of-core: {size >> 20} MiB of int64 on disk, budget {args.budget >> 20} MiB "
        f"(cgroup limit: the program's baseline + budget + {SLACK >> 20} MiB), cold runs, "
        f"{args.repeat} runs a row; Linux {uname.release} {uname.machine}, "
        f"{os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    rows: list[tuple[str, str, str, str]] = []
    if "scan" in works:
        rows += [("scan", "np.memmap in the cgroup", "memmap", "scan"),
                 ("scan", "lazy(budget)", "lazy", "scan")]  # fmt: skip
    if "gather" in works:
        rows += [("gather 1%", "np.memmap in the cgroup", "memmap", "gather"),
                 ("gather 1%", "lazy(budget)", "lazy", "gather")]  # fmt: skip
    if "sort" in works:
        rows += [("sort in place", "np.memmap r+ in the cgroup", "memmap", "sort"),
                 ("sort in place", "lazy(budget, writable)", "lazy", "sort")]  # fmt: skip
    server = None
    url = ""
    if "http" in works:
        from tests.stores._servers import Nginx

        prefix = Path(tempfile.mkdtemp(prefix="uffd-bench-nginx-"))
        server = Nginx(Path(args.dir), prefix)
        url = f"{server.url}/{os.path.basename(ramp)}"
        rows += [("scan over HTTP", "download, then np.memmap", "download", "scan"),
                 ("scan over HTTP", "lazy(url, budget)", "lazy-url", "scan")]  # fmt: skip
    try:
        print(f"{'work':<15} {'way':<28} {'seconds (min-max)':>22} {'ratio':>6} "
              f"{'array peak':>11} {'group peak':>11}  notes")  # fmt: skip
        reference: dict[str, float] = {}
        expected: dict[str, set[int]] = {}
        over_time: list[str] = []
        for work_name, way, kind, work in rows:
            results = []
            for _ in range(args.repeat):
                source = shuffled if work == "sort" else ramp
                results.append(measure(args, kind, work, source, url))
            ok = [r for r in results if "seconds" in r]
            if not ok:
                print(f"{work_name:<15} {way:<28} {'failed: ' + results[0]['failed']:>22}")
                continue
            times = [r["seconds"] for r in ok]
            over_time.append(f"# series|{work_name}|{way}|" + _downsampled(ok[0]["series"]))
            median = statistics.median(times)
            reference.setdefault(work_name, median)
            ratio = median / reference[work_name]
            notes = []
            if any(r["check"] and r["check"] != "sorted" for r in ok):
                notes.append("NOT SORTED")
            if "evicted" in ok[0]:
                notes.append(f"evicted {ok[0]['evicted']} pages, wrote back "
                             f"{ok[0]['written_back']}")  # fmt: skip
            answers = {r["answer"] for r in ok}
            expected.setdefault(work_name, answers)
            if len(answers) > 1 or answers != expected[work_name]:
                notes.append(f"WRONG ANSWER {answers} (first row: {expected[work_name]})")
            print(f"{work_name:<15} {way:<28} {median:>8.3f} ({min(times):.3f}-{max(times):.3f})"
                  f" {ratio:>5.2f}x {max(r['array_peak'] for r in ok) >> 20:>8} MiB "
                  f"{max(r['group_peak'] for r in ok) >> 20:>8} MiB  {', '.join(notes)}",
                  flush=True)  # fmt: skip
        print("# the array's memory over time, the first run of each row (ms:MiB), for the figure:")
        print("\n".join(over_time))
    finally:
        if server is not None:
            server.kill()


def _downsampled(series: list[tuple[float, int]], points: int = 120) -> str:
    step = max(1, len(series) // points)
    kept = series[::step] + series[-1:]
    return ",".join(f"{t * 1000:.0f}:{b / (1 << 20):.1f}" for t, b in kept)


if __name__ == "__main__":
    if "--row" in sys.argv:
        main()
    else:
        sys.path.insert(0, HERE)
        from _plots import main_with_figure  # benchmarks/_plots.py: the figure of the table

        main_with_figure(main, "out_of_core")
