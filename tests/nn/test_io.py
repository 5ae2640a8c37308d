"""Portable weights: train in torch, save, load on NumPy (or any backend), same predictions."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
import safetensors.numpy
import tensorly as tl
import torch
from safetensors import safe_open

from mumoe.inference import InferenceMuMoE, load
from mumoe.nn import (
    CPMuMoE,
    MuMoE,
    MuMoEBlock,
    TRMuMoE,
    TuckerMuMoE,
    load_into,
    save,
)
from mumoe.testing import to_numpy64
from tests.helpers import AVAILABLE, use_backend


def trained(layer, steps=5, seed=0, lr=0.05):
    """A few optimiser steps in train mode: the cores, the gate and the statistics move."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    for _ in range(steps):
        x = torch.randn(32, layer.in_features, dtype=next(layer.parameters()).dtype) * 2 + 0.5
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    return layer.eval()


LAYERS = {
    "cp-bn-entmax": lambda **kw: CPMuMoE(12, 5, expert_dims=(6, 3), rank=4, **kw),
    "tr-ln-sparsemax": lambda **kw: TRMuMoE(
        12, 5, expert_dims=6, rank=(2, 3, 2), normalization="ln", activation="sparsemax", **kw
    ),
    "tucker-none-softmax-inputnorm": lambda **kw: TuckerMuMoE(
        12,
        5,
        expert_dims=6,
        rank=(2, 3, 2),
        normalization=None,
        activation="softmax",
        input_norm=True,
        **kw,
    ),
    "custom-nobias": lambda **kw: MuMoE(
        12, 5, "n1 a, a n2 b, i b c, o c", expert_dims=(4, 3), rank=2, bias=False, **kw
    ),
    "mxd-2-levels": lambda **kw: MuMoE(12, 5, "n1 o, n2 o, i o", expert_dims=(6, 3), **kw),
    "lowrank": lambda **kw: MuMoE(12, 5, "lowrank", expert_dims=6, rank=2, **kw),
    "mxd-topk": lambda **kw: MuMoE(12, 5, "mxd", expert_dims=16, activation="topk", top_k=3, **kw),
    "mxd-relu-topk": lambda **kw: MuMoE(  # MxD's gate: TopK(ReLU(G x + b))
        12,
        5,
        "mxd",
        expert_dims=16,
        activation="relu_topk",
        top_k=3,
        normalization=None,
        gate_bias=True,
        **kw,
    ),
}


def test_top_k_travels_with_the_file_and_must_match(tmp_path):
    from mumoe.nn import load_into

    layer = trained(LAYERS["mxd-topk"](dtype=torch.float64))
    save(layer, tmp_path / "topk.safetensors")
    served = load(tmp_path / "topk.safetensors")
    assert (served.activation, served.top_k) == ("topk", 3)
    assert (np.count_nonzero(served.gates(np.ones((2, 12)))[0], axis=-1) == 3).all()
    other = MuMoE(12, 5, "mxd", expert_dims=16, activation="topk", top_k=2, dtype=torch.float64)
    with pytest.raises(ValueError, match="holds a different module: its gate is"):
        load_into(other, tmp_path / "topk.safetensors")
    same = MuMoE(12, 5, "mxd", expert_dims=16, activation="topk", top_k=3, dtype=torch.float64)
    load_into(same.eval(), tmp_path / "topk.safetensors")
    x = torch.randn(4, 12, dtype=torch.float64)
    torch.testing.assert_close(same(x), layer(x))
    save(
        trained(CPMuMoE(12, 5, expert_dims=8, rank=3)), tmp_path / "cp.safetensors"
    )  # other gates: no top_k key
    _, meta = read_back(tmp_path / "cp.safetensors")
    assert "top_k" not in meta["gate"]


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_train_save_load_on_numpy_gives_the_same_predictions(tmp_path, name, dtype):
    # Unnormalised ReLU gates make the loss cubic in the parameters: a smaller step.
    layer = trained(LAYERS[name](dtype=dtype), lr=0.005 if "relu" in name else 0.05)
    path = tmp_path / "layer.safetensors"
    save(layer, path)
    assert path.exists()  # written exactly there, no extension added
    x = torch.randn(7, 3, 12, dtype=dtype) * 2
    with torch.no_grad():
        expected = layer(x).numpy()
    served = load(path)
    assert isinstance(served, InferenceMuMoE)
    y = served(x.numpy())
    assert isinstance(y, np.ndarray) and y.dtype == expected.dtype and y.shape == (7, 3, 5)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.argmax(y, -1), np.argmax(expected, -1))


