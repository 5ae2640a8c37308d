r"""entmax-1.5 and sparsemax on CPU arrays, compiled: no sort, a few vectorised passes a row.

The CPU kernels of the gate activations, shared by the NumPy backend
(``mumoe/backends/numpy.toml``) and by PyTorch's CPU tensors (on NumPy views of
them): one implementation for the NumPy family.  Numba
compiles them on first use (and caches them on disk); large inputs are split
into row blocks, one parallel launch of Numba's threading layer (:func:`run`).

Both activations are :math:`p_i = \max(u_i - \tau, 0)^{1/(\alpha - 1)}` with
:math:`u = (\alpha - 1)(z - \max z)` (:math:`\alpha = 2` for sparsemax, 1.5 for
entmax-1.5) and :math:`\tau` the one threshold with :math:`\sum_i p_i = 1`.
The threshold of any subset of a row's logits is at most the row's (adding
logits only adds to :math:`F(\tau) = \sum_i \max(u_i - \tau, 0)^{1/(\alpha-1)}`),
and the largest logit alone gives :math:`-1`.  Each row is

1. **scanned** for its maximum, in 8 lanes (``z[l::8]``) whose maxima are 8 of
   its logits, and for NaNs;
2. **bounded**: the exact threshold of those 8 logits (sorted by a sorting
   network) is a lower bound of the row's, close to it on gate logits.  Short
   rows keep every logit; long rows (``LONG``) gather those above the bound,
   a few percent;
3. **thresholded** by Newton's method on :math:`\sqrt{F}` (convex and
   decreasing, so from a lower bound its iterates stay below :math:`\tau`),
   over the logits kept.  Each pass also solves :math:`F = 1` exactly on the
   logits above the iterate (the ``entmax`` package's closed form:
   :math:`(c_1 - 1)/k` for sparsemax, :math:`(c_1 - \sqrt{c_1^2 - k (c_2 - 1)})/k`
   for entmax-1.5, :math:`c_1, c_2` the sums of :math:`u, u^2`), and the next
   pass checks that solution: consistent (no logit kept below it, none dropped
   above it), it is the exact threshold.  From a bound this close, gate logits
   take a few passes; a row where rounding stops the iteration first is
   finished by sorting its candidates, the ``entmax`` package's way;
4. **written**: the coefficients (long rows: zeros, and the support's).

The backward passes are the closed forms (Peters et al., 2019): with
:math:`s = \sqrt{p}`, entmax-1.5's is :math:`s \odot (g - \langle s, g\rangle / \sum s)`,
and sparsemax's :math:`[g - \bar g_S]_S` on the support :math:`S`.

Non-finite logits: a ``-inf`` logit gets an exact 0; a row with a NaN or
``+inf``, or with every logit ``-inf``, gets NaN coefficients (as softmax).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from mumoe.backends import forked_child

__all__ = ["entmax15", "entmax15_backward", "sparsemax", "sparsemax_backward"]

ENTMAX15, SPARSEMAX = 0, 1
#: Inputs of at least twice this many logits (and more than one row) are split into
#: row blocks run in parallel, on up to one thread per this many logits; below, starting
#: the threads costs more than it saves.
PARALLEL = 1 << 16

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")
_FM = {"reassoc", "nsz", "contract"}
_inline = numba.njit(cache=True, nogil=True, inline="always", fastmath=_FM, error_model="numpy")
# Sums over rows, vectorised: reassociation only (NaN and inf keep their meaning).
_jit_rows = numba.njit(cache=True, nogil=True, fastmath=_FM, error_model="numpy")


@_jit
def _sorted_threshold(u: Any, kind: int) -> float:
    """The threshold of ``u`` (finite, maximum 0) from its sorted candidates: the package's rule."""
    s = np.sort(u[u > -1.0])
    c = s.size
    tau, c1, c2 = -np.inf, 0.0, 0.0
    for k in range(1, c + 1):
        v = s[c - k]
        c1 += v
        if kind == ENTMAX15:
            c2 += v * v
            t = (c1 - np.sqrt(max(c1 * c1 + k * (1.0 - c2), 0.0))) / k
            if t <= v and t > tau:
                tau = t
        else:
            t = (c1 - 1.0) / k
            if k * v > c1 - 1.0 and t > tau:
                tau = t
    return tau


