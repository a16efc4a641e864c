"""Lazy memory served from a remote store over a link with latency (issue 12), in one run.

    python3 benchmarks/remote.py [--size 256M] [--rtt 0,2,10] [--chunk 64K] [--repeat 3]

Two network namespaces joined by a veth pair (tests/reliability/_netns.py): nginx in the server
one, the measured program in the client one. The link is delayed by RTT/2 each way: with tc
netem where the kernel has it (on both veth ends), else by a userspace proxy in the server
namespace (benchmarks/_delay_proxy.py) that stamps every chunk with its arrival time and sends it
RTT/2 later, in order, so the delay is a latency and not a throughput cap. Either way the client
talks to that proxy, which counts the bytes crossing the link in both directions.

The source is ``--size`` bytes of int64 values, the value at index i being i + 1 (position
dependent, never zero), served raw and as a pack (``userfaultfd.stores.pack``, ``--chunk``
chunks, pack()'s default unless told). Rows, each a fresh client process (its handler a process
of its own) with a deadline; the short ones (eager GET, lazy sequential, first byte) are run
``--repeat`` times (3) and the fastest run counts:
  eager GET          one plain HTTP GET of the whole object (a pack's is also decompressed)
  lazy sequential    lazy(url): one element read per page, in order
  random 1%          a seeded 1% of the pages in random order, from 1 thread and from 4 native
                     threads (ctypes.memmove out of the mapping, which releases the GIL; each
                     thread its own distinct pages)
  working set        a seeded 2% of the pages in a fixed order, timed from the lazy() call:
                     on demand, recorded (lazy(record=PATH)), replayed (lazy(prefetch=PATH))
  first byte         lazy(url) to the first element read
  5% changed         a content-addressed pack (pack(layout=...)) of the data, then one of the
                     data with 5% of its pages changed, scattered and in 1 MiB runs: the bytes
                     the second uploaded (PackInfo.unique_bytes) over the first's upload, the
                     second's index size, and a seeded 1% of its pages read one at a time from the
                     local directory (bytes fetched a page); ``--only changed``: these rows alone
                     (no namespaces, no root)
Every byte a row read is compared with the expected values (vectorised) before its speed counts;
a wrong page fails the run naming the page. ``x eager``: the eager GET's seconds at the same RTT
over this row's (for a sequential row, the ratio of MB/s). ``moved``: bytes that crossed the link,
both directions, headers included. ``faults``: ``server_of(a).stats().faults``. ``requests``:
HTTP requests nginx answered for the row (its access log). Times are noisy
on a 2-vCPU VM: compare the ratios of one run. Needs root (namespaces).

Files: this one runs the bench (namespaces, nginx, the link, the rows); _remote_client.py is the
measured program, _remote_data.py the source and its checks, _remote_report.py the table and the
verdicts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from _remote_client import client_main  # noqa: E402
from _remote_data import (  # noqa: E402
    PAGE,
    PER_PAGE,
    RANDOM_FRACTION,
    RANDOM_SEED,
    changed_runs,
    expected,
    sample,
    write_source,
)
from _remote_report import Row, format_bytes, format_row, table, targets  # noqa: E402

from tests.reliability import _netns  # noqa: E402 - the namespaces the network tests use
from tests.stores import _servers  # noqa: E402 - where nginx is
from userfaultfd.stores import PackInfo, pack  # noqa: E402

NGINX_PORT = 8081  # inside the server namespace, on its loopback
LINK_PORT = 8080  # the proxy, on the server's veth address: what the client connects to


# --- the bench: namespaces, nginx, the delayed link ----------------------------------------------


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while not _netns.listening(proc.pid, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on {port}")
        time.sleep(0.02)


def _netem(ns: _netns.Namespace, delay_ms: float | None) -> bool:
    """Set (or with None remove) a netem delay on ``ns``'s veth end; False if netem is absent."""
    if delay_ms is None:
        argv = ["tc", "qdisc", "del", "dev", ns.device, "root"]
    else:
        argv = ["tc", "qdisc", "replace", "dev", ns.device, "root", "netem", "delay",
                f"{delay_ms}ms"]  # fmt: skip
    done = subprocess.run(ns.command(argv), capture_output=True, timeout=10)
    return done.returncode == 0


