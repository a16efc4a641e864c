"""Bad input across the public API and the command line: a clear, typed error, never a hang, and
from the CLI one line starting with ``uffd: `` and a non-zero exit status, never a traceback.

Whatever could register memory of a process and then block (serve, snapshot, the CLI's lazy)
runs in a forked child with a deadline (tests/_target.py) or in a subprocess with a timeout, so a
regression that accepts bad input fails the test instead of hanging pytest.

``TRIED`` counts the bad inputs; ``UFFD_FUZZ_REPORT=1`` prints the count at the end.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest

from userfaultfd import (
    Feature,
    FeatureUnavailableError,
    Mode,
    Userfaultfd,
    UserfaultfdError,
    UserfaultfdPermissionError,
    memory,
)
from userfaultfd.runtime import Region, lazy, serve
from userfaultfd.stores import BytesStore, StoreError, open_store
from userfaultfd.tools import restore, snapshot, track

from .._target import PAGE, Channel, Target

#: Bad inputs tried, by group.
TRIED: Counter[str] = Counter()
CLI_TIMEOUT: Final = 60.0
#: The kinds of memory userfaultfd can register, as a refusal must name them.
KINDS_NAMED: Final = "anonymous, shmem/memfd and hugetlbfs"


@pytest.fixture(scope="module", autouse=True)
def _report(pytestconfig: pytest.Config) -> Iterator[None]:
    yield
    if os.environ.get("UFFD_FUZZ_REPORT"):
        counts = ", ".join(f"{name} {n}" for name, n in sorted(TRIED.items()))
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        with getattr(capture, "global_and_fixture_disabled", contextlib.nullcontext)():
            print(f"bad inputs tried: {counts}; total {sum(TRIED.values())}")


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    """(exception type name, message) of ``call``, or ("returned", repr) when it did not raise;
    a Server or Snapshot it returned is stopped first, so nothing is left running."""
    try:
        result = call()
    except Exception as err:
        return type(err).__name__, str(err)
    with contextlib.suppress(Exception):
        result.stop(drain=False)  # type: ignore[attr-defined]
    with contextlib.suppress(Exception):
        result.wait(timeout=5)  # type: ignore[attr-defined]
    return "returned", repr(result)


def in_child(call: Callable[[], object], *, user: int | None = None) -> tuple[str, str]:
    """:func:`outcome` of ``call`` in a forked child (as ``user``, if given), with a deadline."""

    def body(channel: Channel) -> None:
        if user is not None:
            os.setgid(user)
            os.setuid(user)
        channel.send(outcome(call))

    with Target(body, timeout=30) as target:
        result, _ = target.recv()
        assert target.exit_code() == 0
    kind, message = result
    return str(kind), str(message)


def expect(group: str, call: Callable[[], object], error: str, match: str) -> None:
    """``call`` (run in a forked child) raises the exception type named ``error`` whose message
    contains ``match``."""
    TRIED[group] += 1
    kind, message = in_child(call)
    assert (kind, match in message) == (error, True), f"{kind}: {message}"


@contextlib.contextmanager
def file_mapping(folder: Path, length: int = 4 * PAGE) -> Iterator[tuple[int, int]]:
    """(address, length) of a MAP_SHARED mapping of a regular file on disk (not tmpfs)."""
    path = folder / "regular.bin"
    path.write_bytes(bytes(length))
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), length) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            yield ctypes.addressof(anchor), length
        finally:
            del anchor


def require_disk(folder: Path) -> None:
    kind = subprocess.run(
        ["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True, check=True
    ).stdout.strip()
    if kind in ("tmpfs", "ramfs"):
        pytest.skip(f"{folder} is on {kind}: a mapping of it is shmem, which can be registered")


# -- misaligned, zero-length and overflowing ranges ------------------------------------------------
_RANGES: Final = [
    pytest.param(1, PAGE, "multiples of the page size", id="misaligned-address"),
    pytest.param(0, PAGE + 1, "multiples of the page size", id="misaligned-length"),
    pytest.param(0, 0, "length must be positive", id="zero-length"),
]


@pytest.mark.parametrize(("offset", "length", "message"), _RANGES)
def test_userfaultfd_methods_refuse_bad_ranges(offset: int, length: int, message: str) -> None:
    with memory.anonymous(4 * PAGE) as mapping, Userfaultfd(Feature.MOVE) as uffd:
        uffd.register(mapping.address, mapping.length, Mode.MISSING)
        address = mapping.address + offset
        calls: dict[str, Callable[[], object]] = {
            "register": lambda: uffd.register(address, length, Mode.MISSING),
            "unregister": lambda: uffd.unregister(address, length),
            "wake": lambda: uffd.wake(address, length),
            "copy": lambda: uffd.copy(address, mapping.address, length),
            "zeropage": lambda: uffd.zeropage(address, length),
            "continue_": lambda: uffd.continue_(address, length),
            "writeprotect": lambda: uffd.writeprotect(address, length),
            "poison": lambda: uffd.poison(address, length),
            "move": lambda: uffd.move(address, mapping.address + 2 * PAGE, length),
        }
        for name, call in calls.items():
            TRIED["api"] += 1
            with pytest.raises(ValueError, match=message):
                call()
                pytest.fail(f"{name} accepted {offset=} {length=}")


@pytest.mark.parametrize(
    ("region", "store_size", "match"),
    [
        pytest.param((1, PAGE, 0), PAGE, "4096-byte aligned range", id="misaligned-address"),
        pytest.param((0, PAGE + 1, 0), 2 * PAGE, "4096-byte aligned range", id="misaligned-length"),
        pytest.param((0, 0, 0), PAGE, "must be a positive", id="zero-length"),
        pytest.param((0, -PAGE, 0), PAGE, "must be a positive", id="negative-length"),
        pytest.param((0, PAGE, -1), 2 * PAGE, "needs store bytes [-1, ", id="negative-offset"),
        pytest.param((0, 4 * PAGE, 0), 2 * PAGE, "the store has 8192 bytes", id="short-store"),
        pytest.param((0, 2 * PAGE, PAGE), 2 * PAGE, "the store has 8192", id="offset-past-store"),
    ],
)
def test_serve_refuses_bad_regions(
    region: tuple[int, int, int], store_size: int, match: str
) -> None:
    offset, length, store_offset = region

    def call() -> object:
        mapping = memory.anonymous(4 * PAGE)
        wanted = Region(mapping.address + offset, length, store_offset)
        return serve([wanted], BytesStore(bytes(store_size)), cpu=None)

    expect("api", call, "ValueError", match.replace("4096", str(PAGE)))


def test_serve_refuses_overlapping_regions() -> None:
    """Two regions sharing a page would give it two sources, and the first would silently win
    (pages of the second would read other store bytes than it asked for): refused."""

    def call() -> object:
        mapping = memory.anonymous(4 * PAGE)
        regions = [Region(mapping.address, 2 * PAGE, 0), Region(mapping.address + PAGE, 2 * PAGE)]
        return serve(regions, BytesStore(bytes(8 * PAGE)), cpu=None)

    expect("api", call, "ValueError", "overlap")


@pytest.mark.parametrize(
    ("region", "match"),
    [
        pytest.param((1, PAGE), "positive 4096-aligned range", id="misaligned-address"),
        pytest.param((0, PAGE + 1), "positive 4096-aligned range", id="misaligned-length"),
        pytest.param((0, 0), "positive 4096-aligned range", id="zero-length"),
    ],
)
def test_snapshot_and_track_refuse_bad_ranges(
    tmp_path: Path, region: tuple[int, int], match: str
) -> None:
    offset, length = region
    with memory.anonymous(4 * PAGE) as mapping:
        address = mapping.address + offset
        dest = str(tmp_path / "image")
        expect("api", lambda: snapshot((address, length), dest), "ValueError",
               match.replace("4096", str(PAGE)))  # fmt: skip
        TRIED["api"] += 1
        with pytest.raises(ValueError, match=f"must be positive multiples of {PAGE}"):
            track((address, length))


def test_snapshot_to_an_unwritable_destination_fails_before_protecting(tmp_path: Path) -> None:
    with memory.anonymous(PAGE) as mapping:
        dest = str(tmp_path / "missing-folder" / "image")
        expect("api", lambda: snapshot(mapping, dest), "FileNotFoundError", "missing-folder")


# -- memory that cannot be registered --------------------------------------------------------------
def test_a_regular_file_mapping_is_refused_naming_what_can_be_registered(tmp_path: Path) -> None:
    require_disk(tmp_path)
    with file_mapping(tmp_path) as (address, length):
        for mode in (Mode.MISSING, Mode.WP, Mode.MINOR):
            TRIED["api"] += 1
            with Userfaultfd() as uffd, pytest.raises(UserfaultfdError, match=KINDS_NAMED) as err:
                uffd.register(address, length, mode)
            assert err.value.errno == errno.EINVAL
        dest = str(tmp_path / "image")
        expect("api", lambda: snapshot((address, length), dest), "UserfaultfdError", KINDS_NAMED)
        expect("api", lambda: serve([Region(address, length)], BytesStore(bytes(length)),
                                    cpu=None), "UserfaultfdError", KINDS_NAMED)  # fmt: skip


def test_track_works_on_a_regular_file_mapping(tmp_path: Path) -> None:
    """Not a refusal: with WP_ASYNC and WP as the only mode, the kernel registers any memory
    (vma_can_userfault, mm/userfaultfd.c), so dirty tracking covers file mappings too."""
    require_disk(tmp_path)
    TRIED["api"] += 1
    with file_mapping(tmp_path) as (address, length), track((address, length)) as tracker:
        assert tracker.dirty() == []
        ctypes.memmove(address + PAGE, b"x", 1)
        ctypes.memmove(address + 3 * PAGE + 5, b"y", 1)
        assert tracker.dirty() == [1, 3]


# -- privileges and features -----------------------------------------------------------------------
@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder user 65534 can reach and write (pytest's tmp_path lies under a 0700 folder)."""
    folder = Path(tempfile.mkdtemp(prefix="uffd-bad-input-", dir="/var/tmp"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def _require_unprivileged_refusal() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping to an unprivileged user needs root")
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        if f.read().strip() != "0":
            pytest.skip("vm.unprivileged_userfaultfd=1 lets every user create a userfaultfd")


def test_missing_privileges_are_permission_errors_that_say_what_to_do(public_dir: Path) -> None:
    _require_unprivileged_refusal()
    dest = str(public_dir / "image")

    def serve_one() -> object:
        mapping = memory.anonymous(PAGE)
        return serve([mapping], BytesStore(bytes(PAGE)), cpu=None)

    def snapshot_one() -> object:
        return snapshot(memory.anonymous(PAGE), dest)

    for call in (lambda: Userfaultfd(), serve_one, snapshot_one):
        TRIED["privileges"] += 1
        kind, message = in_child(call, user=65534)
        assert kind == UserfaultfdPermissionError.__name__, message
        assert "vm.unprivileged_userfaultfd=1" in message and "user_mode_only=True" in message


def test_missing_privileges_from_the_cli_are_one_line(public_dir: Path) -> None:
    _require_unprivileged_refusal()
    source = public_dir / "source.bin"
    source.write_bytes(bytes(PAGE))
    source.chmod(0o644)
    log = public_dir / "stderr.txt"

    def body(channel: Channel) -> None:
        import rich.progress  # noqa: F401

        from userfaultfd.cli import main

        # uffd lazy imports rich when it runs, not before; nobody cannot read this
        # interpreter's standard library (under /root): rich is imported while we still can.
        with open(log, "w") as err, contextlib.redirect_stderr(err):
            os.setgid(65534)
            os.setuid(65534)
            status = main(["lazy", str(source)])
        channel.send(status)

    TRIED["cli"] += 1
    with Target(body, timeout=30) as target:
        status, _ = target.recv()
        assert target.exit_code() == 0
    lines = log.read_text().splitlines()
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith("uffd: "), lines
    assert "vm.unprivileged_userfaultfd=1" in lines[0]


@pytest.mark.parametrize("bit", [17, 40, 63])
def test_a_feature_the_kernel_lacks_is_named(bit: int) -> None:
    TRIED["features"] += 1
    with pytest.raises(FeatureUnavailableError, match=f"lacks bit {bit} ") as err:
        Userfaultfd(Feature(1 << bit))
    assert err.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "features",
    [
        1 << 64,
        -1,
    ],
)
def test_a_feature_mask_outside_64_bits_is_a_value_error(features: int) -> None:
    """Today 1 << 64 escapes as struct.error ("argument out of range") from the handshake."""
    TRIED["features"] += 1
    with pytest.raises(ValueError, match="bit mask"):
        Userfaultfd(features)  # type: ignore[arg-type]


# -- stores, images and sources shorter than they must be ------------------------------------------
def test_lazy_needs_a_source_as_long_as_its_shape() -> None:
    TRIED["api"] += 2
    with pytest.raises(ValueError, match="needs 80 bytes; the source has 16"):
        lazy(bytes(16), dtype="float64", shape=(10,))
    with pytest.raises(ValueError, match="the source is empty"):
        lazy(b"")


def test_restore_refuses_short_images_and_missing_deltas(tmp_path: Path) -> None:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(PAGE + 1))
    TRIED["api"] += 3
    with pytest.raises(ValueError, match=f"{base}: a base image of {PAGE + 1} bytes"):
        restore(base)
    base.write_bytes(bytes(2 * PAGE))
    with memory.anonymous(PAGE) as small, pytest.raises(ValueError, match="into is 4096 bytes"):
        restore(base, into=small)
    missing = tmp_path / "missing.delta"
    with pytest.raises(FileNotFoundError, match=r"missing\.delta"):
        restore(base, [missing])


