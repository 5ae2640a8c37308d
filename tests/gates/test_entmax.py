"""entmax-1.5 and sparsemax against the entmax package, on every path.

Each code path is tested on its own: the compiled CPU kernels
(:mod:`mumoe.gates.entmax_cpu`, which NumPy arrays and torch's CPU tensors run), the
array-API window algorithm (:mod:`mumoe.gates.entmax`, which CuPy and JAX run; here on
NumPy arrays), and torch's window path for other devices (``torch.topk``; forced
here on CPU tensors), including the rows whose support fills the first window and
are done again wider.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe.gates import entmax as simplex
from mumoe.gates import entmax_cpu as simplex_cpu

pytest.importorskip("torch", reason="the oracle is the entmax package, on torch")
pytest.importorskip("entmax", reason="the oracle is the entmax package")

import entmax
import torch

import mumoe.nn._entmax as torch_simplex

KINDS = ("entmax15", "sparsemax")
ORACLE = {"entmax15": entmax.entmax15, "sparsemax": entmax.sparsemax}
TORCH = {"entmax15": torch_simplex.entmax15, "sparsemax": torch_simplex.sparsemax}
#: The NumPy-array paths: compiled (the NumPy backend's) and the array-API window.
MODULES = {"compiled": simplex_cpu, "window": simplex}
PATHS = tuple(MODULES)


@pytest.fixture(params=PATHS)
def torch_path(request, monkeypatch):
    """Run torch's CPU tensors on the compiled kernels, or on the window path of GPUs."""
    if request.param == "window":
        monkeypatch.setattr(torch_simplex, "_compiled", lambda z: False)
    return request.param


def numpy_kernel(path, kind):
    return getattr(MODULES[path], kind)


cases = st.tuples(
    st.integers(0, 5),  # rows (0: an empty batch)
    st.integers(1, 25_000),  # experts
    st.floats(-3, 3),  # log10 of the scale
    st.sampled_from(["none", "round", "top", "equal"]),  # ties
    st.integers(0, 2**31),
)


def draw(rows, n, log_scale, ties, seed, dtype=np.float64):
    z = np.random.default_rng(seed).standard_normal((rows, n)) * 10.0**log_scale
    if ties == "round":
        z = np.round(z)
    elif ties == "top" and n > 2 and rows:
        z[:, :3] = z.max() + 1  # three tied at the top
    elif ties == "equal":
        z[:] = 0.5
    return z.astype(dtype)


def oracle(kind, z):
    return ORACLE[kind](torch.from_numpy(z), dim=-1).numpy()


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(cases, st.sampled_from([np.float64, np.float32, np.float16]))
def test_numpy_equals_the_entmax_package(path, case, dtype):
    # float16 (issue #26, item 8): the window in float16 left the simplex (a row summed to
    # 0.82); it is computed in float32, so only the final rounding to float16 remains.
    z = draw(*case, dtype=dtype)
    tolerance = {np.float64: 1e-10, np.float32: 1e-6, np.float16: 1e-3}[dtype]
    for kind in KINDS:
        p = numpy_kernel(path, kind)(z)
        assert p.dtype == dtype and p.shape == z.shape
        expected = oracle(kind, z.astype(np.float64))
        np.testing.assert_allclose(p, expected, rtol=0, atol=tolerance)
        if z.shape[0]:
            np.testing.assert_allclose(p.sum(-1), 1.0, rtol=10 * tolerance)  # sums round
            assert (p >= 0).all()


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=15, deadline=None)
@given(cases)
def test_torch_equals_the_entmax_package_values_and_gradients(path, case):
    with pytest.MonkeyPatch.context() as patch:
        if path == "window":
            patch.setattr(torch_simplex, "_compiled", lambda z: False)
        check_torch_against_the_package(draw(*case), seed=case[-1])


