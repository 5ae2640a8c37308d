"""Gate interventions: the chosen experts' coefficients scaled, clamped or set, on every layer
kind, in training and eval, composed with edit_experts, and checked before anything is hooked."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mumoe.backends import preserved_backend
from mumoe.nn import (
    CPMuMoE,
    FactorizedMuMoE,
    MuMoE,
    MuMoEBlock,
    compat,
    dense_coefficients,
    edit_experts,
    record_gates,
    steer_experts,
)


def with_random_gate(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for projection in module.gate.projections:
            projection.normal_()
    return module


LAYERS = {
    "cp": lambda: CPMuMoE(8, 5, expert_dims=6, rank=3, normalization=None, activation="softmax"),
    "tt-2-levels": lambda: MuMoE(
        8, 5, "tt", expert_dims=(6, 3), rank=(2, 2, 3), normalization="ln"
    ),
    "mxd-topk": lambda: MuMoE(
        8, 5, "mxd", expert_dims=6, activation="topk", top_k=2, normalization=None
    ),
    "block": lambda: MuMoEBlock(8, 16, expert_dims=6, rank=3, normalization=None),
    "tr-ln-bias": lambda: MuMoE(
        8, 5, "tr", expert_dims=6, rank=(2, 2, 3), normalization="ln", gate_bias=True
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_steering_gives_the_layer_run_on_the_edited_gates(name):
    module = with_random_gate(LAYERS[name]()).eval()
    x = torch.randn(7, 8)
    with record_gates(module) as record, torch.no_grad():
        module(x)
    (gate,) = record
    expected = [a.clone() for a in record[gate]]
    edited = expected[0].clone()
    edited[:, 0] *= 3.0
    edited[:, 1] = edited[:, 1].clamp(0.05, 0.1)
    edited[:, 2] = 0.25
    with steer_experts(module, scale={0: 3.0}, clamp={1: (0.05, 0.1)}, values={2: 0.25}):
        with record_gates(module) as steered:
            y = module(x)
    torch.testing.assert_close(steered[gate][0], edited)  # record_gates sees the steered ones
    with torch.no_grad():
        run_on = _block_on if isinstance(module, MuMoEBlock) else _layer_on
        torch.testing.assert_close(y, run_on(module, x, [edited, *expected[1:]]))


def _layer_on(layer, x, gates):
    """A copy of the layer without its gate, run on the given gates."""
    network = layer.network
    gateless = MuMoE(layer.in_features, layer.out_features, network, bias=network.bias, gated=False)
    gateless.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith("cores")})
    return gateless(x, gates)


def _block_on(block, x, gates):
    """The block with its gate's output replaced by the given gates."""
    hook = block.gate.register_forward_hook(lambda *_: gates)
    try:
        return block(x)
    finally:
        hook.remove()


def test_steering_trains_and_composes_with_edit_experts():
    layer = with_random_gate(CPMuMoE(8, 5, expert_dims=6, rank=3, normalization=None)).train()
    x = torch.randn(4, 8)
    with steer_experts(layer, scale={3: 0.5}):
        layer(x).square().sum().backward()
    assert layer.gate.projections[0].grad is not None
    assert all(core.grad is not None for core in layer.cores)
    layer.eval()
    with torch.no_grad():
        with steer_experts(layer, scale={3: 0.5}), edit_experts(layer, {3: 0.5}):
            both = layer(x)
        with steer_experts(layer, scale={3: 0.25}):
            once = layer(x)
        with steer_experts(layer, scale={3: 0.5}), steer_experts(layer, scale={3: 0.5}):
            nested = layer(x)
    torch.testing.assert_close(both, once)  # factors multiply
    torch.testing.assert_close(nested, once)
    with torch.no_grad(), record_gates(layer) as record:
        with steer_experts(layer, values={0: 1.0}), steer_experts(layer, scale={0: 0.5}):
            layer(x)  # the inner block steers what the outer gives: 1.0 * 0.5
        inner_first = record["gate"][0][:, 0].clone()
        with steer_experts(layer, scale={0: 0.5}), steer_experts(layer, values={0: 1.0}):
            layer(x)
    assert torch.all(inner_first == 0.5) and torch.all(record["gate"][0][:, 0] == 1.0)
    assert not layer.gate._forward_hooks  # every steering hook removed


