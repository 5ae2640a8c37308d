"""Networks and presets: sizes, core shapes, parameter counts, equations, errors."""

from __future__ import annotations

import math
import pickle
import re
import warnings

import numpy as np
import pytest
from hypothesis import given

import mumoe
from mumoe import Network, cp, dense, preset, tr, tt, tucker
from mumoe.spec import build_network
from mumoe.testing import custom_networks, preset_networks


def test_sizes_and_shapes_of_a_custom_network():
    net = Network(
        "r0 n r1, r1 i r2, r2 o r0", 5, 4, expert_dims=6, rank={"r0": 2, "r1": 3, "r2": 4}
    )
    assert net.expert_legs == ("n1",)
    assert net.expert_dims == (6,)
    assert net.sizes["i"] == 6  # 5 inputs + bias
    assert net.core_shapes == ((2, 6, 3), (3, 6, 4), (4, 4, 2))
    assert net.weight_shape == (6, 6, 4)
    assert net.n_params == 2 * 6 * 3 + 3 * 6 * 4 + 4 * 4 * 2
    assert net.n_dense_params == 6 * 6 * 4
    assert net.n_levels == 1 and net.n_experts == 6 and net.n_cores == 3


def test_bias_false_keeps_input_size():
    assert Network("n r, i r, o r", 5, 4, expert_dims=6, rank=2, bias=False).sizes["i"] == 5


def test_one_rank_for_every_bond():
    net = Network("n1 a, n2 b, i c, o d, a b c d", 4, 5, expert_dims=(2, 3), rank=2)
    assert dict(net.ranks) == {"a": 2, "b": 2, "c": 2, "d": 2}


def test_numpy_integers_are_sizes():
    net = cp(np.int32(3), 2, expert_dims=np.int64(4), rank=np.int64(2))
    assert net.core_shapes == ((4, 2), (4, 2), (2, 2))
    assert all(type(d) is int for shape in net.core_shapes for d in shape)


# ------------------------------------------------------------------ closed forms


@given(preset_networks())
def test_parameter_counts_equal_the_closed_forms(net):
    # Every leg is a mode (a split input or output gives several); I' the inputs' product.
    dims = [*net.expert_dims, *net.input_sizes, *net.out_shape]
    inputs = math.prod(net.input_sizes)
    d = len(dims)
    if net.format == "dense":
        expected = math.prod(dims)
    elif net.format == "cp":
        expected = net.ranks["r"] * sum(dims)
    elif net.format == "tucker":
        ranks = [net.ranks[f"r{e}"] for e in range(1, net.n_levels + 1)]
        ranks += [net.ranks[f"r{leg}"] for leg in (*net.input_legs, *net.output_legs)]
        expected = sum(D * R for D, R in zip(dims, ranks, strict=True)) + math.prod(ranks)
    elif net.format in ("tt", "ttm"):
        if net.format == "ttm":  # one mode per expert level and per pair of legs
            pairs = zip(net.input_sizes, net.out_shape, strict=True)
            dims = [*net.expert_dims, *(i * o for i, o in pairs)]
            d = len(dims)
        ranks = [1, *(net.ranks[f"r{k}"] for k in range(1, d)), 1]
        expected = sum(ranks[k] * dims[k] * ranks[k + 1] for k in range(d))
    elif net.format == "mxd":
        expected = net.out_features * (sum(net.expert_dims) + inputs)
    elif net.format == "lowrank":
        expected = net.ranks["r"] * net.n_experts * (inputs + net.out_features)
    else:
        ranks = [net.ranks[f"r{k}"] for k in range(d)] + [net.ranks["r0"]]
        expected = sum(ranks[k] * dims[k] * ranks[k + 1] for k in range(d))
    assert net.n_params == expected


def test_cp_parameter_count_of_the_paper_head():
    # CLIP head: I=768, O=1000, bias; R (sum N + I + 1 + O).
    net = cp(768, 1000, expert_dims=128, rank=64)
    assert net.n_params == 64 * (128 + 769 + 1000)


@pytest.mark.parametrize(
    ("build", "spec"),
    [
        (lambda: dense(4, 5, expert_dims=(2, 3)), "n1 n2 i o"),
        (lambda: cp(4, 5, expert_dims=(2, 3), rank=2), "n1 r, n2 r, i r, o r"),
        (lambda: tucker(4, 5, expert_dims=(2, 3), rank=2), "n1 r1, n2 r2, i ri, o ro, r1 r2 ri ro"),
        (lambda: tt(4, 5, expert_dims=(2, 3), rank=2), "n1 r1, r1 n2 r2, r2 i r3, r3 o"),
        (lambda: tr(4, 5, expert_dims=(2, 3), rank=2), "r0 n1 r1, r1 n2 r2, r2 i r3, r3 o r0"),
    ],
)
def test_preset_specs_for_two_levels(build, spec):
    assert build().spec == spec


