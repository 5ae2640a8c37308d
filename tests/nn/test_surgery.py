"""Expert surgery (issue #29, item 5): export experts, remove them, merge close ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from mumoe.functional import block_forward
from mumoe.nn import (
    FactorizedMuMoE,
    MergedGroup,
    MuMoE,
    MuMoEBlock,
    expert_linear,
    merge_experts_,
    mixture_linear,
    remove_experts_,
    to_factorized_tensor,
)
from mumoe.plan import planner_of
from mumoe.testing import assert_close, dense_forward
from tests.helpers import has_modules, randomise

#: Every preset, with a rank where it takes one.
PRESETS = {
    "cp": 3,
    "tucker": 2,
    "tt": 2,
    "tr": 2,
    "mxd": None,
    "lowrank": 2,
    "dense": None,
}
DIMS = [(4,), (3, 4)]
CASES = [pytest.param(f, d, id=f"{f}-{len(d)}") for f in PRESETS for d in DIMS]


def make(fmt, dims, *, seed=0, dtype=torch.float64, **options):
    """A layer with random cores and gate (and running statistics), in eval mode."""
    layer = MuMoE(6, 5, fmt, expert_dims=dims, rank=PRESETS[fmt], dtype=dtype, **options)
    randomise(layer, seed, normal=True)
    generator = torch.Generator().manual_seed(seed + 1)
    for norm in layer.gate.norms if layer.gate is not None else ():
        if isinstance(norm, nn.BatchNorm1d):
            norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
            norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
    return layer.eval()


def inputs(rows=7, features=6, seed=3, dtype=torch.float64):
    return torch.randn(rows, features, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def one_hot(dims, index, rows):
    """Coefficient 1 for expert ``index`` on every level, 0 elsewhere, for ``rows`` rows."""
    return [
        torch.zeros(rows, n, dtype=torch.float64).index_fill_(1, torch.tensor([k]), 1.0)
        for n, k in zip(dims, index, strict=True)
    ]


def snapshot(module):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    networks = [layer.network for layer in module.modules() if isinstance(layer, MuMoE)]
    return state, networks


def assert_untouched(module, before):
    state, networks = before
    now = module.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key].shape == value.shape and torch.equal(now[key], value), key
    assert [m.network for m in module.modules() if isinstance(m, MuMoE)] == networks


# ------------------------------------------------------------------ export


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("fmt", "dims"), CASES)
def test_an_exported_expert_is_the_layer_with_that_expert_alone(fmt, dims, bias):
    layer = make(fmt, dims, bias=bias)
    x = inputs()
    weight = layer.materialize().detach()
    for index in itertools.product(*map(range, dims)):
        linear = expert_linear(layer, index if len(dims) > 1 else index[0])
        assert type(linear) is nn.Linear and (linear.bias is not None) == bias
        assert linear.weight.dtype == torch.float64
        gates = one_hot(dims, index, len(x))
        torch.testing.assert_close(linear(x), layer(x, gates), rtol=1e-12, atol=1e-12)
        assert_close(linear(x).detach(), dense_forward(weight, x, gates, bias))


@pytest.mark.parametrize(("fmt", "dims"), CASES)
def test_a_fixed_mixture_is_the_layer_with_those_gates(fmt, dims):
    layer = make(fmt, dims)
    x = inputs()
    generator = torch.Generator().manual_seed(5)
    vectors = [torch.randn(n, dtype=torch.float64, generator=generator) for n in dims]  # any sums
    gates = [v.expand(len(x), -1) for v in vectors]
    linear = mixture_linear(layer, vectors if len(dims) > 1 else vectors[0])
    torch.testing.assert_close(linear(x), layer(x, gates), rtol=1e-12, atol=1e-12)
    assert_close(linear(x).detach(), dense_forward(layer.materialize().detach(), x, gates, True))


def test_a_one_hot_mixture_is_the_expert_and_float32_stays_float32():
    layer = make("tr", (4, 3), dtype=torch.float32)
    mixed = mixture_linear(layer, [[0, 0, 1, 0], np.array([0.0, 1.0, 0.0])])
    single = expert_linear(layer, (2, -2))
    assert mixed.weight.dtype == single.weight.dtype == torch.float32
    torch.testing.assert_close(mixed.weight, single.weight)
    torch.testing.assert_close(mixed.bias, single.bias)


def test_an_export_applies_the_edit_in_force_and_the_input_norm():
    layer = make("cp", (4,), input_norm=True)
    randomise(layer.input_norm, 9)
    x = inputs()
    scales = torch.tensor([2.0, 0.5, 0.0, -1.0], dtype=torch.float64)
    with layer.scaled_experts(0, scales):
        exported = expert_linear(layer, 1)
        assert isinstance(exported, nn.Sequential) and isinstance(exported[0], nn.LayerNorm)
        torch.testing.assert_close(exported(x), layer(x, one_hot((4,), (1,), len(x))))
        mixed = mixture_linear(layer, [1.0, 1.0, 1.0, 1.0])
        torch.testing.assert_close(mixed(x), layer(x, torch.ones(len(x), 4, dtype=x.dtype)))
    assert exported[0] is not layer.input_norm  # a copy


BLOCKS = {
    "paper": {"network": "cp", "rank": 3, "expert_dims": (4, 3)},
    "mxd": {
        "network": "mxd",
        "expert_dims": 5,
        "encoder": "linear",
        "activation": "relu_topk",
        "top_k": 2,
        "normalization": None,
        "gate_bias": True,
        "output_bias": "shared",
        "input_norm": True,
    },
    "tt-no-bias": {"network": "tt", "rank": 2, "expert_dims": 4, "bias": False},
}


def make_block(form, seed=0):
    block = MuMoEBlock(6, 9, 5, dtype=torch.float64, **BLOCKS[form])
    return randomise(block, seed, normal=True).eval()


def block_with_gates(block, x, gates):
    """The block's output with the gate replaced by fixed coefficients."""
    return block_forward(
        block._encoder_call(block.fc1),
        block.fc2,
        x,
        gate=lambda _: gates,
        activation=block.act,
        input_norm=block.input_norm,
        output_bias=block.bias,
    )[0]