@_inline
def _threshold(u: Any, kind: int, t: float) -> float:
    """The exact threshold of ``u`` (finite, maximum 0), from ``t``, a lower bound of it."""
    low, root = 0.0, -2.0  # the last solution (root) and the iterate it was solved at (low)
    stalled = False
    for _ in range(64):
        # Sums over the u above t, and how many u lie in (low, root): none, and root is
        # consistent (hence exact).  Written with 0/1 weights (not selects, not min/max),
        # the loop vectorises, 4x faster; the weights need finite u.
        k, s1, s2, inside = 0.0, 0.0, 0.0, 0.0
        for j in range(u.size):
            v = u[j]
            w = 1.0 if v > t else 0.0
            k += w
            s1 += w * v
            s2 += w * v * v
            inside += (1.0 if v > low else 0.0) * (1.0 if v < root else 0.0)
        if low <= root and inside == 0.0:
            return root
        if stalled:
            break
        if kind == ENTMAX15:
            disc = s1 * s1 - k * (s2 - 1.0)
            solution = (s1 - np.sqrt(disc)) / k if disc >= 0.0 else -2.0
            # Newton's step on sqrt(F(t)) = ||max(u - t, 0)||, convex and closer to linear
            # than F = sum max(u - t, 0)^2 (fewer steps; from below, it stays below).
            f = s2 - 2.0 * t * s1 + k * t * t
            step = (f - np.sqrt(f)) / (s1 - k * t)
        else:
            solution = (s1 - 1.0) / k
            step = solution - t  # F is linear on the u kept: Newton lands on it
        low, root = t, solution
        if step > 0.0:
            t += step
        else:  # rounding, or t is the threshold: one more pass checks the solution
            stalled = True
    return _sorted_threshold(u, kind)


@_inline
def _maximum(row: Any, lanes: Any) -> tuple[float, bool]:
    """The row's maximum, and whether it holds a NaN; ``lanes``: 8 of its logits, large ones.

    ``lanes[l]`` is the largest of the logits ``l, l + 8, l + 16, ...`` (rows of 8 or more).
    """
    # Eight running maxima: one alone is a chain of dependent compares, 4x slower.
    n = row.size
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    if n >= 8:  # each lane starts from its own logit, so the lanes hold 8 distinct ones
        m1, m2, m3, m4, m5, m6, m7 = row[1], row[2], row[3], row[4], row[5], row[6], row[7]
    nan = False
    i = 0
    while i + 8 <= n:
        z0, z1, z2, z3 = row[i], row[i + 1], row[i + 2], row[i + 3]
        z4, z5, z6, z7 = row[i + 4], row[i + 5], row[i + 6], row[i + 7]
        m0, m1 = (z0 if z0 > m0 else m0), (z1 if z1 > m1 else m1)
        m2, m3 = (z2 if z2 > m2 else m2), (z3 if z3 > m3 else m3)
        m4, m5 = (z4 if z4 > m4 else m4), (z5 if z5 > m5 else m5)
        m6, m7 = (z6 if z6 > m6 else m6), (z7 if z7 > m7 else m7)
        nan |= (z0 != z0) | (z1 != z1) | (z2 != z2) | (z3 != z3)
        nan |= (z4 != z4) | (z5 != z5) | (z6 != z6) | (z7 != z7)
        i += 8
    lanes[0], lanes[1], lanes[2], lanes[3] = m0, m1, m2, m3
    lanes[4], lanes[5], lanes[6], lanes[7] = m4, m5, m6, m7
    for j in range(i, n):
        z = row[j]
        m0 = z if z > m0 else m0
        nan |= z != z
    m0, m1, m2, m3 = max(m0, m4), max(m1, m5), max(m2, m6), max(m3, m7)
    return max(max(m0, m2), max(m1, m3)), nan


@_inline
def _swap(a: float, b: float) -> tuple[float, float]:
    return (a, b) if a >= b else (b, a)


