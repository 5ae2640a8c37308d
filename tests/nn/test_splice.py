"""Splice-in evaluation (issue #27, item 4): ΔCE against a hand-computed reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mumoe.nn import ZeroOutput, block_from_mlp, distill, find_mlps, splice_report, spliced

MXD = {"activation": "relu_topk", "top_k": 4, "normalization": None, "gate_bias": True}


def transformers_or_skip():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[models]')"
    )
    transformers.logging.set_verbosity_error()
    return transformers


def gpt2_and_data():
    t = transformers_or_skip()
    torch.manual_seed(0)
    config = t.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50)
    model = t.GPT2LMHeadModel(config).double().eval()
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    data = [{"input_ids": torch.randint(0, 50, (3, 12)), "attention_mask": mask}]
    return model, data


def reference_ce(model, batch):
    # By hand, in float64: -log p(token t+1 | tokens up to t), over real tokens.
    with torch.no_grad():
        logits = model(**batch).logits
    log_p = torch.log_softmax(logits[:, :-1], dim=-1)
    targets, real = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:] == 1
    picked = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(-picked[real].mean())


def transformers_ce(model, batch):
    # transformers' own loss (labels the inputs, padding -100), which it takes in float32.
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return float(model(**batch, labels=labels).loss)


def test_delta_ce_matches_transformers_own_loss():
    model, data = gpt2_and_data()
    parts = find_mlps(model)[0]
    mlp = model.get_submodule(parts.name)
    block = block_from_mlp(
        mlp.c_fc, mlp.c_proj, "mxd", expert_dims=32, hidden_activation="gelu_tanh", **MXD
    )
    with torch.no_grad():  # move it off the exact start, so that the loss changes
        block.gate.projections[0].normal_(0, 0.5)
    report = splice_report(model, data, {parts.name: block})
    with_block = copy.deepcopy(model)
    with_block.transformer.h[0].mlp = copy.deepcopy(block).eval()
    zeroed = copy.deepcopy(model)
    zeroed.transformer.h[0].mlp = ZeroOutput(32)
    assert report.loss == pytest.approx(reference_ce(model, data[0]), rel=1e-12)
    assert report.loss == pytest.approx(transformers_ce(model, data[0]), rel=1e-6)
    assert report.loss_spliced == pytest.approx(reference_ce(with_block, data[0]), rel=1e-12)
    assert report.loss_zero == pytest.approx(reference_ce(zeroed, data[0]), rel=1e-12)
    assert report.delta == pytest.approx(report.loss_spliced - report.loss)
    assert report.delta != 0 and report.tokens == 11 + 7 + 4
    assert 0 < report.l0 <= 4 and report.accuracy is None
    assert isinstance(model.transformer.h[0].mlp, type(mlp))  # put back


def test_an_exact_start_loses_nothing_and_padding_is_left_out_of_l0():
    model, data = gpt2_and_data()
    mlp = model.transformer.h[1].mlp
    block = block_from_mlp(
        mlp.c_fc, mlp.c_proj, "mxd", expert_dims=32, hidden_activation="gelu_tanh", **MXD
    )
    report = splice_report(model, data, {"transformer.h.1.mlp": block})
    assert report.delta == pytest.approx(0.0, abs=1e-12)
    assert report.recovered == pytest.approx(1.0, abs=1e-9)
    assert report.l0 == 32.0  # tied at the start: every expert, on the 22 tokens only


def test_a_split_mlp_in_a_classifier():
    t = transformers_or_skip()
    torch.manual_seed(0)
    config = t.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
        num_labels=3,
    )
    model = t.BertForSequenceClassification(config).double().eval()
    data = [
        {"input_ids": torch.randint(0, 50, (8, 6)), "labels": torch.randint(0, 3, (8,))}
        for _ in range(2)
    ]
    parts = find_mlps(model)[0]
    layer = model.get_submodule(parts.name)
    block = block_from_mlp(
        layer.intermediate.dense, layer.output.dense, "mxd", expert_dims=16, **MXD
    )
    replacements = {parts.split: block, parts.fc2: nn.Identity()}
    report = splice_report(
        model,
        data,
        replacements,
        task="classification",
        zero={parts.split: ZeroOutput(32), parts.fc2: nn.Identity()},
    )
    assert report.delta == pytest.approx(0.0, abs=1e-12) and report.tokens == 16
    assert report.accuracy == report.accuracy_spliced and 0 <= report.accuracy_zero <= 1


def test_distilling_then_splicing():
    model, data = gpt2_and_data()
    mlp = model.transformer.h[0].mlp
    block = block_from_mlp(
        mlp.c_fc, mlp.c_proj, "mxd", expert_dims=16, hidden_activation="gelu_tanh", **MXD
    )
    with torch.no_grad():
        block.gate.projections[0].normal_(0, 0.3)
    before = splice_report(model, data, {"transformer.h.0.mlp": block}).delta
    from mumoe.nn import ActivationPairs

    pairs = ActivationPairs(
        model, data * 4, inputs_of="transformer.h.0.mlp", batch_size=16, buffer_size=32
    )
    distill(block.double(), pairs, steps=60, lr=3e-3)
    after = splice_report(model, data, {"transformer.h.0.mlp": block}).delta
    assert abs(after) < abs(before)


def test_bad_reports_are_refused_and_the_model_restored():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        splice_report(model, [], {"0": nn.Identity()}, task="regression")
    with pytest.raises(ValueError, match="data yielded no batches"):
        splice_report(model, [], {"0": nn.Identity()}, task="classification")
    with pytest.raises(ValueError, match="batches hold labels"):
        splice_report(model, [torch.randn(2, 4)], {"0": nn.Identity()}, task="classification")
    with pytest.raises(ValueError, match="mappings holding 'input_ids'"):
        splice_report(model, [torch.randn(2, 4)], {"0": nn.Identity()})
    with pytest.raises(AttributeError):
        with spliced(model, {"1": nn.Identity()}):
            pass
    assert isinstance(model[0], nn.Linear)
