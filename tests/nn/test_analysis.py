"""Editing experts of torch models, and the statistics collected from them."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe.nn import (
    CPMuMoE,
    MuMoE,
    MuMoEBlock,
    TRMuMoE,
    collect_gates,
    counterfactual_histogram,
    edit_experts,
    edit_experts_,
)
from mumoe.testing import assert_close, dense_forward, n_terms, networks, seeds
from tests.helpers import randomise


def trained_like(layer, seed):
    """Random cores and gate projections, so that gates and experts differ."""
    return randomise(layer, seed, normal=True).eval()


@settings(max_examples=30)
@given(networks(max_levels=2), seeds(), st.data())
def test_an_edit_computes_with_that_mode_of_w_scaled(net, seed, data):
    layer = MuMoE(net.in_features, net.out_features, net, bias=net.bias, dtype=torch.float64)
    layer = trained_like(layer, seed)
    level = data.draw(st.integers(0, net.n_levels - 1))
    scales = np.random.RandomState(seed).uniform(-1, 2, net.expert_dims[level])
    x = torch.randn(
        5, net.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    before, gates = layer(x, return_gates=True)
    with edit_experts(layer, scales, level=level):
        edited, edited_gates = layer(x, return_gates=True)
    shape = [1] * (net.n_levels + 2)
    shape[level] = -1
    weight = layer.materialize().detach().numpy() * scales.reshape(shape)
    assert_close(edited, dense_forward(weight, x, gates, net.bias), scale=n_terms(net))
    for a, b in zip(gates, edited_gates, strict=True):  # the routing is reported unedited
        assert torch.equal(a, b)
    assert torch.equal(layer(x), before)  # restored exactly
    assert layer._expert_scales == {}

    edit_experts_(layer, scales, level=level)  # for good: the same numbers from the cores
    assert_close(layer(x), edited.detach().numpy(), scale=n_terms(net))


def test_edits_nest_and_restore_what_they_found():
    layer = trained_like(CPMuMoE(6, 3, expert_dims=5, rank=3, dtype=torch.float64), 0)
    x = torch.randn(7, 6, dtype=torch.float64)
    base = layer(x)
    with edit_experts(layer, {1: 0.5}):
        once = layer(x)
        with edit_experts(layer, {1: 0.5, 2: 0.0}):
            twice = layer(x)
        assert torch.equal(layer(x), once)
    with edit_experts(layer, {1: 0.25, 2: 0.0}):
        assert torch.allclose(layer(x), twice)
    assert torch.equal(layer(x), base)


def test_an_edit_is_undone_when_the_block_raises():
    layer = CPMuMoE(6, 3, expert_dims=5, rank=3)
    with pytest.raises(RuntimeError, match="boom"), edit_experts(layer, {0: 0.0}):
        raise RuntimeError("boom")
    assert layer._expert_scales == {}


def test_editing_a_block_edits_both_layers():
    block = trained_like(MuMoEBlock(6, 8, 4, expert_dims=(5, 2), rank=3, dtype=torch.float64), 1)
    x = torch.randn(3, 2, 6, dtype=torch.float64)
    with edit_experts(block, [1.0, 0.0, 2.0, 1.0, 1.0]):
        edited = block(x)
    manual = copy.deepcopy(block)
    for layer in (manual.fc1, manual.fc2):  # only scaling both layers' cores reproduces it
        edit_experts_(layer, [1.0, 0.0, 2.0, 1.0, 1.0])
    assert torch.allclose(manual(x), edited)
    edit_experts_(block, [1.0, 0.0, 2.0, 1.0, 1.0])
    assert torch.allclose(block(x), edited)


def test_gradients_flow_through_an_edit_and_the_cores_are_untouched():
    layer = CPMuMoE(6, 3, expert_dims=4, rank=2).train()
    stored = [c.detach().clone() for c in layer.cores]
    with edit_experts(layer, {0: 0.0}):
        layer(torch.randn(8, 6)).sum().backward()
    assert all(c.grad is not None for c in layer.cores)
    # Expert 0 is off: its row of the expert factor gets no gradient.
    assert torch.all(layer.cores[0].grad[0] == 0) and torch.any(layer.cores[0].grad[1:] != 0)
    assert all(torch.equal(a, b) for a, b in zip(stored, layer.cores, strict=True))


def test_edits_refuse_what_they_cannot_do():
    layer = CPMuMoE(6, 3, expert_dims=(4, 2), rank=2)
    with pytest.raises(TypeError, match=r"Linear holds no mumoe\.nn\.MuMoE layer to edit"):
        with edit_experts(torch.nn.Linear(2, 2), {0: 0.0}):
            pass
    with pytest.raises(ValueError, match="expert 4 is out of range for level 0 of size 4"):
        edit_experts_(layer, {4: 0.0})
    with pytest.raises(
        ValueError, match=r"level must be in \[0, 2\) for a layer with expert_dims \(4, 2\), got 2"
    ):
        edit_experts_(layer, {0: 0.0}, level=2)
    with pytest.raises(
        ValueError,
        match=r"level 1 must have shape \(2,\) or be a \{expert: factor\} mapping, got shape \(4",
    ):
        edit_experts_(layer, np.ones(4), level=1)
    with pytest.raises(ValueError, match="scales must be finite"):
        edit_experts_(layer, {0: float("inf")})
    with pytest.raises(TypeError, match="expert indices must be ints"):
        edit_experts_(layer, {"0": 0.0})
    mixed = torch.nn.Sequential(
        CPMuMoE(6, 6, expert_dims=4, rank=2), CPMuMoE(6, 3, expert_dims=8, rank=2)
    )
    with pytest.raises(ValueError, match=r"have \[4, 8\] experts at level 0; edit one layer"):
        edit_experts_(mixed, {0: 0.0})
    edit_experts_(mixed[1], {0: 0.0})  # one layer at a time works


# ---------------------------------------------------------------- statistics


def test_collect_gates_gives_the_eval_coefficients_and_restores_the_mode():
    # float64: batches of 16 and of 50 round differently in float32, and entmax is not
    # smooth where an expert enters the support (the unseeded float32 version was flaky).
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), TRMuMoE(6, 3, expert_dims=(4, 3), rank=(2, 2, 2, 2))
    )
    trained_like(model.double(), 2).train()
    x = torch.randn(50, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gates = collect_gates(model, x, batch_size=16)
    assert model.training
    model.eval()
    with torch.no_grad():
        _, expected = model[1](model[0](x), return_gates=True)
    assert [g.shape for g in gates] == [(50, 4), (50, 3)]
    for got, want in zip(gates, expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-14)


def test_collect_gates_asks_which_gate_when_there_are_several():
    model = torch.nn.Sequential(
        CPMuMoE(4, 4, expert_dims=3, rank=2), CPMuMoE(4, 2, expert_dims=5, rank=2)
    )
    with pytest.raises(
        ValueError, match=r"several gates \['0.gate', '1.gate'\]: choose one with gate="
    ):
        collect_gates(model, torch.randn(3, 4))
    with pytest.raises(
        ValueError,
        match=r"'gate' is neither a gate of the model nor a layer or block holding one; its "
        r"gates are \['0.gate', '1.gate'\]",
    ):
        collect_gates(model, torch.randn(3, 4), gate="gate")
    assert collect_gates(model, torch.randn(3, 4), gate="1.gate")[0].shape == (3, 5)
    with pytest.raises(TypeError, match="holds no MuMoEGate"):
        collect_gates(torch.nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        collect_gates(model, torch.randn(3, 4), gate="1.gate", batch_size=0)


@settings(max_examples=10)
@given(seeds())
def test_counterfactual_histogram_counts_the_changed_predictions(seed):
    layer = trained_like(CPMuMoE(6, 4, expert_dims=5, rank=3, dtype=torch.float64), seed)
    with torch.no_grad():
        layer.cores[0][3] = 0  # expert 3 contributes nothing: switching it off changes nothing
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    labels = np.random.RandomState(seed).randint(4, size=40)
    histogram = counterfactual_histogram(layer, x, labels, n_classes=4, batch_size=15)
    with torch.no_grad():
        before = layer(x).argmax(-1).numpy()
        for expert in range(5):
            scales = np.ones(5)
            scales[expert] = 0
            with edit_experts(layer, scales):
                changed = layer(x).argmax(-1).numpy() != before
            np.testing.assert_array_equal(
                histogram[expert], np.bincount(labels[changed], minlength=4)
            )
    assert histogram.shape == (5, 4) and not histogram[3].any()


def test_scaled_experts_is_the_layers_public_edit():
    layer = CPMuMoE(6, 3, expert_dims=(5, 2), rank=3).eval()
    x = torch.randn(4, 6)
    base = layer(x)
    with layer.scaled_experts(1, [2.0, 2.0]):  # W is linear in each expert mode
        with layer.scaled_experts(1, [0.5, 0.5]):  # edits nest: scales multiply
            torch.testing.assert_close(layer(x), base)
        doubled = layer(x)
    torch.testing.assert_close(doubled, 2 * base)
    assert layer._expert_scales == {}
    torch.testing.assert_close(doubled, layer(x, scales={1: torch.tensor([2.0, 2.0])}))
    with pytest.raises(TypeError, match=r"level must be an int in \[0, 2\), got 1.0"):
        layer.scaled_experts(1.0, [1.0, 1.0]).__enter__()
    with pytest.raises(ValueError, match=r"level must be an int in \[0, 2\), got 2"):
        layer.scaled_experts(2, [1.0, 1.0]).__enter__()
    with pytest.raises(ValueError, match=r"scales for level 0 must have shape \(5,\), got \(2,\)"):
        layer.scaled_experts(0, [1.0, 1.0]).__enter__()
