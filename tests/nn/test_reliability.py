"""Reliability of the torch modules: mixed precision, input checks, files, threads."""

from __future__ import annotations

import copy
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorly as tl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import cp, describe, forward, planner_of, random_cores, scale_experts
from mumoe.backends import thread_backend
from mumoe.nn import (
    CPMuMoE,
    MuMoE,
    MuMoEBlock,
    TRMuMoE,
    TTMuMoE,
    TuckerMuMoE,
    compat,
    load_into,
    save,
)
from mumoe.plan import Planner
from mumoe.testing import HALF_PRECISION_TOLERANCES
from tests.helpers import randomise

PRESETS = [("cp", 8), ("tucker", (2, 4, 4)), ("tt", (2, 6)), ("tr", (2, 2, 6)), ("dense", None)]
HALF = [torch.float16, torch.bfloat16]


def trained_like(module, seed=0, scale=1.0):
    """Random gate projections (zero at init) so that the gates are far from uniform."""
    return randomise(module, seed, scale=scale, normal=True, only="projections")


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize(("fmt", "rank"), PRESETS, ids=[p[0] for p in PRESETS])
def test_half_precision_is_close_to_float32_forward_and_backward(fmt, rank, dtype):
    out_tol, grad_tol = HALF_PRECISION_TOLERANCES[str(dtype).removeprefix("torch.")]
    for seed in range(3):
        torch.manual_seed(seed)
        reference = trained_like(MuMoE(24, 12, fmt, expert_dims=16, rank=rank), seed).eval()
        layer = copy.deepcopy(reference).to(dtype)
        x = torch.randn(64, 24)
        expected = reference(x)
        expected.square().sum().backward()
        y = layer(x.to(dtype))
        y.float().square().sum().backward()
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert relative(y, expected) <= out_tol
        for core, ref in zip(layer.cores, reference.cores, strict=True):
            assert core.grad.dtype == dtype and torch.isfinite(core.grad).all()
            assert relative(core.grad, ref.grad) <= grad_tol


