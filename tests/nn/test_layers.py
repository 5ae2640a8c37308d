"""PyTorch layers: Eq. 1 with the module's own gates, torch conventions, init, errors."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

from mumoe import Network, cp
from mumoe.nn import (
    CPMuMoE,
    MuMoE,
    MuMoEBlock,
    MuMoEGate,
    TRMuMoE,
    TTMuMoE,
    TuckerMuMoE,
    record_gates,
)
from mumoe.spec import gate_params, linear_params
from mumoe.testing import assert_close, dense_forward, n_terms, networks
from tests.helpers import randomise


@settings(max_examples=40)
@given(networks(), st.sampled_from([(5,), (3, 4)]), st.sampled_from(["bn", "ln", None]))
def test_module_equals_eq1_with_its_own_gates(net, batch_shape, normalization):
    layer = MuMoE(
        net.in_features,
        net.out_features,
        net,
        bias=net.bias,
        normalization=normalization,
        dtype=torch.float64,
    )
    randomise(layer)
    x = torch.rand(*batch_shape, net.in_features, dtype=torch.float64) * 2 - 1
    y, gates = layer(x, return_gates=True)
    assert y.shape == (*batch_shape, net.out_features)
    assert [tuple(a.shape) for a in gates] == [(*batch_shape, n) for n in net.expert_dims]
    expected = dense_forward(layer.materialize(), x, gates, net.bias)
    assert_close(y, expected, "float64", scale=n_terms(net))


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: CPMuMoE(12, 5, expert_dims=(4, 3), rank=3, **kw),
        lambda **kw: TuckerMuMoE(12, 5, expert_dims=4, rank=(2, 3, 2), **kw),
        lambda **kw: TTMuMoE(12, 5, expert_dims=(4, 3, 2), rank=2, **kw),
        lambda **kw: TRMuMoE(12, 5, expert_dims=4, rank=(2, 3, 2), **kw),
        lambda **kw: MuMoE(12, 5, "dense", expert_dims=4, **kw),
        lambda **kw: MuMoE(12, 5, "n1 a, a n2 b, i b c, o c", expert_dims=(4, 3), rank=2, **kw),
        lambda **kw: MuMoE(12, 5, "mxd", expert_dims=(4, 3), **kw),
        lambda **kw: MuMoE(12, 5, "n i r, n o r", expert_dims=4, rank=2, **kw),
    ],
    ids=["cp", "tucker", "tt", "tr", "dense", "custom", "mxd", "lowrank"],
)
class TestTorchConventions:
    def test_state_dict_round_trip(self, build):
        layer = randomise(build())
        layer.train()
        layer(torch.randn(8, 12))  # moves the batch-norm statistics
        clone = build()
        clone.load_state_dict(layer.state_dict())
        x = torch.randn(6, 12)
        layer.eval(), clone.eval()
        torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)

    def test_to_dtype_and_device(self, build):
        layer = build().to(torch.float64)
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        assert layer(torch.randn(3, 12, dtype=torch.float64)).dtype == torch.float64
        layer = build(dtype=torch.float64, device="cpu")
        assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in layer.parameters())

    def test_gradients_reach_every_parameter(self, build):
        # Randomised: at the paper's init the experts of levels > 1 are identical,
        # so those gates get their first gradient only once the cores have moved.
        layer = randomise(build())
        layer(torch.randn(16, 12)).square().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name

    @pytest.mark.parametrize("mode", ["train", "eval"])
    def test_gradcheck_through_parameters_and_input(self, build, mode):
        layer = randomise(build(dtype=torch.float64, activation="softmax"), scale=0.5)
        layer.train(mode == "train")
        names = [n for n, _ in layer.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
        x = torch.randn(6, 12, dtype=torch.float64, requires_grad=True)

        def fn(x, *params):
            return functional_call(layer, dict(zip(names, params, strict=True)), (x,))

        assert torch.autograd.gradcheck(fn, (x, *params), fast_mode=True)

    def test_gradcheck_through_given_gates(self, build):
        layer = randomise(build(dtype=torch.float64), scale=0.5)
        x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
        gates = [
            torch.rand(3, n, dtype=torch.float64, requires_grad=True)
            for n in layer.network.expert_dims
        ]
        assert torch.autograd.gradcheck(
            lambda x, *g: layer(x, list(g)), (x, *gates), fast_mode=True
        )

    def test_extra_repr(self, build):
        text = repr(build())
        assert "in_features=12, out_features=5" in text
        assert "params=" in text and "spec=" in text


@pytest.mark.slow
def test_torch_compile_gives_the_same_output():
    layer = randomise(CPMuMoE(12, 5, expert_dims=(4, 3), rank=3)).eval()
    x = torch.randn(7, 12)
    # Dynamo's and AOTAutograd's tracing through the layer; codegen is torch's own concern.
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["softmax", "topk"])
def test_torch_compile_fullgraph_traces_the_whole_layer(activation):
    # Issue #26, item 12: fullgraph=True failed at the plan cache's lock (and at TensorLy's
    # backend import, and at top-k's data-dependent tie branch).  The plan of each batch
    # size comes from an eager call: a path search is not traceable.
    import torch._dynamo

    options = {"top_k": 2} if activation == "topk" else {}
    layer = randomise(
        MuMoE(12, 5, "tucker", expert_dims=(4, 3), rank=2, activation=activation, **options)
    ).eval()
    x = torch.randn(7, 12)
    with torch.no_grad():
        expected = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
    x.requires_grad_(True)
    compiled(x).sum().backward()  # training traces too
    assert x.grad is not None


def test_batch_norm_train_and_eval():
    layer = randomise(CPMuMoE(12, 5, expert_dims=8, rank=3))
    norm = layer.gate.norms[0]
    x = torch.randn(32, 12) * 3 + 1
    layer.train()
    layer(x)
    assert norm.num_batches_tracked == 1
    stats = norm.running_mean.clone()
    assert stats.abs().sum() > 0
    layer.eval()
    y_eval = layer(x)
    assert norm.num_batches_tracked == 1
    torch.testing.assert_close(norm.running_mean, stats)
    # eval: a sample's output does not depend on the rest of its batch
    torch.testing.assert_close(layer(x[:1]), y_eval[:1])
    layer.train()
    assert not torch.allclose(layer(x[:4]), y_eval[:4])


def test_batch_norm_statistics_span_batch_and_tokens():
    gate = MuMoEGate(6, (5,), normalization="bn")
    with torch.no_grad():
        gate.projections[0].copy_(torch.randn(6, 5))
    x = torch.randn(4, 7, 6)
    gate(x)
    expected = (x.reshape(-1, 6) @ gate.projections[0]).mean(0) * gate.norms[0].momentum
    torch.testing.assert_close(gate.norms[0].running_mean, expected)


def test_caller_gates_replace_the_layers_gate():
    layer = randomise(CPMuMoE(12, 5, expert_dims=(4, 3), rank=3))
    x = torch.randn(2, 12)
    gates = [torch.softmax(torch.randn(2, 4), -1), torch.softmax(torch.randn(2, 3), -1)]
    y, used = layer(x, gates, return_gates=True)
    assert used[0] is gates[0]
    assert not torch.allclose(y, layer(x))


def test_activations_by_name_and_callable():
    x = torch.randn(5, 12)
    for activation in ("entmax15", "sparsemax", "softmax", lambda t: torch.softmax(2 * t, -1)):
        layer = randomise(CPMuMoE(12, 5, expert_dims=8, rank=3, activation=activation))
        _, (a,) = layer(x, return_gates=True)
        torch.testing.assert_close(a.sum(-1), torch.ones(5))
        assert (a >= 0).all()
    sparse = randomise(CPMuMoE(12, 5, expert_dims=64, rank=3, activation="sparsemax"), scale=3.0)
    _, (a,) = sparse(x, return_gates=True)
    assert (a == 0).any()  # sparse gating selects a subset of experts


def test_input_norm_applies_to_the_contraction_not_the_gates():
    layer = randomise(CPMuMoE(12, 5, expert_dims=4, rank=3, input_norm=True)).eval()
    x = torch.randn(3, 12) * 5 + 2
    y, gates = layer(x, return_gates=True)
    plain = MuMoE(12, 5, layer.network, gated=False)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if k.startswith("cores")})
    torch.testing.assert_close(y, plain(layer.input_norm(x), gates))


def test_record_gates_is_detached_and_removes_its_hooks():
    block = randomise(MuMoEBlock(12, 20, network="cp", expert_dims=(4, 3), rank=3))
    x = torch.randn(5, 12)
    with record_gates(block) as record:
        _, gates = block(x, return_gates=True)
    assert list(record) == ["gate"]
    for recorded, used in zip(record["gate"], gates, strict=True):
        assert not recorded.requires_grad
        torch.testing.assert_close(recorded, used.detach())
    assert not block.gate._forward_hooks
    assert not any(isinstance(v, torch.Tensor) for v in vars(block).values())


def test_block_uses_one_gate_for_both_layers():
    block = randomise(MuMoEBlock(12, 20, 7, network="tr", expert_dims=4, rank=2)).eval()
    x = torch.randn(3, 2, 12)
    y, gates = block(x, return_gates=True)
    assert y.shape == (3, 2, 7)
    manual = block.fc2(torch.nn.functional.gelu(block.fc1(x, gates)), gates)
    torch.testing.assert_close(y, manual)
    assert block.fc1.gate is None and block.fc2.gate is None


def test_modules_leave_the_tensorly_backend_alone():
    assert tl.get_backend() == "numpy"
    CPMuMoE(12, 5, expert_dims=4, rank=3)(torch.randn(2, 12))
    assert tl.get_backend() == "numpy"
    seen = []

    def other_thread():
        seen.append(tl.get_backend())

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == ["numpy"]


# --------------------------------------------------------------- matching


@pytest.mark.parametrize("format", ["cp", "tucker", "tt", "tr"])
@pytest.mark.parametrize("experts", [8, (16, 4), 64])
def test_rank_same_matches_the_linear_layer(format, experts):
    layer = MuMoE(256, 100, format, expert_dims=experts, rank="same")
    total = sum(p.numel() for p in layer.parameters())
    budget = linear_params(256, 100)
    assert total <= budget
    # one more unit of the free rank would exceed the budget
    net = layer.network
    free = {"cp": "r", "tucker": "ri", "tt": f"r{net.n_levels + 1}", "tr": f"r{net.n_levels + 1}"}
    bigger = dict(net.ranks)
    bigger[free[format]] += 1
    if format == "tucker":
        bigger["ro"] += 1
    grown = Network(net.spec, 256, 100, expert_dims=net.expert_dims, rank=bigger)
    assert grown.n_params + gate_params(256, net.expert_dims) > budget


def test_fractional_budget():
    from mumoe import Budget

    half = CPMuMoE(96, 40, expert_dims=8, rank=Budget(0.5))
    full = CPMuMoE(96, 40, expert_dims=8, rank="same")
    assert half.network.ranks["r"] < full.network.ranks["r"]
    assert sum(p.numel() for p in half.parameters()) <= 0.5 * linear_params(96, 40)
    counted = CPMuMoE(96, 40, expert_dims=8, rank=Budget(params=2000))
    assert sum(p.numel() for p in counted.parameters()) <= 2000
    with pytest.raises(TypeError, match=r"is mumoe.Budget\(0.5\)"):
        CPMuMoE(96, 40, expert_dims=8, rank=0.5)
    with pytest.raises(ValueError, match="give exactly one"):
        Budget(0.5, params=10)
    with pytest.raises(ValueError, match="positive and finite"):
        Budget(float("nan"))


# ------------------------------------------------------------------- init


def test_cp_init_follows_the_paper():
    torch.manual_seed(0)
    layer = CPMuMoE(256, 300, expert_dims=(512, 4), rank=200)
    first, second, inp, out = layer.cores
    assert abs(first.mean().item() - 1) < 0.02 and abs(first.var().item() - 1) < 0.02
    assert torch.equal(second, torch.ones_like(second))
    assert inp.abs().max() <= math.sqrt(1 / 256) and inp.abs().max() > 0.9 * math.sqrt(1 / 256)
    assert out.abs().max() <= math.sqrt(1 / 200) and out.abs().max() > 0.9 * math.sqrt(1 / 200)
    assert layer.init_scheme == "cp"


@pytest.mark.parametrize("n_levels", [1, 2])
def test_tr_init_gives_diagonal_expert_slices(n_levels):
    torch.manual_seed(0)
    layer = TRMuMoE(32, 20, expert_dims=(6,) * n_levels, rank=(3, 3, 5, 4)[: n_levels + 2])
    for level in range(n_levels):
        core = layer.cores[level]
        eye = torch.eye(core.shape[0], core.shape[2], dtype=torch.bool)
        for k in range(core.shape[1]):
            assert torch.all(core[:, k, :][~eye] == 0)
        if level > 0:
            assert torch.all(core[:, :, :].diagonal(dim1=0, dim2=2) == 1)
    inp = layer.cores[-2]
    assert inp.abs().max() <= math.sqrt(1 / 32)
    out = layer.cores[-1]
    assert out.abs().max() <= math.sqrt(1 / (out.shape[0] * out.shape[2]))


@pytest.mark.parametrize(
    "build",
    [
        lambda: TuckerMuMoE(64, 48, expert_dims=(12, 3), rank=(6, 3, 10, 10)),
        lambda: MuMoE(64, 48, "n1 a, a n2 b, i b c, o c", expert_dims=(12, 3), rank=4),
        lambda: MuMoE(64, 48, "dense", expert_dims=12),
    ],
    ids=["tucker", "custom", "dense"],
)
def test_expert_matrices_start_with_the_variance_of_a_linear_layer(build):
    torch.manual_seed(0)
    values = torch.cat([build().materialize()[..., :64, :].flatten() for _ in range(20)])
    assert abs(values.var().item() * 3 * 64 - 1) < 0.15


def test_tt_init_is_the_tr_scheme_with_boundary_ranks_one():
    torch.manual_seed(0)
    layer = TTMuMoE(32, 20, expert_dims=6, rank=(3, 4))
    first = layer.cores[0]  # (N, r1): diagonal of eye(1, r1) -> only column 0
    assert torch.all(first[:, 1:] == 0)
    assert layer.init_scheme == "tt"


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: CPMuMoE(12, 5, expert_dims=4, rank=3)(torch.randn(2, 11)),
            ValueError,
            r"input must have shape \(\.\.\., 12\) \(in_features\), got \(2, 11\)",
        ),
        (
            lambda: CPMuMoE(12, 5, expert_dims=4, rank=3)(np.zeros((2, 12))),
            TypeError,
            r"input must be a torch.Tensor, got ndarray",
        ),
        (
            lambda: CPMuMoE(12, 5, expert_dims=(4, 3), rank=3)(
                torch.randn(2, 12), [torch.rand(2, 4)]
            ),
            ValueError,
            r"network has 2 expert level\(s\) \(n1, n2\) but 1 gate tensor\(s\)",
        ),
        (
            lambda: CPMuMoE(12, 5, expert_dims=(4, 3), rank=3)(
                torch.randn(2, 12), [torch.rand(2, 4), torch.rand(2, 5)]
            ),
            ValueError,
            r"gates\[1\] must have shape \(2, 3\) .* got \(2, 5\)",
        ),
        (
            lambda: CPMuMoE(12, 5, expert_dims=4, rank=3)(
                torch.randn(2, 12), [torch.rand(2, 4).double()]
            ),
            TypeError,
            r"gates\[0\] has dtype float64 but x has float32",
        ),
        (
            lambda: CPMuMoE(12, 5, expert_dims=512, rank="same"),
            ValueError,
            r"no cp rank fits a budget of 65 parameters: at rank 1 the layer already has 6,674 "
            r"\(6,144 of them the gate's\)",
        ),
        (
            lambda: TRMuMoE(12, 5, expert_dims=4, rank=(2, 3, 2, 5)),
            ValueError,
            r"TR ranks must close the ring: rank\[-1\]=5 != rank\[0\]=2",
        ),
        (lambda: MuMoE(12, 5, "cp", rank=3), ValueError, r"network 'cp' needs expert_dims"),
        (lambda: MuMoE(12, 5, "tr", expert_dims=4), ValueError, r"the tr network needs a rank"),
        (
            lambda: MuMoE(12, 5, "dense", expert_dims=4, rank=3),
            ValueError,
            r"the dense format has no rank",
        ),
        (
            lambda: MuMoE(12, 5, cp(12, 6, expert_dims=4, rank=2)),
            ValueError,
            r"network has in_features=12, out_features=6, but the layer was given 12, 5",
        ),
        (
            lambda: MuMoE(12, 5, cp(12, 5, expert_dims=4, rank=2), rank=3),
            ValueError,
            r"expert_dims and rank come from the Network",
        ),
        (
            lambda: MuMoE(12, 5, "n i r, r o", expert_dims=4, rank="same"),
            ValueError,
            r"a parameter budget \('same' or a mumoe.Budget\) chooses the rank of a format only",
        ),
        (lambda: MuMoE(12, 5, 3), TypeError, r"network must be a Network, a format name"),
        (
            lambda: CPMuMoE(12, 5, expert_dims=4, rank=3, normalization="batch"),
            ValueError,
            r"unknown gate normalization 'batch'; choose 'bn', 'ln' or None",
        ),
        (
            lambda: CPMuMoE(12, 5, expert_dims=4, rank=3, activation="relu"),
            ValueError,
            r"unknown gate activation 'relu'; choose one of 'entmax15', 'sparsemax', 'softmax'",
        ),
        (
            lambda: MuMoE(12, 5, cp(12, 5, expert_dims=4, rank=2), gated=False)(torch.randn(2, 12)),
            ValueError,
            r"this layer has no gate \(gated=False\): pass gates to the call",
        ),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_materialize_and_expert_weight_agree():
    layer = randomise(TRMuMoE(12, 5, expert_dims=(4, 3), rank=2), seed=3)
    weight = layer.materialize()
    assert weight.shape == (4, 3, 13, 5)
    expert = layer.expert_weight((2, 1))
    torch.testing.assert_close(expert.weight, weight[2, 1, :12])
    torch.testing.assert_close(expert.bias, weight[2, 1, 12])


def test_learning_reaches_the_loss_of_an_equal_size_linear_model():
    """A μMoE head learns: on a task with two regimes it beats a linear model of equal size."""
    torch.manual_seed(0)
    n, d, o = 1024, 32, 8
    x = torch.randn(n, d)
    # Regime k = [x_0 > 0] maps x to (v_k . x) w_k: one rank-1 map per regime.
    v, w = torch.randn(2, d), torch.randn(2, o)
    regime = (x[:, 0] > 0).long()
    y = (x * v[regime]).sum(-1, keepdim=True) * w[regime]

    def train(model, steps=400):
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x), y).item()

    layer = CPMuMoE(d, o, expert_dims=2, rank="same")
    linear = torch.nn.Linear(d, o)
    n_layer = sum(p.numel() for p in layer.parameters())
    assert n_layer <= sum(p.numel() for p in linear.parameters()) == linear_params(d, o)
    moe_loss, linear_loss = train(layer), train(linear)
    assert moe_loss <= linear_loss
    assert moe_loss < 0.5 * linear_loss


@settings(max_examples=30)
@given(
    st.integers(1, 300),
    st.integers(1, 6),
    st.floats(0.1, 8.0),
    st.booleans(),
    st.integers(0, 2**31),
)
def test_partial_sort_gates_equal_the_full_sort(n, rows, scale, ties, seed):
    """The gate's entmax-1.5 / sparsemax (a window of the largest, widened) equal the full sort."""
    from entmax import entmax15, sparsemax

    from mumoe.nn import TORCH_KERNELS

    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, n, generator=generator, dtype=torch.float64) * scale
    if ties:  # many equal logits, the support crossing the top-k boundary
        logits = logits.round()
    logits.requires_grad_()
    for name, full in (("entmax15", entmax15), ("sparsemax", sparsemax)):
        ours = TORCH_KERNELS[name](logits)
        reference = full(logits, dim=-1)
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
        weights = torch.randn(rows, n, generator=generator, dtype=torch.float64)
        (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
        (g_ref,) = torch.autograd.grad((reference * weights).sum(), logits)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_top_k_gating_routes_each_token_to_k_experts_and_trains():
    torch.manual_seed(0)
    layer = MuMoE(12, 8, "n o, i o", expert_dims=16, activation="topk", top_k=2)
    torch.nn.init.normal_(layer.gate.projections[0])
    x = torch.randn(32, 12)
    with record_gates(layer) as record:
        layer(x).square().mean().backward()
    assert (torch.count_nonzero(record["gate"][0], -1) == 2).all()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    block = MuMoEBlock(12, 16, network="mxd", expert_dims=8, activation="topk", top_k=3)
    assert block.gate.top_k == 3 and "top_k=3" in repr(block)
    with pytest.raises(ValueError, match="activation='topk' needs top_k"):
        MuMoE(12, 8, "mxd", expert_dims=16, activation="topk")
    with pytest.raises(ValueError, match="top_k=2 is for activation='topk'"):
        MuMoE(12, 8, "mxd", expert_dims=16, top_k=2)


def test_relu_topk_gates_start_alive_and_keep_at_most_k():
    # Issue #27, item 1: MxD's TopK(ReLU(.)) gate.  A zero projection would leave every
    # expert off with no gradient: it starts as nn.Linear's weight does.
    from mumoe.nn import MuMoEGate

    torch.manual_seed(0)
    gate = MuMoEGate(16, (32,), normalization=None, activation="relu_topk", top_k=4)
    bound = 1 / 16**0.5
    assert gate.projections[0].abs().max() <= bound and gate.projections[0].abs().max() > 0
    x = torch.randn(64, 16)
    (a,) = gate(x)
    kept = torch.count_nonzero(a, -1)
    assert (kept <= 4).all() and (kept > 0).float().mean() > 0.9
    assert (a >= 0).all() and not torch.allclose(a.sum(-1), torch.ones(64))  # unnormalised
    a.sum().backward()
    assert gate.projections[0].grad.abs().sum() > 0
    assert "activation='relu_topk', top_k=4" in repr(gate)


def test_a_gate_bias_shifts_the_logits_and_is_counted_by_a_budget():
    # Issue #27, item 1: MxD's gate is TopK(ReLU(G x + b)).
    from mumoe.gates import gate_coefficients, resolve_activation
    from mumoe.nn import MuMoEGate
    from mumoe.spec import gate_params

    gate = MuMoEGate(8, (6, 3), normalization="ln", activation="softmax", bias=True).double()
    assert [tuple(b.shape) for b in gate.biases] == [(6,), (3,)]
    assert all(not b.any() for b in gate.biases)  # zero at the start
    with torch.no_grad():
        for b in (*gate.biases, *gate.projections):
            b.normal_()
    x = torch.randn(5, 8, dtype=torch.float64)
    expected = gate_coefficients(
        x.numpy(),
        [p.detach().numpy() for p in gate.projections],
        [lambda z: torch.nn.functional.layer_norm(torch.from_numpy(z), z.shape[-1:]).numpy()] * 2,
        resolve_activation("softmax"),
        biases=[b.detach().numpy() for b in gate.biases],
    )
    got = gate(x)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.detach().numpy(), b, rtol=1e-12)
    weights = [torch.randn(a.shape, dtype=torch.float64) for a in got]
    sum((a * w).sum() for a, w in zip(got, weights, strict=True)).backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in gate.biases)
    assert "bias=True" in repr(gate)
    with pytest.raises(ValueError, match="a gate bias is cancelled by batch normalization"):
        MuMoE(8, 4, "cp", expert_dims=6, rank=2, gate_bias=True)  # normalization="bn"
    # A budget counts the bias: the layer stays within nn.Linear's parameters.
    assert gate_params(8, (6, 3), bias=True) == gate_params(8, (6, 3)) + 9
    # 20 -> 32 with 16 experts: rank 5 fits nn.Linear's 672 parameters without the 16
    # biases, rank 4 with them.
    options = {"expert_dims": 16, "rank": "same", "normalization": None}
    assert MuMoE(20, 32, "cp", **options).network.ranks["r"] == 5
    layer = MuMoE(20, 32, "cp", gate_bias=True, **options)
    assert layer.network.ranks["r"] == 4
    assert sum(p.numel() for p in layer.parameters()) <= 21 * 32


def test_top_k_beyond_a_levels_experts_is_refused():
    # Issue #27, bad input: k larger than N.
    from mumoe.nn import MuMoEBlock, MuMoEGate

    with pytest.raises(ValueError, match=r"top_k=9 is more experts than level 1 has \(4\)"):
        MuMoEGate(8, (16, 4), activation="topk", top_k=9)
    with pytest.raises(ValueError, match="top_k=100 is more experts than level 0 has"):
        MuMoEBlock(
            8, 16, 8, "mxd", expert_dims=8, activation="relu_topk", top_k=100, normalization=None
        )
    assert MuMoEGate(8, (4,), activation="topk", top_k=4).top_k == 4  # k = N: every expert
