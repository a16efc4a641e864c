"""The remote benchmark's measured program: one row, run in a fresh process in the client
namespace (``remote.py --measure SPEC``), printing its result as one JSON line."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _remote_data import (
    PAGE,
    PER_PAGE,
    RANDOM_FRACTION,
    RANDOM_SEED,
    WORKING_FRACTION,
    WORKING_SEED,
    first_bad_page,
    sample,
)

from userfaultfd.runtime import lazy, server_of
from userfaultfd.stores import BytesStore, ZstdStore


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