@pytest.mark.parametrize("activation", ["entmax15", "sparsemax", "softmax"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gating_cannot_overflow_in_half_precision(activation, dtype):
    """Logits of ~1e4 without normalisation: float16 squares overflow; gating runs in float32."""
    layer = trained_like(
        CPMuMoE(16, 4, expert_dims=64, rank=4, normalization=None, activation=activation),
        scale=30.0,
    ).to(dtype)
    x = (torch.randn(32, 16) * 300).to(dtype)
    y, gates = layer(x, return_gates=True)
    assert gates[0].dtype == dtype
    assert torch.isfinite(gates[0]).all()
    assert torch.allclose(gates[0].float().sum(-1), torch.ones(32), atol=1e-2)
    assert torch.isfinite(y).all()


def test_autocast_runs_the_contraction_in_its_dtype():
    torch.manual_seed(0)
    layer = trained_like(TRMuMoE(24, 12, expert_dims=16, rank=(2, 2, 6))).eval()
    x = torch.randn(64, 24)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, gates = layer(x, return_gates=True)
    assert y.dtype == torch.bfloat16 and gates[0].dtype == torch.float32
    assert relative(y, expected) <= HALF_PRECISION_TOLERANCES["bfloat16"][0]
    y.float().sum().backward()
    assert all(c.grad.dtype == torch.float32 and torch.isfinite(c.grad).all() for c in layer.cores)


def test_autocast_takes_inputs_and_parameters_of_different_dtypes():
    """bfloat16 parameters, float32 input: autocast's business, so mumoe casts them together."""
    torch.manual_seed(0)
    reference = trained_like(CPMuMoE(24, 12, expert_dims=16, rank=8)).eval()
    layer = copy.deepcopy(reference).to(torch.bfloat16)
    x = torch.randn(64, 24)
    with pytest.raises(TypeError, match=r"parameters are torch\.bfloat16"):
        layer(x)  # outside autocast: refused, not converted
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert relative(y, reference(x)) <= HALF_PRECISION_TOLERANCES["bfloat16"][0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_outputs_and_gates_keep_the_inputs_dtype(dtype):
    block = trained_like(MuMoEBlock(8, 16, expert_dims=(4, 2), rank=3)).to(dtype).eval()
    y, gates = block(torch.randn(5, 3, 8).to(dtype), return_gates=True)
    assert y.dtype == dtype and all(a.dtype == dtype for a in gates)


def test_the_gates_statistics_stay_float32_when_the_layer_is_cast():
    layer = CPMuMoE(8, 4, expert_dims=6, rank=3).to(torch.bfloat16)
    norm = layer.gate.norms[0]
    assert layer.gate.projections[0].dtype == torch.bfloat16
    assert norm.running_mean.dtype == norm.running_var.dtype == torch.float32
    layer.train()(torch.randn(16, 8, dtype=torch.bfloat16) * 5)  # updates the statistics
    assert torch.isfinite(norm.running_var).all() and norm.running_var.ne(1).any()
    layer.half()
    assert norm.running_var.dtype == torch.float32


def test_the_functional_core_makes_its_arrays_in_the_inputs_dtype():
    """The bias column (training) and the split bias (inference) in float16, on torch."""
    net = cp(5, 4, expert_dims=6, rank=3)
    with thread_backend("pytorch"):
        cores = [c.requires_grad_() for c in random_cores(net, random_state=0, dtype=torch.float16)]
        x = torch.rand(3, 5, dtype=torch.float16)
        gates = [torch.rand(3, 6, dtype=torch.float16)]
        for differentiable in (True, False):
            assert forward(net, cores, x, gates, differentiable=differentiable).dtype == x.dtype


def test_the_reference_api_works_in_half_precision():
    """The reference builds its bias column in float32 and fails on float16 inputs."""
    layer = compat.CPMuMoE(6, 4, [8], 3).half()
    a = [torch.softmax(torch.randn(2, 1, 8), -1).half()]
    assert layer(torch.randn(2, 1, 6).half(), a).dtype == torch.float16


# ------------------------------------------------------------- hostile input

LAYER_MUTATIONS = {
    "not a tensor": (lambda x: x.numpy(), TypeError, r"input must be a torch.Tensor, got ndarray"),
    "integers": (
        lambda x: x.long(),
        TypeError,
        r"input has dtype torch.int64; μMoE layers compute in floating point",
    ),
    "float64": (
        lambda x: x.double(),
        TypeError,
        r"input has dtype torch.float64 but the layer's parameters are torch.float32",
    ),
    "features": (lambda x: x[..., :-1], ValueError, r"input must have shape \(\.\.\., \d+\)"),
    "scalar": (lambda x: x.flatten()[0], ValueError, r"input must have shape .* got \(\)"),
}


@settings(max_examples=40)
@given(
    st.sampled_from([CPMuMoE, TuckerMuMoE, TTMuMoE, TRMuMoE]),
    st.sampled_from(sorted(LAYER_MUTATIONS)),
    st.lists(st.integers(1, 3), min_size=1, max_size=3),
)
def test_layers_refuse_hostile_input_naming_what_was_expected(cls, mutation, batch):
    layer = cls(5, 3, expert_dims=4, rank=2)
    mutate, error, match = LAYER_MUTATIONS[mutation]
    with pytest.raises(error, match=match):
        layer(mutate(torch.randn(*batch, 5)))


def test_wrong_gates_are_refused_by_the_layer():
    layer = CPMuMoE(5, 3, expert_dims=(4, 2), rank=2)
    x = torch.randn(6, 5)
    with pytest.raises(ValueError, match=r"network has 2 expert level\(s\) \(n1, n2\) but 1 gate"):
        layer(x, [torch.rand(6, 4)])
    with pytest.raises(ValueError, match=r"gates\[1\] must have shape \(6, 2\) .* got \(6, 3\)"):
        layer(x, [torch.rand(6, 4), torch.rand(6, 3)])
    with pytest.raises(TypeError, match=r"gates\[0\] has dtype float64 but x has float32"):
        layer(x, [torch.rand(6, 4, dtype=torch.float64), torch.rand(6, 2)])


@pytest.mark.parametrize("activation", ["entmax15", "sparsemax", "softmax"])
def test_a_nan_row_gives_nan_in_that_row_only(activation):
    layer = trained_like(CPMuMoE(6, 3, expert_dims=40, rank=3, activation=activation)).eval()
    x = torch.randn(5, 6)
    clean = layer(x)
    x[2, 1] = float("nan")
    x[4, 0] = float("inf")
    y = layer(x)
    assert torch.isnan(y[[2, 4]]).all()
    torch.testing.assert_close(y[[0, 1, 3]], clean[[0, 1, 3]])


def test_empty_and_strided_inputs_work():
    layer = trained_like(TRMuMoE(6, 3, expert_dims=8, rank=(2, 2, 3))).eval()
    assert layer(torch.randn(0, 6)).shape == (0, 3)
    assert layer(torch.randn(4, 0, 6)).shape == (4, 0, 3)
    base = torch.randn(6, 5)
    torch.testing.assert_close(layer(base.t()), layer(base.t().contiguous()))
    row = torch.randn(6)
    torch.testing.assert_close(layer(row.expand(7, 6)), layer(row.repeat(7, 1)))


# ------------------------------------------------------------------ files


@pytest.fixture
def trained_file(tmp_path):
    torch.manual_seed(1)
    source = trained_like(CPMuMoE(12, 5, expert_dims=(6, 3), rank=4, input_norm=True)).eval()
    source.train()(torch.randn(64, 12))  # running statistics away from their init
    path = tmp_path / "w.safetensors"
    save(source.eval(), path)
    return source, path


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_load_into_copies_everything(trained_file):
    source, path = trained_file
    target = CPMuMoE(12, 5, expert_dims=(6, 3), rank=4, input_norm=True, dtype=torch.float64).eval()
    load_into(target, path)
    x = torch.randn(9, 12)
    torch.testing.assert_close(target(x.double()).float(), source(x), rtol=1e-5, atol=1e-6)
    for name, value in source.state_dict().items():
        if "num_batches_tracked" not in name:
            torch.testing.assert_close(target.state_dict()[name].float(), value)


@pytest.mark.parametrize(
    ("target", "match"),
    [
        (
            lambda: CPMuMoE(12, 5, expert_dims=(6, 3), rank=5, input_norm=True),
            r"its rank is \{'r': 4\}",
        ),
        (lambda: CPMuMoE(12, 5, expert_dims=(6, 3), rank=4), r"its input_norm is \{'eps'"),
        (
            lambda: CPMuMoE(12, 5, expert_dims=(6, 3), rank=4, input_norm=True, normalization="ln"),
            r"its gate is \{'normalization': 'bn'",
        ),
        (
            lambda: TRMuMoE(12, 5, expert_dims=(6, 3), rank=2, input_norm=True),
            r"its spec is 'n1 r, n2 r",
        ),
        (lambda: MuMoEBlock(12, 8, 5, expert_dims=(6, 3), rank=4), r"its kind is 'layer'"),
    ],
)
def test_load_into_a_different_module_changes_nothing(trained_file, target, match):
    _, path = trained_file
    module = target()
    before = state(module)
    with pytest.raises(ValueError, match=match):
        load_into(module, path)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda b: b[: len(b) // 2], "is not a readable mumoe weights file"),
        (lambda b: b"garbage" + b, "is not a readable mumoe weights file"),
    ],
)
def test_load_into_from_a_corrupt_file_changes_nothing(trained_file, corrupt, match):
    _, path = trained_file
    path.write_bytes(corrupt(path.read_bytes()))
    module = CPMuMoE(12, 5, expert_dims=(6, 3), rank=4, input_norm=True)
    before = state(module)
    with pytest.raises(ValueError, match=match):
        load_into(module, path)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_load_into_an_entry_of_the_wrong_shape_changes_nothing(trained_file):
    _, path = trained_file
    import json

    import safetensors.numpy
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    arrays["cores.3"] = np.zeros((6, 4), dtype=np.float32)  # the last core written is broken
    safetensors.numpy.save_file(arrays, str(path), metadata=metadata)
    assert json.loads(metadata["mumoe"])["kind"] == "layer"
    module = CPMuMoE(12, 5, expert_dims=(6, 3), rank=4, input_norm=True)
    before = state(module)
    with pytest.raises(
        ValueError, match=r"entry 'cores.3' must have shape \(5, 4\) for spec .* got \(6, 4\)"
    ):
        load_into(module, path)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_load_into_refuses_what_is_not_a_layer(trained_file):
    _, path = trained_file
    with pytest.raises(
        TypeError, match=r"save and load_into take a mumoe\.nn\.MuMoE or MuMoEBlock"
    ):
        load_into(torch.nn.Linear(3, 3), path)


# ------------------------------------------------------- threads and determinism


def test_a_layer_called_from_many_threads_gives_each_its_own_result():
    torch.manual_seed(0)
    layer = trained_like(TuckerMuMoE(10, 6, expert_dims=(4, 3), rank=(2, 2, 3, 3))).eval()
    inputs = [torch.randn(int(n), 10) for n in np.random.RandomState(0).randint(1, 200, 48)]
    with torch.no_grad():
        expected = [layer(x) for x in inputs]
    barrier = threading.Barrier(8)

    def work(k):
        if k < 8:
            barrier.wait()
        with torch.no_grad():
            return layer(inputs[k])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(len(inputs))))
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert len(layer.planner.cache) <= layer.planner.cache.maxsize
    assert tl.get_backend() == "numpy"  # the threads' pytorch backend stayed theirs


