"""A store over any fsspec URL (http(s)://, s3://, memory://, file://), read with range requests.

Fork: fsspec's async filesystems (HTTP, S3) run their I/O on an event loop in a daemon thread and
keep an aiohttp session bound to it. Neither survives fork: the child has the loop object but not
its thread, so a call on the parent's filesystem waits forever. fsspec clears its instance cache
and its loop globals in the child (``os.register_at_fork``), so :meth:`FsspecStore.reopen` builds
a new filesystem with ``skip_instance_cache=True`` and that gets a new loop thread and session.
The parent's filesystems must also never be collected in the child: fsspec's finalizer would
close their sessions through the parent's loop and stall for a second waiting on the missing
thread (a handler doing ``store = store.reopen()`` drops the last reference). An at-fork hook keeps
them alive in the child, untouched.

Time: every request has a deadline (``timeout``) and the store alone retries, so a dead server or
a cut link costs at most about ``tries x timeout`` plus the backoff, never a hang. The clients'
own retries are turned off where they are options (botocore's, s3fs's), else they multiply.
Credentials: a refusal (HTTP 401/403, S3's key and signature errors) is EACCES at once; asking
again with the same keys cannot succeed.

Versions and first bytes: a store is pinned to the version of the object it opened, and its open
is one request that also brings the first 64 KiB (stores/_pinning.py, shared with HttpStore). For
S3 the pin is the VersionId when the bucket is versioned (the old version keeps being served after
an overwrite; reading by version needs s3:GetObjectVersion) and ``IfMatch``. Every answer's total
size and validators are checked against the open's before its body is read, so a server (or an
S3 look-alike) that ignores the preconditions gives ESTALE, not the new bytes; an HTTP server that
ignores Range is refused at the open when the object is longer than the first read. Only another
protocol (memory://, gcs://, ...) opens with ``info()`` and keeps no bytes.

HTTP: :func:`open_store` gives an :class:`HttpStore` (no fsspec) for HTTP URLs whose options it
honours; this store serves the others (aiohttp objects, proxies, cookies) through fsspec's client.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import fsspec.asyn
import fsspec.core
import fsspec.utils

from ._base import PARALLEL_REQUESTS, Store, StoreError
from ._http import RangeIgnoredError
from ._pinning import (
    DEFAULT_TIMEOUT,
    HEAD_BYTES,
    Version,
    check_answer,
    http_conditions,
    stale,
    take_head,
    version_of,
)
from ._retries import call_with_retries, s3_code

__all__ = ["PARALLEL_REQUESTS", "FsspecStore", "connect", "with_timeouts"]

_T = TypeVar("_T")

# Every filesystem a store made, including garbage not yet collected (a filesystem can sit in a
# reference cycle after its store is gone): a weak reference lives until the collector runs.
# Keyed by id: filesystems compare equal by their options, so a WeakSet would keep only one.
_MADE: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_INHERITED: list[Any] = []  # filesystems of the parent process, kept so they are never finalized


def _keep_inherited_filesystems() -> None:
    _INHERITED.extend(_MADE.values())
    _MADE.clear()


os.register_at_fork(after_in_child=_keep_inherited_filesystems)

_S3 = ("s3", "s3a")
_HTTP = ("http", "https")


def _s3_pin(version: Version) -> dict[str, str]:
    """GetObject / HeadObject parameters that select ``version`` or fail with 412."""
    pin = {}
    if version.version_id is not None:
        pin["VersionId"] = version.version_id
    if version.etag is not None:
        pin["IfMatch"] = version.etag
    return pin


async def _s3_range(fs: Any, path: str, start: int, end: int, version: Version) -> bytes:
    """Bytes [start, end) of the pinned version (s3fs's cat_file cannot pass IfMatch); the
    answer's total size, ETag and VersionId are checked against ``version`` before its body is
    read (a store that ignores IfMatch)."""
    bucket, key, _ = fs.split_path(path)
    response = await fs._call_s3(
        "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
        **_s3_pin(version),
    )  # fmt: skip
    body = response["Body"]
    try:
        total = str(response.get("ContentRange") or "").rpartition("/")[2]
        identity = {"ETag": response.get("ETag"), "VersionId": response.get("VersionId")}
        check_answer(version, int(total) if total.isdigit() else None, identity)
        data: bytes = await body.read()
    finally:
        body.close()
    return data


async def _http_range(fs: Any, url: str, start: int, end: int, version: Version) -> bytes:
    """Bytes [start, end) of the pinned version: a GET with the version's preconditions whose
    answer's total size and validators are checked before its body is read (fsspec's cat_file
    reads any answer, a 200 or another version's 206, whole)."""
    kwargs = dict(fs.kwargs)
    headers = {**(kwargs.pop("headers", None) or {}), **http_conditions(version)}
    headers["Range"] = f"bytes={start}-{end - 1}"
    headers["Accept-Encoding"] = "identity"  # the ranges of the bytes as stored
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 404:
            raise FileNotFoundError(url)
        response.raise_for_status()  # a 412 among them: the policy makes it ESTALE
        if response.status == 200:
            length = response.headers.get("Content-Length", "")
            check_answer(version, int(length) if length.isdigit() else None, response.headers)
            raise RangeIgnoredError(
                f"asked for bytes {start}..{end}, the server sent the whole object (200)"
            )
        content_range = response.headers.get("Content-Range", "")
        encoding = response.headers.get("Content-Encoding", "identity")
        expected = f"bytes {start}-{end - 1}/"
        identity = encoding in ("identity", "")
        if response.status != 206 or not content_range.startswith(expected) or not identity:
            raise ValueError(f"asked for {expected}..., the server sent {response.status}"
                             f" {content_range!r} ({encoding})")  # fmt: skip
        total = content_range.rpartition("/")[2]
        check_answer(version, int(total) if total.isdigit() else None, response.headers)
        data: bytes = await response.content.readexactly(end - start)
        return data


async def _http_first(fs: Any, url: str, length: int) -> tuple[Version, bytes] | None:
    """One GET of bytes [0, length) whose answer also gives the size (Content-Range) and the
    version (ETag, Last-Modified); None when it does not say them (an empty object: 416)."""
    kwargs = dict(fs.kwargs)
    headers = {**(kwargs.pop("headers", None) or {}), "Range": f"bytes=0-{length - 1}"}
    headers["Accept-Encoding"] = "identity"  # the size and the ranges of the bytes as stored
    session = await fs.set_session()
    async with session.get(fs.encode_url(url), headers=headers, **kwargs) as response:
        if response.status == 416:
            return None
        if response.status == 404:
            raise FileNotFoundError(url)
        response.raise_for_status()
        if response.headers.get("Content-Encoding", "identity") not in ("identity", ""):
            return None  # the lengths would be the encoding's
        if response.status == 206:
            total = response.headers.get("Content-Range", "").rpartition("/")[2]
        else:  # 200: the server ignores Range; only a whole object that fits is of use
            total = response.headers.get("Content-Length", "")
            if not (total.isdigit() and int(total) <= length):
                size = f"all {total} bytes" if total.isdigit() else "the whole object"
                raise RangeIgnoredError(f"asked for bytes 0..{length}, the server sent {size}"
                                        " (200)")  # fmt: skip
        if not total.isdigit():
            return None
        data = await response.content.readexactly(min(length, int(total)))
        return version_of("http", response.headers, int(total)), data


async def _s3_first(fs: Any, path: str, length: int) -> tuple[Version, bytes] | None:
    """One GetObject of bytes [0, length) whose answer also gives the size (ContentRange) and
    the version (VersionId, ETag); None for an empty object (InvalidRange)."""
    bucket, key, version_id = fs.split_path(path)
    pin = {"VersionId": version_id} if version_id else {}
    try:
        response = await fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=f"bytes=0-{length - 1}", **pin
        )
    except Exception as err:
        code = s3_code(err)
        if code in ("InvalidRange", "416"):
            return None
        if code in ("NoSuchKey", "NoSuchBucket", "404"):  # s3fs leaves _call_s3's untranslated
            raise FileNotFoundError(errno.ENOENT, f"no such object: {path}") from None
        raise
    body = response["Body"]
    try:
        data: bytes = await body.read()
    finally:
        body.close()
    total = str(response.get("ContentRange") or "").rpartition("/")[2]
    if not total.isdigit():
        return None
    identity = {"ETag": response.get("ETag"), "VersionId": response.get("VersionId")}
    return version_of("s3", identity, int(total)), data


