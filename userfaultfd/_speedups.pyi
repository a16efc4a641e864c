# The native fast path (userfaultfd/_speedups.c): optional, see runtime/_answer.py.
from collections.abc import Sequence
from typing import final

@final
class RegionTable:
    def __init__(self, regions: Sequence[object]) -> None: ...

@final
class Answerer:
    def __init__(
        self,
        segments: list[tuple[int, int, int]],
        counters: int,
        indices: tuple[int, int, int, int, int, int, int],
        policy: int,
        window: int = 1,
        min_pages: int = 1,
        max_bytes: int = 8388608,
        journal: int = 0,
    ) -> None: ...
    def serve(self, fd: int, table: RegionTable, key: int, batch: int) -> bytes: ...
    def wait(
        self,
        sources: list[tuple[int, RegionTable, int]],
        others: list[int],
        timeout_ms: int,
        batch: int,
    ) -> tuple[list[int], list[tuple[int, bytes]]]: ...

def watch(
    uffd: int, pidfd: int, area: int, area_length: int, ranges: list[tuple[int, int, int]]
) -> None: ...
