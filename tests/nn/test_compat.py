"""mumoe.nn.compat against the reference implementation's API, layout and arithmetic."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorly as tl
import torch

from mumoe.nn.compat import CPMuMoE, MuMoE, TRMuMoE

# The usage examples of the reference README (github.com/james-oldfield/muMoE), verbatim
# but for the import line, which names mumoe.nn.compat instead of the reference's module.
REFERENCE_CP_EXAMPLE = """
# initialise a rank-R CPMMoE
import torch
from mumoe.nn.compat import MuMoE, CPMuMoE

n_experts = 32; batch_size = 4; in_dim = 4; out_dim = 8
x = torch.randn(batch_size, in_dim)

R = 32
model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=CPMuMoE, expert_dims=[n_experts], ranks=R)
y = model(x)

# or with two levels of hierarchy
model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=CPMuMoE, expert_dims=[n_experts, 2], ranks=R, hierarchy=2)
y = model(x)
"""

REFERENCE_TR_EXAMPLE = """
import torch
from mumoe.nn.compat import MuMoE, TRMuMoE

n_experts = 32; batch_size = 4; in_dim = 4; out_dim = 8
x = torch.randn(batch_size, in_dim)

r1 = 4 ; r2 = 4 ; r3 = 4  # TR
ranks = [[r1, n_experts, r2], [r2, in_dim, r3], [r3, out_dim, r1]]
model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=TRMuMoE, expert_dims=[n_experts], ranks=ranks)
y = model(x)

# or with two levels of hierarchy
r1 = 4 ; r2 = 4 ; r3 = 4 ; r4 = 4  # TR
ranks = [[r1, n_experts, r2], [r2, n_experts, r3], [r3, in_dim, r4], [r4, out_dim, r1]]
model = MuMoE(input_dim=in_dim, output_dim=out_dim, MuMoE_layer=TRMuMoE, expert_dims=[n_experts, 2], ranks=ranks, hierarchy=2)
y = model(x)
"""


@pytest.mark.parametrize("example", [REFERENCE_CP_EXAMPLE, REFERENCE_TR_EXAMPLE], ids=["cp", "tr"])
def test_reference_readme_examples_run(example):
    namespace: dict = {}
    exec(compile(example, "reference-readme", "exec"), namespace)
    assert namespace["y"].shape == (4, 1, 8)  # the reference's shape for 2-D input


def reference_state_dict(
    kind, input_dim, output_dim, expert_dims, rank, second_dim=0, normalization="bn", apply_ln=False
):
    """A checkpoint in the reference's key layout and shapes, as its code would save it."""
    state = {}
    sizes = [*expert_dims, input_dim + 1, output_dim]
    second = [*expert_dims, output_dim + 1, second_dim]
    for prefix, dims in [("MuMoE", sizes)] + ([("MuMoE2", second)] if second_dim else []):
        for k, d in enumerate(dims):
            if kind == "cp":
                shape = (d, rank)
            else:
                shape = (rank[k][0], d, rank[k][2])
            state[f"{prefix}.factors.{k}"] = torch.randn(shape)
    for e, d in enumerate(expert_dims):
        state[f"projs.{e}"] = torch.randn(input_dim, d)
        if normalization == "bn":
            state[f"bn.{e}.running_mean"] = torch.randn(d)
            state[f"bn.{e}.running_var"] = torch.rand(d) + 0.5
            state[f"bn.{e}.num_batches_tracked"] = torch.tensor(7)
    if apply_ln:
        state["input_ln.weight"] = torch.randn(input_dim)
        state["input_ln.bias"] = torch.randn(input_dim)
    return state


