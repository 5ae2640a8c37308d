"""Experts from several pretrained linears (from_linears): exact for dense, each expert's error
reported, on plain layers and on the experts of a transformers Mixtral built from a config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mumoe.nn import CPMuMoE, MuMoE, from_linears


def one_hot(rows, n, expert):
    gates = torch.zeros(rows, n, dtype=torch.float64)
    gates[:, expert] = 1.0
    return gates


def test_dense_experts_are_the_layers_exactly():
    torch.manual_seed(0)
    experts = [torch.nn.Linear(12, 5).double() for _ in range(6)]
    layer = from_linears(experts, "dense", normalization=None)
    assert isinstance(layer, MuMoE) and layer.network.expert_dims == (6,)
    assert layer.cores[0].dtype == torch.float64 and np.all(layer.conversion_error == 0)
    x = torch.randn(7, 12, dtype=torch.float64)
    for e, expert in enumerate(experts):
        torch.testing.assert_close(layer(x, [one_hot(7, 6, e)]), expert(x), rtol=0, atol=1e-12)


def test_two_levels_from_a_nested_list_and_weights_without_bias():
    torch.manual_seed(1)
    grid = [[torch.randn(4, 9, dtype=torch.float64) for _ in range(3)] for _ in range(2)]
    layer = from_linears(grid, "tt", rank=(2, 6, 4), normalization=None)
    assert layer.network.expert_dims == (2, 3) and not layer.network.bias
    assert layer.conversion_error.shape == (2, 3) and layer.conversion_error.max() < 1e-10
    x = torch.randn(5, 9, dtype=torch.float64)
    y = layer(x, [one_hot(5, 2, 1), one_hot(5, 3, 2)])
    torch.testing.assert_close(y, x @ grid[1][2].T, rtol=0, atol=1e-10)


def test_a_compressed_fit_reports_each_experts_error():
    torch.manual_seed(2)
    experts = [torch.nn.Linear(16, 8) for _ in range(8)]
    layer = from_linears(experts, "cp", rank=6, layer_class=CPMuMoE)
    assert type(layer) is CPMuMoE
    errors = layer.conversion_error
    assert errors.shape == (8,) and np.all((errors > 0) & (errors < 1))
    with torch.no_grad():  # the reported errors are those of the layer's own experts
        for e, expert in enumerate(experts):
            w = layer.expert_weight(e)
            fitted = torch.cat([w.weight, w.bias[None]]).double()
            target = torch.cat([expert.weight.T, expert.bias[None]]).double()
            relative = float((fitted - target).norm() / target.norm())
            assert abs(relative - errors[e]) < 1e-5


def test_mixtral_experts_become_one_layer():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[models]')"
    )
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=50,
        max_position_embeddings=16,
    )
    model = transformers.MixtralForCausalLM(config)
    moe = model.model.layers[0].mlp
    experts = moe.experts
    down = getattr(experts, "down_proj", None)
    if isinstance(down, torch.Tensor):  # transformers 5: (E, H, I), one (out, in) weight each
        weights = [down[e] for e in range(down.shape[0])]
    else:  # transformers 4: a ModuleList of expert MLPs, w2 the down projection
        weights = [expert.w2.weight for expert in experts]
    layer = from_linears(weights, "dense", normalization=None)
    x = torch.randn(3, config.intermediate_size)
    for e, weight in enumerate(weights):
        gates = [one_hot(3, 4, e).float()]
        torch.testing.assert_close(layer(x, gates), x @ weight.detach().T, rtol=1e-5, atol=1e-6)
    compressed = from_linears(weights, "tucker", rank=(4, 16, 16), normalization=None)
    assert compressed.conversion_error.shape == (4,)
    assert compressed.network.n_params < layer.network.n_params


def test_bad_layers_are_refused_with_what_came():
    with pytest.raises(ValueError, match=r"one shape \(O, I\), got \[\(4, 8\), \(5, 8\)\]"):
        from_linears([torch.nn.Linear(8, 4), torch.nn.Linear(8, 5)], "dense")
    with pytest.raises(ValueError, match="biases or none"):
        from_linears([torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)], "dense")
    with pytest.raises(ValueError, match="rectangular"):
        from_linears([[torch.randn(4, 8)] * 2, [torch.randn(4, 8)]], "dense")
    with pytest.raises(TypeError, match="layer 1: "):
        from_linears([torch.nn.Linear(8, 4), torch.nn.ReLU()], "dense")
    with pytest.raises(ValueError, match="layer 0 is a tensor of shape"):
        from_linears([torch.randn(8), torch.randn(8)], "dense")
    with pytest.raises(ValueError, match="no rule fits a 'custom' network"):
        from_linears([torch.randn(4, 8)] * 3, "n1 a, i a b, o b", rank={"a": 2, "b": 2})
    with pytest.raises(TypeError, match="takes bias from the layers"):
        from_linears([torch.randn(4, 8)] * 3, "dense", bias=True)
    with pytest.raises(ValueError, match="the dense format has no rank"):
        from_linears([torch.randn(4, 8)] * 3, "dense", rank=2)


def test_a_module_list_or_a_stacked_tensor_and_the_error_in_the_layers_dtype():
    torch.manual_seed(3)
    experts = torch.nn.ModuleList([torch.nn.Linear(8, 4) for _ in range(3)])
    assert from_linears(experts, "dense").network.expert_dims == (3,)
    stacked = torch.randn(2, 3, 4, 8)  # (N, M, O, I): two levels
    layer = from_linears(stacked, "dense")
    assert layer.network.expert_dims == (2, 3) and layer.conversion_error.max() == 0
    half = from_linears([e.bfloat16() for e in experts], "tt", rank=(3, 12))
    assert 1e-4 < half.conversion_error.max() < 1e-2  # bfloat16's rounding, reported
    with pytest.raises(TypeError, match="takes expert_dims from the layers"):
        from_linears(experts, "dense", expert_dims=3)
