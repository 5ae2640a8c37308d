"""Backend-agnostic gating (mumoe.gates) against the entmax package and torch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe.gates import (
    ACTIVATIONS,
    TOP_K_ACTIVATIONS,
    batch_norm,
    entmax15,
    layer_norm,
    relu_topk,
    resolve_activation,
    softmax,
    sparsemax,
    topk,
)

pytest.importorskip("torch", reason="the oracles are torch and the entmax package")
pytest.importorskip("entmax", reason="the oracle is the entmax package")

import entmax
import torch

from mumoe.nn import TORCH_KERNELS

logits = st.tuples(
    st.integers(1, 6),
    st.integers(1, 2500),
    st.floats(0.01, 20.0),
    st.booleans(),
    st.integers(0, 2**31),
)


def draw_logits(rows, n, scale, ties, seed):
    z = np.random.default_rng(seed).standard_normal((rows, n)) * scale
    return np.round(z) if ties else z


@settings(max_examples=40)
@given(logits)
def test_entmax15_and_sparsemax_equal_the_entmax_package(case):
    z = draw_logits(*case)
    reference = {
        "entmax15": entmax.entmax15(torch.from_numpy(z), dim=-1).numpy(),
        "sparsemax": entmax.sparsemax(torch.from_numpy(z), dim=-1).numpy(),
    }
    for name, fn in (("entmax15", entmax15), ("sparsemax", sparsemax)):
        p = fn(z)
        np.testing.assert_allclose(p, reference[name], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
        assert (p >= 0).all()


@given(logits)
def test_softmax_equals_torch(case):
    z = draw_logits(*case)
    np.testing.assert_allclose(
        softmax(z), torch.softmax(torch.from_numpy(z), -1).numpy(), rtol=1e-12, atol=1e-300
    )


def test_activations_run_on_torch_tensors_too():
    import tensorly as tl

    z = np.random.default_rng(0).standard_normal((3, 50))
    kernels = {
        name: resolve_activation(name, top_k=3 if name in TOP_K_ACTIVATIONS else None)
        for name in ACTIVATIONS
    }
    expected = {name: fn(z) for name, fn in kernels.items()}
    tl.set_backend("pytorch")
    try:
        for name, fn in kernels.items():
            out = fn(torch.from_numpy(z))
            assert isinstance(out, torch.Tensor)
            np.testing.assert_allclose(out.numpy(), expected[name], rtol=1e-12)
    finally:
        tl.set_backend("numpy")


def test_entmax15_of_a_large_gap_is_one_hot():
    p = entmax15(np.array([[10.0, 0.0, 0.0, -3.0]]))
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.0, 0.0]])


def test_norms_equal_torch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7))
    mean, var = rng.standard_normal(7), rng.random(7) + 0.5
    bn = torch.nn.BatchNorm1d(7, affine=False).double().eval()
    bn.running_mean.copy_(torch.from_numpy(mean))
    bn.running_var.copy_(torch.from_numpy(var))
    np.testing.assert_allclose(batch_norm(x, mean, var), bn(torch.from_numpy(x)).detach().numpy())
    ln = torch.nn.LayerNorm(7).double()
    w, b = rng.standard_normal(7), rng.standard_normal(7)
    ln.weight.data.copy_(torch.from_numpy(w))
    ln.bias.data.copy_(torch.from_numpy(b))
    np.testing.assert_allclose(
        layer_norm(x, w, b), ln(torch.from_numpy(x)).detach().numpy(), rtol=1e-12
    )


def test_gating_widens_16_bit_inputs_and_returns_their_dtype():
    from mumoe.gates import gate_coefficients, gate_dtype

    assert gate_dtype(np.dtype("float16")) == np.float32
    assert (
        gate_dtype(torch.bfloat16) == torch.float32 and gate_dtype(torch.float64) == torch.float64
    )
    x = np.full((2, 3), 300.0, dtype=np.float16)  # logits of 30,000: squares overflow float16
    (a,) = gate_coefficients(x, [np.eye(3, 4) * 100], [None], entmax15)
    assert a.dtype == np.float16 and np.isfinite(a).all()
    np.testing.assert_allclose(a.astype(np.float64).sum(-1), 1.0, rtol=1e-3)


def test_the_vocabulary_refuses_unknown_names():
    from mumoe.gates import check_normalization, resolve_activation

    with pytest.raises(ValueError, match="unknown gate activation 'relu'; choose one of"):
        resolve_activation("relu")
    with pytest.raises(ValueError, match="unknown gate normalization 'gn'"):
        check_normalization("gn")
    assert resolve_activation(np.tanh) is np.tanh


def _kept(z: np.ndarray, k: int) -> np.ndarray:
    # The rule, by a full sort: the logits at or above each row's k-th largest.
    kth = -np.sort(-z, axis=-1)[:, min(k, z.shape[1]) - 1 : min(k, z.shape[1])]
    return z >= kth


@settings(max_examples=60)
@given(logits, st.integers(1, 40))
def test_topk_is_softmax_over_the_k_largest_and_their_ties(case, k):
    z = draw_logits(*case)
    p = topk(z, k)
    kept = _kept(z, k)
    masked = np.where(kept, z, -np.inf)
    np.testing.assert_allclose(p, softmax(masked), rtol=1e-12, atol=1e-300)
    assert ((p > 0) <= kept).all() and (p[~kept] == 0).all()
    if not case[3]:  # no ties drawn: exactly min(k, N) experts per row
        assert (kept.sum(-1) == min(k, z.shape[1])).all()
    torch_p = TORCH_KERNELS["topk"](torch.from_numpy(z), k)
    np.testing.assert_allclose(torch_p.numpy(), p, rtol=1e-12, atol=1e-300)


def test_topk_gradients_and_the_rules_edges():
    z = torch.tensor(
        [[3.0, 1.2, 1.0, 0.0], [0.5, 2.0, -1.0, 4.0]], dtype=torch.float64, requires_grad=True
    )
    kernel = TORCH_KERNELS["topk"]
    assert torch.autograd.gradcheck(lambda t: kernel(t, 2), (z,))
    tied = torch.tensor([[3.0, 1.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    weights = torch.tensor([[1.0, 2.0, -1.0, 5.0]], dtype=torch.float64)
    (grad,) = torch.autograd.grad((kernel(tied, 2) * weights).sum(), tied)
    masked = tied.masked_fill(torch.tensor([[False, False, False, True]]), -torch.inf)
    (expected,) = torch.autograd.grad((torch.softmax(masked, -1) * weights).sum(), tied)
    torch.testing.assert_close(grad, expected)  # the tie path: softmax over the kept
    np.testing.assert_allclose(topk(np.zeros((2, 5)), 2), np.full((2, 5), 0.2))  # ties: all kept
    np.testing.assert_allclose(topk(z.detach().numpy(), 9), softmax(z.detach().numpy()))  # k >= N
    neg = np.array([[0.0, -np.inf, -np.inf, 1.0]])  # fewer finite logits than k
    np.testing.assert_allclose(topk(neg, 3), softmax(neg))
    np.testing.assert_allclose(kernel(torch.from_numpy(neg), 3).numpy(), softmax(neg))
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        topk(np.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match="activation='topk' needs top_k"):
        resolve_activation("topk")
    with pytest.raises(
        ValueError,
        match="top_k=2 is for activation='topk' or 'relu_topk'; the activation is 'softmax'",
    ):
        resolve_activation("softmax", top_k=2)
    with pytest.raises(TypeError, match=r"top_k must be an int, got 2\.5"):
        resolve_activation("topk", top_k=2.5)


def test_topk_selects_without_sorting_the_row(monkeypatch):
    # The generic kernel asks the backend for one k-th largest value; it never sorts.
    import tensorly as tl

    def refuse(*args, **kwargs):
        raise AssertionError("top-k gating sorted a row")

    monkeypatch.setattr(tl, "sort", refuse)
    monkeypatch.setattr(np, "sort", refuse)
    monkeypatch.setattr(torch, "sort", refuse)
    z = np.random.default_rng(0).standard_normal((4, 300))
    assert (np.count_nonzero(topk(z, 5), axis=-1) == 5).all()
    assert (torch.count_nonzero(TORCH_KERNELS["topk"](torch.from_numpy(z), 5), -1) == 5).all()


def test_topk_of_a_row_with_nan_or_inf_is_nan_on_every_path():
    # Issue #26, item 12: NumPy gave NaN everywhere, torch NaN in two entries and zeros.
    rows = np.array(
        [[1.0, np.nan, 3.0, 0.5, 0.2], [1.0, np.inf, 3.0, 0.5, 0.1], [1.0, -np.inf, 3.0, 0.5, 0.1]]
    )
    with np.errstate(invalid="ignore"):
        expected = topk(rows, 2)
    assert np.isnan(expected[:2]).all() and np.isfinite(expected[2]).all()
    got = TORCH_KERNELS["topk"](torch.from_numpy(rows), 2).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got[2], expected[2])


@settings(max_examples=60)
@given(logits, st.integers(1, 40))
def test_relu_topk_keeps_the_k_largest_rectified_logits_as_they_are(case, k):
    # Issue #27, item 1: MxD's gate, TopK(ReLU(z)), unnormalised.
    z = draw_logits(*case)
    a = relu_topk(z, k)
    rectified = np.maximum(z, 0)
    kept = _kept(rectified, k)
    np.testing.assert_array_equal(a, np.where(kept, rectified, 0.0))
    assert (a >= 0).all() and ((a > 0) <= (z > 0)).all()
    if not case[3]:  # no ties drawn: at most min(k, N) experts per row
        assert (np.count_nonzero(a, axis=-1) <= min(k, z.shape[1])).all()
    torch_a = TORCH_KERNELS["relu_topk"](torch.from_numpy(z), k)
    np.testing.assert_array_equal(torch_a.numpy(), a)


def test_relu_topk_gradient_edges_and_errors():
    z = torch.tensor(
        [[3.0, 1.2, 1.0, -0.5], [0.5, 2.0, -1.0, 4.0]], dtype=torch.float64, requires_grad=True
    )
    kernel = TORCH_KERNELS["relu_topk"]
    assert torch.autograd.gradcheck(lambda t: kernel(t, 2), (z,))
    (grad,) = torch.autograd.grad(kernel(z, 2).sum(), z)
    torch.testing.assert_close(
        grad, torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    )
    np.testing.assert_array_equal(relu_topk(np.full((2, 5), 0.2), 2), np.full((2, 5), 0.2))  # ties
    np.testing.assert_array_equal(relu_topk(np.full((1, 3), -1.0), 1), np.zeros((1, 3)))
    np.testing.assert_array_equal(relu_topk(z.detach().numpy(), 9), z.detach().clamp(min=0).numpy())
    rows = np.array([[1.0, np.nan, 3.0], [1.0, np.inf, 3.0], [1.0, -np.inf, 3.0]])
    with np.errstate(invalid="ignore"):
        expected = relu_topk(rows, 2)
    assert np.isnan(expected[:2]).all()
    np.testing.assert_array_equal(expected[2], [1.0, 0.0, 3.0])
    np.testing.assert_array_equal(kernel(torch.from_numpy(rows), 2).numpy(), expected)
    with pytest.raises(ValueError, match="activation='relu_topk' needs top_k"):
        resolve_activation("relu_topk")
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        relu_topk(np.zeros((1, 3)), 0)
    assert set(TOP_K_ACTIVATIONS) <= set(ACTIVATIONS)


def test_hidden_activations_equal_torch_modules():
    # Issue #27, item 1: the blocks' hidden activations on any backend, as torch computes them.
    from mumoe.gates import HIDDEN_ACTIVATIONS
    from mumoe.nn import TORCH_HIDDEN_ACTIVATIONS

    x = np.concatenate([np.linspace(-30, 30, 601), [-1e4, 1e4, 0.0]])
    for name, kernel in HIDDEN_ACTIVATIONS.items():
        expected = TORCH_HIDDEN_ACTIVATIONS[name]()(torch.from_numpy(x)).numpy()
        # (atol: the tanh form cancels in its tail, -1e-10 to a few 1e-16, in torch too)
        np.testing.assert_allclose(kernel(x), expected, rtol=1e-12, atol=1e-14, err_msg=name)
