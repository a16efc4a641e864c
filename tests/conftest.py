from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from userfaultfd import memory


@pytest.fixture(scope="session")
def huge_page() -> int:
    return memory.huge_page_size()


@pytest.fixture
def hugepages() -> Iterator[int]:
    """Eight free huge pages for the test; the pool is put back as it was afterwards."""
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages (vm.nr_hugepages) needs root")
    with memory.huge_pages(8) as free:
        yield free
