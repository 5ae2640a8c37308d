"""The compiled contraction (mumoe.plan): any path, any network, the bias split."""

from __future__ import annotations

import numpy as np
import tensorly as tl
from hypothesis import given
from hypothesis import strategies as st

from mumoe import cp, describe, forward, materialize, planner_of, random_cores, tr
from mumoe.plan import AUTOTUNE_OPTIMIZERS, PairStep, Plan, Planner
from mumoe.testing import (
    assert_close,
    batch_shapes,
    dense_forward,
    n_terms,
    networks,
    random_inputs,
)


@given(networks(), batch_shapes(), st.sampled_from(AUTOTUNE_OPTIMIZERS), st.integers(0, 2**31))
def test_every_optimizers_path_computes_eq1(net, batch_shape, optimize, seed):
    planner = Planner(net, optimize=optimize)
    cores = random_cores(net, random_state=seed)
    x, gates = random_inputs(net, batch_shape, random_state=seed)
    expected = dense_forward(materialize(net, cores), x, gates, net.bias)
    y = forward(net, cores, x, gates, planner=planner)
    assert_close(y, expected, "float64", scale=n_terms(net))


def test_the_bias_falls_back_to_a_ones_column_when_x_meets_a_gate_first():
    net = cp(3, 2, expert_dims=4, rank=2)
    # Operands: gate, x, U_n, U_i, U_o. Contract gate with x first: no core holds i there.
    planner = Planner(net, optimize=[(0, 1), (0, 1), (0, 1), (0, 1)])
    plan = planner.forward(5, "numpy", np.dtype("float64"))
    assert plan.bias_program is None
    assert "a column of ones" in describe(net, 5, planner=planner)
    cores = random_cores(net, random_state=0)
    x, gates = random_inputs(net, (5,), random_state=1)
    expected = dense_forward(materialize(net, cores), x, gates, True)
    assert_close(forward(net, cores, x, gates, planner=planner), expected, "float64", scale=100)


def test_cp_compiles_to_the_hand_written_sequence():
    plan = planner_of(cp(8, 4, expert_dims=16, rank=3)).forward(32, "numpy", np.dtype("float64"))
    kinds = [(s.kind, s.reshape, s.bias) for s in plan.bias_program.steps]
    # gate @ U_n; x @ U_i[:I] + U_i[I]; Hadamard; h @ U_o.T — no reshapes, no copies
    assert kinds == [
        ("matmul", False, False),
        ("matmul", False, True),
        ("hadamard", True, False),
        ("matmul", False, False),
    ]
    assert plan.bias_program.steps[-1].right_perm == (1, 0)  # a transposed view
    assert plan.bias_program.bias_width == 3
    assert not any(s.bias for s in plan.program.steps)  # [x, 1] @ U_i


def test_intermediates_keep_the_batch_leading():
    plan = planner_of(tr(16, 10, expert_dims=(8, 4), rank=3)).forward(
        64, "numpy", np.dtype("float64")
    )
    for step in plan.program.steps:
        if isinstance(step, PairStep) and "a" in step.legs:
            assert step.legs[0] == "a"  # opt_einsum's symbol for the batch


def test_the_smaller_operand_is_the_one_permuted():
    # TR's last step: (b, r0, r2) with the output core (r2, o, r0). Any order of the
    # summed legs (r0, r2) copies the core; only (r0, r2) leaves the intermediate a view.
    plan = planner_of(tr(768, 1000, expert_dims=128, rank=(4, 4, 94))).forward(
        256, "numpy", np.dtype("float32")
    )
    last = plan.program.steps[-1]
    assert last.left_perm is None
    assert last.equation == "aeg,egd->ad"


@given(networks(), batch_shapes(max_dims=1), st.integers(0, 2**31))
def test_the_bias_split_and_the_ones_column_agree(net, batch_shape, seed):
    if not net.bias or net.splits:
        return  # split legs: tests/functional's oracle tests
    cores = random_cores(net, random_state=seed)
    x, gates = random_inputs(net, batch_shape, random_state=seed)
    rows = x.reshape(-1, net.in_features)
    gates = [g.reshape(rows.shape[0], -1) for g in gates]
    plan = planner_of(net).forward(rows.shape[0], "numpy", np.dtype("float64"))
    ones = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
    concat = plan(*gates, ones, *cores)
    if plan.bias_program is not None:
        assert_close(plan(*gates, rows, *cores, bias_inside=True), concat, "float64", n_terms(net))
    expected = dense_forward(materialize(net, cores), rows, gates, True)
    assert_close(concat, expected, "float64", scale=n_terms(net))


def test_plans_contract_numpy_arrays_as_einsum_does():
    plan = Plan.build("abc,cd,bd->ad", [(3, 4, 5), (5, 6), (4, 6)], lead="a")
    rng = np.random.default_rng(0)
    ops = [rng.standard_normal(s) for s in plan.shapes]
    np.testing.assert_allclose(plan(*ops), np.einsum("abc,cd,bd->ad", *ops))


def test_sums_of_legs_no_other_operand_needs():
    # A path that reduces one operand alone: opt_einsum emits a one-operand step.
    plan = Plan.build("ab,bc->a", [(3, 4), (4, 5)], optimize=[(1,), (0, 1)])
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(s) for s in plan.shapes)
    np.testing.assert_allclose(plan(a, b), np.einsum("ab,bc->a", a, b))
    with tl.backend_context("numpy"):
        assert plan.program.steps[0].equation == "bc->b"
