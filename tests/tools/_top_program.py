"""A program with lazy memory for ``uffd top`` to watch (tests/tools/test_top.py).

``python _top_program.py FILE``: FILE holds little-endian u64 words, word i = i + 1 (none is
zero, each says where it is). Two arrays are served through handlers (one page per fault) and
a third is mapped directly by the kernel (no handler: top must not show it). Commands on stdin,
one a line; every answer is one JSON line on stdout:

- at start: {"handlers": [A's handler pid, B's]}, after touching A's pages 0..6 and every
  second page of B from 0 to 24 (7 and 13 pages) and the direct array's page 0;
- "rate": {"rating": true}, then touches B's pages 100..249 at 50 a second on a fixed
  schedule, then {"rated": 150};
- "stats": {"stats": [[faults, pages, poisoned, errors] of A, of B]}, as the program sees them;
- "exit": checks every page it touched again and exits 0 (1 if a word was wrong).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from userfaultfd.runtime import Single, lazy, server_of

WORDS = 512  # u64 words in a 4 KiB page


def touch(array: np.ndarray, page: int) -> None:
    word = page * WORDS + 7
    value = int(array[word])
    if value != word + 1:
        raise SystemExit(f"page {page}: word {word} read {value}, not {word + 1}")


def say(**message: object) -> None:
    print(json.dumps(message), flush=True)


def main(path: str) -> int:
    a = lazy(path, dtype=np.uint64, policy=Single())
    b = lazy(path, dtype=np.uint64, policy=Single())
    direct = lazy(path, dtype=np.uint64)
    touched: list[tuple[np.ndarray, int]] = []
    for page in range(7):
        touch(a, page)
        touched.append((a, page))
    for page in range(0, 26, 2):
        touch(b, page)
        touched.append((b, page))
    touch(direct, 0)
    say(handlers=[server_of(a).handler_pid, server_of(b).handler_pid])
    for line in sys.stdin:
        command = line.strip()
        if command == "rate":
            say(rating=True)
            start = time.monotonic()
            for n, page in enumerate(range(100, 250)):
                time.sleep(max(0.0, start + n / 50 - time.monotonic()))
                touch(b, page)
                touched.append((b, page))
            say(rated=150)
        elif command == "stats":
            say(stats=[[s.faults, s.pages, s.poisoned, s.errors]
                       for s in (server_of(a).stats(), server_of(b).stats())])  # fmt: skip
        elif command == "exit":
            for array, page in touched:
                touch(array, page)
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
