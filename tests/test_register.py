"""What UFFDIO_REGISTER returns for each mode on each kind of memory."""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from collections.abc import Callable

import pytest

from userfaultfd import Ioctl, Mode, Userfaultfd, UserfaultfdError, memory

from ._target import PAGE

# The range ioctls of include/uapi/linux/userfaultfd.h (UFFD_API_RANGE_IOCTLS, plus POISON
# since 6.6), minus what the kernel withholds: WRITEPROTECT unless the mode has WP, CONTINUE
# unless it has MINOR; hugetlbfs gets the _BASIC set (no ZEROPAGE, no MOVE).
FULL = Ioctl.WAKE | Ioctl.COPY | Ioctl.ZEROPAGE | Ioctl.MOVE | Ioctl.POISON
BASIC = Ioctl.WAKE | Ioctl.COPY | Ioctl.POISON


def expected(base: Ioctl, mode: Mode) -> Ioctl:
    result = base
    if mode & Mode.WP:
        result |= Ioctl.WRITEPROTECT
    if mode & Mode.MINOR:
        result |= Ioctl.CONTINUE
    return result


MODES = [Mode.MISSING, Mode.WP, Mode.MINOR, Mode.MISSING | Mode.WP, Mode.MISSING | Mode.MINOR]


def register(make: Callable[[], memory.Mapping], mode: Mode) -> Ioctl:
    with make() as mapping, Userfaultfd() as uffd:
        return uffd.register(mapping.address, mapping.length, mode)


@pytest.mark.parametrize("mode", MODES, ids=repr)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "private"])
def test_shmem_accepts_every_mode(mode: Mode, shared: bool) -> None:
    assert register(lambda: memory.memfd(4 * PAGE, shared=shared), mode) == expected(FULL, mode)


@pytest.mark.parametrize("mode", [Mode.MISSING, Mode.WP, Mode.MISSING | Mode.WP], ids=repr)
def test_anonymous_accepts_missing_and_wp(mode: Mode) -> None:
    assert register(lambda: memory.anonymous(4 * PAGE), mode) == expected(FULL, mode)


def test_anonymous_refuses_minor() -> None:
    with pytest.raises(UserfaultfdError, match="MINOR needs shmem or hugetlbfs") as caught:
        register(lambda: memory.anonymous(4 * PAGE), Mode.MINOR)
    assert caught.value.errno == errno.EINVAL


@pytest.mark.parametrize("mode", MODES, ids=repr)
@pytest.mark.parametrize("kind", ["anonymous", "memfd"])
def test_hugetlbfs_accepts_every_mode(
    mode: Mode, kind: str, hugepages: int, huge_page: int
) -> None:
    make = (
        (lambda: memory.hugetlb(2 * huge_page))
        if kind == "anonymous"
        else (lambda: memory.memfd(2 * huge_page, hugetlb=True))
    )
    assert register(make, mode) == expected(BASIC, mode)


def test_regular_file_is_refused() -> None:
    # Beside the tests, on the checkout's disk file system (/tmp may be tmpfs, i.e. shmem).
    with tempfile.TemporaryFile(dir=os.path.dirname(__file__)) as f:
        f.write(bytes(4 * PAGE))
        f.flush()
        _register_file_mapping(f.fileno())


def _register_file_mapping(fd: int) -> None:
    with mmap.mmap(fd, 4 * PAGE) as mm, Userfaultfd() as uffd:
        mapping = memory.Mapping(mm, 4 * PAGE, kind="file")
        with pytest.raises(UserfaultfdError, match="anonymous, shmem/memfd and hugetlbfs"):
            uffd.register(mapping.address, mapping.length, Mode.MISSING)
        mapping.view.release()


def test_second_userfaultfd_cannot_take_a_registered_range() -> None:
    with memory.anonymous(4 * PAGE) as m, Userfaultfd() as first, Userfaultfd() as second:
        first.register(m.address, m.length)
        with pytest.raises(UserfaultfdError, match="another userfaultfd") as caught:
            second.register(m.address, m.length)
        assert caught.value.errno == errno.EBUSY


def test_unregister_then_register_again() -> None:
    with memory.anonymous(4 * PAGE) as m, Userfaultfd() as uffd:
        uffd.register(m.address, m.length, Mode.WP)
        uffd.unregister(m.address, m.length)
        assert uffd.register(m.address, m.length, Mode.MISSING) == expected(FULL, Mode.MISSING)
