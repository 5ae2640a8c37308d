"""Sparse gates executed sparsely: the same numbers and gradients as the dense path.

A level given as its support (:class:`mumoe.SparseGate`) is contracted by gathering the
rows of its core; these tests hold that path to the oracle (Eq. 1 over the materialised
W, with the support's dense coefficients), to the dense path's gradients, and hold the
gate step's supports (top-k, ReLU-top-k, sparsified entmax-1.5 and sparsemax) to the
dense activations, ties at the top-k boundary and whole-row supports included.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import SparseGate, cp, describe, forward, materialize, mxd, planner_of
from mumoe.functional import densify
from mumoe.gates import (
    entmax15,
    relu_topk,
    relu_topk_support,
    sparsemax,
    sparsify,
    topk,
    topk_support,
)
from mumoe.plan import Planner, check_crossover, sparse_layout
from mumoe.testing import (
    assert_close,
    batch_shapes,
    dense_forward,
    n_terms,
    networks,
    random_inputs,
    seeds,
)
from tests.helpers import use_backend

ALWAYS = 1.0  # a planner crossover that contracts every support sparsely


def support_of(rng, batch_shape, n, k):
    """A support of ``k`` distinct experts a row, values in [0, 1] (some exactly 0)."""
    rows = int(np.prod(batch_shape, dtype=int))
    indices = np.argsort(rng.uniform(size=(rows, n)), axis=-1)[:, :k]
    values = rng.uniform(size=(rows, k)) * (rng.uniform(size=(rows, k)) > 0.2)
    return SparseGate(
        indices.reshape(*batch_shape, k), values.reshape(*batch_shape, k).astype(float), n
    )


@given(networks(), batch_shapes(), seeds(), st.data())
def test_sparse_forward_equals_the_oracle(net, batch_shape, seed, data):
    # Any network, any mix of sparse and dense levels, supports from one entry to the row.
    rng = np.random.RandomState(seed)
    cores = [tl.tensor(rng.uniform(-1, 1, shape)) for shape in net.core_shapes]
    x, dense = random_inputs(net, batch_shape, random_state=rng)
    gates = []
    for e, n in enumerate(net.expert_dims):
        if data.draw(st.booleans(), label=f"level {e} sparse"):
            gates.append(support_of(rng, batch_shape, n, data.draw(st.integers(1, n))))
        else:
            gates.append(dense[e])
    y = forward(net, cores, x, gates, planner=Planner(net, crossover=ALWAYS))
    expected = dense_forward(materialize(net, cores), x, [densify(g) for g in gates], net.bias)
    assert_close(y, expected, "float64", scale=n_terms(net))


@given(networks(max_levels=2), seeds())
def test_a_support_over_the_crossover_is_made_dense_with_the_same_result(net, seed):
    rng = np.random.RandomState(seed)
    cores = [tl.tensor(rng.uniform(-1, 1, shape)) for shape in net.core_shapes]
    x, _ = random_inputs(net, (3,), random_state=rng)
    gates = [support_of(rng, (3,), n, n) for n in net.expert_dims]
    sparse = forward(net, cores, x, gates, planner=Planner(net, crossover=ALWAYS))
    dense = forward(net, cores, x, gates, planner=Planner(net, crossover=0.0))
    assert_close(sparse, dense, "float64", scale=n_terms(net))


def test_every_preset_fuses_its_expert_legs_and_hyperedges_are_gathered():
    from mumoe import dense, lowrank, tr, tt, tucker

    for net in (
        cp(4, 3, expert_dims=(5, 6), rank=2),
        tt(4, 3, expert_dims=(5, 6), rank=2),
        tr(4, 3, expert_dims=(5, 6), rank=2),
        tucker(4, 3, expert_dims=(5, 6), rank=2),
        mxd(4, 3, expert_dims=(5, 6)),
    ):
        layout = sparse_layout(net, (0, 1))
        assert {e for _, e, _ in layout.fused} == {0, 1} and not layout.gathered, net.format
    assert sparse_layout(lowrank(4, 3, expert_dims=5, rank=2), (0,)).value_levels == (0,)
    both = sparse_layout(dense(4, 3, expert_dims=(5, 6)), (0, 1))  # one core, two legs
    assert both.gathered == ((0, ((0, 0), (1, 1))),) and not both.fused


# ------------------------------------------------------------------- gate supports

rows_of_logits = st.tuples(
    st.integers(1, 5), st.integers(2, 40), st.floats(0.1, 10.0), st.booleans(), seeds()
)


def draw_logits(rows, n, scale, ties, seed):
    z = np.random.default_rng(seed).standard_normal((rows, n)) * scale
    if ties:  # integer logits tie often; the first row ties throughout (a zero gate)
        z = np.round(z)
        z[0] = 1.0
    return z


@given(rows_of_logits, st.data())
def test_topk_supports_stand_for_exactly_the_dense_gates(case, data):
    z = draw_logits(*case)
    k = data.draw(st.integers(1, z.shape[1]))
    for support, dense in ((topk_support, topk), (relu_topk_support, relu_topk)):
        gate = support(z, k)
        np.testing.assert_allclose(densify(gate), dense(z, k), rtol=1e-12, atol=1e-15)
        if isinstance(gate, SparseGate):
            assert gate.k >= min(k, z.shape[1])  # wider only where ties cross the boundary


@given(rows_of_logits)
def test_sparsified_entmax_and_sparsemax_stand_for_exactly_their_output(case):
    z = draw_logits(*case)
    for activation in (entmax15, sparsemax):
        p = activation(z)
        gate = sparsify(p)
        assert isinstance(gate, SparseGate)
        assert gate.k == int((p != 0).sum(-1).max())
        np.testing.assert_array_equal(densify(gate), p)


def test_a_whole_row_support_and_nan_rows_are_kept_as_the_dense_gate():
    z = np.array([[1.0, 1.0, 1.0, 1.0], [3.0, np.nan, 0.0, 1.0], [np.inf, 0.0, 1.0, 2.0]])
    with np.errstate(invalid="ignore"):  # inf - inf and NaN, as in the dense gate
        gate, dense = topk_support(z, 2), topk(z, 2)
    np.testing.assert_array_equal(densify(gate), dense)  # NaN where topk has NaN
    assert np.isnan(densify(gate)[1:]).all() and gate.k == 4
    assert sparsify(np.full((2, 8), 0.125), max_density=0.5).shape == (2, 8)  # stays dense


# ------------------------------------------------------------------- bad input


def gate_case(**changes):
    net = cp(3, 2, expert_dims=6, rank=2)
    parts = {"indices": np.array([[0, 5]]), "values": np.array([[0.5, 0.5]]), "n": 6}
    parts.update(changes)
    gate = SparseGate(parts["indices"], parts["values"], parts["n"])
    return net, [np.ones(s) for s in net.core_shapes], np.ones((1, 3)), gate


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"indices": np.array([[0, 6]])}, ValueError, r"in \[0, 6\), got values from 0 to 6"),
        ({"indices": np.array([[-1, 2]])}, ValueError, r"from -1 to 2"),
        ({"n": 5}, ValueError, "a support over 5 experts, but n1 has 6"),
        ({"indices": np.array([[0.0, 1.0]])}, TypeError, "must be integers"),
        ({"indices": np.array([[0]])}, ValueError, r"indices \(1, 1\) and values \(1, 2\)"),
        (
            {"indices": np.zeros((1, 0), int), "values": np.zeros((1, 0))},
            ValueError,
            "empty support",
        ),
        ({"values": np.array([[0.5, 0.5]], dtype=np.float32)}, TypeError, "float32"),
    ],
)
def test_bad_supports_are_refused_with_what_was_expected(changes, error, match):
    net, cores, x, gate = gate_case(**changes)
    with pytest.raises(error, match=match):
        forward(net, cores, x, gate, planner=Planner(net, crossover=ALWAYS))


@pytest.mark.parametrize(
    ("crossover", "error"),
    [
        (1.5, ValueError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        (True, TypeError),
        ("auto", TypeError),
    ],
)
def test_a_nonsense_crossover_is_refused(crossover, error):
    with pytest.raises(error, match="crossover"):
        Planner(cp(3, 2, expert_dims=6, rank=2), crossover=crossover)
    with pytest.raises(error, match="crossover"):
        check_crossover(crossover)


def test_describe_says_which_levels_go_sparse_and_why():
    net = cp(16, 8, expert_dims=(4096, 4), rank=4)
    text = describe(net, batch_size=64, support=(16, 2), backend="numpy")
    assert "n1: k = 16 of 4,096 (k/N = 0.0039 <= crossover" in text
    assert "sparse, core 0 gathered and summed" in text
    assert "n2: k = 2 of 4 (k/N = 0.5000 > crossover" in text and "dense, the support" in text
    assert "fewer than the dense path's" in text
    with pytest.raises(ValueError, match="support must give a positive number"):
        describe(net, support=(16,))


def test_the_planner_caches_sparse_plans_per_levels_and_keeps_fused_k_out_of_the_key():
    net = cp(8, 4, expert_dims=256, rank=3)
    planner = planner_of(net, crossover=ALWAYS)
    cores = [np.ones(s) for s in net.core_shapes]
    x = np.ones((5, 8))
    for k in (1, 3, 7):
        gate = SparseGate(np.tile(np.arange(k), (5, 1)), np.ones((5, k)), 256)
        forward(net, cores, x, gate, planner=planner)
    keys = [key for key in planner.cache.keys() if key[0] == "sparse"]
    assert len(keys) == 1


# ------------------------------------------------------------------- torch

torch = pytest.importorskip("torch", reason="gradients and the torch kernels need torch")

from mumoe.nn import TORCH_KERNELS, MuMoE, MuMoEBlock  # noqa: E402
from mumoe.nn import entmax15 as torch_entmax15  # noqa: E402
from mumoe.nn import sparsemax as torch_sparsemax  # noqa: E402


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
        16,
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
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)  # 8 of 2,048: within every crossover
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
