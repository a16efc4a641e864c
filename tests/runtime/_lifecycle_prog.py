"""The programs behind tests/runtime/test_lifecycle.py: one lifecycle of lazy() memory per run.

``python -m tests.runtime._lifecycle_prog REPORT CASE [ARG...]`` runs the function ``CASE``
of this module. It reports as JSON lines appended to the file REPORT (one ``os.write`` per line
on an O_APPEND descriptor, so the lines of a program and of its forked children never mix),
never on stdout: the runtime's processes inherit stdout and stderr, and the test must be able
to tell a program that hangs from a handler that outlives it.

Every element a program reads is verified (``check`` records): the value at index i of the
arrays here is i + 1, so a zero is always wrong and the first wrong index says which page.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import json
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

from userfaultfd.runtime import Single, lazy, server_of
from userfaultfd.stores import Store

#: Elements of the test array (int32, value i + 1 at index i): 16 MB, 3,907 pages.
N = 4_000_000
PAGE = mmap.PAGESIZE
PAGES = -(-N * 4 // PAGE)
#: Elements per page of int32.
PER_PAGE = PAGE // 4
#: The message of the uncaught exception a child dies of (case 1).
PLANNED = "planned: the child ends with an uncaught exception"
#: Pages of the custom stores' bad region (cases 7d, 7e).
BAD_PAGES = (2000, 2010)
#: The sparse source (case 10): its size and the pages written with a pattern.
SPARSE_SIZE = 64 << 30
_LAST = SPARSE_SIZE // PAGE - 1
SPARSE_PAGES = (1, 7, _LAST // 2, _LAST // 2 + 1, _LAST)
#: Pages each of the 4 threads of case 12 faults on.
SLOW_PAGES_PER_THREAD = 40

_report = -1


def say(kind: str, **fields: Any) -> None:
    """One record on the report file."""
    line = json.dumps({"kind": kind, "pid": os.getpid(), **fields}) + "\n"
    os.write(_report, line.encode())


def expected(lo: int, hi: int) -> Any:
    return np.arange(lo + 1, hi + 1, dtype=np.int32)


def verify(a: Any, lo: int, hi: int, who: str, *, chunks: int = 1, pause: float = 0.0) -> bool:
    """Read elements [lo, hi) of ``a`` (in ``chunks`` pieces, ``pause`` seconds apart), compare
    every one with i + 1, and report the count and the first wrong one."""
    wrong = 0
    first: tuple[int, int] | None = None
    bounds = [int(b) for b in np.linspace(lo, hi, chunks + 1)]
    for start, end in itertools.pairwise(bounds):
        got = a[start:end]
        bad = np.flatnonzero(got != expected(start, end))
        if bad.size:
            wrong += int(bad.size)
            if first is None:
                first = (start + int(bad[0]), int(got[bad[0]]))
        if pause:
            time.sleep(pause)
    record: dict[str, Any] = {"who": who, "lo": lo, "hi": hi, "bad": wrong}
    if first is not None:
        index, held = first
        record.update(index=index, page=index * 4 // PAGE, held=held, expected=index + 1)
    say("check", **record)
    return wrong == 0


def pids(a: Any, name: str = "a") -> None:
    server = server_of(a)
    say("pids", array=name, supervisor=server.pid, handler=server.handler_pid)


def wait_for_restart(a: Any, old: int, timeout: float = 10.0) -> None:
    """Until the supervisor has a handler other than ``old`` (or has gone, or time is up)."""
    server = server_of(a)
    deadline = time.monotonic() + timeout
    while server.handler_pid == old and time.monotonic() < deadline:
        try:
            os.kill(server.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.001)
    say("restart", old=old, handler=server.handler_pid, changed=server.handler_pid != old)


def kill_handler(a: Any) -> None:
    old = server_of(a).handler_pid
    os.kill(old, signal.SIGKILL)
    wait_for_restart(a, old)


def exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


# -- 1. a forked child exits while the parent uses the array ------------------------------------
def child_exits(args: list[str]) -> None:
    npy, how = args
    a = lazy(npy, direct=False)
    pids(a)
    verify(a, 0, N // 4, "parent before the fork")
    pid = os.fork()
    if pid == 0:
        verify(a, N // 2, N, "child")  # pages the parent never touched
        if how == "sys.exit":
            sys.exit(0)
        if how == "exception":
            raise RuntimeError(PLANNED)
        if how == "del+os._exit":
            del a
            gc.collect()
            os._exit(0)
        return  # "end": the end of the script
    say("child", child=pid)
    say("child-status", child=pid, code=exit_code(os.waitpid(pid, 0)[1]))
    verify(a, 0, N, "parent after the child exited")
    say("done")


# -- 2. the parent exits while a forked child (or a daemon grandchild) uses the array -----------
def parent_exits(args: list[str]) -> None:
    npy, how = args
    a = lazy(npy, direct=False)
    pids(a)
    verify(a, 0, N // 4, "parent")
    gone_r, gone_w = os.pipe()  # EOF once the parent is gone (nobody else holds the write end)
    pid = os.fork()
    if pid == 0:
        os.close(gone_w)
        if how == "daemon" and os.fork():
            os._exit(0)  # the middle process of a double fork
        reader = "grandchild" if how == "daemon" else "child"
        say("reader", reader=os.getpid())
        parent = os.getppid()
        os.read(gone_r, 1)
        say("parent-gone", parent=parent, ppid_now=os.getppid())
        verify(a, 0, N, reader)
        say("done")
        os._exit(0)
    os.close(gone_r)
    if how == "daemon":
        os.waitpid(pid, 0)
    say("parent-exits")
    if how == "sys.exit":
        sys.exit(0)


# -- 3. multiprocessing, fork start method -------------------------------------------------------
_shared: Any = None


def _check_slice(bounds: tuple[int, int]) -> dict[str, Any]:
    lo, hi = bounds
    got = _shared[lo:hi]
    bad = np.flatnonzero(got != expected(lo, hi))
    record: dict[str, Any] = {"who": f"pool worker {os.getpid()}", "lo": lo, "hi": hi,
                              "bad": int(bad.size)}  # fmt: skip
    if bad.size:
        index = lo + int(bad[0])
        record.update(index=index, page=index * 4 // PAGE, held=int(got[bad[0]]),
                      expected=index + 1)  # fmt: skip
    return record


def pool(args: list[str]) -> None:
    global _shared
    (npy,) = args
    a = _shared = lazy(npy, direct=False)
    pids(a)
    verify(a, 0, N // 4, "parent before the pool")
    context = multiprocessing.get_context("fork")
    workers = context.Pool(2)
    results = workers.map(_check_slice, [(N // 4, N // 2), (N // 2, 3 * N // 4)], chunksize=1)
    workers.close()
    workers.join()
    for record in results:
        say("check", **record)
    verify(a, 0, N, "parent after the pool")
    say("done")


# -- 4. a signal to the whole process group mid-load --------------------------------------------
def group_signal(args: list[str]) -> None:
    npy, name = args
    a = lazy(npy, policy=Single())  # one page per fault: the load is still going when it comes
    pids(a)
    received: list[int] = []
    signal.signal(signal.Signals[name], lambda signum, _frame: received.append(signum))
    verify(a, 0, 16 * PER_PAGE, "parent before the signal")
    say("loading")
    verify(a, 0, N, "parent", chunks=64, pause=0.02)
    say("signals", received=received)
    say("done")


# -- 5. the supervisor or the handler SIGKILLed mid-load (by the test) --------------------------
def slow_load(args: list[str]) -> None:
    (npy,) = args
    a = lazy(npy, policy=Single())
    pids(a)
    verify(a, 0, 16 * PER_PAGE, "parent before the kill")
    say("loading")
    verify(a, 0, N, "parent", chunks=64, pause=0.02)
    stats = server_of(a).stats()
    say("stats", restarts=stats.restarts, errors=stats.errors, handler=server_of(a).handler_pid)
    say("done")


# -- 6. a forked child reads its copy after a handler restart -----------------------------------
def restart_then_child(args: list[str]) -> None:
    npy, delay = args[0], float(args[1])
    a = lazy(npy, direct=False)
    pids(a)
    verify(a, 0, N // 4, "parent before the fork")
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.read(go_r, 1)
        verify(a, 0, N, "child")
        os._exit(0)
    os.close(go_r)
    say("child", child=pid)
    time.sleep(delay)  # 0: the kill comes right after fork() returned
    kill_handler(a)
    os.write(go_w, b"g")
    say("child-status", child=pid, code=exit_code(os.waitpid(pid, 0)[1]))
    verify(a, 0, N, "parent")
    say("done")


# -- 7. the source changes under a live array ---------------------------------------------------
def truncated(args: list[str]) -> None:
    (npy,) = args
    a = lazy(npy, policy=Single())  # exactly the pages touched are filled
    pids(a)
    verify(a, 0, N // 4, "filled before the truncation")
    header = os.path.getsize(npy) - 4 * N
    keep = PAGES // 2  # whole pages of the array still in the file
    os.truncate(npy, header + keep * PAGE)
    say("truncated", keep_pages=keep)
    verify(a, 0, N // 4, "filled before, read after the truncation")
    verify(a, N // 4, keep * PER_PAGE, "inside the new end")
    say("touch", page=keep)
    verify(a, keep * PER_PAGE, N, "beyond the new end")  # SIGBUS on its first page
    say("done")


def replaced(args: list[str]) -> None:
    (npy,) = args
    a = lazy(npy, direct=False)
    pids(a)
    verify(a, 0, N // 4, "before the replacement")
    other = npy + ".other.npy"
    np.save(other, np.arange(N, 0, -1, dtype=np.int32) + 7)  # other values, none zero
    os.replace(other, npy)
    kill_handler(a)
    verify(a, 0, N, "after the replacement and a restart")
    say("done")


def unlinked(args: list[str]) -> None:
    (npy,) = args
    a = lazy(npy, direct=False)
    pids(a)
    verify(a, 0, N // 4, "before the unlink")
    os.unlink(npy)
    kill_handler(a)
    verify(a, 0, N, "after the unlink and a restart")
    say("done")


class _Flaky(Store):
    """The .npy bytes, except that reads overlapping BAD_PAGES of the array return half the
    buffer ("short") or raise a plain RuntimeError ("raises")."""

    def __init__(self, data: bytes, header: int, mode: str) -> None:
        self.data, self.mode = data, mode
        self.bad = (header + BAD_PAGES[0] * PAGE, header + BAD_PAGES[1] * PAGE)

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        chunk = self.data[offset : offset + len(buffer)]
        if offset < self.bad[1] and self.bad[0] < offset + len(buffer):
            if self.mode == "raises":
                raise RuntimeError(f"flaky store: bytes at {offset} cannot be read")
            half = len(chunk) // 2  # a short read well inside the store's size
            buffer[:half] = chunk[:half]
            return half
        buffer[: len(chunk)] = chunk
        return len(chunk)


def flaky_store(args: list[str]) -> None:
    npy, mode = args
    with open(npy, "rb") as f:
        data = f.read()
    a = lazy(_Flaky(data, len(data) - 4 * N, mode), policy=Single())
    pids(a)
    server = server_of(a)
    bad_lo, bad_hi = (p * PER_PAGE for p in BAD_PAGES)
    verify(a, 0, bad_lo, "before the bad region")
    pid = os.fork()
    if pid == 0:
        say("touch", page=BAD_PAGES[0] + 5, who="child")
        verify(a, bad_lo + 5 * PER_PAGE, bad_lo + 6 * PER_PAGE, "child, in the bad region")
        os._exit(0)
    say("child-status", child=pid, code=exit_code(os.waitpid(pid, 0)[1]))
    verify(a, bad_hi, N, "after the bad region")
    stats = server.stats()
    say("stats", restarts=stats.restarts, errors=stats.errors, poisoned=stats.poisoned,
        handler=server.handler_pid)  # fmt: skip
    say("touch", page=BAD_PAGES[0] + 1, who="parent")
    verify(a, bad_lo + PER_PAGE, bad_lo + 2 * PER_PAGE, "parent, in the bad region")
    say("done")


# -- 8. two arrays, one dropped; a double stop --------------------------------------------------
def two_arrays(args: list[str]) -> None:
    (npy,) = args
    a = lazy(npy, direct=False)
    b = lazy(npy, direct=False)
    pids(a, "a")
    pids(b, "b")
    verify(a, 0, N // 4, "a")
    verify(b, 0, N // 4, "b before a is dropped")
    del a
    gc.collect()
    verify(b, 0, N, "b after a was dropped")
    say("done")


def double_stop(args: list[str]) -> None:
    (npy,) = args
    a = lazy(npy, direct=False)
    pids(a)
    server = server_of(a)
    verify(a, 0, N, "before the stops")
    server.stop()
    opened = [os.open(npy, os.O_RDONLY) for _ in range(8)]  # take the numbers stop() freed
    try:
        server.stop()
        error = None
    except Exception as err:
        error = repr(err)
    valid = []
    for fd in opened:
        try:
            os.fstat(fd)
            valid.append(os.pread(fd, 6, 0) == b"\x93NUMPY")
        except OSError:
            valid.append(False)
    say("second-stop", error=error, opened=opened, valid=valid)
    verify(a, 0, N, "after the stops")
    say("done")


# -- 9. many create/drop cycles; affinity ---------------------------------------------------------
def _children() -> tuple[list[int], int]:
    """(live children of this process, zombie children): /proc/PID/stat, since this kernel
    has no /proc/PID/task/*/children."""
    me, live, zombies = os.getpid(), [], 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            if fields[0] in "ZX":
                zombies += 1
            else:
                live.append(int(name))
    return live, zombies


def cycles(args: list[str]) -> None:
    small, count = args[0], int(args[1])
    fds_before = len(os.listdir("/proc/self/fd"))
    affinity_before = sorted(os.sched_getaffinity(0))
    children_before = _children()[0]
    elements = (os.path.getsize(small) - 128) // 4
    wrong: list[tuple[int, int, int]] = []
    for cycle in range(count):
        a = lazy(small, direct=False)
        index = (cycle * PER_PAGE + cycle) % elements
        held = int(a[index])
        if held != index + 1:
            wrong.append((cycle, index, held))
        del a
        gc.collect()
    deadline = time.monotonic() + 5
    while _children()[0] != children_before and time.monotonic() < deadline:
        time.sleep(0.01)
    live, zombies = _children()
    say("cycles", count=count, wrong=wrong[:3], nwrong=len(wrong), fds_before=fds_before,
        fds_after=len(os.listdir("/proc/self/fd")), affinity_before=affinity_before,
        affinity_after=sorted(os.sched_getaffinity(0)), children_before=children_before,
        children_after=live, zombies=zombies)  # fmt: skip
    say("done")


def stop_order(args: list[str]) -> None:
    (small,) = args
    before = sorted(os.sched_getaffinity(0))
    first, second = lazy(small, direct=False), lazy(small, direct=False)
    pids(first, "first")
    pids(second, "second")
    during = sorted(os.sched_getaffinity(0))
    server_of(first).stop()  # out of creation order: the first one first
    server_of(second).stop()
    say("affinity", before=before, during=during, after=sorted(os.sched_getaffinity(0)))
    say("done")


# -- 10. a sparse source larger than memory -------------------------------------------------------
def sparse_pattern(page: int) -> bytes:
    """The bytes of pattern page ``page`` of the sparse source: none zero."""
    values = (np.arange(PAGE, dtype=np.uint64) * 7 + page) % 251 + 1
    return bytes(values.astype(np.uint8).tobytes())


def sparse(args: list[str]) -> None:
    (path,) = args
    with open(path, "wb") as f:
        f.truncate(SPARSE_SIZE)
        for page in SPARSE_PAGES:
            os.pwrite(f.fileno(), sparse_pattern(page), page * PAGE)
    started = time.monotonic()
    a = lazy(path, dtype=np.uint8, direct=False)
    say("opened", seconds=time.monotonic() - started, length=len(a))
    pids(a)
    for page in SPARSE_PAGES:
        got = a[page * PAGE : (page + 1) * PAGE]
        want = np.frombuffer(sparse_pattern(page), dtype=np.uint8)
        bad = np.flatnonzero(got != want)
        record: dict[str, Any] = {"who": f"pattern page {page}", "lo": page * PAGE,
                                  "hi": (page + 1) * PAGE, "bad": int(bad.size)}  # fmt: skip
        if bad.size:
            record.update(index=page * PAGE + int(bad[0]), page=page, held=int(got[bad[0]]),
                          expected=int(want[bad[0]]))  # fmt: skip
        say("check", **record)
    say("done")


# -- 11. bad options ------------------------------------------------------------------------------
BAD_OPTIONS: dict[str, Any] = {"policy": "nonsense", "batch": 0, "buffer_bytes": 100}


def bad_option(args: list[str]) -> None:
    npy, option = args
    try:
        a = lazy(npy, **{option: BAD_OPTIONS[option]})
    except Exception as err:
        say("refused", type=type(err).__name__, message=str(err))
        say("done")
        return
    say("accepted")
    pids(a)
    try:  # never touched: nothing to fill
        server_of(a).stop(drain=False, timeout=5)
    except Exception as err:
        say("stop-failed", error=repr(err))
    say("done")


# -- 12. a slow store, four native threads faulting at once ---------------------------------------
class _Slow(Store):
    """Bytes that take 10 ms per read."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def size(self) -> int:
        return len(self.data)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        time.sleep(0.01)
        chunk = self.data[offset : offset + len(buffer)]
        buffer[: len(chunk)] = chunk
        return len(chunk)


def slow_threads(args: list[str]) -> None:
    threads_n, per = 4, SLOW_PAGES_PER_THREAD
    pages = threads_n * per
    data = expected(0, pages * PER_PAGE).tobytes()
    view = lazy(_Slow(data), policy=Single())
    pids(view)
    base = ctypes.addressof(ctypes.c_char.from_buffer(view))
    got: dict[int, bytes] = {}
    start = threading.Barrier(threads_n)

    def touch(first: int) -> None:
        buffers = {p: ctypes.create_string_buffer(PAGE) for p in range(first, pages, threads_n)}
        start.wait()
        for page, buffer in buffers.items():  # ctypes releases the GIL: a native fault
            ctypes.memmove(buffer, base + page * PAGE, PAGE)
            got[page] = buffer.raw

    workers = [threading.Thread(target=touch, args=(t,), daemon=True) for t in range(threads_n)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 10
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    if any(worker.is_alive() for worker in workers):
        say("hung", pages_read=len(got), of=pages)
        os._exit(3)
    wrong, first = 0, dict[str, int]()
    for page in range(pages):
        lo = page * PER_PAGE
        values = np.frombuffer(got[page], dtype=np.int32)
        bad = np.flatnonzero(values != expected(lo, lo + PER_PAGE))
        if bad.size and not first:
            index = lo + int(bad[0])
            first = {"index": index, "page": page, "held": int(values[bad[0]]),
                     "expected": index + 1, "thread": page % threads_n}  # fmt: skip
        wrong += int(bad.size)
    say("check", who="4 threads", lo=0, hi=pages * PER_PAGE, bad=wrong, **first)
    say("done")


def main(argv: list[str]) -> None:
    global _report
    report, case, *args = argv
    _report = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    globals()[case](args)


if __name__ == "__main__":
    main(sys.argv[1:])
