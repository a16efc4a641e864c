"""A chunk cache only spares requests: whatever is wrong with it is a miss (issue 21).

A read-only cache directory, entries of another user (that this one may read but not touch,
replace or evict), an entry that is a directory, a FIFO or a link: each is a counted miss and a
debug line, and the frame comes from the pack, byte for byte. A directory shared by several
users (group-owned, mode 2775, as ChunkCache's docstring says) is used by all of them with no
error at all. The other-user cases run in a forked child that drops to nobody (65534).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._target import Channel, Target
from userfaultfd import memory
from userfaultfd.runtime import Single, lazy
from userfaultfd.stores import BytesStore, ChunkCache, ChunkedStore, pack

PAGE = memory.page_size()
CHUNK = 4 * PAGE
CHUNKS = 16
NOBODY = 65534


def position_bytes(size: int) -> bytes:
    """Bytes that depend on their position and are never zero (no page is a zero page)."""
    return bytes(1 + (i * 7 + i // 251) % 255 for i in range(size))


SOURCE = position_bytes(CHUNKS * CHUNK - 321)
assert 0 not in SOURCE


def first_wrong(got: bytes, want: bytes) -> str:
    """ "" when ``got`` is ``want``; else the first byte that differs and how many do."""
    if got == want:
        return ""
    if len(got) != len(want):
        return f"{len(got)} bytes where {len(want)} were expected"
    wrong = [i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b]
    i = wrong[0]
    return f"byte {i} is {got[i]}, not {want[i]} ({len(wrong)} of {len(want)} bytes wrong)"


@pytest.fixture
def public() -> Iterator[Path]:
    """A folder nobody can reach (pytest's tmp_path lies under a 0700 folder), with the pack in
    ``pack/`` (readable by all)."""
    folder = Path(tempfile.mkdtemp(prefix="uffd-cache-", dir="/var/tmp"))
    folder.chmod(0o755)
    old = os.umask(0o022)
    try:
        pack(BytesStore(SOURCE), folder / "pack" / "c.index", chunk_size=CHUNK, layout="chunks")
    finally:
        os.umask(old)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def key_of(folder: Path, chunk: int) -> str:
    """The cache entry's name of ``chunk``'s frame (its hash, as the index names it)."""
    with ChunkedStore(folder / "pack" / "c.index") as store:
        index = store._index
        return index.frame_hash[index.page_frame[chunk * CHUNK // PAGE]].hex()


def read_all(store: ChunkedStore) -> bytes:
    """Every byte of the store, a chunk at a time (each chunk's frame looked up once)."""
    out = bytearray(store.size)
    for offset in range(0, store.size, CHUNK):
        view = memoryview(out)[offset : offset + CHUNK]
        assert store.read_into(offset, view) == len(view)
    return bytes(out)


def fill(folder: Path, cache_dir: Path, chunks: range, umask: int = 0o022) -> None:
    """Cache ``chunks``' frames in ``cache_dir`` as this user (root), with ``umask``."""
    old = os.umask(umask)
    try:
        cache = ChunkCache(cache_dir, 64 << 20)
        with ChunkedStore(folder / "pack" / "c.index", cache=cache) as store:
            for c in chunks:
                store.read_into(c * CHUNK, memoryview(bytearray(CHUNK)))
    finally:
        os.umask(old)
    assert len(os.listdir(cache_dir)) == len(chunks), os.listdir(cache_dir)


@contextlib.contextmanager
def read_only_view(source: Path, where: Path) -> Iterator[Path]:
    """``source`` bind-mounted read-only at ``where`` (root may not write there either)."""
    where.mkdir()
    made = subprocess.run(["mount", "--bind", str(source), str(where)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {made.stderr.decode().strip()}")
    try:
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def counts(cache: ChunkCache) -> tuple[int, int, int]:
    return cache.hits, cache.misses, cache.errors


def no_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# --- as root -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_read_only_cache_directory_is_used_and_misses(
    public: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(public, public / "cache", range(0, CHUNKS, 2))  # the even chunks are cached
    with read_only_view(public / "cache", public / "ro") as ro:
        caplog.set_level(logging.DEBUG, logger="userfaultfd.stores")
        cache = ChunkCache(ro, 64 << 20)
        with ChunkedStore(public / "pack" / "c.index", cache=cache) as store:
            got = read_all(store)
            assert not first_wrong(got, SOURCE), first_wrong(got, SOURCE)
            assert store.fetches == CHUNKS // 2, f"{store.fetches} fetches: the hits were fetched"
        hits, misses, errors = counts(cache)
        assert (hits, misses) == (CHUNKS // 2, CHUNKS // 2), counts(cache)
        # Each odd chunk's put failed (EROFS), and each even one's refresh (utime) did.
        assert errors == CHUNKS, counts(cache)
        debug = [r.getMessage() for r in caplog.records if r.name == "userfaultfd.stores"]
        assert len(debug) == errors and all(str(ro) in line for line in debug), debug
        assert any("Read-only file system" in line for line in debug), debug
        assert not no_warnings(caplog), no_warnings(caplog)


@pytest.mark.timeout(60)
def test_lazy_over_a_read_only_cache_serves_every_byte(public: Path) -> None:
    """lazy() with a read-only cache (it raised on today's code): every page right."""
    fill(public, public / "cache", range(0, CHUNKS, 3))
    with read_only_view(public / "cache", public / "ro") as ro:

        def body(channel: Channel) -> None:
            view = lazy(str(public / "pack" / "c.index"), cache=ChunkCache(ro, 64 << 20),
                        policy=Single())  # fmt: skip
            channel.send(first_wrong(bytes(view), SOURCE))  # every byte, compared here

        with Target(body, timeout=30) as target:
            wrong, _ = target.recv()
            assert target.exit_code() == 0
        assert not wrong, f"lazy() over a read-only cache: {wrong}"


def _directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_bytes(b"x")  # not empty: a rename over it fails too


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # an open for reading without O_NONBLOCK would wait for a writer forever


def _link_to_fifo(path: Path) -> None:
    os.mkfifo(path.with_name("fifo"))
    path.symlink_to(path.with_name("fifo"))


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("make", "replaced"),
    [(_directory, False), (_fifo, True), (_link_to_fifo, True)],
    ids=["dir", "fifo", "link"],
)
def test_an_entry_of_the_wrong_type_is_a_miss(
    public: Path, make: Callable[[Path], None], replaced: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """Chunk 5's entry is a directory (a rename cannot replace it: it misses every time), a
    FIFO or a link to one (the first put replaces it with the frame: then it hits)."""
    caplog.set_level(logging.DEBUG, logger="userfaultfd.stores")
    cache_dir = public / "cache"
    cache_dir.mkdir()
    entry = cache_dir / key_of(public, 5)
    make(entry)
    cache = ChunkCache(cache_dir, 64 << 20)
    with ChunkedStore(public / "pack" / "c.index", cache=cache, cache_chunks=1) as store:
        got = read_all(store)
        assert not first_wrong(got, SOURCE), first_wrong(got, SOURCE)
        assert counts(cache)[:2] == (0, CHUNKS), counts(cache)
        again = read_all(store)
        assert not first_wrong(again, SOURCE), first_wrong(again, SOURCE)
        fetched = store.fetches
    hits, misses, errors = counts(cache)
    if replaced:
        assert stat.S_ISREG(entry.lstat().st_mode), "the put did not replace the entry"
        assert (hits, misses, errors, fetched) == (CHUNKS, CHUNKS, 1, CHUNKS), counts(cache)
    else:
        # Each pass: the lookup (not a regular file) and the put (a rename over a directory).
        assert (hits, misses, errors) == (CHUNKS - 1, CHUNKS + 1, 4), counts(cache)
        assert fetched == CHUNKS + 1, f"{fetched} fetches"
    assert not no_warnings(caplog), no_warnings(caplog)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == errors and all(entry.name in line for line in lines), lines


@pytest.mark.timeout(30)
def test_an_unreadable_entry_and_a_failed_discard_are_misses(public: Path) -> None:
    """A bad copy that cannot be removed (its directory is read-only): fetched every time."""
    fill(public, public / "cache", range(CHUNKS))
    entry = public / "cache" / key_of(public, 7)
    good = entry.read_bytes()
    entry.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with read_only_view(public / "cache", public / "ro") as ro:
        cache = ChunkCache(ro, 64 << 20)
        with ChunkedStore(public / "pack" / "c.index", cache=cache, cache_chunks=1) as store:
            for _ in range(2):
                got = read_all(store)
                assert not first_wrong(got, SOURCE), first_wrong(got, SOURCE)
            assert store.fetches == 2, f"{store.fetches}: the bad copy, fetched once a pass"


# --- as another user ------------------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping to another user needs root")


def as_nobody(folder: Path, cache_dir: Path, extra: Callable[[], Any] = lambda: None) -> Any:
    """Read the whole pack through a cache over ``cache_dir`` as user and group nobody, in a
    forked child: (first_wrong of what it read, (hits, misses, errors), fetches, extra() after
    the read)."""

    def body(channel: Channel) -> None:
        warm = ChunkedStore(folder / "pack" / "c.index")  # imports what a read needs, as root
        warm.read_into(0, memoryview(bytearray(PAGE)))
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        cache = ChunkCache(cache_dir, 64 << 20)
        with ChunkedStore(folder / "pack" / "c.index", cache=cache) as store:
            got = read_all(store)
            channel.send((first_wrong(got, SOURCE), counts(cache), store.fetches, extra()))

    with Target(body, timeout=30) as target:
        result, _ = target.recv()
        assert target.exit_code() == 0
    return result


@pytest.mark.timeout(60)
def test_a_cache_filled_by_root_serves_another_user(public: Path) -> None:
    """root's entries (0644, in root's 0755 directory): nobody reads them (hits), cannot
    refresh them or add its own (counted misses), and reads every byte right."""
    _require_root()
    cache_dir = public / "cache"
    cache_dir.mkdir(mode=0o755)
    fill(public, cache_dir, range(0, CHUNKS, 2))
    wrong, (hits, misses, errors), fetches, _ = as_nobody(public, cache_dir)
    assert not wrong, f"as nobody: {wrong}"
    assert (hits, misses) == (CHUNKS // 2, CHUNKS // 2), (hits, misses, errors)
    assert fetches == CHUNKS // 2, f"{fetches} fetches: root's entries were not used"
    assert errors == CHUNKS, f"{errors}: each refresh (EPERM) and each put (EACCES) counted"


@pytest.mark.timeout(60)
def test_a_shared_cache_directory_needs_no_error(public: Path) -> None:
    """The mode ChunkCache documents: a directory of a group both users are in, 2775, entries
    written with umask 002. nobody uses root's entries, refreshes them, adds its own; root
    then reads everything from the cache."""
    _require_root()
    cache_dir = public / "cache"
    cache_dir.mkdir()
    os.chown(cache_dir, 0, NOBODY)
    cache_dir.chmod(0o2775)
    fill(public, cache_dir, range(0, CHUNKS, 2), umask=0o002)

    def entries() -> list[tuple[str, int, int, int]]:
        found = []
        for name in sorted(os.listdir(cache_dir)):
            st = os.stat(cache_dir / name)
            found.append((name, st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)))
        return found

    old = os.umask(0o002)  # the child inherits it
    try:
        wrong, (hits, misses, errors), fetches, made = as_nobody(public, cache_dir, entries)
    finally:
        os.umask(old)
    assert not wrong, f"as nobody: {wrong}"
    assert (hits, misses, errors) == (CHUNKS // 2, CHUNKS // 2, 0), (hits, misses, errors)
    assert fetches == CHUNKS // 2
    theirs = [(uid, gid, mode) for _, uid, gid, mode in made if uid == NOBODY]
    assert theirs == [(NOBODY, NOBODY, 0o664)] * (CHUNKS // 2), made
    cache = ChunkCache(cache_dir, 64 << 20)
    with ChunkedStore(public / "pack" / "c.index", cache=cache) as store:
        got = read_all(store)
        assert not first_wrong(got, SOURCE), first_wrong(got, SOURCE)
        assert store.fetches == 0 and counts(cache) == (CHUNKS, 0, 0), counts(cache)
