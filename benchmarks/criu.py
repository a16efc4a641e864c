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
program's reads are then all faults), all from the local images. Then over a link: each row at
0 ms and at ``--rtt-ms`` (default 10) round-trip time, made by benchmarks/_delay_proxy.py on
loopback (half the RTT each way, no bandwidth cap):
  uffd, pack on nginx   uffd lazy-pages --pages http://PROXY/packs (uffd pack --criu, 64 KiB
                        chunks), nginx behind the proxy
  criu page-server      criu page-server --lazy-pages -D IMAGES on the far side of the proxy,
                        criu lazy-pages --page-server --address PROXY; needs fs.pipe-max-size
                        >= 4194304 (criu.md), raised for the run and restored after
Many regions (``--regions 4103,10000,50000``, ``--no-regions`` to skip): the local rows again,
on tests/criu/regions.c with that many one-page regions, each its own VMA and so its own lazy
range (per-region costs: a daemon that walks every range per page is quadratic); touch is the
program's check of every byte, its rate in MiB/s of the regions' pages.
redis-server (``--redis 64,256``, ``--no-redis`` to skip; benchmarks/_criu_redis.py): a real
program filled with that many MiB of values, dumped, restored by criu lazy-pages, uffd
lazy-pages and uffd lazy-pages with UFFD_NATIVE=0, timed until every key is read back and
checked; needs redis-server (apt-get install -y redis-server).
CRIU comes from tests/criu/install_criu.sh. Needs root; the remote rows need nginx.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
REAPER = ROOT / "tests" / "criu" / "_reaper.py"
REGIONS = ROOT / "tests" / "criu" / "regions.c"
PROXY = ROOT / "benchmarks" / "_delay_proxy.py"
PIPE_MAX = Path("/proc/sys/fs/pipe-max-size")

import _criu_redis  # noqa: E402 - beside this file: the redis-server rows

from tests.criu._restore import wait_for  # noqa: E402
from tests.reliability._netns import listening  # noqa: E402
from tests.stores import _servers  # noqa: E402

#: Given the images dir, start what a row needs besides the daemon (a server, a proxy) and
#: yield the daemon's command line (IMAGES stands for the images dir).
Setup = Callable[[Path], contextlib.AbstractContextManager[list[str]]]

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


def _run(criu: str, program: str, work: Path, size_mib: int, setup: Setup) -> Row:
    return _run_program(criu, [program, str(work), str(size_mib)], work, setup, _words_result)


def _words_result(text: str) -> tuple[bool, float]:
    """PROGRAM's result: "BAD SECONDS" (wrong words, then the seconds its check took)."""
    bad, touch = text.split()
    return bad == "0", float(touch)


def _regions_result(text: str) -> tuple[bool, float]:
    """tests/criu/regions.c's result: "PASS N SECONDS", or what was wrong."""
    parts = text.split()
    return parts[:1] == ["PASS"], float(parts[2]) if parts[:1] == ["PASS"] else 0.0