@pytest.mark.parametrize("cls", [CPMuMoE, TuckerMuMoE, TTMuMoE, TRMuMoE])
def test_the_same_seed_gives_the_same_layer_and_outputs(cls):
    def build():
        torch.manual_seed(123)
        return trained_like(cls(8, 4, expert_dims=(4, 2), rank=2), seed=5).eval()

    first, second = build(), build()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(6, 8)
    assert torch.equal(first(x), second(x))


@pytest.mark.parametrize("normalization", ["ln", None])
def test_meta_layers_refuse_real_inputs_and_gates(normalization):
    # CPU and meta tensors both report get_device() == -1; their mix computed garbage
    # that changed every call (issue #15, item 6).
    with torch.device("meta"):
        layer = MuMoE(8, 4, "cp", expert_dims=4, rank=2, normalization=normalization)
    with pytest.raises(ValueError, match="input is on cpu but the layer's parameters are on meta"):
        layer(torch.randn(3, 8))
    real = MuMoE(8, 4, "cp", expert_dims=4, rank=2, gated=False)
    with pytest.raises(ValueError, match="gates\\[0\\] is on meta but the input is on cpu"):
        real(torch.randn(3, 8), [torch.zeros(3, 4, device="meta")])
    with pytest.raises(ValueError, match="gates\\[0\\] is on meta but the input is on cpu"):
        real(torch.randn(3, 8), torch.zeros(3, 4, device="meta"))