@pytest.mark.parametrize("backend_name", ["numpy", "pytorch"])
def test_load_on_each_backend(tmp_path, backend_name):
    if backend_name not in AVAILABLE:
        pytest.skip(f"{backend_name} is not usable here")
    layer = trained(CPMuMoE(12, 5, expert_dims=8, rank=3, dtype=torch.float64))
    save(layer, tmp_path / "w.safetensors")
    x = np.random.default_rng(0).standard_normal((4, 12))
    with torch.no_grad():
        expected = layer(torch.from_numpy(x)).numpy()
    with use_backend(backend_name):
        served = load(tmp_path / "w.safetensors")
        y = served(tl.tensor(x))
        assert tl.is_tensor(y)
    np.testing.assert_allclose(to_numpy64(y), expected, rtol=1e-10, atol=1e-12)


def test_load_casts_to_a_requested_dtype(tmp_path):
    save(trained(CPMuMoE(12, 5, expert_dims=8, rank=3)), tmp_path / "w.safetensors")
    served = load(tmp_path / "w.safetensors", dtype=tl.backend.float64)
    assert served.cores[0].dtype == np.float64
    assert served(np.ones((2, 12))).dtype == np.float64


def test_custom_activations_are_not_saved(tmp_path):
    layer = CPMuMoE(12, 5, expert_dims=8, rank=3, activation=lambda t: torch.softmax(t, -1))
    with pytest.raises(ValueError, match="custom callable and cannot be saved"):
        save(layer, tmp_path / "w.safetensors")

    def softmax(t):  # a user's own function with a built-in's name (issue #15, item 4)
        return torch.softmax(2 * t, -1)

    with pytest.raises(ValueError, match="activation 'softmax' is a custom callable"):
        save(CPMuMoE(12, 5, expert_dims=8, rank=3, activation=softmax), tmp_path / "w.safetensors")
    swapped = CPMuMoE(12, 5, expert_dims=8, rank=3)
    swapped.gate.activation = softmax  # replaced after construction
    with pytest.raises(ValueError, match="custom callable"):
        save(swapped, tmp_path / "w.safetensors")
    affine = CPMuMoE(12, 5, expert_dims=8, rank=3)
    affine.gate.norms[0] = torch.nn.BatchNorm1d(8)  # affine: not what the file can describe
    with pytest.raises(ValueError, match="not the BatchNorm1d without affine parameters"):
        save(affine, tmp_path / "w.safetensors")
    with pytest.raises(
        TypeError, match=r"save and load_into take a mumoe\.nn\.MuMoE or MuMoEBlock, got Linear"
    ):
        save(torch.nn.Linear(3, 2), tmp_path / "w.safetensors")


# ------------------------------------------------------------------ bad files


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "w.safetensors"
    save(trained(CPMuMoE(12, 5, expert_dims=(6, 3), rank=4)), path)
    return path


def read_back(path):
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["mumoe"])


def rewrite(path, change):
    arrays, meta = read_back(path)
    change(arrays, meta)
    safetensors.numpy.save_file(arrays, str(path), metadata={"mumoe": json.dumps(meta)})


def header_of(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def with_header(path, header, body):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + body)


