"""The layer recipe (mumoe.functional) on NumPy, held to Eq. 1 of its own parts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import cp, materialize, random_cores
from mumoe.functional import block_forward, layer_forward, scale_gates
from mumoe.gates import (
    ACTIVATIONS,
    TOP_K_ACTIVATIONS,
    gate_coefficients,
    gelu,
    layer_norm,
    resolve_activation,
)
from mumoe.testing import (
    assert_close,
    batch_shapes,
    dense_forward,
    n_terms,
    networks,
    random_inputs,
    seeds,
)


def gate_of(net, rng, activation="softmax"):
    projections = [rng.uniform(-1, 1, (net.in_features, n)) for n in net.expert_dims]
    kernel = resolve_activation(activation, top_k=2 if activation in TOP_K_ACTIVATIONS else None)
    return lambda x: gate_coefficients(x, projections, [None] * net.n_levels, kernel)


@settings(max_examples=40)
@given(networks(), batch_shapes(), seeds(), st.booleans(), st.sampled_from(list(ACTIVATIONS)))
def test_layer_forward_is_eq1_of_its_gates_edits_and_normed_input(
    net, batch_shape, seed, normed, activation
):
    rng = np.random.RandomState(seed)
    cores = random_cores(net, random_state=rng)
    x, _ = random_inputs(net, batch_shape, random_state=rng)
    gate = gate_of(net, rng, activation)
    level = rng.randint(net.n_levels)
    scales = {level: rng.uniform(-2, 2, net.expert_dims[level])}
    norm = layer_norm if normed else None
    y, gates = layer_forward(net, cores, x, gate=gate, input_norm=norm, scales=scales)
    expected_gates = gate(x)
    for a, b in zip(gates, expected_gates, strict=True):
        np.testing.assert_array_equal(a, b)  # reported before the edit
    edited = [g * scales[e] if e == level else g for e, g in enumerate(expected_gates)]
    z = layer_norm(x) if normed else x
    expected = dense_forward(materialize(net, cores), z, edited, net.bias)
    assert_close(y, expected, scale=n_terms(net))


def test_given_gates_replace_the_gate_and_one_level_may_be_a_tensor():
    net = cp(3, 2, expert_dims=4, rank=2)
    cores = random_cores(net, random_state=0)
    x, (a,) = random_inputs(net, (5,), random_state=1)
    never = lambda x: pytest.fail("the gate must not run when gates are given")  # noqa: E731
    y_list, _ = layer_forward(net, cores, x, gate=never, gates=[a])
    y_tensor, gates = layer_forward(net, cores, x, gate=never, gates=a)
    np.testing.assert_array_equal(y_list, y_tensor)
    assert len(gates) == 1 and gates[0] is a


def test_a_layer_without_gate_needs_gates():
    net = cp(3, 2, expert_dims=4, rank=2)
    with pytest.raises(ValueError, match=r"no gate .*pass gates"):
        layer_forward(net, random_cores(net), np.ones((2, 3)))


@settings(max_examples=20)
@given(seeds(), batch_shapes())
def test_block_forward_shares_one_gate_between_two_layers(seed, batch_shape):
    rng = np.random.RandomState(seed)
    first, second = cp(4, 6, expert_dims=(3, 2), rank=2), cp(6, 5, expert_dims=(3, 2), rank=3)
    cores1, cores2 = random_cores(first, random_state=rng), random_cores(second, random_state=rng)
    gate = gate_of(first, rng)
    calls = []

    def layer(net, cores):
        def call(x, gates):
            calls.append(net)
            return layer_forward(net, cores, x, gates=gates)[0]

        return call

    x = rng.uniform(-1, 1, (*batch_shape, 4))
    y, gates = block_forward(
        layer(first, cores1),
        layer(second, cores2),
        x,
        gate=gate,
        activation=gelu,
        input_norm=layer_norm,
    )
    assert calls == [first, second]
    hidden = dense_forward(materialize(first, cores1), layer_norm(x), gates, True)
    expected = dense_forward(materialize(second, cores2), gelu(hidden), gates, True)
    assert_close(y, expected, scale=n_terms(second) * n_terms(first))


def test_scale_gates_leaves_unedited_levels_alone():
    a, b = np.full((2, 3), 0.5), np.full((2, 2), 0.25)
    scaled = scale_gates([a, b], {1: np.array([0.0, 4.0])})
    assert scaled[0] is a
    np.testing.assert_array_equal(scaled[1], [[0.0, 1.0], [0.0, 1.0]])
    assert scale_gates([a, b], None) == [a, b]
