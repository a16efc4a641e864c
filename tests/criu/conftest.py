"""Fixtures of the CRIU tests: a CRIU that runs on this kernel, and the compiled target."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def criu() -> str:
    """The wrapper of Debian trixie's CRIU in its cached private root (install_criu.sh)."""
    if os.geteuid() != 0:
        pytest.skip("criu dump and restore need root")
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        pytest.skip("installing CRIU needs apt-get and dpkg (a Debian system)")
    try:
        done = subprocess.run([str(HERE / "install_criu.sh")], capture_output=True, text=True,
                              timeout=600, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("installing CRIU from Debian trixie took longer than 600 s")
    if done.returncode != 0:
        pytest.skip(f"CRIU could not be installed from Debian trixie: {done.stderr[-800:]}")
    wrapper = done.stdout.strip().splitlines()[-1]
    check = subprocess.run([wrapper, "check"], capture_output=True, text=True, timeout=60,
                           check=False)  # fmt: skip
    if "Looks good" not in check.stdout + check.stderr:
        pytest.skip(f"criu check fails on this kernel: {(check.stdout + check.stderr)[-800:]}")
    return wrapper


@pytest.fixture(scope="session")
def target(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/criu/target.c, compiled."""
    if shutil.which("gcc") is None:
        pytest.skip("the target program needs gcc")
    out = tmp_path_factory.mktemp("criu-target") / "target"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(HERE / "target.c")],
                   check=True, timeout=120)  # fmt: skip
    return str(out)


@pytest.fixture(scope="session")
def regions_program(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/criu/regions.c (many one-page regions, optionally a zombie child), compiled."""
    if shutil.which("gcc") is None:
        pytest.skip("the target program needs gcc")
    out = tmp_path_factory.mktemp("criu-regions") / "regions"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(out), str(HERE / "regions.c")],
                   check=True, timeout=120)  # fmt: skip
    return str(out)