def with_meta(path, header, body, **fields):
    meta = {**json.loads(header["__metadata__"]["mumoe"]), **fields}
    header["__metadata__"]["mumoe"] = json.dumps(meta)
    with_header(path, header, body)


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="is not a readable mumoe weights file"):
        load(saved)


def test_garbage_is_refused(saved):
    saved.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a readable mumoe weights file"):
        load(saved)


def test_missing_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(3)}, str(path))
    with pytest.raises(ValueError, match="has no 'mumoe' description in its metadata"):
        load(path)


def test_unreadable_metadata(saved):
    header, body = header_of(saved)
    header["__metadata__"]["mumoe"] = "{not json"
    with_header(saved, header, body)
    with pytest.raises(ValueError, match="has unreadable metadata"):
        load(saved)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda a, m: a.__setitem__("cores.1", np.zeros((4, 4), np.float32)),
            r"entry 'cores.1' must have shape \(3, 4\) for spec .*, got \(4, 4\)",
        ),
        (
            lambda a, m: a.pop("gate.running_var.1"),
            r"missing entries \['gate.running_var.1'\], unexpected entries \[\]",
        ),
        (
            lambda a, m: a.__setitem__("cores.9", np.zeros(2, np.float32)),
            r"missing entries \[\], unexpected entries \['cores.9'\]",
        ),
        (
            lambda a, m: m.__setitem__("spec", "n1 r, n2 q, i r, o r"),
            r"describes an invalid network: bond 'q' appears only in core 1",
        ),
        (lambda a, m: m.__setitem__("version", 99), r"has version 99; this mumoe reads version 2"),
        (lambda a, m: m.__setitem__("format", "other"), r"is not a mumoe-weights file"),
        (
            lambda a, m: a.__setitem__("cores.0", np.zeros((6, 4), np.int64)),
            r"entry 'cores.0' must be floating point \(F16, F32, F64\), got I64",
        ),
        (
            lambda a, m: m.__setitem__("kind", "stack"),
            r"holds a 'stack'; mumoe reads layers and blocks",
        ),
        (lambda a, m: m.__setitem__("kind", "block"), r"the block's fc1 must be dict, got None"),
        (
            lambda a, m: m.__setitem__("spec", "n1 r, i r, o r" + ", o r" * 2000),
            r"holds a spec of 10,014 characters; files hold specs of at most 4,096",
        ),
    ],
)
def test_mismatched_files_are_refused(saved, change, match):
    rewrite(saved, change)
    with pytest.raises(ValueError, match=match):
        load(saved)


def gate_field(**fields):
    return lambda a, m: m["gate"].update(fields)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (gate_field(eps=float("nan")), r"gate eps must be a positive number, got nan"),
        (gate_field(eps=-1.0), r"gate eps must be a positive number, got -1\.0"),
        (
            lambda a, m: m.__setitem__("input_norm", {"eps": 0}),
            r"input_norm eps must be a positive number, got 0",
        ),
        (
            lambda a, m: m["gate"].update(activation="topk", top_k=0),
            r"gate top_k must be at least 1, got 0",
        ),
        (
            lambda a, m: a["gate.running_var.0"].__setitem__(0, -1.0),
            r"entry 'gate.running_var.0' is a variance and must be non-negative",
        ),
        (
            lambda a, m: a["gate.running_var.1"].__setitem__(1, np.nan),
            r"entry 'gate.running_var.1' is a variance and must be non-negative",
        ),
        (
            lambda a, m: a.__setitem__("cores.1", a["cores.1"].astype(np.float64)),
            r"the cores must share one dtype, got \['F32', 'F64'\]",
        ),
        (gate_field(bias="yes"), r"gate bias must be bool, got 'yes'"),
        (gate_field(bias=True), r"missing entries \['gate\.biases\.0', 'gate\.biases\.1'\]"),
    ],
    ids=[
        "eps-nan",
        "eps-negative",
        "input-eps-0",
        "top-k-0",
        "var-negative",
        "var-nan",
        "mixed-dtypes",
        "bias-not-bool",
        "bias-without-entries",
    ],
)
def test_values_the_file_holds_but_no_module_can_are_refused_naming_the_file(saved, change, match):
    # Issue #26, item 12: these loaded (NaN outputs later) or failed without naming the file.
    rewrite(saved, change)
    with pytest.raises(ValueError, match=f"^'{re.escape(str(saved))}'.*{match}"):
        load(saved)
    with pytest.raises(ValueError, match=match):
        load_into(CPMuMoE(12, 5, expert_dims=(6, 3), rank=4), saved)


