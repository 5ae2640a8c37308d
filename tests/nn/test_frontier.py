"""The sparsity–faithfulness frontier (issue #27, item 5): MxD against matched transcoders."""

from __future__ import annotations

import math

import pytest
import torch

from mumoe.nn import Transcoder, distill, find_mlps, frontier, transcoder_width


def test_a_transcoder_is_relu_topk_latents_and_a_linear_decoder():
    torch.manual_seed(0)
    tc = Transcoder(8, 32, 6, top_k=3).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    z = torch.relu(tc.encoder(x))
    kth = torch.topk(z, 3, dim=-1).values[:, -1:]
    expected = tc.decoder(torch.where(z >= kth, z, 0.0))
    torch.testing.assert_close(tc(x), expected)
    n_params = sum(p.numel() for p in tc.parameters())
    assert n_params == 32 * (8 + 6 + 1) + 6
    assert transcoder_width(n_params, 8, 6) == 32 and transcoder_width(n_params - 1, 8, 6) == 31
    with pytest.raises(ValueError, match="no transcoder of 8 -> 6 fits 10"):
        transcoder_width(10, 8, 6)


def test_a_transcoder_distils_too():
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = torch.tanh(x @ torch.randn(8, 6))
    pairs = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    history = distill(Transcoder(8, 64, 6, top_k=8), pairs, steps=150, lr=1e-2)
    assert history.nmse[-1] < 0.5 * history.nmse[0] and max(history.l0) <= 8


def test_the_frontier_records_both_kinds_at_matched_parameters():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16, vocab_size=40)
    model = transformers.GPT2LMHeadModel(config).eval()
    data = [{"input_ids": torch.randint(0, 40, (4, 12))} for _ in range(4)]
    records = frontier(
        model,
        find_mlps(model)[0],
        data[:3],
        data[3:],
        ks=[2, 4],
        expert_dims=32,
        seeds=[0, 1],
        steps=20,
        lr=1e-3,
        batch_size=32,
        buffer_size=64,
    )
    assert len(records) == 2 * 2 * 2
    assert {(r["kind"], r["k"], r["seed"]) for r in records} == {
        (kind, k, s) for kind in ("mxd", "transcoder") for k in (2, 4) for s in (0, 1)
    }
    for mxd, tc in zip(records[::2], records[1::2], strict=True):
        assert tc["params"] <= mxd["params"] < tc["params"] + 16 + 16 + 1  # one latent more
        assert mxd["l0"] <= 32 and tc["l0"] <= tc["k"]
        assert all(math.isfinite(r[key]) for r in (mxd, tc) for key in ("nmse", "delta_ce"))
    assert type(model.transformer.h[0].mlp).__name__ == "GPT2MLP"  # put back after splicing