def reference_forward(state, kind, x, expert_dims, act, second_dim=0, apply_ln=False):
    """The reference's arithmetic, from its checkpoint: BN (eval), act, Eq. 1 in dense form."""
    x = x.unsqueeze(1) if x.dim() == 2 else x
    a = []
    for e in range(len(expert_dims)):
        logits = x @ state[f"projs.{e}"]
        mean, var = state[f"bn.{e}.running_mean"], state[f"bn.{e}.running_var"]
        a.append(act((logits - mean) / torch.sqrt(var + 1e-5)))
    if apply_ln:
        x = torch.nn.functional.layer_norm(
            x, x.shape[-1:], state["input_ln.weight"], state["input_ln.bias"]
        )

    def layer(prefix, z):
        factors = [state[k] for k in sorted(state) if k.startswith(f"{prefix}.factors.")]
        tl.set_backend("pytorch")
        try:
            if kind == "cp":
                weight = tl.cp_to_tensor((torch.ones(factors[0].shape[1]), factors))
            else:
                weight = tl.tr_to_tensor(factors)
        finally:
            tl.set_backend("numpy")
        z = torch.cat([z, torch.ones(*z.shape[:-1], 1)], -1)
        letters = "pqrsuv"[: len(expert_dims)]
        eq = f"{letters}io," + ",".join(f"bt{c}" for c in letters) + ",bti->bto"
        return torch.einsum(eq, weight, *a, z)

    y = layer("MuMoE", x)
    if second_dim:
        y = layer("MuMoE2", torch.nn.functional.gelu(y))
    return y


def entmax(t):
    from entmax import entmax15

    return entmax15(t, dim=-1)


@pytest.mark.parametrize("hierarchy", [1, 2, 3])
@pytest.mark.parametrize("kind", ["cp", "tr"])
@pytest.mark.parametrize(("second_dim", "apply_ln"), [(0, False), (6, True)])
def test_reference_checkpoints_load_and_compute_the_same(kind, hierarchy, second_dim, apply_ln):
    torch.manual_seed(hierarchy)
    expert_dims = [5, 3, 2][:hierarchy]
    if kind == "cp":
        layer, rank = CPMuMoE, 4
    else:
        layer = TRMuMoE
        d = hierarchy + 2
        bonds = [2 + (k % 3) for k in range(d)]
        rank = [[bonds[k], 0, bonds[(k + 1) % d]] for k in range(d)]
    state = reference_state_dict(kind, 7, 4, expert_dims, rank, second_dim, "bn", apply_ln)
    model = MuMoE(
        layer,
        7,
        4,
        expert_dims,
        rank,
        second_dim=second_dim,
        normalization="bn",
        act=entmax,
        hierarchy=hierarchy,
        apply_ln=apply_ln,
    )
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state)  # strict: same keys, same shapes
    model.eval()
    x = torch.randn(6, 7)
    expected = reference_forward(state, kind, x, expert_dims, entmax, second_dim, apply_ln)
    y = model(x)
    assert y.shape == (6, 1, second_dim or 4)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


def test_state_dict_keys_of_the_reference_layout():
    model = MuMoE(CPMuMoE, 4, 8, [32, 2], 16, second_dim=3, hierarchy=2, apply_ln=True)
    assert list(model.state_dict()) == [
        "MuMoE.factors.0",
        "MuMoE.factors.1",
        "MuMoE.factors.2",
        "MuMoE.factors.3",
        "MuMoE2.factors.0",
        "MuMoE2.factors.1",
        "MuMoE2.factors.2",
        "MuMoE2.factors.3",
        "input_ln.weight",
        "input_ln.bias",
        "projs.0",
        "projs.1",
        "bn.0.running_mean",
        "bn.0.running_var",
        "bn.0.num_batches_tracked",
        "bn.1.running_mean",
        "bn.1.running_var",
        "bn.1.num_batches_tracked",
    ]
    ln = MuMoE(CPMuMoE, 4, 8, [32], 16, normalization="ln")
    assert list(ln.state_dict()) == [
        "MuMoE.factors.0",
        "MuMoE.factors.1",
        "MuMoE.factors.2",
        "projs.0",
    ]


def test_an_optimizer_state_saved_in_the_reference_order_resumes():
    # The reference registers input_ln before projs: parameters() follows, and so does
    # the optimizer state a reference training run saves (item 2 of issue #15).
    torch.manual_seed(0)
    model = MuMoE(CPMuMoE, 4, 8, [6, 2], 5, second_dim=3, hierarchy=2, apply_ln=True)
    reference_order = [
        *model.MuMoE.factors,
        *model.MuMoE2.factors,
        model.input_ln.weight,
        model.input_ln.bias,
        *model.projs,
    ]
    assert [id(p) for p in model.parameters()] == [id(p) for p in reference_order]
    saved = torch.optim.Adam(reference_order, lr=1e-2)
    model(torch.randn(8, 4)).square().mean().backward()
    saved.step()
    resumed = torch.optim.Adam(model.parameters(), lr=1e-2)
    resumed.load_state_dict(saved.state_dict())
    model(torch.randn(8, 4)).square().mean().backward()
    resumed.step()  # shapes agree: a wrong order fails here


