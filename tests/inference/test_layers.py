"""The eval-mode layers without torch: the recipe on NumPy arrays, and what they refuse."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mumoe import forward, random_cores
from mumoe.gates import batch_norm, entmax15, gelu, layer_norm, softmax
from mumoe.inference import InferenceMuMoE, InferenceMuMoEBlock
from mumoe.testing import assert_close, n_terms, preset_networks, seeds
from tests.helpers import has_modules, use_backend


def gate_arrays(net, seed):
    """Projections and batch-norm statistics of every level, at random."""
    rng = np.random.default_rng(seed)
    projections = [rng.standard_normal((net.in_features, n)) for n in net.expert_dims]
    means = [rng.standard_normal(n) for n in net.expert_dims]
    variances = [rng.uniform(0.5, 2.0, n) for n in net.expert_dims]
    return projections, means, variances


@given(preset_networks(), st.integers(1, 4), seeds())
def test_a_served_layer_is_the_recipe_on_its_arrays(net, rows, seed):
    cores = random_cores(net, random_state=seed)
    projections, means, variances = gate_arrays(net, seed)
    rng = np.random.default_rng(seed + 1)
    weight, bias = rng.standard_normal(net.in_features), rng.standard_normal(net.in_features)
    layer = InferenceMuMoE(
        net,
        cores,
        projections=projections,
        running_mean=means,
        running_var=variances,
        input_norm_affine=(weight, bias),
    )
    x = rng.standard_normal((rows, net.in_features))
    gates = [
        entmax15(batch_norm(x @ g, m, v))
        for g, m, v in zip(projections, means, variances, strict=True)
    ]
    expected = forward(net, cores, layer_norm(x, weight, bias), gates)
    assert_close(layer(x), expected, "float64", scale=n_terms(net))
    for got, want in zip(layer.gates(x), gates, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_a_served_block_shares_its_first_layers_gate():
    from mumoe import cp

    first, second = cp(6, 10, expert_dims=4, rank=3), cp(10, 6, expert_dims=4, rank=3)
    projection = np.random.default_rng(0).standard_normal((6, 4))
    fc1 = InferenceMuMoE(
        first,
        random_cores(first, random_state=1),
        projections=[projection],
        normalization="ln",
        activation="softmax",
    )
    fc2 = InferenceMuMoE(second, random_cores(second, random_state=2))
    x = np.random.default_rng(3).standard_normal((5, 6))
    gates = [softmax(layer_norm(x @ projection))]
    expected = fc2(gelu(fc1(x, gates)), gates)
    np.testing.assert_allclose(InferenceMuMoEBlock(fc1, fc2)(x), expected, rtol=1e-12)


def test_served_layers_refuse_what_they_cannot_compute():
    from mumoe import cp

    net = cp(6, 4, expert_dims=5, rank=2)
    cores = random_cores(net, random_state=0)
    with pytest.raises(ValueError, match="unknown gate activation 'relu'"):
        InferenceMuMoE(net, cores, activation="relu")
    with pytest.raises(ValueError, match="batch-norm gating needs running_mean and running_var"):
        InferenceMuMoE(net, cores, projections=[np.zeros((6, 5))])
    layer = InferenceMuMoE(net, cores, projections=[np.zeros((6, 5))], normalization=None)
    with pytest.raises(ValueError, match=r"with shape \(\.\.\., 6\), got \(2, 3\)"):
        layer(np.ones((2, 3)))
    with pytest.raises(ValueError, match="this layer has no gate: pass gates to the call"):
        InferenceMuMoE(net, cores).gates(np.ones((2, 6)))
    other = InferenceMuMoE(
        cp(3, 6, expert_dims=5, rank=2), random_cores(cp(3, 6, expert_dims=5, rank=2))
    )
    with pytest.raises(ValueError, match="fc1 gives 4 features but fc2 takes 3"):
        InferenceMuMoEBlock(layer, other)
    if has_modules("torch"):
        with use_backend("pytorch"), pytest.raises(ValueError, match="'numpy' backend"):
            layer.gates(np.ones((2, 6)))
