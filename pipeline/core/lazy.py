"""Modules imported where they are first used, not where they are named.

A command's ``--help`` and its refusal of a bad flag need only its config class; torch (with transformers,
accelerate, peft behind it) takes seconds to import. A module on that path names torch through ``deferred``,
and torch loads at the first attribute read: a tensor made, a function called, never the import.
"""

from __future__ import annotations

import functools
from typing import Any, Callable


def _torch():
    import torch

    return torch


def _functional():
    import torch.nn.functional

    return torch.nn.functional


IMPORTS: dict[str, Callable[[], Any]] = {"torch": _torch, "torch.nn.functional": _functional}
"""The modules that can be deferred, each imported by a written-out statement (the library imports nothing by a
computed name: tests/test_layering.py)."""


class Deferred:
    """Stands for module ``name``: imports it at the first attribute read, then hands every read to it."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str):
        if name not in IMPORTS:
            raise ValueError(f"deferred: no import declared for {name!r} (add it to IMPORTS)")
        self._name = name
        self._module = None

    def __getattr__(self, attr: str) -> Any:  # called only for names the proxy itself lacks
        if self._module is None:
            self._module = IMPORTS[self._name]()
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}{' (imported)' if self._module is not None else ''}>"


def deferred(name: str) -> Any:
    """``name`` as a module imported on first use (``torch = deferred("torch")``)."""
    return Deferred(name)



def no_grad(fn: Callable) -> Callable:
    """``@torch.no_grad()`` for a plain function, with torch imported at the first call rather than at the
    decorator."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _torch().no_grad():
            return fn(*args, **kwargs)

    return wrapper
