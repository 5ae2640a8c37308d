"""MLP blocks in every form (issue #27, item 1): μMoE or dense encoders, GLU, MxD as published."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy
import torch
from safetensors import safe_open

from mumoe.inference import InferenceLinear, load
from mumoe.nn import MuMoEBlock, load_into, save

FORMS = {
    "paper": {"network": "cp", "rank": 4},
    "mxd": {  # MxD as published: dense encoder, TopK(ReLU(G x + b)), one output bias
        "network": "mxd",
        "encoder": "linear",
        "activation": "relu_topk",
        "top_k": 3,
        "normalization": None,
        "gate_bias": True,
        "output_bias": "shared",
    },
    "mxd-swiglu": {
        "network": "mxd",
        "encoder": "linear",
        "hidden_activation": "silu",
        "glu": True,
        "activation": "relu_topk",
        "top_k": 3,
        "normalization": None,
        "gate_bias": True,
        "output_bias": "shared",
    },
    "cp-swiglu": {
        "network": "cp",
        "rank": 4,
        "hidden_activation": "silu",
        "glu": True,
        "normalization": "ln",
    },
    "tt-gelu-tanh-norm": {
        "network": "tt",
        "rank": 3,
        "hidden_activation": "gelu_tanh",
        "input_norm": True,
    },
    "tucker-relu-linear": {
        "network": "tucker",
        "rank": 3,
        "encoder": "linear",
        "hidden_activation": "relu",
        "activation": "softmax",
    },
}


def block_of(form, **extra):
    torch.manual_seed(0)
    block = MuMoEBlock(12, 20, 5, expert_dims=8, dtype=torch.float64, **FORMS[form], **extra)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    return block.eval()


def test_mxd_as_published_is_its_formula():
    # y = (C^T a) * (D^T act(W x + b)) + b_out with a = TopK(ReLU(G x + b_g)): the MxD
    # reference's forward pass (james-oldfield/MxD, sparse_autoencoder.py), written out.
    block = block_of("mxd")
    x = torch.randn(9, 12, dtype=torch.float64)
    logits = x @ block.gate.projections[0] + block.gate.biases[0]
    rectified = torch.relu(logits)
    kth = torch.topk(rectified, 3, dim=-1).values[:, -1:]
    a = torch.where(rectified >= kth, rectified, 0.0)
    hidden = torch.nn.functional.gelu(x @ block.fc1.weight.T + block.fc1.bias)
    experts, decoder = block.fc2.cores  # "n o, i o": (N, O) and (H, O)
    expected = (a @ experts) * (hidden @ decoder) + block.bias
    y, gates = block(x, return_gates=True)
    torch.testing.assert_close(gates[0], a)
    torch.testing.assert_close(y, expected)
    assert block.fc2.network.bias is False  # the bias is shared, not each expert's
    # Parameters: a gate of I x N + N, H x (I + 1) encoder, N x O + H x O decoder, O bias.
    n_params = sum(p.numel() for p in block.parameters())
    assert n_params == 12 * 8 + 8 + 20 * 13 + 8 * 5 + 20 * 5 + 5


def test_a_gated_block_multiplies_the_activated_encoder_by_the_other():
    block = block_of("cp-swiglu")
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    gates = block.gate(x)
    z = block.fc1(x, gates)
    hidden = torch.nn.functional.silu(z) * block.up(x, gates)
    torch.testing.assert_close(block(x), block.fc2(hidden, gates))
    assert block.up.network == block.fc1.network and block.up.gate is None
    assert [type(layer).__name__ for layer in block.mumoe_layers] == ["MuMoE"] * 3


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_round_trips_through_a_file(tmp_path, form):
    block = block_of(form)
    x = torch.randn(7, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x).numpy()
    path = tmp_path / "block.safetensors"
    save(block, path)
    served = load(path)
    np.testing.assert_allclose(served(x.numpy()), expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        served.gates(x.numpy())[0], block.gate(x)[0].detach().numpy(), rtol=1e-12
    )
    assert isinstance(served.fc1, InferenceLinear) == (block.encoder == "linear")
    fresh = MuMoEBlock(12, 20, 5, expert_dims=8, dtype=torch.float64, **FORMS[form]).eval()
    load_into(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), block(x), rtol=0, atol=0)


def test_files_of_the_papers_block_stay_as_they_were(tmp_path):
    save(block_of("paper"), tmp_path / "paper.safetensors")
    with safe_open(str(tmp_path / "paper.safetensors"), framework="numpy") as f:
        meta = json.loads(f.metadata()["mumoe"])
        keys = set(f.keys())
    assert not {"encoder", "hidden_activation", "glu", "output_bias", "up"} & set(meta)
    assert not any(k.startswith("up.") or k == "bias" for k in keys)


def test_a_file_of_another_form_is_refused_by_load_into(tmp_path):
    save(block_of("mxd-swiglu"), tmp_path / "glu.safetensors")
    plain = MuMoEBlock(12, 20, 5, expert_dims=8, dtype=torch.float64, **FORMS["mxd"])
    with pytest.raises(
        ValueError, match="holds a different module: its hidden_activation is 'silu', the module's"
    ):
        load_into(plain, tmp_path / "glu.safetensors")


def rewritten(path, change):
    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["mumoe"])
    change(arrays, meta)
    safetensors.numpy.save_file(arrays, str(path), metadata={"mumoe": json.dumps(meta)})
    return path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a, m: m.update(hidden_activation="tanh"), r"unknown hidden activation 'tanh'"),
        (lambda a, m: m.update(encoder="conv"), r"unknown block encoder 'conv'"),
        (lambda a, m: m.update(output_bias="gated"), r"unknown block output_bias 'gated'"),
        (lambda a, m: m.update(glu="yes"), r"block glu must be bool, got 'yes'"),
        (lambda a, m: m.update(glu=False), r"the block has an 'up' layer but no glu"),
        (lambda a, m: m["up"].update(out_features=19), r"the block's up gives 19 features"),
        (lambda a, m: m["fc2"].update(bias=True), r"a shared output bias replaces fc2's"),
        (lambda a, m: a.pop("bias"), r"missing entries \['bias'\]"),
        (lambda a, m: a.__setitem__("up.weight", a["up.weight"][:, :5]), r"'up.weight' must"),
    ],
    ids=[
        "activation",
        "encoder",
        "output-bias",
        "glu-not-bool",
        "up-without-glu",
        "up-size",
        "two-biases",
        "bias-missing",
        "weight-shape",
    ],
)
def test_hostile_block_files_are_refused_naming_the_file(tmp_path, change, match):
    path = tmp_path / "b.safetensors"
    save(block_of("mxd-swiglu"), path)
    rewritten(path, change)
    with pytest.raises(ValueError, match=f"^'{path}'.*{match}"):
        load(path)


def test_bad_forms_are_refused_at_construction():
    options = {"expert_dims": 4, "rank": 2}
    with pytest.raises(ValueError, match="unknown encoder 'dense'; choose 'mumoe' or 'linear'"):
        MuMoEBlock(8, 16, encoder="dense", **options)
    with pytest.raises(ValueError, match=r"unknown hidden activation 'swiglu'.*glu=True"):
        MuMoEBlock(8, 16, hidden_activation="swiglu", **options)
    with pytest.raises(ValueError, match="unknown output_bias 'none'"):
        MuMoEBlock(8, 16, output_bias="none", **options)
    with pytest.raises(ValueError, match="output_bias='shared' is the decoder's bias"):
        MuMoEBlock(8, 16, output_bias="shared", bias=False, **options)
    with pytest.raises(TypeError, match="glu"):
        MuMoEBlock(8, 16, glu="yes", **options)


def test_a_budget_counts_the_gate_in_the_first_mumoe_layer():
    # With a dense encoder the gate is counted in the decoder's budget.
    block = MuMoEBlock(
        64, 256, 64, "cp", expert_dims=16, rank="same", encoder="linear", normalization=None
    )
    decoder = sum(p.numel() for p in block.fc2.parameters()) + block.gate.projections[0].numel()
    assert decoder <= 257 * 64
    paper = MuMoEBlock(64, 256, 64, "cp", expert_dims=16, rank="same", normalization=None)
    assert paper.fc2.network.ranks["r"] > block.fc2.network.ranks["r"]  # no gate to pay for


@pytest.mark.parametrize("form", list(FORMS))
def test_describe_counts_every_parameter_of_every_form(form):
    block = block_of(form)
    text = block.describe(batch_size=8)
    total = sum(p.numel() for p in block.parameters())
    assert f"  total       {total:,} parameters" in text
    for layer in block.mumoe_layers:  # each μMoE layer's network, described in full
        assert f"spec        {layer.network.spec}" in text
    assert ("(GLU)" in text) == block.glu and f"encoder {block.encoder}" in text
