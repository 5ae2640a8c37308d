"""Layers whose input and output are split into legs: conversion, files, fits (issue #30)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
import torch

import mumoe
from mumoe.functional import cores_from_experts, revive_bonds
from mumoe.inference import load
from mumoe.nn import (
    MuMoE,
    TTMatrixMuMoE,
    expert_linear,
    from_linear,
    from_linears,
    load_into,
    merge_experts_,
    mixture_linear,
    save,
)

SHAPES = {"in_shape": (6, 4), "out_shape": (4, 3)}
# Ranks at or above the unfoldings' ranks of one expert in its legs, (1, 7, 4, 4, 3) (i1 of
# 6 + 1 with the bias slice); TR-SVD splits the first mode, of one expert, into r0 r1 = 1.
FULL = {
    "dense": {},
    "cp": {"rank": 60},
    "tucker": {"rank": (4, 7, 4, 4, 3)},
    "tt": {"rank": (4, 7, 12, 3)},
    "tr": {"rank": (1, 1, 7, 12, 3)},
    "ttm": {"rank": (4, 64)},
    "lowrank": {"rank": 12},
    "mxd": {},
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_a_split_layer_starts_where_the_linear_layer_was(name):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 12).double()
    layer = from_linear(linear, name, expert_dims=5, **FULL[name], **SHAPES)
    x = torch.randn(9, 24, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), linear(x), rtol=1e-6, atol=1e-6)
    assert layer.conversion_error < 1e-6


def test_a_low_rank_split_start_reports_its_error_and_can_grow():
    torch.manual_seed(0)
    layer = from_linear(torch.nn.Linear(24, 12), "ttm", expert_dims=5, rank=(4, 2), **SHAPES)
    assert 0.1 < layer.conversion_error < 1
    # The expert bond's unused components are random in the expert core, zero in the next.
    experts, first = (core.detach() for core in layer.cores[:2])
    assert bool((experts[:, 1:] != 0).all()) and bool((first[1:] == 0).all())
    layer.train()(torch.randn(16, 24)).square().sum().backward()
    assert layer.cores[1].grad[1:].abs().sum() > 0


def test_reviving_bonds_keeps_w_and_frees_the_gradient():
    net = mumoe.tt(4, 3, expert_dims=5, rank=(3, 4))
    cores = [np.asarray(c) for c in mumoe.random_cores(net, random_state=0)]
    cores[0][:, 1:] = 0.0  # component r1 >= 1 unused on both sides
    cores[1][1:] = 0.0
    start = mumoe.random_cores(net, random_state=1)
    before = mumoe.materialize(net, cores)
    revived = revive_bonds(net, [c.copy() for c in cores], start)
    np.testing.assert_array_equal(mumoe.materialize(net, revived), before)
    np.testing.assert_array_equal(revived[0][:, 1:], np.asarray(start[0])[:, 1:])
    assert np.all(revived[1][1:] == 0)


def test_stacked_experts_fit_a_tt_matrix_exactly_at_full_rank():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 25, 12))  # three experts, I' = 25 with the bias row
    net = mumoe.ttm(24, 12, expert_dims=3, rank=(3, 64), **SHAPES)
    cores, errors = cores_from_experts(net, w)
    assert errors.shape == (3,) and errors.max() < 1e-10
    with tl.backend_context("numpy"):
        np.testing.assert_allclose(mumoe.materialize(net, cores), w, atol=1e-10)
    layers = [torch.nn.Linear(24, 12) for _ in range(3)]
    assert from_linears(layers, "ttm", rank=(3, 64), **SHAPES).conversion_error.max() < 1e-5


def test_weights_files_configs_and_served_layers_keep_the_split(tmp_path):
    torch.manual_seed(0)
    layer = TTMatrixMuMoE(24, 12, expert_dims=6, rank=(3, 5), **SHAPES).eval()
    path = tmp_path / "ttm.safetensors"
    save(layer, path)
    x = torch.randn(7, 24)
    served = load(path)
    np.testing.assert_allclose(served(x.numpy()), layer(x).detach().numpy(), atol=1e-6)
    rebuilt = MuMoE.from_config(layer.get_config())
    assert rebuilt.network == layer.network and type(rebuilt) is TTMatrixMuMoE
    load_into(rebuilt, path)
    torch.testing.assert_close(rebuilt.eval()(x), layer(x))
    assert "in_shape=(6, 4), out_shape=(4, 3)" in repr(layer)


def test_a_split_layer_refuses_inputs_of_the_wrong_size():
    layer = MuMoE(24, 12, "cp", expert_dims=4, rank=3, **SHAPES)
    with pytest.raises(ValueError, match=r"\(\.\.\., 24\)"):
        layer(torch.randn(3, 25))


@pytest.mark.slow
def test_tt_matrix_experts_train_on_digits_at_least_as_well_as_one_expert():
    # Issue #30: at equal parameters (gates counted), 8 TT-matrix experts against one,
    # the first three seeds (python -m benchmarks.tt_matrix runs ten: +0.0076 +- 0.0124).
    pytest.importorskip("sklearn")
    from benchmarks.tt_matrix import compare

    results = compare([0, 1, 2], experts=8, budget=2000)
    single, mixture = ([r.accuracy for r in results[n]] for n in (1, 8))
    assert all(r.params <= 2000 for runs in results.values() for r in runs)
    assert np.mean(mixture) >= np.mean(single)


def test_surgery_exports_split_experts_as_linear_layers():
    torch.manual_seed(0)
    layer = TTMatrixMuMoE(24, 12, expert_dims=6, rank=(3, 5), **SHAPES).eval()
    x = torch.randn(5, 24)
    one_hot = torch.zeros(5, 6)
    one_hot[:, 2] = 1
    with torch.no_grad():
        torch.testing.assert_close(expert_linear(layer, 2)(x), layer(x, [one_hot]))
        mean = torch.full((6,), 1 / 6)
        torch.testing.assert_close(mixture_linear(layer, [mean])(x), layer(x, [mean.expand(5, 6)]))
    report = merge_experts_(layer, tolerance=0.0)
    assert report.n_after == 6  # random experts: none within 0 of another


def test_a_revived_hyperedge_trains_and_every_format_in_fits_starts_from_a_linear():
    # CP's bond joins three cores: all but the last are revived, so the last one's
    # gradient is not zero (a zero in two holders would leave every gradient at zero).
    net = mumoe.cp(3, 2, expert_dims=4, rank=3)
    cores = [np.asarray(c) for c in mumoe.random_cores(net, random_state=0)]
    for core in cores:
        core[:, 2] = 0.0
    revived = revive_bonds(net, cores, mumoe.random_cores(net, random_state=1))
    assert np.all(revived[-1][:, 2] == 0) and np.all(revived[0][:, 2] != 0)
    layer = MuMoE(3, 2, net, gated=False, dtype=torch.float64)
    with torch.no_grad():
        for parameter, core in zip(layer.cores, revived, strict=True):
            parameter.copy_(torch.from_numpy(core))
    layer(
        torch.randn(5, 3, dtype=torch.float64), [torch.rand(5, 4, dtype=torch.float64)]
    ).sum().backward()
    assert layer.cores[-1].grad[:, 2].abs().sum() > 0
    # A TT-matrix of one pair of legs has no SVD rule of its own, and a split MxD of two
    # levels is fitted as one expert: both start from a linear layer exactly.
    linear = torch.nn.Linear(6, 10)
    one_pair = from_linear(linear, "ttm", expert_dims=3, rank=3, in_shape=(6,), out_shape=(10,))
    two_levels = from_linear(linear, "mxd", expert_dims=(3, 2), in_shape=(3, 2))
    assert one_pair.network.spec == "n1 r1, r1 i o" and one_pair.conversion_error < 1e-6
    assert two_levels.conversion_error < 1e-6


def test_a_gpt2_mlp_becomes_a_tt_matrix_block_exactly_and_reloads(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mumoe.nn import MuMoEBlock, load_model, replace_mlp, save_model

    config = transformers.GPT2Config(
        n_layer=1, n_embd=64, n_head=2, n_positions=32, vocab_size=100, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    base = transformers.GPT2LMHeadModel(config).eval()
    base.load_state_dict(model.state_dict())
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
        # 64 -> 256 split (8, 8) -> (16, 16): the pair cores' bond of 128 is full rank.
        replace_mlp(
            model, include=".", network="ttm", expert_dims=4, rank=(4, 128), encoder="mumoe"
        )
        model.eval()
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    block = model.transformer.h[0].mlp
    assert isinstance(block, MuMoEBlock) and block.fc1.network.in_shape == (8, 8)
    save_model(model, tmp_path)
    load_model(base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_reviving_draws_start_values_only_where_a_component_is_unused():
    net = mumoe.tt(4, 3, expert_dims=5, rank=(3, 4))
    cores = [np.asarray(c) for c in mumoe.random_cores(net, random_state=0)]

    def never():
        raise AssertionError("drawn although every component is used")

    assert revive_bonds(net, cores, never) is cores