@pytest.mark.parametrize("n_levels", [1, 2, 3, 4])
def test_presets_any_number_of_levels(n_levels):
    dims = tuple(range(2, 2 + n_levels))
    for name in mumoe.PRESETS:
        options = {"rank": 2} if mumoe.FORMATS[name].has_rank else {}
        net = preset(name, 3, 4, expert_dims=dims, **options)
        assert net.expert_legs == tuple(f"n{e}" for e in range(1, n_levels + 1))
        assert net.weight_shape == (*dims, 4, 4)
        assert net.format == name


def test_tt_and_tr_rank_forms_agree():
    assert tt(3, 2, expert_dims=4, rank=(1, 2, 3, 1)) == tt(3, 2, expert_dims=4, rank=(2, 3))
    assert tr(3, 2, expert_dims=4, rank=(2, 3, 4, 2)) == tr(3, 2, expert_dims=4, rank=(2, 3, 4))
    assert tt(3, 2, expert_dims=4, rank=3) == tt(3, 2, expert_dims=4, rank=(3, 3))
    assert tr(3, 2, expert_dims=4, rank=3) == tr(3, 2, expert_dims=4, rank=(3, 3, 3))


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=4),
            ValueError,
            r"has bonds r but no rank was given",
        ),
        (
            lambda: Network("n a, i b, o c, a b c", 3, 2, expert_dims=4, rank={"a": 2, "b": 2}),
            ValueError,
            r"bond 'c' of spec .* has no size",
        ),
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=4, rank={"r": 2, "q": 3}),
            ValueError,
            r"rank names bond 'q', which is not in spec",
        ),
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=4, rank=0),
            ValueError,
            r"rank must be a positive int, got 0",
        ),
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=4, rank={"r": -1}),
            ValueError,
            r"rank\['r'\] must be a positive int, got -1",
        ),
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=4, rank=2.0),
            TypeError,
            r"rank must be a positive int, got 2.0",
        ),
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=4, rank=True),
            TypeError,
            r"rank must be a positive int, got the bool True",
        ),
        (
            lambda: Network("n r, i r, o r", 0, 2, expert_dims=4, rank=2),
            ValueError,
            r"in_features must be a positive int, got 0",
        ),
        (
            lambda: Network("n r, i r, o r", 3, -2, expert_dims=4, rank=2),
            ValueError,
            r"out_features must be a positive int, got -2",
        ),
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=(4, 5), rank=2),
            ValueError,
            r"has 1 expert level\(s\) \(n1\) but expert_dims has 2 entries",
        ),
        (
            lambda: Network("n1 r, n2 r, i r, o r", 3, 2, expert_dims=(4, 0), rank=2),
            ValueError,
            r"expert_dims\[1\] must be a positive int, got 0",
        ),
        (
            lambda: Network("n i o", 3, 2, expert_dims=4, rank={"r": 2}),
            ValueError,
            r"rank names bonds \['r'\] but spec 'n1 i o' has no bonds",
        ),
        (
            lambda: Network("n r, i r, o r", 3, 2, expert_dims=4, rank=2, bias=1),
            TypeError,
            r"bias must be True or False",
        ),
        (lambda: cp(3, 2, expert_dims=4, rank=(2, 3)), TypeError, r"a CP rank is one positive int"),
        (lambda: cp(3, 2, expert_dims=(), rank=2), ValueError, r"expert_dims is empty"),
        (
            lambda: tucker(3, 2, expert_dims=4, rank=(2, 3)),
            ValueError,
            r"Tucker rank needs one entry per mode \(3: experts..., input, output\), got 2",
        ),
        (
            lambda: tt(3, 2, expert_dims=4, rank=(2, 3, 4, 1)),
            ValueError,
            r"TT boundary ranks must be 1: rank\[0\]=2, rank\[-1\]=1",
        ),
        (
            lambda: tt(3, 2, expert_dims=4, rank=(2, 3, 4)),
            ValueError,
            r"TT rank for 3 modes needs 2 inner ranks or 4 ranks with boundary 1s, got 3",
        ),
        (
            lambda: tr(3, 2, expert_dims=4, rank=(5, 3, 2, 4)),
            ValueError,
            r"TR ranks must close the ring: rank\[-1\]=4 != rank\[0\]=5",
        ),
        (
            lambda: tr(3, 2, expert_dims=4, rank=(5, 3)),
            ValueError,
            r"TR rank for 3 modes needs 3 bond ranks or 4 ranks closing the ring, got 2",
        ),
        (
            lambda: tr(3, 2, expert_dims=4, rank=(5, 0, 5)),
            ValueError,
            r"TR rank\[1\] must be a positive int, got 0",
        ),
        (
            lambda: preset("cpd", 3, 2, expert_dims=4, rank=2),
            ValueError,
            r"unknown format 'cpd' \(did you mean 'cp'\?\); choose one of 'dense', 'cp'",
        ),
        # Issue #26, item 7: a format name, or a typo of one, as a spec.
        (
            lambda: Network("cp", 3, 2, expert_dims=4, rank=2),
            ValueError,
            r"'cp' is a format name: mumoe\.preset\('cp', \.\.\.\) builds its network",
        ),
        (
            lambda: Network("cpp", 3, 2, expert_dims=4, rank=2),
            ValueError,
            r"no expert leg.*; it is not a format name either \(did you mean 'cp'\?\)",
        ),
        (
            lambda: build_network(16, 10, "cpp", expert_dims=4, rank=3),
            ValueError,
            r"network 'cpp' is neither a format name \('dense', 'cp', .*; did you mean 'cp'\?\) "
            r"nor a spec",
        ),
    ],
)
def test_bad_sizes_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------- equations, describe


