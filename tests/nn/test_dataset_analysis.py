"""The analysis helpers over data sets: DataLoaders, dict batches, padding, labels from the batch
or beside it, chosen layers, token windows, and memory that does not grow with the data."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
import torch

from mumoe.analysis import class_histogram, class_mass, expert_load, top_samples
from mumoe.nn import (
    CPMuMoE,
    MuMoE,
    collect_gates,
    counterfactual_histogram,
    edit_experts,
    gate_statistics,
)


class TinyLM(torch.nn.Module):
    """Embedding, a μMoE layer, a head: a language model's shape, keyword inputs."""

    def __init__(self, vocab=30, width=8, experts=6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mlp = MuMoE(width, width, "cp", expert_dims=experts, rank=4, activation="softmax")
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.mlp(self.embed(input_ids)))


def classifier(seed=0):
    torch.manual_seed(seed)
    layer = CPMuMoE(8, 3, expert_dims=5, rank=3, normalization=None, activation="softmax")
    with torch.no_grad():
        layer.gate.projections[0].normal_()
    return layer.eval()


def loader(x, y, batch_size=7):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
    )


def test_a_dataloader_gives_the_statistics_of_the_whole_tensor():
    model = classifier()
    torch.manual_seed(1)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    statistics = gate_statistics(model, loader(x, y), labels=1, k=4)["gate"][0]
    (gates,) = collect_gates(model, x)
    np.testing.assert_array_equal(statistics.load, expert_load(gates))
    np.testing.assert_allclose(statistics.class_mass, class_mass(gates, y.numpy()), rtol=1e-6)
    np.testing.assert_array_equal(statistics.class_histogram, class_histogram(gates, y.numpy()))
    np.testing.assert_array_equal(statistics.top_samples, top_samples(gates, 4))
    # labels beside the data, and the collected gates of the loader
    beside = gate_statistics(model, (batch for batch, _ in loader(x, y)), labels=y.numpy())
    np.testing.assert_array_equal(beside["gate"][0].class_histogram, statistics.class_histogram)
    np.testing.assert_array_equal(collect_gates(model, loader(x, y))[0], gates)


def lm_batches(n_batches, seed=0, batch=3, length=6):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        ids = torch.randint(0, 30, (batch, length), generator=generator)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, -2:] = 0  # padding at the end of the first row
        yield {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(batch) % 2}


def test_language_model_tokens_padding_per_sample_labels_and_token_windows():
    torch.manual_seed(0)
    model = TinyLM().eval()
    statistics = gate_statistics(
        model,
        lm_batches(4),
        gates="mlp",
        labels="labels",
        mask="attention_mask",
        tokens="input_ids",
        window=(2, 1),
        k=3,
    )["mlp.gate"][0]
    rows, coefficients, labels, windows = 0, [], [], []
    for batch in lm_batches(4):
        keep = batch["attention_mask"].bool()
        with torch.no_grad():
            _, (gates,) = model.mlp(model.embed(batch["input_ids"]), return_gates=True)
        coefficients.append(gates[keep].numpy())
        labels.append(batch["labels"][:, None].expand(-1, 6)[keep].numpy())
        padded = torch.nn.functional.pad(batch["input_ids"], (2, 1), value=-1)
        window = padded.unfold(1, 4, 1)  # (B, T, 4): tokens t-2 .. t+1
        windows.append(window[keep].numpy())
        rows += int(keep.sum())
    coefficients, labels, windows = map(np.concatenate, (coefficients, labels, windows))
    assert statistics.rows == rows == 4 * (3 * 6 - 2)
    np.testing.assert_allclose(statistics.class_mass, class_mass(coefficients, labels), rtol=1e-5)
    np.testing.assert_array_equal(statistics.top_samples, top_samples(coefficients, 3))
    np.testing.assert_array_equal(statistics.top_contexts, windows[statistics.top_samples])


def test_memory_does_not_grow_with_the_data():
    torch.manual_seed(0)
    model = TinyLM(experts=64).eval()

    def peak(n_batches):
        gc.collect()
        tracemalloc.start()
        gate_statistics(
            model,
            lm_batches(n_batches, batch=16, length=32),
            labels="labels",
            mask="attention_mask",
            tokens="input_ids",
        )
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return high

    peak(2)  # warm up: caches and plans are built once
    small, large = peak(10), peak(40)
    # Four times the data: the same peak, within a small margin (the statistics' own size
    # does not depend on it; a growing record would add ~40 batches x 512 rows x 64 x 4 B).
    assert large < small * 1.2 + 64 * 1024, (small, large)


def test_counterfactuals_over_a_dataloader_equal_the_tensor_version_and_target_one_layer():
    model = classifier()
    torch.manual_seed(2)
    x, y = torch.randn(30, 8), torch.randint(0, 3, (30,))
    whole = counterfactual_histogram(model, x, y.numpy(), n_classes=3)
    streamed = counterfactual_histogram(model, loader(x, y), 1, n_classes=3)
    np.testing.assert_array_equal(streamed, whole)

    two = torch.nn.Sequential(classifier(0), torch.nn.Linear(3, 8), classifier(1))
    targeted = counterfactual_histogram(two, loader(x, y), 1, layer="2", n_classes=3)
    with torch.no_grad():
        before = two(x).argmax(-1)
        expected = np.zeros((5, 3), dtype=np.int64)
        for expert in range(5):
            with edit_experts(two[2], {expert: 0.0}):
                changed = (two(x).argmax(-1) != before).numpy()
            expected[expert] = np.bincount(y.numpy()[changed], minlength=3)
    np.testing.assert_array_equal(targeted, expected)
    with pytest.raises(
        ValueError,
        match=r"layer='9' is not a module of the model; its μMoE layers are \['0', '2'\]",
    ):
        counterfactual_histogram(two, x, y.numpy(), layer="9")


