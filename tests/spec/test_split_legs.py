"""Split input and output legs: their sizes, presets, budgets and refusals (issue #30)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

import mumoe
from mumoe import Network, balanced_shape
from mumoe.spec import match_rank


def test_a_split_network_knows_its_legs_and_both_forms_of_w():
    net = Network(
        "n r1, r1 i1 o1 r2, r2 i2 o2", 12, 6, expert_dims=5, rank=2, in_shape=(4, 3),
        out_shape=(3, 2),
    )  # fmt: skip
    assert net.input_legs == ("i1", "i2") and net.output_legs == ("o1", "o2")
    assert net.sizes["i1"] == 5 and net.sizes["i2"] == 3  # the bias slice on i1
    assert net.tensor_shape == (5, 5, 3, 3, 2) and net.weight_shape == (5, 13, 6)
    assert net.forward_shapes(7)[:2] == [(7, 5), (7, 5, 3)]
    assert net.einsum_equation.endswith("->aef") and net.splits_input
    assert net.replace(bias=False).sizes["i1"] == 4
    assert net.format == "ttm" and eval(repr(net), {"Network": Network}) == net


@pytest.mark.parametrize(
    ("spec", "options", "match"),
    [
        ("n r, i1 r, i2 r, o r", {}, r"needs in_shape=<2 sizes whose product is in_features=12>"),
        ("n r, i1 r, i2 r, o r", {"in_shape": (4, 4)}, r"multiplies to 16, not in_features=12"),
        ("n r, i1 r, i2 r, o r", {"in_shape": (12,)}, r"has 1 sizes but the spec splits"),
        ("n r, i1 r, i2 r, o r", {"in_shape": (4, 0)}, r"in_shape"),
        ("n r, i r, o r", {"in_shape": (4, 3)}, r"splits the input, but the spec has one input"),
        ("n r, i r, o1 r, o2 r", {"out_shape": (5, 2)}, r"multiplies to 10, not out_features=6"),
        ("n r, i r, i2 r, o r", {}, r"mixes the input leg 'i' with 'i2'"),
        ("n r, i1 r, i3 r, o r", {}, r"has input legs i1, i3 but no i2"),
    ],
)
def test_bad_splits_are_refused_with_what_was_expected(spec, options, match):
    with pytest.raises(ValueError, match=match):
        Network(spec, 12, 6, expert_dims=4, rank=2, **options)


def test_a_tt_matrix_needs_as_many_input_legs_as_output_legs():
    with pytest.raises(ValueError, match=r"pairs each input leg with an output leg"):
        mumoe.ttm(12, 8, expert_dims=4, rank=2, in_shape=(4, 3), out_shape=(2, 2, 2))


@given(st.integers(1, 5000), st.integers(1, 4))
def test_balanced_shapes_multiply_to_the_size_and_are_the_most_balanced(size, n_legs):
    try:
        shape = balanced_shape(size, n_legs)
    except ValueError as error:
        assert "cannot be split" in str(error)
        shape = balanced_shape(size, n_legs, strict=False)
        assert shape[-1] == 1
    assert math.prod(shape) == size and len(shape) == n_legs
    assert list(shape) == sorted(shape, reverse=True)
    # No split into n_legs factors has a smaller largest factor.
    assert all(size % a or max(a, size // a) >= shape[0] for a in range(1, size + 1) if n_legs == 2)


def test_every_preset_splits_its_modes_and_counts_its_parameters():
    shapes = {"in_shape": (4, 3), "out_shape": (3, 2)}
    for name, build in mumoe.PRESETS.items():
        rank = {"rank": 2} if mumoe.FORMATS[name].has_rank else {}
        net = build(12, 6, expert_dims=(3, 2), **rank, **shapes)
        assert net.format == name and net.in_shape == (4, 3) and net.out_shape == (3, 2)
        assert net.n_params == sum(math.prod(s) for s in net.core_shapes)


def test_budgets_size_the_free_bonds_of_split_networks():
    rank = match_rank("ttm", 768, 768, expert_dims=64, in_shape=(32, 24), out_shape=(32, 24))
    net = mumoe.ttm(768, 768, expert_dims=64, rank=rank, in_shape=(32, 24), out_shape=(32, 24))
    grown = mumoe.ttm(
        768, 768, expert_dims=64, rank=(4, rank[1] + 1), in_shape=(32, 24), out_shape=(32, 24)
    )
    budget = mumoe.spec.linear_params(768, 768)
    gates = mumoe.spec.gate_params(768, 64)
    assert net.n_params + gates <= budget < grown.n_params + gates
    cp = match_rank("cp", 768, 768, expert_dims=64, in_shape=(32, 24))
    assert isinstance(cp, int) and cp > 0
    with pytest.raises(ValueError, match=r"no free bond"):
        match_rank("ttm", 12, 6, expert_dims=4, budget=10**6, in_shape=(12,), out_shape=(6,))


def test_layers_and_describe_take_split_legs_from_their_arguments():
    net = mumoe.build_network(768, 3072, "ttm", expert_dims=8, rank=4)
    assert (net.in_shape, net.out_shape) == ((32, 24), (64, 48))
    given = mumoe.build_network(12, 6, "cp", expert_dims=4, rank=2, in_shape=(4, 3))
    assert given.spec == "n1 r, i1 r, i2 r, o r"
    assert mumoe.build_network(12, 6, given, in_shape=(4, 3)) is given
    with pytest.raises(ValueError, match=r"network has in_shape=\(4, 3\) but the layer"):
        mumoe.build_network(12, 6, given, in_shape=(3, 4))
    text = mumoe.describe(given, batch_size=8)
    assert "i1=5 (4 + bias), i2=3" in text and "a slice of i1" in text