def test_a_store_that_only_looks_like_a_pack_is_a_store_error(tmp_path: Path) -> None:
    fake = tmp_path / "fake.pack"
    fake.write_bytes(b"UFFDZST1" + bytes(100))
    TRIED["api"] += 1
    with pytest.raises(StoreError, match="pack format version 0 is not supported"):
        open_store(fake)


# -- the command line ------------------------------------------------------------------------------
def uffd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "userfaultfd", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "300"},
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], match: str) -> str:
    """Non-zero exit, no traceback, and the failure as one line starting with ``uffd: ``
    (after any lines the command printed while working, such as ``serving ...``)."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("uffd: "), result.stderr
    assert sum(line.startswith("uffd") for line in lines) == 1, result.stderr
    assert match in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 * PAGE))
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "fake.pack").write_bytes(b"UFFDZST1" + bytes(100))
    return {
        "SRC": str(source),
        "EMPTY": str(tmp_path / "empty.bin"),
        "FAKEPACK": str(tmp_path / "fake.pack"),
        "OUT": str(tmp_path / "out.pack"),
        "SOCK": str(tmp_path / "s.sock"),
        "IMG": str(tmp_path / "image"),
    }


def _args(case: object) -> list[str]:
    values = case.values if hasattr(case, "values") else case
    return list(values[0])  # type: ignore[index]


_CLI_FAILURES: Final = [
    # (arguments, text the one-line message contains, exit status)
    (["lazy", "/nonexistent/source"], "No such file or directory: '/nonexistent/source'", 1),
    (["lazy", "nosuchproto://bucket/key"], "Protocol not known: nosuchproto", 1),
    (["lazy", "http://127.0.0.1:9/missing"], "http://127.0.0.1:9/missing", 1),
    (["lazy", "{EMPTY}"], "the source is empty", 1),
    (["lazy", "{FAKEPACK}"], "pack format version 0 is not supported", 1),
    (["lazy", "{SRC}", "--policy", "window:x"], "bad policy 'window:x'", 1),
    (["lazy", "{SRC}", "--policy", "bogus"], "use single, window:N or adaptive", 1),
    (["lazy", "{SRC}", "--policy", "adaptive:-5"], "bad policy 'adaptive:-5'", 1),
    (["pack", "/nonexistent/source", "{OUT}"], "No such file or directory", 1),
    (["pack", "{SRC}", "{OUT}", "--chunk-size", "0"], "chunk size 0 is out of range", 1),
    (["pack", "{SRC}", "{OUT}", "--chunk-size", "2G"], "chunk size 2147483648 is out of range", 1),
    (["pack", "{SRC}", "{OUT}", "--level", "99"], "compression level 99 is out of range", 1),
    (
        ["pack", "{SRC}", "/nonexistent/dir/out.pack"],
        "out.pack: /nonexistent/dir does not exist",
        1,
    ),
    (["pack", "{FAKEPACK}", "{OUT}"], "pack format version 0 is not supported", 1),
    (["serve", "--socket", "/nonexistent/dir/s.sock", "{SRC}"], "No such file or directory", 1),
    (["serve", "--socket", "/tmp/" + "x" * 120, "{SRC}"], "AF_UNIX path too long", 1),
    (["serve", "--socket", "{SOCK}", "/nonexistent/store"], "No such file or directory", 1),
    (["serve", "--socket", "{SOCK}", "{SRC}", "--policy", "bogus"], "bad policy 'bogus'", 1),
    (["snapshot", "/nonexistent/dir/image", "--size", "1M"], "/nonexistent/dir/image", 1),
]


@pytest.mark.parametrize(
    ("arguments", "match", "status"), _CLI_FAILURES, ids=[" ".join(_args(c)) for c in _CLI_FAILURES]
)
def test_cli_failures_are_one_line(
    files: dict[str, str], arguments: list[str], match: str, status: int
) -> None:
    TRIED["cli"] += 1
    result = uffd(*(a.format(**files) for a in arguments))
    assert_one_line_failure(result, match)
    assert result.returncode == status


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (["model", "run", "nope"], "unknown scenario 'nope'"),
        (["model", "run", "wp-punch-hole", "--kernel", "nope"], "nope"),
        (["model", "replay", "wp-punch-hole", "fly*3"], "fly"),
    ],
)
def test_model_usage_errors_are_one_line(arguments: list[str], match: str) -> None:
    """The model's commands report usage errors themselves, as ``uffd model: ...``, status 2."""
    TRIED["cli"] += 1
    result = uffd(*arguments)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("uffd model: ") and match in lines[0], lines


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (["check", "--only", "nope"], "argument --only: invalid choice: 'nope'"),
        (["nope"], "argument COMMAND: invalid choice: 'nope'"),
        (["pack", "a", "b", "--chunk-size", "12X"], "'12X' is not a size"),
        (["check", "--race-seconds", "soon"], "argument --race-seconds: 'soon' is not a number of"),
        (["lazy", "SRC", "--cpu", "banana"], "argument --cpu: 'banana' is not a CPU number"),
        (["snapshot", "IMG", "--size", "1X"], "argument --size: '1X' is not a size"),
        (["snapshot", "IMG", "--size", "0"], "argument --size: must be from 4K to "),
        (["lazy"], "the following arguments are required: source"),
    ],
)
def test_argparse_errors_exit_2_with_usage(arguments: list[str], match: str) -> None:
    TRIED["cli"] += 1
    result = uffd(*arguments)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    lines = result.stderr.splitlines()
    assert lines[0].startswith("usage: uffd") and "error: " in lines[-1] and match in lines[-1]


