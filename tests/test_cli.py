"""The ``uffd`` command."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import _packs
from tests.criu.test_images import BASE, LAZY, _dump
from userfaultfd import Feature, memory, supported_features
from userfaultfd.cli import build_parser, main, run_command
from userfaultfd.cli._criu import add_criu_commands
from userfaultfd.cli._stores import add_store_commands
from userfaultfd.stores import BytesStore, ZstdStore, open_store, pack

PAGE = memory.page_size()


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
    supported = supported_features()
    assert [r["supported"] for r in rows] == [Feature(1 << r["bit"]) in supported for r in rows]


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


# -- uffd lazy on a source that cannot be read -----------------------------------------------------
CHUNK = 4 * PAGE


def nonzero_bytes(size: int) -> bytes:
    """Position-dependent bytes with no zero byte (a page served as zeros cannot pass)."""
    blocks = (hashlib.sha256(b"%d" % i).digest().replace(b"\0", b"\1") for i in range(size // 32))
    return b"".join(blocks)[:size]


def packed(tmp_path: Path, corrupt_chunk: int | None) -> Path:
    """A pack of 64 pages in chunks of 4 pages; ``corrupt_chunk``: one byte flipped inside it."""
    path = tmp_path / "data.pack"
    pack(BytesStore(nonzero_bytes(64 * PAGE)), path, chunk_size=CHUNK)
    if corrupt_chunk is not None:
        _packs.corrupt_chunk(path, corrupt_chunk)
    return path


def uffd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userfaultfd", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("order", ["seq", "random"])
def test_lazy_on_a_corrupt_pack_says_which_page_and_why(tmp_path: Path, order: str) -> None:
    """uffd lazy died of SIGBUS without a word (exit status 135)."""
    path = packed(tmp_path, corrupt_chunk=5)
    done = uffd("lazy", str(path), "--order", order)
    assert (done.returncode, done.stdout) == (1, ""), done
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    match = re.fullmatch(
        rf"uffd: page at offset (\d+) of {re.escape(str(path))} could not be read "
        r"\((.*)pack chunk 5 \(.*corrupt.*\); the memory there raises SIGBUS",
        line,
    )
    assert match is not None, line
    offset = int(match[1])
    if match[2]:  # a read-ahead window that reached the corrupt chunk was refused with it
        assert offset < 5 * CHUNK and "which failed: " in match[2], line
    else:
        assert 5 * CHUNK <= offset < 6 * CHUNK, line


def test_lazy_single_names_the_first_page_of_the_corrupt_chunk(tmp_path: Path) -> None:
    path = packed(tmp_path, corrupt_chunk=5)
    done = uffd("lazy", str(path), "--policy", "single")
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [
        f"uffd: page at offset {5 * CHUNK} of {path} could not be read (pack chunk 5 (bytes "
        f"{5 * CHUNK}..): corrupt: hash mismatch); the memory there raises SIGBUS"
    ]


def test_lazy_on_a_good_pack_reports_every_page(tmp_path: Path) -> None:
    done = uffd("lazy", str(packed(tmp_path, corrupt_chunk=None)), "--order", "random")
    assert done.returncode == 0, done.stderr
    assert "64 pages, random, adaptive" in done.stdout
    [filled] = [line for line in done.stdout.splitlines() if "pages filled" in line]
    assert " 64 " in filled
    [errors] = [line for line in done.stdout.splitlines() if "store errors" in line]
    assert " 0 " in errors


# -- one error boundary: commands raise, main prints one line ------------------------------------
@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["model", "run", "nope"], "uffd model: unknown scenario 'nope' (choose from "),
        (["model", "run", "wp-punch-hole", "--punch", "1-2"],
         "uffd model: bad --punch '1-2' (want START+PAGES, e.g. 1+2)"),
        (["lazy-pages", "--storage-option", "a=1", "IMG"],
         "uffd lazy-pages: --storage-option applies only with --pages URL"),
        (["lazy-pages", "--pages", "P", "--storage-option", "a=1", "--storage-option", "a.b=2",
          "IMG"], "uffd lazy-pages: --storage-option a.b: a is already a value"),
    ],
)  # fmt: skip
def test_usage_errors_found_by_a_command_are_one_line_and_status_2(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model's commands printed their own errors and returned 2; lazy-pages raised
    SystemExit (status 1). Now each raises, and main alone prints."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    [printed] = captured.err.splitlines()
    assert printed.startswith(line), printed
    assert captured.out == ""


def test_run_command_is_the_boundary_for_a_parser_of_ones_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A parser holding one command group reports through the same boundary as ``uffd``."""
    import argparse

    from userfaultfd.cli._model import add_model_commands

    parser = argparse.ArgumentParser(prog="uffd")
    add_model_commands(parser.add_subparsers(dest="command", required=True))
    assert run_command(parser.parse_args(["model", "replay", "wp-punch-hole", "fly*3"])) == 2
    [printed] = capsys.readouterr().err.splitlines()
    assert printed.startswith("uffd model: ") and "fly" in printed, printed