@_inline
def _lanes_threshold(lanes: Any, top: float, scale: float, kind: int) -> float:
    """The exact threshold of the 8 logits in ``lanes``: a lower bound of the row's.

    (Adding logits to a set only raises its threshold.)  Sorted by a sorting network
    (19 compare-exchanges, no branch), then the ``entmax`` package's rule.
    """
    a0, a1 = _swap((lanes[0] - top) * scale, (lanes[1] - top) * scale)
    a2, a3 = _swap((lanes[2] - top) * scale, (lanes[3] - top) * scale)
    a4, a5 = _swap((lanes[4] - top) * scale, (lanes[5] - top) * scale)
    a6, a7 = _swap((lanes[6] - top) * scale, (lanes[7] - top) * scale)
    a0, a2 = _swap(a0, a2)
    a1, a3 = _swap(a1, a3)
    a4, a6 = _swap(a4, a6)
    a5, a7 = _swap(a5, a7)
    a1, a2 = _swap(a1, a2)
    a5, a6 = _swap(a5, a6)
    a0, a4 = _swap(a0, a4)
    a3, a7 = _swap(a3, a7)
    a1, a5 = _swap(a1, a5)
    a2, a6 = _swap(a2, a6)
    a1, a4 = _swap(a1, a4)
    a3, a6 = _swap(a3, a6)
    a2, a4 = _swap(a2, a4)
    a3, a5 = _swap(a3, a5)
    a3, a4 = _swap(a3, a4)
    tau, c1, c2 = -1.0, 0.0, 0.0
    for k, v in enumerate((a0, a1, a2, a3, a4, a5, a6, a7)):
        c1 += v
        if kind == ENTMAX15:
            c2 += v * v
            t = (c1 - np.sqrt(max(c1 * c1 - (k + 1) * (c2 - 1.0), 0.0))) / (k + 1)
            tau = t if t <= v and t > tau else tau
        else:
            t = (c1 - 1.0) / (k + 1)
            tau = t if (k + 1) * v > c1 - 1.0 and t > tau else tau
    return tau


#: Rows of at least this many logits first gather the logits above the lower bound (a
#: few percent on gate logits), and Newton's passes run over those; shorter rows pass
#: over all their logits, which costs less than gathering them.
LONG = 256


@_jit_rows
def _forward(x: Any, out: Any, kind: int) -> None:
    n = x.shape[1]
    scale = 0.5 if kind == ENTMAX15 else 1.0
    index = np.empty(n, dtype=np.int64)
    u = np.empty(n, dtype=np.float64)
    lanes = np.empty(8, dtype=np.float64)
    raw = np.empty(1, dtype=x.dtype)  # the bound on the logits, in their dtype
    for b in range(x.shape[0]):
        row, o = x[b], out[b]
        top, nan = _maximum(row, lanes)
        if nan or not abs(top) < np.inf:  # a NaN or +inf, or every logit -inf
            o[:] = np.nan
            continue
        # (Lane l holds a logit of lane l alone: 8 distinct logits of the row.)
        low = _lanes_threshold(lanes, top, scale, kind) if n >= 8 else -1.0
        bound = max(low - 1e-12, -1.0)  # rounding: keep the bound below the threshold
        if n < LONG:
            # Short rows: Newton's passes over the whole row (vectorised) cost less than
            # gathering its candidates.  -inf logits become -2, never a candidate.
            for i in range(n):
                v = (row[i] - top) * scale
                u[i] = v if v > -2.0 else -2.0
            tau = _threshold(u[:n], kind, bound)
            for i in range(n):
                p = max(u[i] - tau, 0.0)
                o[i] = p * p if kind == ENTMAX15 else p
            continue
        # Long rows: a few percent are candidates, behind a well-predicted branch on the
        # logit itself (a quarter faster than on u): the bound in the row's dtype, rounded
        # down so that it stays below.
        raw[0] = top + bound / scale
        below = np.nextafter(raw[0], -np.inf)
        c = np.uint64(0)
        for i in range(n):
            if row[i] > below:
                v = (row[i] - top) * scale
                index[c] = i
                u[c] = v
                c += np.uint64(v > bound)
        tau = _threshold(u[:c], kind, bound)
        o[:] = 0.0
        for j in range(c):
            p = max(u[j] - tau, 0.0)
            o[index[j]] = p * p if kind == ENTMAX15 else p


