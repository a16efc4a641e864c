"""POISON, MOVE, and the non-fault events (FORK, REMAP, REMOVE, UNMAP)."""

from __future__ import annotations

import errno
import mmap
import os
import signal
from collections.abc import Callable

import pytest

from userfaultfd import (
    FaultFlag,
    Feature,
    Fork,
    Mode,
    PageFault,
    Remap,
    Remove,
    Unmap,
    Userfaultfd,
    UserfaultfdError,
    _libc,
    memory,
)

from ._target import PAGE, Channel, Target, next_event, page_difference, pattern

MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def test_poisoned_page_gets_sigbus() -> None:
    def read_first_byte(mapping: memory.Mapping) -> object:
        return mapping.view[0]  # dies here: SIGBUS

    with Target(registered_target(Feature.POISON, read_first_byte)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert next_event(uffd) == PageFault(base, FaultFlag(0), 0)
        assert uffd.poison(base, PAGE) == PAGE
        status = target.wait()
        assert os.waitstatus_to_exitcode(status) == -signal.SIGBUS, f"wait status {status}"


def test_move_fills_missing_pages_from_another_range() -> None:
    """The owner moves pages into its registered range: no copy, and the source is left empty."""

    def body(channel: Channel) -> None:
        source = memory.anonymous(4 * PAGE)
        for i in range(4):
            source.view[i * PAGE : (i + 1) * PAGE] = pattern(i)
        dest = memory.anonymous(4 * PAGE)
        uffd = Userfaultfd(Feature.MOVE)
        uffd.register(dest.address, dest.length, Mode.MISSING)
        moved = uffd.move(dest.address, source.address, 4 * PAGE)
        held = bytes(dest.view)  # populated: no fault
        channel.send((moved, held, memory.resident(source.address, source.length)))

    with Target(body) as target:
        (moved, held, source_resident), _ = target.recv()
        assert moved == 4 * PAGE
        wrong = page_difference(held, b"".join(pattern(i) for i in range(4)))
        assert not wrong, f"the moved pages are not the source's: {wrong}"
        assert source_resident == [False] * 4  # the pages left the source range
        assert target.exit_code() == 0


def test_move_from_another_process_is_refused_with_the_reason() -> None:
    def body(channel: Channel) -> None:
        source = memory.anonymous(PAGE)
        source.view[:4] = b"data"
        dest = memory.anonymous(PAGE)
        uffd = Userfaultfd(Feature.MOVE)
        uffd.register(dest.address, dest.length, Mode.MISSING)
        channel.send((dest.address, source.address), [uffd.fileno()])
        channel.recv()

    with Target(body) as target:
        (dest, source), uffd = target.recv_uffd()
        with pytest.raises(UserfaultfdError, match="only from the process that owns") as caught:
            uffd.move(dest, source, PAGE)
        assert caught.value.errno == errno.EINVAL
        uffd.close()  # (the exception's traceback holds it: it would wait for the collector)
        target.send("done")
        assert target.exit_code() == 0


Action = Callable[[memory.Mapping], object]


def registered_target(features: Feature, action: Action) -> Callable[[Channel], None]:
    """A target with 4 anonymous pages registered MISSING that then runs ``action`` on them."""

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(4 * PAGE)
        uffd = Userfaultfd(features)
        uffd.register(mapping.address, mapping.length, Mode.MISSING)
        channel.send(mapping.address, [uffd.fileno()])
        channel.recv()
        channel.send(action(mapping))  # the action blocks until the server reads its event

    return body


def test_fork_event_carries_a_new_userfaultfd() -> None:
    def fork(mapping: memory.Mapping) -> object:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        return os.waitpid(pid, 0)[1]

    with Target(registered_target(Feature.EVENT_FORK, fork)) as target:
        _base, uffd = target.recv_uffd()
        target.send("go")
        event = next_event(uffd)
        assert isinstance(event, Fork)
        assert os.readlink(f"/proc/self/fd/{event.uffd}") == "anon_inode:[userfaultfd]"
        Userfaultfd.from_fd(event.uffd).close()
        assert target.recv()[0] == 0
        assert target.exit_code() == 0


def test_remap_event_reports_old_and_new_address() -> None:
    def remap(mapping: memory.Mapping) -> object:
        # Reserve a destination, then move the registered range on top of it.
        destination = mmap.mmap(-1, 4 * PAGE)
        anonymous = memory.MappingKind.ANONYMOUS
        with memory.Mapping(destination, 4 * PAGE, kind=anonymous) as spot:
            new = spot.address
        # The reservation is unmapped again; MREMAP_FIXED takes the address regardless.
        return _libc.mremap(mapping.address, 4 * PAGE, 4 * PAGE, MREMAP_MAYMOVE | MREMAP_FIXED, new)

    with Target(registered_target(Feature.EVENT_REMAP, remap)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        event = next_event(uffd)
        assert isinstance(event, Remap)
        assert (event.old, event.length) == (base, 4 * PAGE)
        assert target.recv()[0] == event.new
        assert target.exit_code() == 0


def test_remove_event_reports_the_dropped_range() -> None:
    def dontneed(mapping: memory.Mapping) -> object:
        mapping.madvise(mmap.MADV_DONTNEED, PAGE, 2 * PAGE)
        return "done"

    with Target(registered_target(Feature.EVENT_REMOVE, dontneed)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert next_event(uffd) == Remove(base + PAGE, base + 3 * PAGE)
        assert target.recv()[0] == "done"
        assert target.exit_code() == 0


def test_unmap_event_reports_the_unmapped_range() -> None:
    def unmap(mapping: memory.Mapping) -> object:
        mapping.close()
        return "done"

    with Target(registered_target(Feature.EVENT_UNMAP, unmap)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert next_event(uffd) == Unmap(base, base + 4 * PAGE)
        assert target.recv()[0] == "done"
        assert target.exit_code() == 0
