"""Whether this process is a fork: :func:`forked_child`.

Compiled kernels that start threads (Numba's OpenMP layer) must not in a
forked child whose parent had started an OpenMP team (torch's): GNU OpenMP's
threads do not survive ``fork``, and the child hangs.  The child is marked
when it is forked (``os.register_at_fork``), so a kernel module it imports
only after the fork still knows.  This module is imported with any part of
mumoe, before a parent that uses mumoe can fork.
"""

from __future__ import annotations

import os

__all__ = ["forked_child"]

_IMPORTED_IN = os.getpid()
_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_mark_forked)


def forked_child() -> bool:
    """Whether this process was forked from one that had imported mumoe.

    Returns
    -------
    bool

    Examples
    --------
    >>> forked_child()
    False
    """
    return _forked or os.getpid() != _IMPORTED_IN