def test_main_turns_each_failure_into_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() itself, for the exceptions no real bad input above raises."""
    from userfaultfd.cli import _main as cli

    failures: list[tuple[BaseException, int, str]] = [
        (TimeoutError("the handler did not finish in 5 s; killed"), 1,
         "uffd: the handler did not finish in 5 s; killed"),
        (RuntimeError("the snapshot handler failed\nwith two lines"), 1,
         "uffd: the snapshot handler failed with two lines"),
        (KeyboardInterrupt(), 130, "uffd: interrupted"),
        (LookupError("a bug"), 1, "uffd: internal error: LookupError: a bug"),
    ]  # fmt: skip
    for failure, status, line in failures:
        TRIED["cli"] += 1

        def fail(args: object, failure: BaseException = failure) -> int:
            raise failure

        monkeypatch.setattr(cli, "_features", fail)
        assert cli.main(["features"]) == status
        assert capsys.readouterr().err.splitlines() == [line]


# -- the command line's edges (issue 21, item 9) ---------------------------------------------------
HUGE: Final = "1" + "0" * 26
#: (argv, the one error line argparse must print). Each value was taken before: it ran with no
#: bound (``--writers 100000``, ``--layouts 10**26`` never ended), ended in "internal error:
#: OverflowError" (``--race-seconds 1e308``, ``--size 10**26``), passed a useless run as a PASS
#: (``--layouts -1``: "0/0 layouts agree"), or failed only when a client or task came (--cpu).
_OUT_OF_BOUNDS: Final = [
    (["check", "--race-seconds", "1e308"],
     "argument --race-seconds: must be more than 0 and at most 86400 seconds, not '1e308'"),
    (["check", "--race-seconds", "inf"], "argument --race-seconds: must be more than 0 and at"),
    (["check", "--race-seconds", "nan"], "argument --race-seconds: must be more than 0 and at"),
    (["check", "--race-seconds", "0"], "argument --race-seconds: must be more than 0 and at"),
    (["check", "--race-seconds", "-1"], "argument --race-seconds: must be more than 0 and at"),
    (["check", "--race-iterations", "0"],
     "argument --race-iterations: must be from 1 to 1000000000, not '0'"),
    (["check", "--race-iterations", "-1"], "argument --race-iterations: must be from 1 to"),
    (["check", "--race-iterations", HUGE], "argument --race-iterations: must be from 1 to"),
    (["check", "--layouts", "-1"], "argument --layouts: must be from 1 to 100000, not '-1'"),
    (["check", "--layouts", "0"], "argument --layouts: must be from 1 to 100000, not '0'"),
    (["check", "--layouts", HUGE], f"argument --layouts: must be from 1 to 100000, not '{HUGE}'"),
    (["snapshot", "IMG", "--writers", "100000"],
     "argument --writers: must be from 0 to 64, not '100000'"),
    (["snapshot", "IMG", "--writers", HUGE], "argument --writers: must be from 0 to 64, not"),
    (["snapshot", "IMG", "--size", HUGE], "argument --size: must be from 4K to "),
    (["snapshot", "IMG", "--size", "1"], "argument --size: must be from 4K to "),
    (["snapshot", "IMG", "--size", "9" * 5000], "argument --size: '99999"),
    (["lazy", "SRC", "--cpu", "99999"], "argument --cpu: CPU 99999 is not one this process may"),
    (["lazy", "SRC", "--cpu", "-1"], "argument --cpu: CPU -1 is not one this process may run"),
    (["lazy-pages", "IMAGES", "--cpu", "-1"], "argument --cpu: CPU -1 is not one this process"),
    (["lazy-pages", "IMAGES", "--cpu", HUGE], "argument --cpu: CPU 1000"),
]  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("argv", "line"), _OUT_OF_BOUNDS, ids=[" ".join(a)[:60] for a, _ in _OUT_OF_BOUNDS]
)
def test_every_count_and_duration_is_bounded_at_parse_time(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Parsed only (nothing runs, on today's code or the old): the value is refused by the
    parser, exit status 2, with one error line naming the option, its bound and the value."""
    from userfaultfd.cli import build_parser

    TRIED["cli"] += 1
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2, f"uffd {' '.join(argv)[:80]} was accepted"
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err) < 2000, err[:2000]
    last = err.splitlines()[-1]
    assert last.startswith(f"uffd {argv[0]}: error: ") and line in last, last


