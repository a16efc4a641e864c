"""Run ``criu restore ... -d`` as a child subreaper, then wait for the restored task; or run a
program to dump as a subreaper that reaps its whole tree.

Usage: python3 _reaper.py PID TIMEOUT -- CRIU_COMMAND...
       python3 _reaper.py --tree TIMEOUT -- PROGRAM...

criu restore -d reparents the restored task to the nearest subreaper: this process, so it can
wait for the task and report how it ended (pid 1 here would leave it a zombie, unreported).
Prints ``restored RC`` once criu returns, then ``exit N``, ``signal N`` or ``timeout``.

``--tree`` starts PROGRAM in a session of its own (criu dump wants that), prints ``pid N``, and
reaps every process of its tree as it ends, until none is left: a zombie child of a dumped
program is reparented here when the dump kills the program (pid 1 here never reaps it, and the
restore needs its pid free again). After TIMEOUT seconds the tree is killed.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def main() -> int:
    timeout = float(sys.argv[2])
    command = sys.argv[sys.argv.index("--") + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("restored prctl-failed", flush=True)
        return 1
    if sys.argv[1] == "--tree":
        return reap_tree(command, timeout)
    pid = int(sys.argv[1])
    rc = subprocess.run(command, timeout=timeout, check=False).returncode
    print(f"restored {rc}", flush=True)
    if rc != 0:
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            print("lost", flush=True)  # not our child: criu did not reparent it here
            return 0
        if done:
            if os.WIFSIGNALED(status):
                print(f"signal {os.WTERMSIG(status)}", flush=True)
            else:
                print(f"exit {os.WEXITSTATUS(status)}", flush=True)
            return 0
        time.sleep(0.01)
    print("timeout", flush=True)
    with_kill(pid)
    return 0


def reap_tree(command: list[str], timeout: float) -> int:
    program = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    print(f"pid {program.pid}", flush=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0  # the whole tree is gone
        if time.monotonic() > deadline:
            os.killpg(program.pid, 9)
            deadline = float("inf")
        time.sleep(0.005)


def with_kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
