"""Whole converted models saved and reloaded (save_model / load_model), and one layer or block
in the hub's layout (save_pretrained / from_pretrained): identical outputs, strict refusals
that leave the model untouched."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from mumoe.nn import (
    CPMuMoE,
    FoldedIntoBlock,
    MuMoE,
    MuMoEBlock,
    TRMuMoE,
    TTMuMoE,
    TuckerMuMoE,
    load_model,
    module_from_config,
    replace_linear,
    replace_mlp,
    save_model,
)

MXD = {"activation": "relu_topk", "top_k": 4, "normalization": None, "gate_bias": True}


def transformers_or_skip():
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install -e '.[models]')"
    )
    transformers.logging.set_verbosity_error()
    return transformers


def nudged(model, seed=0):
    """Every parameter moved off its start, as training would: a reload must restore them all."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def snapshot(model):
    """Everything load_model may change: the module types at every name and every tensor."""
    types = {name: type(m) for name, m in model.named_modules(remove_duplicate=False)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return types, state


def assert_untouched(model, before):
    types, state = snapshot(model)
    assert types == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)


def mlp_model():
    layers = (
        torch.nn.Linear(8, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 16),
        torch.nn.Linear(16, 4),
    )
    return torch.nn.Sequential(*layers)


def converted_mlp_model(seed=0):
    torch.manual_seed(seed)
    model = replace_linear(mlp_model(), include="0|2", network="cp", expert_dims=8, rank=4)
    return nudged(model, seed).eval()


# ---------------------------------------------------------------------------- round trips


def test_gpt2_round_trips_through_save_pretrained_and_from_pretrained(tmp_path):
    t = transformers_or_skip()
    torch.manual_seed(0)
    config = t.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=50)
    model = t.GPT2LMHeadModel(config)
    replace_mlp(model, include=r"h\.0\.mlp", expert_dims=16, **MXD)
    replace_linear(model, include=r"h\.1\.mlp\.c_fc", network="tt", expert_dims=(4, 2), rank=3)
    nudged(model).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    save_model(model, tmp_path)

    base = t.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert isinstance(
        base.transformer.h[0].mlp, type(t.GPT2LMHeadModel(config).transformer.h[0].mlp)
    )
    assert load_model(base, tmp_path) is base
    assert isinstance(base.transformer.h[0].mlp, MuMoEBlock)
    assert isinstance(base.transformer.h[1].mlp.c_fc, MuMoE)
    stand_in = model.transformer.h[1].mlp.c_fc.weight  # what a parent reading .weight sees
    assert base.transformer.h[1].mlp.c_fc.weight.shape == stand_in.shape
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).logits, expected)
    assert base.lm_head.weight is base.transformer.wte.weight  # the base's tie is kept


def test_bert_split_mlp_round_trips_with_its_folded_output_layer(tmp_path):
    t = transformers_or_skip()
    torch.manual_seed(0)
    config = t.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
    )
    model = t.BertModel(config)
    replace_mlp(model, include="layer.1", expert_dims=16, activation="softmax", normalization=None)
    assert isinstance(model.encoder.layer[1].output.dense, FoldedIntoBlock)
    nudged(model).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path)
    save_model(model, tmp_path)
    base = load_model(t.BertModel.from_pretrained(tmp_path), tmp_path)
    assert isinstance(base.encoder.layer[1].output.dense, FoldedIntoBlock)
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).last_hidden_state, expected)