@pytest.mark.timeout(CLI_TIMEOUT + 10)
@pytest.mark.parametrize("policy", [f"window:{1 << 63}", f"adaptive:{1 << 63}", f"window:{HUGE}"])
def test_a_policy_too_large_for_the_handler_is_refused_before_it_starts(
    files: dict[str, str], policy: str
) -> None:
    """window:2**63 and adaptive:2**63 passed the parser and killed every handler
    (OverflowError); uffd lazy blamed the store: "page at offset 0 ... could not be read"."""
    TRIED["cli"] += 1
    line = assert_one_line_failure(uffd("lazy", files["SRC"], "--policy", policy), "bad policy")
    assert "at most" in line and "could not be read" not in line, line


# -- pack: DEST before any work --------------------------------------------------------------------
def _pack_destinations(tmp_path: Path) -> list[tuple[str, str]]:
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-file").write_bytes(b"x")
    return [
        (str(tmp_path / "a-directory"), "it is a directory"),
        (str(tmp_path / "missing" / "out.pack"), f"{tmp_path / 'missing'} does not exist"),
        (str(tmp_path / "a-file" / "out.pack"), f"{tmp_path / 'a-file'} is not a directory"),
        ("/proc/out.pack", "cannot make a file in /proc"),
        ("/proc/self/status", "cannot make a file in /proc/self"),
    ]


