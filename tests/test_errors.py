"""Each kernel refusal arrives as its own exception type; bad input never reaches the kernel."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import time
from collections.abc import Callable

import pytest

from userfaultfd import (
    Feature,
    FeatureUnavailableError,
    MappingChangedError,
    Mode,
    PageExistsError,
    ProcessGoneError,
    Remove,
    Userfaultfd,
    UserfaultfdError,
    UserfaultfdPermissionError,
    memory,
)

from ._target import PAGE, Channel, Target, pattern

Then = Callable[[Channel, memory.Mapping], object]


def missing_target(
    pages: int, features: Feature = Feature(0), *, populated: int | None = None,
    then: Then = lambda channel, mapping: channel.recv(),
) -> Callable[[Channel], None]:  # fmt: skip
    """A target body: ``pages`` anonymous pages (page ``populated`` written first) registered
    MISSING; it sends their address with the uffd, then runs ``then`` (default: waits for a
    message)."""

    def body(channel: Channel) -> None:
        mapping = memory.anonymous(pages * PAGE)
        if populated is not None:
            mapping.view[populated * PAGE] = 1  # before registration: no fault, never missing
        uffd = Userfaultfd(features)
        uffd.register(mapping.address, mapping.length, Mode.MISSING)
        channel.send(mapping.address, [uffd.fileno()])
        then(channel, mapping)

    return body


def test_copy_onto_a_populated_page_is_page_exists() -> None:
    with Target(missing_target(2, populated=0)) as target:
        base, uffd = target.recv_uffd()
        with pytest.raises(PageExistsError, match="already mapped") as caught:
            uffd.copy(base, pattern(0))
        assert caught.value.errno == errno.EEXIST
        assert uffd.copy(base + PAGE, pattern(1)) == PAGE  # the neighbour was missing
        target.send("done")
        assert target.exit_code() == 0


def test_copy_while_a_remove_event_is_unread_is_mapping_changed() -> None:
    def drop_page_0(channel: Channel, mapping: memory.Mapping) -> None:
        channel.recv()
        mapping.madvise(mmap.MADV_DONTNEED, 0, PAGE)  # blocks until the REMOVE is read
        channel.send("advised")
        channel.recv()

    with Target(missing_target(4, Feature.EVENT_REMOVE, then=drop_page_0)) as target:
        base, uffd = target.recv_uffd()
        target.send("go")
        assert select.select([uffd], [], [], 5)[0], "no REMOVE event queued"
        with pytest.raises(MappingChangedError, match=r"resume at \.done") as caught:
            uffd.copy(base + 2 * PAGE, pattern(2))
        assert caught.value.errno == errno.EAGAIN
        assert caught.value.done == 0
        assert uffd.read_events() == [Remove(base, base + PAGE)]
        assert target.recv()[0] == "advised"
        # Once the madvise has finished, the address space is stable again.
        assert retry_while_changing(lambda: uffd.copy(base + 2 * PAGE, pattern(2))) == PAGE
        target.send("done")
        assert target.exit_code() == 0


def retry_while_changing(operation: Callable[[], int], timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return operation()
        except MappingChangedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def test_copy_after_the_target_exited_is_process_gone() -> None:
    with Target(missing_target(1, then=lambda channel, mapping: None)) as target:
        base, uffd = target.recv_uffd()
        assert target.exit_code() == 0
        with pytest.raises(ProcessGoneError, match="has exited") as caught:
            uffd.copy(base, pattern(0))
        assert caught.value.errno == errno.ESRCH


# -- bad input, refused before any syscall ---------------------------------------------------------


@pytest.fixture
def registered() -> tuple[Userfaultfd, memory.Mapping]:
    mapping = memory.anonymous(4 * PAGE)
    uffd = Userfaultfd()
    uffd.register(mapping.address, mapping.length, Mode.MISSING)
    return uffd, mapping


@pytest.mark.parametrize(
    ("offset", "length", "message"),
    [
        (1, PAGE, "multiples of the page size"),
        (0, PAGE + 1, "multiples of the page size"),
        (0, 0, "length must be positive"),
        (0, -PAGE, "length must be positive"),
    ],
)
def test_bad_ranges_are_value_errors(
    registered: tuple[Userfaultfd, memory.Mapping], offset: int, length: int, message: str
) -> None:
    uffd, mapping = registered
    for call in (uffd.zeropage, uffd.wake, uffd.unregister, uffd.writeprotect, uffd.poison):
        with pytest.raises(ValueError, match=message):
            call(mapping.address + offset, length)


def test_overflowing_range_is_a_value_error(registered: tuple[Userfaultfd, memory.Mapping]) -> None:
    uffd, _ = registered
    with pytest.raises(ValueError, match="outside the 64-bit address space"):
        uffd.zeropage((1 << 64) - PAGE, 2 * PAGE)


def test_non_int_address_is_a_type_error(registered: tuple[Userfaultfd, memory.Mapping]) -> None:
    uffd, mapping = registered
    with pytest.raises(TypeError, match="address must be an int"):
        uffd.zeropage(float(mapping.address), PAGE)  # type: ignore[arg-type]


def test_copy_source_shorter_than_length(registered: tuple[Userfaultfd, memory.Mapping]) -> None:
    uffd, mapping = registered
    with pytest.raises(ValueError, match="exceeds the 4-byte source"):
        uffd.copy(mapping.address, b"abcd", PAGE)


def test_unknown_mode_is_a_value_error(registered: tuple[Userfaultfd, memory.Mapping]) -> None:
    uffd, mapping = registered
    with pytest.raises(ValueError, match="combination of MISSING, WP and MINOR"):
        uffd.register(mapping.address, mapping.length, Mode(8))


def test_unregistered_range_is_refused_by_the_kernel() -> None:
    with memory.anonymous(PAGE) as mapping, Userfaultfd() as uffd:
        with pytest.raises(UserfaultfdError, match="no mapping registered") as caught:
            uffd.zeropage(mapping.address, PAGE)
        assert caught.value.errno == errno.ENOENT


def test_unknown_feature_bit_names_it() -> None:
    with pytest.raises(FeatureUnavailableError, match="bit 40 \\(unknown to this library\\)"):
        Userfaultfd(Feature(1 << 40))


def test_every_call_after_close_is_a_clear_error(
    registered: tuple[Userfaultfd, memory.Mapping],
) -> None:
    uffd, mapping = registered
    uffd.close()
    uffd.close()  # idempotent
    assert uffd.closed
    calls: list[Callable[[], object]] = [
        uffd.fileno,
        uffd.read_events,
        lambda: uffd.register(mapping.address, PAGE),
        lambda: uffd.copy(mapping.address, pattern(0)),
        lambda: uffd.zeropage(mapping.address, PAGE),
        lambda: uffd.writeprotect(mapping.address, PAGE),
        lambda: uffd.continue_(mapping.address, PAGE),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="closed Userfaultfd"):
            call()


# -- creation -------------------------------------------------------------------------------------


def test_descriptor_flags_follow_the_arguments() -> None:
    def flags(uffd: Userfaultfd) -> tuple[bool, bool]:
        """(O_NONBLOCK, FD_CLOEXEC) of its descriptor."""
        status, descriptor = (
            fcntl.fcntl(uffd.fileno(), op) for op in (fcntl.F_GETFL, fcntl.F_GETFD)
        )
        return bool(status & os.O_NONBLOCK), bool(descriptor & fcntl.FD_CLOEXEC)

    with Userfaultfd() as default, Userfaultfd(nonblocking=False, cloexec=False) as plain:
        assert (flags(default), flags(plain)) == ((True, True), (False, False))


def test_nonblocking_read_with_nothing_pending_is_empty() -> None:
    with Userfaultfd() as uffd:
        assert uffd.read_events() == []


def test_features_granted_are_the_features_requested() -> None:
    wanted = Feature.EVENT_REMOVE | Feature.THREAD_ID | Feature.MOVE
    with Userfaultfd(wanted) as uffd:
        assert uffd.features == wanted


@pytest.mark.parametrize("kwargs", [{"device": True}, {"user_mode_only": True}])
def test_other_ways_to_create(kwargs: dict[str, bool]) -> None:
    if kwargs.get("device") and not os.path.exists("/dev/userfaultfd"):
        pytest.skip("this kernel has no /dev/userfaultfd (Linux 6.1+)")
    with Userfaultfd(**kwargs) as uffd:  # type: ignore[arg-type]
        assert os.readlink(f"/proc/self/fd/{uffd.fileno()}") == "anon_inode:[userfaultfd]"


def test_unprivileged_user_gets_a_permission_error_that_says_what_to_do() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user needs root")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd=1 lets every user create a userfaultfd")

    def body(channel: Channel) -> None:
        os.setgid(65534)
        os.setuid(65534)  # nobody: no CAP_SYS_PTRACE, no access to /dev/userfaultfd
        try:
            Userfaultfd()
        except UserfaultfdPermissionError as err:
            refused = (isinstance(err, PermissionError), err.errno, str(err))
        with Userfaultfd(user_mode_only=True) as uffd:
            channel.send((refused, os.readlink(f"/proc/self/fd/{uffd.fileno()}")))

    with Target(body) as target:
        ((is_permission, code, message), user_mode), _ = target.recv()
        assert (is_permission, code) == (True, errno.EPERM), message
        assert "vm.unprivileged_userfaultfd=1" in message and "user_mode_only=True" in message
        assert user_mode == "anon_inode:[userfaultfd]"
        assert target.exit_code() == 0


def test_copy_stopped_by_a_populated_page_reports_progress_in_done() -> None:
    """The kernel returns EAGAIN, not EEXIST, when a multi-page copy stops part-way."""
    with Target(missing_target(4, populated=2)) as target:
        base, uffd = target.recv_uffd()
        whole = b"".join(pattern(i) for i in range(4))
        with pytest.raises(MappingChangedError) as caught:
            uffd.copy(base, whole)
        assert caught.value.done == 2 * PAGE
        with pytest.raises(PageExistsError):
            uffd.copy(base + caught.value.done, whole[caught.value.done :])
        assert uffd.copy(base + 3 * PAGE, pattern(3)) == PAGE
        target.send("done")
        assert target.exit_code() == 0
