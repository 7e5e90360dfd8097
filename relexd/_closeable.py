"""A context-manager mixin for objects that own OS resources and have a ``close()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closeable:
    """``with obj:`` closes ``obj`` on exit; subclasses implement :meth:`close`."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