def check_torch_against_the_package(z, seed):
    weights = torch.from_numpy(np.random.default_rng(seed + 1).standard_normal(z.shape))
    for kind in KINDS:
        ours = torch.from_numpy(z).requires_grad_()
        theirs = torch.from_numpy(z).requires_grad_()
        p, reference = TORCH[kind](ours), ORACLE[kind](theirs, dim=-1)
        torch.testing.assert_close(p, reference, rtol=0, atol=1e-10)
        if z.shape[0] == 0:
            continue
        (g_ours,) = torch.autograd.grad((p * weights).sum(), ours)
        (g_theirs,) = torch.autograd.grad((reference * weights).sum(), theirs)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_matches_the_package_in_float32(torch_path, kind):
    z = draw(4, 2048, 0.0, "none", 7, np.float32)
    expected = oracle(kind, z)
    np.testing.assert_allclose(numpy_kernel(torch_path, kind)(z), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(TORCH[kind](torch.from_numpy(z)).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_many_experts_and_supports_beyond_the_first_window(torch_path, kind, monkeypatch):
    # Near-uniform rows have supports of hundreds: the window paths' first window of 64
    # is filled, and those rows (only those) are done again with wider windows; the
    # compiled kernels' candidates run into the thousands.
    z = draw(3, 25_000, 0.0, "none", 3)
    z[1] = draw(1, 25_000, -3.0, "none", 4)[0]  # support in the thousands
    z[2, :300] = 20.0 + draw(1, 300, -4.0, "none", 5)[0]  # 300 nearly tied at the top
    widths = []
    window_threshold, select = simplex._window_threshold, torch_simplex._select

    def numpy_window(z, m, kind, width, xp):
        widths.append(width)
        return window_threshold(z, m, kind, width, xp)

    def torch_window(rows, width):
        widths.append(width)
        return select(rows, width)

    monkeypatch.setattr(simplex, "_window_threshold", numpy_window)
    monkeypatch.setattr(torch_simplex, "_select", torch_window)
    expected = oracle(kind, z)
    np.testing.assert_allclose(numpy_kernel(torch_path, kind)(z), expected, rtol=0, atol=1e-10)
    if torch_path == "window":
        assert max(widths) > simplex.WINDOW, "the numpy path never widened its window"
    widths.clear()
    ours = torch.from_numpy(z).requires_grad_()
    p = TORCH[kind](ours)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-10)
    if torch_path == "window":
        assert max(widths) > simplex.WINDOW, "the torch path never widened its window"
    # The gradient of a widened row, against the package's.
    theirs = torch.from_numpy(z).requires_grad_()
    weights = torch.linspace(-1, 1, z.shape[-1], dtype=torch.float64)
    (g_ours,) = torch.autograd.grad((p * weights).sum(), ours)
    (g_theirs,) = torch.autograd.grad((ORACLE[kind](theirs, dim=-1) * weights).sum(), theirs)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(torch_path, kind):
    generator = torch.Generator().manual_seed(0)
    z = (torch.randn(3, 9, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(TORCH[kind], (z,))
    assert torch.autograd.gradgradcheck(TORCH[kind], (z,))


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_logits_empty_batches_and_one_expert(torch_path, kind):
    z = np.array(
        [
            [1.0, np.nan, 0.0, 2.0],  # a NaN: the row is NaN
            [1.0, -np.inf, 0.0, 2.0],  # -inf: an exact zero there
            [-np.inf] * 4,  # all -inf: NaN, as softmax
            [np.inf, 0.0, 1.0, 2.0],  # +inf: NaN, as softmax
            [0.5, 0.5, 0.5, 0.5],
        ]
    )
    numpy_activation = numpy_kernel(torch_path, kind)
    for out in (numpy_activation(z), TORCH[kind](torch.from_numpy(z)).numpy()):
        assert np.isnan(out[[0, 2, 3]]).all()
        finite = numpy_activation(np.array([[1.0, 0.0, 2.0]]))[0]
        np.testing.assert_allclose(out[1], [finite[0], 0.0, finite[1], finite[2]], atol=1e-12)
        assert out[1, 1] == 0.0
        np.testing.assert_allclose(out[4], 0.25)
    for shape in ((0, 7), (2, 0, 5), (2, 3, 0)):
        assert numpy_activation(np.zeros(shape)).shape == shape
        assert TORCH[kind](torch.zeros(shape)).shape == shape
    np.testing.assert_array_equal(numpy_activation(np.array([[3.0], [-1e9]])), [[1.0], [1.0]])
    torch.testing.assert_close(TORCH[kind](torch.tensor([[3.0], [-1e9]])), torch.ones(2, 1))
    # Long rows (the compiled kernels' other way to gather candidates) and -inf logits.
    long = np.where(np.arange(600) % 3 == 0, -np.inf, np.linspace(0, 3, 600))[None]
    expected = oracle(kind, np.where(np.isinf(long), -1e300, long))
    np.testing.assert_allclose(numpy_activation(long), expected, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_compute_in_float32(torch_path, kind, dtype):
    z = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    out = TORCH[kind](z.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), TORCH[kind](z.to(dtype).float()).to(dtype).float())


@pytest.mark.parametrize("kind", KINDS)
def test_float16_windows_stay_on_the_simplex(kind):
    # Issue #26, item 8: 276 small logits, all in the support; computed in float16 the
    # window's prefix sums rounded the rows to sums of 0.955 (entmax-1.5).
    z = (np.random.default_rng(0).standard_normal((16, 276)) * 0.1).astype(np.float16)
    p = getattr(simplex, kind)(z)
    assert p.dtype == np.float16
    np.testing.assert_allclose(p.astype(np.float64).sum(-1), 1.0, atol=1e-3)
    np.testing.assert_allclose(p, oracle(kind, z.astype(np.float32)), atol=1e-3)


def test_bad_input_says_what_was_expected():
    with pytest.raises(TypeError, match=r"expects floating-point logits, got torch\.int64"):
        torch_simplex.entmax15(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expects logits of shape \(\.\.\., N\), got a scalar"):
        torch_simplex.sparsemax(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, got ndarray"):
        torch_simplex.entmax15(np.ones((2, 3)))
    with pytest.raises(ValueError, match="kind must be 'entmax15' or 'sparsemax', got 'softmax'"):
        simplex.threshold(np.ones((2, 3)), "softmax")


@pytest.mark.parametrize("n", [9, 64, 255, 256, 1000])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", PATHS)
def test_many_minus_infinity_logits_in_short_and_long_rows(path, kind, n):
    # Half the logits -inf, a whole lane of the compiled kernels' maxima among them,
    # and a row with one finite logit: exact zeros there, the package's values elsewhere.
    rng = np.random.default_rng(n)
    z = rng.standard_normal((20, n)) * 2
    z[rng.random(z.shape) < 0.5] = -np.inf
    z[0, ::8] = -np.inf
    z[1] = -np.inf
    z[1, 3] = 0.5
    out = numpy_kernel(path, kind)(z)
    expected = oracle(kind, np.where(np.isinf(z), -1e300, z))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert (out[np.isinf(z)] == 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_row_blocks_on_threads_give_the_same_coefficients(kind, monkeypatch):
    # Bit for bit: the parallel launch runs the serial kernel, compiled alike, on row blocks.
    generator = torch.Generator().manual_seed(2)
    shapes = ((64, 3000, torch.float64), (4096, 64, torch.float32), (200, 300, torch.float32))
    cases = [torch.randn(b, n, generator=generator, dtype=dtype) for b, n, dtype in shapes]
    single = [TORCH[kind](z) for z in cases]
    gradients = [getattr(simplex_cpu, f"{kind}_backward")(p.numpy(), p.numpy()) for p in single]
    monkeypatch.setattr(simplex_cpu, "PARALLEL", 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        for z, p, g in zip(cases, single, gradients, strict=True):
            torch.testing.assert_close(TORCH[kind](z), p, rtol=0, atol=0)
            np.testing.assert_array_equal(getattr(simplex_cpu, kind)(z.numpy()), p.numpy())
            backward = getattr(simplex_cpu, f"{kind}_backward")
            np.testing.assert_array_equal(backward(p.numpy(), p.numpy()), g)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
def test_parallel_launches_from_many_threads_and_after_fork(monkeypatch):
    # Large inputs are one parallel launch of Numba's threading layer: launches from several
    # Python threads take turns (the workqueue layer would abort on concurrent ones), and a
    # forked child, whose parent's OpenMP threads did not survive the fork, runs serially.
    import multiprocessing
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(simplex_cpu, "PARALLEL", 64)
    zs = [np.random.default_rng(k).standard_normal((200, 300)) for k in range(8)]
    expected = [oracle("entmax15", z) for z in zs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(simplex_cpu.entmax15, zs))
    for ours, theirs in zip(results, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)
    # The fork in a fresh interpreter: this one may hold other threads (JAX's) that a
    # fork would leave in an unknown state.
    code = (
        "import multiprocessing, numpy as np\n"
        "from mumoe.gates import entmax_cpu as simplex_cpu\n"
        "simplex_cpu.PARALLEL = 64\n"
        "z = np.random.default_rng(0).standard_normal((200, 300))\n"
        "parent = simplex_cpu.entmax15(z)  # a parallel launch before the fork\n"
        "def child(queue):\n"
        "    queue.put(simplex_cpu.entmax15(z))\n"
        "if __name__ == '__main__':\n"
        "    context = multiprocessing.get_context('fork')\n"
        "    queue = context.Queue()\n"
        "    process = context.Process(target=child, args=(queue,))\n"
        "    process.start()\n"
        "    result = queue.get(timeout=120)  # (before join: the queue flushes first)\n"
        "    process.join(timeout=30)\n"
        "    assert process.exitcode == 0 and np.array_equal(result, parent)\n"
        "    print('same')\n"
    )
    if "fork" in multiprocessing.get_all_start_methods():
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.stdout.strip() == "same", done.stderr


@pytest.mark.parametrize("kind", KINDS)
def test_a_stalled_newton_iteration_is_finished_by_sorting(kind):
    # Newton's method starts from a lower bound of the threshold; from above, it makes
    # no progress, and the kernel sorts the candidates: still the exact threshold.
    code = simplex_cpu.ENTMAX15 if kind == "entmax15" else simplex_cpu.SPARSEMAX
    u = -np.random.default_rng(0).random(40)
    u[7] = 0.0
    exact = simplex_cpu._sorted_threshold(u, code)
    assert simplex_cpu._threshold(u, code, -1.0) == pytest.approx(exact, abs=1e-14)
    assert simplex_cpu._threshold(u, code, exact + 0.05) == exact
    p = np.maximum(u - exact, 0) ** (2 if kind == "entmax15" else 1)
    np.testing.assert_allclose(p, oracle(kind, u[None] * (2 if kind == "entmax15" else 1))[0])


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_backward_passes_are_the_packages_gradients(kind):
    rng = np.random.default_rng(5)
    z, g = rng.standard_normal((6, 700)) * 2, rng.standard_normal((6, 700))
    p = getattr(simplex_cpu, kind)(z)
    backward = getattr(simplex_cpu, f"{kind}_backward")
    theirs = torch.from_numpy(z).requires_grad_()
    (expected,) = torch.autograd.grad(ORACLE[kind](theirs, dim=-1), theirs, torch.from_numpy(g))
    np.testing.assert_allclose(backward(p, g), expected.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(backward(p[None], g[None])[0], expected.numpy(), atol=1e-12)


def test_numpy_kernels_keep_the_dtype_and_refuse_bad_input():
    z = np.random.default_rng(6).standard_normal((3, 50))
    assert simplex_cpu.entmax15(z.astype(np.float16)).dtype == np.float16
    np.testing.assert_allclose(
        simplex_cpu.sparsemax(np.arange(5)), simplex_cpu.sparsemax(np.arange(5.0))
    )
    with pytest.raises(
        ValueError, match=r"entmax15 expects an array of shape \(\.\.\., N\), got a scalar"
    ):
        simplex_cpu.entmax15(np.float64(1.0))
    with pytest.raises(
        TypeError, match="sparsemax expects real numbers, got an array of complex128"
    ):
        simplex_cpu.sparsemax(np.ones((2, 3), dtype=complex))
    with pytest.raises(
        ValueError, match=r"the gradient's shape \(2, 4\) is not the output's \(2, 3\)"
    ):
        simplex_cpu.entmax15_backward(np.ones((2, 3)) / 3, np.ones((2, 4)))


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_runs_the_kernels(kind):
    compiled = torch.compile(lambda z: TORCH[kind](z) * 2, backend="eager", fullgraph=False)
    z = torch.randn(5, 3000, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(compiled(z), TORCH[kind](z) * 2)
    # And the gradient through the compiled function (one graph break, around the kernels).
    leaf, weights = z.clone().requires_grad_(), torch.linspace(-1, 1, 3000, dtype=z.dtype)
    (ours,) = torch.autograd.grad((compiled(leaf) * weights).sum(), leaf)
    theirs = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad((ORACLE[kind](theirs, dim=-1) * 2 * weights).sum(), theirs)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
def test_jax_runs_the_same_algorithm_on_whole_rows_with_gradients():
    jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'mumoe[jax]')")
    jnp = jax.numpy
    z = draw(3, 200, 0.0, "none", 9, np.float32)
    weights = np.linspace(-1, 1, 200, dtype=np.float32)
    for kind in KINDS:
        out = getattr(simplex, kind)(jnp.asarray(z))
        np.testing.assert_allclose(np.asarray(out), oracle(kind, z), atol=1e-6)
        grad = jax.grad(lambda x, k=kind: (getattr(simplex, k)(x) * weights).sum())(jnp.asarray(z))
        theirs = torch.from_numpy(z).requires_grad_()
        (expected,) = torch.autograd.grad(
            (ORACLE[kind](theirs, dim=-1) * torch.from_numpy(weights)).sum(), theirs
        )
        np.testing.assert_allclose(np.asarray(grad), expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_a_child_forked_after_torchs_threads_started_imports_the_kernels_and_runs():
    # Issue #26, item 12: the fork guard recorded the pid at the kernels' first import,
    # which was the child's when the child imported them first: it launched OpenMP
    # threads and hung.  The child here, and a fork-started Pool's worker, import them
    # only after the fork.
    import subprocess
    import sys

    code = (
        "import multiprocessing, os, numpy as np, torch\n"
        "torch.set_num_threads(2)\n"
        "a = torch.randn(1500, 1500)\n"
        "for _ in range(3): a @ a  # torch's OpenMP team starts\n"
        "import mumoe  # the parent uses mumoe, not yet the compiled kernels\n"
        "def gate(seed):\n"
        "    from mumoe.gates import entmax_cpu\n"
        "    entmax_cpu.PARALLEL = 64\n"
        "    z = np.random.default_rng(seed).standard_normal((256, 1024))\n"
        "    return float(entmax_cpu.entmax15(z).sum())\n"
        "if __name__ == '__main__':\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os._exit(0 if abs(gate(0) - 256) < 1e-6 else 3)\n"
        "    assert os.waitpid(pid, 0)[1] == 0\n"
        "    with multiprocessing.get_context('fork').Pool(2) as pool:\n"
        "        assert all(abs(s - 256) < 1e-6 for s in pool.map(gate, range(4)))\n"
        "    print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
