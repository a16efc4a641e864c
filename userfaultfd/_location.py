"""Where a store's bytes are: a local path or a URL, told apart here and nowhere else.

A URL starts with a scheme as RFC 3986 spells it and ``://`` (or fsspec's ``::`` of a chained
URL: ``simplecache::s3://...``); ``file://`` is a local path written as a URL. Anything else is a
path, even one with ``://`` inside it (``./a://b``). No fsspec here: telling a path from a URL
must not import it (it installs an at-fork hook).
"""

from __future__ import annotations

import re

__all__ = ["is_http", "is_url", "local_path"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")
_HTTP = re.compile(r"^https?://", re.IGNORECASE)


def is_url(text: str) -> bool:
    """Whether ``text`` names a remote object or prefix (any URL but ``file://``)."""
    return _URL.match(text) is not None and not text.startswith("file://")


def is_http(text: str) -> bool:
    """Whether ``text`` is a plain ``http://`` or ``https://`` URL (not a chained one)."""
    return _HTTP.match(text) is not None


def local_path(text: str) -> str:
    """The path of a local ``text`` (a path, or a ``file://`` URL)."""
    return text.removeprefix("file://")
