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
from hypothesis import given
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
        ({"indices": np.array([[0.0, 1.0]])}, TypeError, "must be int64 or int32"),
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
    text = describe(net, batch_size=1024, support=(16, 2), backend="numpy")
    assert "n1: k = 16 of 4,096 (k/N = 0.0039 <= crossover" in text
    assert "sparse, core 0 gathered and summed" in text
    assert "n2: k = 2 of 4 (k/N = 0.5000 > crossover" in text and "dense, the support" in text
    assert "fewer than the dense path's" in text
    small = describe(net, batch_size=8, support=(16, 2), backend="numpy")
    assert "dense, its dense step (131,072 multiply-adds) is below numpy's floor" in small
    with pytest.raises(ValueError, match="support must give a positive number"):
        describe(net, support=(16,))


def test_the_default_gathers_only_where_the_dense_step_repays_a_gather():
    net = cp(64, 64, expert_dims=4096, rank=64)
    planner = Planner(net)
    assert planner.worth_gathering(0, 256, "pytorch")  # 67M multiply-adds
    assert not planner.worth_gathering(0, 8, "pytorch")
    assert not planner.worth_gathering(0, 64, "pytorch", training=True)  # 16.8M: below 2^25
    assert planner.max_density("pytorch", batch_size=8) == 0.0  # the gate stays dense
    assert Planner(net, crossover=0.5).worth_gathering(0, 1, "pytorch")  # told: always
    # entmax-1.5 and sparsemax select their support from dense output: wide cores only
    assert planner.max_density("pytorch", batch_size=256, sparsified=True) == 0.0  # rank 64
    wide = Planner(mxd(768, 768, expert_dims=2048))  # 768 entries per expert
    assert wide.max_density("pytorch", batch_size=256, sparsified=True) == 0.1


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


def test_repeated_indices_add_up_on_both_paths():
    # A support may repeat an expert (the gates never do): its values add up, gathered or
    # made dense, whichever path a call takes.
    net = cp(3, 2, expert_dims=8, rank=4)
    cores = [np.random.default_rng(0).standard_normal(s) for s in net.core_shapes]
    x = np.ones((1, 3))
    twice = SparseGate(np.array([[1, 1]]), np.array([[0.5, 0.5]]), 8)
    once = SparseGate(np.array([[1, 2]]), np.array([[1.0, 0.0]]), 8)
    for crossover in (ALWAYS, 0.0):
        planner = Planner(net, crossover=crossover)
        np.testing.assert_allclose(
            forward(net, cores, x, twice, planner=planner),
            forward(net, cores, x, once, planner=planner),
        )
    np.testing.assert_array_equal(densify(twice), densify(once))


def test_contract_checks_a_caller_s_support_indices():
    from mumoe.functional import contract

    net, cores, x, gate = gate_case(indices=np.array([[-1, 2]]))
    with pytest.raises(ValueError, match=r"in \[0, 6\), got values from -1 to 2"):
        contract(net, cores, x, [gate], planner=Planner(net, crossover=ALWAYS))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint32, np.uint64])
def test_narrow_or_unsigned_index_dtypes_are_refused(dtype):
    net, cores, x, gate = gate_case(indices=np.array([[0, 5]], dtype=dtype))
    with pytest.raises(TypeError, match="must be int64 or int32"):
        forward(net, cores, x, gate, planner=Planner(net, crossover=ALWAYS))
