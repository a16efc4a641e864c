"""MISSING faults, served by COPY and ZEROPAGE from another process, on every kind of memory."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest

from userfaultfd import FaultFlag, Feature, Mode, PageFault, Userfaultfd, memory

from ._target import PAGE, Channel, Target, next_event, pattern

Maker = Callable[[], memory.Mapping]


def missing_target(make: Maker, pages: int, unit: int) -> Callable[[Channel], None]:
    """A target that registers ``pages`` pages MISSING, then reads them all in order."""

    def body(channel: Channel) -> None:
        mapping = make()
        uffd = Userfaultfd(Feature.MISSING_SHMEM | Feature.MISSING_HUGETLBFS)
        uffd.register(mapping.address, pages * unit, Mode.MISSING)
        channel.send(mapping.address, [uffd.fileno()])
        uffd.close()  # the server's descriptor is the only one now, as in a real lazy restore
        channel.recv()
        content = bytes(mapping.view[: pages * unit])  # faults, page after page
        channel.send(hashlib.sha256(content).hexdigest())

    return body


def serve_in_order(
    make: Maker, pages: int, unit: int, resolve: Callable[[Userfaultfd, int, int], object]
) -> str:
    """Serve each fault with ``resolve(uffd, address, index)``; returns the target's digest."""
    with Target(missing_target(make, pages, unit)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        for index in range(pages):
            event = next_event(uffd)
            # A read fault: no WRITE, WP or MINOR bit; no thread id without THREAD_ID.
            assert event == PageFault(base + index * unit, FaultFlag(0), 0)
            resolve(uffd, base + index * unit, index)
        digest, _ = target.recv()
        assert target.exit_code() == 0
        uffd.close()
        return str(digest)


KINDS: dict[str, Maker] = {
    "anonymous": lambda: memory.anonymous(8 * PAGE),
    "shmem-shared": lambda: memory.memfd(8 * PAGE),
    "shmem-private": lambda: memory.memfd(8 * PAGE, shared=False),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_copy_serves_every_page_byte_for_byte(kind: str) -> None:
    digest = serve_in_order(KINDS[kind], 8, PAGE, lambda uffd, addr, i: uffd.copy(addr, pattern(i)))
    expected = hashlib.sha256(b"".join(pattern(i) for i in range(8))).hexdigest()
    assert digest == expected


@pytest.mark.parametrize("kind", list(KINDS))
def test_zeropage_serves_zeros(kind: str) -> None:
    def resolve(uffd: Userfaultfd, addr: int, index: int) -> None:
        assert uffd.zeropage(addr, PAGE) == PAGE

    digest = serve_in_order(KINDS[kind], 8, PAGE, resolve)
    assert digest == hashlib.sha256(bytes(8 * PAGE)).hexdigest()


def test_copy_returns_bytes_copied_and_takes_an_address() -> None:
    source = bytearray(pattern(7))

    def resolve(uffd: Userfaultfd, addr: int, index: int) -> None:
        from userfaultfd._buffer import pinned

        with pinned(source) as (src, size):
            assert uffd.copy(addr, src, size) == PAGE

    digest = serve_in_order(KINDS["anonymous"], 2, PAGE, resolve)
    assert digest == hashlib.sha256(bytes(source) * 2).hexdigest()


@pytest.mark.parametrize("kind", ["anonymous", "memfd"])
def test_hugetlbfs_copy_serves_huge_pages(kind: str, hugepages: int, huge_page: int) -> None:
    def make() -> memory.Mapping:
        if kind == "anonymous":
            return memory.hugetlb(2 * huge_page)
        return memory.memfd(2 * huge_page, hugetlb=True)

    digest = serve_in_order(
        make, 2, huge_page, lambda uffd, addr, i: uffd.copy(addr, pattern(i, huge_page))
    )
    assert digest == hashlib.sha256(pattern(0, huge_page) + pattern(1, huge_page)).hexdigest()


def test_many_pages_in_one_copy_wake_the_fault() -> None:
    """Resolving the first fault with a copy of the whole range leaves nothing else to fault."""
    whole = b"".join(pattern(i) for i in range(8))
    with Target(missing_target(KINDS["anonymous"], 8, PAGE)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert next_event(uffd) == PageFault(base, FaultFlag(0), 0)
        assert uffd.copy(base, whole) == 8 * PAGE
        digest, _ = target.recv()
        assert digest == hashlib.sha256(whole).hexdigest()
        assert uffd.read_events() == []


def test_copy_without_wake_leaves_the_fault_asleep_until_wake() -> None:
    with Target(missing_target(KINDS["anonymous"], 1, PAGE)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert next_event(uffd) == PageFault(base, FaultFlag(0), 0)
        assert uffd.copy(base, pattern(0), wake=False) == PAGE
        with pytest.raises(TimeoutError):
            target.recv(timeout=0.3)  # still asleep: nobody woke it
        uffd.wake(base, PAGE)
        digest, _ = target.recv()
        assert digest == hashlib.sha256(pattern(0)).hexdigest()
        assert target.exit_code() == 0


def test_closing_the_last_descriptor_wakes_the_fault_with_zeros() -> None:
    with Target(missing_target(KINDS["anonymous"], 1, PAGE)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert next_event(uffd) == PageFault(base, FaultFlag(0), 0)
        uffd.close()  # the target closed its own copy already: this is the last one
        digest, _ = target.recv()
        assert digest == hashlib.sha256(bytes(PAGE)).hexdigest()
        assert target.exit_code() == 0
