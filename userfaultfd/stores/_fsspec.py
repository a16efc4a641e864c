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
"""

from __future__ import annotations

import errno
import os
import ssl
import time
import weakref
from collections.abc import Callable
from typing import Any, Self, TypeVar

import fsspec
import fsspec.core
import fsspec.utils

from ._base import Store, StoreError

__all__ = ["FsspecStore"]

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

# Errors that retrying cannot fix; everything else (resets, refused connections, timeouts, 5xx)
# is treated as transient.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# S3 error codes that mean "these keys are not accepted"; a HEAD has no body, so only "403".
_S3_REFUSALS = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
     "ExpiredToken", "403", "Forbidden"}
)  # fmt: skip


def _refusal(err: BaseException) -> str | None:
    """What refused the credentials (``"HTTP 401"``, ``"S3 AccessDenied"``), or None.

    fsspec and s3fs wrap the cause (HTTP's size probe turns any failure into FileNotFoundError;
    s3fs turns a ClientError into PermissionError), so the chain of causes is searched.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        status = getattr(cause, "status", None)
        if status in (401, 403) and hasattr(cause, "request_info"):  # aiohttp's response error
            return f"HTTP {status}"
        response = getattr(cause, "response", None)
        if isinstance(response, dict):  # botocore's ClientError
            code = response.get("Error", {}).get("Code")
            if code in _S3_REFUSALS:
                return f"S3 {code}"
        cause = cause.__cause__ or cause.__context__
    return None


_S3 = ("s3", "s3a")


def _unwrapped(err: Exception) -> Exception:
    """The failure behind fsspec's HTTP size probe, which reports any failure (a refused
    connection, a 401) as FileNotFoundError with the real one as its cause."""
    cause = err.__cause__
    if not isinstance(err, FileNotFoundError) or not isinstance(cause, Exception):
        return err
    if isinstance(cause, FileNotFoundError) or getattr(cause, "status", None) in (404, 410):
        return err  # truly not there
    return cause


def _untrusted(err: BaseException) -> bool:
    """Whether TLS verification of the server's certificate failed (no retry will pass it)."""
    return isinstance(err, ssl.SSLCertVerificationError) or isinstance(
        getattr(err, "certificate_error", None), ssl.SSLCertVerificationError
    )


def _with_timeouts(url: str, timeout: float, options: dict[str, Any]) -> dict[str, Any]:
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


def _is_transient(err: Exception) -> bool:
    if isinstance(err, (*_PERMANENT, ValueError, TypeError)):
        return False
    # aiohttp's ClientResponseError and friends carry the HTTP status; a 4xx other than
    # timeout / too many requests will answer the same next time.
    status = getattr(err, "status", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


class FsspecStore(Store):
    """The object at ``url``, read range by range (never downloaded whole).

    ``storage_options`` go to the filesystem (e.g. ``client_kwargs={"endpoint_url": ...}`` for
    s3fs). A failed request is tried ``tries`` times in all, waiting ``backoff``, then twice that,
    and so on between tries; then :class:`StoreError` names the URL and the last cause. Each
    HTTP or S3 request is given up after ``timeout`` seconds (unless ``client_kwargs["timeout"]``
    or ``config_kwargs`` say otherwise). Refused credentials are a StoreError with errno EACCES,
    not retried. The size is read once, at construction.
    """

    def __init__(
        self,
        url: str,
        *,
        tries: int = 3,
        backoff: float = 0.2,
        timeout: float = 10.0,
        **storage_options: Any,
    ) -> None:
        if tries < 1:
            raise ValueError(f"tries must be at least 1, not {tries}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.url = url
        self._tries = tries
        self._backoff = backoff
        self._options = _with_timeouts(url, timeout, storage_options)
        self._connect()
        self._size: int = self._call("size", self._size_of)

    def _connect(self) -> None:
        try:
            # skip_instance_cache: a store owns its filesystem, so reopen() after fork gets a
            # new one rather than the parent's, whose event loop thread is gone.
            self._fs: Any = None
            self._fs, self._path = fsspec.core.url_to_fs(
                self.url, skip_instance_cache=True, **self._options
            )
        except (ImportError, ValueError) as err:
            raise StoreError(f"{self.url}: {err}", code=errno.EINVAL) from err
        if fsspec.utils.get_protocol(self.url) in _S3:
            self._fs.retries = 1  # s3fs's own loop would try 5 times inside each of ours
        _MADE[id(self._fs)] = self._fs

    def _size_of(self) -> int:
        size = self._fs.size(self._path)
        if not isinstance(size, int):
            raise StoreError(f"{self.url}: the server does not say how large it is")
        return size

    @property
    def size(self) -> int:
        return self._size

    def read_into(self, offset: int, buffer: memoryview) -> int:
        if offset < 0:
            raise StoreError(f"offset {offset} is negative")
        end = min(offset + len(buffer), self._size)
        if end <= offset:
            return 0
        if self._fs is None:
            raise StoreError(f"{self.url}: the store is closed", code=errno.EBADF)
        data = self._call(
            f"bytes {offset}..{end}", lambda: self._fs.cat_file(self._path, start=offset, end=end)
        )
        if len(data) != end - offset:
            # A server that ignores Range sends the whole object; a changed object, fewer bytes.
            raise StoreError(
                f"{self.url}: asked for bytes {offset}..{end}, got {len(data)} bytes"
                " (the server ignores Range requests, or the object changed)"
            )
        buffer[: end - offset] = data
        return end - offset

    def _call(self, what: str, fn: Callable[[], _T]) -> _T:
        """``fn()`` with bounded retries; failures become StoreError naming the URL and cause."""
        for attempt in range(1, self._tries + 1):
            try:
                return fn()
            except StoreError:
                raise
            except Exception as caught:
                err = _unwrapped(caught)
                cause = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
                refused = _refusal(err)
                if refused is not None:
                    raise StoreError(
                        f"{self.url}: {what}: the server refused the credentials ({refused}):"
                        f" {cause}",
                        code=errno.EACCES,
                    ) from caught
                if _untrusted(err):
                    raise StoreError(
                        f"{self.url}: {what}: the server's TLS certificate is not trusted: {cause}",
                        code=errno.EACCES,
                    ) from caught
                if _is_transient(err) and attempt < self._tries:
                    time.sleep(self._backoff * 2 ** (attempt - 1))
                    continue
                tried = f" after {attempt} tries" if attempt > 1 else ""
                code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
                if isinstance(err, FileNotFoundError):
                    code = errno.ENOENT
                raise StoreError(f"{self.url}: {what}{tried}: {cause}", code=code) from caught
        raise AssertionError("unreachable")

    def __enter__(self) -> Self:
        return self

    def reopen(self) -> FsspecStore:
        # Same URL, options and size (no request); a new filesystem, loop and session.
        store = FsspecStore.__new__(FsspecStore)
        store.url, store._tries, store._backoff = self.url, self._tries, self._backoff
        store._options, store._size = self._options, self._size
        store._connect()
        return store

    def close(self) -> None:
        # Dropping the filesystem lets fsspec's finalizer close its session on its own loop.
        self._fs = None

    def __repr__(self) -> str:
        return f"<FsspecStore {self.url!r} {self._size} bytes>"