@pytest.mark.parametrize(
    "build",
    [
        lambda: MuMoE(8, 4, "cp", expert_dims=6, rank=2),  # entmax-1.5: the default gate
        lambda: MuMoE(8, 4, "tr", expert_dims=6, rank=(2, 2, 3), activation="sparsemax"),
        lambda: MuMoE(8, 4, "mxd", expert_dims=6, activation="topk", top_k=2),
        lambda: compat.MuMoE(compat.CPMuMoE, 8, 4, [6], 3, second_dim=5),
    ],
    ids=["entmax", "sparsemax", "topk", "compat"],
)
def test_whole_models_pickle(build):
    # A local closure in the default gating made pickle and torch.save(model) fail
    # (issue #15, item 12); multiprocessing pickles models the same way.
    import io
    import pickle

    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(3, 8)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), model(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), model(x), rtol=0, atol=0)


def test_bad_optimisers_fail_at_construction_and_bn_gating_names_the_one_row_problem():
    # Issue #15, item 12: a bad optimize= used to fail at the first forward; a batch of
    # one row under batch-norm gating failed inside torch with "Expected more than 1 value".
    net = cp(3, 2, expert_dims=4, rank=2)
    with pytest.raises(ValueError, match="unknown path optimiser 'gredy'; choose 'flop-optimal'"):
        planner_of(net, optimize="gredy")
    with pytest.raises(ValueError, match="the path leaves 4 operands of 5"):
        planner_of(net, optimize=[(0, 1)])
    with pytest.raises(TypeError, match="optimize must be a path optimiser name"):
        MuMoE(3, 2, net, planner=Planner(net, optimize=3))
    layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2)
    with pytest.raises(ValueError, match="batch-norm gating cannot train on a batch of one row"):
        layer(torch.randn(1, 8))
    with pytest.raises(ValueError, match="cannot train on a batch of one row"):
        layer(torch.randn(1, 1, 8))
    assert layer.eval()(torch.randn(1, 8)).shape == (1, 4)
    assert MuMoE(8, 4, "cp", expert_dims=6, rank=2, normalization="ln")(
        torch.randn(1, 8)
    ).shape == (1, 4)


def test_edits_records_and_collections_under_threads():
    # Issue #15, item 9: overlapping edit blocks left a layer edited for good,
    # record_gates recorded other threads' gates, and collect_gates switched a model
    # that another thread was training into eval mode.
    import threading

    from mumoe.nn import collect_gates, edit_experts, record_gates

    torch.manual_seed(0)
    layer = MuMoE(6, 3, "cp", expert_dims=4, rank=2, normalization="ln")
    x = torch.randn(5, 6)
    plain = layer(x).detach()
    inside, release = threading.Event(), threading.Event()

    def hold_an_edit():
        with edit_experts(layer, {0: 0.0}):
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold_an_edit)
    holder.start()
    inside.wait(10)
    try:
        with pytest.raises(RuntimeError, match="another thread is editing this layer's experts"):
            with edit_experts(layer, {1: 0.0}):
                pass
    finally:
        release.set()
        holder.join()
    torch.testing.assert_close(layer(x), plain)  # nothing left edited

    with record_gates(layer) as record:
        other = threading.Thread(target=lambda: layer(torch.randn(7, 6)))
        other.start()
        other.join()
        assert record == {}  # the other thread's call is not recorded
        layer(x)
    assert record["gate"][0].shape == (5, 4)

    model = MuMoE(6, 3, "cp", expert_dims=4, rank=2).train()  # batch-norm gating
    seen, stop = [], threading.Event()

    def watch():
        while not stop.wait(0.001):
            seen.append(model.training and model.gate.training)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(5):
            collect_gates(model, torch.randn(256, 6), batch_size=8)
    finally:
        stop.set()
        watcher.join()
    assert seen and all(seen) and model.training