@_jit_rows
def _backward(p: Any, g: Any, out: Any, kind: int) -> None:
    # One loop per activation (s = sqrt(p), or s = [p > 0]): each vectorises.
    for b in range(p.shape[0]):
        pb, gb, o = p[b], g[b], out[b]
        weight, weighted = 0.0, 0.0
        if kind == ENTMAX15:
            for i in range(pb.size):
                s = np.sqrt(pb[i])
                weight += s
                weighted += s * gb[i]
            mean = weighted / weight
            for i in range(pb.size):
                o[i] = np.sqrt(pb[i]) * (gb[i] - mean)
        else:
            for i in range(pb.size):
                s = 1.0 if pb[i] > 0.0 else 0.0
                weight += s
                weighted += s * gb[i]
            mean = weighted / weight
            for i in range(pb.size):
                o[i] = (1.0 if pb[i] > 0.0 else 0.0) * (gb[i] - mean)  # NaN rows: NaN


# The parallel launches are compiled in each process (about 2 s, at the first large input)
# and not cached: loaded from Numba's cache, they gave results 1 ulp away from the serial
# kernels'; compiled afresh, the same bits (tests/gates/test_entmax.py checks it).
@numba.njit(nogil=True, parallel=True, fastmath=_FM, error_model="numpy")
def _forward_blocks(x: Any, out: Any, kind: int, blocks: int) -> None:
    step = (x.shape[0] + blocks - 1) // blocks
    for block in numba.prange(blocks):
        start, stop = block * step, min(x.shape[0], (block + 1) * step)
        if start < stop:
            _forward(x[start:stop], out[start:stop], kind)


@numba.njit(nogil=True, parallel=True, fastmath=_FM, error_model="numpy")
def _backward_blocks(p: Any, g: Any, out: Any, kind: int, blocks: int) -> None:
    step = (p.shape[0] + blocks - 1) // blocks
    for block in numba.prange(blocks):
        start, stop = block * step, min(p.shape[0], (block + 1) * step)
        if start < stop:
            _backward(p[start:stop], g[start:stop], out[start:stop], kind)