def test_an_integer_of_5000_digits_is_unreadable_metadata(saved):
    # Issue #26, item 12: Python's own digit-limit message, naming no file.
    header, body = header_of(saved)
    raw = header["__metadata__"]["mumoe"].replace(
        '"in_features": 12', '"in_features": ' + "1" * 5000
    )
    header["__metadata__"]["mumoe"] = raw
    with_header(saved, header, body)
    with pytest.raises(ValueError, match=r"has unreadable metadata: Exceeds the limit"):
        load(saved)


def test_values_beyond_the_target_dtype_are_refused_not_made_inf(tmp_path):
    # Issue #26, item 12: 1e300 into float32, or 70,000 into float16, became inf silently.
    path = tmp_path / "w.safetensors"
    layer = CPMuMoE(4, 3, expert_dims=4, rank=2, dtype=torch.float64)
    with torch.no_grad():
        layer.cores[1][0, 0] = 1e300
    save(layer, path)
    with pytest.raises(ValueError, match=r"entry 'cores.1' holds 1e\+300, beyond float32's"):
        load_into(CPMuMoE(4, 3, expert_dims=4, rank=2), path)
    with pytest.raises(ValueError, match=r"entry 'cores.1' holds 1e\+300, beyond float32's"):
        load(path, dtype=np.float32)
    with torch.no_grad():
        layer.cores[1][0, 0] = 7e4
    save(layer, path)
    with pytest.raises(ValueError, match=r"holds 70000.0, beyond float16's largest value"):
        load_into(CPMuMoE(4, 3, expert_dims=4, rank=2, dtype=torch.float16), path)
    load_into(CPMuMoE(4, 3, expert_dims=4, rank=2, dtype=torch.bfloat16), path)  # fits


def test_a_block_whose_layers_have_other_experts_is_refused(tmp_path):
    path = tmp_path / "b.safetensors"
    save(MuMoEBlock(6, 8, network="cp", expert_dims=(4, 2), rank=3), path)
    rewrite(path, lambda a, m: m["fc2"].__setitem__("expert_dims", [4, 3]))
    with pytest.raises(
        ValueError, match=r"one gate drives them all\): fc1 has expert_dims \[4, 2\]"
    ):
        load(path)


def test_a_spec_written_otherwise_is_the_same_network(saved):
    # Issue #26, item 12: load accepted it and load_into refused it as another module.
    rewrite(saved, lambda a, m: m.__setitem__("spec", "n1   r ,n2 r,i r,   o r"))
    fresh = CPMuMoE(12, 5, expert_dims=(6, 3), rank=4)
    load_into(fresh, saved)
    assert load(saved).network == fresh.network


def test_load_into_refuses_modules_it_cannot_write_before_writing(saved):
    # Issue #26, item 12: a meta module loaded nothing without an error; an inference
    # tensor failed half-way with torch's in-place error.
    with torch.device("meta"):
        meta = CPMuMoE(12, 5, expert_dims=(6, 3), rank=4)
    with pytest.raises(ValueError, match=r"on the meta device .* module\.to_empty"):
        load_into(meta, saved)
    with torch.inference_mode():
        built = CPMuMoE(12, 5, expert_dims=(6, 3), rank=4)
    before = {k: v.clone() for k, v in built.state_dict().items()}
    with pytest.raises(ValueError, match=r"is an inference tensor .* torch\.inference_mode"):
        load_into(built, saved)
    assert all(torch.equal(v, before[k]) for k, v in built.state_dict().items())
    with torch.inference_mode():
        load_into(built, saved)  # inside the mode, it may write them


