"""CRIU lazy restore served by the runtime: an image reader, a Store over a dumped task's memory,
and ``lazy_pages``, a drop-in for ``criu lazy-pages``.

No pycriu and no protobuf dependency: the few messages needed are decoded by a small reader of
the protobuf wire format (_wire).
"""

from ._images import CriuImageError as CriuImageError
from ._images import Images as Images
from ._images import Inventory as Inventory
from ._images import PagemapEntry as PagemapEntry
from ._images import PstreeEntry as PstreeEntry
from ._images import Vma as Vma
from ._lazy_pages import Summary as Summary
from ._lazy_pages import lazy_pages as lazy_pages
from ._pack import pack_images as pack_images
from ._store import CriuPages as CriuPages
from ._store import LazyRange as LazyRange

__all__ = [
    "CriuImageError",
    "CriuPages",
    "Images",
    "Inventory",
    "LazyRange",
    "PagemapEntry",
    "PstreeEntry",
    "Summary",
    "Vma",
    "lazy_pages",
    "pack_images",
]
