"""From pretrained models: from_linear and replace_linear (mumoe.nn, mumoe.functional)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import Budget, random_cores
from mumoe.functional import cores_from_dense, dense_matrix
from mumoe.inference import load
from mumoe.nn import (
    CPMuMoE,
    TRMuMoE,
    from_linear,
    replace_linear,
    save,
)
from mumoe.spec import gate_params, linear_params

#: Full-rank (exact) settings of every format with two expert levels, for I' <= 9, O <= 6.
EXACT = {
    "mxd": None,
    "dense": None,
    "cp": 9,
    "tucker": (2, 2, 9, 9),
    "tt": (2, 2, 9),
    "tr": (2, 2, 3, 9),
    "lowrank": 9,
}


def eckart_young(m: np.ndarray, k: int) -> float:
    s = np.linalg.svd(m, compute_uv=False)
    return float(np.sqrt((s[k:] ** 2).sum() / (s**2).sum()))


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(sorted(EXACT)),
    st.integers(2, 8),
    st.integers(2, 6),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_every_expert_starts_as_the_linear_layer(fmt, n_in, n_out, bias, seed):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    layer = from_linear(linear, fmt, expert_dims=(3, 2), rank=EXACT[fmt])
    assert layer.conversion_error < 1e-12
    x = torch.randn(7, n_in, dtype=torch.float64)
    for mode in (layer.train, layer.eval):
        mode()
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("fmt", "rank", "k"),
    [
        ("cp", 2, 2),
        ("tucker", (2, 3, 2), 2),
        ("tt", (2, 3), 3),
        ("tr", (2, 2, 3), 3),
        ("lowrank", 2, 2),
    ],
)
def test_below_full_rank_each_expert_is_the_best_approximation(fmt, rank, k):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 9, dtype=torch.float64)
    layer = from_linear(linear, fmt, expert_dims=4, rank=rank)
    m = dense_matrix(linear.weight.detach().numpy(), linear.bias.detach().numpy())
    assert layer.conversion_error == pytest.approx(eckart_young(m, k), rel=1e-9)
    expert = layer.expert_weight(3)  # every expert is the same rank-k matrix
    w = np.vstack([expert.weight.detach().numpy(), expert.bias.detach().numpy()])
    np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False)[k:], 0, atol=1e-10)


@pytest.mark.parametrize("fmt", sorted(EXACT))
def test_training_leaves_the_start_every_parameter_moving(fmt):
    # Zeros set against zeros would be a saddle; every parameter must get a gradient.
    torch.manual_seed(0)
    rank = {"cp": 12, "tucker": (2, 2, 6, 6), "tt": (2, 2, 6), "tr": (2, 2, 2, 6), "lowrank": 6}
    layer = from_linear(torch.nn.Linear(10, 6), fmt, expert_dims=(4, 3), rank=rank.get(fmt))
    x = torch.randn(32, 10)
    layer(x).square().mean().backward()
    # Every expert starts as the linear layer, so the mix does not change the output yet:
    # the gates' gradient is 0 (up to rounding), the cores' is not.  One step apart, the
    # experts differ, and the gates move too.
    for name, p in layer.named_parameters():
        if not name.startswith("gate."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    torch.optim.SGD(layer.parameters(), lr=0.5).step()
    layer.zero_grad()
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 1e-4, name
    gates = layer.gate(torch.randn(32, 10))
    assert all(g.std(0).sum() > 0 for g in gates)  # tokens get different mixes


def test_budget_matching_and_the_linear_layers_device_and_dtype():
    linear = torch.nn.Linear(96, 40, dtype=torch.float64)
    layer = from_linear(linear, None, expert_dims=8, layer_class=CPMuMoE)  # rank="same"
    assert isinstance(layer, CPMuMoE) and layer.cores[0].dtype == torch.float64
    params = sum(p.numel() for p in layer.parameters())
    assert params <= linear_params(96, 40) and params > 0.9 * linear_params(96, 40)
    half = from_linear(linear, "cp", expert_dims=8, rank=Budget(0.5))
    assert sum(p.numel() for p in half.parameters()) <= 0.5 * linear_params(96, 40)
    no_bias = from_linear(torch.nn.Linear(6, 4, bias=False), "tr", expert_dims=3, rank=(2, 2, 6))
    assert not no_bias.network.bias and no_bias.conversion_error < 1e-6
    tr = from_linear(linear, None, expert_dims=4, rank=(2, 2, 8), layer_class=TRMuMoE)
    assert isinstance(tr, TRMuMoE)
    assert gate_params(96, 8) == layer.gate.projections[0].numel()


def test_bad_input_is_refused_naming_what_was_expected():
    linear = torch.nn.Linear(6, 4)
    with pytest.raises(TypeError, match=r"expected a torch.nn.Linear .* got Conv2d"):
        from_linear(torch.nn.Conv2d(1, 1, 1), expert_dims=4)
    with torch.device("meta"):
        meta = torch.nn.Linear(6, 4)
    with pytest.raises(ValueError, match="on the meta device"):
        from_linear(meta, expert_dims=4)
    with pytest.raises(TypeError, match="takes bias, dtype from the linear layer"):
        from_linear(linear, expert_dims=4, bias=False, dtype=torch.float64)
    with pytest.raises(ValueError, match="no rule starts a 'custom' network"):
        from_linear(linear, "n1 a, i a b, o b", expert_dims=4, rank=2)
    with pytest.raises(ValueError, match="no cp rank fits a budget"):
        from_linear(linear, "cp", expert_dims=4096)
    with pytest.raises(ValueError, match="cannot start a layer with input_norm=True"):
        from_linear(linear, "mxd", expert_dims=4, input_norm=True)  # issue #26, item 3
    from_linear(linear, "mxd", expert_dims=4, input_norm=False)  # asking for none is fine
    with pytest.raises(ValueError, match="CPMuMoE is a cp layer, got network='tr'"):
        from_linear(linear, "tr", expert_dims=4, rank=2, layer_class=CPMuMoE)
    net = from_linear(linear, "mxd", expert_dims=2).network
    with pytest.raises(ValueError, match=r"must have shape \(7, 4\)"):
        cores_from_dense(net, np.ones((6, 4)), random_cores(net))


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Block(), torch.nn.Linear(8, 3))


def test_replace_linear_converts_what_the_filter_selects_in_place():
    net = model()
    x = torch.randn(5, 8)
    before = net(x).detach()
    same = replace_linear(net, include=r"mlp\.", network="mxd", expert_dims=16)
    assert same is net
    assert [type(m).__name__ for m in net[0].mlp] == ["MuMoE", "GELU", "MuMoE"]
    assert isinstance(net[1], torch.nn.Linear)  # not selected
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    net.train()
    net(torch.randn(16, 8)).square().mean().backward()  # a training step runs

    fresh = replace_linear(
        model(), include=lambda name, m: name.startswith("0."), network="mxd", expert_dims=16
    )
    fresh.load_state_dict(net.state_dict())  # state dicts round-trip
    torch.testing.assert_close(fresh.eval()(x), net.eval()(x))


def test_replace_linear_is_all_or_nothing():
    net = model()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"matches none of the model's 3 linear layers: '0\.mlp\.0'"
    ):
        replace_linear(net, include="attention", expert_dims=4)
    with pytest.raises(ValueError, match=r"replacing '0\.mlp\.2' failed, the model is unchanged"):
        # 7 experts: mlp.0 (8 -> 32) fits its budget at rank 4; mlp.2's gate (32 x 7) does not
        replace_linear(net, include="mlp", network="cp", expert_dims=7)
    assert all(isinstance(m, torch.nn.Linear) for m in (net[0].mlp[0], net[0].mlp[2]))
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match=r"replacing '0\.mlp\.0' failed.*expert_dims"):
        replace_linear(net, include="mlp", expert_dims=0)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    with pytest.raises(TypeError, match="include must be a callable"):
        replace_linear(net, include=3, expert_dims=4)


def test_a_converted_layer_serves_on_numpy(tmp_path):
    torch.manual_seed(0)
    layer = from_linear(torch.nn.Linear(12, 5), "cp", expert_dims=6, rank=4).eval()
    save(layer, tmp_path / "converted.safetensors")
    x = torch.randn(4, 12)
    np.testing.assert_allclose(
        load(tmp_path / "converted.safetensors")(x.numpy()),
        layer(x).detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
