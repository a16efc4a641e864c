"""``uffd pack``: the argparse glue, on a parser built here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tests.stores._checks import assert_range
from tests.stores.conftest import make_payload
from userfaultfd.cli._args import parse_size
from userfaultfd.cli._stores import add_store_commands
from userfaultfd.stores import ChunkedStore, ZstdStore, open_store

DATA = make_payload(200_000, seed=5)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="uffd")
    add_store_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


def test_pack_command_writes_a_pack_and_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "src").write_bytes(DATA)
    dest = tmp_path / "out.pack"
    assert (
        _run(["pack", str(tmp_path / "src"), str(dest), "--chunk-size", "64K", "--level", "5"]) == 0
    )
    out = capsys.readouterr().out
    assert re.fullmatch(
        rf"{tmp_path}/src -> {dest}: 195\.3 KiB -> \d+\.\d KiB \(ratio \d+\.\d\dx\),"
        r" 4 chunks of 64\.0 KiB, level 5, (\d+\.\d KiB) written, \d+\.\d\d s\n",
        out,
    ), out
    with open_store(dest) as store:
        assert isinstance(store, ZstdStore) and store.chunk_size == 65536
        assert_range(store, DATA, 0, len(DATA))


def test_pack_command_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").write_bytes(b"x" * 10)
    assert _run(["pack", str(tmp_path / "src"), str(tmp_path / "p")]) == 0
    assert "1 chunks of 64.0 KiB, level 3, 119 B written" in capsys.readouterr().out


def test_pack_command_chunks_layout_reports_unique_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = DATA + bytes(65536)  # one zero chunk at the end
    (tmp_path / "src").write_bytes(data)
    dest = tmp_path / "packs" / "a.index"
    argv = ["pack", str(tmp_path / "src"), str(dest), "--layout", "chunks", "--chunk-size", "64K"]
    assert _run(argv) == 0
    first = capsys.readouterr().out
    assert re.search(r"5 chunks of 64\.0 KiB \(1 zero\), level 3, \d+\.\d KiB written", first), (
        first
    )
    assert _run(argv) == 0  # the same source again: only the index is new
    second = capsys.readouterr().out
    assert re.search(rf", level 3, {dest.stat().st_size} B written", second), second
    with open_store(dest) as store:
        assert isinstance(store, ChunkedStore) and store.zero_chunks == 1
        assert_range(store, data, 0, len(data))


def test_pack_command_dictionary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "src").write_bytes(DATA)
    dest = tmp_path / "d.pack"
    argv = ["pack", str(tmp_path / "src"), str(dest), "--chunk-size", "4K", "--dictionary", "4K"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    match = re.search(r"\(a (\d+) B dictionary\)", out)  # the trainer may make it smaller
    assert match is not None, out
    with open_store(dest) as store:
        assert isinstance(store, ZstdStore) and store.dictionary == int(match[1]) <= 4096
        assert_range(store, DATA, 0, len(DATA))


def test_pack_command_errors_are_exceptions_for_main(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _run(["pack", str(tmp_path / "missing"), str(tmp_path / "p")])
    (tmp_path / "src").write_bytes(b"x")
    with pytest.raises(ValueError, match="compression level 99 is out of range"):
        _run(["pack", str(tmp_path / "src"), str(tmp_path / "p"), "--level", "99"])


def test_bad_chunk_size_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        _run(["pack", "a", "b", "--chunk-size", "lots"])
    assert caught.value.code == 2
    assert "'lots' is not a size" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [("65536", 65536), ("64K", 65536), ("64k", 65536), ("1M", 1 << 20), ("1MiB", 1 << 20),
     ("2G", 2 << 30), ("4kb", 4096)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size
