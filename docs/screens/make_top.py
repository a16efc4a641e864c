"""Draw docs/screens/top.svg: a frame of ``uffd top`` on a running program.

``python docs/screens/make_top.py``: starts a program with three lazy arrays over a 64 MiB file
(one read in order with the default policy, one at random a page a fault, one left alone after
a few pages), looks at it twice a second apart as ``uffd top`` does, and saves the second frame
with rich's ``Console(record=True).save_svg``. Needs the permissions ``uffd top`` needs (root,
or the right to ptrace the program).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from rich.console import Console

from userfaultfd.cli._top import render
from userfaultfd.tools import Top

HERE = os.path.dirname(os.path.abspath(__file__))

PROGRAM = r"""
import sys, time
import numpy as np
from userfaultfd.runtime import Single, lazy
path = sys.argv[1]
scan = lazy(path, dtype=np.uint64, direct=False)
probe = lazy(path, dtype=np.uint64, policy=Single())
idle = lazy(path, dtype=np.uint64, direct=False)
idle[:4096].sum()
rng = np.random.default_rng(1)
pages = scan.size // 512
print("ready", flush=True)
start = time.monotonic()
for n in range(pages):
    scan[n * 512]
    probe[int(rng.integers(pages)) * 512]
    time.sleep(max(0.0, start + n / 2000 - time.monotonic()))
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "weights.u64")
        np.arange(1, (64 << 17) + 1, dtype="<u8").tofile(path)  # 64 MiB: word i is i + 1
        program = subprocess.Popen([sys.executable, "-c", PROGRAM, path], stdout=subprocess.PIPE,
                                   text=True)  # fmt: skip
        try:
            assert program.stdout is not None and program.stdout.readline() == "ready\n"
            time.sleep(2.0)
            with Top(program.pid) as top:
                top.frame()
                top.wait(1.0)
                frame = top.frame()
        finally:
            program.kill()
            program.wait()
    console = Console(record=True, width=150, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(frame, 1.0))
    console.save_svg(os.path.join(HERE, "top.svg"), title=f"uffd top {frame.pid}")
    console.file.close()


if __name__ == "__main__":
    main()