def test_a_timm_model_round_trips_where_timm_installs(tmp_path):
    try:
        import timm
    except ImportError as error:  # not installed, or installed without torchvision
        pytest.skip(
            f"timm does not import ({error}); it needs torchvision, which has no wheel "
            "matching the local torch CPU build of these machines: pip install timm where it has"
        )

    def build():
        torch.manual_seed(1)
        return timm.models.vision_transformer.VisionTransformer(
            img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5
        )

    model = replace_mlp(build(), include=r"blocks\.0\.mlp", expert_dims=16, **MXD)
    replace_linear(model, include="head", network="cp", expert_dims=8, rank=4)
    nudged(model).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
    save_model(model, tmp_path, base=True)  # timm keeps no folder of its own here
    loaded = load_model(build().eval(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(images), expected)


def test_a_plain_model_round_trips_with_its_base_and_tied_parameters(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Embedding(20, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 20)
        )
        model[2].weight = model[0].weight  # tied as a language model's head
        return model

    model = replace_linear(
        build(0), include="1", network="tucker", expert_dims=(3, 2), rank=(2, 2, 4, 4)
    )
    model.eval()
    tokens = torch.randint(0, 20, (3, 5))
    with torch.no_grad():
        expected = model(tokens)
    save_model(model, tmp_path, base=True)
    manifest = json.loads((tmp_path / "mumoe.json").read_text())
    assert manifest["tied"] == {"2.weight": "0.weight"}
    fresh = build(1).eval()  # other random weights: the base comes from the folder
    with torch.no_grad():
        assert not torch.equal(fresh(tokens), expected)
    loaded = load_model(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)
    assert loaded[2].weight is loaded[0].weight


def test_a_shared_layer_stays_one_layer_under_every_name(tmp_path):
    def build():
        model = mlp_model()
        model.alias = model[2]  # one linear layer registered twice
        return model

    torch.manual_seed(0)
    model = replace_linear(build(), include="alias", network="mxd", expert_dims=4).eval()
    save_model(model, tmp_path, base=True)
    manifest = json.loads((tmp_path / "mumoe.json").read_text())
    assert [entry["names"] for entry in manifest["modules"]] == [["2", "alias"]]
    loaded = load_model(build(), tmp_path)
    assert loaded.alias is loaded[2] and isinstance(loaded[2], MuMoE)


def test_replacements_follow_the_base_models_dtype_device_and_mode(tmp_path):
    model = converted_mlp_model()
    save_model(model, tmp_path)  # without its base: the base's values are the fresh model's
    fresh = mlp_model().to(torch.bfloat16).train()
    load_model(fresh, tmp_path)
    assert fresh[0].cores[0].dtype == torch.bfloat16 and fresh[0].training
    assert fresh[0].gate.norms[0].running_mean.dtype == torch.float32  # statistics stay wide
    with torch.no_grad():
        for name in ("0", "2"):
            for key, value in model.get_submodule(name).state_dict().items():
                loaded = fresh.get_submodule(name).state_dict()[key]
                torch.testing.assert_close(loaded.to(value.dtype), value, rtol=1e-2, atol=1e-2)


def test_loading_into_a_narrower_dtype_that_cannot_hold_a_value_is_refused(tmp_path):
    model = converted_mlp_model()
    with torch.no_grad():
        model[0].cores[1][0, 0] = 1e6  # beyond float16's 65504
    save_model(model, tmp_path)
    fresh = mlp_model().half()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"beyond torch\.float16's largest"):
        load_model(fresh, tmp_path)
    assert_untouched(fresh, before)


# ------------------------------------------------------------------------------ refusals


@pytest.fixture
def saved(tmp_path):
    save_model(converted_mlp_model(), tmp_path, base=True)
    return tmp_path


def refused(model, folder, match):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_model(model, folder)
    assert_untouched(model, before)


def test_a_base_model_of_another_class_is_refused(saved):
    other = torch.nn.ModuleList(list(mlp_model()))
    refused(other, saved, "was saved from a torch.nn.modules.container.Sequential, not a")


def test_a_base_model_without_a_replaced_module_is_refused_naming_close_ones(saved):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU())
    refused(model, saved, r"replaces '2', which Sequential does not have")