@pytest.mark.parametrize("form", BLOCKS)
def test_a_block_exports_its_experts_as_mlps(form):
    block = make_block(form)
    dims = block.gate.expert_dims
    x = inputs()
    for index in itertools.product(*map(range, dims)):
        mlp = expert_linear(block, index)
        assert isinstance(mlp, nn.Sequential)
        expected = block_with_gates(block, x, one_hot(dims, index, len(x)))
        torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)
    vectors = [torch.linspace(-1, 2, n, dtype=torch.float64) for n in dims]
    expected = block_with_gates(block, x, [v.expand(len(x), -1) for v in vectors])
    torch.testing.assert_close(mixture_linear(block, vectors)(x), expected, rtol=1e-12, atol=1e-12)


def test_a_glu_block_is_refused():
    block = MuMoEBlock(6, 8, expert_dims=3, rank=2, glu=True, hidden_activation="silu")
    with pytest.raises(ValueError, match=r"GLU block.*expert_linear\(block.fc1"):
        expert_linear(block, 0)


def test_bad_exports_say_what_came():
    layer = make("cp", (4, 3))
    with pytest.raises(ValueError, match=r"one expert per level \(2: expert_dims \(4, 3\)\)"):
        expert_linear(layer, 1)
    with pytest.raises(ValueError, match="expert 3 is out of range for level 1 of size 3"):
        expert_linear(layer, (0, 3))
    with pytest.raises(TypeError, match="level 0 must be an int, got True"):
        expert_linear(layer, (True, 0))
    with pytest.raises(ValueError, match=r"level 1 must have shape \(3,\), got \(4,\)"):
        mixture_linear(layer, [torch.ones(4), torch.ones(4)])
    with pytest.raises(ValueError, match="one vector per level"):
        mixture_linear(layer, [torch.ones(4)])
    with pytest.raises(ValueError, match="must be finite"):
        mixture_linear(layer, [torch.ones(4), torch.tensor([1.0, float("nan"), 0.0])])
    with pytest.raises(TypeError, match="sequence of 2 vectors"):
        mixture_linear(layer, torch.ones(2, 4))
    with pytest.raises(TypeError, match=r"takes a mumoe\.nn\.MuMoE or MuMoEBlock, got Linear"):
        expert_linear(nn.Linear(3, 2), 0)


