"""Deprecated: the parameter-budget solver is :mod:`mumoe.budget`.

Every name of this module still works, with a ``DeprecationWarning``.
"""

from mumoe._deprecation import module_getattr

__all__: list[str] = []

__getattr__ = module_getattr(
    __name__,
    {
        name: ("mumoe.budget", name)
        for name in ("gate_params", "linear_params", "match_rank", "resolve_budget")
    },
)