# -- each command defines its own options: no order between the groups ----------------------------
@pytest.mark.parametrize("criu_first", [False, True], ids=["stores-first", "criu-first"])
def test_pack_criu_is_accepted_whatever_order_the_groups_are_added_in(criu_first: bool) -> None:
    """_criu added --criu to the pack parser _stores had made: with _criu added first, --criu
    silently did not exist (``pack --criu`` was a usage error)."""
    parser = argparse.ArgumentParser(prog="uffd")
    commands = parser.add_subparsers(dest="command", required=True)
    groups = [add_store_commands, add_criu_commands]
    for add in reversed(groups) if criu_first else groups:
        add(commands)
    args = parser.parse_args(["pack", "--criu", "IMAGES", "DEST"])
    assert (args.command, args.criu, args.source, args.dest) == ("pack", True, "IMAGES", "DEST")


def test_pack_criu_through_main_packs_each_pages_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``uffd pack --criu IMAGES DEST`` writes DEST/pages-1.img, a pack of the dump's pages-1.img
    (images written here, no CRIU), with pack's --chunk-size."""
    (tmp_path / "images").mkdir()
    images = _dump(tmp_path / "images", [(BASE, 3, LAZY), (BASE + 6 * PAGE, 4, LAZY)])
    dest = tmp_path / "packs"
    assert build_parser().parse_args(["pack", "--criu", str(images), str(dest)]).criu is True
    assert main(["pack", "--criu", str(images), str(dest), "--chunk-size", "8K"]) == 0
    out = capsys.readouterr().out
    assert out.endswith(" s\n") and "uffd pack --criu: 1 pages images in " in out, out
    raw = (images / "pages-1.img").read_bytes()
    assert len(raw) == 7 * PAGE
    with open_store(dest / "pages-1.img") as store:
        assert isinstance(store, ZstdStore) and store.chunk_size == 8192, store
        assert store.size == len(raw)
        got = bytearray(store.size)
        store.read_into(0, memoryview(got))
    assert bytes(got) == raw


@pytest.mark.parametrize(
    ("argv", "name", "value"),
    [
        (["features", "--json"], "json", True),
        (["check", "--json"], "json", True),
        (["model", "list"], "model_command", "list"),
        (["serve", "--socket", "S", "STORE"], "socket", "S"),
        (["lazy", "SOURCE", "--order", "random"], "order", "random"),
        (["pack", "SRC", "DEST", "--level", "5"], "level", 5),
        (["snapshot", "DEST", "--writers", "3"], "writers", 3),
        (["lazy-pages", "IMAGES", "--no-background"], "background", False),
    ],
)
def test_each_command_has_its_options_once_it_is_parsed(
    argv: list[str], name: str, value: object
) -> None:
    """build_parser() defines a command's options only when the command is parsed (the table
    in cli/_commands.py names the function that defines them): each is there then."""
    args = build_parser().parse_args(argv)
    assert (args.command, getattr(args, name)) == (argv[0], value)
