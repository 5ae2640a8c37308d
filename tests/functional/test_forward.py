"""The functional core against the oracle, Eq. (1) over the materialised W (NumPy, float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given
from hypothesis import strategies as st
from tensorly.tt_matrix import tt_matrix_to_tensor

from mumoe import (
    Network,
    cp,
    dense,
    expert_weight,
    flops,
    forward,
    materialize,
    planner_of,
    random_cores,
    scale_experts,
    tr,
    tt,
    tucker,
)
from mumoe.functional import matrix_form
from mumoe.plan import Planner
from mumoe.testing import (
    assert_close,
    batch_shapes,
    dense_forward,
    n_terms,
    networks,
    preset_networks,
    random_inputs,
    seeds,
)


def setup(net, batch_shape, seed):
    rng = np.random.RandomState(seed)
    cores = [tl.tensor(rng.uniform(-1, 1, shape)) for shape in net.core_shapes]
    x, gates = random_inputs(net, batch_shape, random_state=rng)
    return cores, x, gates


@given(networks(), batch_shapes(), seeds())
def test_forward_equals_eq1_over_materialized_weight(net, batch_shape, seed):
    cores, x, gates = setup(net, batch_shape, seed)
    y = forward(net, cores, x, gates)
    assert y.shape == (*batch_shape, net.out_features)
    expected = dense_forward(materialize(net, cores), x, gates, net.bias)
    assert_close(y, expected, "float64", scale=n_terms(net))


def to_tensorly(net, cores):
    """W in the network's legs (tensor_shape) from TensorLy's reconstructions of the presets."""
    if net.format == "cp":
        return tl.cp_to_tensor((tl.ones(net.ranks["r"]), list(cores)))
    if net.format == "tucker":
        return tl.tucker_to_tensor((cores[-1], list(cores[:-1])))
    if net.format == "tt":
        padded = list(cores)
        padded[0] = tl.reshape(cores[0], (1, *tl.shape(cores[0])))
        padded[-1] = tl.reshape(cores[-1], (*tl.shape(cores[-1]), 1))
        return tl.tt_to_tensor(padded)
    if net.format == "tr":
        return tl.tr_to_tensor(list(cores))
    if net.format == "ttm":  # the expert cores as TT-matrix cores with an output leg of size 1
        levels = net.n_levels
        padded = [tl.reshape(cores[0], (1, net.expert_dims[0], 1, -1))]
        padded += [tl.reshape(c, (c.shape[0], c.shape[1], 1, c.shape[2])) for c in cores[1:levels]]
        padded += list(cores[levels:])
        padded[-1] = tl.reshape(padded[-1], (*tl.shape(padded[-1]), 1))
        return tl.reshape(tt_matrix_to_tensor(padded), net.tensor_shape)
    host = [tl.to_numpy(c) for c in cores]
    k, outputs = len(net.input_legs), len(net.output_legs)
    if net.format == "mxd":  # no TensorLy form: the Hadamard product by broadcasting
        *experts, d = host
        weight = d.reshape((1,) * net.n_levels + d.shape)
        for e, c in enumerate(experts):
            shape = [1] * (net.n_levels + k + outputs)
            shape[e] = c.shape[0]
            shape[-outputs:] = c.shape[1:]
            weight = weight * c.reshape(shape)
        return weight
    if net.format == "lowrank":  # one U_n V_n^T per expert, by a batched matmul
        u, v = host
        lead = u.shape[: net.n_levels]
        u = u.reshape(*lead, -1, u.shape[-1])
        v = v.reshape(*lead, -1, v.shape[-1])
        return (u @ np.swapaxes(v, -1, -2)).reshape(net.tensor_shape)
    return cores[0]


@given(preset_networks(), seeds())
def test_materialize_equals_tensorly_reconstructions(net, seed):
    cores, _, _ = setup(net, (), seed)
    weight = materialize(net, cores)
    assert weight.shape == net.weight_shape
    expected = matrix_form(net, tl.tensor(to_tensorly(net, cores)))
    assert_close(weight, expected, "float64", scale=n_terms(net))


@given(networks(), batch_shapes(), seeds(), st.floats(-2, 2), st.floats(-2, 2))
def test_forward_is_linear_in_x_without_bias_and_affine_with(net, batch_shape, seed, a, b):
    cores, x1, gates = setup(net, batch_shape, seed)
    x2, _ = random_inputs(net, batch_shape, random_state=seed + 1)
    y1, y2 = forward(net, cores, x1, gates), forward(net, cores, x2, gates)
    if not net.bias:
        expected = a * y1 + b * y2
        actual = forward(net, cores, a * x1 + b * x2, gates)
    else:  # affine: combinations whose weights sum to one are preserved
        expected = a * y1 + (1 - a) * y2
        actual = forward(net, cores, a * x1 + (1 - a) * x2, gates)
    assert_close(actual, expected, "float64", scale=10 * n_terms(net))


@given(networks(), st.data(), seeds())
def test_one_hot_gates_give_that_experts_affine_map(net, data, seed):
    index = tuple(data.draw(st.integers(0, n - 1)) for n in net.expert_dims)
    cores, x, _ = setup(net, (3,), seed)
    gates = [
        tl.tensor(np.tile(np.eye(n)[k], (3, 1)))
        for n, k in zip(net.expert_dims, index, strict=True)
    ]
    y = forward(net, cores, x, gates)

    expert = expert_weight(net, cores, index)
    weight = materialize(net, cores)[index]
    assert_close(expert.weight, weight[: net.in_features], "float64", scale=n_terms(net))
    mapped = tl.dot(x, expert.weight)
    if net.bias:
        assert_close(expert.bias, weight[net.in_features], "float64", scale=n_terms(net))
        mapped = mapped + expert.bias
    else:
        assert expert.bias is None
    assert_close(y, mapped, "float64", scale=n_terms(net))


@given(networks(), st.data(), seeds())
def test_permuting_experts_leaves_output_unchanged(net, data, seed):
    cores, x, gates = setup(net, (4,), seed)
    level = data.draw(st.integers(0, net.n_levels - 1))
    leg = net.expert_legs[level]
    perm = np.array(data.draw(st.permutations(range(net.expert_dims[level]))))
    permuted_cores = []
    for core, legs in zip(cores, net.core_legs, strict=True):
        permuted_cores.append(np.take(core, perm, axis=legs.index(leg)) if leg in legs else core)
    permuted_gates = list(gates)
    permuted_gates[level] = gates[level][:, perm]
    assert_close(
        forward(net, permuted_cores, x, permuted_gates),
        forward(net, cores, x, gates),
        "float64",
        scale=n_terms(net),
    )


@given(networks(), batch_shapes(), seeds())
def test_cached_plan_gives_the_same_result_as_a_fresh_one(net, batch_shape, seed):
    cores, x, gates = setup(net, batch_shape, seed)
    first = forward(net, cores, x, gates)
    cached = forward(net, cores, x, gates)
    fresh = forward(net, cores, x, gates, planner=Planner(net))
    rebuilt = Network(
        net.spec,
        net.in_features,
        net.out_features,
        expert_dims=net.expert_dims,
        rank=dict(net.ranks),
        bias=net.bias,
        in_shape=net.in_shape,
        out_shape=net.out_shape,
    )
    np.testing.assert_array_equal(cached, first)
    np.testing.assert_array_equal(fresh, first)
    np.testing.assert_array_equal(forward(rebuilt, cores, x, gates), first)


@given(networks(), st.integers(1, 3), seeds())
def test_empty_batch_gives_empty_output(net, leading, seed):
    cores, _, _ = setup(net, (), seed)
    x, gates = random_inputs(net, (0, leading), random_state=seed)
    y = forward(net, cores, x, gates)
    assert y.shape == (0, leading, net.out_features)


def test_input_without_batch_dimensions():
    net = tr(4, 5, expert_dims=(3, 2), rank=2)
    cores, x, gates = setup(net, (), 0)
    assert x.shape == (4,)
    y = forward(net, cores, x, gates)
    assert y.shape == (5,)
    assert_close(y, dense_forward(materialize(net, cores), x, gates, True), "float64", 100)


def test_single_gate_tensor_for_one_level():
    net = cp(3, 2, expert_dims=4, rank=2)
    cores, x, gates = setup(net, (5,), 0)
    np.testing.assert_array_equal(forward(net, cores, x, gates[0]), forward(net, cores, x, gates))


@given(networks(), st.data(), seeds())
def test_negative_expert_indices_count_from_the_end(net, data, seed):
    index = tuple(data.draw(st.integers(-n, -1)) for n in net.expert_dims)
    cores, _, _ = setup(net, (), seed)
    positive = tuple(k % n for k, n in zip(index, net.expert_dims, strict=True))
    np.testing.assert_array_equal(
        expert_weight(net, cores, index).weight, expert_weight(net, cores, positive).weight
    )


# -------------------------------------------------------------- random_cores


@pytest.mark.parametrize(
    "net",
    [
        dense(5, 4, expert_dims=6),
        cp(5, 4, expert_dims=(6, 3), rank=3),
        tucker(5, 4, expert_dims=6, rank=(2, 3, 2)),
        tt(5, 4, expert_dims=(3, 3), rank=2),
        tr(5, 4, expert_dims=6, rank=(3, 2, 2)),
        Network(
            "n1 a b, n2 a, i b c, o c a", 5, 4, expert_dims=(3, 2), rank={"a": 2, "b": 3, "c": 2}
        ),
    ],
    ids=["dense", "cp", "tucker", "tt", "tr", "custom"],
)
def test_random_cores_give_weights_of_the_requested_std(net):
    # E[W^2] = std^2 exactly; averaged over many draws the mean square is close.
    draws = np.stack(
        [materialize(net, random_cores(net, std=0.5, random_state=s)) for s in range(600)]
    )
    assert abs(np.mean(draws**2) / 0.25 - 1) < 0.1
    assert abs(np.mean(draws)) < 0.02


def test_random_cores_default_std_and_determinism():
    net = cp(16, 4, expert_dims=8, rank=3)
    a = random_cores(net, random_state=7)
    b = random_cores(net, random_state=7)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert [c.shape for c in a] == list(net.core_shapes)
    assert a[0].dtype == np.float64
    assert random_cores(net, random_state=0, dtype=tl.float32)[0].dtype == np.float32


@pytest.mark.parametrize("std", [0, -1.0, "1", float("nan")])
def test_random_cores_reject_bad_std(std):
    with pytest.raises(ValueError, match="std must be a positive number"):
        random_cores(cp(3, 2, expert_dims=4, rank=2), std=std)


# ----------------------------------------------------------------- bad input


NET = cp(5, 2, expert_dims=(4, 3), rank=2)


def good(batch=(6,)):
    cores, x, gates = setup(NET, batch, 0)
    return cores, x, gates


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (
            lambda c, x, g: (c, x[:, :4], g),
            ValueError,
            r"x must have shape \(\.\.\., 5\) \(in_features\), got \(6, 4\)",
        ),
        (
            lambda c, x, g: (c, np.asarray(x[0, 0]), g),
            ValueError,
            r"x must have shape \(\.\.\., 5\) \(in_features\), got \(\)",
        ),
        (
            lambda c, x, g: (c, x, g[:1]),
            ValueError,
            r"network has 2 expert level\(s\) \(n1, n2\) but 1 gate tensor\(s\) were given",
        ),
        (
            lambda c, x, g: (c, x, g[0]),
            TypeError,
            r"gates must be a list of 2 tensors, one per expert level \(n1, n2\); got a single",
        ),
        (lambda c, x, g: (c, x, {"n1": g[0]}), TypeError, r"gates must be a list of 2 tensor"),
        (
            lambda c, x, g: (c, x, [g[0], g[1][:, :2]]),
            ValueError,
            r"gates\[1\] must have shape \(6, 3\) \(the batch shape of x, \(6,\), then n2=3\), "
            r"got \(6, 2\)",
        ),
        (
            lambda c, x, g: (c, x, [g[0][:1], g[1]]),
            ValueError,
            r"gates\[0\] must have shape \(6, 4\) .* got \(1, 4\)",
        ),
        (
            lambda c, x, g: (c, x, [g[0][None], g[1]]),
            ValueError,
            r"gates\[0\] must have shape \(6, 4\) .* got \(1, 6, 4\)",
        ),
        (
            lambda c, x, g: (c[:3], x, g),
            ValueError,
            r"network 'n1 r, n2 r, i r, o r' has 4 cores, got 3 tensors",
        ),
        (
            lambda c, x, g: ([c[0], c[1], c[2][:5], c[3]], x, g),
            ValueError,
            r"cores\[2\] \(legs i r\) must have shape \(6, 2\), got \(5, 2\)",
        ),
        (lambda c, x, g: (c[0], x, g), TypeError, r"cores must be a sequence of 4 tensors \(a"),
        (
            lambda c, x, g: (c, x.astype(np.float32), g),
            TypeError,
            r"gates\[0\] has dtype float64 but x has float32",
        ),
        (
            lambda c, x, g: (c, x, [g[0].astype(np.float32), g[1]]),
            TypeError,
            r"gates\[0\] has dtype float32 but x has float64",
        ),
        (
            lambda c, x, g: ([*c[:3], c[3].astype(np.float32)], x, g),
            TypeError,
            r"cores\[3\] has dtype float32 but x has float64",
        ),
        (
            lambda c, x, g: (c, x.astype(np.int64), g),
            TypeError,
            r"x has dtype int64; μMoE layers compute in a floating-point dtype",
        ),
        (
            lambda c, x, g: (c, x.tolist(), g),
            TypeError,
            r"x is a builtins.list, not a tensor of the active TensorLy backend 'numpy'",
        ),
        (
            lambda c, x, g: (c, x, [g[0], g[1].tolist()]),
            TypeError,
            r"gates\[1\] is a builtins.list, not a tensor",
        ),
    ],
)
def test_forward_rejects_bad_operands(mutate, error, match):
    cores, x, gates = mutate(*good())
    with pytest.raises(error, match=match):
        forward(NET, cores, x, gates)


@given(st.data())
def test_forward_rejects_any_wrong_shape(data):
    """Change one dimension of one operand: a ValueError, never a wrong answer."""
    cores, x, gates = good(batch=(3, 2))
    operands = [x, *gates, *cores]
    k = data.draw(st.integers(0, len(operands) - 1))
    shape = list(operands[k].shape)
    axis = data.draw(st.integers(0, len(shape)))
    if axis == len(shape) or data.draw(st.booleans()):
        shape.insert(axis, data.draw(st.integers(1, 3)))  # an extra dimension
    else:
        shape[axis] = data.draw(st.integers(0, 7).filter(lambda s, a=shape[axis]: s != a))
    operands[k] = np.zeros(shape)
    x, gates, cores = operands[0], operands[1:3], operands[3:]
    with pytest.raises(ValueError, match="must have shape"):
        forward(NET, cores, x, gates)


@pytest.mark.parametrize(
    ("index", "error", "match"),
    [
        ((1,), ValueError, r"index must give one expert per level \(2: n1, n2\), got \(1,\)"),
        (3, ValueError, r"index must give one expert per level"),
        ((4, 0), ValueError, r"expert index 4 is out of range for n1 of size 4"),
        ((0, -4), ValueError, r"expert index -4 is out of range for n2 of size 3"),
        ((0, 1.0), TypeError, r"expert index for n2 must be an int, got 1.0"),
        ((True, 0), TypeError, r"expert index for n1 must be an int, got True"),
    ],
)
def test_expert_weight_rejects_bad_indices(index, error, match):
    cores, _, _ = good()
    with pytest.raises(error, match=match):
        expert_weight(NET, cores, index)


def test_materialize_rejects_mixed_dtypes():
    cores, _, _ = good()
    cores[1] = cores[1].astype(np.float32)
    with pytest.raises(TypeError, match=r"cores\[1\] has dtype float32 but cores\[0\] has float64"):
        materialize(NET, cores)


def test_flops_match_the_executed_plan():
    net = cp(8, 4, expert_dims=16, rank=3)
    plan = planner_of(net).forward(10, "numpy", np.dtype("float64"))
    assert plan.shapes[0] == (16, 16)  # searched at the bucket size
    assert flops(net, 16) == plan.flops
    assert math.isclose(flops(net, 10) / flops(net, 16), 10 / 16)


# ------------------------------------------------- scaling experts in the cores


@given(networks(max_levels=2), seeds(), st.data())
def test_scale_experts_scales_that_mode_of_w(net, seed, data):
    # NumPy here; tests/functional/test_backends.py runs it on every backend and dtype.
    level = data.draw(st.integers(0, net.n_levels - 1))
    n = net.expert_dims[level]
    scales = np.random.RandomState(seed).uniform(-2, 2, n) * (np.arange(n) % 3 != 0)
    cores = random_cores(net, random_state=seed)
    before = [c.copy() for c in cores]
    scaled = scale_experts(net, cores, level, scales)
    shape = [1] * (net.n_levels + 2)
    shape[level] = n
    np.testing.assert_allclose(
        materialize(net, scaled), materialize(net, cores) * scales.reshape(shape), atol=1e-12
    )
    for core, original in zip(cores, before, strict=True):  # the inputs are untouched
        np.testing.assert_array_equal(core, original)
    assert sum(a is not b for a, b in zip(scaled, cores, strict=True)) == 1


def test_scale_experts_refuses_bad_arguments():
    net = cp(4, 2, expert_dims=(3, 2), rank=2)
    cores = random_cores(net, random_state=0)
    with pytest.raises(ValueError, match=r"level must be an int in \[0, 2\), got 2"):
        scale_experts(net, cores, 2, np.ones(3))
    with pytest.raises(TypeError, match="level must be an int"):
        scale_experts(net, cores, 0.0, np.ones(3))
    with pytest.raises(ValueError, match=r"scales for n2 must have shape \(2,\), got \(3,\)"):
        scale_experts(net, cores, 1, np.ones(3))
    with pytest.raises(ValueError, match="scales for n1 must be finite"):
        scale_experts(net, cores, 0, [1, np.nan, 1])
    with pytest.raises(
        ValueError, match=r"cores\[0\] \(legs n1 r\) must have shape \(3, 2\), got \(2, 3\)"
    ):
        scale_experts(net, [tl.transpose(cores[0]), *cores[1:]], 0, np.ones(3))