def _run_program(
    criu: str, argv: list[str], work: Path, setup: Setup,
    result: Callable[[str], tuple[bool, float]],
) -> Row:  # fmt: skip
    """Dump ``argv`` (run in ``work``, which it gets as its first argument), restore it lazily
    served by the daemon ``setup`` yields, and time it; ``result`` reads its result file."""
    shutil.rmtree(work, ignore_errors=True)
    images = work / "img"
    images.mkdir(parents=True)
    target = subprocess.Popen(argv, cwd=work,
                              start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for("the program's ready file", (work / "ready").exists, 120)
    subprocess.run([criu, "dump", "-t", str(target.pid), "-D", str(images), "-o", "dump.log"],
                   check=True, timeout=300, capture_output=True)  # fmt: skip
    target.wait(timeout=30)
    with setup(images) as daemon:
        return _serve(criu, work, images, target.pid, daemon, result)


def _serve(
    criu: str, work: Path, images: Path, pid: int, daemon: list[str],
    result: Callable[[str], tuple[bool, float]],
) -> Row:  # fmt: skip
    command = [part.replace("IMAGES", str(images)) for part in daemon]
    served = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        wait_for("the daemon's socket", (images / "lazy-pages.socket").exists, 60)
        started = time.monotonic()
        restore = [criu, "restore", "-D", str(images), "--lazy-pages", "-d", "-o", "restore.log"]
        reaper = subprocess.Popen([sys.executable, str(REAPER), str(pid), "300", "--",
                                   *restore], stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert reaper.stdout is not None
        line = reaper.stdout.readline().split()
        restored = time.monotonic() - started
        if line != ["restored", "0"]:
            raise RuntimeError(f"criu restore failed: {line}; see {images}/restore.log")
        (work / "go").touch()
        ending = reaper.stdout.readline().strip()
        reaper.wait(timeout=60)
        served.wait(timeout=600)
        total = time.monotonic() - started
    finally:
        if served.poll() is None:
            os.killpg(served.pid, signal.SIGKILL)
            served.wait()
    text = (work / "result").read_text()
    right, touch = result(text)
    if ending != "exit 0" or not right:
        raise RuntimeError(f"the restored program reported {text!r} and ended {ending!r}")
    return Row(restored, touch, total)


def _local(command: list[str]) -> Setup:
    @contextlib.contextmanager
    def setup(images: Path) -> Iterator[list[str]]:
        yield command

    return setup


@contextlib.contextmanager
def _proxy(port: int, delay: float) -> Iterator[int]:
    """benchmarks/_delay_proxy.py from a free port to ``port``; yields the proxy's port."""
    listen = _servers.free_port()
    proc = subprocess.Popen([sys.executable, str(PROXY), "--listen", f"127.0.0.1:{listen}",
                             "--to", f"127.0.0.1:{port}", "--delay", str(delay)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the delay proxy did not start")
        yield listen
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _uffd_nginx(uffd: list[str], delay: float) -> Setup:
    @contextlib.contextmanager
    def setup(images: Path) -> Iterator[list[str]]:
        work = images.parent
        root = work / "www"
        subprocess.run([*uffd[:-1], "pack", "--criu", str(images), str(root / "packs"),
                        "--chunk-size", "64K"], check=True, capture_output=True,
                       timeout=600)  # fmt: skip
        with (
            _servers.nginx(root, work / "nginx") as server,
            _proxy(server.port, delay) as port,
        ):
            yield [*uffd, "--pages", f"http://127.0.0.1:{port}/packs", "IMAGES"]

    return setup


def _criu_page_server(criu: str, delay: float) -> Setup:
    @contextlib.contextmanager
    def setup(images: Path) -> Iterator[list[str]]:
        port = _servers.free_port()
        server = subprocess.Popen([criu, "page-server", "--lazy-pages", "-D", str(images),
                                   "--address", "127.0.0.1", "--port", str(port),
                                   "-o", "page-server.log"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            # Read from /proc: a probe connection would be the page server's one client.
            wait_for("criu page-server listening", lambda: listening(server.pid, port), 30)
            with _proxy(port, delay) as through:
                yield [criu, "lazy-pages", "--page-server", "--address", "127.0.0.1",
                       "--port", str(through), "-D", "IMAGES", "-o", "lazy.log"]  # fmt: skip
        finally:
            if server.poll() is None:
                server.kill()
            server.wait(timeout=10)

    return setup


@contextlib.contextmanager
def _pipe_max(size: int) -> Iterator[str | None]:
    """fs.pipe-max-size at least ``size`` while inside, restored after; yields why not, if
    it could not be raised."""
    try:
        before = PIPE_MAX.read_text().strip()
    except OSError as err:
        yield f"cannot read {PIPE_MAX}: {err}"
        return
    if int(before) >= size:
        yield None
        return
    try:
        PIPE_MAX.write_text(str(size))
    except OSError as err:
        yield f"cannot raise fs.pipe-max-size to {size}: {err}"
        return
    try:
        yield None
    finally:
        PIPE_MAX.write_text(before)


def _print(name: str, rows: list[Row], size_mib: float) -> None:
    best = Row(*(min(getattr(r, f) for r in rows) for f in ("restore", "touch", "total")))
    rate = size_mib / best.touch if best.touch else float("inf")
    print(f"{name:<38} {best.restore:>8.3f}s {best.touch:>8.3f}s {best.total:>8.3f}s"
          f"  {rate:8.0f} MiB/s", flush=True)  # fmt: skip


def _many_regions(criu: str, local: dict[str, list[str]], counts: list[int], repeat: int,
                  tmp: str) -> None:  # fmt: skip
    """The local rows on tests/criu/regions.c: COUNT one-page regions, each its own VMA."""
    program = f"{tmp}/regions"
    subprocess.run(["gcc", "-O2", "-o", program, str(REGIONS)], check=True)
    work = Path(tmp) / "regions-work"
    for count in counts:
        print(f"{count} one-page regions (tests/criu/regions.c), best of {repeat}")
        for name, command in local.items():
            rows = [_run_program(criu, [program, str(work), str(count)], work,
                                 _local(command), _regions_result)
                    for _ in range(repeat)]  # fmt: skip
            _print(f"{name}, {count} regions", rows, count * 4096 / (1 << 20))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=10.0, help="the remote rows' slow link")
    parser.add_argument("--remote-repeat", type=int, default=1, help="runs of each remote row")
    parser.add_argument("--no-local", dest="local", action="store_false")
    parser.add_argument("--no-remote", dest="remote", action="store_false")
    parser.add_argument(
        "--regions",
        default="4103,10000,50000",
        help="region counts of the many-regions rows (comma-separated)",
    )
    parser.add_argument("--no-regions", dest="many", action="store_false")
    parser.add_argument(
        "--redis",
        default="64,256",
        help="dataset sizes in MiB of the redis-server rows (comma-separated)",
    )
    parser.add_argument("--no-redis", dest="redis_rows", action="store_false")
    from _plots import add_options  # benchmarks/_plots.py: the figure of the table

    add_options(parser)
    args = parser.parse_args()
    criu = subprocess.run([str(ROOT / "tests" / "criu" / "install_criu.sh")], check=True,
                          capture_output=True, text=True).stdout.split()[-1]  # fmt: skip
    uffd = [sys.executable, "-m", "userfaultfd", "lazy-pages"]
    local = {
        "criu lazy-pages": [criu, "lazy-pages", "-D", "IMAGES", "-o", "lazy.log"],
        "uffd lazy-pages": [*uffd, "IMAGES"],
        "uffd --no-background": [*uffd, "--no-background", "IMAGES"],
    }
    with tempfile.TemporaryDirectory(prefix="uffd-criu-bench.") as tmp:
        program = f"{tmp}/program"
        source = Path(f"{tmp}/program.c")
        source.write_text(PROGRAM)
        subprocess.run(["gcc", "-O2", "-o", program, str(source)], check=True)
        work = Path(tmp) / "work"
        if args.local or args.many or args.remote:
            print(f"{args.size_mib} MiB of private anonymous memory; local rows best of "
                  f"{args.repeat}, remote rows best of {args.remote_repeat}")  # fmt: skip
            print(f"{'daemon':<38} {'restore':>9} {'touch':>9} {'total':>9}  touch rate")
        if args.local:
            for name, command in local.items():
                rows = [_run(criu, program, work, args.size_mib, _local(command))
                        for _ in range(args.repeat)]  # fmt: skip
                _print(name, rows, args.size_mib)
        if args.many:
            counts = [int(n) for n in args.regions.split(",") if n]
            _many_regions(criu, local, counts, args.repeat, tmp)
        if args.redis_rows:
            daemons = {
                "criu lazy-pages": local["criu lazy-pages"],
                "uffd lazy-pages": local["uffd lazy-pages"],
                "uffd lazy-pages, UFFD_NATIVE=0": ["env", "UFFD_NATIVE=0", *uffd, "IMAGES"],
            }
            sizes = [int(n) for n in args.redis.split(",") if n]
            _criu_redis.run(criu, daemons, sizes, args.repeat, tmp)
        if not args.remote:
            return 0
        if not os.path.exists(_servers.NGINX):
            print(f"uffd, pack on nginx: not run: {_servers.NGINX} is missing")
        for rtt in (0.0, args.rtt_ms):
            delay = rtt / 2000
            if os.path.exists(_servers.NGINX):
                rows = [_run(criu, program, work, args.size_mib,
                             _uffd_nginx(uffd, delay))
                        for _ in range(args.remote_repeat)]  # fmt: skip
                _print(f"uffd, pack on nginx, {rtt:g} ms", rows, args.size_mib)
            with _pipe_max(4194304) as why_not:
                if why_not is not None:
                    print(f"criu page-server, {rtt:g} ms: not run: {why_not}", flush=True)
                    continue
                try:
                    rows = [_run(criu, program, work, args.size_mib,
                                 _criu_page_server(criu, delay))
                            for _ in range(args.remote_repeat)]  # fmt: skip
                except (RuntimeError, subprocess.SubprocessError, TimeoutError) as err:
                    print(f"criu page-server, {rtt:g} ms: failed: {err}", flush=True)
                    continue
                _print(f"criu page-server, {rtt:g} ms", rows, args.size_mib)
    return 0


if __name__ == "__main__":
    from _plots import main_with_figure

    main_with_figure(main, "criu")