_BLOCKS: dict[str, Any] = {"_forward": _forward_blocks, "_backward": _backward_blocks}
# One parallel launch at a time: Numba's workqueue threading layer (where no OpenMP or TBB
# is installed) aborts the process on concurrent launches.
_LAUNCH = threading.Lock()


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(kernel: Any, arrays: Sequence[np.ndarray], kind: int, threads: int | None = None) -> None:
    """Run ``kernel(*arrays, kind)`` on 2-D C-contiguous arrays, in row blocks on threads.

    Large inputs run as one parallel launch of Numba's threading layer (OpenMP where
    Numba has it: after a torch operation, torch's OpenMP threads are still spinning on
    the other cores, where a thread pool of this process's own gets no time, while
    OpenMP's team does).  The result is the serial kernel's, bit for bit.

    Parameters
    ----------
    kernel : compiled function
        ``_forward`` (logits, out) or ``_backward`` (p, g, out).
    arrays : sequence of numpy.ndarray, each shape (B, N)
    kind : int
        :data:`ENTMAX15` or :data:`SPARSEMAX`.
    threads : int, optional
        At most this many threads (by default, the CPUs this process may use).
    """
    rows, size = arrays[0].shape
    size *= rows
    if size < 2 * PARALLEL:  # one block: the common case of a small gate, kept short
        kernel(*arrays, kind)
        return
    limit: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # (set at import)
    workers = min(_threads() if threads is None else threads, rows, size // PARALLEL, limit)
    if workers < 2 or forked_child():  # GNU OpenMP's threads do not survive fork
        kernel(*arrays, kind)
        return
    with _LAUNCH:
        previous = numba.get_num_threads()  # (the caller's, thread-local: given back)
        numba.set_num_threads(workers)
        try:
            _BLOCKS[kernel.__name__](*arrays, kind, 4 * workers)
        finally:
            numba.set_num_threads(previous)


def _rows(z: Any, name: str) -> tuple[np.ndarray, tuple[int, ...], Any]:
    """``z`` as C-contiguous float32/float64 rows, its shape, and the dtype to return."""
    z = np.asarray(z)
    if z.ndim == 0:
        raise ValueError(f"{name} expects an array of shape (..., N), got a scalar")
    if z.dtype.kind not in "fiub":
        raise TypeError(f"{name} expects real numbers, got an array of {z.dtype}")
    dtype = z.dtype if z.dtype.kind == "f" else np.dtype(np.float64)
    compute = dtype if dtype in (np.float32, np.float64) else np.dtype(np.float32)
    rows = np.ascontiguousarray(z.reshape(-1, z.shape[-1]) if z.shape[-1] else z, dtype=compute)
    return rows, z.shape, dtype


def _activation(z: Any, kind: int, name: str) -> np.ndarray:
    rows, shape, dtype = _rows(z, name)
    out = np.empty_like(rows)
    if rows.size:
        run(_forward, (rows, out), kind)
    return out.reshape(shape).astype(dtype, copy=False)


def _gradient(p: Any, g: Any, kind: int, name: str) -> np.ndarray:
    rows, shape, dtype = _rows(p, name)
    if np.shape(g) != shape:
        raise ValueError(f"{name}: the gradient's shape {np.shape(g)} is not the output's {shape}")
    grad = np.ascontiguousarray(np.reshape(g, rows.shape), dtype=rows.dtype)
    out = np.empty_like(rows)
    if rows.size:
        run(_backward, (rows, grad, out), kind)
    return out.reshape(shape).astype(dtype, copy=False)


def entmax15(z: Any) -> np.ndarray:
    """entmax-1.5 over the last axis of a NumPy array, exact.

    Parameters
    ----------
    z : array_like, shape (..., N)
        Logits.  float32 and float64 are computed in their own precision,
        float16 in float32, integers in float64.

    Returns
    -------
    numpy.ndarray, shape (..., N)
        Non-negative, summing to one over the last axis, exact zeros outside
        the support; NaN rows where a logit is NaN or ``+inf`` or all are ``-inf``.

    Examples
    --------
    >>> import numpy as np
    >>> entmax15(np.array([[1.0, 0.0, -np.inf]], dtype=np.float32))
    array([[0.83071893, 0.16928108, 0.        ]], dtype=float32)
    """
    return _activation(z, ENTMAX15, "entmax15")


def sparsemax(z: Any) -> np.ndarray:
    """Sparsemax over the last axis of a NumPy array, exact.

    Parameters
    ----------
    z : array_like, shape (..., N)
        Logits (dtypes as :func:`entmax15`).

    Returns
    -------
    numpy.ndarray, shape (..., N)

    Examples
    --------
    >>> import numpy as np
    >>> sparsemax(np.array([[0.5, 0.25, -3.0]]))
    array([[0.625, 0.375, 0.   ]])
    """
    return _activation(z, SPARSEMAX, "sparsemax")


def entmax15_backward(p: Any, g: Any) -> np.ndarray:
    r"""The gradient of entmax-1.5 for its output ``p`` and an output gradient ``g``.

    Parameters
    ----------
    p : array_like, shape (..., N)
        :func:`entmax15`'s output.
    g : array_like, shape (..., N)
        The gradient with respect to ``p``.

    Returns
    -------
    numpy.ndarray, shape (..., N)
        :math:`s \odot (g - \langle s, g \rangle / \sum s)` with :math:`s = \sqrt{p}`.

    Examples
    --------
    >>> import numpy as np
    >>> entmax15_backward(np.array([[0.25, 0.25, 0.25, 0.25, 0.0]]), np.array([[1.0, 0, 0, 0, 5]]))
    array([[ 0.375, -0.125, -0.125, -0.125,  0.   ]])
    """
    return _gradient(p, g, ENTMAX15, "entmax15_backward")


def sparsemax_backward(p: Any, g: Any) -> np.ndarray:
    r"""The gradient of sparsemax for its output ``p`` and an output gradient ``g``.

    Parameters
    ----------
    p : array_like, shape (..., N)
        :func:`sparsemax`'s output.
    g : array_like, shape (..., N)
        The gradient with respect to ``p``.

    Returns
    -------
    numpy.ndarray, shape (..., N)
        :math:`g - \bar g_S` on the support :math:`S = \{p > 0\}`, 0 elsewhere.

    Examples
    --------
    >>> import numpy as np
    >>> sparsemax_backward(np.array([[0.5, 0.5, 0.0]]), np.array([[1.0, 0.0, 7.0]]))
    array([[ 0.5, -0.5,  0. ]])
    """
    return _gradient(p, g, SPARSEMAX, "sparsemax_backward")