def test_a_file_cut_short_while_it_is_read_is_an_error_not_a_crash(saved, monkeypatch):
    # Issue #26, item 12: the memory-mapped read died of SIGBUS when another writer
    # truncated the file between the header check and the tensor read.
    import mumoe.inference._weights_file as weights_file

    check = weights_file._check_meta

    def truncate_then_check(meta, path):
        check(meta, path)
        data = saved.read_bytes()
        saved.write_bytes(data[: len(data) - 40])

    monkeypatch.setattr(weights_file, "_check_meta", truncate_then_check)
    with pytest.raises(ValueError, match=r"is truncated \(or was cut short while it was read\)"):
        load(saved)


def test_integer_likes_are_plain_ints_and_saved(tmp_path):
    # Issue #26, item 12: top_k=np.int64(2) crashed save in json.
    layer = CPMuMoE(4, 3, expert_dims=4, rank=2, activation="topk", top_k=np.int64(2))
    assert type(layer.gate.top_k) is int
    save(layer, tmp_path / "w.safetensors")
    assert load(tmp_path / "w.safetensors").top_k == 2


def test_inference_layer_checks_its_input(saved):
    served = load(saved)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 12\), got \(3, 11\)"):
        served(np.ones((3, 11), dtype=np.float32))
    # Issue #26, item 4: forward's TypeErrors, not a promotion or torch's RuntimeError.
    with pytest.raises(TypeError, match=r"x is a builtins.list, not a tensor of the active"):
        served([[1.0] * 12])
    with pytest.raises(TypeError, match="x has dtype float64 but the layer has float32"):
        served(np.ones((3, 12)))


@pytest.mark.parametrize(
    ("craft", "match"),
    [
        # a bit flipped in the header's length, or in its JSON
        (lambda h, b, p: p.write_bytes(b"\xff" + p.read_bytes()[1:]), "not a readable"),
        (
            lambda h, b, p: p.write_bytes(p.read_bytes().replace(b'"dtype"', b'"dtypf"', 1)),
            "not a readable",
        ),
        # a tensor that claims more bytes than the file holds
        (
            lambda h, b, p: (
                h["cores.0"].__setitem__("shape", [10**6, 10**6]),
                with_header(p, h, b),
            ),
            "not a readable",
        ),
        # two tensors over the same bytes
        (
            lambda h, b, p: (
                h["cores.1"].__setitem__("data_offsets", h["cores.0"]["data_offsets"]),
                with_header(p, h, b),
            ),
            "not a readable",
        ),
        # a dtype the format does not allow
        (
            lambda h, b, p: (h["cores.0"].__setitem__("dtype", "I32"), with_header(p, h, b)),
            r"entry 'cores.0' must be floating point \(F16, F32, F64\), got I32",
        ),
        # metadata of the wrong types, or nested deep
        (
            lambda h, b, p: with_meta(p, h, b, expert_dims="six"),
            "expert_dims must be list, got 'six'",
        ),
        (lambda h, b, p: with_meta(p, h, b, in_features=True), "in_features must be"),
        (
            lambda h, b, p: (
                h["__metadata__"].__setitem__("mumoe", "[" * 100_000 + "]" * 100_000),
                with_header(p, h, b),
            ),
            "has a description of 200,000 characters",
        ),
        (
            lambda h, b, p: with_meta(p, h, b, gate={"x": [[[[[[[[[[1]]]]]]]]]]}),
            "nested deeper than 8",
        ),
    ],
    ids=[
        "length-bit",
        "json-bit",
        "huge-shape",
        "overlap",
        "int-dtype",
        "wrong-type",
        "bool-int",
        "deep-json",
        "deep-dict",
    ],
)
def test_crafted_files_are_refused_with_a_message(saved, craft, match):
    header, body = header_of(saved)
    craft(header, body, saved)
    with pytest.raises(ValueError, match=match):
        load(saved)


