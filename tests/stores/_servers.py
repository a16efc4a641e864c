"""Real servers on 127.0.0.1 for the store tests: nginx (HTTP ranges) and moto (S3).

Each is a subprocess on a free port, polled until it accepts connections, and killed on exit
whatever happened; nothing leaves the machine. The one nginx site here also serves the network
tests (TLS, basic auth, inside a namespace) and the remote benchmark.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.reliability import _netns

NGINX = "/usr/sbin/nginx"

# Method, path, status, Range header ("-" when absent) and body bytes: what the tests check.
# keepalive_requests: a lazy mapping's handler keeps one connection for all its range requests.
# /moved.bin redirects to /data.bin (the direct HTTP path leaves redirects to fsspec).
_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format ranges '$request_method $uri $status "$http_range" $body_bytes_sent';
    access_log {prefix}/access.log ranges;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    default_type application/octet-stream;
    server {{
        listen {address}:{port}{ssl};
{extra}        root {root};
        location = /moved.bin {{ return 302 /data.bin; }}
    }}
}}
"""


def settled_log(path: Path, quiet: float = 0.05, timeout: float = 2.0) -> str:
    """The text of a server's request log once it has stopped growing for ``quiet`` seconds: a
    server writes a request's line after it sent the answer, so a client that has its bytes may
    read the log before the line is there."""
    deadline = time.monotonic() + timeout
    text = path.read_text() if path.exists() else ""
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = path.read_text() if path.exists() else ""
        if now == text:
            return now
        text = now
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    """Until 127.0.0.1:port accepts; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"server not listening on {port} after {timeout} s: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


class Nginx:
    """nginx serving ``root`` at :attr:`url`; its access log lines show the Range headers.

    On ``address:port`` (a free port of 127.0.0.1 unless told), in namespace ``ns`` or this
    one; over HTTPS with ``tls`` (certificate, key); behind basic auth with ``htpasswd``.
    ``kill()`` and ``start()`` again: a server that dies and comes back.
    """

    def __init__(
        self, root: Path, prefix: Path, *, address: str = "127.0.0.1", port: int | None = None,
        ns: _netns.Namespace | None = None, tls: tuple[Path, Path] | None = None,
        htpasswd: Path | None = None,
    ) -> None:  # fmt: skip
        self.root = root
        self.prefix = prefix
        self.ns = ns
        self.port = free_port() if port is None else port
        self.url = f"{'https' if tls else 'http'}://{address}:{self.port}"
        self.access_log = prefix / "access.log"
        extra = []
        if tls:
            extra += [f"ssl_certificate {tls[0]};", f"ssl_certificate_key {tls[1]};"]
        if htpasswd:
            extra += ['auth_basic "uffd pages";', f"auth_basic_user_file {htpasswd};"]
        prefix.mkdir(parents=True, exist_ok=True)
        self.conf = prefix / "nginx.conf"
        self.conf.write_text(_NGINX_CONF.format(
            prefix=prefix, address=address, port=self.port, ssl=" ssl" if tls else "",
            extra="".join(f"        {line}\n" for line in extra), root=root,
        ))  # fmt: skip
        self.start()

    def start(self) -> None:
        """Start nginx; returns once it listens (RuntimeError with its log if it does not)."""
        # -e: nginx opens its default error log before reading the config; keep that in prefix.
        argv = [NGINX, "-p", str(self.prefix), "-c", str(self.conf),
                "-e", str(self.prefix / "error.log")]  # fmt: skip
        quiet: dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        self.proc = self.ns.popen(argv, **quiet) if self.ns else subprocess.Popen(argv, **quiet)
        # Read from /proc/PID/net/tcp: it works in the server's namespace too.
        deadline = time.monotonic() + 10
        while not _netns.listening(self.proc.pid, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                _kill(self.proc)
                log = _tail(self.prefix / "error.log")
                raise RuntimeError(f"nginx did not listen on {self.url}: {log}")
            time.sleep(0.02)

    def requests(self, name: str, *, settled: bool = True) -> list[tuple[str, int, str, int]]:
        """(method, status, range header or "-", body bytes) of every request for ``/name``;
        ``settled``: once the log has stopped growing (not for polling while clients run)."""
        rows = []
        log = settled_log(self.access_log) if settled else self.access_log.read_text()
        for line in log.splitlines():
            method, uri, status, rng, sent = line.split(" ")
            if uri == f"/{name}":
                rows.append((method, int(status), rng.strip('"') or "-", int(sent)))
        return rows

    def kill(self) -> None:
        _kill(self.proc)


@contextlib.contextmanager
def nginx(root: Path, prefix: Path) -> Iterator[Nginx]:
    server = Nginx(root, prefix)
    try:
        yield server
    finally:
        server.kill()


@contextlib.contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """moto's S3 in server mode; yields its endpoint URL."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Dummy credentials: nothing may read the real ones or reach AWS.
            env={**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
        )
        try:
            wait_for_port(port, proc, 30, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            _kill(proc)
