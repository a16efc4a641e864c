"""What a failed request means: tried again, ESTALE, EACCES or another StoreError.

One policy for every remote store (FsspecStore, the content-addressed packs' objects): bounded
tries with a doubling backoff for what can pass (resets, refused connections, timeouts, 5xx),
and at once for what cannot: a 412 or an answer of another version (the object changed: the
store is pinned to the version it opened), refused credentials, an untrusted certificate, a 4xx,
a server that ignores Range (200 to a ranged GET). fsspec, s3fs and botocore wrap
the cause, so it is searched along the chain of causes. No fsspec import here: a store over local
files must not pull in fsspec (it installs an at-fork hook).
"""

from __future__ import annotations

import errno
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

from ._base import StoreError
from ._http import HTTPStatusError, RangeIgnoredError
from ._pinning import AnotherVersionError

__all__ = ["call_with_retries", "s3_code"]

_T = TypeVar("_T")
_E = TypeVar("_E", bound=BaseException)


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
        if status in (401, 403) and _is_http_answer(cause):
            return f"HTTP {status}"
        response = getattr(cause, "response", None)
        if isinstance(response, dict):  # botocore's ClientError
            code = response.get("Error", {}).get("Code")
            if code in _S3_REFUSALS:
                return f"S3 {code}"
        cause = cause.__cause__ or cause.__context__
    return None


def s3_code(err: BaseException) -> str | None:
    """The S3 error code behind ``err`` (s3fs wraps botocore's ClientError), or None."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            return code if isinstance(code, str) else None
        cause = cause.__cause__ or cause.__context__
    return None


def _is_http_answer(err: BaseException) -> bool:
    """Whether ``err`` is a server's HTTP status (aiohttp's response error, or ours)."""
    return isinstance(err, HTTPStatusError) or hasattr(err, "request_info")


def _precondition_failed(err: BaseException) -> bool:
    """Whether the server answered 412 Precondition Failed (the object changed)."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if getattr(cause, "status", None) == 412 and _is_http_answer(cause):
            return True
        response = getattr(cause, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        if code in ("PreconditionFailed", "412"):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def _in_chain(err: BaseException, kind: type[_E]) -> _E | None:
    """The first exception of type ``kind`` along ``err``'s chain of causes, or None."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, kind):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


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


def _is_transient(err: Exception) -> bool:
    if isinstance(err, (*_PERMANENT, ValueError, TypeError)):
        return False
    # aiohttp's ClientResponseError and friends carry the HTTP status; a 4xx other than
    # timeout / too many requests will answer the same next time.
    status = getattr(err, "status", None)
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


def call_with_retries(
    url: str,
    what: str,
    fn: Callable[[], _T],
    tries: int,
    backoff: float,
    stale: Callable[[Exception], StoreError] | None = None,
) -> _T:
    """``fn()`` tried up to ``tries`` times (waiting ``backoff``, then twice that, ...) while it
    fails transiently; every failure becomes a :class:`StoreError` naming ``url``, ``what`` and
    the cause. A 412 is ``stale(caught)`` (ESTALE), refused credentials and an untrusted
    certificate EACCES, an answer of another version ESTALE, a 200 to a ranged GET EIO: none of
    these is retried."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except StoreError:
            raise
        except Exception as caught:
            err = _unwrapped(caught)
            cause = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            other = _in_chain(caught, AnotherVersionError)
            if other is not None:  # the server ignored the precondition: never retried
                raise StoreError(
                    errno.ESTALE,
                    f"{url}: {what}: the object changed since it was opened"
                    f" ({', '.join(other.changes)}); the server sent the new version's answer",
                ) from caught
            ignored = _in_chain(caught, RangeIgnoredError)
            if ignored is not None:  # the same server answers the same way: never retried
                raise StoreError(
                    errno.EIO,
                    f"{url}: {what}: the server ignores Range requests ({ignored}); a store"
                    " reads an object range by range and needs a server that honours Range",
                ) from caught
            if _precondition_failed(caught):  # a permanent answer: never retried
                if stale is None:
                    raise StoreError(
                        errno.ESTALE, f"{url}: {what}: the object changed: {cause}"
                    ) from caught
                raise stale(caught) from caught
            refused = _refusal(err)
            if refused is not None:
                raise StoreError(
                    errno.EACCES,
                    f"{url}: {what}: the server refused the credentials ({refused}): {cause}",
                ) from caught
            if _untrusted(err):
                raise StoreError(
                    errno.EACCES,
                    f"{url}: {what}: the server's TLS certificate is not trusted: {cause}",
                ) from caught
            if _is_transient(err) and attempt < tries:
                time.sleep(backoff * 2 ** (attempt - 1))
                continue
            tried = f" after {attempt} tries" if attempt > 1 else ""
            code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
            if isinstance(err, FileNotFoundError):
                code = errno.ENOENT
            raise StoreError(code, f"{url}: {what}{tried}: {cause}") from caught
    raise AssertionError("unreachable")
