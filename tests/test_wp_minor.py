"""Write-protect and minor faults, served from another process."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable

import pytest

from userfaultfd import FaultFlag, Feature, Mode, PageFault, Userfaultfd, memory

from ._target import PAGE, Channel, Target, next_event, pattern

WP_FEATURES = Feature.PAGEFAULT_FLAG_WP | Feature.WP_HUGETLBFS_SHMEM


def wp_target(make: Callable[[], memory.Mapping], unit: int) -> Callable[[Channel], None]:
    """Fills 4 pages, registers them WP, then (once protected) writes one byte into page 1."""

    def body(channel: Channel) -> None:
        mapping = make()
        for i in range(4):
            mapping.view[i * unit : (i + 1) * unit] = pattern(i, unit)
        uffd = Userfaultfd(WP_FEATURES)
        uffd.register(mapping.address, 4 * unit, Mode.WP)
        channel.send(mapping.address, [uffd.fileno()])
        channel.recv()
        mapping.view[unit] = 0x58  # blocks until the server unprotects page 1
        channel.send(bytes(mapping.view[unit : unit + 4]))

    return body


@pytest.mark.parametrize("kind", ["anonymous", "shmem", "hugetlbfs"])
def test_write_to_protected_page_raises_wp_fault(
    kind: str, huge_page: int, request: pytest.FixtureRequest
) -> None:
    unit = huge_page if kind == "hugetlbfs" else PAGE
    makers: dict[str, Callable[[], memory.Mapping]] = {
        "anonymous": lambda: memory.anonymous(4 * PAGE),
        "shmem": lambda: memory.memfd(4 * PAGE),
        "hugetlbfs": lambda: memory.memfd(4 * huge_page, hugetlb=True),
    }
    if kind == "hugetlbfs":
        request.getfixturevalue("hugepages")
    with Target(wp_target(makers[kind], unit)) as target:
        base, uffd = target.recv_uffd()
        uffd.writeprotect(base, 4 * unit)
        if kind != "hugetlbfs":  # pagemap shows uffd-wp per base page
            assert memory.write_protected(base, 4 * unit, pid=target.pid) == [True] * 4
        target.send("go")
        assert next_event(uffd) == PageFault(base + unit, FaultFlag.WRITE | FaultFlag.WP, 0)
        uffd.writeprotect(base + unit, unit, protect=False)
        written, _ = target.recv()
        assert written == b"\x58" + pattern(1, unit)[1:4]
        assert target.exit_code() == 0


def test_copy_with_wp_installs_a_protected_page() -> None:
    def body(channel: Channel) -> None:
        mapping = memory.anonymous(2 * PAGE)
        uffd = Userfaultfd(Feature.PAGEFAULT_FLAG_WP)
        uffd.register(mapping.address, mapping.length, Mode.MISSING | Mode.WP)
        channel.send(mapping.address, [uffd.fileno()])
        channel.recv()
        first = bytes(mapping.view[:4])  # MISSING fault
        channel.send(first)
        mapping.view[0] = 0x21  # WP fault on the page the server installed protected
        channel.send(bytes(mapping.view[:4]))

    with Target(body) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert next_event(uffd) == PageFault(base, FaultFlag(0), 0)
        assert uffd.copy(base, pattern(3), wp=True) == PAGE
        assert target.recv()[0] == pattern(3)[:4]
        assert memory.write_protected(base, PAGE, pid=target.pid) == [True]
        assert next_event(uffd) == PageFault(base, FaultFlag.WRITE | FaultFlag.WP, 0)
        uffd.writeprotect(base, PAGE, protect=False)
        assert target.recv()[0] == b"\x21" + pattern(3)[1:4]
        assert target.exit_code() == 0


def test_minor_fault_is_resolved_by_continue_after_an_edit_through_an_alias() -> None:
    def body(channel: Channel) -> None:
        mapping = memory.memfd(4 * PAGE)
        # Fill the page cache through an alias: the registered mapping maps nothing yet.
        with mapping.alias() as alias:
            for i in range(4):
                alias.view[i * PAGE : (i + 1) * PAGE] = pattern(i)
        uffd = Userfaultfd(Feature.MINOR_SHMEM)
        uffd.register(mapping.address, mapping.length, Mode.MINOR)
        assert mapping.fd is not None
        channel.send(mapping.address, [uffd.fileno(), mapping.fd])
        channel.recv()
        channel.send(bytes(mapping.view[2 * PAGE : 2 * PAGE + 8]))

    with Target(body) as target:
        base, fds = target.recv()
        uffd = Userfaultfd.from_fd(fds[0])
        with mmap.mmap(fds[1], 4 * PAGE) as server_view:  # the server's own alias
            target.send("go")
            assert next_event(uffd) == PageFault(base + 2 * PAGE, FaultFlag.MINOR, 0)
            server_view[2 * PAGE : 2 * PAGE + 8] = b"EDITED!!"
            assert uffd.continue_(base + 2 * PAGE, PAGE) == PAGE
            assert target.recv()[0] == b"EDITED!!"
        os.close(fds[1])
        assert target.exit_code() == 0
        uffd.close()
