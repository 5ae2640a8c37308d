"""GateStatistics, chunk by chunk, against the one-shot statistics on the whole data set."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mumoe.analysis import class_histogram, class_mass, expert_load, top_samples
from mumoe.gates import GateStatistics
from mumoe.testing import seeds


@st.composite
def chunked_data(draw: st.DrawFn):
    """Coefficients (S, N) with ties and zeros, labels, a mask, token contexts, and chunk cuts."""
    s, n, c = draw(st.integers(1, 40)), draw(st.integers(1, 9)), draw(st.integers(1, 5))
    rng = np.random.RandomState(draw(seeds()))
    gates = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(s, n))  # many ties
    gates += rng.uniform(size=(s, n)) * (rng.uniform(size=(s, n)) < 0.3)
    labels = rng.randint(c, size=s)
    mask = rng.uniform(size=s) < 0.8
    contexts = rng.randint(0, 100, size=(s, 3))
    cuts = sorted(draw(st.lists(st.integers(0, s), max_size=5)))
    k = draw(st.integers(1, 6))
    return gates, labels, mask, contexts, [0, *cuts, s], k


@given(chunked_data())
def test_chunks_add_up_to_the_whole(data):
    gates, labels, mask, contexts, cuts, k = data
    statistics = GateStatistics(gates.shape[1], k=k)
    for a, b in itertools.pairwise(cuts):
        statistics.update(gates[a:b], labels=labels[a:b], mask=mask[a:b], contexts=contexts[a:b])
    kept, kept_labels = gates[mask], labels[mask]
    assert statistics.rows == kept.shape[0]
    np.testing.assert_allclose(statistics.mass, kept.sum(axis=0))
    np.testing.assert_array_equal(statistics.load, expert_load(kept))
    if kept.shape[0]:
        n_classes = statistics.class_mass.shape[1]
        assert n_classes == kept_labels.max() + 1
        np.testing.assert_array_equal(
            statistics.class_histogram, class_histogram(kept, kept_labels, n_classes=n_classes)
        )
        np.testing.assert_allclose(
            statistics.class_mass, class_mass(kept, kept_labels, n_classes=n_classes)
        )
        top = min(k, kept.shape[0])
        np.testing.assert_array_equal(statistics.top_samples, top_samples(kept, top))
        np.testing.assert_array_equal(
            statistics.top_values, np.take_along_axis(kept.T, statistics.top_samples, axis=1)
        )
        np.testing.assert_array_equal(
            statistics.top_contexts, contexts[mask][statistics.top_samples]
        )


@given(chunked_data())
def test_the_functions_take_an_iterator_of_chunks(data):
    gates, labels, _, _, cuts, k = data
    pieces = list(itertools.pairwise(cuts))

    def chunks(array):
        return (array[a:b] for a, b in pieces)

    n_classes = labels.max() + 1
    np.testing.assert_array_equal(expert_load(chunks(gates)), expert_load(gates))
    np.testing.assert_array_equal(
        class_histogram(chunks(gates), chunks(labels), n_classes=n_classes),
        class_histogram(gates, labels, n_classes=n_classes),
    )
    np.testing.assert_allclose(
        class_mass(chunks(gates), chunks(labels), n_classes=n_classes),
        class_mass(gates, labels, n_classes=n_classes),
    )
    k = min(k, gates.shape[0])
    np.testing.assert_array_equal(top_samples(chunks(gates), k), top_samples(gates, k))


def test_per_token_rows_and_padding():
    statistics = GateStatistics(2, k=2)
    tokens = np.array([[[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]])  # (1 sample, 3 tokens, N)
    statistics.update(tokens, mask=np.array([[True, True, False]]), labels=np.array([[0, 1, 1]]))
    assert statistics.rows == 2
    np.testing.assert_array_equal(statistics.class_histogram, [[1, 0], [0, 1]])
    np.testing.assert_array_equal(statistics.top_samples, [[0, 1], [1, 0]])


def test_bad_chunks_are_refused_with_what_was_expected():
    statistics = GateStatistics(3)
    with pytest.raises(ValueError, match=r"gates must have shape \(\.\.\., 3\).*got \(4, 2\)"):
        statistics.update(np.ones((4, 2)))
    with pytest.raises(TypeError, match="gates must be floating point"):
        statistics.update(np.ones((4, 3), dtype=int))
    with pytest.raises(ValueError, match=r"mask must be a bool or integer array of shape \(4,\)"):
        statistics.update(np.ones((4, 3)), mask=np.ones(4))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        statistics.update(np.ones((4, 3)), labels=np.zeros(5, dtype=int))
    statistics.update(np.ones((4, 3)) / 3, labels=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="labels must come with every chunk or with none"):
        statistics.update(np.ones((4, 3)) / 3)
    bounded = GateStatistics(3, n_classes=2)
    with pytest.raises(ValueError, match="labels"):
        bounded.update(np.ones((2, 3)), labels=np.array([0, 2]))


def test_chunked_labels_must_match_the_chunks_of_gates():
    gates = [np.ones((2, 3)) / 3, np.ones((1, 3)) / 3]
    with pytest.raises(ValueError, match="labels ran out before gates"):
        class_mass(iter(gates), iter([np.zeros(2, dtype=int)]))
    with pytest.raises(ValueError, match="labels hold more chunks than gates"):
        class_mass(iter(gates), iter([np.zeros(2, dtype=int), np.zeros(1, dtype=int)] * 2))
    with pytest.raises(TypeError, match="give labels as an iterable of chunks too"):
        class_mass(iter(gates), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="gates yielded no chunk"):
        expert_load(iter([]))
    with pytest.raises(ValueError, match="labels are required"):
        class_mass(iter(gates), None)


def test_a_vocabulary_of_classes_is_summed_by_the_classes_present():
    rng = np.random.default_rng(0)
    gates = rng.uniform(size=(200, 6)).astype(np.float32)
    labels = rng.integers(0, 3000, size=200)  # a vocabulary of classes, most unseen
    statistics = GateStatistics(6)
    statistics.update(gates[:120], labels=labels[:120])
    statistics.update(gates[120:], labels=labels[120:])
    expected = class_mass(gates.astype(np.float64), labels)
    np.testing.assert_allclose(statistics.class_mass, expected, rtol=1e-6)
    np.testing.assert_array_equal(statistics.class_histogram, class_histogram(gates, labels))


def test_a_refused_chunk_leaves_the_statistics_as_they_were():
    statistics = GateStatistics(3, k=2)
    with pytest.raises(ValueError, match="labels must have shape"):
        statistics.update(np.ones((4, 3)) / 3, labels=np.zeros(5, dtype=int))
    statistics.update(np.ones((4, 3)) / 3)  # unlabelled still allowed: nothing was set
    assert statistics.rows == 4 and statistics.class_mass is None
    labelled = GateStatistics(3)
    labelled.update(np.ones((2, 3)) / 3, labels=np.array([0, 0]))
    with pytest.raises(ValueError, match="contexts must have shape"):
        labelled.update(np.ones((2, 3)) / 3, labels=np.array([5, 5]), contexts=np.ones(3))
    assert labelled.class_mass.shape == (3, 1) and labelled.rows == 2
    with pytest.raises(ValueError, match="non-finite coefficients"):
        labelled.update(np.array([[np.nan, 0.5, 0.5]]), labels=np.array([0]))
    assert labelled.rows == 2


def test_an_integer_mask_of_zeros_and_ones_is_a_mask():
    statistics = GateStatistics(2)
    statistics.update(np.array([[0.9, 0.1], [0.2, 0.8]]), mask=np.array([1, 0]))
    assert statistics.rows == 1
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        statistics.update(np.array([[0.9, 0.1]]), mask=np.array([2]))
