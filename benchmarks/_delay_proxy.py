"""A TCP proxy that delays every byte by a fixed time in each direction: a link's latency.

    python3 benchmarks/_delay_proxy.py --listen 10.213.0.1:8080 --to 127.0.0.1:8081 --delay 0.005

For a kernel without sch_netem. Each direction of each connection has a reader thread and a
writer thread: the reader stamps every chunk it receives with ``arrival + delay`` and queues it at
once, the writer sends each chunk when its time comes, in order. So the delay is a latency, not a
throughput cap: chunks in flight overlap (a serial ``sleep(delay)`` per chunk would cap a
connection at one chunk per delay). The queue is bounded (``_QUEUED_MAX`` bytes per direction),
as a link's buffer is, so a slow receiver slows the sender instead of filling memory.

Control on stdin, answers on stdout, one line each: ``count`` -> ``bytes UP DOWN CONNECTIONS``
(bytes forwarded client->server and server->client, connections accepted, since start); EOF ends
the proxy. It prints ``ready`` once it listens.
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import threading
import time

_CHUNK = 256 << 10
_QUEUED_MAX = 64 << 20


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.up = 0
        self.down = 0
        self.connections = 0

    def add(self, upstream: bool, n: int) -> None:
        with self.lock:
            if upstream:
                self.up += n
            else:
                self.down += n


class _Direction:
    """Bytes from ``src`` to ``dst``, each chunk sent ``delay`` seconds after it arrived."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, upstream: bool,
                 counters: _Counters) -> None:  # fmt: skip
        self.src, self.dst, self.delay = src, dst, delay
        self.upstream, self.counters = upstream, counters
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.queued = 0
        self.cond = threading.Condition()
        self.closed = False

    def start(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(_CHUNK)
                due = time.monotonic() + self.delay
                with self.cond:
                    while self.queued > _QUEUED_MAX and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    self.queue.append((due, data))
                    self.queued += len(data)
                    self.cond.notify_all()
                if not data:
                    return
        except OSError:
            self._close()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if self.closed:
                        return
                    due, data = self.queue.popleft()
                    self.queued -= len(data)
                    self.cond.notify_all()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:  # the sender closed its side: pass the FIN on, as late
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
                self.counters.add(self.upstream, len(data))
        except OSError:
            self._close()

    def _close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for s in (self.src, self.dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _accept(listener: socket.socket, target: tuple[str, int], delay: float,
            counters: _Counters) -> None:  # fmt: skip
    while True:
        client, _ = listener.accept()
        try:
            server = socket.create_connection(target, timeout=10)
        except OSError:
            client.close()
            continue
        server.settimeout(None)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with counters.lock:
            counters.connections += 1
        _Direction(client, server, delay, True, counters).start()
        _Direction(server, client, delay, False, counters).start()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT to accept on")
    parser.add_argument("--to", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds, each direction")
    args = parser.parse_args()
    counters = _Counters()
    listener = socket.create_server(args.listen, backlog=128)
    threading.Thread(target=_accept, args=(listener, args.to, args.delay, counters),
                     daemon=True).start()  # fmt: skip
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "count":
            with counters.lock:
                print(f"bytes {counters.up} {counters.down} {counters.connections}", flush=True)


if __name__ == "__main__":
    main()