def with_timeouts(url: str, timeout: float, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a per-request deadline for HTTP and S3, unless the caller set one."""
    protocol = fsspec.utils.get_protocol(url)
    options = dict(options)  # never change the caller's dicts
    if protocol in ("http", "https"):
        import aiohttp

        client = dict(options.get("client_kwargs") or {})
        client.setdefault("timeout", aiohttp.ClientTimeout(total=timeout))
        options["client_kwargs"] = client
    elif protocol in _S3:
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", timeout)
        config.setdefault("read_timeout", timeout)
        config.setdefault("retries", {"max_attempts": 0})  # FsspecStore retries
        options["config_kwargs"] = config
    return options


def connect(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    """A filesystem of its own for ``url`` (never fsspec's cached instance, so one made after
    fork gets a new loop thread and session) and the path inside it; ``options`` as
    :func:`with_timeouts` made them. Unknown protocols and bad options are StoreError EINVAL."""
    protocol = fsspec.utils.get_protocol(url)
    try:
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    except (ImportError, ValueError) as err:
        raise StoreError(errno.EINVAL, f"{url}: {err}") from err
    if protocol in _S3:
        fs.retries = 1  # s3fs's own loop would try 5 times inside each of ours
    _MADE[id(fs)] = fs
    return fs, path


class FsspecStore(Store):
    """The object at ``url``, read range by range (never downloaded whole).

    ``storage_options`` go to the filesystem (e.g. ``client_kwargs={"endpoint_url": ...}`` for
    s3fs). A failed request is tried ``tries`` times in all, waiting ``backoff``, then twice that,
    and so on between tries; then :class:`StoreError` names the URL and the last cause. Each
    HTTP or S3 request is given up after ``timeout`` seconds (unless ``client_kwargs["timeout"]``
    or ``config_kwargs`` say otherwise). Refused credentials are a StoreError with errno EACCES,
    not retried. The size, the version and the first 64 KiB are read once, at construction,
    in one request (HTTP and S3), and the store is pinned to that version (see the module
    docstring): a read after the object changed raises StoreError with errno ESTALE.
    """

    def __init__(
        self,
        url: str,
        *,
        tries: int = 3,
        backoff: float = 0.2,
        timeout: float = DEFAULT_TIMEOUT,
        **storage_options: Any,
    ) -> None:
        if tries < 1:
            raise ValueError(f"tries must be at least 1, not {tries}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.url = url
        self._tries = tries
        self._backoff = backoff
        self._options = with_timeouts(url, timeout, storage_options)
        self._protocol = fsspec.utils.get_protocol(url)
        self._init(Version(0), b"")
        self._version, self._head = self._call("open", self._first)

    def _init(self, version: Version, head: bytes) -> None:
        self._version = version
        self._head = head  # the object's first bytes, of this version
        self._fs: Any = None  # made at the first request (see reopen)
        self._path = ""
        self._closed = False
        self._connecting = threading.Lock()

    def _connect(self) -> None:
        self._fs, self._path = connect(self.url, self._options)

    def _filesystem(self) -> Any:
        """The filesystem, made here at the first request of a reopened copy."""
        with self._connecting:
            if self._closed:
                raise StoreError(errno.EBADF, f"{self.url}: the store is closed")
            if self._fs is None:
                self._connect()
            return self._fs

    def _first(self) -> tuple[Version, bytes]:
        """The size, the version and the first bytes: one ranged GET over HTTP and S3 (its
        answer names the size and the version), else ``info()`` and no bytes."""
        first: tuple[Version, bytes] | None = None
        if self._protocol in _HTTP:
            fs = self._filesystem()
            first = fsspec.asyn.sync(fs.loop, _http_first, fs, self._path, HEAD_BYTES)
        elif self._protocol in _S3:
            fs = self._filesystem()
            first = fsspec.asyn.sync(fs.loop, _s3_first, fs, self._path, HEAD_BYTES)
        if first is None:
            return self._info(), b""
        version, head = first
        if len(head) != min(HEAD_BYTES, version.size):
            raise StoreError(errno.EIO, f"{self.url}: asked for bytes 0..{HEAD_BYTES}, got "
                             f"{len(head)} of {version.size} bytes")  # fmt: skip
        return version, head

    def _info(self) -> Version:
        """The object's size and identity, asked of the server now."""
        info = self._filesystem().info(self._path)
        size = info.get("size")
        if not isinstance(size, int):
            raise StoreError(errno.EIO, f"{self.url}: the server does not say how large it is")
        return version_of(self._protocol, info, size)

    def _current(self) -> Version:
        """The identity now, of the pinned version where S3 can name it (one HEAD)."""
        fs = self._filesystem()
        if self._protocol not in _S3:
            return self._info()
        bucket, key, _ = fs.split_path(self._path)
        pin = {"VersionId": self._version.version_id} if self._version.version_id else {}
        head = fs.call_s3("head_object", Bucket=bucket, Key=key, **pin)
        return version_of(
            self._protocol,
            {"ETag": head.get("ETag"), "VersionId": head.get("VersionId")},
            int(head.get("ContentLength", -1)),
        )

    def _conditional(self) -> bool:
        """Whether every read names the version (a changed object then fails it: 412)."""
        if self._protocol in _HTTP:
            return bool(http_conditions(self._version))
        return self._protocol in _S3 and bool(_s3_pin(self._version))

    @property
    def size(self) -> int:
        return self._version.size

    @property
    def parallel_reads(self) -> int:
        """16: each read is one request, and many in flight hide the round trip (fsspec runs
        them all on the filesystem's one event loop, so calls from many threads are safe)."""
        return PARALLEL_REQUESTS

    def read_range(self, offset: int, view: memoryview) -> None:
        if self._closed:
            raise StoreError(errno.EBADF, f"{self.url}: the store is closed")
        end = offset + len(view)
        offset, view = take_head(self._head, offset, view)  # came with the open: no request
        if not view:
            return
        fs = self._filesystem()
        data = self._call(f"bytes {offset}..{end}", lambda: self._fetch(fs, offset, end))
        if len(data) != end - offset:
            # A server that ignores Range sends the whole object; a changed object, fewer bytes.
            raise StoreError(
                errno.EIO,
                f"{self.url}: asked for bytes {offset}..{end}, got {len(data)} bytes"
                " (the server ignores Range requests, or the object changed)",
            )
        view[:] = data

    def _fetch(self, fs: Any, start: int, end: int) -> bytes:
        """Bytes [start, end) of the pinned version, in one request whose answer is checked
        to be of that version (S3 and HTTP)."""
        version = self._version
        if self._protocol in _S3:
            data: bytes = fsspec.asyn.sync(fs.loop, _s3_range, fs, self._path, start, end, version)
            return data
        if self._protocol in _HTTP:
            data = fsspec.asyn.sync(fs.loop, _http_range, fs, self._path, start, end, version)
            return data
        data = fs.cat_file(self._path, start=start, end=end)
        return data

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` with bounded retries; failures become StoreError naming the URL and cause."""

        def changed(caught: Exception) -> StoreError:
            try:
                now: Version | None = self._current()
            except Exception:
                now = None  # the cause stays the 412
            return stale(self.url, what, self._version, now)

        return call_with_retries(self.url, what, fn, self._tries, self._backoff, changed)

    def reopen(self) -> FsspecStore:
        """A copy for this process (after fork) over the same version, which keeps what the
        open learned (size, version, first bytes): no request, and its own filesystem, loop and
        session are made at its first read past the first bytes. Every such read names the
        version (If-Match, VersionId), so a changed object fails it with ESTALE. Only where no
        read can (the server named no version) does reopen ask again (one HEAD) and raise
        ESTALE at once if the size changed."""
        store = FsspecStore.__new__(FsspecStore)
        store.url, store._tries, store._backoff = self.url, self._tries, self._backoff
        store._options, store._protocol = self._options, self._protocol
        store._init(self._version, self._head)
        if store._conditional():
            return store
        try:
            changes = self._version.changes(store._call("reopen", store._current))
            if changes:
                raise StoreError(errno.ESTALE, f"{self.url}: reopen: the object changed since"
                                 f" it was opened ({', '.join(changes)})")  # fmt: skip
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        # Dropping the filesystem lets fsspec's finalizer close its session on its own loop.
        self._closed = True
        self._fs = None

    def __repr__(self) -> str:
        return f"<FsspecStore {self.url!r} {self.size} bytes>"