def test_edit_factors_must_fit_the_dtype_they_scale():
    # 1e5 is finite in float64 but inf in float16 (issue #15, item 12).
    from mumoe.nn import edit_experts

    half = MuMoE(8, 3, "cp", expert_dims=4, rank=2).half()
    with pytest.raises(ValueError, match=r"must be finite in float16 \(at most 65504"):
        with edit_experts(half, {0: 1e5}):
            pass
    net = cp(3, 2, expert_dims=4, rank=2)
    cores = [c.astype(np.float32) for c in random_cores(net, random_state=0)]
    with pytest.raises(ValueError, match="scales for n1 must be finite in float32"):
        scale_experts(net, cores, 0, [1.0, 1e39, 1.0, 1.0])
    assert scale_experts(net, cores, 0, [1.0, 1e30, 1.0, 1.0])[0].dtype == np.float32


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_compilers_and_transforms_work_or_say_what_does():
    # Issue #15, item 12: torch.jit, dynamic-shape torch.export and torch.func either
    # work or fail with a message saying what is supported.
    from torch.func import functional_call, grad, vmap

    from mumoe.nn import MuMoEBlock

    torch.manual_seed(0)
    x = torch.randn(5, 8)
    layer = MuMoE(8, 4, "cp", expert_dims=6, rank=3, normalization="ln").eval()
    block = MuMoEBlock(8, 16, expert_dims=4, rank=2)
    for compile_ in (
        lambda: torch.jit.trace(layer, x),
        lambda: torch.jit.script(layer),
        lambda: torch.jit.script(block),
    ):
        with pytest.raises(RuntimeError, match=r"do not support TorchScript.*use torch\.compile"):
            compile_()
    exported = torch.export.export(layer, (x,)).module()  # static shapes: works
    torch.testing.assert_close(exported(x), layer(x))
    with pytest.raises(RuntimeError, match="export with static shapes only"):
        torch.export.export(layer, (x,), dynamic_shapes={"x": {0: torch.export.Dim("b", min=2)}})

    for activation, kwargs in (("softmax", {}), ("topk", {"top_k": 2})):
        fn = MuMoE(
            8, 4, "cp", expert_dims=6, rank=3, normalization="ln", activation=activation, **kwargs
        )
        params = dict(fn.named_parameters())
        grads = grad(lambda p: functional_call(fn, p, (x,)).square().sum())(params)  # noqa: B023
        loss = fn(x).square().sum()
        loss.backward()
        torch.testing.assert_close(grads["cores.0"], fn.cores[0].grad)
        batches = torch.randn(3, 5, 8)
        torch.testing.assert_close(vmap(fn)(batches), fn(batches))
    entmax = MuMoE(8, 4, "cp", expert_dims=6, rank=3, normalization="ln")
    with pytest.raises(RuntimeError, match=r"use activation='softmax' or 'topk' under torch\.func"):
        vmap(entmax)(torch.randn(3, 5, 8))


def test_the_functional_core_takes_a_layers_own_parameter_list():
    # mumoe.forward(layer.network, layer.cores, ...) refused the ParameterList (issue #16).
    layer = MuMoE(8, 4, "cp", expert_dims=6, rank=2, gated=False)
    x, gates = torch.randn(3, 8), [torch.softmax(torch.randn(3, 6), -1)]
    with thread_backend("pytorch"):
        torch.testing.assert_close(forward(layer.network, layer.cores, x, gates), layer(x, gates))
        with pytest.raises(TypeError, match="cores must be a sequence of 3 tensors"):
            forward(layer.network, {"a": layer.cores[0]}, x, gates)


def test_describe_builds_nothing_large():
    # The README's describe of a 128-expert CLIP head must not materialise W (98M entries).
    import tracemalloc

    net = cp(768, 1000, expert_dims=128, rank=64)
    tracemalloc.start()
    try:
        describe(net, batch_size=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"describe allocated {peak / 2**20:.0f} MB at its peak"
