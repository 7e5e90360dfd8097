"""Unpickling that cannot run code: only the globals a format is known to need are resolved.

A pickle executes code by naming a callable (``GLOBAL``/``STACK_GLOBAL``, resolved by
:meth:`pickle.Unpickler.find_class`) and calling it (``REDUCE``). Every call goes through a global
resolved by ``find_class``, so refusing every name outside an allow-list is the whole defence
(the technique of Python's own pickle documentation, "Restricting Globals"). ``stub=True`` turns
an unknown name into an inert placeholder instead of an error, for files whose interesting part
is tensors next to objects relexd does not need (DeepSpeed's ``model_states.pt``).
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import Any


class Refused(pickle.UnpicklingError):
    """The pickle names a global outside the allow-list."""


class Stub:
    """Stands for an object whose class relexd refused to import; keeps nothing callable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Stub:
        return Stub(*args)


def _stub_class(module: str, name: str) -> type:
    return type(name, (Stub,), {"__module__": "relexd.stub." + module, "__qualname__": name})


def restricted_unpickler(allowed: Iterable[tuple[str, str]], *, stub: bool = False) -> type[pickle.Unpickler]:
    """An Unpickler class resolving only ``allowed`` (module, name) pairs."""
    allow = frozenset(allowed)

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) in allow:
                return super().find_class(module, name)
            if stub:
                return _stub_class(module, name)
            raise Refused(f"refused to load {module}.{name} (not a known, inert part of this format)")

    return RestrictedUnpickler


def loads(data: bytes, allowed: Iterable[tuple[str, str]], *, stub: bool = False) -> Any:
    return restricted_unpickler(allowed, stub=stub)(io.BytesIO(data)).load()
