"""Expert analysis and editing: statistics against brute force, edits against the scaled W."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mumoe.analysis import (
    class_histogram,
    expert_coefficients,
    expert_load,
    mean_polysemanticity,
    polysemanticity,
    top_samples,
)
from mumoe.testing import seeds


@st.composite
def gated_samples(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """Coefficients (S, N) on the simplex (some exact zeros), labels (S,), and C."""
    s, n, c = draw(st.integers(1, 30)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
    rng = np.random.RandomState(draw(seeds()))
    raw = rng.exponential(size=(s, n)) * (rng.uniform(size=(s, n)) < 0.6)
    raw[np.arange(s), rng.randint(n, size=s)] += rng.exponential(size=s) * 3
    return raw / raw.sum(1, keepdims=True), rng.randint(c, size=s), c


# ----------------------------------------------------------------- statistics


@given(gated_samples(), st.floats(0.05, 1.0))
def test_load_and_histogram_count_what_they_say(sample, threshold):
    coefficients, labels, c = sample
    s, n = coefficients.shape
    load = expert_load(coefficients, threshold)
    histogram = class_histogram(coefficients, labels, n_classes=c, threshold=threshold)
    expected = np.zeros((n, c), dtype=int)
    for row in range(s):
        for expert in range(n):
            if coefficients[row, expert] >= threshold:
                expected[expert, labels[row]] += 1
    np.testing.assert_array_equal(histogram, expected)
    np.testing.assert_array_equal(load, expected.sum(1))


@given(
    hnp.arrays(
        np.int64, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.integers(0, 50)
    )
)
def test_polysemanticity_is_the_distance_to_the_dominant_one_hot(histogram):
    psi = polysemanticity(histogram)
    c = histogram.shape[1]
    for row, value in zip(histogram, psi, strict=True):
        if row.sum() == 0:
            assert math.isnan(value)
            continue
        p = row / row.sum()
        assert value == pytest.approx(np.linalg.norm(p - np.eye(c)[np.argmax(row)]), abs=1e-12)
        assert -1e-12 <= value <= math.sqrt(1 - 1 / c) + 1e-12
    # Invariant to the classes' order and to the number of samples.
    perm = np.random.RandomState(0).permutation(c)
    np.testing.assert_allclose(polysemanticity(histogram[:, perm]), psi, equal_nan=True)
    np.testing.assert_allclose(polysemanticity(3 * histogram), psi, equal_nan=True)


def test_polysemanticity_extremes_and_min_count():
    histogram = np.array([[0, 7, 0, 0], [2, 2, 2, 2], [1, 0, 0, 0], [0, 0, 0, 0]])
    psi = polysemanticity(histogram)
    np.testing.assert_allclose(psi[:3], [0.0, math.sqrt(3 / 4), 0.0], atol=1e-12)
    assert math.isnan(psi[3])
    assert np.isnan(polysemanticity(histogram, min_count=2)[2])
    assert mean_polysemanticity(histogram) == pytest.approx(math.sqrt(3 / 4) / 3)
    assert mean_polysemanticity(histogram, min_count=2) == pytest.approx(math.sqrt(3 / 4) / 2)
    assert math.isnan(mean_polysemanticity(histogram, min_count=100))


@given(gated_samples(), st.integers(1, 5))
def test_top_samples_are_each_experts_largest_coefficients(sample, k):
    coefficients = sample[0]
    k = min(k, coefficients.shape[0])
    top = top_samples(coefficients, k)
    assert top.shape == (coefficients.shape[1], k)
    for expert, rows in enumerate(top):
        chosen = coefficients[rows, expert]
        assert np.all(np.diff(chosen) <= 0)
        rest = np.delete(coefficients[:, expert], rows)
        assert rest.size == 0 or rest.max() <= chosen.min()


@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.integers(1, 4), seeds())
def test_joint_coefficients_are_the_products_in_c_order(dims, s, seed):
    rng = np.random.RandomState(seed)
    gates = [rng.uniform(size=(s, 2, n)) for n in dims]  # samples and tokens
    joint = expert_coefficients(gates)
    assert joint.shape == (2 * s, math.prod(dims))
    for index in np.ndindex(*dims):
        expected = np.prod([g[..., i] for g, i in zip(gates, index, strict=True)], axis=0)
        np.testing.assert_allclose(joint[:, np.ravel_multi_index(index, dims)], expected.ravel())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: expert_load(np.ones(3)),
            ValueError,
            r"must be 2-D \(samples, experts\); got shape \(3,\)",
        ),
        (
            lambda: expert_load(np.ones((2, 2), dtype=int)),
            TypeError,
            "must be floating point, got int64",
        ),
        (
            lambda: expert_load(np.ones((2, 2)), 0.0),
            ValueError,
            r"threshold must be in \(0, 1\], got 0.0",
        ),
        (
            lambda: class_histogram(np.ones((2, 2)), [0, 1, 1]),
            ValueError,
            r"labels must have shape \(2,\)",
        ),
        (
            lambda: class_histogram(np.ones((2, 2)), [0.0, 1.0]),
            TypeError,
            "labels must be integers",
        ),
        (
            lambda: class_histogram(np.ones((2, 2)), [0, -1]),
            ValueError,
            "non-negative class indices, got -1",
        ),
        (
            lambda: class_histogram(np.ones((2, 2)), [0, 3], n_classes=2),
            ValueError,
            "hold class 3 but n_classes is 2",
        ),
        (lambda: polysemanticity(np.ones(3)), ValueError, r"must be 2-D \(experts, classes\)"),
        (
            lambda: polysemanticity(np.ones((2, 2)), min_count=0),
            ValueError,
            "min_count must be a positive int",
        ),
        (lambda: polysemanticity(-np.ones((2, 2))), ValueError, "must be non-negative"),
        (lambda: top_samples(np.ones((2, 3)), 3), ValueError, r"k must be an int in \[1, 2\]"),
        (
            lambda: expert_coefficients([np.ones((2, 3)), np.ones((3, 3))]),
            ValueError,
            "same leading dimensions",
        ),
        (lambda: expert_coefficients([]), ValueError, "at least one level"),
    ],
)
def test_statistics_refuse_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
