r"""Expert health in training: utilisation metrics and balance losses for soft gates.

Mixture-of-experts tooling counts argmax assignments of hard top-k routers;
μMoE gates are soft (entmax-1.5, sparsemax, softmax, top-k), so everything
here is computed from the coefficients themselves, per expert level, on any
backend, cheaply enough for every step.  For coefficients :math:`a_t \in
\Delta^{N}` of the tokens :math:`t` that a padding mask keeps (:math:`T` of
them):

* mass :math:`m_n = \frac1T \sum_t a_{tn}` (the mean coefficient; sums to 1);
* support :math:`s_n = \frac1T \sum_t [a_{tn} > 0]`, the share of tokens the
  expert takes part in (entmax, sparsemax and top-k give exact zeros);
* the entropy :math:`H = -\sum_n \bar m_n \log \bar m_n` of the normalised mass,
  reported as :math:`H / \log N` (1: every expert equally used) and as the
  effective number of experts :math:`e^H`; and the mean support size per token.

The balance losses (opt-in, returned, never accumulated anywhere):

* ``"importance_cv2"`` (Shazeer et al., 2017): the squared coefficient of
  variation of the importance :math:`\sum_t a_{tn}` over the experts;
* ``"uniform_kl"``: :math:`\mathrm{KL}(\bar m \,\|\, \mathcal U_N) = \log N - H`;
* ``"z_loss"`` (ST-MoE, Zoph et al., 2022): the mean of
  :math:`(\log \sum_n e^{z_{tn}})^2` over the tokens' logits.

All are 0 for perfectly balanced routing (the z-loss: for logits of zero),
and grow as routing collapses onto few experts.

Each is a function of sums over the tokens (per-expert sums and the token
count), so a batch split over processes is measured exactly: given
``reduce``, a sum over processes (an all-reduce), every function sums those
sums before normalising, and returns what one process that saw the whole
batch would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tensorly as tl

from mumoe.backends import cast, creation_context
from mumoe.typing import Tensor
from mumoe.validation import check_tensor_type, dtype_name, is_floating

__all__ = [
    "JOINT_LIMIT",
    "LOSSES",
    "Usage",
    "balance_loss",
    "check_balance",
    "importance_cv2",
    "joint_usage",
    "router_z_loss",
    "uniform_kl",
    "usage",
]

#: Joint experts (the outer product over levels) are measured up to this many.
JOINT_LIMIT = 1 << 20

#: Sums a 1-D tensor over processes (an all-reduce with SUM), returning the sum.
Reduce = Callable[[Tensor], Tensor]


def _rows(
    values: Tensor, mask: Any, what: str, reduce: Reduce | None = None
) -> tuple[Tensor, Tensor | None, Any]:
    """``values`` as ``(T, N)``, the mask as float weights ``(T, 1)``, and the token count.

    With ``reduce``, no token here is no error: other processes may have some
    (:func:`_summed` checks the total).
    """
    backend = tl.get_backend()
    check_tensor_type(values, what, backend)  # a torch tensor under NumPy: say so, by name
    if mask is not None:
        check_tensor_type(mask, "mask", backend)
    shape = tuple(tl.shape(values))
    if len(shape) < 1 or not is_floating(values.dtype):
        raise TypeError(
            f"{what} must be a floating tensor of shape (..., N), got {shape} "
            f"of {dtype_name(getattr(values, 'dtype', type(values)))}"
        )
    rows = tl.reshape(values, (-1, shape[-1]))
    if dtype_name(rows.dtype) not in ("float32", "float64"):
        # Sums over a batch, or over processes, pass float16's 65,504 soon: float32 at least.
        rows = cast(rows, tl.float32)
    if mask is None:
        count = tl.shape(rows)[0]
        if count == 0 and reduce is None:
            raise ValueError(f"{what} has no tokens (an empty batch): nothing to measure")
        return rows, None, count
    mask_shape = tuple(tl.shape(mask))
    if mask_shape != shape[:-1]:
        raise ValueError(
            f"mask must have the tokens' shape {shape[:-1]} ({what} is {shape}), got {mask_shape}"
        )
    kind = dtype_name(mask.dtype)
    if kind != "bool" and "int" not in kind:
        raise TypeError(f"mask must be bool or integer (1: a token, 0: padding), got {kind}")
    weights = cast(tl.reshape(mask, (-1, 1)), rows.dtype)
    if kind != "bool" and bool(tl.any((weights != 0) & (weights != 1))):
        raise ValueError("an integer mask must hold 0 (padding) and 1 (a token) only")
    count = tl.sum(weights)
    if reduce is None and float(count) == 0:
        raise ValueError(f"every token of {what} is masked: nothing to measure")
    return rows, weights, count


def _total(rows: Tensor, weights: Tensor | None) -> Tensor:
    """The (masked) sum of ``rows`` over tokens, ``(N,)``."""
    return tl.sum(rows if weights is None else rows * weights, axis=0)


def _summed(
    reduce: Reduce | None, what: str, count: Any, *sums: Tensor
) -> tuple[list[Tensor], Any]:
    """``sums`` and ``count``, summed over processes by one call of ``reduce`` (if given).

    The parts travel as one vector (one collective, whatever their number) and
    come back in their shapes; the total count is checked, since every
    process may have been all padding.
    """
    if reduce is None:
        return list(sums), count
    like = sums[0]  # float32 at least (_rows)
    # A token here is a token in the total: no need to read the total back (a sync).
    known = isinstance(count, int) and count > 0
    if not tl.is_tensor(count):
        count = tl.tensor(count, **creation_context(like))
    parts = [tl.reshape(s, (-1,)) for s in sums] + [tl.reshape(cast(count, like.dtype), (1,))]
    sent = tl.concatenate(parts, axis=0)
    total = reduce(sent)
    if not tl.is_tensor(total) or tuple(tl.shape(total)) != tuple(tl.shape(sent)):
        got = tuple(tl.shape(total)) if tl.is_tensor(total) else type(total).__name__
        raise ValueError(
            f"reduce must return the sum of its 1-D input, a tensor of its shape "
            f"{tuple(tl.shape(sent))}; got {got}"
        )
    out, start = [], 0
    for s in sums:
        size = math.prod(tl.shape(s))
        out.append(tl.reshape(total[start : start + size], tl.shape(s)))
        start += size
    count = total[start]
    if not known and float(tl.to_numpy(count)) <= 0:
        raise ValueError(
            f"{what} has no token on any process (all padding, or empty batches): "
            "nothing to measure"
        )
    return out, count


def _entropy(mass: Tensor) -> Tensor:
    p = mass / tl.sum(mass)
    positive = p > 0
    safe = tl.where(positive, p, p * 0 + 1)  # 0 log 0 = 0, with a finite gradient
    return -tl.sum(p * tl.log(safe))


@dataclass
class Usage:
    """How one expert level was used by a batch of tokens (see the module docstring).

    Parameters
    ----------
    mass : tensor, shape (N,)
        Mean coefficient per expert.
    support : tensor, shape (N,)
        Share of tokens whose coefficient for the expert is non-zero.
    entropy : tensor, shape ()
        Normalised entropy of the mass, from 0 (one expert) to 1 (uniform).
    effective_experts : tensor, shape ()
        :math:`e^H`, from 1 to N.
    mean_support : tensor, shape ()
        Mean number of experts with a non-zero coefficient, per token.
    tokens : int
        The tokens counted (the mask's ones).

    Examples
    --------
    >>> import numpy as np
    >>> float(usage(np.array([[0.5, 0.5]])).effective_experts)
    2.0
    """

    mass: Tensor
    support: Tensor
    entropy: Tensor
    effective_experts: Tensor
    mean_support: Tensor
    tokens: int

    def as_floats(self, prefix: str = "") -> dict[str, float]:
        """The scalars as plain floats, for any logger: ``{prefix + "entropy": ..., ...}``.

        Also ``max_mass`` and ``dead`` (experts with no support in this batch).

        Parameters
        ----------
        prefix : str, default ""
            Put before every key, e.g. ``"blocks.3.gate/0/"``.

        Returns
        -------
        dict of str to float

        Examples
        --------
        >>> import numpy as np
        >>> usage(np.array([[1.0, 0.0], [0.5, 0.5]])).as_floats("gate/")["gate/max_mass"]
        0.75
        """
        return {
            f"{prefix}entropy": float(self.entropy),
            f"{prefix}effective_experts": float(self.effective_experts),
            f"{prefix}mean_support": float(self.mean_support),
            f"{prefix}max_mass": float(tl.max(self.mass)),
            f"{prefix}dead": float(tl.sum(cast(self.support == 0, self.support.dtype))),
        }


def usage(gates: Tensor, mask: Any = None, *, reduce: Reduce | None = None) -> Usage:
    """Mass, support and balance of one expert level over a batch of tokens.

    Parameters
    ----------
    gates : tensor, shape (..., N)
        The gate coefficients of one level, each token's on the simplex.
    mask : bool or integer tensor, shape (...), optional
        1 (or True) for the tokens to count, 0 for padding; every token by default.
    reduce : callable, optional
        Sums a 1-D tensor over processes (an all-reduce with SUM) and returns
        the sum, as :func:`mumoe.nn.reduce_balance_over` does on torch.  It is
        called once, on this batch's sums and token count, and the result is
        that of the whole (concatenated) batch.  Every process must call the
        function, a process that has no token (all padding) too.  None
        (default): this batch alone.

    Returns
    -------
    Usage
        ``tokens`` counts the tokens of every process with ``reduce``.

    Raises
    ------
    ValueError
        If the mask's shape is not the tokens' shape, an integer mask holds
        values other than 0 and 1, there is no token to count, or ``reduce``
        does not return a tensor of its input's shape.
    TypeError
        If the gates are not floating or the mask is not bool or integer.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    >>> u = usage(a, mask=np.array([True, True, False]))
    >>> u.mass, u.support, round(float(u.entropy), 4), float(u.mean_support), u.tokens
    (array([0.75, 0.25, 0.  ]), array([1. , 0.5, 0. ]), 0.5119, 1.5, 2)

    Two halves of a batch, each told the other's sums (as an all-reduce
    would), measure the whole batch:

    >>> sent = []
    >>> _ = usage(a[2:], reduce=lambda sums: sent.append(sums) or sums)
    >>> np.allclose(usage(a[:2], reduce=lambda sums: sums + sent[0]).mass, usage(a).mass)
    True
    """
    rows, weights, count = _rows(gates, mask, "gates", reduce)
    n = tl.shape(rows)[-1]
    # [a != 0] as sign(|a|): a float pass, where casting a boolean mask is several
    # times slower on torch's CPU kernels (131k entries: 38 us against 152).
    (mass, support), count = _summed(
        reduce, "gates", count, _total(rows, weights), _total(tl.sign(tl.abs(rows)), weights)
    )
    mass, support = mass / count, support / count
    # Within [0, log N]: rounding took a uniform float32 mass to 1.0000001 of its bound.
    entropy = tl.clip(_entropy(mass), 0.0, math.log(n))
    normalised = entropy / math.log(n) if n > 1 else entropy * 0 + 1
    mean_support = tl.sum(support)
    effective = tl.clip(tl.exp(entropy), 1.0, float(n))
    return Usage(mass, support, normalised, effective, mean_support, int(float(count)))


def joint_usage(
    gates: Sequence[Tensor], mask: Any = None, *, reduce: Reduce | None = None
) -> Tensor:
    r"""Mean mass of the joint experts :math:`(n_1, \dots, n_E)` of several levels.

    The coefficient of a joint expert is the product of its levels'
    (:math:`a^{(1)}_{n_1} \cdots a^{(E)}_{n_E}`, Eq. 1); this is its mean over
    the tokens.

    Parameters
    ----------
    gates : sequence of tensors, each (..., N_e)
        Every level's coefficients for the same tokens.
    mask : bool or integer tensor, shape (...), optional
    reduce : callable, optional
        A sum over processes, called once (see :func:`usage`): the result is
        the whole batch's.

    Returns
    -------
    tensor, shape (N_1, ..., N_E)

    Raises
    ------
    ValueError
        If the joint experts number more than :data:`JOINT_LIMIT`, or the
        levels' token shapes differ.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.5, 0.5], [1.0, 0.0]])
    >>> joint_usage([a, b])
    array([[0.25, 0.25],
           [0.5 , 0.  ]])
    """
    shapes = [tuple(tl.shape(a)) for a in gates]
    if not shapes or len({s[:-1] for s in shapes}) != 1:
        raise ValueError(f"the levels' gates must share their token shape, got {shapes}")
    sizes = [s[-1] for s in shapes]
    if math.prod(sizes) > JOINT_LIMIT:
        raise ValueError(
            f"{math.prod(sizes):,} joint experts {tuple(sizes)}: more than JOINT_LIMIT = "
            f"{JOINT_LIMIT:,}; measure the levels one by one"
        )
    flat = [_rows(a, mask, f"gates[{e}]", reduce) for e, a in enumerate(gates)]
    rows, weights, count = flat[0]
    levels = [rows if weights is None else rows * weights] + [r for r, _, _ in flat[1:]]
    # The sum over tokens of the levels' outer product, as one matrix product of two
    # halves (tokens x experts of the first levels, of the last): any number of levels,
    # and no tokens x joint-experts intermediate.
    split, product = 1, sizes[0]
    while split < len(sizes) - 1 and product * product < math.prod(sizes):
        product *= sizes[split]
        split += 1
    left = _outer_rows(levels[:split])
    if split == len(levels):
        joint = tl.sum(left, axis=0)
    else:
        joint = tl.dot(tl.transpose(left), _outer_rows(levels[split:]))
    (joint,), count = _summed(reduce, "gates", count, joint)
    return tl.reshape(joint, tuple(sizes)) / count


def _outer_rows(levels: list[Tensor]) -> Tensor:
    """Row by row, the outer product of the levels' coefficients, ``(T, N_1 * ... * N_k)``."""
    out = levels[0]
    for rows in levels[1:]:
        out = tl.reshape(out[:, :, None] * rows[:, None, :], (tl.shape(out)[0], -1))
    return out