def test_counterfactuals_of_a_language_model_count_unpadded_tokens():
    torch.manual_seed(0)
    model = TinyLM().eval()
    with torch.no_grad():
        model.mlp.gate.projections[0].normal_()  # each token its own mix of experts
    histogram = counterfactual_histogram(
        model, lm_batches(2), "labels", mask="attention_mask", n_classes=2
    )
    expected = np.zeros((6, 2), dtype=np.int64)
    with torch.no_grad():
        for batch in lm_batches(2):
            ids, keep = batch["input_ids"], batch["attention_mask"].bool()
            before = model(ids).argmax(-1)
            labels = batch["labels"][:, None].expand_as(ids)  # a sample's label, each token
            for expert in range(6):
                with edit_experts(model, {expert: 0.0}):
                    changed = (model(ids).argmax(-1) != before) & keep
                expected[expert] += np.bincount(labels[changed].numpy(), minlength=2)
    np.testing.assert_array_equal(histogram, expected)
    assert histogram.sum() > 0  # the comparison is not between zeros


def test_bad_data_and_names_are_refused_with_what_exists():
    model = classifier()
    x, y = torch.randn(10, 8), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="data yielded no batches"):
        gate_statistics(model, iter([]))
    with pytest.raises(ValueError, match="data yielded no batches"):
        counterfactual_histogram(model, iter([]), np.zeros(0, dtype=int))
    with pytest.raises(
        ValueError, match=r"'blocks.0' is neither a gate .* its gates are \['gate'\]"
    ):
        gate_statistics(model, x, gates="blocks.0")
    with pytest.raises(ValueError, match="labels has 9 entries, fewer than the data's samples"):
        gate_statistics(model, loader(x, y), labels=np.zeros(9, dtype=int))
    with pytest.raises(ValueError, match="labels has 11 entries, but the data has 10 samples"):
        gate_statistics(model, loader(x, y), labels=np.zeros(11, dtype=int))
    with pytest.raises(ValueError, match=r"labels='y' is not in the batch, which holds \['x'\]"):
        gate_statistics(model, [{"x": x}], labels="y")
    with pytest.raises(ValueError, match="labels=2 is not a position of the batch"):
        gate_statistics(model, loader(x, y), labels=2)
    with pytest.raises(ValueError, match=r"mask must have the gates' leading shape \(10,\)"):
        gate_statistics(model, [(x, torch.ones(3))], mask=1)
    with pytest.raises(
        TypeError, match="data must be a tensor, a mapping of tensors, or an iterable"
    ):
        gate_statistics(model, 3)
    with pytest.raises(ValueError, match="window must be"):
        gate_statistics(model, x, window=(2,))


def test_a_model_in_training_with_a_balance_loss_is_analysed_as_a_copy():
    layer = CPMuMoE(8, 3, expert_dims=4, rank=2, balance={"uniform_kl": 0.1}).train()
    layer(torch.randn(5, 8)).sum().backward()  # aux_loss now holds a graph node
    statistics = gate_statistics(layer, torch.randn(10, 8))["gate"][0]
    assert statistics.rows == 10 and layer.training and layer.gate.aux_loss is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_analysed(dtype):
    model = classifier().to(dtype)
    x, y = torch.randn(12, 8, dtype=dtype), torch.randint(0, 3, (12,))
    statistics = gate_statistics(model, loader(x, y), labels=1)["gate"][0]
    assert statistics.rows == 12 and statistics.class_mass.shape == (5, 3)
    assert collect_gates(model, x)[0].shape == (12, 5)


class Shared(torch.nn.Module):
    """One μMoE layer applied twice in a forward pass (weights shared across depth)."""

    def __init__(self):
        super().__init__()
        self.layer = MuMoE(8, 8, "cp", expert_dims=5, rank=2)
        self.between = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.layer(self.between(self.layer(x)))


def test_a_gate_called_twice_in_a_forward_pass_counts_both_calls():
    model = Shared().eval()
    x = torch.randn(6, 8)
    statistics = gate_statistics(model, x, gates="layer")["layer.gate"][0]
    assert statistics.rows == 12
    assert collect_gates(model, x)[0].shape == (12, 5)


def test_naming_a_gate_twice_counts_it_once():
    model = classifier()
    statistics = gate_statistics(model, torch.randn(5, 8), gates=["gate", "", "gate"])
    assert list(statistics) == ["gate"] and statistics["gate"][0].rows == 5


def test_labels_marked_ignore_index_are_left_out():
    model = classifier()
    x = torch.randn(6, 8)
    labels = np.array([0, 1, -100, 2, -100, 1])
    statistics = gate_statistics(model, x, labels=labels)["gate"][0]
    assert statistics.rows == 4
    with pytest.raises(ValueError, match="non-negative"):
        gate_statistics(model, x, labels=labels, ignore_index=None)
