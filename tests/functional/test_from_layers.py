"""Networks fitted to several dense layers: exact where the format can hold them, and each
expert's error the decomposition's own (TensorLy's reconstruction, the SVD's bound)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorly.decomposition import parafac, tensor_ring, tensor_train, tucker

import mumoe
from mumoe.functional import cores_from_experts, expert_errors, expert_tensor
from mumoe.testing import seeds


def stacked(seed, dims, sizes=(6, 4), bias=True):
    rng = np.random.default_rng(seed)
    i, o = sizes
    weights = rng.normal(size=(*dims, o, i))
    biases = rng.normal(size=(*dims, o)) if bias else None
    return expert_tensor(weights, biases)


def per_expert(fitted, w):
    difference = np.linalg.norm((fitted - w).reshape(*w.shape[:-2], -1), axis=-1)
    return difference / np.linalg.norm(w.reshape(*w.shape[:-2], -1), axis=-1)


def test_expert_tensor_is_the_transposed_weights_with_a_bias_row():
    weights, biases = np.arange(12.0).reshape(2, 2, 3), np.array([[1.0, 2.0], [3.0, 4.0]])
    w = expert_tensor(weights, biases)
    assert w.shape == (2, 4, 2)
    np.testing.assert_array_equal(w[1, :3], weights[1].T)
    np.testing.assert_array_equal(w[1, 3], biases[1])
    with pytest.raises(ValueError, match=r"biases must have shape \(2, 2\)"):
        expert_tensor(weights, np.ones(2))


@given(seeds(), st.sampled_from([(5,), (3, 2)]), st.booleans())
@settings(max_examples=15, deadline=None)
def test_dense_and_full_rank_chains_are_exact(seed, dims, bias):
    w = stacked(seed, dims, bias=bias)
    n_in = w.shape[-2]
    exact = [mumoe.dense(6, 4, expert_dims=dims, bias=bias)]
    if len(dims) == 2:  # ranks at the unfoldings' ranks
        exact.append(mumoe.tt(6, 4, expert_dims=dims, rank=(3, 6, 4), bias=bias))
        exact.append(mumoe.tucker(6, 4, expert_dims=dims, rank=(3, 2, n_in, 4), bias=bias))
    for network in exact:
        cores, errors = cores_from_experts(network, w)
        assert errors.shape == dims and errors.max() < 1e-10, network.format
        with tl.backend_context("numpy"):
            np.testing.assert_allclose(mumoe.materialize(network, cores), w, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Trying to compute SVD:UserWarning")  # the reference's own
def test_each_expert_error_is_the_decompositions_own():
    w = stacked(0, (4, 3))
    cp = mumoe.cp(6, 4, expert_dims=(4, 3), rank=5)
    _, errors = cores_from_experts(cp, w)
    reference = parafac(tl.tensor(w), 5, init="svd", n_iter_max=2000, tol=1e-12, random_state=0)
    np.testing.assert_allclose(errors, per_expert(tl.cp_to_tensor(reference), w), rtol=1e-6)
    assert 0 < errors.min() and errors.max() < 1

    tk = mumoe.tucker(6, 4, expert_dims=(4, 3), rank=(2, 2, 3, 3))
    _, errors = cores_from_experts(tk, w)
    core, factors = tucker(tl.tensor(w), [2, 2, 3, 3], init="svd", n_iter_max=500, tol=1e-12)
    np.testing.assert_allclose(
        errors, per_expert(tl.tucker_to_tensor((core, factors)), w), rtol=1e-6
    )

    tt = mumoe.tt(6, 4, expert_dims=(4, 3), rank=(2, 3, 2))
    _, errors = cores_from_experts(tt, w)
    reference_tt = tensor_train(tl.tensor(w), [1, 2, 3, 2, 1])
    np.testing.assert_allclose(errors, per_expert(tl.tt_to_tensor(reference_tt), w), rtol=1e-6)


def test_ranks_above_the_tensors_stay_exact_with_room_to_grow():
    # The unused components are zero in all but their bond's first core, which holds
    # random values there: W unchanged, and no zero-against-zero saddle.
    w = stacked(3, (4, 3))  # TT unfoldings' ranks (4, 12, 4); Tucker's modes (4, 3, 7, 4)
    tt = mumoe.tt(6, 4, expert_dims=(4, 3), rank=(6, 20, 6))
    cores, errors = cores_from_experts(tt, w)
    assert errors.max() < 1e-10
    assert np.all(cores[1][4:] == 0) and np.all(cores[0][:, 4:] != 0)
    tucker_net = mumoe.tucker(6, 4, expert_dims=(4, 3), rank=(6, 5, 9, 6))
    cores, errors = cores_from_experts(tucker_net, w)
    assert errors.max() < 1e-10
    assert np.all(cores[-1][4:] == 0) and np.all(cores[0][:, 4:] != 0)


def test_lowrank_and_mxd_reach_their_svd_bounds():
    w = stacked(1, (5,))
    _, errors = cores_from_experts(mumoe.lowrank(6, 4, expert_dims=5, rank=2), w)
    for n in range(5):  # each expert at its best rank-2 matrix (Eckart–Young)
        s = np.linalg.svd(w[n], compute_uv=False)
        np.testing.assert_allclose(errors[n], np.sqrt((s[2:] ** 2).sum() / (s**2).sum()))
    cores, errors = cores_from_experts(mumoe.mxd(6, 4, expert_dims=5), w)
    with tl.backend_context("numpy"):
        fitted = mumoe.materialize(mumoe.mxd(6, 4, expert_dims=5), cores)
    for o in range(4):  # each output column at its best rank 1 over (experts, inputs)
        s = np.linalg.svd(w[:, :, o], compute_uv=False)
        residual = np.linalg.norm(fitted[:, :, o] - w[:, :, o])
        np.testing.assert_allclose(residual, np.sqrt((s[1:] ** 2).sum()), rtol=1e-8)
    np.testing.assert_allclose(errors, expert_errors(mumoe.mxd(6, 4, expert_dims=5), cores, w))


def test_a_ring_is_fitted_and_a_custom_spec_or_wrong_shape_refused():
    w = stacked(2, (4, 3))
    tr = mumoe.tr(6, 4, expert_dims=(4, 3), rank=(2, 2, 3, 3))
    cores, errors = cores_from_experts(tr, w)
    assert [c.shape for c in cores] == [tuple(s) for s in tr.core_shapes]
    reference = tensor_ring(tl.tensor(w), [2, 2, 3, 3, 2])
    np.testing.assert_allclose(errors, per_expert(tl.tr_to_tensor(reference), w), rtol=1e-6)
    assert 0 < errors.max() < 1
    full = mumoe.tr(6, 4, expert_dims=(4, 3), rank=(1, 4, 12, 4))  # r0 = 1: TT-SVD, exact
    assert cores_from_experts(full, w)[1].max() < 1e-10
    ring = mumoe.tr(6, 4, expert_dims=4, rank=(3, 3, 3))  # r0 r1 > N1: ALS instead of TR-SVD
    _, errors = cores_from_experts(ring, stacked(2, (4,)))
    assert errors.shape == (4,) and np.all(errors < 1)
    custom = mumoe.Network("n1 a, n2 a b, i b c, o c", 6, 4, expert_dims=(4, 3), rank=2)
    with pytest.raises(ValueError, match="no rule fits a 'custom' network"):
        cores_from_experts(custom, w)
    with pytest.raises(ValueError, match=r"must have shape \(4, 3, 7, 4\)"):
        cores_from_experts(mumoe.dense(6, 4, expert_dims=(4, 3)), w[:, :, :6])
    with pytest.raises(ValueError, match="one expert level only"):
        cores_from_experts(mumoe.mxd(6, 4, expert_dims=(4, 3)), w)