# ------------------------------------------------------------------ removal


@pytest.mark.parametrize(("fmt", "dims"), CASES)
def test_removal_keeps_every_kept_expert_and_its_gate_logits(fmt, dims):
    layer = make(fmt, dims)
    level = len(dims) - 1
    x = inputs()
    weight = layer.materialize().detach()
    logits = layer.gate.norms[level](x @ layer.gate.projections[level]).detach()
    kept = remove_experts_(layer, [0, -2], level=level)
    n = dims[level]
    assert kept == tuple(k for k in range(n) if k not in (0, n - 2))
    new_dims = tuple(len(kept) if e == level else d for e, d in enumerate(dims))
    assert layer.network.expert_dims == layer.gate.expert_dims == new_dims
    assert [tuple(c.shape) for c in layer.cores] == list(layer.network.core_shapes)
    assert layer.planner.network == layer.network
    expected = weight.index_select(level, torch.tensor(kept))
    torch.testing.assert_close(layer.materialize(), expected, rtol=1e-12, atol=1e-13)
    for index in itertools.product(*map(range, new_dims)):  # each kept expert, by expert_weight
        old = list(index)
        old[level] = kept[index[level]]
        torch.testing.assert_close(layer.expert_weight(index).weight, weight[(*old, slice(0, 6))])
    after = layer.gate.norms[level](x @ layer.gate.projections[level])
    torch.testing.assert_close(after, logits[:, list(kept)], rtol=1e-12, atol=1e-12)
    assert all(p.requires_grad and p.dtype == torch.float64 for p in layer.parameters())
    layer.train()
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.cores)


@pytest.mark.parametrize("activation", ["sparsemax", "entmax15", "topk"])
def test_removing_experts_a_token_does_not_use_keeps_its_output(activation):
    top_k = {"top_k": 2} if activation == "topk" else {}
    layer = make("tt", (3, 5), normalization=None, gate_bias=True, activation=activation, **top_k)
    with torch.no_grad():
        layer.gate.biases[1][[0, 2]] = -1e3  # experts 0 and 2 of level 1: coefficient 0
    x = inputs()
    before = layer(x).detach()
    remove_experts_(layer, [2, 0], level=1)
    torch.testing.assert_close(layer(x), before, rtol=1e-12, atol=1e-12)


def test_removal_shrinks_a_layer_norm_gate_and_keeps_the_planner_policy():
    layer = make("cp", (5,), normalization="ln")
    layer.planner = planner_of(layer.network, autotune=True)
    remove_experts_(layer, [4], level=0)
    assert layer.gate.norms[0].normalized_shape == (4,)
    assert layer.planner.autotune and layer.planner.network == layer.network
    assert layer(inputs()).shape == (7, 5)


def test_removing_nothing_changes_nothing():
    layer = make("cp", (4,))
    cores = list(layer.cores)
    assert remove_experts_(layer, []) == (0, 1, 2, 3)
    assert all(a is b for a, b in zip(cores, layer.cores, strict=True))


@pytest.mark.parametrize("form", BLOCKS)
def test_a_block_shrinks_its_layers_and_gate_together(form):
    block = make_block(form)
    x = inputs()
    dims = block.gate.expert_dims
    level = len(dims) - 1
    experts = {
        index: expert_linear(block, index)(x).detach()
        for index in itertools.product(*map(range, dims))
    }
    kept = remove_experts_(block, [1], level=level)
    new_dims = block.gate.expert_dims
    assert all(layer.network.expert_dims == new_dims for layer in block.mumoe_layers)
    for index in itertools.product(*map(range, new_dims)):
        old = list(index)
        old[level] = kept[index[level]]
        torch.testing.assert_close(expert_linear(block, index)(x), experts[tuple(old)])
    block.train()
    block(x).sum().backward()


