"""Tens of thousands of ranges (issue 21, item 8): nothing whose size grows with the number of
ranges may hit a fixed limit. The program's ranges reach the supervisor in a memfd, not one
SOCK_SEQPACKET message (which fails with EMSGSIZE past the socket's send buffer, about 7,000
ranges), and so does the report of a forked child's ranges when it is large: a handler that
dies after the fork is replaced by one that still serves the child.

Data in the served memory: 64-bit words 1, 2, 3, ... by position in the store (no zero word),
every word checked."""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import time

import numpy as np

from tests._target import PAGE, Channel, Target
from userfaultfd import memory
from userfaultfd._events import Remove
from userfaultfd.runtime import Region, Single, serve
from userfaultfd.runtime._ranges import RegionState
from userfaultfd.runtime._reports import (
    INLINE,
    Adopted,
    Changed,
    Reporter,
    Spilled,
    pack_ranges,
    read_table,
    receive,
    table_fd,
    unpack_ranges,
)
from userfaultfd.stores import BytesStore

_libc = ctypes.CDLL(None, use_errno=True)
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

WORDS = PAGE // 8
BASE = 0x7F0000000000


def _states(count: int) -> list[RegionState]:
    """``count`` ranges of 1 to 3 pages, one page apart, some pages removed."""
    states = [RegionState(BASE + 8 * i * PAGE, (1 + i % 3) * PAGE, (i * 7 + 1) * PAGE, PAGE, i)
              for i in range(count)]  # fmt: skip
    for state in states[::97]:
        state.removed[-1] = 1
        state.settled[0] = 1  # a restart knows nothing filled: not carried over
    return states


def test_the_table_of_ranges_round_trips_through_a_memfd() -> None:
    rows = [(BASE + 2 * i * PAGE, PAGE * (1 + i % 4), i * PAGE, PAGE) for i in range(50_000)]
    fd, count = table_fd(iter(rows))
    try:
        assert count == 50_000
        assert os.fstat(fd).st_size == 50_000 * 32
        back = read_table(fd, count)
    finally:
        os.close(fd)
    assert back == rows, "the ranges read back from the memfd differ from those written"


def test_packed_ranges_keep_every_range_and_its_removed_pages() -> None:
    states = _states(20_000)
    back = unpack_ranges(pack_ranges(states))
    assert len(back) == len(states)
    wrong = [
        (i, b) for i, (a, b) in enumerate(zip(states, back, strict=True)) if b != a.forgotten()
    ]
    assert not wrong, f"range {wrong[0][0]} came back as {wrong[0][1]}"


def test_a_large_adoption_is_spilled_and_received_whole() -> None:
    """An adoption of 50,000 ranges (about 300 KB packed) would not fit one message (send()
    fails with EMSGSIZE, and the reporter gave up on its supervisor): it goes as Spilled, its
    pickle in a memfd, the child's uffd after it; a small report still goes inline."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        packed = pack_ranges(_states(50_000))
        assert len(packed) > INLINE, "the test needs an adoption larger than INLINE"
        reporter = Reporter(Channel(theirs))
        child_read, child_write = os.pipe()  # stands in for the child's uffd
        try:
            reporter.send(Adopted(1, 2, packed), [child_read])
            reporter.send(Changed(1, _remove()))
            assert reporter.supervised, "the reporter gave up on its supervisor"
            report, fds = receive(Channel(ours), timeout=5)
            small, none = receive(Channel(ours), timeout=5)
        finally:
            os.close(child_read)
        assert report == Adopted(1, 2, packed), "the spilled adoption came back different"
        assert len(fds) == 1, f"{len(fds)} descriptors came with the adoption, expected 1"
        os.write(child_write, b"x")
        assert os.read(fds[0], 1) == b"x", "the descriptor after the memfd is not the child's"
        os.close(fds[0])
        os.close(child_write)
        assert small == Changed(1, _remove()) and none == []


def test_a_spilled_report_is_a_spilled_message_on_the_wire() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        Reporter(Channel(theirs)).send(Adopted(1, 2, b"\1" * (INLINE + 1)))
        message, fds = Channel(ours).recv(timeout=5)
        for fd in fds:
            os.close(fd)
        assert isinstance(message, Spilled), f"{message!r} went inline"
        assert len(fds) == 1, f"{len(fds)} descriptors with the spilled report, expected 1"


def _remove() -> Remove:
    return Remove(BASE, BASE + PAGE)


def test_many_ranges_served_and_a_fork_survives_a_restart() -> None:
    """45,000 one-page ranges (each its own VMA): serve() starts (it died with EMSGSIZE), a
    forked child's ranges (about 270 KB packed, more than a message can hold) reach the
    supervisor, the handler is killed, and the child then reads every word of its half right
    from the restarted handler (had the supervisor missed the child's uffd, the handler's
    death would have closed it, and the child would have read zeros)."""
    count = 45_000
    states = [RegionState(BASE + 2 * i * PAGE, PAGE, i * PAGE, PAGE, i) for i in range(count)]
    with open("/proc/sys/net/core/wmem_default") as f:
        assert len(pack_ranges(states)) > int(f.read()), "the child's map must not fit a message"
    words = np.arange(1, count * WORDS + 1, dtype=np.uint64)
    store = BytesStore(words.tobytes())
    half = count // 2

    def wrong(mapping: memory.Mapping, first: int, last: int) -> str:
        for i in range(first, last):
            got = np.frombuffer(mapping.view[2 * i * PAGE : (2 * i + 1) * PAGE], np.uint64)
            want = words[i * WORDS : (i + 1) * WORDS]
            if not np.array_equal(got, want):
                at = int(np.argmax(got != want))
                return f"range {i} word {at} held {int(got[at])}, expected {int(want[at])}"
        return ""

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(2 * count * PAGE)
        for i in range(count):  # a hole after each page: a VMA per range
            assert _libc.munmap(mapping.address + (2 * i + 1) * PAGE, PAGE) == 0
        regions = [Region(mapping.address + 2 * i * PAGE, PAGE, i * PAGE) for i in range(count)]
        server = serve(regions, store, policy=Single(), cpu=None)
        first = wrong(mapping, 0, half)
        go_read, go_write = os.pipe()
        out_read, out_write = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(go_write)
            select.select([go_read], [], [], 60)
            os.write(out_write, wrong(mapping, half, count).encode() or b"PASS")
            os._exit(0)
        time.sleep(1.0)  # the handler read the FORK event and reported the child's ranges
        dead = server.handler_pid
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while server.handler_pid in (dead, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        os.write(go_write, b"g")
        select.select([out_read], [], [], 60)
        child_said = os.read(out_read, 4096).decode()
        os.waitpid(child, 0)
        rest = wrong(mapping, half, count)
        stats = server.stop()
        channel.send((first, child_said, rest, stats.restarts, stats.poisoned))

    with Target(body, timeout=150) as target:
        (first, child_said, rest, restarts, poisoned), _ = target.recv(timeout=150)
    assert first == "", f"before the fork: {first}"
    assert child_said == "PASS", f"the forked child, after the handler's restart: {child_said}"
    assert rest == "", f"after the fork: {rest}"
    assert restarts == 1, f"{restarts} restarts; the handler was killed once"
    assert poisoned == 0, f"{poisoned} pages poisoned"
