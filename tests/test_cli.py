"""The ``uffd`` command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from userfaultfd import Feature
from userfaultfd.cli import main


def test_features_prints_every_feature_with_its_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features"]) == 0
    out = capsys.readouterr().out
    for feature in Feature:
        assert feature.name is not None and feature.name in out
    assert "MINOR_SHMEM" in out and "5.14" in out


def test_features_json_is_machine_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["features", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 17
    assert rows[16] == {
        "name": "MOVE",
        "bit": 16,
        "supported": rows[16]["supported"],
        "since": "6.8",
    }
    assert all(isinstance(r["supported"], bool) for r in rows)


def test_module_entry_point_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "userfaultfd", "features"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "PAGEFAULT_FLAG_WP" in done.stdout


def test_unknown_command_exits_2() -> None:
    with pytest.raises(SystemExit) as caught:
        main(["no-such-command"])
    assert caught.value.code == 2
