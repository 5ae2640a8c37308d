"""MLP-to-block conversion (issue #27, item 2): blocks that start exactly at a dense MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mumoe.nn import block_from_mlp, from_linear

MXD = {"activation": "relu_topk", "top_k": 4, "normalization": None, "gate_bias": True}


def mlp(in_features=12, hidden=48, out_features=10, bias=True):
    torch.manual_seed(0)
    return (
        nn.Linear(in_features, hidden, bias=bias, dtype=torch.float64),
        nn.Linear(hidden, out_features, bias=bias, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    ("activation", "torch_activation"),
    [("gelu", nn.GELU()), ("gelu_tanh", nn.GELU(approximate="tanh")), ("relu", nn.ReLU())],
)
@pytest.mark.parametrize(
    "gate", [MXD, {"activation": "softmax"}, {"activation": "topk", "top_k": 2}], ids=str
)
def test_an_mxd_block_starts_exactly_at_the_mlp(activation, torch_activation, gate):
    fc1, fc2 = mlp()
    block = block_from_mlp(fc1, fc2, "mxd", expert_dims=64, hidden_activation=activation, **gate)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(block(x), fc2(torch_activation(fc1(x))), rtol=1e-12, atol=1e-12)
    assert block.conversion_error == {"fc2": 0.0}
    assert block.training and block.output_bias == "shared"


def test_a_relu_topk_start_keeps_every_expert_and_learns():
    fc1, fc2 = mlp()
    block = block_from_mlp(fc1, fc2, "mxd", expert_dims=(8, 4), **MXD)
    x = torch.randn(16, 12, dtype=torch.float64)
    y, gates = block(x, return_gates=True)
    for a, n in zip(gates, (8, 4), strict=True):
        torch.testing.assert_close(a, torch.full_like(a, 1 / n))  # tied at the start
    torch.testing.assert_close(y, fc2(nn.functional.gelu(fc1(x))))
    (y * torch.randn(16, 10, dtype=torch.float64)).sum().backward()
    assert all(p.grad.abs().sum() > 0 for p in block.gate.projections)  # not a dead gate


def test_a_gated_mlp_becomes_a_glu_block():
    # Llama's MLP: down(silu(gate_proj(x)) * up_proj(x)), no biases.
    torch.manual_seed(1)
    gate_proj, up_proj, down_proj = (
        nn.Linear(12, 32, bias=False, dtype=torch.float64),
        nn.Linear(12, 32, bias=False, dtype=torch.float64),
        nn.Linear(32, 12, bias=False, dtype=torch.float64),
    )
    block = block_from_mlp(
        gate_proj,
        down_proj,
        "mxd",
        expert_dims=16,
        up=up_proj,
        hidden_activation="silu",
        activation="softmax",
        normalization=None,
    )
    x = torch.randn(5, 12, dtype=torch.float64)
    expected = down_proj(nn.functional.silu(gate_proj(x)) * up_proj(x))
    torch.testing.assert_close(block(x), expected, rtol=1e-12, atol=1e-12)
    assert block.glu and block.bias is None and block.fc2.network.bias is False


def test_a_factorised_block_starts_at_the_eckart_young_best():
    fc1, fc2 = mlp()
    block = block_from_mlp(
        fc1, fc2, "cp", expert_dims=16, rank=5, encoder="mumoe", activation="softmax"
    )
    # Each μMoE layer's error is from_linear's, the best rank-5 error of its matrix: [W^T; b]
    # for the encoder; W^T alone for the decoder, whose bias is the block's, shared and exact.
    weightless = nn.Linear(48, 10, bias=False, dtype=torch.float64)
    with torch.no_grad():
        weightless.weight.copy_(fc2.weight)
    for name, linear in (("fc1", fc1), ("fc2", weightless)):
        alone = from_linear(linear, "cp", expert_dims=16, rank=5, activation="softmax")
        assert block.conversion_error[name] == pytest.approx(alone.conversion_error, rel=1e-9)
        assert 0 < block.conversion_error[name] < 1
    full = block_from_mlp(
        fc1, fc2, "cp", expert_dims=4, rank=48, encoder="mumoe", activation="softmax"
    )
    x = torch.randn(4, 12, dtype=torch.float64)  # at full rank, exact again
    torch.testing.assert_close(full(x), fc2(nn.functional.gelu(fc1(x))), rtol=1e-9, atol=1e-9)


def test_bad_mlps_are_refused_with_the_reason():
    fc1, fc2 = mlp()
    with pytest.raises(ValueError, match="do not chain: fc1 gives 48 features, fc2 takes 10"):
        block_from_mlp(fc1, nn.Linear(10, 12), expert_dims=8, activation="softmax")
    with pytest.raises(ValueError, match=r"must have fc1's shape \(48, 12\)"):
        block_from_mlp(fc1, fc2, expert_dims=8, up=nn.Linear(12, 40), activation="softmax")
    with pytest.raises(ValueError, match="must all have biases or none"):
        block_from_mlp(fc1, nn.Linear(48, 10, bias=False), expert_dims=8, activation="softmax")
    with pytest.raises(ValueError, match="only with gate_bias=True"):
        block_from_mlp(fc1, fc2, expert_dims=8, activation="relu_topk", top_k=2)
    with pytest.raises(TypeError, match="takes bias from the MLP"):
        block_from_mlp(fc1, fc2, expert_dims=8, bias=False)
    with pytest.raises(TypeError):
        block_from_mlp(nn.Conv2d(3, 3, 1), fc2, expert_dims=8)


def test_gpt2s_mlp_from_transformers():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[models]')"
    )
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    config = transformers.GPT2Config(n_embd=32, n_inner=128, activation_function="gelu_new")
    torch.manual_seed(0)
    mlp_module = GPT2MLP(128, config).double().eval()
    block = block_from_mlp(
        mlp_module.c_fc,  # Conv1D: weights stored (in, out)
        mlp_module.c_proj,
        "mxd",
        expert_dims=256,
        hidden_activation="gelu_tanh",
        **MXD,
    ).eval()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    torch.testing.assert_close(block(x), mlp_module(x), rtol=1e-12, atol=1e-12)


def test_a_random_relu_topk_gate_calibrated_starts_near_the_mlp():
    fc1, fc2 = mlp()
    x = torch.randn(256, 12, dtype=torch.float64)
    options = {"activation": "relu_topk", "top_k": 8, "normalization": None, "gate_bias": True}
    raw = block_from_mlp(fc1, fc2, "mxd", expert_dims=64, gate_init="random", **options)
    calibrated = block_from_mlp(
        fc1, fc2, "mxd", expert_dims=64, gate_init="random", calibrate=x, **options
    )
    target = fc2(nn.functional.gelu(fc1(x)))
    with torch.no_grad():
        total = calibrated.gate(x)[0].sum(-1).mean()
        nmse = [
            ((b(x) - target).square().sum() / target.square().sum()).item()
            for b in (raw, calibrated)
        ]
    assert total > 1  # k rectified logits: the raw start is about `total` times the MLP
    assert nmse[1] < 0.2 < nmse[0]
    with pytest.raises(ValueError, match="pass gate_init='random'"):
        block_from_mlp(fc1, fc2, "mxd", expert_dims=64, calibrate=x, **options)
    with pytest.raises(ValueError, match="unknown gate_init 'zero'"):
        block_from_mlp(fc1, fc2, "mxd", expert_dims=64, gate_init="zero", **options)