def importance_cv2(gates: Tensor, mask: Any = None, *, reduce: Reduce | None = None) -> Tensor:
    """Squared coefficient of variation of the experts' importance (Shazeer et al., 2017).

    Parameters
    ----------
    gates : tensor, shape (..., N)
    mask : bool or integer tensor, shape (...), optional
    reduce : callable, optional
        A sum over processes, called once (see :func:`usage`): the result is
        the whole batch's.

    Returns
    -------
    tensor, shape ()
        ``var(importance) / mean(importance)**2`` (population variance), 0 when
        every expert gets the same total coefficient, N - 1 when one gets all.

    Examples
    --------
    >>> import numpy as np
    >>> float(importance_cv2(np.array([[1.0, 0.0, 0.0, 0.0]] * 3)))
    3.0
    """
    rows, weights, count = _rows(gates, mask, "gates", reduce)
    (importance,), _ = _summed(reduce, "gates", count, _total(rows, weights))
    mean = tl.mean(importance)
    return tl.mean((importance - mean) ** 2) / (mean * mean)


def uniform_kl(gates: Tensor, mask: Any = None, *, reduce: Reduce | None = None) -> Tensor:
    """KL divergence from the mean coefficient mass to the uniform distribution.

    Parameters
    ----------
    gates : tensor, shape (..., N)
    mask : bool or integer tensor, shape (...), optional
    reduce : callable, optional
        A sum over processes, called once (see :func:`usage`): the result is
        the whole batch's.

    Returns
    -------
    tensor, shape ()
        ``log N - H(mass)``: 0 for uniform use, ``log N`` when one expert
        gets all the mass.

    Examples
    --------
    >>> import numpy as np
    >>> round(float(uniform_kl(np.array([[1.0, 0.0, 0.0, 0.0]]))), 4)  # log 4
    1.3863
    """
    rows, weights, count = _rows(gates, mask, "gates", reduce)
    n = tl.shape(rows)[-1]
    (mass,), _ = _summed(reduce, "gates", count, _total(rows, weights))
    return math.log(n) - _entropy(mass)  # the entropy of the normalised mass


