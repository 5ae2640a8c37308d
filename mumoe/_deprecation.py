"""Deprecated aliases: old public names that still work, with a ``DeprecationWarning``.

One mechanism for every rename: :func:`module_getattr` gives a module a
``__getattr__`` that resolves old names (``mumoe.matching``'s functions,
``mumoe.nn.ACTIVATIONS``) and warns, and :func:`deprecated_property` does the
same for attributes (``Network.cores``).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def warn_renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``."""
    warnings.warn(
        f"{old} is deprecated; use {new} instead", DeprecationWarning, stacklevel=stacklevel
    )


def module_getattr(
    module: str,
    renamed: Mapping[str, tuple[str, str]],
    lazy: Mapping[str, str] | None = None,
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for renamed names and names imported on first use.

    Parameters
    ----------
    module : str
        The module's ``__name__``, for messages.
    renamed : mapping of old name to (module, new name)
        Resolved with a ``DeprecationWarning``.
    lazy : mapping of name to module, optional
        Resolved silently from that module on first access (names whose home
        needs an optional framework, such as torch).
    """
    lazy = dict(lazy or {})

    def __getattr__(name: str) -> Any:
        if name in renamed:
            home, new = renamed[name]
            warn_renamed(f"{module}.{name}", f"{home}.{new}")
            return getattr(importlib.import_module(home), new)
        if name in lazy:
            return getattr(importlib.import_module(lazy[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


def deprecated_property(old: str, new: str) -> property:
    """A read-only property ``old`` that warns and returns ``self.<new>``."""

    def get(self: Any) -> Any:
        warn_renamed(f"{type(self).__name__}.{old}", f"{type(self).__name__}.{new}")
        return getattr(self, new)

    get.__doc__ = f"Deprecated alias of :attr:`{new}`."
    return property(get)
