"""open_raw: the bytes at a path or URL as they are, before any pack format is looked for."""

from __future__ import annotations

from typing import Any

from .._location import is_http, is_url, local_path
from ._base import Store
from ._simple import FileStore

__all__ = ["open_raw"]

#: Options of every remote store, not of its transport.
_STORE_OPTIONS = frozenset({"tries", "backoff", "timeout"})


def open_raw(text: str, options: dict[str, Any]) -> Store:
    """A FileStore for a path (or file:// URL); an HttpStore for an http(s) URL whose options
    it honours; an FsspecStore for any other URL (imported only then: fsspec installs an at-fork
    hook)."""
    if is_http(text):
        # Imported here: a program that opens local files never pays for http.client and TLS.
        from ._http import direct_reader
        from ._http_store import HttpStore
        from ._pinning import DEFAULT_TIMEOUT

        transport = {k: v for k, v in options.items() if k not in _STORE_OPTIONS}
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        if direct_reader(text, transport, timeout) is not None:
            return HttpStore(text, **options)
    if is_url(text):
        from ._fsspec import FsspecStore  # not at the top: see above

        return FsspecStore(text, **options)
    if options:
        raise TypeError(f"options {sorted(options)} apply only to URLs")
    return FileStore(local_path(text))