class Link:
    """The delayed link: netem on the veth ends if the kernel has it, else the proxy's delay.

    Either way the client connects to the proxy (on the server's veth address), which counts the
    bytes forwarded both ways.
    """

    def __init__(self, hosts: _netns.Pair) -> None:
        self.hosts = hosts
        self.netem = _netem(hosts.server, 0.0)
        if self.netem:
            _netem(hosts.server, None)
        self.proxy: subprocess.Popen[bytes] | None = None
        self.rtt_ms = 0.0

    @property
    def how(self) -> str:
        return "tc netem on both veth ends" if self.netem else "userspace delay proxy"

    def set_rtt(self, rtt_ms: float) -> None:
        self.stop()
        half = rtt_ms / 2
        if self.netem:
            for ns in (self.hosts.server, self.hosts.client):
                _netem(ns, half if rtt_ms else None)
        delay = 0.0 if self.netem else half / 1000
        argv = [sys.executable, str(HERE / "_delay_proxy.py"),
                "--listen", f"{self.hosts.server.address}:{LINK_PORT}",
                "--to", f"127.0.0.1:{NGINX_PORT}", "--delay", repr(delay)]  # fmt: skip
        self.proxy = self.hosts.server.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proxy.stdout is not None
        if self.proxy.stdout.readline().strip() != b"ready":
            raise RuntimeError("the delay proxy did not start")
        _wait_listening(self.proxy, LINK_PORT, "the delay proxy")
        self.rtt_ms = rtt_ms

    def moved(self) -> int:
        """Bytes forwarded so far, both directions."""
        assert self.proxy is not None and self.proxy.stdin and self.proxy.stdout
        self.proxy.stdin.write(b"count\n")
        self.proxy.stdin.flush()
        _, up, down, _ = self.proxy.stdout.readline().split()
        return int(up) + int(down)

    def stop(self) -> None:
        if self.proxy is not None:
            if self.proxy.stdin:
                self.proxy.stdin.close()
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait(5)
            self.proxy = None


