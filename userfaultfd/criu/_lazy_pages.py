"""lazy_pages(): a drop-in for ``criu lazy-pages -D IMAGES_DIR``, served by the runtime.

Design note
-----------
- Every image is read, and every task's store opened, *before* the socket listens: a bad or
  truncated image fails here, with the file and record named, and the restore then fails at
  connect instead of running a task whose pages cannot be served. A task that was a zombie at
  dump time (core-PID.img says TASK_DEAD) has no memory images and needs none.
- Each task's uffd is handed to a supervised handler of its own (runtime.serve_adopted) the
  moment it arrives: criu restore waits for the faults raised during the restore itself, so a
  task must be served before the next one is even sent. A handler that dies is restarted by its
  supervisor, which holds the uffd: faults wait, never read zeros; what no handler can fill is
  poisoned (SIGBUS).
- The registered ranges are the task's lazy VMAs from mm-PID.img, with store offset ==
  address (CriuPages): a pagemap run that crosses an mprotect split is thus served VMA by VMA
  (one UFFDIO_COPY cannot cross a VMA: ENOENT). Addresses in a lazy VMA but not in the pagemap
  read zeros (never touched, or only read); IN_PARENT runs are refused when the images are read.
- Background fill, after RSTF (on by default, as in CRIU): each server is told to
  ``fill_in_background()`` (not stopped): its handler fills every page not filled yet between
  the task's faults, which are answered first, and ends once every page is in. Without it,
  each task is served on demand until it exits.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, final

from .._core import Userfaultfd
from ..runtime import Policy, Region, Server, Stats, serve_adopted
from ._handoff import Handoff, adopted_features
from ._images import CriuImageError, Images
from ._store import CriuPages

__all__ = ["SOCKET_NAME", "Summary", "lazy_pages"]

#: The socket's name, relative to the restore's work dir (criu/uffd.c, LAZY_PAGES_SOCK_NAME).
SOCKET_NAME = "lazy-pages.socket"


@final
@dataclass(frozen=True, slots=True)
class Summary:
    """What a lazy restore took."""

    #: Tasks served (live ones) and zombies (nothing to serve).
    tasks: int
    zombies: int
    #: Pages filled from the images on demand (faults and their fault-around) and in the
    #: background fill after the restore finished.
    on_demand: int
    background: int
    #: Pages mapped as zero pages (in a lazy VMA, not in the pagemap).
    zero_pages: int
    #: Pages poisoned (a store that could not give them) and handlers restarted.
    poisoned: int
    restarts: int
    #: From the first connection to the last task settled.
    seconds: float

    def line(self) -> str:
        zombies = (
            f" (+{self.zombies} zombie{'s' if self.zombies != 1 else ''})" if self.zombies else ""
        )
        extra = f", {self.poisoned} POISONED" if self.poisoned else ""
        extra += f", {self.restarts} handler restarts" if self.restarts else ""
        return (
            f"uffd lazy-pages: {self.tasks} task{'s' if self.tasks != 1 else ''}{zombies}, "
            f"{self.on_demand} pages on demand, {self.background} in background, "
            f"{self.zero_pages} zero pages{extra}, {self.seconds:.3f} s"
        )


def lazy_pages(
    images_dir: str | os.PathLike[str],
    *,
    pages: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    policy: Policy | None = None,
    background: bool = True,
    socket_path: str | None = None,
    cpu: int | None = None,
    connect_timeout: float | None = None,
    on_listening: Callable[[str], None] | None = None,
    on_task: Callable[[int, Server], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Serve one ``criu restore --lazy-pages`` of the dump in ``images_dir`` and return once
    every task is gone, or every page is in (``background``). ``pages``: where the pages images
    come from instead of ``images_dir`` (a path or URL with ``{id}`` for the pages image id,
    or a directory / URL prefix holding ``pages-ID.img``, raw or packed by ``uffd pack
    --criu``); ``storage_options`` go to the store of such a URL (e.g. ``key``, ``secret`` and
    ``client_kwargs={"endpoint_url": ...}`` for s3://). ``socket_path``: default
    ``images_dir/lazy-pages.socket``. ``on_listening`` is called once the restore may start,
    ``on_task`` as each task's server starts. ``progress(done, total)`` is called while the
    background fill runs (about ten times a second, and once at its end with ``done ==
    total``): pages filled so far, on demand and in the background, of the pages the images
    hold for the lazy memory."""
    images = Images(images_dir)
    images.inventory()
    tree = images.pstree()
    # A zombie at dump time has no memory in the images (no mm, pagemap or pages): the restore
    # sends it as a negative pid with no uffd, and there is nothing to serve.
    stores = {
        task.pid: CriuPages(
            images, task.pid, pages=_pages_for(pages), storage_options=storage_options
        )
        for task in tree
        if not images.zombie(task.pid)
    }
    path = socket_path or images.file(SOCKET_NAME)
    servers: list[Server] = []
    served: list[int] = []  # the task of each server
    zombies = 0
    # A failure below leaves every server running: each serves its task until the task exits
    # (a restore that fails kills its tasks), which is always safe; stopping could not be.
    with Handoff(path) as handoff:
        if on_listening is not None:
            on_listening(path)
        handoff.accept(connect_timeout)
        started = time.monotonic()
        for _ in tree:
            task = handoff.task(timeout=600)
            if task.fd is None:
                zombies += 1
                continue
            store = stores.get(task.pid)
            if store is None:
                os.close(task.fd)
                raise CriuImageError(
                    f"{images.file('pstree.img')}: criu restore sent task {task.pid}, "
                    "which the images do not have"
                )
            uffd = Userfaultfd.from_fd(task.fd, adopted_features(task.fd))
            regions = [Region(r.start, r.end - r.start, r.start, 4096)
                       for r in store.lazy_ranges()]  # fmt: skip
            if not regions:
                uffd.close()  # nothing lazy: the restore filled it all
                continue
            server = serve_adopted(uffd, regions, store, policy=policy, cpu=cpu)
            servers.append(server)
            served.append(task.pid)
            if on_task is not None:
                on_task(task.pid, server)
        handoff.finished(timeout=None)
    before = [s.stats() for s in servers]
    if background:  # like criu lazy-pages: everything else, between the tasks' own faults
        for server in servers:
            server.fill_in_background()
    shown = progress if background else None
    total = sum(stores[pid].present_pages() for pid in served) if shown is not None else 0

    def filling() -> None:
        if shown is not None and total:
            shown(min(total, sum(_filled(s.stats()) for s in servers)), total)

    _wait_gone(servers, filling)
    if shown is not None and total:
        shown(total, total)
    after = [s.stats() for s in servers]
    seconds = time.monotonic() - started
    return Summary(
        tasks=len(servers), zombies=zombies,
        on_demand=sum(_filled(s) for s in (before if background else after)),
        background=sum(_filled(a) - _filled(b) for a, b in zip(after, before, strict=True))
        if background else 0,
        zero_pages=sum(a.zeros for a in after),
        poisoned=sum(a.poisoned for a in after), restarts=sum(a.restarts for a in after),
        seconds=seconds,
    )  # fmt: skip


def _filled(stats: Stats) -> int:
    return stats.pages


def _pages_for(pages: str | None) -> str | None:
    """A pages location with ``{id}`` in it (a directory or prefix gets ``/pages-{id}.img``)."""
    if pages is None or "{id}" in pages:
        return pages
    return pages.rstrip("/") + "/pages-{id}.img"


def _wait_gone(servers: list[Server], tick: Callable[[], None] | None = None) -> None:
    """Until every supervisor has ended (its tasks exited, or unmapped all they served);
    ``tick()`` about every 0.1 s meanwhile."""
    last = time.monotonic()
    while any(s.alive for s in servers):
        select.select([], [], [], 0.01)
        if tick is not None and time.monotonic() - last >= 0.1:
            last = time.monotonic()
            tick()
