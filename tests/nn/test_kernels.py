"""The torch kernels compiled plans call: values, gradients, memory kept, and the bias rule."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mumoe import Network, mxd, planner_of
from mumoe.nn import MuMoE, bias_matmul
from mumoe.plan import (
    BIAS_KERNEL_ELEMENTS,
    Kernels,
    Plan,
    backend_kernels,
    describe,
)


def _operands(rows: int = 5, k: int = 4, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, dtype=torch.float64, generator=generator, requires_grad=True)
    core = torch.randn(k + 1, n, dtype=torch.float64, generator=generator, requires_grad=True)
    return x, core


def test_bias_matmul_is_x_at_the_core_plus_its_last_row():
    x, core = _operands()
    torch.testing.assert_close(bias_matmul(x, core), x @ core[:-1] + core[-1])


def test_bias_matmul_gradients_and_second_derivatives():
    x, core = _operands()
    assert torch.autograd.gradcheck(bias_matmul, (x, core))
    assert torch.autograd.gradgradcheck(bias_matmul, (x, core))
    y = bias_matmul(x.detach(), core)  # no gradient asked for x
    (grad,) = torch.autograd.grad(y.square().sum(), core)
    (expected,) = torch.autograd.grad((x.detach() @ core[:-1] + core[-1]).square().sum(), core)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize(
    ("x_shape", "core_shape"),
    [((5, 4), (4, 3)), ((5, 4), (6, 3)), ((2, 5, 4), (5, 3)), ((5, 4), (5,))],
)
def test_bias_matmul_names_the_shapes_it_expects(x_shape, core_shape):
    with pytest.raises(ValueError, match=r"x of shape \(B, I\) and core of shape \(I \+ 1, N\)"):
        bias_matmul(torch.zeros(x_shape), torch.zeros(core_shape))


def test_torch_plans_use_the_kernel_for_inputs_of_the_threshold_size():
    net = mxd(512, 100, expert_dims=6)
    rows = BIAS_KERNEL_ELEMENTS // 512  # 128 rows of 512: the threshold
    torch_plan = planner_of(net).forward(rows, "pytorch", torch.float64)
    numpy_plan = planner_of(net).forward(rows, "numpy", np.dtype("float64"))
    assert torch_plan.bias_program.kernels.bias_matmul is bias_matmul
    assert torch_plan.bias_inside(rows, differentiable=True)
    assert not torch_plan.bias_inside(rows - 1, differentiable=True)  # a small x: ones column
    assert torch_plan.bias_inside(1, differentiable=False)
    assert not numpy_plan.bias_inside(rows, differentiable=True)  # numpy keeps the batch rule
    text = describe(net, rows, backend="pytorch", dtype=torch.float64)
    assert "with or without gradients to the cores (with them by the bias_matmul kernel)" in text
    text = describe(net, rows - 1, backend="pytorch", dtype=torch.float64)
    assert "with them a column of ones (the split by the bias_matmul kernel from 128 rows)" in text


@pytest.mark.parametrize(
    ("spec", "experts", "rank"),
    [("n o, i o", 6, None), ("n r, i r, o r", 6, 3), ("n1 n2 a, a i b, b o", (2, 3), 3)],
)
def test_training_keeps_no_copy_of_the_input(spec, experts, rank):
    # The memory kept for backward: the input itself, never [x, 1] or a slice's gradient.
    net = Network(spec, 512, 5, expert_dims=experts, rank=rank)
    layer = MuMoE(512, 5, net, dtype=torch.float64)
    x = torch.randn(128, 512, dtype=torch.float64)  # BIAS_KERNEL_ELEMENTS
    kept: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert (128, 513) not in kept, kept
    y.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_declared_addmm_without_bias_matmul_still_adds_the_bias_inside():
    plan = Plan.build("ab,bc->ac", [(3, 5), (5, 2)], lead="a", bias_input=0)
    calls = []

    def addmm(c, a, b):
        calls.append(1)
        return torch.addmm(c, a, b)

    program = dataclasses.replace(plan.bias_program, kernels=Kernels(addmm=addmm))
    x, core = torch.randn(3, 4), torch.randn(5, 2)
    torch.testing.assert_close(program([x, core]), x @ core[:4] + core[4])
    assert calls == [1]
    assert backend_kernels("pytorch").addmm is None  # pytorch declares bias_matmul instead