def test_a_large_spec_and_non_regular_files_are_refused(saved, tmp_path):
    header, body = header_of(saved)
    meta = json.loads(header["__metadata__"]["mumoe"])
    header["__metadata__"]["mumoe"] = json.dumps({**meta, "spec": "n1 r, " * 2_000_000})
    with_header(saved, header, body)  # a 12 MB spec: refused before the header is parsed
    with pytest.raises(ValueError, match=r"header declares 12,00.* at most 1,048,576"):
        load(saved)
    header["__metadata__"]["mumoe"] = json.dumps({**meta, "spec": "n1 r, " * 20_000})
    with_header(saved, header, body)  # 120 kB: a header that fits, a description that does not
    with pytest.raises(ValueError, match=r"has a description of 120,.* at most 65,536"):
        load(saved)
    header["__metadata__"]["mumoe"] = json.dumps({**meta, "spec": "n1 r, " * 1_000})
    with_header(saved, header, body)  # 6 kB: a description that fits, a spec that does not
    with pytest.raises(ValueError, match="files hold specs of at most 4,096"):
        load(saved)
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    with pytest.raises(ValueError, match="not a regular file"):
        load(fifo)
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(ValueError, match="not a regular file"):
        load(zero)
    with pytest.raises(ValueError, match="not a regular file"):
        load(tmp_path)


def test_saving_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save(trained(CPMuMoE(12, 5, expert_dims=8, rank=3)), path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        save(trained(CPMuMoE(12, 5, expert_dims=8, rank=3), seed=1), path)
    assert path.read_bytes() == before  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]  # no leftovers


def test_a_torch_checkpoint_is_named_with_what_to_do(tmp_path):
    # Issue #26, item 7: a .pt was "a header of 578,712,552,184,433,488 bytes".
    layer = CPMuMoE(4, 3, expert_dims=4, rank=2)
    torch.save(layer.state_dict(), tmp_path / "a.pt")
    with pytest.raises(ValueError, match=r"it is a PyTorch checkpoint .*load_state_dict"):
        load(tmp_path / "a.pt")
    torch.save(layer.state_dict(), tmp_path / "b.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"it is a Python pickle \(a legacy torch\.save"):
        load(tmp_path / "b.pt")


def test_a_failed_save_names_the_users_path_and_leaves_nothing(tmp_path):
    # Issue #26, item 7: the error named the temporary file ('.mumoe-....tmp').
    layer = CPMuMoE(4, 3, expert_dims=4, rank=2)
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError, match=r"over a folder: '.*folder'"):
        save(layer, tmp_path / "folder")
    missing = tmp_path / "no" / "such" / "w.safetensors"
    with pytest.raises(FileNotFoundError) as caught:
        save(layer, missing)
    assert caught.value.filename == str(missing) and ".tmp" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_saved_files_get_the_mode_open_would_give(tmp_path):
    # Issue #26, item 12: mkstemp's 0600 survived the rename.
    layer = CPMuMoE(4, 3, expert_dims=4, rank=2)
    umask = os.umask(0o022)
    try:
        save(layer, tmp_path / "new.safetensors")
        assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o644
        os.chmod(tmp_path / "new.safetensors", 0o640)
        save(layer, tmp_path / "new.safetensors")  # an existing file keeps its mode
        assert stat.S_IMODE(os.stat(tmp_path / "new.safetensors").st_mode) == 0o640
    finally:
        os.umask(umask)


def test_load_into_is_all_or_nothing_for_every_failure(saved):
    from mumoe.nn import load_into

    layer = CPMuMoE(12, 5, expert_dims=(6, 3), rank=4)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    rewrite(saved, lambda a, m: a.__setitem__("gate.running_var.1", np.zeros(2, np.float32)))
    with pytest.raises(ValueError):
        load_into(layer, saved)
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("network", ["cp", "tr"])
def test_blocks_save_and_serve_on_numpy(tmp_path, network):
    from mumoe.inference import InferenceMuMoEBlock
    from mumoe.nn import MuMoEBlock

    rank = 3 if network == "cp" else (2, 2, 3)
    block = trained(
        MuMoEBlock(
            12,
            20,
            7,
            network=network,
            expert_dims=6,
            rank=rank,
            input_norm=True,
            dtype=torch.float64,
        )
    )
    save(block, tmp_path / "block.safetensors")
    served = load(tmp_path / "block.safetensors")
    assert isinstance(served, InferenceMuMoEBlock)
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x).numpy()
    np.testing.assert_allclose(served(x.numpy()), expected, rtol=1e-10, atol=1e-12)


