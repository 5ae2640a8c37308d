"""Converting real third-party model definitions (transformers, timm): built from configs,
random weights, nothing downloaded (``pip install -e ".[models]"``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mumoe.inference import load
from mumoe.nn import (
    MuMoE,
    linear_weights,
    replace_linear,
    save,
)

# timm's MLP-Mixer test passed on 2026-12-01 in a venv with torch 2.14.1, torchvision 0.29.1
# and timm 1.0.31 (PYTHONPATH=. python -m pytest tests/nn/test_pretrained.py).


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def check_conversion(model, include, inputs, forward, tmp_path):
    """MxD: outputs unchanged; CP at rank='same': parameters kept; training, state dicts, files."""
    model.eval()
    with torch.no_grad():
        reference = forward(model, inputs)
    targets = {name: m for name, m in model.named_modules() if name and _is_linear(m)}
    chosen = [name for name in targets if __import__("re").search(include, name)]
    assert chosen, "the filter selects no layer of this model"

    mxd = replace_linear(copy.deepcopy(model), include=include, network="mxd", expert_dims=16)
    mxd.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(mxd, inputs), reference, rtol=1e-4, atol=1e-4)

    cp = replace_linear(copy.deepcopy(model), include=include, network="cp", expert_dims=16)
    dense_count = sum(n_params(targets[name]) for name in chosen)
    converted = sum(n_params(cp.get_submodule(name)) for name in chosen)
    assert 0.95 * dense_count <= converted <= dense_count  # rank="same", gates counted

    cp.train()
    out = forward(cp, inputs)
    out.float().square().mean().backward()  # a training step runs
    assert all(p.grad is not None for n, p in cp.named_parameters() if "cores" in n)

    fresh = replace_linear(copy.deepcopy(model), include=include, network="cp", expert_dims=16)
    fresh.load_state_dict(cp.state_dict())  # the state dict round-trips
    cp.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(fresh, inputs), forward(cp, inputs))

    layer = cp.get_submodule(chosen[0])
    assert isinstance(layer, MuMoE)
    save(layer, tmp_path / "layer.safetensors")  # one converted layer, served on NumPy
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        expected = layer(x).numpy()
    np.testing.assert_allclose(
        load(tmp_path / "layer.safetensors")(x.numpy()), expected, rtol=1e-4, atol=1e-5
    )


def _is_linear(module):
    try:
        linear_weights(module)
    except (TypeError, ValueError):
        return False
    return True


def test_gpt2_from_transformers(tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[models]')"
    )
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config)
    tokens = torch.randint(0, 64, (3, 16))
    # GPT-2's MLP: Conv1D c_fc (32 -> 128) and c_proj (128 -> 32), in every block.
    check_conversion(model, r"mlp\.c_(fc|proj)$", tokens, lambda m, t: m(t).logits, tmp_path)


def test_mlp_mixer_from_timm(tmp_path):
    try:
        import timm
    except ImportError as error:  # not installed, or installed without torchvision
        pytest.skip(
            f"timm does not import ({error}); it needs torchvision, which has no wheel "
            "matching the local torch CPU build of these machines: pip install timm where it has"
        )
    torch.manual_seed(0)
    model = timm.models.mlp_mixer.MlpMixer(
        num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32
    )
    images = torch.randn(2, 3, 32, 32)
    # The paper's setting: the channel MLPs of every Mixer block.
    check_conversion(model, r"mlp_channels\.fc[12]$", images, lambda m, x: m(x), tmp_path)
