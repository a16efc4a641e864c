"""The remote rows of benchmarks/tensors.py (``--remote``): a synthetic model over HTTP (nginx)
and S3 (moto's server) at each RTT, through the userspace delay proxy, in one run.

The bench is remote.py's: two network namespaces joined by a veth pair (tests/reliability/
_netns.py); nginx and moto in the server one, each behind a delay proxy (benchmarks/
_delay_proxy.py: every chunk sent RTT/2 after it arrived, each way; it counts the bytes it
forwards, headers included: ``moved``); the measured program in the client one, a fresh process
per row (``python3 benchmarks/_tensors_remote.py --measure SPEC``), with a deadline.

Rows, at each RTT, for each server (times from the first call to the last byte in memory):
  one GET            one plain GET of the whole file into memory
  8 x 8 MiB ranges   the Run:ai streamer's defaults for object stores: 8 connections, each
                     taking the next 8 MiB range, into one buffer (http.client; boto3 for S3)
  prefetch all       lazy_tensors(source, prefetch="all"), then one byte of every page of every
                     tensor read, in file order (the tensors used in place)
  10% by name        lazy_tensors(source, include=NAMES) for every tenth tensor in file order,
                     each read the same way: the bytes moved against the selected tensors' bytes
                     plus the header, and the time against the fastest full download
  first tensor       lazy_tensors(source), then the first tensor in file order copied out; and a
                     small one (the last norm): in round trips, against 3 RTT + its own transfer
                     (its bytes at the one-GET row's speed)
Every tensor a row read is checked (a SHA-256 of their bytes in file order) after the clock
stops; a wrong one fails the run. The long rows run once, the short ones (first tensor) ``repeat``
times, the fastest counting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from _source import warm  # noqa: E402

from tests.reliability import _netns  # noqa: E402 - the namespaces the network tests use
from tests.stores import _servers  # noqa: E402 - where nginx is

NGINX_PORT, MOTO_PORT = 8081, 8083  # inside the server namespace, on its loopback
HTTP_LINK, S3_LINK = 8080, 8082  # the proxies, on the server's veth address
BUCKET, KEY = "bench", "model.safetensors"
#: Run:ai Model Streamer's defaults for object stores.
STREAMS, RANGE = 8, 8 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
#: moto's dummy credentials: nothing may read real ones or reach AWS.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


# --- the measured program (in the client namespace) ---------------------------------------------


def _s3_client(spec: dict[str, Any]) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    return boto3.client("s3", endpoint_url=spec["endpoint"], region_name="eu-west-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(max_pool_connections=STREAMS * 2))  # fmt: skip


def _get_range(spec: dict[str, Any], view: memoryview, first: int, conn: Any) -> None:
    """Bytes [first, first + len(view)) into ``view`` (the whole file when first is -1)."""
    if spec["server"] == "s3":
        asked = {} if first < 0 else {"Range": f"bytes={first}-{first + len(view) - 1}"}
        body = conn.get_object(Bucket=BUCKET, Key=KEY, **asked)["Body"]
        got = 0
        while got < len(view):
            chunk = body.read(min(1 << 20, len(view) - got))
            if not chunk:
                raise RuntimeError(f"S3 GET at {first}: {got} of {len(view)} bytes, then EOF")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        return
    headers = {} if first < 0 else {"Range": f"bytes={first}-{first + len(view) - 1}"}
    conn.request("GET", f"/{KEY}", headers=headers)
    response = conn.getresponse()
    if response.status != (200 if first < 0 else 206):
        raise RuntimeError(f"GET at {first}: HTTP {response.status}")
    got = 0
    while got < len(view):
        n = response.readinto(view[got:])
        if not n:
            raise RuntimeError(f"GET at {first}: {got} of {len(view)} bytes, then EOF")
        got += n


def _connection(spec: dict[str, Any]) -> Any:
    if spec["server"] == "s3":
        return _s3_client(spec)
    return http.client.HTTPConnection(spec["host"], spec["port"], timeout=spec["deadline"])


def _download(spec: dict[str, Any]) -> dict[str, Any]:
    """One GET, or ``STREAMS`` connections each taking the next ``RANGE`` bytes."""
    size: int = spec["file_size"]
    started = time.perf_counter()
    body = bytearray(size)
    view = memoryview(body)
    if spec["kind"] == "get":
        _get_range(spec, view, -1, _connection(spec))
    else:
        client = _s3_client(spec) if spec["server"] == "s3" else None  # thread-safe, pooled
        starts = iter(range(0, size, RANGE))
        lock = threading.Lock()
        failed: list[BaseException] = []

        def stream() -> None:
            conn = client if client is not None else _connection(spec)
            try:
                while True:
                    with lock:
                        first = next(starts, None)
                    if first is None or failed:
                        return
                    _get_range(spec, view[first : first + RANGE], first, conn)
            except BaseException as err:
                failed.append(err)

        threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failed:
            raise failed[0]
    seconds = time.perf_counter() - started
    low, high = spec["data"]
    return {"seconds": seconds, "digest": hashlib.sha256(view[low:high]).hexdigest()}


def _source(spec: dict[str, Any]) -> Any:
    if spec["server"] == "s3":
        from userfaultfd.stores import FsspecStore

        return FsspecStore(f"s3://{BUCKET}/{KEY}", key="testing", secret="testing",
                           client_kwargs={"endpoint_url": spec["endpoint"],
                                          "region_name": "eu-west-1"})  # fmt: skip
    return spec["url"]


def _digest(tensors: Any, names: list[str]) -> str:
    import numpy as np

    h = hashlib.sha256()
    for name in names:
        h.update(np.ascontiguousarray(tensors[name]).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def _lazy(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from userfaultfd.runtime import lazy_tensors, server_of

    kind = spec["kind"]
    options: dict[str, Any] = {}
    if kind == "all":
        options["prefetch"] = "all"
    elif kind == "some":
        options["include"] = spec["names"]
    started = time.perf_counter()
    tensors = lazy_tensors(_source(spec), **options)
    names = spec["names"] if kind in ("some", "first", "small") else list(tensors)
    for name in names:
        flat = tensors[name].reshape(-1).view(np.uint8)
        if kind in ("first", "small"):
            np.array(flat)  # copied out, every byte
        else:
            int(flat[::PAGE].sum())  # one byte a page: used in place
    seconds = time.perf_counter() - started
    stats = server_of(tensors[names[0]]).stats()
    return {"seconds": seconds, "digest": _digest(tensors, names), "faults": stats.faults,
            "filled": stats.bytes, "prefetched": stats.prefetched}  # fmt: skip


def client_main(spec: dict[str, Any]) -> None:
    signal.alarm(int(spec["deadline"]))  # a row that hangs ends here, not in the parent's wait
    # Imported before any clock starts, as a program that uses bf16 and S3 has them: importing
    # ml_dtypes takes 0.6 s here, once a process (its extension module's loading).
    import ml_dtypes  # noqa: F401
    import s3fs  # type: ignore[import-untyped]  # noqa: F401

    import userfaultfd.runtime  # noqa: F401

    result = _download(spec) if spec["kind"] in ("get", "ranges") else _lazy(spec)
    print("result " + json.dumps(result), flush=True)
    os._exit(0)  # the handler process is ours: it ends when this program does


# --- the bench (root namespace) ----------------------------------------------------------------


class Proxy:
    """A delay proxy in the server namespace from ``listen`` to 127.0.0.1:``to``."""

    def __init__(self, hosts: _netns.Pair, listen: int, to: int) -> None:
        self.hosts, self.listen, self.to = hosts, listen, to
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, rtt_ms: float) -> None:
        self.stop()
        argv = [sys.executable, str(HERE / "_delay_proxy.py"),
                "--listen", f"{self.hosts.server.address}:{self.listen}",
                "--to", f"127.0.0.1:{self.to}", "--delay", repr(rtt_ms / 2000)]  # fmt: skip
        self.proc = self.hosts.server.popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the delay proxy did not start")
        _wait_listening(self.proc, self.listen, "the delay proxy")

    def moved(self) -> int:
        """Bytes forwarded so far, both directions."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(b"count\n")
        self.proc.stdin.flush()
        _, up, down, _ = self.proc.stdout.readline().split()
        return int(up) + int(down)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.stdin:
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while not _netns.listening(proc.pid, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start listening on {port}")
        time.sleep(0.05)


@dataclasses.dataclass(frozen=True, slots=True)
class Model:
    """The served file: its path, size, where its data lies, its tensors in file order
    (name, start, end), and the expected digest of any list of tensors."""

    path: Path
    size: int
    data: tuple[int, int]
    tensors: list[tuple[str, int, int]]
    header: int  # 8 + the header's length: what must be read before any tensor

    def digest(self, names: list[str]) -> str:
        where = {n: (a, b) for n, a, b in self.tensors}
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for name in names:
                a, b = where[name]
                f.seek(a)
                h.update(f.read(b - a))
        return h.hexdigest()


def read_model(path: Path) -> Model:
    from userfaultfd.runtime import lazy_tensors

    infos = lazy_tensors(str(path)).infos  # the header alone
    tensors = sorted(((n, t.start, t.end) for n, t in infos.items()), key=lambda t: t[1])
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    return Model(path, path.stat().st_size, (tensors[0][1], tensors[-1][2]), tensors, header)


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    server: str
    rtt_ms: float
    row: str
    seconds: float
    moved: int
    nbytes: int  # the tensor bytes the row asked for (the file's data for a full read)
    extra: dict[str, Any]


class Bench:
    def __init__(self, hosts: _netns.Pair, models: dict[str, Model], deadline: float) -> None:
        self.hosts, self.models, self.deadline = hosts, models, deadline
        self.proxies = {"http": Proxy(hosts, HTTP_LINK, NGINX_PORT),
                        "s3": Proxy(hosts, S3_LINK, MOTO_PORT)}  # fmt: skip
        self.rtt_ms = 0.0
        self.results: list[Result] = []

    def set_rtt(self, rtt_ms: float) -> None:
        for proxy in self.proxies.values():
            proxy.start(rtt_ms)
        self.rtt_ms = rtt_ms

    def run(
        self, server: str, kind: str, names: list[str] | None = None
    ) -> tuple[dict[str, Any], int]:
        host = self.hosts.server.address
        link = HTTP_LINK if server == "http" else S3_LINK
        spec = {"server": server, "kind": kind, "host": host, "port": link,
                "url": f"http://{host}:{link}/{KEY}", "endpoint": f"http://{host}:{link}",
                "file_size": self.models[server].size, "data": list(self.models[server].data),
                "names": names or [], "deadline": self.deadline}  # fmt: skip
        model = self.models[server]
        if server == "http":
            warm(str(model.path))  # nginx reads it from the page cache
        env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
        env.update(CREDENTIALS, PYTHONPATH=str(ROOT))
        proxy = self.proxies[server]
        before = proxy.moved()
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
                f"{server} {kind}: no result in {self.deadline + 30:.0f} s"
            ) from None
        lines = [x for x in out.decode().splitlines() if x.startswith("result ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{server} {kind}: exit {proc.returncode}: {err.decode()[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1].removeprefix("result "))
        want = model.digest(names or [n for n, _, _ in model.tensors])
        if result["digest"] != want:
            got = result["digest"][:12]
            raise RuntimeError(f"{server} {kind} at RTT {self.rtt_ms:g} ms: wrong bytes"
                               f" (digest {got}, expected {want[:12]})")  # fmt: skip
        time.sleep(0.3)  # the handler's last requests are through the proxy by now
        return result, proxy.moved() - before

    def add(self, server: str, row: str, result: dict[str, Any], moved: int, nbytes: int) -> None:
        extra = {k: v for k, v in result.items() if k not in ("seconds", "digest")}
        found = Result(server, self.rtt_ms, row, float(result["seconds"]), moved, nbytes, extra)
        self.results.append(found)
        print(f"  {server} {self.rtt_ms:g} ms {row}: {found.seconds:.3f} s,"
              f" {moved / 1e6:.1f} MB moved", file=sys.stderr, flush=True)  # fmt: skip

    def server_rows(self, server: str, repeat: int) -> None:
        model = self.models[server]
        data = model.data[1] - model.data[0]
        names = [n for n, _, _ in model.tensors]
        for kind, row in (("get", "one GET"), ("ranges", f"{STREAMS} x {RANGE >> 20} MiB ranges"),
                          ("all", 'prefetch="all"')):  # fmt: skip
            result, moved = self.run(server, kind)
            self.add(server, row, result, moved, data)
        some = names[5::10]
        chosen = sum(b - a for n, a, b in model.tensors if n in set(some))
        result, moved = self.run(server, "some", some)
        self.add(server, "10% by name", result, moved, chosen)
        for kind, name in (("first", names[0]), ("small", names[-1])):
            runs = [self.run(server, kind, [name]) for _ in range(repeat)]
            result, moved = min(runs, key=lambda run: float(run[0]["seconds"]))
            where = {n: b - a for n, a, b in model.tensors}
            self.add(server, f"first tensor: {name}", result, moved, where[name])


@contextlib.contextmanager
def servers(hosts: _netns.Pair, models: dict[str, Model], scratch: Path) -> Iterator[None]:
    """nginx and moto in the server namespace (killed with it), each serving its model."""
    http = models["http"].path
    _servers.Nginx(http.parent, scratch / "nginx", port=NGINX_PORT, ns=hosts.server)
    env = {**os.environ, **CREDENTIALS}
    log = (scratch / "moto.log").open("wb")
    moto = hosts.server.popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(MOTO_PORT)], stdin=subprocess.DEVNULL, stdout=log,
                              stderr=subprocess.STDOUT, env=env)  # fmt: skip
    _wait_listening(moto, MOTO_PORT, "moto")
    upload = (
        "import boto3, sys\n"
        f"s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{MOTO_PORT}',"
        " region_name='eu-west-1')\n"
        f"s3.create_bucket(Bucket='{BUCKET}', CreateBucketConfiguration="
        "{'LocationConstraint': 'eu-west-1'})\n"
        f"s3.upload_file(sys.argv[1], '{BUCKET}', '{KEY}')\n"
    )
    argv = [sys.executable, "-c", upload, str(models["s3"].path)]
    done = subprocess.run(hosts.server.command(argv), env=env, capture_output=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"uploading to moto: {done.stderr.decode()[-2000:]}")
    try:
        yield
    finally:
        log.close()