@pytest.mark.timeout(60)
def test_pack_checks_dest_before_reading_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``uffd pack SRC DIR`` (or a missing parent, or /proc) packed the whole source, then
    failed naming a hidden temporary file ('./.d.15356.140678128495488.tmp' -> 'd')."""
    from userfaultfd.cli import _stores, main

    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(4 * PAGE))
    opened: list[object] = []

    def open_store(*args: object, **options: object) -> None:
        opened.append(args)
        raise AssertionError("the source was opened")

    monkeypatch.setattr(_stores, "open_store", open_store)
    for dest, why in _pack_destinations(tmp_path):
        TRIED["cli"] += 1
        before = sorted(os.listdir(os.path.dirname(dest))) if os.path.isdir(
            os.path.dirname(dest)) and not dest.startswith("/proc") else None  # fmt: skip
        assert main(["pack", str(source), dest]) == 1, dest
        [line] = capsys.readouterr().err.splitlines()
        assert line.startswith(f"uffd: cannot write the pack to {dest}: ") and why in line, line
        assert ".tmp" not in line and ".probe" not in line, line
        assert opened == [], f"pack {dest}: the source was opened before DEST was checked"
        if before is not None:
            assert sorted(os.listdir(os.path.dirname(dest))) == before, "the check left a file"


@pytest.mark.timeout(60)
def test_pack_numbers_are_named_by_their_option(files: dict[str, str]) -> None:
    """The pack's own message named no option ("compression level 99 is out of range")."""
    for option, value, text in [
        ("--level", "99", "--level: compression level 99"),
        ("--chunk-size", "0", "--chunk-size: chunk size 0"),
        ("--dictionary", "1", "--dictionary: dictionary size 1"),
    ]:
        TRIED["cli"] += 1
        assert_one_line_failure(uffd("pack", files["SRC"], files["OUT"], option, value), text)
        assert not os.path.exists(files["OUT"])


