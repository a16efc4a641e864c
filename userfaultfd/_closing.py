"""A with-block that closes: one definition for every object that owns a descriptor or mapping."""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing(abc.ABC):
    """``with obj:`` calls ``obj.close()`` on the way out."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the object owns. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