@dataclasses.dataclass(slots=True)
class Bench:
    hosts: _netns.Pair
    link: Link
    root: Path
    size: int
    deadline: float
    access_log: Path
    repeat: int = 3  # runs of the short rows (eager, sequential, first byte): the best counts
    rows: list[Row] = dataclasses.field(default_factory=list)

    def requests(self) -> int:
        try:
            with self.access_log.open("rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def run(self, kind: str, layout: str, **extra: Any) -> tuple[dict[str, Any], int]:
        """One row's program in a fresh process in the client namespace: its result (with the
        requests nginx answered meanwhile) and the bytes moved over the link."""
        name = "data.bin" if layout == "raw" else "data.pack"
        host = self.hosts.server.address
        spec = {"kind": kind, "layout": layout, "size": self.size, "host": host,
                "port": LINK_PORT, "path": f"/{name}", "url": f"http://{host}:{LINK_PORT}/{name}",
                "deadline": self.deadline, **extra}  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
        env["PYTHONPATH"] = str(ROOT)
        before, asked = self.link.moved(), self.requests()
        proc = self.hosts.client.popen(
            [sys.executable, str(Path(__file__).resolve()), "--measure", json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = proc.communicate(timeout=self.deadline + 30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise RuntimeError(
                f"{kind} {layout}: no result within {self.deadline + 30:.0f} s"
            ) from None
        lines = [x for x in out.decode().splitlines() if x.startswith("result ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{kind} {layout}: exit {proc.returncode}: {err.decode()[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1].removeprefix("result "))
        if result["bad"] is not None:
            raise RuntimeError(f"{kind} {layout} at RTT {self.link.rtt_ms} ms: page "
                               f"{result['bad']} holds wrong values")  # fmt: skip
        time.sleep(0.3)  # the handler's last requests (and FINs) are through the proxy by now
        result["requests"] = self.requests() - asked
        return result, self.link.moved() - before

    def add(self, what: str, layout: str, unit: str, result: dict[str, Any], moved: int,
            value: float) -> Row:  # fmt: skip
        row = Row(what, layout, self.link.rtt_ms, result["seconds"], unit, value, moved,
                  result["faults"], result["requests"], result["touched"])  # fmt: skip
        self.rows.append(row)
        print(f"  {format_row(row)}", file=sys.stderr, flush=True)
        return row

    def skip(self, what: str, layout: str, unit: str, note: str) -> None:
        row = Row(what, layout, self.link.rtt_ms, None, unit, None, None, None, note=note)
        self.rows.append(row)
        print(f"  {format_row(row)}", file=sys.stderr, flush=True)

    def best(self, kind: str, layout: str) -> tuple[dict[str, Any], int]:
        """The fastest of ``repeat`` runs of a short row (its result and bytes moved): one run
        of a row under a second is at the mercy of the VM's neighbours."""
        runs = [self.run(kind, layout) for _ in range(self.repeat)]
        return min(runs, key=lambda run: float(run[0]["seconds"]))

    def layout_rows(self, layout: str) -> None:
        mb = self.size / 1e6
        result, moved = self.best("eager", layout)
        self.add("eager GET", layout, "MB/s", result, moved, mb / result["seconds"])
        result, moved = self.best("sequential", layout)
        self.add("lazy sequential", layout, "MB/s", result, moved, mb / result["seconds"])
        for threads in (1, 4):
            result, moved = self.run("random", layout, threads=threads)
            pages = result["touched"] // PAGE
            self.add(f"random 1%, {threads} thread{'s' * (threads > 1)}", layout, "pages/s",
                     result, moved, pages / result["seconds"])  # fmt: skip
        result, moved = self.run("working", layout)
        pages = result["touched"] // PAGE
        self.add("working set 2%, on demand", layout, "pages/s", result, moved,
                 pages / result["seconds"])  # fmt: skip
        record = self.root / f"ws-{layout}-{self.link.rtt_ms:g}.rec"
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
        result, moved = self.run("working", layout, record=str(record))
        self.add("working set 2%, recording", layout, "pages/s", result, moved,
                 pages / result["seconds"])  # fmt: skip
        waited = time.monotonic() + 10
        while not record.exists() and time.monotonic() < waited:
            time.sleep(0.1)
        result, moved = self.run("working", layout, prefetch=str(record))
        self.add("working set 2%, replay", layout, "pages/s", result, moved,
                 pages / result["seconds"])  # fmt: skip
        result, moved = self.best("first", layout)
        self.add("first byte", layout, "ms", result, moved, result["seconds"] * 1000)


# --- the 5%-changed packs ------------------------------------------------------------------


def changed_pack_rows(root: Path, size: int, chunk: int) -> list[Row]:
    """A content-addressed pack of the data, then one of the data with 5% of its pages changed
    (scattered, and in runs of 1 MiB): the bytes the second one uploaded, against the first; then
    a seeded 1% of the second's pages read one at a time through a ChunkedStore over the local
    directory, every page checked: pages/s, and the bytes it fetched (``moved``) and asked for
    (``requests``)."""
    from userfaultfd.stores import ChunkedStore

    pages = size // PAGE
    rows = []
    for run, how in ((1, "scattered"), ((1 << 20) // PAGE, "in 1 MiB runs")):
        what = f"5% changed {how}: upload"
        changed = changed_runs(pages, run)
        write_source(root / "changed.bin", size, changed)
        where = root / f"cas-{run}"
        first = pack(root / "data.bin", where / "v1.index", chunk_size=chunk, layout="chunks")
        started = time.perf_counter()
        second = pack(root / "changed.bin", where / "v2.index", chunk_size=chunk, layout="chunks")
        seconds = time.perf_counter() - started
        share = 100 * second.unique_bytes / first.unique_bytes
        index = (where / "v2.index").stat().st_size
        note = (f"{len(changed):,} pages changed; the first pack uploaded "
                f"{format_bytes(first.unique_bytes)}; index {format_bytes(index)}")  # fmt: skip
        rows.append(Row(what, "chunks", None, seconds, "%", share, second.unique_bytes, None,
                        touched=size, note=note))  # fmt: skip
        rows.append(Row(f"5% changed {how}: index", "chunks", None, None, "kB", index / 1e3,
                        index, None, note="fetched whole at open"))  # fmt: skip
        picked = sample(pages, RANDOM_FRACTION, RANDOM_SEED)
        negated = set(changed.tolist())
        buffer = bytearray(PAGE)
        with ChunkedStore(where / "v2.index") as store:
            started = time.perf_counter()
            for page in picked.tolist():
                store.read_into(page * PAGE, memoryview(buffer))
                values = np.frombuffer(buffer, dtype=np.int64)
                want = expected(page * PER_PAGE, (page + 1) * PER_PAGE)
                if not np.array_equal(values, -want if page in negated else want):
                    raise RuntimeError(f"5% changed {how}: page {page} holds wrong values")
            seconds = time.perf_counter() - started
            moved = getattr(store, "fetched_bytes", None)  # detected: older stores lack it
            rows.append(Row(f"5% changed {how}: random 1%", "chunks", None, seconds, "pages/s",
                            len(picked) / seconds, moved, None, requests=store.fetches,
                            touched=len(picked) * PAGE, note="local"))  # fmt: skip
    return rows


def changed_only(size: int, chunk: int, directory: str) -> list[Row]:
    """The 5%-changed rows alone (``--only changed``): no namespaces, no server, no root."""
    with tempfile.TemporaryDirectory(prefix="uffd-changed-", dir=directory) as tmp:
        write_source(Path(tmp) / "data.bin", size)
        return changed_pack_rows(Path(tmp), size, chunk)


# --- main ---------------------------------------------------------------------------------------


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    suffix = text[-1] if text and text[-1] in units else ""
    try:
        return int(text.removesuffix(suffix)) * units[suffix]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M or 256M)") from None


def _parse_rtts(text: str) -> list[float]:
    try:
        rtts = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of milliseconds: {text!r}") from None
    if not rtts or any(r < 0 for r in rtts):
        raise argparse.ArgumentTypeError(f"RTTs must be >= 0 ms: {text!r}")
    return rtts


@contextlib.contextmanager
def _terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so every namespace and process is cleaned up."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def measure(size: int, rtts: list[float], chunk: int, deadline: float, directory: str,
            header: Callable[[str, PackInfo], None], repeat: int = 3) -> list[Row]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="uffd-remote-", dir=directory) as tmp, \
            _netns.pair() as hosts:  # fmt: skip
        root = Path(tmp) / "root"
        root.mkdir()
        write_source(root / "data.bin", size)
        info = pack(root / "data.bin", root / "data.pack", chunk_size=chunk)
        # Killed with the namespace at the end (it is started there).
        nginx = _servers.Nginx(root, Path(tmp) / "nginx", port=NGINX_PORT, ns=hosts.server)
        link = Link(hosts)
        header(link.how, info)
        bench = Bench(hosts, link, Path(tmp), size, deadline, nginx.access_log, repeat)
        try:
            for rtt in rtts:
                link.set_rtt(rtt)
                for layout in ("raw", "pack"):
                    bench.layout_rows(layout)
        finally:
            link.stop()
        bench.rows += changed_pack_rows(root, size, chunk)
        return bench.rows


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":  # one row, in the client namespace
        client_main(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=_parse_size, default=256 << 20, help="e.g. 64M, 256M")
    parser.add_argument("--rtt", type=_parse_rtts, default=[0.0, 2.0, 10.0],
                        help="round-trip times in ms, e.g. 0,2,10 (the default)")  # fmt: skip
    default_chunk = inspect.signature(pack).parameters["chunk_size"].default
    parser.add_argument("--chunk", type=_parse_size, default=default_chunk,
                        help=f"pack chunk size (default {default_chunk >> 10}K)")  # fmt: skip
    parser.add_argument("--deadline", type=float, default=600, help="seconds per row")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each short row (eager, sequential, first byte): the fastest "
                        "counts (default 3)")  # fmt: skip
    parser.add_argument("--dir", default="/var/tmp", help="where the source and packs go")
    parser.add_argument("--only", choices=["changed"],
                        help="changed: the 5%%-changed pack rows alone (no network)")  # fmt: skip
    from _plots import add_options  # benchmarks/_plots.py: the figure of the table

    add_options(parser)
    args = parser.parse_args()
    size: int = args.size
    if size <= 0 or size % PAGE:
        parser.error(f"--size must be a positive multiple of {PAGE}, got {size}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    started = time.monotonic()
    uname = os.uname()
    lines: list[str] = []

    def header(how: str, info: PackInfo) -> None:
        rtts = "/".join(f"{r:g}" for r in args.rtt)
        lines.append(
            f"# remote lazy memory: {size >> 20} MiB of int64, RTT {rtts} ms ({how}); "
            f"Linux {uname.release} {uname.machine}, {os.cpu_count()} CPUs; "
            f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
        )
        lines.append(
            f"# pack: {info.chunk_size >> 10} KiB chunks, {info.packed_size / 1e6:.1f} MB "
            f'({info.ratio:.1f}x); the 5%-changed packs: layout="chunks"'
        )
        print("\n".join(lines), file=sys.stderr, flush=True)

    if args.only == "changed":
        lines.append(f"# 5% changed: {size >> 20} MiB of int64, {args.chunk >> 10} KiB chunks, "
                     'layout="chunks"')  # fmt: skip
        rows = changed_only(size, args.chunk, args.dir)
    else:
        with _terminated_as_interrupt():
            rows = measure(size, args.rtt, args.chunk, args.deadline, args.dir, header,
                           args.repeat)  # fmt: skip
    rtt = 10.0 if 10.0 in args.rtt else max(args.rtt)
    print("\n".join(lines))
    print(table(rows))
    print(f"\n# targets at RTT {rtt:g} ms (issue 12), from the rows above")
    print("\n".join(targets(rows, rtt)))
    print(f"# {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    from _plots import main_with_figure

    main_with_figure(main, "remote")
