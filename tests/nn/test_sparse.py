"""Sparse gates in torch: gradients equal the dense path's, layers, blocks, a million experts.

The torch half of ``tests/functional/test_sparse.py``: the sparse path's gradients to the
cores, the input and the logits through every activation, the layers' and the MxD block's
outputs and gradients on both paths, the served copy of a block, and 2^20 experts trained
with nothing of size N1 * N2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import forward, planner_of
from mumoe.gates import relu_topk_support, sparsify, topk_support
from mumoe.nn import TORCH_KERNELS, MuMoE, MuMoEBlock
from mumoe.nn import entmax15 as torch_entmax15
from mumoe.nn import sparsemax as torch_sparsemax
from mumoe.plan import Planner
from mumoe.testing import assert_close, n_terms, networks, seeds
from tests.helpers import use_backend

ALWAYS = 1.0  # a planner crossover that contracts every support sparsely


@settings(max_examples=30)
@given(networks(max_levels=3), seeds(), st.sampled_from(["float64", "float32"]), st.data())
def test_sparse_gradients_equal_the_dense_path_through_every_activation(net, seed, dtype, data):
    # Values, and gradients to the cores, the input and the logits: the sparse path carries
    # each row's support only, and every activation's Jacobian is zero off it.
    kind = data.draw(st.sampled_from(["topk", "relu_topk", "entmax15", "sparsemax"]))
    ties = data.draw(st.booleans(), label="ties")
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(seed)
    cores = [
        (torch.rand(s, generator=generator, dtype=torch_dtype) * 2 - 1).requires_grad_()
        for s in net.core_shapes
    ]
    x = torch.rand(4, net.in_features, generator=generator, dtype=torch_dtype) * 2 - 1
    x.requires_grad_()
    logits = []
    for n in net.expert_dims:
        z = torch.randn(4, n, generator=generator, dtype=torch_dtype) * 3
        logits.append((z.round() if ties else z).requires_grad_())
    ks = [data.draw(st.integers(1, n)) for n in net.expert_dims]

    def dense_of(z, k):  # the layers' torch kernels
        if kind in ("topk", "relu_topk"):
            return TORCH_KERNELS[kind](z, k)
        return (torch_entmax15 if kind == "entmax15" else torch_sparsemax)(z)

    def sparse_of(z, k):
        if kind == "topk":
            return topk_support(z, k)
        if kind == "relu_topk":
            return relu_topk_support(z, k)
        return sparsify(dense_of(z, k))

    with use_backend("pytorch"):
        y_dense = forward(net, cores, x, [dense_of(z, k) for z, k in zip(logits, ks, strict=True)])
        y_sparse = forward(
            net,
            cores,
            x,
            [sparse_of(z, k) for z, k in zip(logits, ks, strict=True)],
            planner=Planner(net, crossover=ALWAYS),
        )
    weights = torch.randn(y_dense.shape, generator=generator, dtype=torch_dtype)
    wrt = [*cores, x, *logits]
    expected = torch.autograd.grad((y_dense * weights).sum(), wrt, allow_unused=True)
    got = torch.autograd.grad((y_sparse * weights).sum(), wrt, allow_unused=True)
    scale = n_terms(net) * 10
    assert_close(y_sparse.detach(), y_dense.detach(), dtype, scale=scale)
    for a, b in zip(got, expected, strict=True):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            assert_close(a, b, dtype, scale=scale)


def trained_gate(layer):
    # Random gate projections: a zero-initialised gate ties every logit (a whole-row support).
    generator = torch.Generator().manual_seed(0)
    for projection in layer.gate.projections:
        with torch.no_grad():
            projection.copy_(torch.randn(projection.shape, generator=generator))
    return layer


@pytest.mark.parametrize(
    ("activation", "top_k"), [("topk", 3), ("relu_topk", 4), ("entmax15", None)]
)
def test_layers_give_the_dense_path_s_outputs_and_gradients(activation, top_k):
    torch.manual_seed(0)
    layer = trained_gate(
        MuMoE(
            12,
            5,
            "tr",
            expert_dims=(64, 8),
            rank=2,
            activation=activation,
            top_k=top_k,
            normalization=None,
            dtype=torch.float64,
        )
    )
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    results = []
    for crossover in (ALWAYS, 0.0):
        layer.planner = Planner(layer.network, crossover=crossover)
        y = layer(x)
        grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
        results.append((y, grads))
    (y1, g1), (y0, g0) = results
    torch.testing.assert_close(y1, y0)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b)
    assert any(key[0] == "sparse" for key in layer.planner.cache.keys()) is False  # dense one
    layer.planner = Planner(layer.network, crossover=ALWAYS)
    layer(x)
    assert any(key[0] == "sparse" for key in layer.planner.cache.keys())


def test_mxd_block_and_its_served_copy_contract_sparsely_and_agree(tmp_path):
    from mumoe.inference import load
    from mumoe.nn import save

    torch.manual_seed(0)
    block = MuMoEBlock(
        16,
        64,
        64,
        "mxd",
        expert_dims=2048,
        encoder="linear",
        activation="relu_topk",
        top_k=8,
        normalization=None,
        gate_bias=True,
        output_bias="shared",
        dtype=torch.float64,
    ).eval()
    x = torch.randn(8, 16, 16, dtype=torch.float64)  # 128 rows x 2,048 x 64: 16.8M
    with torch.no_grad():
        y = block(x)  # 8 of 2,048: within every crossover, over every floor
        assert any(key[0] == "sparse" for key in block.fc2.planner.cache.keys())
        block.fc2.planner = Planner(block.fc2.network, crossover=0.0)
        torch.testing.assert_close(y, block(x))
    save(block, tmp_path / "block.safetensors")
    with use_backend("numpy"):
        served = load(tmp_path / "block.safetensors")
        np.testing.assert_allclose(served(x.numpy()), y.numpy(), rtol=1e-10, atol=1e-12)
        assert any(key[0] == "sparse" for key in served.fc2.planner.cache.keys())


def test_a_million_experts_train_on_the_cpu_without_a_tensor_of_n():
    # 2^20 experts as two levels of 1,024 (CP, top-4 a level): no tensor that grows with
    # N1 * N2 is formed or saved for the backward pass, and the contraction is sparse.
    torch.manual_seed(0)
    levels, batch = 1024, 32
    layer = trained_gate(
        MuMoE(
            8,
            8,
            "cp",
            expert_dims=(levels, levels),
            rank=4,
            activation="topk",
            top_k=4,
            normalization="ln",
        )
    )
    assert layer.network.n_experts == 2**20
    layer.planner = planner_of(layer.network, crossover=0.05)  # sparse at this small size too
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, target = torch.randn(batch, 8), torch.randn(batch, 8)
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    losses = []
    for _ in range(3):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = (layer(x) - target).square().mean()
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    biggest_parameter = max(p.numel() for p in layer.parameters())
    assert max(largest) <= max(batch * levels, biggest_parameter)  # never B * N1 * N2
    assert any(key[0] == "sparse" for key in layer.planner.cache.keys())


def test_an_empty_batch_keeps_the_cores_in_the_graph():
    from mumoe import SparseGate, cp

    net = cp(4, 3, expert_dims=64, rank=2)
    cores = [torch.randn(s, requires_grad=True) for s in net.core_shapes]
    gate = SparseGate(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 64)
    with use_backend("pytorch"):
        y = forward(net, cores, torch.zeros(0, 4), [gate], planner=Planner(net, crossover=ALWAYS))
    assert y.shape == (0, 3)
    grads = torch.autograd.grad(y.sum(), cores)
    assert all(not g.any() for g in grads)


def test_a_single_support_runs_under_autocast_and_a_layer_checks_given_supports():
    from mumoe import SparseGate
    from mumoe.nn import torch_forward

    layer = MuMoE(8, 4, "cp", expert_dims=64, rank=2, gated=False)
    gate = SparseGate(torch.tensor([[3, 9]]), torch.tensor([[0.5, 0.5]]), 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch_forward(layer.network, list(layer.cores), torch.randn(1, 8), gate)
    assert y.dtype == torch.bfloat16
    bad = SparseGate(torch.tensor([[3, 64]]), torch.tensor([[0.5, 0.5]]), 64)
    with pytest.raises(ValueError, match=r"in \[0, 64\), got values from 3 to 64"):
        layer(torch.randn(1, 8), gates=bad)