@pytest.mark.parametrize(
    ("experts", "level", "error", "match"),
    [
        ([0, 1, 2, 3], 0, ValueError, "cannot remove all 4 experts of level 0"),
        ([1, -3], 0, ValueError, "expert 1 of level 0 is given twice"),
        ([4], 0, ValueError, "expert 4 is out of range for level 0 of size 4"),
        ([-5], 0, ValueError, "expert -5 is out of range"),
        ([0], 2, ValueError, r"level must be an int in \[0, 2\), got 2"),
        ([0], "0", TypeError, "level must be an int"),
        ([True], 0, TypeError, "expert indices must be ints, got True"),
        ([1.0], 0, TypeError, "expert indices must be ints, got 1.0"),
        ([0, 1, 2], 0, ValueError, "top_k=2 experts per token, more than the 1 left"),
    ],
)
def test_bad_removals_leave_the_layer_untouched(experts, level, error, match):
    layer = make("lowrank", (4, 3), activation="topk", top_k=2)
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        remove_experts_(layer, experts, level=level)
    assert_untouched(layer, before)


def test_removal_is_refused_inside_an_edit_and_for_other_modules():
    layer = make("cp", (4,))
    before = snapshot(layer)
    with layer.scaled_experts(0, [1.0, 1.0, 0.0, 1.0]), pytest.raises(RuntimeError, match="edit"):
        remove_experts_(layer, [2])
    assert_untouched(layer, before)
    with pytest.raises(TypeError, match="got Sequential"):
        remove_experts_(nn.Sequential(layer), [2])


@pytest.mark.skipif(not has_modules("tltorch"), reason="needs tensorly-torch")
def test_a_factorized_layer_is_refused_and_exports():
    layer = FactorizedMuMoE(to_factorized_tensor(make("cp", (4,)))).eval()
    before = snapshot(layer)
    with pytest.raises(TypeError, match="FactorizedMuMoE does not own its cores"):
        remove_experts_(layer, [0])
    with pytest.raises(TypeError, match="FactorizedMuMoE does not own its cores"):
        merge_experts_(layer, tolerance=0.5)
    assert_untouched(layer, before)
    x = inputs()
    torch.testing.assert_close(expert_linear(layer, 2)(x), layer(x, one_hot((4,), (2,), 7)))


# ------------------------------------------------------------------ merging


def copy_expert(layer, level, source, target, noise=0.0):
    """Make expert ``target`` of ``level`` a copy of ``source`` (plus ``noise`` on one entry)."""
    leg = layer.network.expert_legs[level]
    with torch.no_grad():
        for k, legs in enumerate(layer.network.core_legs):
            if leg in legs:
                core = layer.cores[k]
                axis = legs.index(leg)
                core.select(axis, target).copy_(core.select(axis, source))
        if noise:
            core.select(axis, target)[(0,) * (core.dim() - 1)] += noise


@pytest.mark.parametrize(("fmt", "dims"), CASES)
def test_tolerance_zero_merges_exactly_the_identical_experts(fmt, dims):
    layer = make(fmt, dims)
    level = len(dims) - 1
    n = dims[level]
    copy_expert(layer, level, 0, n - 1)
    copy_expert(layer, level, 1, 2, noise=1e-12)  # close, not equal
    weight = layer.materialize().detach()
    params = sum(p.numel() for p in layer.parameters())
    report = merge_experts_(layer, tolerance=0.0, level=level)
    assert report.groups == (MergedGroup(0, (n - 1,), (0.0,)),)
    assert (report.n_before, report.n_after, report.level) == (n, n - 1, level)
    assert report.params_before == params
    assert report.params_after == sum(p.numel() for p in layer.parameters()) < params
    kept = torch.arange(n - 1)
    torch.testing.assert_close(layer.materialize(), weight.index_select(level, kept))
    # Far below what the Gram matrix resolves (about 1e-8): decided on the slices.
    report = merge_experts_(layer, tolerance=1e-9, level=level)
    assert [(g.kept, g.removed) for g in report.groups] == [(1, (2,))]
    assert 0 < report.groups[0].distances[0] < 1e-11


