"""replace_mlp on real model definitions (issue #27, item 2): one block per MLP, exact start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mumoe.nn import MuMoEBlock, find_mlps, hidden_activation_of, replace_mlp

MXD = {
    "network": "mxd",
    "expert_dims": 64,
    "activation": "relu_topk",
    "top_k": 4,
    "normalization": None,
    "gate_bias": True,
}


def transformers_or_skip():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[models]')"
    )
    transformers.logging.set_verbosity_error()
    return transformers


def gpt2():
    t = transformers_or_skip()
    config = t.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50)
    return t.GPT2LMHeadModel(config), {"input_ids": torch.randint(0, 50, (2, 9))}


def bert():
    t = transformers_or_skip()
    config = t.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    return t.BertModel(config), {"input_ids": torch.randint(0, 50, (2, 9))}


def llama():
    t = transformers_or_skip()
    config = t.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=48,
        vocab_size=50,
        max_position_embeddings=16,
    )
    return t.LlamaForCausalLM(config), {"input_ids": torch.randint(0, 50, (2, 9))}


def vit():
    t = transformers_or_skip()
    config = t.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
        num_channels=3,
    )
    return t.ViTModel(config), {"pixel_values": torch.randn(2, 3, 16, 16)}


def output_of(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize(
    ("build", "mlps", "activation"),
    [
        (gpt2, ["transformer.h.0.mlp", "transformer.h.1.mlp"], "gelu_tanh"),
        (bert, ["encoder.layer.0", "encoder.layer.1"], "gelu"),
        (llama, ["model.layers.0.mlp", "model.layers.1.mlp"], "silu"),
        (vit, None, "gelu"),  # split (transformers 4) or an mlp module (5), by version
    ],
    ids=["gpt2", "bert", "llama", "vit"],
)
def test_every_mlp_becomes_one_block_that_starts_exactly(build, mlps, activation):
    torch.manual_seed(0)
    model, inputs = build()
    model = model.double().eval()
    found = find_mlps(model)
    assert len(found) == 2 and {p.activation for p in found} == {activation}
    assert mlps is None or [p.name for p in found] == mlps
    with torch.no_grad():
        before = output_of(model, inputs)
    replace_mlp(model, include=".", **MXD)
    blocks = [m for m in model.modules() if isinstance(m, MuMoEBlock)]
    assert len(blocks) == 2 and all(b.hidden_activation == activation for b in blocks)
    assert all(b.glu == (build is llama) for b in blocks)
    model.eval()
    with torch.no_grad():
        after = output_of(model, inputs)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)


def test_include_selects_by_name_and_lists_the_mlps_when_none_match():
    model, _ = gpt2()
    replace_mlp(model, include=r"h\.1\.mlp$", **MXD)
    assert isinstance(model.transformer.h[1].mlp, MuMoEBlock)
    assert not isinstance(model.transformer.h[0].mlp, MuMoEBlock)
    with pytest.raises(ValueError, match=r"matches none of the model's 1 MLPs: 'transformer.h.0"):
        replace_mlp(model, include="attn", **MXD)


def test_a_failed_conversion_leaves_the_model_untouched():
    model, _ = gpt2()
    mlps = [block.mlp for block in model.transformer.h]
    with pytest.raises(ValueError, match=r"replacing the MLP 'transformer\.h\.0\.mlp' failed"):
        replace_mlp(
            model,
            include="mlp",
            network="mxd",
            expert_dims=64,
            activation="relu_topk",
            top_k=4,
            normalization=None,
        )  # no gate_bias: no exact start
    assert [block.mlp for block in model.transformer.h] == mlps


def test_an_mlp_that_computes_something_else_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.fc2(self.act(self.fc1(x)))  # a residual inside

    model = nn.Sequential(Residual())
    with pytest.raises(ValueError, match=r"'0' \(Residual\) does not compute fc2\(act\(fc1"):
        replace_mlp(model, include=".", **MXD)
    assert isinstance(model[0], Residual)


def test_activations_are_recognised_by_their_values():
    assert hidden_activation_of(nn.GELU()) == "gelu"
    assert hidden_activation_of(nn.functional.silu) == "silu"
    with pytest.raises(ValueError, match="the MLP's activation Tanh is none of"):
        hidden_activation_of(nn.Tanh())
    model = nn.Module()
    model.fc1, model.act, model.fc2 = nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)
    assert find_mlps(model) == []  # an activation no block computes: not a candidate


def test_a_timm_vit_where_timm_installs():
    try:
        import timm
    except ImportError as error:  # not installed, or installed without torchvision
        pytest.skip(
            f"timm does not import ({error}); it needs torchvision, which has no wheel "
            "matching the local torch CPU build of these machines: pip install timm where it has"
        )
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
    )
    model = model.double().eval()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        before = model(images)
    replace_mlp(model, include="mlp", **MXD)
    assert sum(isinstance(m, MuMoEBlock) for m in model.modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), before, rtol=1e-10, atol=1e-10)