def test_equations_of_cp():
    net = cp(3, 2, expert_dims=4, rank=5)
    assert net.equation == "...n1, ...i, n1 r, i r, o r -> ...o"
    assert net.einsum_equation == "ab,ac,be,ce,de->ad"


# ------------------------------------------------------ identity and pickling


@given(custom_networks())
def test_pickle_round_trip(net):
    clone = pickle.loads(pickle.dumps(net))
    assert clone == net and hash(clone) == hash(net)
    assert clone.core_shapes == net.core_shapes
    assert repr(clone) == repr(net)
    assert pickle.dumps(net) == pickle.dumps(clone)  # a value: nothing but its arguments


def test_equality_and_repr():
    assert cp(3, 2, expert_dims=4, rank=2) == Network("n r, i r, o r", 3, 2, expert_dims=4, rank=2)
    assert cp(3, 2, expert_dims=4, rank=2) != cp(3, 2, expert_dims=4, rank=3)
    assert cp(3, 2, expert_dims=4, rank=2) != cp(3, 2, expert_dims=4, rank=2, bias=False)
    assert repr(cp(3, 2, expert_dims=4, rank=2)) == (
        "Network('n1 r, i r, o r', 3, 2, expert_dims=4, rank={'r': 2}, bias=True)"
    )


def test_sizes_are_read_only():
    net = cp(3, 2, expert_dims=4, rank=2)
    with pytest.raises(TypeError):
        net.ranks["r"] = 3
    with pytest.raises(TypeError):
        net.sizes["i"] = 3


# ------------------------------------------------------------- immutability


def test_a_network_is_immutable_and_replace_makes_changed_copies():
    net = cp(5, 2, expert_dims=8, rank=3)
    with pytest.raises(AttributeError, match=r"immutable.*replace\(in_features=\.\.\.\)"):
        net.in_features = 7
    with pytest.raises(AttributeError, match="immutable"):
        del net.spec
    wider = net.replace(in_features=7)
    assert wider.core_shapes == ((8, 3), (8, 3), (2, 3)) and net.core_shapes[1] == (6, 3)
    assert wider != net and hash(wider) != hash(net)
    assert net.replace() == net and net.replace() is not net
    assert net.replace(spec="n i r, r o").format == "custom"
    with pytest.raises(TypeError, match="unknown arguments \\['width'\\]"):
        net.replace(width=3)


@pytest.mark.parametrize(
    ("spec", "groups"),
    [("n r, i r, o", "{0, 1} and {2}"), ("n a, a, i o b, b", "{0, 1} and {2, 3}")],
)
def test_a_disconnected_network_is_warned_about(spec, groups):
    # Issue #26, item 10: W an outer product (almost always a typo) built silently.
    expected = f"is disconnected: no leg joins its cores {re.escape(groups)},"
    with pytest.warns(UserWarning, match=expected):
        Network(spec, 4, 3, expert_dims=4, rank=2)


@given(custom_networks())
def test_connected_networks_build_without_a_warning(net):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if net.splits_input:  # the first leg one larger, in_features with it
            in_shape = (net.in_shape[0] + 1, *net.in_shape[1:])
            net.replace(in_features=math.prod(in_shape), in_shape=in_shape)
        else:
            net.replace(in_features=net.in_features + 1)
