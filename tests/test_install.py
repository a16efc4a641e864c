"""The package installs as a user gets it: pinned dependencies, and a wheel that works alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_requirement_of_the_test_extras() -> None:
    pins = _constraints()
    unpinned = []
    for spec in metadata.requires("userfaultfd") or []:
        requirement = Requirement(spec)
        if requirement.marker is None or requirement.marker.evaluate({"extra": "test"}):
            if _canonical(requirement.name) not in pins:
                unpinned.append(requirement.name)
            elif pins[_canonical(requirement.name)] not in requirement.specifier:
                unpinned.append(f"{requirement} (pinned {pins[_canonical(requirement.name)]})")
    assert not unpinned, f"constraints.txt does not satisfy: {', '.join(unpinned)}"


def test_the_environment_is_the_one_constraints_txt_describes() -> None:
    # Installed with -c constraints.txt, every pinned package that is present has its pinned
    # version: a mismatch means the tests ran against packages the README's command would not give.
    wrong = []
    for name, version in _constraints().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed != version:
            wrong.append(f"{name} {installed} (constraints.txt pins {version})")
    assert not wrong, "installed versions differ from constraints.txt: " + "; ".join(wrong)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("native", [True, False], ids=["with-native", "without-native"])
def test_the_wheel_carries_the_package_and_runs_check(tmp_path: Path, native: bool) -> None:
    # Without the native fast path (UFFD_BUILD_NATIVE=0, as on a machine with no compiler) the
    # wheel is pure Python and the handler serves through the Python path.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "UFFD_BUILD_NATIVE": "1" if native else "0"},
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("userfaultfd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        carried = set(archive.namelist())
    sources = {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "userfaultfd").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".so"
    }
    missing = sorted(sources - carried)
    assert not missing, f"the wheel lacks {missing}"
    assert "userfaultfd/py.typed" in carried
    extensions = sorted(name for name in carried if name.endswith(".so"))
    if native:
        assert len(extensions) == 1 and "_speedups" in extensions[0], extensions
        assert not wheel.name.endswith("-none-any.whl"), f"{wheel.name}: tagged pure Python"
    else:
        assert not extensions, f"UFFD_BUILD_NATIVE=0, yet the wheel carries {extensions}"
        assert wheel.name.endswith("-py3-none-any.whl"), wheel.name

    target = tmp_path / "site"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr
    # PYTHONPATH comes before the editable install's path entry, so this runs the wheel's copy;
    # the run from a directory outside the source tree keeps the checkout off sys.path.
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import userfaultfd; print(userfaultfd.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert where.stdout.strip() == str(target / "userfaultfd" / "__init__.py"), where
    check = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    path = subprocess.run(
        [sys.executable, "-c",
         "from userfaultfd._native import native_available; print(native_available())"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert path.stdout.strip() == str(native), path
