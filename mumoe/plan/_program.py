r"""Executing a contraction path as matrix multiplies, on any backend.

opt_einsum finds a good *order* of pairwise contractions; how each pair is
*dispatched* decides the wall time.  Its default dispatch (``tensordot``,
or ``einsum`` when a leg is shared by both operands and kept) permutes the
operands into matrices on every call and returns the batch leg last, so the
next step becomes a batched multiply with a batch stride of one, which BLAS
runs sample by sample.

Each pairwise step here is compiled once into a matrix multiply with fixed
layouts:

* the operand that holds the leading leg (the batch rows) goes on the left,
  so every intermediate is laid out ``(batch..., left..., right...)`` and is
  already in matrix layout for the next step;
* the legs summed over follow the order of the larger operand, so only the
  smaller one (usually a core) is permuted;
* a step with no summed leg is a broadcast product (a Hadamard product for
  CP), and one whose only kept legs are shared is a batched dot product;
* the bias: with ``bias_input`` the input ``x`` keeps its ``I`` columns and
  the step that meets the core holding the input leg computes
  ``x @ core[:I] + core[I]``, instead of concatenating a column of ones to
  ``x``.  That saves copying ``x``, but in a backward pass the two slices of
  the core each cost a zero-filled gradient of the whole core, so the forward
  pass adds the bias inside only where that is cheaper (the bias rule,
  :meth:`mumoe.plan.Plan.bias_inside`).

Each step is compiled into a closure specialised to its kind, so a call runs
only the arithmetic: per-call overhead matters for one-row calls (decoding).
Only ``tl.transpose``, ``reshape``, ``.T``, ``@``, ``*``, ``+``, ``sum`` and slicing
are used, so NumPy, CuPy, JAX and PyTorch (with autograd) run the same steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import tensorly as tl

from mumoe.backends import backend_function

__all__ = ["Kernels", "PairStep", "Program", "SumStep", "backend_kernels", "compile_program"]


@dataclass(frozen=True)
class Kernels:
    """A backend's own kernels that compiled programs use where it declares them.

    Read from ``mumoe/backends/*.toml`` by :func:`mumoe.plan.backend_kernels`.

    Parameters
    ----------
    addmm : callable, optional
        ``addmm(c, a, b) = c + a @ b`` in one call (``torch.addmm``): adds the
        input's bias inside the contraction; ``a @ b + c`` without.
    jit : callable, optional
        Compiles a function of arrays once per shape (``jax.jit``): the whole
        program becomes one compiled function instead of one dispatch per
        operation.
    bias_matmul : callable, optional
        ``bias_matmul(x, core) = x @ core[:I] + core[I]`` for ``x`` of shape
        ``(B, I)``, differentiable with a gradient that does not slice the
        core (:func:`mumoe.nn.bias_matmul`).  Preferred to ``addmm``;
        where a backend declares it, plans add the bias inside the
        contraction for every batch (the bias rule,
        :meth:`mumoe.plan.Plan.bias_inside`).

    Examples
    --------
    >>> Kernels()
    Kernels(addmm=None, jit=None, bias_matmul=None)
    """

    addmm: Callable[[Any, Any, Any], Any] | None = None
    jit: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None
    bias_matmul: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class SumStep:
    """Sum one operand over legs nothing else needs; the result is appended.

    Parameters
    ----------
    position : int
        The operand's position in the working list.
    axes : tuple of int
        The axes summed away.
    legs : str
        The legs of the result.
    equation : str
        The step as an einsum, e.g. ``"abc->ab"``.

    Examples
    --------
    >>> sizes = dict(a=2, b=3, c=4, d=5)
    >>> program = compile_program(["abc", "ad"], "ad", [(0,), (0, 1)], sizes, lead="a")
    >>> program.steps[0]
    SumStep(position=0, axes=(1, 2), legs='a', equation='abc->a')
    """

    position: int
    axes: tuple[int, ...]
    legs: str
    equation: str


@dataclass(frozen=True)
class PairStep:
    """One pairwise contraction, compiled to a fixed layout.

    The operands at positions ``left`` and ``right`` of the working list are
    removed and the result appended.  After ``*_sum`` (legs summed away
    alone) and ``*_perm``, the left operand is ``(batch, M, K)`` and the right
    one ``(batch, K, N)``, each group possibly several legs.

    Parameters
    ----------
    left, right : int
        Positions of the operands in the working list.
    left_sum, right_sum : tuple of int
        Axes each operand sums away alone, before the product.
    left_perm, right_perm : tuple of int or None
        The permutation that brings each operand to its layout (None: none).
    n_batch, n_m, n_k : int
        How many legs form the batch, M and K groups.
    kind : {"matmul", "hadamard", "outer", "dot"}
        The operation.
    bias : bool
        Whether the right operand's K group holds an extra bias slice.
    legs : str
        The legs of the result.
    reshape : bool
        Whether a matmul needs its operands reshaped into matrices (some group
        has several legs, or a batched matrix-vector product); False: plain ``@``.
    equation : str
        The step in the compiled layouts, e.g. ``"ab,be->ae"``.

    Examples
    --------
    >>> step = compile_program(["ab", "cb"], "ac", [(0, 1)], dict(a=8, b=3, c=2), lead="a").steps[0]
    >>> step.equation, step.kind, step.right_perm  # the right operand is read as (b, c)
    ('ab,bc->ac', 'matmul', (1, 0))
    """

    left: int
    right: int
    left_sum: tuple[int, ...]
    right_sum: tuple[int, ...]
    left_perm: tuple[int, ...] | None
    right_perm: tuple[int, ...] | None
    n_batch: int
    n_m: int
    n_k: int
    kind: str
    bias: bool
    legs: str
    reshape: bool
    equation: str


@dataclass(frozen=True)
class Program:
    """A contraction path compiled to :class:`PairStep` s; call it on the operands.

    Parameters
    ----------
    steps : tuple of PairStep and SumStep
    final_perm : tuple of int or None
        The permutation of the last result into the output's leg order.
    bias_inside : bool
        Whether the input's bias is added inside the contraction (see
        :func:`compile_program`).
    bias_width : int, default 0
        With ``bias_inside``: elements of one row of the core slice added as
        the bias (the size of the legs that step keeps from the core).
    bias_features : int, default 0
        With ``bias_inside``: ``I``, the input's columns without the bias.
    kernels : Kernels, optional
        The backend's own kernels the steps may use (none by default).

    Examples
    --------
    >>> from mumoe import planner_of, tr
    >>> net = tr(6, 4, expert_dims=8, rank=(2, 2, 3))
    >>> program = planner_of(net).forward(32, "numpy", "float64").program
    >>> len(program.steps), program.bias_inside
    (4, False)
    """

    steps: tuple[PairStep | SumStep, ...]
    final_perm: tuple[int, ...] | None
    bias_inside: bool
    bias_width: int = 0
    bias_features: int = 0
    kernels: Kernels = field(default_factory=lambda: Kernels(), compare=False, repr=False)

    @functools.cached_property
    def _run(self) -> Callable[[Sequence[Any]], Any]:
        # Generated on the first call (the compiler also makes partial programs).
        return _generate(self)

    def __call__(self, operands: Sequence[Any]) -> Any:
        """Contract ``operands`` (arrays of one backend) along the compiled steps."""
        return self._run(operands)


def _transpose(x: Any, perm: tuple[int, ...]) -> Any:
    return x.T if perm == (1, 0) else tl.transpose(x, perm)


def _generate(program: Program) -> Callable[[Sequence[Any]], Any]:
    """The program as one straight-line Python function over registers.

    Each step becomes a closure specialised to its kind and layouts, and the
    steps one line each: ``r5 = step0(r1, r3)``.  The operands and results
    are registers that never move (the steps address opt_einsum's working
    list, translated once here), so a call runs the arithmetic and nothing
    else: per-call overhead decides the time of one-row calls (decoding).
    """
    steps = program.steps
    n_operands = 1 + sum(isinstance(step, PairStep) for step in steps)
    working = list(range(n_operands))
    namespace: dict[str, Any] = {}
    lines = [
        "def run(operands):",
        f"    ({''.join(f'r{k}, ' for k in range(n_operands))}) = operands",
    ]
    result = n_operands - 1
    for k, step in enumerate(steps):
        result = n_operands + k
        if isinstance(step, SumStep):
            namespace[f"step{k}"] = _sum(step.axes)
            lines.append(f"    r{result} = step{k}(r{working.pop(step.position)})")
        else:
            left, right = working[step.left], working[step.right]
            for position in sorted((step.left, step.right), reverse=True):
                del working[position]
            namespace[f"step{k}"] = _pair(step, program.kernels)
            lines.append(f"    r{result} = step{k}(r{left}, r{right})")
        working.append(result)
    if program.final_perm is None:
        lines.append(f"    return r{result}")
    else:
        namespace["final"] = _prepare((), program.final_perm)
        lines.append(f"    return final(r{result})")
    exec("\n".join(lines), namespace)  # code built here from integers and names only
    jit = program.kernels.jit
    return namespace["run"] if jit is None else jit(namespace["run"])


def _sum(axes: tuple[int, ...]) -> Callable[[Any], Any]:
    # torch reads an empty dim tuple as "every dim": skip no-op sums
    return (lambda t: t.sum(axes)) if axes else (lambda t: t)


def _prepare(axes: tuple[int, ...], perm: tuple[int, ...] | None) -> Callable[[Any], Any] | None:
    # What one operand needs before the product: sums over its own legs, a permutation.
    if not axes and perm is None:
        return None
    if perm is None:
        return lambda t: t.sum(axes)
    if not axes:
        return (lambda t: t.T) if perm == (1, 0) else (lambda t: tl.transpose(t, perm))
    return lambda t: _transpose(t.sum(axes), perm)


def _pair(step: PairStep, kernels: Kernels) -> Callable[[Any, Any], Any]:
    """The step's product as a closure specialised to its kind and layouts."""
    product = _product(step, kernels)
    prep_a = _prepare(step.left_sum, step.left_perm)
    prep_b = _prepare(step.right_sum, step.right_perm)
    if prep_a is None and prep_b is None:
        return product
    if prep_a is None:
        return lambda a, b: product(a, prep_b(b))  # type: ignore[misc]
    if prep_b is None:
        return lambda a, b: product(prep_a(a), b)
    return lambda a, b: product(prep_a(a), prep_b(b))


def _product(step: PairStep, kernels: Kernels) -> Callable[[Any, Any], Any]:
    if step.kind == "hadamard":
        return lambda a, b: a * b
    if step.kind == "matmul" and not step.reshape:
        # Every group is at most one leg: the operands are matrices already.
        if step.bias and not step.n_batch:
            # x (B, I) @ core (I + 1, N): the core's last row is the bias.
            if kernels.bias_matmul is not None:
                return kernels.bias_matmul
            addmm = kernels.addmm
            if addmm is not None:
                return lambda a, b: addmm(b[a.shape[-1]], a, b[: a.shape[-1]])
            return lambda a, b: a @ b[: a.shape[-1]] + b[a.shape[-1]]
        if step.bias:
            return lambda a, b: _biased_matmul(a, b, a.shape[-1])
        return lambda a, b: a @ b
    nb, nm, nk = step.n_batch, step.n_m, step.n_k

    def grouped(a: Any, b: Any) -> Any:
        a_shape, b_shape = tuple(a.shape), tuple(b.shape)
        batch, m_shape = a_shape[:nb], a_shape[nb : nb + nm]
        n_shape = b_shape[nb + nk :]
        m, k, n = math.prod(m_shape), math.prod(a_shape[nb + nm :]), math.prod(n_shape)
        out_shape = (*batch, *m_shape, *n_shape)
        if step.kind == "outer":
            return (a.reshape(*batch, m, 1) * b.reshape(*batch, 1, n)).reshape(out_shape)
        if step.kind == "dot":
            return (a.reshape(*batch, k) * b.reshape(*batch, k)).sum(-1).reshape(out_shape)
        lead = (math.prod(batch),) if nb else ()
        a2 = a.reshape(*lead, m, k)
        if step.bias:
            c = _biased_matmul(a2, b.reshape(*lead, k + 1, n), k)
        else:
            c = a2 @ b.reshape(*lead, k, n)
        return c.reshape(out_shape)

    return grouped


def _biased_matmul(a: Any, b: Any, k: int) -> Any:
    # a @ b[:k] + b[k]: the rows of b past k are the bias slice.
    return a @ b[..., :k, :] + b[..., k:, :]


def compile_program(
    inputs: Sequence[str],
    output: str,
    path: Sequence[Sequence[int]],
    sizes: Mapping[str, int],
    *,
    lead: str | None = None,
    bias_input: int | None = None,
    kernels: Kernels | None = None,
) -> Program:
    """Compile a pairwise contraction path into matrix-multiply steps.

    Parameters
    ----------
    inputs : sequence of str
        The legs of each operand, one character per leg.
    output : str
        The legs of the result.
    path : sequence of pairs
        opt_einsum's path (positions in the working list).
    sizes : mapping
        The size of every leg at the shapes the path was searched for; used
        to choose which operand to permute.
    lead : str, optional
        The leg to keep leading in every intermediate (the batch rows).
    bias_input : int, optional
        Position of the input operand ``x`` whose legs are ``(lead, i)`` with
        ``i`` one shorter than its partner's (the bias slice).  If the path
        contracts ``x`` first with an operand holding ``i`` in a matrix
        multiply, the bias is added there; otherwise the program is compiled
        without it and ``Program.bias_inside`` is False (concatenate ones).
    kernels : Kernels, optional
        The backend's own kernels (see :class:`Kernels`).

    Returns
    -------
    Program

    Examples
    --------
    >>> program = compile_program(["ab", "bc"], "ac", [(0, 1)], {"a": 4, "b": 3, "c": 2}, lead="a")
    >>> [(step.kind, step.equation) for step in program.steps]
    [('matmul', 'ab,bc->ac')]
    """
    program = _compile(inputs, output, path, sizes, lead, bias_input)
    if bias_input is not None and not program.bias_inside:
        program = _compile(inputs, output, path, sizes, lead, None)
    return program if kernels is None else dataclasses.replace(program, kernels=kernels)


def _compile(
    inputs: Sequence[str],
    output: str,
    path: Sequence[Sequence[int]],
    sizes: Mapping[str, int],
    lead: str | None,
    bias_input: int | None,
) -> Program:
    operands = [str(legs) for legs in inputs]
    origin: list[int | None] = list(range(len(operands)))
    steps: list[PairStep | SumStep] = []
    did_bias = False
    bias_width = bias_features = 0
    for contraction in path:
        if len(contraction) == 1:
            (k,) = contraction
            others = [legs for p, legs in enumerate(operands) if p != k]
            needed = set(output).union(*others)
            if bias_input is not None and origin[k] == bias_input:
                return Program(tuple(steps), None, bias_inside=False)
            legs = operands.pop(k)
            origin.pop(k)
            axes = tuple(p for p, leg in enumerate(legs) if leg not in needed)
            kept = "".join(leg for leg in legs if leg in needed)
            steps.append(SumStep(k, axes, kept, f"{legs}->{kept}"))
            operands.append(kept)
            origin.append(None)
            continue
        if len(contraction) != 2:
            raise ValueError(f"only pairwise paths are compiled, got step {tuple(contraction)}")
        i, j = contraction
        others = [legs for k, legs in enumerate(operands) if k not in (i, j)]
        needed = set(output).union(*others)
        left, right = i, j
        if bias_input is not None and origin[j] == bias_input:
            left, right = j, i
        elif bias_input is None or origin[i] != bias_input:
            if lead is not None and lead in operands[j] and lead not in operands[i]:
                left, right = j, i
        la, lb = operands[left], operands[right]
        left_sum = tuple(p for p, leg in enumerate(la) if leg not in lb and leg not in needed)
        right_sum = tuple(p for p, leg in enumerate(lb) if leg not in la and leg not in needed)
        la = "".join(leg for p, leg in enumerate(la) if p not in left_sum)
        lb = "".join(leg for p, leg in enumerate(lb) if p not in right_sum)
        batch = [leg for leg in la if leg in lb and leg in needed]
        if lead in batch:
            batch.remove(lead)
            batch.insert(0, lead)
        m = [leg for leg in la if leg not in lb]
        n = [leg for leg in lb if leg not in la]
        summed = min(
            (
                [leg for leg in la if leg in lb and leg not in needed],
                [leg for leg in lb if leg in la and leg not in needed],
            ),
            key=lambda k: (
                _copy_cost(la, [batch, m, k], sizes) + _copy_cost(lb, [batch, k, n], sizes)
            ),
        )
        new_a = "".join(batch + m + summed)
        new_b = "".join(batch + summed + n)
        kind = "matmul" if summed and (m or n) else ("dot" if summed else "outer")
        if kind == "outer" and not m and not n:
            kind = "hadamard"  # shared legs only, in the same order after the perms
        plain = len(batch) <= 1 and len(m) == 1 and len(summed) == 1 and len(n) == 1
        is_bias = (
            bias_input is not None
            and origin[left] == bias_input
            and kind == "matmul"
            and len(summed) == 1
            and not batch[1:]
        )
        if bias_input is not None and bias_input in (origin[left], origin[right]) and not is_bias:
            return Program(
                tuple(steps), None, bias_inside=False
            )  # the bias cannot be bias_input here
        if is_bias:
            did_bias = True
            bias_width = math.prod(sizes[leg] for leg in n)
            bias_features = sizes[summed[0]] - 1
        steps.append(
            PairStep(
                left=left,
                right=right,
                left_sum=left_sum,
                right_sum=right_sum,
                left_perm=_perm(la, new_a),
                right_perm=_perm(lb, new_b),
                n_batch=len(batch),
                n_m=len(m),
                n_k=len(summed),
                kind=kind,
                bias=is_bias,
                legs="".join(batch + m + n),
                reshape=not plain,
                equation=f"{new_a},{new_b}->{''.join(batch + m + n)}",
            )
        )
        for k in sorted((i, j), reverse=True):
            del operands[k]
            del origin[k]
        operands.append("".join(batch + m + n))
        origin.append(None)
    if len(operands) != 1 or sorted(operands[0]) != sorted(output):
        raise ValueError(f"path {path} does not contract {inputs} into {output!r}")
    return Program(tuple(steps), _perm(operands[0], output), did_bias, bias_width, bias_features)


def _copy_cost(legs: str, groups: Sequence[Sequence[str]], sizes: Mapping[str, int]) -> int:
    # Elements copied to lay a contiguous operand out as matrices of `groups`
    # (its legs permuted group after group, each group merged into one axis):
    # none when every group is a run of consecutive axes in memory order.
    for group in groups:
        axes = [legs.index(leg) for leg in group]
        if axes and axes != list(range(axes[0], axes[0] + len(axes))):
            return math.prod(sizes[leg] for leg in legs)
    return 0


def _perm(have: str, want: str) -> tuple[int, ...] | None:
    perm = tuple(have.index(leg) for leg in want)
    return None if perm == tuple(range(len(perm))) else perm


def backend_kernels(backend: str) -> Kernels:
    """The kernels ``backend`` declares for compiled programs (none if undeclared).

    Parameters
    ----------
    backend : str
        A TensorLy backend name.

    Returns
    -------
    mumoe.plan.Kernels

    Examples
    --------
    >>> backend_kernels("numpy")
    Kernels(addmm=None, jit=None, bias_matmul=None)
    """
    return Kernels(
        addmm=backend_function(backend, "addmm"),
        jit=backend_function(backend, "jit"),
        bias_matmul=backend_function(backend, "bias_matmul"),
    )
