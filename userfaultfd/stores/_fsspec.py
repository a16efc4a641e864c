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

Versions: a store is pinned to the version of the object it opened, because a restarted handler
reopens it later and a page of the new version next to a page of the old is silent corruption. At
open the store records the identity the server gives: for HTTP the ETag (or, without one,
Last-Modified), for S3 the VersionId when the bucket is versioned, and the ETag, and always the
size. Every ranged GET carries it as a precondition: HTTP ``If-Match: <etag>`` (a weak ETag cannot
match, so then ``If-Unmodified-Since: <last-modified>``), S3 ``VersionId`` (the old version keeps
being served after an overwrite; reading by version needs s3:GetObjectVersion) and ``IfMatch``. A
server answers 412 Precondition Failed once the object changed: that is StoreError ESTALE at once,
never retried, so :meth:`FsspecStore.reopen` need not ask again. A server that sends neither ETag
nor Last-Modified leaves only the size to check: reopen() then asks (one HEAD) and raises ESTALE if
it changed. One that ignores the preconditions is not detected (nor was it by a HEAD at reopen: the
object can change just after it). nginx's ETag is the file's mtime (in seconds) and size: a
same-size rewrite within the same second of the original keeps the ETag.

First bytes (issue 12): a GET with ``Range: bytes=0-65535`` answers with Content-Range (the size)
and the validators (ETag, Last-Modified; for S3, VersionId), so the open is that one request: no
HEAD, and the format probe, a pack's header, lazy()'s .npy probe and the first pages are read from
the bytes it brought (which are the opened version's, whatever happens to the object later).
reopen() carries them, with the size and the version, into the forked handler: it sends nothing,
and makes its filesystem only at its first read past them. Only another protocol (memory://,
gcs://, ...) opens with ``info()`` and keeps no bytes.

Reads over HTTP (issue 12) skip fsspec where the options allow: ``_http`` sends the same ranged,
conditional GETs on a keep-alive ``http.client`` connection per fetch thread and reads each body
straight into the handler's buffer (one copy, no event-loop thread in the way); other options
and redirects go through fsspec's client as before.
"""

from __future__ import annotations

import dataclasses
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
from ._http import RangeReader, RedirectedError, range_reader
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
# What the first request brings along, kept by every reopened copy: the format probe, a pack's
# header, lazy()'s .npy probe (64 KiB) and the first pages, none of which then costs a request.
_HEAD_BYTES = 64 << 10
#: Seconds before a request is given up, unless the caller says otherwise.
_DEFAULT_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class _Version:
    """What identifies the version of an object a store opened; None where the server says
    nothing."""

    size: int
    etag: str | None = None
    last_modified: str | None = None  # compared only when there is no ETag
    version_id: str | None = None

    def changes(self, now: _Version | None) -> list[str]:
        """How ``now`` differs from this version (``["ETag "a" -> "b""]``); [] when it is
        the same. ``now`` None: unknown, every recorded field is reported as changed to ``?``."""
        fields = [("VersionId", self.version_id, now and now.version_id),
                  ("ETag", self.etag, now and now.etag)]  # fmt: skip
        if self.etag is None:
            fields.append(("Last-Modified", self.last_modified, now and now.last_modified))
        out = []
        for label, old, new in fields:
            if old is not None and old != new:
                out.append(f"{label} {old} -> {'?' if now is None else new or '(none)'}")
        if now is not None and now.size != self.size:
            out.append(f"size {self.size} -> {now.size}")
        if now is None and not out:
            out.append(f"size {self.size} -> ?")
        return out


def _version_of(protocol: str, info: dict[str, Any], size: int) -> _Version:
    """The identity in fsspec's ``info()`` of an HTTP or S3 object; the size only elsewhere."""

    def text(key: str) -> str | None:
        value = info.get(key)
        return value if isinstance(value, str) and value else None

    if protocol in _HTTP:
        return _Version(size, etag=text("ETag"), last_modified=text("Last-Modified"))
    if protocol in _S3:
        return _Version(size, etag=text("ETag"), version_id=text("VersionId"))
    return _Version(size)


def _http_conditions(version: _Version) -> dict[str, str]:
    """Request headers that make an HTTP server refuse (412) any other version."""
    if version.etag is not None and not version.etag.startswith("W/"):
        return {"If-Match": version.etag}  # If-Match compares strongly: a weak ETag never matches
    if version.last_modified is not None:
        return {"If-Unmodified-Since": version.last_modified}
    return {}


def _s3_pin(version: _Version) -> dict[str, str]:
    """GetObject / HeadObject parameters that select ``version`` or fail with 412."""
    pin = {}
    if version.version_id is not None:
        pin["VersionId"] = version.version_id
    if version.etag is not None:
        pin["IfMatch"] = version.etag
    return pin


async def _s3_range(fs: Any, path: str, start: int, end: int, pin: dict[str, str]) -> bytes:
    """Bytes [start, end) of the pinned version (s3fs's cat_file cannot pass IfMatch)."""
    bucket, key, _ = fs.split_path(path)
    response = await fs._call_s3(
        "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **pin
    )
    body = response["Body"]
    try:
        data: bytes = await body.read()
    finally:
        body.close()
    return data


async def _http_first(fs: Any, url: str, length: int) -> tuple[_Version, bytes] | None:
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
        else:  # 200: the server ignores Range (the reads will say so); take the first bytes
            total = response.headers.get("Content-Length", "")
        if not total.isdigit():
            return None
        data = await response.content.readexactly(min(length, int(total)))
        return _version_of("http", response.headers, int(total)), data


async def _s3_first(fs: Any, path: str, length: int) -> tuple[_Version, bytes] | None:
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
    return _version_of("s3", identity, int(total)), data


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
        timeout: float = _DEFAULT_TIMEOUT,
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
        self._init(_Version(0), b"")
        self._version, self._head = self._call("open", self._first)
        self._set_conditions()

    def _init(self, version: _Version, head: bytes) -> None:
        self._version = version
        self._head = head  # the object's first bytes, of this version
        self._fs: Any = None  # made at the first request (see reopen)
        self._path = ""
        self._read_kwargs: dict[str, Any] = {}
        self._conditions = _http_conditions(version) if self._protocol in _HTTP else {}  # pins
        # HTTP reads straight into the buffer (see _http), unless the options or a redirect
        # need fsspec's client: None until the first read, False when they do.
        self._reader: RangeReader | bool | None = None
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
                self._set_conditions()
            return self._fs

    def _first(self) -> tuple[_Version, bytes]:
        """The size, the version and the first bytes: one ranged GET over HTTP and S3 (its
        answer names the size and the version), else ``info()`` and no bytes. Over HTTP by
        :mod:`._http` where it can: then this process makes no filesystem at all."""
        first: tuple[_Version, bytes] | None = None
        reader = self._range_reader() if self._protocol in _HTTP else None
        if reader is not None:
            try:
                answer = reader.first(_HEAD_BYTES)
            except RedirectedError:
                self._reader = False  # fsspec's client follows redirects: it does the rest
            else:
                if answer is None:
                    return self._info(), b""
                size, validators, head = answer
                first = _version_of("http", validators, size), head
        if first is None and self._protocol in _HTTP:
            fs = self._filesystem()
            first = fsspec.asyn.sync(fs.loop, _http_first, fs, self._path, _HEAD_BYTES)
        elif first is None and self._protocol in _S3:
            fs = self._filesystem()
            first = fsspec.asyn.sync(fs.loop, _s3_first, fs, self._path, _HEAD_BYTES)
        if first is None:
            return self._info(), b""
        version, head = first
        if len(head) != min(_HEAD_BYTES, version.size):
            raise StoreError(errno.EIO, f"{self.url}: asked for bytes 0..{_HEAD_BYTES}, got "
                             f"{len(head)} of {version.size} bytes")  # fmt: skip
        return version, head

    def _info(self) -> _Version:
        """The object's size and identity, asked of the server now."""
        info = self._filesystem().info(self._path)
        size = info.get("size")
        if not isinstance(size, int):
            raise StoreError(errno.EIO, f"{self.url}: the server does not say how large it is")
        return _version_of(self._protocol, info, size)

    def _current(self) -> _Version:
        """The identity now, of the pinned version where S3 can name it (one HEAD)."""
        fs = self._filesystem()
        if self._protocol not in _S3:
            return self._info()
        bucket, key, _ = fs.split_path(self._path)
        pin = {"VersionId": self._version.version_id} if self._version.version_id else {}
        head = fs.call_s3("head_object", Bucket=bucket, Key=key, **pin)
        return _version_of(
            self._protocol,
            {"ETag": head.get("ETag"), "VersionId": head.get("VersionId")},
            int(head.get("ContentLength", -1)),
        )

    def _conditional(self) -> bool:
        """Whether every read names the version (a changed object then fails it: 412)."""
        if self._protocol in _HTTP:
            return bool(_http_conditions(self._version))
        return self._protocol in _S3 and bool(_s3_pin(self._version))

    def _set_conditions(self) -> None:
        """The keyword arguments of every ranged read: the version's preconditions."""
        self._read_kwargs = {}
        if self._protocol in _HTTP:
            conditions = self._conditions = _http_conditions(self._version)
            if conditions and self._fs is not None:  # cat_file's headers replace the session's
                headers = dict(self._fs.kwargs.get("headers") or {})
                self._read_kwargs["headers"] = {**headers, **conditions}

    def _stale(self, what: str, now: _Version | None) -> StoreError:
        changes = ", ".join(self._version.changes(now))
        return StoreError(
            errno.ESTALE, f"{self.url}: {what}: the object changed since it was opened ({changes})"
        )

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
        head = self._head
        if offset < len(head):  # came with the first request: no request now
            inside = min(end, len(head))
            view[: inside - offset] = head[offset:inside]
            view, offset = view[inside - offset :], inside
            if offset == end:
                return
        if self._protocol in _HTTP and self._read_directly(offset, view):
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

    def _range_reader(self) -> RangeReader | None:
        """The :mod:`._http` reader of this store, made at its first use; None where that path
        cannot serve it (its options, or a redirect: then fsspec does, from then on)."""
        if isinstance(self._reader, RangeReader) and not self._closed:
            return self._reader  # every read after the first: no lock on the fault path
        with self._connecting:
            if self._closed:
                raise StoreError(errno.EBADF, f"{self.url}: the store is closed")
            if self._reader is None:
                options = {k: v for k, v in self._options.items() if k != "client_kwargs"}
                client = dict(self._options.get("client_kwargs") or {})
                self._reader = range_reader(self.url, options, client, _DEFAULT_TIMEOUT) or False
            return self._reader if isinstance(self._reader, RangeReader) else None

    def _read_directly(self, offset: int, view: memoryview) -> bool:
        """Bytes [offset, offset + len(view)) into ``view`` by :mod:`._http`; False where that
        path cannot serve this store (then fsspec does, from now on)."""
        reader = self._range_reader()
        if reader is None:
            return False

        def read() -> bool:
            try:
                reader.get_into(offset, view, self._conditions)
            except RedirectedError:
                return False
            return True

        if self._call(f"bytes {offset}..{offset + len(view)}", read):
            return True
        self._reader = False  # redirected: fsspec's client follows redirects
        return False

    def _fetch(self, fs: Any, start: int, end: int) -> bytes:
        """Bytes [start, end) of the pinned version, in one request."""
        if self._protocol in _S3:
            pin = _s3_pin(self._version)
            data: bytes = fsspec.asyn.sync(fs.loop, _s3_range, fs, self._path, start, end, pin)
            return data
        data = fs.cat_file(self._path, start=start, end=end, **self._read_kwargs)
        return data

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` with bounded retries; failures become StoreError naming the URL and cause."""

        def stale(caught: Exception) -> StoreError:
            try:
                now: _Version | None = self._current()
            except Exception:
                now = None  # the cause stays the 412
            return self._stale(what, now)

        return call_with_retries(self.url, what, fn, self._tries, self._backoff, stale)

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
        if isinstance(self._reader, RangeReader):
            self._reader.close()

    def __repr__(self) -> str:
        return f"<FsspecStore {self.url!r} {self.size} bytes>"
