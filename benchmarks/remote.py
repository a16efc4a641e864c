"""Lazy memory served from a remote store over a link with latency (issue 12), in one run.

    python3 benchmarks/remote.py [--size 256M] [--rtt 0,2,10] [--chunk 256K] [--deadline 600]

Two network namespaces joined by a veth pair (tests/reliability/_netns.py): nginx in the server
one, the measured program in the client one. The link is delayed by RTT/2 each way: with tc
netem where the kernel has it (on both veth ends), else by a userspace proxy in the server
namespace (benchmarks/_delay_proxy.py) that stamps every chunk with its arrival time and sends it
RTT/2 later, in order, so the delay is a latency and not a throughput cap. Either way the client
talks to that proxy, which counts the bytes crossing the link in both directions.

The source is ``--size`` bytes of int64 values, the value at index i being i + 1 (position
dependent, never zero), served raw and as a pack (``userfaultfd.stores.pack``, ``--chunk``
chunks, pack()'s default unless told). Rows, each a fresh client process (its handler a process
of its own) with a deadline:
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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.reliability import _netns  # noqa: E402 - the namespaces the network tests use
from tests.stores import _servers  # noqa: E402 - where nginx is
from userfaultfd import memory  # noqa: E402
from userfaultfd.runtime import lazy, serve, server_of  # noqa: E402
from userfaultfd.stores import BytesStore, PackInfo, ZstdStore, pack  # noqa: E402

PAGE = memory.page_size()
PER_PAGE = PAGE // 8  # int64 values per page
NGINX_PORT = 8081  # inside the server namespace, on its loopback
LINK_PORT = 8080  # the proxy, on the server's veth address: what the client connects to
RANDOM_FRACTION, RANDOM_SEED = 0.01, 1
WORKING_FRACTION, WORKING_SEED = 0.02, 2
CHANGED_FRACTION, CHANGED_SEED = 0.05, 3
_BLOCK = 1 << 22  # values compared (or written) at a time

# --- the expected values, shared by the writer and every client ----------------------------------


def expected(start: int, stop: int) -> Any:
    """Values [start, stop) of the source: index i holds i + 1."""
    return np.arange(start + 1, stop + 1, dtype=np.int64)


def first_bad_page(array: Any, pages: Any = None) -> int | None:
    """The first page of ``array`` (of ``pages``, or of all) not holding the expected values."""
    if pages is None:
        for start in range(0, array.size, _BLOCK):
            block = array[start : start + _BLOCK]
            bad = np.flatnonzero(block != expected(start, start + block.size))
            if bad.size:
                return (start + int(bad[0])) // PER_PAGE
        return None
    index = (np.sort(np.asarray(pages, dtype=np.int64))[:, None] * PER_PAGE
             + np.arange(PER_PAGE, dtype=np.int64)).ravel()  # fmt: skip
    index = index[index < array.size]
    bad = np.flatnonzero(array[index] != index + 1)
    return int(index[bad[0]]) // PER_PAGE if bad.size else None


def sample(pages: int, fraction: float, seed: int) -> Any:
    """A seeded ``fraction`` of ``pages`` page numbers, distinct, in a random order."""
    count = max(1, int(pages * fraction))
    return np.random.default_rng(seed).choice(pages, size=count, replace=False).astype(np.int64)


# --- the measured program: one row, run in a fresh process in the client namespace ----------------


def _eager(spec: dict[str, Any]) -> dict[str, Any]:
    import http.client

    size: int = spec["size"]
    started = time.perf_counter()
    conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=spec["deadline"])
    conn.request("GET", spec["path"])
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"GET {spec['path']}: HTTP {response.status}")
    length = int(response.getheader("Content-Length") or 0)
    body = bytearray(length)
    view = memoryview(body)
    got = 0
    while got < length:
        n = response.readinto(view[got:])
        if not n:
            raise RuntimeError(f"GET {spec['path']}: {got} of {length} bytes, then EOF")
        got += n
    conn.close()
    if spec["layout"] == "pack":  # what eager means for a pack: download, then decompress
        out = bytearray(size)
        ZstdStore(BytesStore(body), cache_chunks=1).read_into(0, memoryview(out))
        body = out
    seconds = time.perf_counter() - started
    array = np.frombuffer(body, dtype=np.int64)
    if array.size != size // 8:
        raise RuntimeError(f"GET {spec['path']}: {len(body)} bytes, expected {size}")
    return {"seconds": seconds, "faults": 0, "bad": first_bad_page(array), "touched": size}


def _lazy_options(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("record", "prefetch") if spec.get(k)}


def _stats(array: Any) -> int:
    return int(server_of(array).stats().faults)


def _sequential(spec: dict[str, Any]) -> dict[str, Any]:
    array = lazy(spec["url"], dtype=np.int64)
    started = time.perf_counter()
    int(array[::PER_PAGE].sum())  # one element a page, in order: native code
    seconds = time.perf_counter() - started
    faults = _stats(array)
    return {"seconds": seconds, "faults": faults, "bad": first_bad_page(array),
            "touched": spec["size"]}  # fmt: skip


def _random(spec: dict[str, Any]) -> dict[str, Any]:
    pages = sample(spec["size"] // PAGE, RANDOM_FRACTION, RANDOM_SEED)
    threads: int = spec["threads"]
    array = lazy(spec["url"], dtype=np.int64)
    base = array.ctypes.data
    parts = [pages[i::threads].tolist() for i in range(threads)]  # distinct pages each
    gate = threading.Barrier(threads + 1)
    sinks = [ctypes.create_string_buffer(8) for _ in range(threads)]

    def touch(part: list[int], sink: Any) -> None:
        gate.wait()
        for page in part:  # memmove releases the GIL while it faults
            ctypes.memmove(sink, base + page * PAGE, 8)

    pairs = zip(parts, sinks, strict=True)
    workers = [threading.Thread(target=touch, args=pair) for pair in pairs]
    for worker in workers:
        worker.start()
    gate.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    faults = _stats(array)
    return {"seconds": seconds, "faults": faults, "bad": first_bad_page(array, pages),
            "touched": len(pages) * PAGE}  # fmt: skip


def _working_set(spec: dict[str, Any]) -> dict[str, Any]:
    pages = sample(spec["size"] // PAGE, WORKING_FRACTION, WORKING_SEED)
    index = pages * PER_PAGE
    started = time.perf_counter()
    array = lazy(spec["url"], dtype=np.int64, **_lazy_options(spec))
    int(array[index].sum())  # the pages in the fixed order, one fault each at most
    seconds = time.perf_counter() - started
    faults = _stats(array)
    bad = first_bad_page(array, pages)
    if spec.get("record"):  # the recording is complete once the handler has let go
        del array
    return {"seconds": seconds, "faults": faults, "bad": bad, "touched": len(pages) * PAGE}


def _first_byte(spec: dict[str, Any]) -> dict[str, Any]:
    # Imported before the clock starts, as client_main imports fsspec: the stores import it only
    # when a URL is opened, and module imports are not the first byte's round trips.
    import userfaultfd.stores._fsspec  # noqa: F401

    started = time.perf_counter()
    array = lazy(spec["url"], dtype=np.int64)
    value = int(array[0])
    seconds = time.perf_counter() - started
    faults = _stats(array)
    bad = first_bad_page(array, [0]) if value == 1 else 0
    return {"seconds": seconds, "faults": faults, "bad": bad, "touched": 8}


_KINDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "eager": _eager,
    "sequential": _sequential,
    "random": _random,
    "working": _working_set,
    "first": _first_byte,
}


def client_main(spec: dict[str, Any]) -> None:
    signal.alarm(int(spec["deadline"]))  # stuck for good: SIGALRM ends it, never a hang
    import fsspec.implementations.http  # noqa: F401 - imported before any timing starts

    result = _KINDS[spec["kind"]](spec)
    print("result", json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # the lazy arrays' handlers see this process go and exit by themselves


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


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    what: str
    layout: str  # "raw", "pack" or "" (not over the link)
    rtt_ms: float | None
    seconds: float | None  # None: not measured (the reason is in ``note``)
    unit: str  # "MB/s", "pages/s", "ms" or "%"
    value: float | None
    moved: int | None
    faults: int | None
    requests: int | None = None  # HTTP requests nginx answered (its access log)
    touched: int = 0  # bytes the program read (for moved / touched)
    note: str = ""


@dataclasses.dataclass(slots=True)
class Bench:
    hosts: _netns.Pair
    link: Link
    root: Path
    size: int
    deadline: float
    access_log: Path
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

    def layout_rows(self, layout: str, replay: bool) -> None:
        mb = self.size / 1e6
        result, moved = self.run("eager", layout)
        self.add("eager GET", layout, "MB/s", result, moved, mb / result["seconds"])
        result, moved = self.run("sequential", layout)
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
        if replay:
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
        else:
            for what in ("working set 2%, recording", "working set 2%, replay"):
                self.skip(what, layout, "pages/s", "n/a (not implemented)")
        result, moved = self.run("first", layout)
        self.add("first byte", layout, "ms", result, moved, result["seconds"] * 1000)


# --- capabilities other engineers are adding: detected, never assumed -----------------------------


def replay_supported() -> bool:
    """Whether lazy() (or serve(), which gets lazy's extra options) takes record= and prefetch=."""
    for fn in (lazy, serve):
        names = inspect.signature(fn).parameters
        if "record" in names and "prefetch" in names:
            return True
    return False


def unique_bytes_api() -> dict[str, Any] | None:
    """pack() options for its content-addressed layout, or None when pack() has none (or no
    ``PackInfo.unique_bytes`` to say what a pack added)."""
    if "unique_bytes" not in {f.name for f in dataclasses.fields(PackInfo)}:
        return None
    layout = inspect.signature(pack).parameters.get("layout")
    if layout is None:
        return None
    hint = typing.get_type_hints(pack).get("layout")
    others = [v for v in typing.get_args(hint) if isinstance(v, str) and v != layout.default]
    doc = inspect.getdoc(pack) or ""
    named = [v for v in others if f'layout="{v}"``: content-addressed' in doc]
    chosen = named or (others if len(others) == 1 else [])
    return {"layout": chosen[0]} if chosen else None


# --- the source ---------------------------------------------------------------------------------


def write_source(path: Path, size: int, changed: Any = None) -> None:
    """``size`` bytes of the expected values; the pages in ``changed`` negated."""
    count = size // 8
    with path.open("wb") as f:
        for start in range(0, count, _BLOCK):
            block = expected(start, min(count, start + _BLOCK))
            if changed is not None:
                first, last = start // PER_PAGE, (start + block.size - 1) // PER_PAGE
                for page in changed[(changed >= first) & (changed <= last)]:
                    lo = int(page) * PER_PAGE - start
                    block[lo : lo + PER_PAGE] *= -1
            block.tofile(f)


def changed_runs(pages: int, run: int) -> Any:
    """A seeded ``CHANGED_FRACTION`` of ``pages`` in runs of ``run`` pages (1: scattered)."""
    runs = sample(max(1, pages // run), CHANGED_FRACTION, CHANGED_SEED)
    shift = run // 2 if run > 1 else 0  # runs not aligned to chunks
    changed = (runs[:, None] * run + shift + np.arange(run)).ravel()
    return np.unique(changed[changed < pages])


def changed_pack_rows(root: Path, size: int, chunk: int) -> list[Row]:
    """A content-addressed pack of the data, then one of the data with 5% of its pages changed
    (scattered, and in runs of 1 MiB): the bytes the second one uploaded, against the first; then
    a seeded 1% of the second's pages read one at a time through a ChunkedStore over the local
    directory, every page checked: pages/s, and the bytes it fetched (``moved``) and asked for
    (``requests``)."""
    from userfaultfd.stores import ChunkedStore

    options = unique_bytes_api()
    pages = size // PAGE
    rows = []
    for run, how in ((1, "scattered"), ((1 << 20) // PAGE, "in 1 MiB runs")):
        what = f"5% changed {how}: upload"
        if options is None:
            rows.append(Row(what, "chunks", None, None, "%", None, None, None,
                            note="n/a (pack() has no content-addressed layout)"))  # fmt: skip
            continue
        changed = changed_runs(pages, run)
        write_source(root / "changed.bin", size, changed)
        where = root / f"cas-{run}"
        first = pack(root / "data.bin", where / "v1.index", chunk_size=chunk, **options)
        started = time.perf_counter()
        second = pack(root / "changed.bin", where / "v2.index", chunk_size=chunk, **options)
        seconds = time.perf_counter() - started
        share = 100 * second.unique_bytes / first.unique_bytes
        index = (where / "v2.index").stat().st_size
        note = (f"{len(changed):,} pages changed; the first pack uploaded "
                f"{_bytes(first.unique_bytes)}; index {_bytes(index)}")  # fmt: skip
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


# --- the table and the targets ------------------------------------------------------------------


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _eager_of(rows: list[Row], row: Row) -> Row | None:
    return next((r for r in rows if r.what == "eager GET" and r.layout == "raw"
                 and r.rtt_ms == row.rtt_ms and r.seconds), None)  # fmt: skip


def format_row(row: Row, rows: list[Row] | None = None) -> str:
    what = f"{row.what} ({row.layout})" if row.layout else row.what
    rtt = "-" if row.rtt_ms is None else f"{row.rtt_ms:g} ms"
    if row.value is None:
        return f"{what:40} {rtt:>6}  {row.note}"
    value = f"{row.value:,.1f} {row.unit}"
    if row.unit == "ms" and row.rtt_ms:
        value += f" = {row.value / row.rtt_ms:.1f} RTT"
    eager = _eager_of(rows, row) if rows else None
    ratio = f"{eager.seconds / row.seconds:.2f}x" if eager and eager.seconds and row.seconds else ""
    faults = "-" if row.faults is None else f"{row.faults:,}"
    requests = "-" if row.requests is None else f"{row.requests:,}"
    seconds = "-" if row.seconds is None else f"{row.seconds:.3f}"
    return (f"{what:40} {rtt:>6} {value:>24} {ratio:>8} {_bytes(row.moved):>9} {faults:>8} "
            f"{requests:>8} {seconds:>8}")  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = [f"{'what':40} {'RTT':>6} {'MB/s, pages/s, ms':>24} {'x eager':>8} {'moved':>9} "
             f"{'faults':>8} {'requests':>8} {'time s':>8}"]  # fmt: skip
    lines += [format_row(row, rows) for row in rows]
    return "\n".join(lines)


def targets(rows: list[Row], rtt: float) -> list[str]:
    """The issue's targets at ``rtt``, each PASS or FAIL from the rows (n/a where unmeasured)."""

    def find(what: str, layout: str = "raw") -> Row | None:
        for r in rows:
            if r.what == what and r.layout == layout and r.rtt_ms in (rtt, None) and r.value:
                return r
        return None

    out: list[str] = []

    def verdict(name: str, ok: bool | None, measured: str) -> None:
        word = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        out.append(f"{word}  {name:66} {measured}")

    eager, seq = find("eager GET"), find("lazy sequential")
    if eager and seq and eager.seconds and seq.seconds:
        ratio = eager.seconds / seq.seconds
        verdict("lazy sequential >= 0.9x eager", ratio >= 0.9, f"{ratio:.2f}x")
    else:
        verdict("lazy sequential >= 0.9x eager", None, "not measured")
    one, four = find("random 1%, 1 thread"), find("random 1%, 4 threads")
    if one and four and one.value and four.value:
        ratio = four.value / one.value
        verdict("random 1%: 4 threads >= 3x one thread", ratio >= 3, f"{ratio:.2f}x")
    else:
        verdict("random 1%: 4 threads >= 3x one thread", None, "not measured")
    demand, replay = find("working set 2%, on demand"), find("working set 2%, replay")
    if demand and replay and demand.seconds and replay.seconds and demand.faults:
        speed = demand.seconds / replay.seconds
        fewer = 1 - (replay.faults or 0) / demand.faults
        measured = f"{speed:.2f}x faster, {fewer:.0%} fewer faults"
        verdict("replay >= 3x faster than on demand, >= 90% fewer faults",
                speed >= 3 and fewer >= 0.9, measured)  # fmt: skip
    else:
        verdict("replay >= 3x faster than on demand, >= 90% fewer faults", None,
                "n/a (record/prefetch not implemented)")  # fmt: skip
    first = find("first byte")
    if first and first.value is not None and rtt:
        rtts = first.value / rtt
        measured = f"{first.value:.1f} ms = {rtts:.1f} RTT"
        local = next((r for r in rows if r.what == "first byte" and r.layout == "raw"
                      and r.rtt_ms == 0 and r.value), None)  # fmt: skip
        if local and local.value:
            measured += f" ({(first.value - local.value) / rtt:.1f} RTT more than at 0 ms)"
        verdict("first byte within 3 RTTs", rtts <= 3, measured)
    else:
        verdict("first byte within 3 RTTs", None, "no RTT to count in" if first else "-")
    raw_random, pack_random = find("random 1%, 1 thread"), find("random 1%, 1 thread", "pack")
    if raw_random and pack_random and raw_random.value and pack_random.value and pack_random.moved:
        speed = pack_random.value / raw_random.value
        over = pack_random.moved / pack_random.touched
        measured = f"{speed:.2f}x raw, {over:.1f}x the bytes touched"
        verdict("pack random 1% >= raw's pages/s, moving <= 10x the bytes touched",
                speed >= 1 and over <= 10, measured)  # fmt: skip
    else:
        verdict("pack random 1% >= raw's pages/s, moving <= 10x the bytes touched", None, "-")
    for how in ("scattered", "in 1 MiB runs"):
        name = f"5%-changed pack uploads <= 10% ({how})"
        changed = find(f"5% changed {how}: upload", "chunks")
        if changed and changed.value is not None:
            verdict(name, changed.value <= 10, f"{changed.value:.1f}% of the first upload")
        else:
            verdict(name, None, "n/a (pack() has no content-addressed layout)")
    name = "5%-changed pack random 1% moves <= 10x the bytes touched"
    changed = find("5% changed scattered: random 1%", "chunks")
    if changed and changed.moved and changed.touched:
        over = changed.moved / changed.touched
        verdict(name, over <= 10, f"{over:.1f}x ({changed.moved // (changed.touched // PAGE):,} "
                f"B a page, {changed.requests} requests)")  # fmt: skip
    else:
        verdict(name, None, "n/a (not measured)")
    return out


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
            header: Callable[[str, PackInfo], None]) -> list[Row]:  # fmt: skip
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
        bench = Bench(hosts, link, Path(tmp), size, deadline, nginx.access_log)
        replay = replay_supported()
        try:
            for rtt in rtts:
                link.set_rtt(rtt)
                for layout in ("raw", "pack"):
                    bench.layout_rows(layout, replay)
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
    parser.add_argument("--dir", default="/var/tmp", help="where the source and packs go")
    parser.add_argument("--only", choices=["changed"],
                        help="changed: the 5%%-changed pack rows alone (no network)")  # fmt: skip
    args = parser.parse_args()
    size: int = args.size
    if size <= 0 or size % PAGE:
        parser.error(f"--size must be a positive multiple of {PAGE}, got {size}")
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
            f"({info.ratio:.1f}x); record/prefetch: "
            f"{'yes' if replay_supported() else 'not implemented'}; "
            f"content-addressed packs: {unique_bytes_api() or 'not implemented'}"
        )
        print("\n".join(lines), file=sys.stderr, flush=True)

    if args.only == "changed":
        api = unique_bytes_api() or "not implemented"
        lines.append(f"# 5% changed: {size >> 20} MiB of int64, {args.chunk >> 10} KiB chunks; "
                     f"content-addressed packs: {api}")  # fmt: skip
        rows = changed_only(size, args.chunk, args.dir)
    else:
        with _terminated_as_interrupt():
            rows = measure(size, args.rtt, args.chunk, args.deadline, args.dir, header)
    rtt = 10.0 if 10.0 in args.rtt else max(args.rtt)
    print("\n".join(lines))
    print(table(rows))
    print(f"\n# targets at RTT {rtt:g} ms (issue 12), from the rows above")
    print("\n".join(targets(rows, rtt)))
    print(f"# {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