def router_z_loss(logits: Tensor, mask: Any = None, *, reduce: Reduce | None = None) -> Tensor:
    r"""The router z-loss of ST-MoE: the mean of :math:`(\log\sum_n e^{z_n})^2` over tokens.

    It keeps the gate's logits small (near zero), where the activation is
    numerically safe and sensitive.

    Parameters
    ----------
    logits : tensor, shape (..., N)
        The activation's input (after the gate's normalisation).
    mask : bool or integer tensor, shape (...), optional
    reduce : callable, optional
        A sum over processes, called once (see :func:`usage`): the result is
        the whole batch's.

    Returns
    -------
    tensor, shape ()

    Examples
    --------
    >>> import numpy as np
    >>> round(float(router_z_loss(np.zeros((2, 4)))), 4)  # log(4) ** 2
    1.9218
    """
    rows, weights, count = _rows(logits, mask, "logits", reduce)
    top = tl.max(rows, axis=1)
    lse = top + tl.log(tl.sum(tl.exp(rows - tl.reshape(top, (-1, 1))), axis=1))
    squared = lse * lse
    total = tl.sum(squared if weights is None else squared * tl.reshape(weights, (-1,)))
    (total,), count = _summed(reduce, "logits", count, total)
    return total / count


#: The balance losses by name: ``(function, takes logits)``.
LOSSES = {
    "importance_cv2": (importance_cv2, False),
    "uniform_kl": (uniform_kl, False),
    "z_loss": (router_z_loss, True),
}


