"""Distillation (issue #27, item 3): streamed activation pairs and a block fit to them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mumoe.nn import ActivationPairs, MuMoEBlock, block_from_mlp, distill, fit_metrics


def gpt2():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[models]')"
    )
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50)
    return transformers.GPT2LMHeadModel(config).eval()


def test_pairs_are_the_mlps_rows_with_padding_left_out():
    model = gpt2()
    torch.manual_seed(1)
    batches = []
    for _ in range(3):
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0  # right padding
        batches.append({"input_ids": torch.randint(0, 50, (2, 8)), "attention_mask": mask})
    calls = []
    mlp = model.transformer.h[1].mlp
    handle = mlp.register_forward_hook(lambda m, args, out: calls.append((args[0], out)))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    kept = [b["attention_mask"].reshape(-1) == 1 for b in batches]
    expected_x = torch.cat([x.reshape(-1, 32)[k] for (x, _), k in zip(calls, kept, strict=True)])
    expected_y = torch.cat([y.reshape(-1, 32)[k] for (_, y), k in zip(calls, kept, strict=True)])
    pairs = ActivationPairs(
        model, batches, inputs_of="transformer.h.1.mlp", batch_size=8, buffer_size=16
    )
    xs, ys = zip(*pairs, strict=True)
    assert all(len(x) <= 8 for x in xs)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == expected_x.shape == (3 * 13, 32)  # 16 - 3 padded tokens a batch
    # The same rows, shuffled together: sort both by their first column to compare.
    order, expected_order = x[:, 0].argsort(), expected_x[:, 0].argsort()
    torch.testing.assert_close(x[order], expected_x[expected_order])
    torch.testing.assert_close(y[order], expected_y[expected_order])
    assert not torch.equal(x, expected_x)  # shuffled across batches
    assert model.training is False


def test_a_split_mlp_streams_from_two_modules():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config).eval()
    data = [{"input_ids": torch.randint(0, 50, (2, 6))}]
    pairs = list(
        ActivationPairs(
            model,
            data,
            inputs_of="encoder.layer.0.intermediate",
            outputs_of="encoder.layer.0.output.dense",
            batch_size=4,
            buffer_size=8,
        )
    )
    x, y = (torch.cat(t) for t in zip(*pairs, strict=True))
    layer = model.encoder.layer[0]
    with torch.no_grad():
        torch.testing.assert_close(layer.output.dense(layer.intermediate(x)), y)


def test_bad_streams_are_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="data yielded no batches"):
        list(ActivationPairs(model, [], inputs_of="0"))
    masked = [{"input": torch.randn(2, 3, 4), "attention_mask": torch.zeros(2, 3)}]

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, input, attention_mask=None):
            return self.inner(input)

    with pytest.raises(ValueError, match="every token of data was masked out"):
        list(ActivationPairs(Keyword(), masked, inputs_of="inner"))
    wrong = [{"input": torch.randn(2, 3, 4), "attention_mask": torch.ones(2, 5)}]
    with pytest.raises(ValueError, match="covers 10 tokens, the submodule saw 6 rows"):
        list(ActivationPairs(Keyword(), wrong, inputs_of="inner"))
    with pytest.raises(AttributeError):
        ActivationPairs(model, [], inputs_of="mlp")
    with pytest.raises(ValueError, match="must hold at least one batch"):
        ActivationPairs(model, [], inputs_of="0", batch_size=64, buffer_size=32)


def mlp_pairs(seed=0, n=2048, batch=128):
    torch.manual_seed(seed)
    target = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(n, 16)
    with torch.no_grad():
        y = target(x)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def test_distillation_lowers_the_error_on_a_fixed_budget():
    pairs = mlp_pairs()
    torch.manual_seed(0)
    block = MuMoEBlock(
        16,
        64,
        16,
        "mxd",
        expert_dims=32,
        encoder="linear",
        activation="relu_topk",
        top_k=4,
        normalization=None,
        gate_bias=True,
        output_bias="shared",
    )
    logged = []
    history = distill(
        block, pairs, steps=300, lr=3e-3, log_every=10, on_step=lambda s, m: logged.append(s)
    )
    assert history.step == list(range(10, 301, 10)) == logged
    assert history.nmse[-1] < 0.2 * history.nmse[0]
    assert all(0 < l0 <= 4 for l0 in history.l0)
    assert len(history.fvu) == len(history.dead) == 30
    # The metrics are fit_metrics of the logged batch.
    x, y = pairs[-1]
    metrics = fit_metrics(block(x), y, block(x, return_gates=True)[1])
    assert set(metrics) == {"nmse", "fvu", "l0"}


def test_dead_experts_get_their_gate_resampled():
    pairs = mlp_pairs(seed=1)
    fc1, fc2 = nn.Linear(16, 64), nn.Linear(64, 16)
    block = block_from_mlp(
        fc1,
        fc2,
        "mxd",
        expert_dims=16,
        activation="relu_topk",
        top_k=4,
        normalization=None,
        gate_bias=True,
    )
    with torch.no_grad():
        block.gate.projections[0].normal_(0, 0.1)
        block.gate.biases[0][8:] = -100.0  # half the experts can never fire
    history = distill(block, pairs, steps=20, lr=1e-3, resample_every=10)
    assert history.resampled >= 8
    assert history.dead[9] >= 8  # dead before the first resampling
    assert (block.gate.biases[0][8:] > -100).all()


def test_distill_refuses_empty_pairs_and_bad_budgets():
    block = MuMoEBlock(4, 8, 4, expert_dims=2, rank=2, normalization=None)
    with pytest.raises(ValueError, match="pairs yielded nothing"):
        distill(block, [], steps=1)
    with pytest.raises(ValueError, match="steps"):
        distill(block, mlp_pairs(), steps=0)
    with pytest.raises(ValueError, match="needs a block with one gate, found 0"):
        distill(nn.Linear(4, 4), [], steps=1, resample_every=2)