def measure(models: dict[str, Model], rtts: list[float], repeat: int,
            deadline: float) -> list[Result]:  # fmt: skip
    """Every row at every RTT; ``models``: the model each server serves ("http", "s3")."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="uffd-tensors-remote-") as tmp, \
            _netns.pair() as hosts, servers(hosts, models, Path(tmp)):  # fmt: skip
        bench = Bench(hosts, models, deadline)
        try:
            for rtt in rtts:
                bench.set_rtt(rtt)
                for server in ("http", "s3"):
                    bench.server_rows(server, repeat)
        finally:
            for proxy in bench.proxies.values():
                proxy.stop()
        return bench.results


def table(results: list[Result], models: dict[str, Model]) -> list[str]:
    """The rows, with each against its server's downloads at the same RTT, and the verdicts."""
    lines = [f"{'server':6} {'RTT':>6} {'row':44} {'time s':>8} {'GB/s':>6} {'vs 8x8MiB':>9}"
             f" {'vs GET':>7} {'moved MB':>9} {'moved/asked':>11} {'RTTs':>7}"]  # fmt: skip
    verdicts = []
    for r in results:
        same = {x.row: x for x in results if x.server == r.server and x.rtt_ms == r.rtt_ms}
        ranges = same[f"{STREAMS} x {RANGE >> 20} MiB ranges"].seconds
        get = same["one GET"]
        header = models[r.server].header
        asked = r.nbytes + (header if not r.row.startswith(("one", f"{STREAMS} x")) else 0)
        first = r.row.startswith("first tensor") and r.rtt_ms
        rtts = f"{r.seconds * 1000 / r.rtt_ms:7.1f}" if first else f"{'-':>7}"
        lines.append(
            f"{r.server:6} {r.rtt_ms:4g} ms {r.row:44} {r.seconds:8.3f} "
            f"{r.nbytes / r.seconds / 1e9:6.2f} {ranges / r.seconds:8.2f}x"
            f" {get.seconds / r.seconds:6.2f}x"
            f" {r.moved / 1e6:9.1f} {r.moved / asked:10.3f}x {rtts}"
        )  # fmt: skip
        if r.row == 'prefetch="all"' and r.rtt_ms == 10:
            ratio = ranges / r.seconds
            verdicts.append(f"{r.server}: prefetch='all' at 10 ms = {ratio:.2f}x the 8-stream"
                            f" download (target >= 0.9x):"
                            f" {'met' if ratio >= 0.9 else 'MISSED'}")  # fmt: skip
        if r.row == "10% by name":
            ratio = r.moved / asked
            verdicts.append(f"{r.server} {r.rtt_ms:g} ms: 10% by name moved {ratio:.3f}x the"
                            f" selected bytes + header (target <= 1.1x):"
                            f" {'met' if ratio <= 1.1 else 'MISSED'}")  # fmt: skip
        if r.row.startswith("first tensor") and r.rtt_ms:
            transfer = r.nbytes / (get.nbytes / get.seconds)
            bound = 3 * r.rtt_ms / 1000 + transfer
            verdicts.append(f"{r.server} {r.rtt_ms:g} ms: {r.row} in {r.seconds * 1000:.1f} ms ="
                            f" {r.seconds * 1000 / r.rtt_ms:.1f} RTT; 3 RTT + its transfer"
                            f" ({transfer * 1000:.1f} ms) = {bound * 1000:.1f} ms:"
                            f" {'met' if r.seconds <= bound else 'MISSED'}")  # fmt: skip
    return [*lines, "", "# targets (issue 23)", *verdicts]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--measure":
    client_main(json.loads(sys.argv[2]))
