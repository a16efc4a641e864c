"""Settling: every way the handler ends leaves each page right or poisoned, never zeros."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests._target import PAGE, Channel, Target
from userfaultfd import memory
from userfaultfd.runtime import Adaptive, Policy, Single, Window, serve
from userfaultfd.stores import Store, StoreError

PAGES = 64


def page_bytes(index: int) -> bytes:
    """Page ``index`` of the source: every byte depends on the page, none is zero."""
    return bytes((index * 7 + i) % 255 + 1 for i in range(256)) * (PAGE // 256)


SOURCE = b"".join(page_bytes(i) for i in range(PAGES))


class _Flaky(Store):
    """SOURCE, except that reads touching pages [bad_first, bad_last) fail, and reads may be
    made to hang (a store that stopped answering)."""

    def __init__(self, bad: tuple[int, int] = (0, 0), hang: bool = False) -> None:
        self.bad = bad
        self.hang = hang

    @property
    def size(self) -> int:
        return len(SOURCE)

    def read_into(self, offset: int, buffer: memoryview) -> int:
        if self.hang:
            time.sleep(3600)
        first, last = offset // PAGE, -(-(offset + len(buffer)) // PAGE)
        if first < self.bad[1] and self.bad[0] < last:
            raise StoreError(errno.EIO, f"pages [{first}, {last}) include a bad one")
        chunk = SOURCE[offset : offset + len(buffer)]
        buffer[: len(chunk)] = chunk
        return len(chunk)


def _first_wrong(view: memoryview, pages: range) -> str | None:
    for index in pages:
        got = bytes(view[index * PAGE : (index + 1) * PAGE])
        if got != page_bytes(index):
            return f"page {index} held {got[:8].hex()}..., expected {page_bytes(index)[:8].hex()}"
    return None


def _dies_of_sigbus(body: object) -> None:
    with Target(body) as target:  # type: ignore[arg-type]
        (wrong, _), _ = target.recv()
        assert wrong is None, wrong
        status = target.wait()
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, (
            f"the read of a page the store cannot give ended with status {status}, not SIGBUS"
        )


def test_a_bad_range_read_ahead_costs_only_its_own_pages() -> None:
    """A window that runs into pages the store cannot read: the faulting page and the good
    pages before the bad ones are still filled; only the bad pages raise SIGBUS."""

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(len(SOURCE))
        serve([mapping], _Flaky(bad=(12, 14)), policy=Window(16))
        channel.send((_first_wrong(mapping.view, range(12)), None))
        _ = mapping.view[12 * PAGE]

    _dies_of_sigbus(body)


@pytest.mark.parametrize("drain", [True, False], ids=["drain", "poison"])
def test_stop_settles_every_page(drain: bool) -> None:
    """stop(drain=True) fills every page; stop(drain=False) poisons the ones not filled."""

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(len(SOURCE))
        server = serve([mapping], _Flaky(), policy=Single())
        touched: str | None = _first_wrong(mapping.view, range(4))
        stats = server.stop(drain=drain)
        expected = (PAGES, 0) if drain else (4, PAGES - 4)
        if (stats.pages, stats.poisoned) != expected:
            touched = f"filled {stats.pages}, poisoned {stats.poisoned}; expected {expected}"
        if drain:
            touched = touched or _first_wrong(mapping.view, range(PAGES))
        channel.send((touched, None))
        _ = mapping.view[PAGES // 2 * PAGE]  # no handler now: right bytes, or SIGBUS
        os._exit(0)

    with Target(body) as target:
        (wrong, _), _ = target.recv()
        assert wrong is None, wrong
        status = target.wait()
        if drain:
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        else:
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS, status


def test_a_stop_that_times_out_poisons_and_does_not_hang() -> None:
    def body(channel: Channel) -> None:
        mapping = memory.anonymous(len(SOURCE))
        server = serve([mapping], _Flaky(hang=True), policy=Single())
        started = time.monotonic()
        try:
            server.stop(timeout=1.0)
            outcome: str | None = "stop() returned although the store never answered"
        except TimeoutError as err:
            outcome = None if "poisoned" in str(err) else f"unexpected message: {err}"
        took = time.monotonic() - started
        if outcome is None and took > 8:
            outcome = f"stop(timeout=1) took {took:.1f} s"
        channel.send((outcome, None))
        mapping.close()  # munmap must not wait for a handler stuck in the store
        channel.send(("unmapped", None))
        _ = memory.anonymous(PAGE).view[0]

    with Target(body, timeout=30) as target:
        (wrong, _), _ = target.recv()
        assert wrong is None, wrong
        (step, _), _ = target.recv(timeout=10)
        assert step == "unmapped"
        assert target.exit_code() == 0


def test_a_program_that_lets_go_of_its_server_is_still_served() -> None:
    """Dropping the Server without stop() stops nothing: the memory keeps filling."""

    def body(channel: Channel) -> None:
        import gc

        mapping = memory.anonymous(len(SOURCE))
        serve([mapping], _Flaky(), policy=Single())
        gc.collect()
        channel.send((_first_wrong(mapping.view, range(PAGES)), None))

    with Target(body) as target:
        (wrong, _), _ = target.recv()
        assert wrong is None, wrong


@pytest.mark.timeout(60)
def test_lazy_works_for_an_unprivileged_user(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Without CAP_SYS_PTRACE there is no EVENT_FORK: lazy() still serves this process, and
    a forked child does not get the range at all (SIGSEGV there), never zeros."""
    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user needs root")
    path = tmp_path_factory.mktemp("unprivileged") / "source.bin"
    path.write_bytes(SOURCE)
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        before = f.read().strip()
    program = textwrap.dedent(f"""
        import os, signal, sys
        from userfaultfd.runtime import lazy  # imported as root: nobody cannot read root's Python
        data = open({str(path)!r}, "rb").read()
        os.setgid(65534); os.setuid(65534)
        view = lazy(data)
        pages = {PAGES}
        wrong = [i for i in range(pages) if view[i * {PAGE} + 1] != (i * 7 + 1) % 255 + 1]
        child = os.fork()
        if child == 0:
            view[5 * {PAGE}]
            os._exit(0)
        _, status = os.waitpid(child, 0)
        print(wrong, os.WIFSIGNALED(status) and os.WTERMSIG(status))
    """)
    try:
        with open("/proc/sys/vm/unprivileged_userfaultfd", "w") as f:
            f.write("1")
        done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                              timeout=50, cwd="/")  # fmt: skip
    finally:
        with open("/proc/sys/vm/unprivileged_userfaultfd", "w") as f:
            f.write(before)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", str(int(signal.SIGSEGV))], (
        f"wrong pages / the child's end: {done.stdout!r} (stderr {done.stderr[-500:]!r})"
    )