def brute_force_groups(weight, level, tolerance):
    """The docstring's greedy grouping over the materialised slices."""
    slices = weight.movedim(level, 0).flatten(1)
    n = len(slices)
    norms = slices.norm(dim=1)
    distance = torch.cdist(slices, slices) / torch.maximum(norms[:, None], norms[None, :])
    done, groups = set(), []
    for k in range(n):
        if k in done:
            continue
        members = [j for j in range(k + 1, n) if j not in done and distance[k, j] <= tolerance]
        done.update(members)
        if members:
            groups.append((k, tuple(members), distance[k, members].tolist()))
    return groups, distance


@pytest.mark.parametrize(("fmt", "dims"), CASES)
def test_merged_groups_and_distances_match_the_materialised_slices(fmt, dims):
    layer = make(fmt, (6, *dims[1:]), seed=11)
    level = 0
    weight = layer.materialize().detach()
    _, distance = brute_force_groups(weight, level, 0.0)
    pairs = distance[torch.triu(torch.ones_like(distance, dtype=torch.bool), 1)].sort().values
    tolerance = float(pairs[len(pairs) // 2] + pairs[len(pairs) // 2 + 1]) / 2  # between two
    expected, _ = brute_force_groups(weight, level, tolerance)
    report = merge_experts_(layer, tolerance=tolerance, level=level)
    assert [(g.kept, g.removed) for g in report.groups] == [(k, r) for k, r, _ in expected]
    for group, (_, _, distances) in zip(report.groups, expected, strict=True):
        np.testing.assert_allclose(group.distances, distances, rtol=1e-9)
    assert report.n_after == 6 - len(report.removed)


def test_a_block_merges_experts_equal_in_every_layer():
    block = make_block("paper")
    for layer in block.mumoe_layers:
        copy_expert(layer, 0, 1, 3)
    copy_expert(block.fc2, 0, 0, 2)  # equal in fc2 only: not an equal expert of the block
    report = merge_experts_(block, tolerance=0.0)
    assert report.groups == (MergedGroup(1, (3,), (0.0,)),)
    assert block.gate.expert_dims == (3, 3)
    assert block(inputs()).shape == (7, 5)


@pytest.mark.parametrize(
    ("tolerance", "error", "match"),
    [
        (-0.1, ValueError, "finite and at least 0, got -0.1"),
        (float("nan"), ValueError, "finite and at least 0"),
        ("0", TypeError, "tolerance must be a number"),
        (True, TypeError, "tolerance must be a number"),
    ],
)
def test_bad_tolerances_say_what_came(tolerance, error, match):
    layer = make("cp", (4,))
    before = snapshot(layer)
    with pytest.raises(error, match=match):
        merge_experts_(layer, tolerance=tolerance)
    assert_untouched(layer, before)


def test_a_merge_past_top_k_leaves_the_layer_untouched():
    layer = make("cp", (3,), activation="topk", top_k=2)
    copy_expert(layer, 0, 0, 1)
    copy_expert(layer, 0, 0, 2)
    before = snapshot(layer)
    with pytest.raises(ValueError, match="top_k=2"):
        merge_experts_(layer, tolerance=0.0)
    assert_untouched(layer, before)


def test_a_blocks_layer_is_refused_its_gate_is_the_blocks():
    block = MuMoEBlock(8, 16, expert_dims=4, rank=2)
    before = [p.clone() for p in block.parameters()]
    with pytest.raises(ValueError, match="remove the experts through the block"):
        remove_experts_(block.fc2, [0])
    assert all(torch.equal(a, b) for a, b in zip(before, block.parameters(), strict=True))


def test_a_monitor_open_across_a_removal_starts_a_new_window():
    from mumoe.nn import ExpertMonitor

    layer = MuMoE(8, 4, "cp", expert_dims=6, rank=3)
    with ExpertMonitor(layer, window=10) as monitor:
        layer(torch.randn(5, 8))
        remove_experts_(layer, [1, 2])
        layer(torch.randn(5, 8))
        metrics = monitor.metrics()
        assert monitor.history().shape == (1, 4)
    assert metrics["gate/0/dead"] <= 4 and len(monitor.dead_experts()) <= 4