def test_a_sparse_support_stays_a_support_when_only_scaled():
    gate = with_random_gate(MuMoE(16, 4, expert_dims=512, rank=4, activation="topk", top_k=2))
    gate = gate.gate.eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        (plain,) = gate(x, max_density=1.0)
        with steer_experts(gate, scale={i: 2.0 for i in range(0, 512, 2)}):
            (scaled,) = gate(x, max_density=1.0)
        with steer_experts(gate, values={0: 0.5}):
            (fixed,) = gate(x, max_density=1.0)
    assert type(plain).__name__ == type(scaled).__name__ == "SparseGate"
    assert torch.equal(scaled.indices, plain.indices)
    even = plain.indices % 2 == 0
    torch.testing.assert_close(scaled.values, torch.where(even, 2 * plain.values, plain.values))
    (dense,) = dense_coefficients([plain])
    dense[:, 0] = 0.5
    assert isinstance(fixed, torch.Tensor)  # a set coefficient may leave the support: dense
    torch.testing.assert_close(fixed, dense)


def test_steering_a_chosen_gate_only():
    model = torch.nn.Sequential(
        with_random_gate(CPMuMoE(8, 8, expert_dims=4, rank=2, normalization=None)),
        with_random_gate(CPMuMoE(8, 3, expert_dims=6, rank=2, normalization=None), seed=1),
    ).eval()
    x = torch.randn(5, 8)
    with torch.no_grad(), record_gates(model) as record:
        with steer_experts(model, gates="1", values={3: 0.125}):
            model(x)
    assert torch.all(record["1.gate"][0][:, 3] == 0.125)
    assert not torch.any(record["0.gate"][0] == 0.125)


def test_the_reference_compatible_classes_have_no_gate_module_to_steer():
    layer = compat.CPMuMoE(8, 5, expert_dims=(6,), rank=3)  # the reference's gate, a method
    with pytest.raises(TypeError, match="holds no MuMoEGate"), steer_experts(layer, values={0: 1}):
        pass


def test_bad_steering_is_refused_before_anything_is_hooked():
    layer = CPMuMoE(8, 5, expert_dims=6, rank=3)
    cases = [
        (
            {"values": {6: 1.0}},
            r"values: expert 6 is not an index of level 0 of the gate 'gate' \(6 experts\)",
        ),
        ({"scale": {0: float("nan")}}, r"scale\[0\] must be a finite number"),
        ({"clamp": {0: (0.5, 0.1)}}, r"clamp\[0\] has low 0.5 > high 0.1"),
        ({"clamp": {0: 0.5}}, r"clamp\[0\] must be \(low, high\)"),
        ({"level": 1}, r"level must be in \[0, 1\) for the gate 'gate'"),
        ({"gates": "blocks.1"}, r"'blocks.1' is neither a gate of the model"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match), steer_experts(layer, **kwargs):
            pass
        assert not layer.gate._forward_hooks
    with pytest.raises(TypeError, match="holds no MuMoEGate"), steer_experts(torch.nn.Linear(2, 2)):
        pass


def test_a_factorized_layer_is_steered_too():
    if importlib.util.find_spec("tltorch") is None:  # importorskip would switch TensorLy's backend
        pytest.skip("tensorly-torch is not installed")
    with preserved_backend():
        import tltorch  # sets TensorLy's backend to pytorch at import
    tensor = tltorch.FactorizedTensor.new((6, 9, 5), rank=3, factorization="cp")
    tensor.normal_()
    layer = with_random_gate(FactorizedMuMoE(tensor)).eval()
    x = torch.randn(2, 8)
    with torch.no_grad(), steer_experts(layer, values=dict.fromkeys(range(6), 0.0)):
        off = layer(x)
    torch.testing.assert_close(off, torch.zeros_like(off))
