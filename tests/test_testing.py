"""mumoe.testing's strategies for a user's own network (issue #26, item 11)."""

from __future__ import annotations

import pytest
from hypothesis import find, given, settings

from mumoe import forward, materialize, random_cores
from mumoe.testing import (
    assert_close,
    dense_forward,
    n_terms,
    networks_of,
    random_inputs,
    seeds,
)

SPEC = "n1 a, a n2 b, i b c, o c"


@settings(max_examples=40)
@given(networks_of(SPEC, max_size=3, max_rank=2))
def test_networks_of_keep_the_spec_and_draw_sizes_within_the_bounds(net):
    assert net.spec == SPEC and net.expert_legs == ("n1", "n2")
    assert all(1 <= n <= 3 for n in (*net.expert_dims, net.in_features, net.out_features))
    assert set(net.ranks) == {"a", "b", "c"} and all(1 <= r <= 2 for r in net.ranks.values())


@given(networks_of("n o, i o", bias=False))
def test_a_spec_without_bonds_and_a_fixed_bias(net):
    assert net.ranks == {} and net.bias is False


def test_each_bond_size_and_both_biases_are_drawn():
    # Each bond varies on its own, not one rank for all.
    find(networks_of(SPEC), lambda net: len(set(net.ranks.values())) == 3)
    find(networks_of(SPEC), lambda net: net.bias)
    find(networks_of(SPEC), lambda net: not net.bias)


@settings(max_examples=25)
@given(networks_of(SPEC), seeds())
def test_the_docs_recipe_holds_a_custom_network_to_the_oracle(net, seed):
    cores = random_cores(net, random_state=seed)
    x, gates = random_inputs(net, (3,), random_state=seed)
    expected = dense_forward(materialize(net, cores), x, gates, net.bias)
    assert_close(forward(net, cores, x, gates), expected, scale=n_terms(net))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: networks_of("n r, i r, o q"), ValueError, "bond 'q' appears only in core 2"),
        (lambda: networks_of(SPEC, max_size=0), ValueError, "max_size must be a positive int"),
        (lambda: networks_of(SPEC, max_rank=1.5), TypeError, "max_rank must be"),
        (lambda: networks_of(SPEC, bias=1), TypeError, "bias must be True or False"),
    ],
)
def test_bad_arguments_fail_when_the_strategy_is_made(call, error, match):
    with pytest.raises(error, match=match):
        call()
