"""The README stays true: its example runs, and CI runs its test command."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", readme(), re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr


def test_ci_runs_the_readme_test_command() -> None:
    first_block = re.search(r"```sh\n(.*?)```", readme(), re.S)
    assert first_block is not None
    install_and_run, test_command = first_block.group(1).strip().splitlines()[:2]
    assert "uffd" in install_and_run
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert test_command in f.read().splitlines()
