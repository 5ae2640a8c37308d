"""entmax-1.5 and sparsemax (mumoe.simplex, mumoe.nn.simplex) against the entmax package.

Each code path is tested on its own: NumPy's (and JAX's, whole-row window),
torch's dense path for small inputs, and torch's selected-support path (forced
here for small inputs with ``SMALL = 0``), including the rows whose support
fills the first window and are done again wider.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import simplex

torch = pytest.importorskip("torch", reason="the oracle is the entmax package, on torch")
entmax = pytest.importorskip("entmax", reason="the oracle is the entmax package")

import mumoe.nn.simplex as torch_simplex  # noqa: E402

KINDS = ("entmax15", "sparsemax")
ORACLE = {"entmax15": entmax.entmax15, "sparsemax": entmax.sparsemax}
NUMPY = {"entmax15": simplex.entmax15, "sparsemax": simplex.sparsemax}
TORCH = {"entmax15": torch_simplex.entmax15, "sparsemax": torch_simplex.sparsemax}


PATHS = ("dense", "support")


@pytest.fixture(params=PATHS)
def torch_path(request, monkeypatch):
    """Run the torch kernels densely (small inputs) or by their selected support."""
    if request.param == "support":
        monkeypatch.setattr(torch_simplex, "SMALL", 0)
    return request.param


cases = st.tuples(
    st.integers(0, 5),  # rows (0: an empty batch)
    st.integers(1, 3000),  # experts
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


@settings(max_examples=40, deadline=None)
@given(cases)
def test_numpy_equals_the_entmax_package(case):
    z = draw(*case)
    for kind in KINDS:
        p = NUMPY[kind](z)
        np.testing.assert_allclose(p, oracle(kind, z), rtol=0, atol=1e-10)
        if z.shape[0]:
            np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-10)
            assert (p >= 0).all()


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=20, deadline=None)
@given(cases)
def test_torch_equals_the_entmax_package_values_and_gradients(path, case):
    with pytest.MonkeyPatch.context() as patch:
        if path == "support":
            patch.setattr(torch_simplex, "SMALL", 0)
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
    np.testing.assert_allclose(NUMPY[kind](z), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(TORCH[kind](torch.from_numpy(z)).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_many_experts_and_supports_beyond_the_first_window(torch_path, kind, monkeypatch):
    # Near-uniform rows have supports of hundreds: the first window of 64 is filled,
    # and those rows (only those) are done again with wider windows.
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
    np.testing.assert_allclose(NUMPY[kind](z), expected, rtol=0, atol=1e-10)
    assert max(widths) > simplex.WINDOW, "the numpy path never widened its window"
    widths.clear()
    ours = torch.from_numpy(z).requires_grad_()
    p = TORCH[kind](ours)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-10)
    if torch_path == "support":
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
    z = np.array([
        [1.0, np.nan, 0.0, 2.0],  # a NaN: the row is NaN
        [1.0, -np.inf, 0.0, 2.0],  # -inf: an exact zero there
        [-np.inf] * 4,  # all -inf: NaN, as softmax
        [np.inf, 0.0, 1.0, 2.0],  # +inf: NaN, as softmax
        [0.5, 0.5, 0.5, 0.5],
    ])  # fmt: skip
    for out in (NUMPY[kind](z), TORCH[kind](torch.from_numpy(z)).numpy()):
        assert np.isnan(out[[0, 2, 3]]).all()
        finite = NUMPY[kind](np.array([[1.0, 0.0, 2.0]]))[0]
        np.testing.assert_allclose(out[1], [finite[0], 0.0, finite[1], finite[2]], atol=1e-12)
        assert out[1, 1] == 0.0
        np.testing.assert_allclose(out[4], 0.25)
    for shape in ((0, 7), (2, 0, 5)):
        assert NUMPY[kind](np.zeros(shape)).shape == shape
        assert TORCH[kind](torch.zeros(shape)).shape == shape
    np.testing.assert_array_equal(NUMPY[kind](np.array([[3.0], [-1e9]])), [[1.0], [1.0]])
    torch.testing.assert_close(TORCH[kind](torch.tensor([[3.0], [-1e9]])), torch.ones(2, 1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_compute_in_float32(torch_path, kind, dtype):
    z = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    out = TORCH[kind](z.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), TORCH[kind](z.to(dtype).float()).to(dtype).float())


def test_bad_input_says_what_was_expected():
    with pytest.raises(TypeError, match=r"expects floating-point logits, got torch\.int64"):
        torch_simplex.entmax15(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"expects logits of shape \(\.\.\., N\), got a scalar"):
        torch_simplex.sparsemax(torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"expects a torch\.Tensor, got ndarray"):
        torch_simplex.entmax15(np.ones((2, 3)))
    with pytest.raises(ValueError, match="kind must be 'entmax15' or 'sparsemax', got 'softmax'"):
        simplex.threshold(np.ones((2, 3)), "softmax")


def test_parallel_selection_gives_the_same_support(monkeypatch):
    z = torch.randn(64, 3000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    single = torch_simplex.entmax15(z)
    monkeypatch.setattr(torch_simplex, "PARALLEL_SELECTION", 0)
    monkeypatch.setattr(torch_simplex, "SMALL", 0)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.testing.assert_close(torch_simplex.entmax15(z), single, rtol=0, atol=1e-12)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_compile_runs_the_kernels(kind):
    compiled = torch.compile(lambda z: TORCH[kind](z) * 2, backend="eager", fullgraph=False)
    z = torch.randn(5, 3000, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(compiled(z), TORCH[kind](z) * 2)


def test_jax_runs_the_same_algorithm_on_whole_rows_with_gradients():
    jax = pytest.importorskip("jax", reason="jax is not installed (pip install 'mumoe[jax]')")
    jnp = jax.numpy
    z = draw(3, 200, 0.0, "none", 9, np.float32)
    weights = np.linspace(-1, 1, 200, dtype=np.float32)
    for kind in KINDS:
        out = NUMPY[kind](jnp.asarray(z))
        np.testing.assert_allclose(np.asarray(out), oracle(kind, z), atol=1e-6)
        grad = jax.grad(lambda x, k=kind: (NUMPY[k](x) * weights).sum())(jnp.asarray(z))
        theirs = torch.from_numpy(z).requires_grad_()
        (expected,) = torch.autograd.grad(
            (ORACLE[kind](theirs, dim=-1) * torch.from_numpy(weights)).sum(), theirs
        )
        np.testing.assert_allclose(np.asarray(grad), expected.numpy(), atol=1e-5)
