"""The programs behind tests/runtime/test_budget.py: one lifecycle of an out-of-core array.

``python -m tests.runtime._budget_prog REPORT CASE [ARG...]`` runs ``CASE`` with the reporting
of tests/runtime/_lifecycle_prog.py (JSON lines on REPORT). The source is the lifecycle's array
(int32, element i holds i + 1); a write stores ``-(i + 1) - 7 * round`` (never zero, never a value
the file held), and each program keeps what every element must hold in a private ``want``
array, so a lost write, a stray one or a zero names its element.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import sys
import time
from typing import Any

import numpy as np

from tests.runtime import _lifecycle_prog
from tests.runtime._lifecycle_prog import PAGE, N, pids, say
from tests.runtime.test_both_killed import _registered
from userfaultfd import _abi, _libc
from userfaultfd.runtime import lazy, server_of

#: The .npy header before the elements.
HEADER = 128


def initial() -> Any:
    return np.arange(1, N + 1, dtype=np.int32)


def compare(got: Any, want: Any, who: str, lo: int = 0) -> bool:
    """Report elements [lo, lo + len(want)) of ``got`` against ``want``: the count wrong and
    the first wrong element, its page and what it held."""
    bad = np.flatnonzero(np.asarray(got) != want)
    record: dict[str, Any] = {"who": who, "lo": lo, "hi": lo + len(want), "bad": int(bad.size)}
    if bad.size:
        index = lo + int(bad[0])
        record.update(index=index, page=index * 4 // PAGE, held=int(got[bad[0]]),
                      expected=int(want[bad[0]]))  # fmt: skip
    say("check", **record)
    return not bad.size


def rss_shmem_kib() -> int:
    """Shared memory mapped in this process (the array's pages; the stats blocks are small)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


def on_file(path: str) -> Any:
    """The elements as the file holds them now."""
    return np.fromfile(path, dtype=np.int32, offset=HEADER)


def write(a: Any, want: Any, indices: Any, round_: int) -> None:
    values = (-(indices + 1) - 7 * round_).astype(np.int32)
    a[indices] = values
    want[indices] = values


def stats(a: Any, label: str) -> None:
    s = server_of(a).stats()
    say("stats", label=label, resident=s.resident, evicted=s.evicted, written_back=s.written_back,
        dirty=s.dirty, write_errors=s.write_errors, poisoned=s.poisoned,
        last_error=s.last_error)  # fmt: skip


# -- cases -------------------------------------------------------------------------------------
def scan(args: list[str]) -> None:
    """Read every element twice (the second pass refaults what was evicted) in 16 pieces,
    reporting the shared memory resident after each piece."""
    npy, budget, writable = args[0], int(args[1]), args[2] == "1"
    a = lazy(npy, budget=budget, writable=writable)
    pids(a)
    want = initial()
    peak = 0
    for round_ in range(2):
        bounds = [int(b) for b in np.linspace(0, N, 17)]
        for lo, hi in itertools.pairwise(bounds):
            compare(a[lo:hi], want[lo:hi], f"pass {round_}", lo)
            peak = max(peak, rss_shmem_kib())
    say("rss", peak_kib=peak)
    stats(a, "end")
    say("writeable", flag=bool(a.flags.writeable))
    if not writable:
        try:
            a.flags.writeable = True
        except ValueError:
            say("refused", what="writeable flag")


def random_writes(args: list[str]) -> None:
    """``count`` random writes in two rounds with eviction; a flush between them; a child
    forked after the flush verifies the half the parent no longer writes, while it writes the
    other half; then stop(), and the file must hold exactly ``want``."""
    npy, budget, count = args[0], int(args[1]), int(args[2])
    a = lazy(npy, budget=budget, writable=True)
    pids(a)
    want = initial()
    rng = np.random.default_rng(22)
    for chunk in np.array_split(rng.integers(0, N, count // 2), 100):
        write(a, want, chunk, 1)
    server_of(a).flush()
    stats(a, "flushed")
    compare(on_file(npy), want, "file after the flush")
    child = os.fork()
    if child == 0:  # the upper half: the parent writes only the lower half from now on
        ok = compare(a[N // 2 :], want[N // 2 :], "child, meanwhile", N // 2)
        os._exit(0 if ok else 1)
    say("pids", array="child", child=child, supervisor=0, handler=0)
    for chunk in np.array_split(rng.integers(0, N // 2, count // 2), 100):
        write(a, want, chunk, 2)
    _, status = os.waitpid(child, 0)
    say("child-status", code=os.waitstatus_to_exitcode(status))
    compare(a, want, "parent, at the end")
    stats(a, "before stop")
    server_of(a).stop()
    compare(on_file(npy), want, "file after stop")


def fork_orders(args: list[str]) -> None:
    """A child writes elements of every page; the two exit in the order given. The file ends
    with the child's writes: written back once no process maps the array."""
    npy, budget, order = args[0], int(args[1]), args[2]
    a = lazy(npy, budget=budget, writable=True)
    pids(a)
    want = initial()
    child = os.fork()
    if child == 0:
        if order == "parent-first":
            while os.getppid() != 1 and _alive(_parent):
                time.sleep(0.005)
        write(a, want, np.arange(3, N, 1024), 3)
        ok = compare(a, want, "child")
        os._exit(0 if ok else 1)
    say("pids", array="child", child=child, supervisor=0, handler=0)
    if order == "parent-first":
        os._exit(0)  # without stop(), without dropping the array
    _, status = os.waitpid(child, 0)
    say("child-status", code=os.waitstatus_to_exitcode(status))
    write(a, want, np.arange(3, N, 1024), 3)  # (what the child wrote: the parent sees it)
    compare(a, want, "parent after the child")
    del a
    gc.collect()


_parent = os.getpid()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def killed(args: list[str]) -> None:
    """Half the writes, SIGKILL the handler (or the supervisor), the other half, a flush:
    the file holds every write."""
    npy, budget, who = args[0], int(args[1]), args[2]
    a = lazy(npy, budget=budget, writable=True)
    pids(a)
    want = initial()
    rng = np.random.default_rng(5)
    for chunk in np.array_split(rng.integers(0, N, 20_000), 20):
        write(a, want, chunk, 1)
    server = server_of(a)
    victim = server.handler_pid if who == "handler" else server.pid
    os.kill(victim, signal.SIGKILL)
    say("killed", who=who, pid=victim)
    for chunk in np.array_split(rng.integers(0, N, 20_000), 20):
        write(a, want, chunk, 2)
    compare(a, want, "after the kill")
    server.flush()
    stats(a, "flushed")
    compare(on_file(npy), want, "file after the flush")
    server.stop()


def handled_signal(args: list[str]) -> None:
    """A timer's signal handler writes (8 random elements every 5 ms: most of them a page not
    in memory, so a fill and an eviction each) while the program scans and writes."""
    npy, budget = args[0], int(args[1])
    a = lazy(npy, budget=budget, writable=True)
    pids(a)
    want = initial()
    ticks = [0]
    rng = np.random.default_rng(9)

    def tick(_signum: int, _frame: object) -> None:
        ticks[0] += 1
        write(a, want, rng.integers(0, N, 8), 4)

    signal.signal(signal.SIGALRM, tick)
    signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
    for chunk in np.array_split(np.arange(0, N, 97), 200):
        write(a, want, chunk, 1)
        compare(a[chunk[0] : chunk[-1]], want[chunk[0] : chunk[-1]], "scan", int(chunk[0]))
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    say("ticks", count=ticks[0])
    server_of(a).flush()
    compare(on_file(npy), want, "file after the flush")


def write_error(args: list[str]) -> None:
    """The file's filesystem fills up: flush() raises ENOSPC and the stats say so; the pages
    keep their bytes; once there is room, flush() writes them and the file is right."""
    npy, filler = args
    a = lazy(npy, writable=True)  # no budget: every page stays, the source is never read again
    pids(a)
    want = initial()
    compare(a, want, "before")
    write(a, want, np.arange(0, N, 1024), 1)
    # Give the file's blocks back to the filesystem (the array holds every page already), then
    # fill it up: writing the pages back must allocate blocks, and there are none.
    fd = os.open(npy, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        _libc.fallocate(fd, _abi.FALLOC_FL_PUNCH_HOLE | _abi.FALLOC_FL_KEEP_SIZE, PAGE, size - PAGE)
    finally:
        os.close(fd)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\x55" * (1 << 20))
                f.flush()
        except OSError as err:
            say("full", errno=err.errno)
    try:
        server_of(a).flush()
        say("flush", ok=True)
    except OSError as err:
        say("flush", ok=False, errno=err.errno, message=str(err))
    stats(a, "after the failed flush")
    compare(a, want, "array after the failed flush")
    os.unlink(filler)
    server_of(a).flush()
    say("flush", ok=True, second=True)
    stats(a, "after the second flush")
    compare(on_file(npy), want, "file after the second flush")
    server_of(a).stop()


def replaced(args: list[str]) -> None:
    """The source path is replaced by another file while the array lives: the array goes on
    with the file it opened (as np.memmap does); the new file is left alone."""
    npy, other, budget = args[0], args[1], int(args[2])
    a = lazy(npy, budget=budget, writable=True)
    pids(a)
    opened = os.open(npy, os.O_RDONLY)
    want = initial()
    write(a, want, np.arange(0, N, 512), 1)
    os.replace(other, npy)
    write(a, want, np.arange(1, N, 512), 2)
    compare(a, want, "array after the replace")
    server_of(a).flush()
    compare(np.fromfile(os.fdopen(opened, "rb"), dtype=np.int32, offset=HEADER), want,
            "the file the array opened")  # fmt: skip
    newer = on_file(npy)
    compare(newer, np.full(N, 5, dtype=np.int32), "the file now at the path")
    server_of(a).stop()


def tensors(args: list[str]) -> None:
    """A model four times the budget by name (lazy_tensors(budget=...)), every tensor compared
    with safetensors' own reader, twice (the second pass reads what was given back)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path, budget = args[0], int(args[1])
    save_file({f"layer{i}.weight": (np.arange(1 << 18, dtype=np.float32) * 3 + i * 7 + 1)
               .reshape(512, 512) for i in range(16)}, path)  # fmt: skip
    from userfaultfd.runtime import lazy_tensors

    model = lazy_tensors(path, budget=budget)
    peak = 0
    with safe_open(path, framework="numpy") as reference:
        for round_ in range(2):
            for name in reference.keys():  # noqa: SIM118 - safe_open is not a mapping
                want = reference.get_tensor(name)
                got = model[name]
                flat = np.flatnonzero(got != want)
                record: dict[str, Any] = {"who": f"{name}, pass {round_}", "lo": 0,
                                          "hi": int(want.size), "bad": int(flat.size)}  # fmt: skip
                if flat.size:
                    record.update(index=int(flat[0]), page=int(flat[0]) * 4 // PAGE,
                                  held=float(got.flat[flat[0]]),
                                  expected=float(want.flat[flat[0]]))  # fmt: skip
                say("check", **record)
                peak = max(peak, rss_shmem_kib())
    say("rss", peak_kib=peak)


def both_killed(args: list[str]) -> None:
    """SIGKILL the supervisor and the handler together: the program's watchdog settles the
    array (runtime/_export). Every page then reads what it must hold (the written values of
    the pages in memory) or fails with EIO (read through /proc/self/mem, which does not die of
    the SIGBUS a poisoned page raises); none reads zeros or a stale value."""
    npy, budget = args[0], int(args[1])
    a = lazy(npy, budget=budget, writable=True)
    pids(a)
    want = initial()
    write(a, want, np.arange(0, N, 1024), 1)  # every page, the last ones stay in memory
    server = server_of(a)
    supervisor, handler = server.pid, server.handler_pid
    os.kill(supervisor, signal.SIGKILL)
    os.kill(handler, signal.SIGKILL)
    address = a.ctypes.data - (a.ctypes.data % PAGE)
    deadline = time.monotonic() + 10
    while _registered(address) and time.monotonic() < deadline:
        time.sleep(0.005)
    say("settled", unregistered=not _registered(address))
    mem = os.open("/proc/self/mem", os.O_RDONLY)
    right = failed = 0
    expected = want.view(np.uint8)
    for page in range(-(-N * 4 // PAGE)):
        start = page * PAGE
        size = min(PAGE, N * 4 - start)
        try:
            got = os.pread(mem, size, a.ctypes.data + start)
        except OSError:
            failed += 1
            continue
        if got != expected[start : start + size].tobytes():
            values = np.frombuffer(got, dtype=np.int32)
            bad = int(np.flatnonzero(values != want[start // 4 : (start + size) // 4])[0])
            index = start // 4 + bad
            say("check", who="after both died", lo=0, hi=N, bad=1, index=index, page=page,
                held=int(values[bad]), expected=int(want[index]))  # fmt: skip
            return
        right += 1
    say("pages", right=right, failed=failed)
    say("check", who="after both died", lo=0, hi=N, bad=0)


def dropped(args: list[str]) -> None:
    """Drop the array: the handler writes the dirty pages back and ends; the memory goes."""
    npy, budget = args[0], int(args[1])
    a = lazy(npy, budget=budget, writable=True)
    server = server_of(a)
    pids(a)
    want = initial()
    write(a, want, np.arange(0, N, 333), 1)
    handler = server.handler_pid
    resident = rss_shmem_kib()
    del a, server
    gc.collect()
    started = time.monotonic()
    while _alive(handler) and time.monotonic() - started < 5:
        time.sleep(0.001)
    say("dropped", seconds=time.monotonic() - started, handler_alive=_alive(handler),
        rss_before_kib=resident, rss_after_kib=rss_shmem_kib())  # fmt: skip
    compare(on_file(npy), want, "file after the drop")


def main(argv: list[str]) -> None:
    report, case, *args = argv
    _lifecycle_prog._report = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                      0o644)  # fmt: skip
    globals()[case](args)


if __name__ == "__main__":
    main(sys.argv[1:])
