"""Memory filled on demand, out of process, with a fault-around policy chosen in userspace.

:func:`serve` registers ranges of this process and forks a handler that fills their pages from
a :class:`~userfaultfd.stores.Store` as they fault; :func:`serve_adopted` serves a uffd another
process registered (CRIU's lazy restore); :func:`lazy` gives a NumPy array over a source: the
kernel's own mapping of a plain local file, or memory :func:`serve` fills for everything else;
:func:`touch_pages` reads every page of one, as ``uffd lazy`` does; :func:`lazy_tensors` gives
the named arrays of a safetensors file or an .npz, each fetched where touched. Firecracker's socket
protocol is in :mod:`userfaultfd.runtime.firecracker`.
"""

import importlib
import typing

from ._adopt import serve_adopted as serve_adopted
from ._policy import Adaptive as Adaptive
from ._policy import Policy as Policy
from ._policy import Single as Single
from ._policy import Window as Window
from ._server import DEFAULT_CPU as DEFAULT_CPU
from ._server import Region as Region
from ._server import Server as Server
from ._server import serve as serve
from ._stats import Stats as Stats

__all__ = [
    "DEFAULT_CPU",
    "Adaptive",
    "PageUnreadableError",
    "Policy",
    "Region",
    "Server",
    "Single",
    "Stats",
    "TouchResult",
    "Window",
    "lazy",
    "lazy_tensors",
    "serve",
    "serve_adopted",
    "server_of",
    "touch_pages",
]

if typing.TYPE_CHECKING:
    from ._lazy import lazy as lazy
    from ._lazy import server_of as server_of
    from ._tensors import lazy_tensors as lazy_tensors
    from ._touch import PageUnreadableError as PageUnreadableError
    from ._touch import TouchResult as TouchResult
    from ._touch import touch_pages as touch_pages

# Imported when first named: serving a uffd (CRIU's lazy-pages, serve()) needs neither NumPy
# arrays nor the stores that lazy() opens.
_LAZY = {
    "lazy": "._lazy", "server_of": "._lazy", "PageUnreadableError": "._touch",
    "TouchResult": "._touch", "touch_pages": "._touch", "lazy_tensors": "._tensors",
}  # fmt: skip


def __getattr__(name: str) -> typing.Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
