"""``uffd model ...`` through add_model_commands, without the rest of the command line."""

from __future__ import annotations

import argparse
import pathlib
import shutil
from xml.etree import ElementTree

import pytest

from userfaultfd.cli import run_command
from userfaultfd.cli._model import add_model_commands


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uffd")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args)  # the CLI's one error boundary: a usage error is status 2


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["model", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("pre-patch", "as-posted", "markers-only", "upstream", "wp-punch-hole"):
        assert name in out


def test_run_prints_the_trace_and_exits_0_on_a_violation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert _main(["model", "run", "wp-punch-hole", "--kernel", "pre-patch"]) == 0
    out = capsys.readouterr().out
    assert "VIOLATION (untracked write)" in out
    assert "  4. read   do_fault_around" in out
    assert "uffd model replay wp-punch-hole --kernel pre-patch 'punch*2 read*2 write*3'" in out


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--no-reduction"], "reduction off"),
        (["--reduction", "none"], "reduction off"),
        (["--reduction", "sleep"], "reduction: sleep sets"),
        ([], "reduction: persistent sets"),
    ],
)
def test_run_with_each_reduction(
    flags: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(["model", "run", "wp-punch-hole", *flags]) == 0
    out = capsys.readouterr().out
    assert says in out
    assert "no violation: no untracked write in any reachable state" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model", "run", "nope"], "uffd model: unknown scenario 'nope'"),
        (["model", "run", "wp-punch-hole", "--kernel", "5.19"], "unknown kernel preset '5.19'"),
        (["model", "run", "wp-punch-hole", "--fault-around-bytes", "9999999"], "between 0"),
        (["model", "replay", "wp-punch-hole", "punch*9"], "step 7: thread 'punch'"),
        (["model", "run", "minor-fault-around", "--punchers", "2"], "has no punchers to size"),
        (["model", "run", "wp-punch-hole", "--punch", "1-2"], "bad --punch '1-2'"),
        (["model", "run", "wp-punch-hole", "--punchers", "2", "--punch", "1+1"], "but 1 --punch"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_replay(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model", "replay", "wp-punch-hole", "--kernel", "pre-patch", "punch*2 read*2 write*3"]
    assert _main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("VIOLATION (untracked write): frame #2")


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["model", "table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "kernel",
        "scenario",
        "verdict",
        "states",
        "transitions",
        "faults",
        "time",
    ]
    assert len(lines) == 1 + 12 + 1
    assert lines[1].split()[:4] == ["pre-patch", "wp-punch-hole", "violated:", "untracked"]


def test_run_at_other_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["model", "run", "wp-punch-hole", "--kernel", "pre-patch", "--readers", "2"]
    assert _main([*argv, "--pages", "8", "--punch", "1+2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "wp-punch-hole on pre-patch [readers=2 writers=1 punchers=1 pages=8 punch=1+2]"
    )
    assert "VIOLATION (untracked write)" in out
    schedule = out.split("replay: uffd model replay wp-punch-hole --kernel pre-patch ")[1]
    schedule = schedule.splitlines()[0].strip("'")
    replay = ["model", "replay", "wp-punch-hole", "--kernel", "pre-patch", schedule]
    assert _main([*replay, "--readers", "2", "--pages", "8", "--punch", "1+2"]) == 0
    assert "VIOLATION (untracked write)" in capsys.readouterr().out


def test_run_draws_the_counterexample(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svg = tmp_path / "race.svg"
    assert _main(["model", "run", "wp-punch-hole", "--kernel", "pre-patch", "--svg", str(svg)]) == 0
    assert f"diagram: {svg}" in capsys.readouterr().out
    root = ElementTree.fromstring(svg.read_text())  # well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    text = svg.read_text()
    for lane in ("punch", "read", "write", "server"):
        assert f">{lane}</text>" in text
    assert "7. store" in text and "12. load" in text
    assert text.count("stroke='#c92a2a' stroke-width='2'") == 1  # one violating step


def test_run_without_a_violation_draws_nothing(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    svg = tmp_path / "none.svg"
    assert _main(["model", "run", "wp-punch-hole", "--svg", str(svg)]) == 0
    assert "no counterexample: nothing to draw" in capsys.readouterr().out
    assert not svg.exists()


@pytest.mark.skipif(shutil.which("rsvg-convert") is None, reason="rsvg-convert not installed")
def test_run_draws_a_png(tmp_path: pathlib.Path) -> None:
    png = tmp_path / "race.png"
    assert _main(["model", "run", "wp-punch-hole", "--kernel", "pre-patch", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