def test_a_base_model_whose_replaced_layer_has_other_shapes_is_refused(saved):
    layers = (
        torch.nn.Linear(8, 16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 12),
        torch.nn.Linear(12, 4),
    )
    refused(
        torch.nn.Sequential(*layers), saved, r"'2' is .*'weight': \[12, 16\].* but the conversion"
    )


def test_a_model_already_converted_is_refused(saved):
    refused(converted_mlp_model(seed=3), saved, "'0' is already a MuMoE")


def test_a_newer_format_version_is_refused(saved):
    manifest = json.loads((saved / "mumoe.json").read_text())
    manifest["version"] = 99
    (saved / "mumoe.json").write_text(json.dumps(manifest))
    refused(mlp_model(), saved, "format version 99.*upgrade mumoe")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda text: text[: len(text) // 2], "not a readable JSON manifest"),
        (lambda text: json.dumps({"format": "other"}), "not a mumoe model manifest"),
        (lambda text: text.replace('"modules"', '"module"'), "'modules' is None, expected list"),
        (
            lambda text: text.replace('"in_features": 8', '"in_features": "8"'),
            "'in_features' is '8'",
        ),
        (
            lambda text: text.replace('"spec": "n1 r, i r, o r"', '"spec": "n1 q, i r"'),
            "network is invalid",
        ),
        (
            lambda text: text.replace('"activation": "entmax15"', '"activation": "tanh"'),
            "activation 'tanh'",
        ),
        (
            lambda text: text.replace('"class": "MuMoE"', '"class": "os.system"'),
            "class 'os.system'",
        ),
        (
            lambda text: text.replace('"dtype": "float32"', '"dtype": "float32", "extra": 1'),
            "unknown fields",
        ),
    ],
    ids=[
        "truncated",
        "foreign",
        "no-modules",
        "type",
        "spec",
        "activation",
        "class",
        "unknown-field",
    ],
)
def test_a_corrupt_manifest_is_refused(saved, edit, match):
    path = saved / "mumoe.json"
    path.write_text(edit(path.read_text()))
    refused(mlp_model(), saved, match)


def test_a_manifest_replacing_a_module_inside_another_is_refused(saved):
    manifest = json.loads((saved / "mumoe.json").read_text())
    manifest["modules"][1]["names"] = ["0.gate"]
    (saved / "mumoe.json").write_text(json.dumps(manifest))
    refused(mlp_model(), saved, "replaces '0' and, inside it, '0.gate'")


def test_a_weights_file_from_another_save_or_corrupt_is_refused(saved, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    torch.manual_seed(0)
    model = replace_linear(mlp_model(), include="0", network="cp", expert_dims=8, rank=4)
    save_model(model.eval(), other, base=True)
    os.replace(other / "mumoe.safetensors", saved / "mumoe.safetensors")
    refused(mlp_model(), saved, "does not hold what mumoe.json lists.*different saves")
    (saved / "mumoe.safetensors").write_bytes(b"\x00" * 64)
    refused(mlp_model(), saved, "not a valid safetensors file")
    os.remove(saved / "mumoe.safetensors")
    refused(mlp_model(), saved, "missing or not a regular file")


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    refused(mlp_model(), tmp_path, "holds no mumoe.json: it was not written by")


def test_save_model_refuses_what_it_cannot_describe(tmp_path):
    with pytest.raises(ValueError, match="holds no μMoE layer or block"):
        save_model(mlp_model(), tmp_path)
    with pytest.raises(TypeError, match="is itself a CPMuMoE"):
        save_model(CPMuMoE(4, 2, expert_dims=3, rank=2), tmp_path)
    model = mlp_model()
    model[0] = MuMoE(8, 16, "cp", expert_dims=4, rank=2, activation=torch.softmax)
    with pytest.raises(ValueError, match=r"'0' cannot be saved: .*custom callable"):
        save_model(model, tmp_path)
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------- configurations and the hub


LAYERS = [
    lambda: CPMuMoE(8, 5, expert_dims=6, rank=3),
    lambda: TuckerMuMoE(8, 5, expert_dims=(3, 2), rank=(2, 2, 3, 3), normalization="ln"),
    lambda: TTMuMoE(8, 5, expert_dims=4, rank=(2, 3), bias=False),
    lambda: TRMuMoE(8, 5, expert_dims=4, rank=(2, 2, 3), input_norm=True),
    lambda: MuMoE(8, 5, "mxd", expert_dims=16, **MXD, balance={"z_loss": 0.1}),
    lambda: MuMoE(
        8, 5, "n1 a, n2 a b, i b c, o c", expert_dims=(3, 2), rank={"a": 2, "b": 3, "c": 2}
    ),
    lambda: MuMoEBlock(8, 16, expert_dims=4, rank="same", glu=True, hidden_activation="silu"),
    lambda: MuMoEBlock(
        8, 32, 6, "mxd", expert_dims=16, encoder="linear", output_bias="shared", **MXD
    ),
]


@pytest.mark.parametrize(
    "build", LAYERS, ids=["cp", "tucker", "tt", "tr", "mxd", "spec", "glu", "mxd-block"]
)
def test_a_configuration_rebuilds_the_same_module(build):
    torch.manual_seed(0)
    module = nudged(build())
    config = json.loads(json.dumps(module.get_config()))  # through JSON
    rebuilt = module_from_config(config)
    assert type(rebuilt) is type(module)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in module.state_dict().items()
    }
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(4, 8)
    assert torch.equal(rebuilt.eval()(x), module.eval()(x))