def check_balance(balance: Mapping[str, float] | None) -> dict[str, float]:
    """Validate ``{loss name: coefficient}``; an empty dict for None.

    Parameters
    ----------
    balance : mapping of str to float, optional
        Names from :data:`LOSSES`, non-negative finite coefficients.

    Returns
    -------
    dict

    Examples
    --------
    >>> check_balance({"uniform_kl": 0.1})
    {'uniform_kl': 0.1}
    """
    if balance is None:
        return {}
    if not isinstance(balance, Mapping):
        raise TypeError(
            f"balance must map loss names to coefficients, got {type(balance).__name__}"
        )
    checked = {}
    for name, weight in balance.items():
        if name not in LOSSES:
            raise ValueError(f"unknown balance loss {name!r}; expected one of {', '.join(LOSSES)}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise TypeError(f"balance[{name!r}] must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"balance[{name!r}] must be finite and >= 0, got {weight}")
        checked[name] = float(weight)
    return checked


def balance_loss(
    balance: Mapping[str, float],
    gates: Sequence[Tensor],
    logits: Sequence[Tensor],
    mask: Any = None,
    *,
    reduce: Reduce | None = None,
) -> Tensor:
    """The weighted sum of the balance losses over every expert level.

    Parameters
    ----------
    balance : mapping of str to float
        ``{name: coefficient}`` (:func:`check_balance`).
    gates, logits : sequences of tensors, each (..., N_e)
        Every level's coefficients and the activation's input.
    mask : bool or integer tensor, shape (...), optional
    reduce : callable, optional
        Passed to every loss (see :func:`usage`): called once per loss and
        level, in the same order on every process.

    Returns
    -------
    tensor, shape ()

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([[1.0, 0.0], [1.0, 0.0]])
    >>> float(balance_loss({"importance_cv2": 0.5}, [a], [np.zeros((2, 2))]))
    0.5
    """
    total = None
    for name, weight in balance.items():
        function, takes_logits = LOSSES[name]
        for values in logits if takes_logits else gates:
            term = weight * function(values, mask, reduce=reduce)
            total = term if total is None else total + term
    if total is None:
        raise ValueError("balance has no loss: nothing to compute")
    return total