def test_token_inputs_and_coefficients_attached_in_training():
    model = MuMoE(TRMuMoE, 4, 8, [6], [[2, 0, 3], [3, 0, 2], [2, 0, 2]])
    with torch.no_grad():
        model.projs[0].normal_()
    x = torch.randn(3, 5, 4)
    assert model(x).shape == (3, 5, 8)
    assert [tuple(a.shape) for a in model.a] == [(3, 5, 6)]
    # As the reference: an auxiliary loss on the gates (load balancing) gets a gradient.
    balance = (model.a[0].mean((0, 1)) ** 2).sum()
    balance.backward()
    assert model.projs[0].grad is not None and model.projs[0].grad.abs().sum() > 0
    with torch.no_grad():
        model(x)
    assert not model.a[0].requires_grad


def test_one_layer_serves_many_threads_each_with_its_own_coefficients():
    # Issue #26, item 13: the gate stored .a and returned the attribute, which another
    # thread had replaced (8 threads, mixed batch sizes: 15 of 15 trials failed).
    torch.manual_seed(0)
    model = MuMoE(CPMuMoE, 16, 8, [16], 4, second_dim=6).eval()
    with torch.no_grad():
        model.projs[0].normal_()
    inputs = [torch.randn(int(n), 16) for n in np.random.RandomState(0).randint(1, 64, 64)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    barrier = threading.Barrier(8)

    def work(k):
        if k < 8:
            barrier.wait()
        with torch.no_grad():
            return model(inputs[k])

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(work, range(len(inputs))))
        for got, want in zip(results, expected, strict=True):
            torch.testing.assert_close(got, want)
    assert model.a[0].shape[-1] == 16  # .a: the last call's coefficients, as the reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("normalization", ["bn", "ln"])
def test_half_precision_like_mumoe_nn(dtype, normalization):
    # The reference fails in the gate's batch norm ("mixed dtype"); compat computes the
    # gate in float32 and keeps its statistics there (item 1 of issue #15).
    torch.manual_seed(0)
    model = MuMoE(CPMuMoE, 8, 6, [4], 3, second_dim=5, normalization=normalization, apply_ln=True)
    model = model.half() if dtype == torch.float16 else model.to(dtype)
    if normalization == "bn":
        assert model.bn[0].running_var.dtype == torch.float32
    x = torch.randn(16, 8, dtype=dtype)
    y = model(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    if dtype == torch.bfloat16:
        y.float().square().mean().backward()
        assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())


def test_reference_initialisation():
    torch.manual_seed(0)
    cp = CPMuMoE(64, 32, [256, 4], 128, hierarchy=2)
    assert abs(cp.factors[0].mean().item() - 1) < 0.05
    assert torch.equal(cp.factors[1], torch.ones_like(cp.factors[1]))
    assert cp.factors[2].abs().max() <= (1 / 64) ** 0.5
    assert cp.factors[3].abs().max() <= (1 / 128) ** 0.5


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: CPMuMoE(4, 8, [32, 2], 16), r"hierarchy=1 but expert_dims=\[32, 2\] has 2 level"),
        (
            lambda: TRMuMoE(4, 8, [32], [[4, 0, 4], [4, 0, 3], [4, 0, 4]]),
            r"TR ranks must close the ring: ranks\[1\]\[2\]=3 != ranks\[2\]\[0\]=4",
        ),
        (
            lambda: TRMuMoE(4, 8, [32], [[4, 0, 4], [4, 0, 4]]),
            r"ranks must list \[r_left, size, r_right\] for each of the 3 cores",
        ),
        (
            lambda: MuMoE(CPMuMoE, 4, 8, [32], 16, normalization="gn"),
            r"normalization must be 'bn' or 'ln', got 'gn'",
        ),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