def test_module_from_config_can_change_dtype():
    layer = module_from_config(
        CPMuMoE(8, 5, expert_dims=6, rank=3).get_config(), dtype=torch.float64
    )
    assert layer.cores[0].dtype == torch.float64


def hub_or_skip():
    return pytest.importorskip("huggingface_hub", reason="pip install 'mumoe[hub]'")


@pytest.mark.parametrize(
    "build", LAYERS, ids=["cp", "tucker", "tt", "tr", "mxd", "spec", "glu", "mxd-block"]
)
def test_save_pretrained_and_from_pretrained_round_trip(build, tmp_path):
    hub_or_skip()
    torch.manual_seed(0)
    module = nudged(build()).eval()
    module.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "README.md"} <= set(os.listdir(tmp_path))
    loaded = type(module).from_pretrained(tmp_path)
    assert type(loaded) is type(module) and not loaded.training
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), module(x))
    assert type(MuMoE.from_pretrained(tmp_path) if isinstance(module, MuMoE) else loaded) is type(
        module
    )


def test_from_pretrained_is_strict(tmp_path):
    hub_or_skip()
    layer = CPMuMoE(8, 5, expert_dims=6, rank=3)
    layer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds a CPMuMoE, not a MuMoEBlock"):
        MuMoEBlock.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["network"]["rank"] = {"r": 4}  # the weights no longer fit
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"entry 'cores.0' has shape \(6, 3\), the module's is \(6, 4\)"
    ):
        CPMuMoE.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"takes dtype= and map_location=, not \['in_features'\]"):
        CPMuMoE.from_pretrained(tmp_path, in_features=99)
    os.remove(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        CPMuMoE.from_pretrained(tmp_path)


def test_from_pretrained_takes_a_dtype(tmp_path):
    hub_or_skip()
    layer = nudged(CPMuMoE(8, 5, expert_dims=6, rank=3)).eval()
    layer.save_pretrained(tmp_path)
    wide = CPMuMoE.from_pretrained(tmp_path, dtype=torch.float64)
    assert wide.cores[0].dtype == torch.float64
    assert torch.equal(wide.cores[0], layer.cores[0].double())


def test_a_layer_copy_keeps_working():
    layer = nudged(CPMuMoE(8, 5, expert_dims=6, rank=3)).eval()
    x = torch.randn(2, 8)
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
