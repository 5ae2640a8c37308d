"""tensorly-torch interop: layers built from, and exported to, tltorch FactorizedTensors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

if importlib.util.find_spec("tltorch") is None:  # importorskip would switch TensorLy's backend
    pytest.skip(
        "tensorly-torch is not installed (pip install 'mumoe[torch]')", allow_module_level=True
    )

import tensorly as tl

from mumoe.backends import preserved_backend, thread_backend
from mumoe.nn import (
    CPMuMoE,
    FactorizedMuMoE,
    TRMuMoE,
    TTMatrixMuMoE,
    TTMuMoE,
    TuckerMuMoE,
    network_of,
    to_factorized_tensor,
)
from mumoe.testing import dense_forward
from tests.helpers import randomise

with preserved_backend():
    import tltorch  # sets TensorLy's backend to pytorch at import


LAYERS = {
    "cp": lambda: CPMuMoE(8, 5, expert_dims=(6, 3), rank=4),
    "tucker": lambda: TuckerMuMoE(8, 5, expert_dims=6, rank=(2, 3, 4)),
    "tt": lambda: TTMuMoE(8, 5, expert_dims=(6, 3), rank=(2, 3, 2)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_export_and_rebuild_give_the_same_layer(name):
    layer = randomise(LAYERS[name](), scale=0.5).eval()
    tensor = to_factorized_tensor(layer)
    assert tuple(tensor.shape) == layer.network.weight_shape
    with thread_backend("pytorch"):  # tltorch's own methods compute with TensorLy
        full = tensor.to_tensor()
    torch.testing.assert_close(full, layer.materialize())
    rebuilt = FactorizedMuMoE(tensor).eval()
    rebuilt.gate.load_state_dict(layer.gate.state_dict())
    x = torch.randn(7, 8)
    torch.testing.assert_close(rebuilt(x), layer(x))
    assert rebuilt.network == layer.network
    assert len(rebuilt.cores) == 0
    assert {n for n, _ in rebuilt.named_parameters() if n.startswith("weight.")}


@pytest.mark.parametrize(
    ("factorization", "rank"), [("CP", 3), ("Tucker", (2, 3, 2, 4)), ("TT", (1, 2, 3, 2, 1))]
)
def test_layer_from_a_tltorch_tensor_computes_eq1(factorization, rank):
    with thread_backend("pytorch"):
        tensor = tltorch.FactorizedTensor.new((6, 3, 9, 5), rank=rank, factorization=factorization)
        tensor.normal_(0, 0.5)
        full = tensor.to_tensor().detach()
    layer = FactorizedMuMoE(tensor, normalization="ln")
    randomise(layer.gate, scale=0.5)
    # the tensor's parameters are the layer's own
    assert any(p is tensor.factors[0] for p in layer.parameters())
    x = torch.randn(4, 8)
    y, gates = layer(x, return_gates=True)
    expected = dense_forward(full, x, gates, bias=True)
    torch.testing.assert_close(y.double(), torch.from_numpy(expected), rtol=1e-4, atol=1e-5)


def test_paper_init_in_place():
    with thread_backend("pytorch"):
        tensor = tltorch.FactorizedTensor.new((16, 9, 4), rank=5, factorization="CP")
        untouched = tltorch.FactorizedTensor.new((16, 9, 4), rank=5, factorization="CP")
        untouched.normal_(0, 3.0)
    layer = FactorizedMuMoE(tensor, init=True)
    assert layer.init_scheme == "cp"
    assert torch.equal(tensor.weights, torch.ones(5))
    assert tensor.factors[1].abs().max() <= (1 / 8) ** 0.5
    before = untouched.factors[0].detach().clone()
    FactorizedMuMoE(untouched)
    assert torch.equal(untouched.factors[0], before)


def test_a_factorized_layer_is_edited_in_a_block_but_not_for_good():
    from mumoe.nn import edit_experts, edit_experts_

    with thread_backend("pytorch"):
        tensor = tltorch.FactorizedTensor.new((4, 7, 3), rank=2, factorization="CP")
    layer = FactorizedMuMoE(tensor, init=True).eval()
    with edit_experts(layer, [0.0] * 4):
        assert torch.all(layer(torch.randn(5, 6)) == 0)
    with pytest.raises(TypeError, match="FactorizedMuMoE does not own its cores"):
        edit_experts_(layer, [0.0] * 4)


def test_tensor_dropout_acts_on_the_layer():
    torch.manual_seed(0)
    layer = randomise(
        FactorizedMuMoE(to_factorized_tensor(CPMuMoE(8, 5, expert_dims=6, rank=16))), scale=0.5
    )
    x = torch.randn(4, 8)
    layer.eval()
    reference = layer(x)
    tltorch.tensor_dropout(layer.weight, p=0.5)
    torch.testing.assert_close(layer(x), reference)  # no dropout at test time
    layer.train()
    layer.gate.eval()  # keep batch-norm statistics out of the comparison
    assert not torch.allclose(layer(x), reference)
    tltorch.remove_tensor_dropout(layer.weight)
    layer.eval()
    torch.testing.assert_close(layer(x), reference)


def test_tensor_lasso_penalises_the_layer():
    layer = FactorizedMuMoE(to_factorized_tensor(CPMuMoE(8, 5, expert_dims=6, rank=4)))
    lasso = tltorch.tensor_lasso(factorization="cp", penalty=0.1)
    lasso.apply(layer.weight)
    layer(torch.randn(4, 8)).sum().backward()
    assert lasso.loss > 0
    assert layer.weight.weights.grad is not None


def test_tltorch_initialisers_change_the_layer():
    layer = FactorizedMuMoE(to_factorized_tensor(TuckerMuMoE(8, 5, expert_dims=6, rank=3))).eval()
    x = torch.randn(3, 8)
    before = layer(x)
    with thread_backend("pytorch"):
        layer.weight.normal_(0, 0.1)
    assert not torch.allclose(layer(x), before)


def test_unsupported_tensors_and_networks():
    with pytest.raises(TypeError, match="tensorly-torch has CP, Tucker and TT tensors"):
        to_factorized_tensor(TRMuMoE(8, 5, expert_dims=6, rank=2))
    with thread_backend("pytorch"):
        dense = tltorch.FactorizedTensor.new((6, 9, 5), rank=None, factorization="Dense")
        flat = tltorch.FactorizedTensor.new((9, 5), rank=2, factorization="CP")
    with pytest.raises(TypeError, match="DenseTensor is not supported"):
        network_of(dense)
    with pytest.raises(ValueError, match=r"shape \(N_1, \.\.\., N_E, I', O\) with E >= 1"):
        network_of(flat)


def test_bias_flag_sets_the_input_size():
    with thread_backend("pytorch"):
        tensor = tltorch.FactorizedTensor.new((6, 9, 5), rank=2, factorization="CP")
    assert network_of(tensor, bias=True).in_features == 8
    assert network_of(tensor, bias=False).in_features == 9


def test_layers_run_without_the_pytorch_backend_and_leave_it_alone():
    assert tl.get_backend() == "numpy"
    layer = FactorizedMuMoE(to_factorized_tensor(CPMuMoE(8, 5, expert_dims=6, rank=4)))
    layer(torch.randn(3, 8))
    assert tl.get_backend() == "numpy"


@pytest.mark.parametrize(
    ("in_shape", "out_shape", "rank"),
    [
        ((4, 3), (3, 2), (1, 3, 1)),
        ((2, 3, 2), (3, 1, 2), (1, 2, 4, 1)),
        ((6, 2), (5, 3), (1, 4, 1)),
    ],
)
def test_a_tt_matrix_layer_is_tltorchs_blocktt_linear_from_the_same_factors(
    in_shape, out_shape, rank
):
    # One expert, no bias: tltorch's factors (r, O_k, I_k, r') are the TT-matrix cores
    # (r, I_k, O_k, r') with the legs swapped; the expert core is the 1 x 1 identity.
    torch.manual_seed(0)
    with preserved_backend():
        linear = tltorch.FactorizedLinear(
            in_shape, out_shape, bias=False, factorization="blocktt", rank=rank
        ).double()
    layer = TTMatrixMuMoE(
        math.prod(in_shape),
        math.prod(out_shape),
        expert_dims=1,
        rank=(1, *rank[1:-1]),
        bias=False,
        in_shape=in_shape,
        out_shape=out_shape,
        gated=False,
        dtype=torch.float64,
    )
    factors = [factor.detach() for factor in linear.weight.factors]
    with torch.no_grad():
        layer.cores[0].fill_(1.0)
        for core, factor in zip(layer.cores[1:], factors, strict=True):
            swapped = factor.transpose(1, 2)
            core.copy_(swapped.reshape(core.shape))
    x = torch.randn(7, math.prod(in_shape), dtype=torch.float64)
    y = layer(x, [torch.ones(7, 1, dtype=torch.float64)])
    with thread_backend("pytorch"):  # tltorch contracts with TensorLy's backend
        expected = linear(x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_export_refuses_a_layer_that_splits_its_input():
    layer = CPMuMoE(24, 12, expert_dims=4, rank=3, in_shape=(6, 4))
    with pytest.raises(TypeError, match=r"splits its input or output"):
        to_factorized_tensor(layer)
