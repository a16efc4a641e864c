"""What pins a remote store to the version of the object it opened (HttpStore, FsspecStore).

A store is pinned to the version it opened, because a restarted handler reopens it later and a
page of the new version next to a page of the old is silent corruption. At open the store records
the identity the server gives: for HTTP the ETag (or, without one, Last-Modified), for S3 the
VersionId when the bucket is versioned, and the ETag, and always the size. Every ranged GET
carries it as a precondition: HTTP ``If-Match: <etag>`` (a weak ETag cannot match, so then
``If-Unmodified-Since: <last-modified>``), S3 ``VersionId`` and ``IfMatch``. A server answers 412
Precondition Failed once the object changed: StoreError ESTALE at once, never retried. A server
that sends neither ETag nor Last-Modified leaves only the size to check: reopen() then asks (one
HEAD) and raises ESTALE if it changed. One that ignores the preconditions is not detected. nginx's
ETag is the file's mtime (in seconds) and size: a same-size rewrite within the same second of the
original keeps the ETag.

First bytes (issue 12): the open is one ranged GET of the first :data:`HEAD_BYTES`, whose answer
also names the size and the version; the format probe, a pack's header, lazy()'s .npy probe and
the first pages are read from the bytes it brought (the opened version's, whatever happens to the
object later), and reopen() carries them into the forked handler.

No fsspec here.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Mapping

from ._base import StoreError

__all__ = ["DEFAULT_TIMEOUT", "HEAD_BYTES", "AnotherVersionError", "Version", "check_answer",
           "http_conditions", "stale", "take_head", "version_of"]  # fmt: skip

#: What the first request brings along, kept by every reopened copy: the format probe, a pack's
#: header, lazy()'s .npy probe (64 KiB) and the first pages, none of which then costs a request.
HEAD_BYTES = 64 << 10
#: Seconds before a request is given up, unless the caller says otherwise.
DEFAULT_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Version:
    """What identifies the version of an object a store opened; None where the server says
    nothing."""

    size: int
    etag: str | None = None
    last_modified: str | None = None  # compared only when there is no ETag
    version_id: str | None = None

    def changes(self, now: Version | None) -> list[str]:
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

    def answer_changes(self, total: int | None, validators: Mapping[str, object]) -> list[str]:
        """How an answer to a read of this version says it carries another one: the ``total``
        size it names (Content-Range's, a 200's Content-Length; None: it names none) and its
        ``validators`` (ETag, VersionId, and Last-Modified where this version has no ETag), each
        compared where both name it. [] when nothing named differs."""

        def text(key: str) -> str | None:
            value = validators.get(key)
            return value if isinstance(value, str) and value else None

        fields = [("VersionId", self.version_id), ("ETag", self.etag)]
        if self.etag is None:
            fields.append(("Last-Modified", self.last_modified))
        out = []
        for label, old in fields:
            new = text(label)
            if old is not None and new is not None and new != old:
                out.append(f"{label} {old} -> {new}")
        if total is not None and total != self.size:
            out.append(f"size {self.size} -> {total}")
        return out


class AnotherVersionError(Exception):
    """An answer to a pinned read that carries another version of the object than the one
    opened (the server ignored the precondition): ``changes`` as :meth:`Version.changes` says
    them. Raised before the answer's body is read; the retry policy makes it ESTALE, not
    retried."""

    def __init__(self, changes: list[str]) -> None:
        super().__init__(f"the answer is of another version ({', '.join(changes)})")
        self.changes = changes


def check_answer(version: Version, total: int | None, validators: Mapping[str, object]) -> None:
    """Raise :class:`AnotherVersionError` if an answer naming ``total`` and ``validators``
    carries another version than ``version``."""
    changes = version.answer_changes(total, validators)
    if changes:
        raise AnotherVersionError(changes)


def version_of(protocol: str, info: Mapping[str, object], size: int) -> Version:
    """The identity in an HTTP answer's headers or S3's (and fsspec's ``info()``) of an object;
    the size only for other protocols."""

    def text(key: str) -> str | None:
        value = info.get(key)
        return value if isinstance(value, str) and value else None

    if protocol in ("http", "https"):
        return Version(size, etag=text("ETag"), last_modified=text("Last-Modified"))
    if protocol in ("s3", "s3a"):
        return Version(size, etag=text("ETag"), version_id=text("VersionId"))
    return Version(size)


def http_conditions(version: Version) -> dict[str, str]:
    """Request headers that make an HTTP server refuse (412) any other version."""
    if version.etag is not None and not version.etag.startswith("W/"):
        return {"If-Match": version.etag}  # If-Match compares strongly: a weak ETag never matches
    if version.last_modified is not None:
        return {"If-Unmodified-Since": version.last_modified}
    return {}


def stale(url: str, what: str, opened: Version, now: Version | None) -> StoreError:
    """The ESTALE of a read of ``url`` refused because the object is no longer ``opened``."""
    changes = ", ".join(opened.changes(now))
    return StoreError(
        errno.ESTALE, f"{url}: {what}: the object changed since it was opened ({changes})"
    )


def take_head(head: bytes, offset: int, view: memoryview) -> tuple[int, memoryview]:
    """Copy what of bytes [offset, offset + len(view)) lies in ``head`` (the object's first
    bytes, kept from the open) into ``view``; the offset and the part of ``view`` left to read."""
    if offset >= len(head):
        return offset, view
    inside = min(offset + len(view), len(head))
    view[: inside - offset] = head[offset:inside]
    return inside, view[inside - offset :]