# -- --prefetch: a working-set file, or a clear refusal --------------------------------------------
@pytest.mark.timeout(CLI_TIMEOUT * 3)
def test_prefetch_must_be_a_working_set_of_the_source(tmp_path: Path) -> None:
    """--prefetch took any file without a word: the handler skipped what it could not parse and
    every record outside the source, and the run went on as if nothing was asked."""
    import struct

    source = tmp_path / "source.bin"
    source.write_bytes(nonzero(16 * PAGE))
    record = struct.Struct("<QQ")
    cases = {
        "odd.ws": (b"\1" * 17, "17 bytes is not a whole number of 16-byte records"),
        "past.ws": (record.pack(0, PAGE) + record.pack(16 * PAGE, PAGE),
                    f"record 1 (offset {16 * PAGE}, length {PAGE}) reaches past the end of"),
        "a-directory": (None, "not a regular file"),
        "missing.ws": (None, "No such file or directory"),
    }  # fmt: skip
    for name, (data, why) in cases.items():
        TRIED["cli"] += 1
        if data is not None:
            (tmp_path / name).write_bytes(data)
        elif name == "a-directory":
            (tmp_path / name).mkdir()
        result = uffd("lazy", str(source), "--prefetch", str(tmp_path / name))
        assert result.returncode == 2 and result.stdout == "", (name, result)
        [line] = result.stderr.splitlines()
        assert line.startswith(f"uffd lazy: --prefetch {tmp_path / name}: ") and why in line, line
    # A working set --record wrote is taken, every page of it prefetched.
    recorded = tmp_path / "recorded.ws"
    assert uffd("lazy", str(source), "--record", str(recorded)).returncode == 0
    assert recorded.stat().st_size and recorded.stat().st_size % record.size == 0
    done = uffd("lazy", str(source), "--prefetch", str(recorded))
    assert done.returncode == 0, done.stderr
    [prefetched] = [line for line in done.stdout.splitlines() if "pages prefetched" in line]
    assert " 16 " in prefetched, prefetched


