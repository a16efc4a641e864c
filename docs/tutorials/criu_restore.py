"""Tutorial: restore a program dumped by CRIU, its memory streamed from packs over HTTP.

Runs as it is with root, nginx and a CRIU that works on this kernel: ``criu`` on PATH, or the
path of one in the environment variable ``CRIU`` (the tests' private CRIU 4.1.1 from
tests/criu/install_criu.sh is found by itself). Without CRIU it says so and exits with status
77, having run nothing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from remote_arrays import nginx  # the tutorial next door: nginx serving a directory

from userfaultfd.criu import lazy_pages, pack_images
from userfaultfd.runtime import Server

TESTS_CRIU = "/var/cache/userfaultfd-criu/criu"
PR_SET_CHILD_SUBREAPER = 36

# --8<-- [start:program]
# The program to dump: 8 MiB of words, word i holding i + 1 (so a page in the wrong place, or a
# page of zeros, is seen). It says when it is ready, and checks every word when told to go.
PROGRAM = """
import array, os, sys, time
work = sys.argv[1]
words = array.array("Q", range(1, (8 << 20) // 8 + 1))
open(f"{work}/ready", "w").close()
while not os.path.exists(f"{work}/go"):
    time.sleep(0.01)
bad = next((i for i, w in enumerate(words) if w != i + 1), None)
with open(f"{work}/result", "w") as f:
    f.write("ok" if bad is None else f"word {bad} holds {words[bad]}")
"""
# --8<-- [end:program]


def find_criu() -> str | None:
    for candidate in (os.environ.get("CRIU"), shutil.which("criu"), TESTS_CRIU):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.01)


def main() -> None:
    criu = find_criu()
    if criu is None or shutil.which("nginx") is None:
        print("skipped: this tutorial needs CRIU (criu on PATH, or CRIU=...) and nginx")
        sys.exit(77)
    # The restored program is reparented to us (criu restore -d leaves it): we reap it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    with tempfile.TemporaryDirectory() as tmp:
        work, images, www = Path(tmp) / "work", Path(tmp) / "images", Path(tmp) / "www"
        for directory in (work, images, www):
            directory.mkdir()

        # --8<-- [start:dump]
        # Start it in a session of its own (CRIU dumps a session leader without --shell-job),
        # and dump it once ready: the dump ends it.
        target = subprocess.Popen(
            [sys.executable, "-c", PROGRAM, str(work)], cwd=work, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(work / "ready", 30)
        dump = [criu, "dump", "-t", str(target.pid), "-D", str(images), "-o", "dump.log"]
        subprocess.run(dump, check=True, timeout=120)
        target.wait(timeout=30)  # its pid must be free again for the restore
        # --8<-- [end:dump]

        # --8<-- [start:pack]
        # Pack its memory (the pages images) into zstd packs, and serve them over HTTP.
        for info in pack_images(images, www / "packs"):
            print(f"packed {info.size:,} bytes into {info.packed_size:,}")
        # --8<-- [end:pack]

        with nginx(www) as url:
            # --8<-- [start:restore]
            # Instead of `criu lazy-pages`: this daemon serves the restored task's page faults
            # from the packs at the URL, then fills the rest in the background.
            restore = [criu, "restore", "-D", str(images), "--lazy-pages", "-d",
                       "-o", "restore.log"]  # fmt: skip
            started: list[subprocess.Popen[bytes]] = []

            def start_restore(socket_path: str) -> None:  # the daemon listens: go ahead
                started.append(subprocess.Popen(restore))

            def let_it_check(pid: int, server: Server) -> None:  # its memory is being served
                (work / "go").touch()

            summary = lazy_pages(images, pages=f"{url}/packs", on_listening=start_restore,
                                 on_task=let_it_check, connect_timeout=60)  # fmt: skip
            print(summary.line())
            assert started and started[0].wait(timeout=60) == 0, "criu restore failed"
            # --8<-- [end:restore]

        # --8<-- [start:check]
        wait_for(work / "result", 60)
        os.waitpid(target.pid, 0)  # the restored program, reparented to us, has ended
        result = (work / "result").read_text()
        assert result == "ok", f"the restored program read a wrong word: {result}"
        assert summary.tasks == 1 and summary.poisoned == 0, summary
        assert summary.on_demand + summary.background >= (8 << 20) // 4096, summary
        print("CRIU restore: the restored program read every word right")
        # --8<-- [end:check]


if __name__ == "__main__":
    main()
