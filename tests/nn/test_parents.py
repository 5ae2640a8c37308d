"""Converted layers inside parents that read, alias or tie their linear layers (issue #26)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from mumoe.nn import MuMoE, from_linear, replace_linear


def same_outputs(model, x, **options):
    """Convert ``model``'s selected layers to MxD (exact) and compare outputs in eval mode."""
    model.eval()
    with torch.no_grad():
        before = model(x)
    replace_linear(model, network="mxd", expert_dims=4, **options)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    return model


def test_the_stand_in_answers_dtype_device_and_shape_and_refuses_the_rest():
    layer = from_linear(nn.Linear(8, 4), "mxd", expert_dims=6)
    assert (layer.weight.dtype, layer.weight.device, tuple(layer.weight.shape)) == (
        torch.float32,
        torch.device("cpu"),
        (4, 8),
    )
    assert isinstance(layer.weight, torch.Tensor) and tuple(layer.bias.shape) == (4,)
    assert from_linear(nn.Linear(8, 4, bias=False), "mxd", expert_dims=6).bias is None
    with pytest.raises(RuntimeError, match=r"converted from Linear\(8, 4\) is a μMoE layer"):
        nn.functional.linear(torch.ones(2, 8), layer.weight)
    with pytest.raises(RuntimeError, match="has no dense weight"):
        layer.weight + 1  # operators too (a TypeError would become NotImplemented)
    assert "weight" not in layer.state_dict() and "bias" not in dict(layer.named_parameters())
    assert layer.double().weight.dtype == torch.float64  # follows the cores
    built = MuMoE(8, 4, "mxd", expert_dims=6)  # not converted: no stand-in
    assert not hasattr(built, "weight") and not hasattr(built, "bias")


def test_transformer_encoder_layer_in_eval_runs_the_experts():
    # Issue #26, item 1: its fast path read linear1.weight (AttributeError); a plain weight
    # attribute would let the fused kernel skip the experts.
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True),
        1,
        enable_nested_tensor=False,
    )
    x = torch.randn(3, 5, 16)
    same_outputs(model, x, include=r"linear[12]$")
    layer = model.layers[0].linear1
    assert isinstance(layer, MuMoE)
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(x)
    assert calls  # the experts ran: the fused fast path was not taken


def test_t5_feed_forwards_that_read_the_weights_dtype():
    transformers = pytest.importorskip("transformers", reason="pip install 'mumoe[models]'")
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

    for gated, cls in ((False, T5DenseActDense), (True, T5DenseGatedActDense)):
        config = transformers.T5Config(
            d_model=16,
            d_ff=32,
            feed_forward_proj="gated-gelu" if gated else "relu",
            dropout_rate=0.0,
        )
        torch.manual_seed(0)
        same_outputs(cls(config), torch.randn(2, 3, 16), include=r"^w")


def test_multihead_attentions_out_proj_is_refused_at_conversion():
    model = nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True))
    with pytest.raises(ValueError, match=r"'0\.out_proj' cannot become a μMoE layer: nn\.Multi"):
        replace_linear(model, include="out_proj", network="mxd", expert_dims=4)
    assert isinstance(model[0].out_proj, nn.Linear)


class ComputesWithTheWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return nn.functional.linear(x, self.fc.weight, self.fc.bias)


class CallsOnlyALinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if isinstance(self.fc, nn.Linear) else x


def test_example_inputs_check_any_parent_before_committing():
    x = torch.randn(3, 8)
    model = nn.Sequential(ComputesWithTheWeight())
    replace_linear(copy.deepcopy(model), include="fc", network="mxd", expert_dims=4)  # no probe
    with pytest.raises(ValueError, match=r"failed on example_inputs, so the model is unchanged"):
        replace_linear(model, include="fc", network="mxd", expert_dims=4, example_inputs=(x,))
    assert isinstance(model[0].fc, nn.Linear)
    skipping = nn.Sequential(CallsOnlyALinear())
    with pytest.raises(ValueError, match=r"'0\.fc' ran on example_inputs as linear layers but"):
        replace_linear(skipping, include="fc", network="mxd", expert_dims=4, example_inputs=x)
    assert isinstance(skipping[0].fc, nn.Linear)
    fine = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.BatchNorm1d(8)).train()
    stats = fine[2].running_mean.clone()
    same = replace_linear(fine, include="0", network="mxd", expert_dims=4, example_inputs=(x,))
    assert isinstance(same[0], MuMoE) and same.training and fine[2].training
    assert torch.equal(fine[2].running_mean, stats)  # the probe ran in eval: no state moved


def test_a_converted_layer_in_a_parent_that_computes_with_its_weight_names_itself():
    model = nn.Sequential(ComputesWithTheWeight())
    replace_linear(model, include="fc", network="mxd", expert_dims=4)
    with pytest.raises(RuntimeError, match=r"'0\.fc' is a μMoE layer and has no dense weight"):
        model(torch.randn(3, 8))


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.decoder = self.encoder  # one module, two names (tying by aliasing)

    def forward(self, x):
        return self.decoder(torch.tanh(self.encoder(x)))


@pytest.mark.parametrize("include", ["encoder", "decoder", "coder"])
def test_a_linear_layer_under_two_names_becomes_one_shared_layer(include):
    # Issue #26, item 2: only the first name was replaced and the tie broke silently;
    # including the second name alone matched nothing.
    torch.manual_seed(0)
    model = same_outputs(Aliased(), torch.randn(4, 8), include=include)
    assert isinstance(model.encoder, MuMoE) and model.encoder is model.decoder
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(torch.randn(4, 8)).square().mean().backward()
    optimizer.step()
    assert model.encoder is model.decoder  # still one layer after a step


def gpt2(converted=True):
    transformers = pytest.importorskip("transformers", reason="pip install 'mumoe[models]'")
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        vocab_size=50,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    if converted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            replace_linear(model, include=r"^lm_head$", network="mxd", expert_dims=4)
    return model


def test_a_tied_lm_head_says_the_tie_is_dropped_and_round_trips():
    # Issue #26, item 2: after tie_weights() a stray 'weight' parameter appeared on the
    # μMoE layer, and a strict load_state_dict into a freshly converted model failed.
    model = gpt2(converted=False)
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.warns(UserWarning, match=r"lm_head\.weight is tied to transformer\.wte\.weight"):
        replace_linear(model, include=r"^lm_head$", network="mxd", expert_dims=4)
    with pytest.warns(UserWarning, match=r"'lm_head' is a μMoE layer and holds no dense weight"):
        model.tie_weights()
    assert "lm_head.weight" not in model.state_dict()
    fresh = gpt2()
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_lazy_and_bare_linear_layers_get_a_message_that_says_what_to_do():
    # Issue #26, item 12.
    with pytest.raises(ValueError, match=r"LazyLinear is not initialised yet .* run the model"):
        replace_linear(nn.Sequential(nn.LazyLinear(4)), include="0", expert_dims=4)
    bare = r"model is itself a linear layer \(Linear\).*mumoe\.nn\.from_linear"
    with pytest.raises(TypeError, match=bare):
        replace_linear(nn.Linear(8, 4), include="", expert_dims=4)
