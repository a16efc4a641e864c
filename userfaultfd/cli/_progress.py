"""A rich progress bar behind the ``progress(done, total)`` callbacks the library takes."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TimeRemainingColumn

__all__ = ["ProgressBar", "show_cursor"]


class ProgressBar:
    """A bar on stderr (stdout keeps the summary; off a terminal rich draws nothing) that
    appears at the first call and goes at the last one (``done == total``) or at :meth:`close`.
    It may be called from a forked child: the bar is made where it is first called."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._progress is None:
            columns = (BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
            self._progress = Progress(*columns, console=Console(stderr=True), transient=True)
            self._progress.start()
            self._task = self._progress.add_task(self.description, total=total)
        assert self._task is not None
        self._progress.update(self._task, completed=done, total=total)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def show_cursor() -> None:
    """Show the terminal's cursor again: a bar drawn by a child that died left it hidden."""
    Console(stderr=True).show_cursor(True)