def nonzero(size: int) -> bytes:
    """Position-dependent bytes with no zero byte."""
    import hashlib

    blocks = (hashlib.sha256(b"%d" % i).digest().replace(b"\0", b"\1") for i in range(size // 32))
    return b"".join(blocks)[:size]


# -- signals: what a command made is gone when it ends ---------------------------------------------
def _wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "userfaultfd", *args],
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("signum", "status", "line"),
    [(signal.SIGTERM, 143, "uffd: terminated"), (signal.SIGINT, 130, "uffd: interrupted")],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_serve_removes_its_socket_when_stopped(
    files: dict[str, str], tmp_path: Path, signum: int, status: int, line: str
) -> None:
    """``uffd serve`` left its socket behind after Ctrl-C (and SIGTERM)."""
    TRIED["cli"] += 1
    sock, log = tmp_path / "serve.sock", tmp_path / "serve.log"
    process = _start("serve", "--socket", str(sock), files["SRC"], log=log)
    try:
        _wait_for(lambda: b"serving " in log.read_bytes() or process.poll() is not None, "serve")
        assert sock.is_socket(), log.read_text()
        process.send_signal(signum)
        assert process.wait(30) == status, log.read_text()
    finally:
        process.kill()
        process.wait(10)
    assert not sock.exists(), f"the socket is still there after {signal.Signals(signum).name}"
    assert log.read_text().splitlines()[-1] == line, log.read_text()


@pytest.mark.timeout(90)
def test_serve_once_removes_its_socket_when_the_client_is_done(tmp_path: Path) -> None:
    from tests.runtime.test_socket import guest_bytes, serve_client

    TRIED["cli"] += 1
    data = guest_bytes(4 * PAGE)
    (tmp_path / "store").write_bytes(data)
    sock, log = tmp_path / "once.sock", tmp_path / "serve.log"
    process = _start("serve", "--once", "--socket", str(sock), str(tmp_path / "store"), log=log)
    try:
        _wait_for(lambda: b"serving " in log.read_bytes() or process.poll() is not None, "serve")
        region = {"base_host_virt_addr": 0, "size": 4 * PAGE, "offset": 0, "page_size": PAGE}
        assert serve_client(str(sock), [region], 4) == ("served", data)
        assert process.wait(30) == 0, log.read_text()
    finally:
        process.kill()
        process.wait(10)
    assert not sock.exists(), "the socket is still there after the one client was served"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_snapshot_stopped_by_a_signal_leaves_nothing_at_dest(tmp_path: Path, signum: int) -> None:
    """``uffd snapshot`` killed by SIGTERM left DEST.partial (1 GiB here). SIGTERM now unwinds
    (the handler killed, the image removed); after SIGKILL, which nothing can catch, the handler
    finds its owner gone and removes the image itself."""
    TRIED["cli"] += 1
    dest, log = tmp_path / "image", tmp_path / "snapshot.log"
    partial = tmp_path / "image.partial"
    # 1 GiB takes about two seconds to copy: the signal lands while the handler writes the
    # image (blocks allocated: before that, the owner has only sized it, and no handler exists
    # yet to clean up after a SIGKILL).
    process = _start("snapshot", str(dest), "--size", "1G", log=log)
    try:
        _wait_for(lambda: (partial.exists() and partial.stat().st_blocks > 0)
                  or process.poll() is not None, "the image", timeout=60)  # fmt: skip
        assert process.poll() is None, log.read_text()
        process.send_signal(signum)
        assert process.wait(30) == (143 if signum == signal.SIGTERM else -signum)
    finally:
        process.kill()
        process.wait(10)
    _wait_for(lambda: not partial.exists(), f"{partial} to go", timeout=20)
    assert sorted(os.listdir(tmp_path)) == ["snapshot.log"], os.listdir(tmp_path)
    if signum == signal.SIGTERM:
        assert log.read_text().splitlines()[-1] == "uffd: terminated", log.read_text()