@pytest.mark.parametrize(
    ("fetches", "policy", "first"),
    [(None, Single(), 3), (4, Single(), 3), (4, Adaptive(max_bytes=16 * PAGE), 40)],
    ids=["one-read", "reads-in-flight", "read-ahead-markers"],
)
def test_a_background_fill_brings_every_page_in_and_ends(
    fetches: int | None, policy: Policy, first: int
) -> None:
    """fill_in_background(): faults are still answered; the handler ends once every page is
    in, and the memory then reads right with nobody serving it. A sequential start leaves
    read-ahead markers held back (no fault will ask for them): the fill places them too."""

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(len(SOURCE))
        server = serve([mapping], _Flaky(), policy=policy, fetches=fetches)
        wrong = _first_wrong(mapping.view, range(first))
        server.fill_in_background()
        wrong = wrong or _first_wrong(mapping.view, range(PAGES - 3, PAGES))
        deadline = time.monotonic() + 10
        while server.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = server.stats()
        if server.alive:
            wrong = wrong or "the handler did not end after the background fill"
        elif stats.pages != PAGES:
            wrong = wrong or f"{stats.pages} pages filled, not {PAGES}"
        channel.send((wrong or _first_wrong(mapping.view, range(PAGES)), None))

    with Target(body) as target:
        (wrong, _), _ = target.recv()
        assert wrong is None, wrong