def test_gelu_is_torchs_on_every_usable_backend():
    from mumoe.gates import gelu

    x = np.linspace(-6, 6, 101)
    expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    for name in AVAILABLE:
        with use_backend(name):
            np.testing.assert_allclose(
                to_numpy64(gelu(tl.tensor(x))), expected, rtol=1e-12, atol=1e-15
            )


def test_a_served_layer_names_its_backend_after_a_switch(tmp_path):
    # After tl.set_backend, a loaded layer failed deep in gating (issue #15, item 8).
    save(trained(CPMuMoE(12, 5, expert_dims=8, rank=3)), tmp_path / "w.safetensors")
    served = load(tmp_path / "w.safetensors")
    assert "backend='numpy'" in repr(served)
    with use_backend("pytorch"):
        assert "backend='numpy'" in repr(served)  # where its arrays are, not the active one
        with pytest.raises(
            ValueError,
            match=r"arrays are on the 'numpy' backend.*active TensorLy backend is 'pytorch'",
        ):
            served(torch.ones(2, 12))
        with pytest.raises(ValueError, match="arrays are on the 'numpy' backend"):
            served.gates(torch.ones(2, 12))
    assert served(np.ones((2, 12), dtype=np.float32)).shape == (2, 5)


def test_a_gate_bias_travels_with_the_file_and_must_match(tmp_path):
    # Issue #27, item 1: MxD's gate has a bias; files of other gates stay as they were.
    layer = trained(LAYERS["mxd-relu-topk"](dtype=torch.float64), lr=0.005)
    assert layer.gate.biases[0].abs().sum() > 0  # training moved it
    save(layer, tmp_path / "biased.safetensors")
    arrays, meta = read_back(tmp_path / "biased.safetensors")
    assert meta["gate"]["bias"] is True and arrays["gate.biases.0"].shape == (16,)
    served = load(tmp_path / "biased.safetensors")
    x = torch.randn(6, 12, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(served.gates(x.numpy())[0], layer.gate(x)[0].numpy())
    unbiased = MuMoE(
        12, 5, "mxd", expert_dims=16, activation="relu_topk", top_k=3, normalization=None
    )
    with pytest.raises(ValueError, match="holds a different module: its gate is"):
        load_into(unbiased.double(), tmp_path / "biased.safetensors")
    save(trained(LAYERS["mxd-topk"]()), tmp_path / "plain.safetensors")
    assert "bias" not in read_back(tmp_path / "plain.safetensors")[1]["gate"]
    block = MuMoEBlock(
        12,
        20,
        5,
        network="mxd",
        expert_dims=8,
        activation="relu_topk",
        top_k=2,
        normalization="ln",
        gate_bias=True,
        dtype=torch.float64,
    )
    with torch.no_grad():
        block.gate.biases[0].normal_()
    save(block.eval(), tmp_path / "block.safetensors")
    with torch.no_grad():
        np.testing.assert_allclose(
            load(tmp_path / "block.safetensors")(x.numpy()), block(x).numpy(), rtol=1e-12
        )
