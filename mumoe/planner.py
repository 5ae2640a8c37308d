r"""The plans of one network: which contractions it compiles, how, and where they are kept.

A :class:`Planner` belongs to one :class:`~mumoe.network.Network` and holds
its planning policy (the path optimiser, autotuning) and its bounded cache of
compiled :class:`~mumoe.plan.Plan` s: the forward contraction per batch
bucket, backend and dtype, the contraction of all cores into ``W``, and that
of one expert's matrix.  :meth:`Planner.chosen` is the plan a forward pass
uses, which :meth:`Network.flops <mumoe.network.Network.flops>` and
:func:`mumoe.report.describe` report.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import opt_einsum

from mumoe.backend import backend_kernels
from mumoe.paths import check_optimize
from mumoe.plan import DEFAULT_OPTIMIZE, Plan, PlanCache, batch_bucket
from mumoe.spec import INPUT, OUTPUT
from mumoe.validation import check_bool

if TYPE_CHECKING:
    from mumoe.network import Network

__all__ = ["AUTOTUNE_OPTIMIZERS", "Planner"]

#: The opt_einsum optimisers whose paths autotuning times, besides the network's own.
AUTOTUNE_OPTIMIZERS = ("greedy", "branch-2", "dp", "random-greedy-128")


class Planner:
    """The compiled plans of one network and the policy that builds them.

    Parameters
    ----------
    network : Network
    optimize : str or path, default "flop-optimal"
        See :class:`~mumoe.network.Network`.
    cache_size : int, default 32
        The most plans kept.
    autotune : bool, default False
        Time the candidate paths of :data:`AUTOTUNE_OPTIMIZERS` on the first
        forward call per batch bucket, backend and dtype; keep the fastest.

    Examples
    --------
    >>> from mumoe import cp
    >>> planner = cp(8, 5, 2, rank=3).planner
    >>> planner.forward(100, "numpy", "float64") is planner.forward(70, "numpy", "float64")
    True
    """

    def __init__(
        self,
        network: Network,
        *,
        optimize: str | Sequence[tuple[int, ...]] = DEFAULT_OPTIMIZE,
        cache_size: int = 32,
        autotune: bool = False,
    ) -> None:
        self.network = network
        n_operands = network.n_levels + 1 + network.n_cores  # gates, input, cores
        self.optimize = check_optimize(optimize, n_operands)
        self.autotune = check_bool(autotune, "autotune")
        self.cache = PlanCache(cache_size)

    def __repr__(self) -> str:
        return f"Planner(optimize={self.optimize!r}, autotune={self.autotune}, cache={self.cache})"

    # ----------------------------------------------------------------- forward

    def forward(
        self,
        batch_size: int,
        backend: str,
        dtype: Hashable,
        timer: Callable[[Plan], float] | None = None,
        device: Hashable = None,
    ) -> Plan:
        """The compiled forward contraction for a batch of ``batch_size`` rows.

        Plans are cached per ``(batch bucket, backend, dtype)``, and with
        ``autotune`` per device too (a path timed on one device is not the
        fastest on another); the path is searched at the bucket size, the
        next power of two.

        Parameters
        ----------
        batch_size : int
            Number of rows once the leading dimensions are flattened.
        backend : str
            TensorLy backend name the operands live on.
        dtype : hashable
            The operands' dtype.
        timer : callable, optional
            With ``autotune``, measures a candidate plan on the caller's
            operands (seconds); the fastest candidate is cached.
        device : hashable, optional
            With ``autotune``, the device of the operands
            (:func:`mumoe.backend.array_device`): part of the cache key.

        Returns
        -------
        Plan
            Called with ``(*gates, x, *cores)``: each gate ``(B, N_e)``, ``x``
            and the cores; returns ``(B, O)``.  With a bias, ``x`` is
            ``(B, I)`` when ``bias_inside=True`` is passed (see
            :meth:`Plan.bias_inside <mumoe.plan.Plan.bias_inside>`) and
            ``(B, I + 1)``, ones last, otherwise.

        Examples
        --------
        >>> from mumoe import cp
        >>> plan = cp(8, 5, 2, rank=3).planner.forward(100, "numpy", "float64")
        >>> plan.shapes[0]  # bucket 128
        (128, 8)
        """
        bucket = batch_bucket(batch_size)
        key = ("forward", bucket, backend, dtype)
        if self.autotune and timer is not None:
            tuned = (*key, device)
            return self.cache.get(tuned, lambda: self._tune(bucket, backend, timer))
        return self.cache.get(key, lambda: self.build_forward(bucket, backend=backend))

    def _tune(self, batch_size: int, backend: str, timer: Callable[[Plan], float]) -> Plan:
        candidates: dict[tuple[tuple[int, ...], ...], Plan] = {}
        for optimize in (self.optimize, *AUTOTUNE_OPTIMIZERS):
            plan = self.build_forward(batch_size, optimize, backend=backend)
            candidates.setdefault(plan.path, plan)
        return min(candidates.values(), key=timer)

    def build_forward(
        self, batch_size: int, optimize: Any = None, *, backend: str | None = None
    ) -> Plan:
        """Build (without caching) the forward plan for ``batch_size`` rows.

        Parameters
        ----------
        batch_size : int
        optimize : str or path, optional
            The optimiser; this planner's by default.
        backend : str, optional
            The backend the plan runs on, for the kernels it declares
            (:func:`mumoe.backend.backend_kernels`).

        Returns
        -------
        Plan

        Examples
        --------
        >>> from mumoe import cp
        >>> cp(8, 5, 2, rank=3).planner.build_forward(4, "greedy").shapes[0]
        (4, 8)
        """
        net = self.network
        return Plan.build(
            net.einsum_equation,
            net._forward_shapes(batch_size),
            self.optimize if optimize is None else optimize,
            lead=net._batch,
            bias_input=net.n_levels if net.bias else None,  # x follows the gates
            kernels=None if backend is None else backend_kernels(backend),
        )

    def chosen(
        self, batch_size: int, backend: str | None = None, dtype: Hashable = None
    ) -> tuple[Plan, str]:
        """The forward plan a call with ``batch_size`` rows uses, and where it came from.

        The cached plan of that batch bucket (of ``backend`` and ``dtype``
        when given, else the one used most recently), which is the autotuned
        one once timed; otherwise the plan of this planner's optimiser, which
        a forward pass would build.

        Parameters
        ----------
        batch_size : int
        backend : str, optional
        dtype : hashable, optional

        Returns
        -------
        plan : Plan
        source : str
            ``"autotuned"``, ``"cached"`` or ``"not built yet"`` (with
            autotune, the path is then the optimiser's until a call times it).

        Examples
        --------
        >>> from mumoe import cp
        >>> cp(8, 5, 2, rank=3).planner.chosen(4)[1]
        'not built yet'
        """
        bucket = batch_bucket(batch_size)
        for key in reversed(self.cache.keys()):
            if (
                isinstance(key, tuple)
                and key[:2] == ("forward", bucket)
                and backend in (None, key[2])
                and (dtype is None or dtype == key[3])
            ):
                plan = self.cache.peek(key)
                if plan is not None:
                    return plan, "autotuned" if self.autotune else "cached"
        return self.build_forward(bucket), "not built yet"

    def flops(self, batch_size: int, plan: Plan | None = None) -> int:
        """FLOPs of the forward contraction over ``batch_size`` rows along :meth:`chosen`'s path.

        Parameters
        ----------
        batch_size : int
        plan : Plan, optional
            Count along this plan's path instead.

        Returns
        -------
        int

        Examples
        --------
        >>> from mumoe import cp
        >>> cp(16, 8, 4, rank=3).planner.flops(10)
        1770
        """
        path = (plan or self.chosen(batch_size)[0]).path
        net = self.network
        _, info = opt_einsum.contract_path(
            net.einsum_equation, *net._forward_shapes(batch_size), shapes=True,
            optimize=list(path),
        )  # fmt: skip
        return int(info.opt_cost)

    # ------------------------------------------------------- dense and expert

    def materialize(self, backend: str, dtype: Hashable) -> Plan:
        """The compiled contraction of all cores into ``W`` (``weight_shape``).

        Parameters
        ----------
        backend : str
            The TensorLy backend the plan is for.
        dtype : hashable
            The cores' dtype.

        Returns
        -------
        Plan

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp
        >>> net = cp(8, 5, 2, rank=3)
        >>> cores = [np.ones(s) for s in net.core_shapes]
        >>> net.planner.materialize("numpy", "float64")(*cores).shape
        (8, 6, 2)
        """
        return self.cache.get(("materialize", backend, dtype), lambda: self._materialize(backend))

    def _materialize(self, backend: str) -> Plan:
        net = self.network
        output = net._term([*net.expert_legs, INPUT, OUTPUT])
        equation = ",".join(map(net._term, net.core_legs)) + "->" + output
        return Plan.build(
            equation, net.core_shapes, self._other_optimize, kernels=backend_kernels(backend)
        )

    def expert(self, backend: str, dtype: Hashable) -> Plan:
        """The compiled contraction of the cores, expert legs sliced away, into ``(I', O)``.

        Called with the cores after indexing each expert leg at one expert.

        Parameters
        ----------
        backend : str
        dtype : hashable

        Returns
        -------
        Plan

        Examples
        --------
        >>> import numpy as np
        >>> from mumoe import cp
        >>> sliced = [np.ones(3), np.ones((6, 3)), np.ones((2, 3))]  # expert leg indexed away
        >>> cp(8, 5, 2, rank=3).planner.expert("numpy", "float64")(*sliced)[0]
        array([3., 3.])
        """
        return self.cache.get(("expert", backend, dtype), lambda: self._expert(backend))

    def _expert(self, backend: str) -> Plan:
        net = self.network
        experts = set(net.expert_legs)
        kept = [[leg for leg in legs if leg not in experts] for legs in net.core_legs]
        shapes = [[net.sizes[leg] for leg in legs] for legs in kept]
        equation = ",".join(map(net._term, kept)) + "->" + net._term([INPUT, OUTPUT])
        return Plan.build(equation, shapes, self._other_optimize, kernels=backend_kernels(backend))

    @property
    def _other_optimize(self) -> str:
        # An explicit path fits the forward equation only.
        return self.optimize if isinstance(self.optimize, str) else DEFAULT_OPTIMIZE
