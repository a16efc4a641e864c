"""The ABI layer against the numbers of include/uapi/linux/userfaultfd.h and fs.h."""

from __future__ import annotations

import os

import pytest

from userfaultfd import FEATURE_SINCE, Feature, Ioctl, Mode, _abi, supported_features


def test_ioctl_numbers_match_the_kernel_header() -> None:
    assert _abi.UFFDIO_REGISTER == 0xC020AA00
    assert _abi.UFFDIO_UNREGISTER == 0x8010AA01
    assert _abi.UFFDIO_WAKE == 0x8010AA02
    assert _abi.UFFDIO_COPY == 0xC028AA03
    assert _abi.UFFDIO_ZEROPAGE == 0xC020AA04
    assert _abi.UFFDIO_MOVE == 0xC028AA05
    assert _abi.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert _abi.UFFDIO_CONTINUE == 0xC020AA07
    assert _abi.UFFDIO_POISON == 0xC020AA08
    assert _abi.UFFDIO_API == 0xC018AA3F
    assert _abi.USERFAULTFD_IOC_NEW == 0xAA00
    assert _abi.PAGEMAP_SCAN == 0xC0606610


def test_message_is_32_bytes() -> None:
    assert _abi.UFFD_MSG.size == 32


def test_feature_bits_are_the_seventeen_of_the_header() -> None:
    assert len(Feature) == 17
    assert [f.value for f in Feature] == [1 << bit for bit in range(17)]
    assert set(FEATURE_SINCE) == set(Feature)
    assert Feature.MINOR_SHMEM == 1 << 10 and Feature.MOVE == 1 << 16


def test_ioctl_bits_use_the_ioctl_number() -> None:
    assert Ioctl.COPY == 1 << 3 and Ioctl.POISON == 1 << 8 and Ioctl.API == 1 << 0x3F
    assert [int(m) for m in Mode] == [1, 2, 4]


def test_flags_keep_bits_the_library_does_not_know() -> None:
    future = Feature((1 << 40) | Feature.MOVE)
    assert int(future) == (1 << 40) | (1 << 16)


def test_this_kernel_offers_every_known_feature() -> None:
    release = tuple(int(p) for p in os.uname().release.split(".")[:2])
    if release < (6, 8):
        pytest.skip(f"Linux {os.uname().release} predates UFFD_FEATURE_MOVE (6.8)")
    assert supported_features() & Feature(0x1FFFF) == Feature(0x1FFFF)
