"""pack_images(): the pages of a CRIU dump as packs any store can serve (``uffd pack --criu``)."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..stores import PackInfo, pack
from ._images import CriuImageError, Images

__all__ = ["pack_images"]


def pack_images(
    images_dir: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    chunk_size: int | None = None,
    level: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> list[PackInfo]:
    """Pack every pages image the dump's tasks use into the directory ``dest`` (made if
    missing), each as ``dest/pages-ID.img``: ``uffd lazy-pages --pages DEST IMAGES_DIR`` (or a
    URL where DEST was uploaded) then serves the lazy pages from the packs. Returns what was
    written, per pages image."""
    images = Images(images_dir)
    live = [task.pid for task in images.pstree() if not images.zombie(task.pid)]
    ids = sorted({images.pagemap(pid)[0] for pid in live})  # a zombie has no pages
    os.makedirs(dest, exist_ok=True)
    infos = []
    for pages_id in ids:
        source = images.pages_path(pages_id)
        if not os.path.isfile(source):
            raise CriuImageError(f"{source}: missing (named by the pagemaps)")
        target = os.path.join(os.fspath(dest), f"pages-{pages_id}.img")
        if chunk_size is None:
            infos.append(pack(source, target, level=level, progress=progress))
        else:
            infos.append(
                pack(source, target, chunk_size=chunk_size, level=level, progress=progress)
            )
    return infos
