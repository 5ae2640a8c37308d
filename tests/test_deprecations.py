"""Every renamed public name still works, with a DeprecationWarning naming its new home."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from mumoe import Network, cp, parse_spec, random_cores
from mumoe.inference import InferenceMuMoE, InferenceMuMoEBlock


@pytest.mark.parametrize("name", ["gate_params", "linear_params", "match_rank", "resolve_budget"])
def test_mumoe_matching_is_mumoe_budget(name):
    matching = importlib.import_module("mumoe.matching")
    with pytest.warns(DeprecationWarning, match=f"mumoe.budget.{name}"):
        old = getattr(matching, name)
    assert old is getattr(importlib.import_module("mumoe.budget"), name)


def test_old_attribute_names():
    net = cp(4, 3, 2, rank=2)
    with pytest.warns(DeprecationWarning, match="Network.core_legs"):
        assert net.cores == net.core_legs
    with pytest.warns(DeprecationWarning, match="ParsedSpec.core_legs"):
        assert parse_spec("n r, i r, o r").cores == (("n1", "r"), ("i", "r"), ("o", "r"))
    plan = net.planner.forward(4, "numpy", np.dtype("float64"))
    with pytest.warns(DeprecationWarning, match="Plan.step_equations"):
        assert plan.steps == plan.step_equations
    with pytest.warns(DeprecationWarning, match="Plan.bias_program"):
        assert plan.split_program is plan.bias_program
    with pytest.warns(DeprecationWarning, match="Program.bias_inside"):
        assert plan.bias_program.split is True
    with pytest.warns(DeprecationWarning, match="Program.bias_width"):
        assert plan.bias_program.split_width == plan.bias_program.bias_width


def test_the_split_keyword_is_the_bias_keyword():
    from mumoe import Plan
    from mumoe.contraction import compile_program

    sizes = {"a": 4, "b": 3, "c": 2}
    with pytest.warns(DeprecationWarning, match="bias_input"):
        program = compile_program(
            ["ab", "bc"], "ac", [(0, 1)], {**sizes, "b": 4}, lead="a", split=0
        )
    assert program.bias_inside
    with pytest.warns(DeprecationWarning, match="bias_input"):
        plan = Plan.build("ab,bc->ac", [(4, 4), (4, 2)], lead="a", split=0)
    x, core = np.ones((4, 3)), np.arange(8.0).reshape(4, 2)
    with pytest.warns(DeprecationWarning, match="bias_inside=True"):
        np.testing.assert_array_equal(plan(x, core, split=True), plan(x, core, bias_inside=True))


@pytest.mark.parametrize(
    ("old", "new"),
    [("forward_plan", "forward"), ("materialize_plan", "materialize"), ("expert_plan", "expert")],
)
def test_network_plan_methods_are_the_planners(old, new):
    net = cp(4, 3, 2, rank=2)
    args = (8, "numpy", np.dtype("float64")) if new == "forward" else ("numpy", np.dtype("float64"))
    with pytest.warns(DeprecationWarning, match=f"Network.planner.{new}"):
        plan = getattr(net, old)(*args)
    assert plan is getattr(net.planner, new)(*args)


def test_network_format_argument_is_read_from_the_spec():
    with pytest.warns(DeprecationWarning, match="read from the spec"):
        net = Network("n r, i r, o r", 4, 3, 2, rank=2, format="custom")
    assert net.format == "cp"


def test_inference_input_norm_is_input_norm_affine():
    net = cp(4, 3, 2, rank=2)
    affine = (np.ones(3), np.zeros(3))
    with pytest.warns(DeprecationWarning, match="input_norm_affine"):
        layer = InferenceMuMoE(net, random_cores(net), input_norm=affine)
    assert layer.input_norm_affine is affine
    with pytest.warns(DeprecationWarning, match="input_norm_affine"):
        assert layer.input_norm is affine
    first = InferenceMuMoE(net, random_cores(net), projections=[np.zeros((3, 4))],
                           normalization=None)  # fmt: skip
    second = InferenceMuMoE(cp(4, 2, 3, rank=2), random_cores(cp(4, 2, 3, rank=2)))
    with pytest.warns(DeprecationWarning, match="input_norm_affine"):
        block = InferenceMuMoEBlock(first, second, input_norm=affine)
    assert block.input_norm_affine is affine
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        InferenceMuMoE(net, random_cores(net), input_normalisation=affine)


def test_torch_activation_table():
    pytest.importorskip("torch", reason="torch is not installed")
    import mumoe.nn
    from mumoe.nn.gating import TORCH_KERNELS, torch_gate_coefficients

    with pytest.warns(DeprecationWarning, match="mumoe.nn.gating.TORCH_KERNELS"):
        assert mumoe.nn.ACTIVATIONS is TORCH_KERNELS
    with pytest.warns(DeprecationWarning, match="mumoe.nn.gating.TORCH_KERNELS"):
        assert mumoe.nn.gating.ACTIVATIONS is TORCH_KERNELS
    for module in (mumoe.nn, mumoe.nn.gating):
        with pytest.warns(DeprecationWarning, match="torch_gate_coefficients"):
            assert module.gate_coefficients is torch_gate_coefficients


def test_torch_names_stay_importable_from_their_old_modules():
    pytest.importorskip("torch", reason="torch is not installed")
    from mumoe.analysis import collect_gates, counterfactual_histogram, edit_experts, edit_experts_
    from mumoe.inference import load_into, save
    from mumoe.nn import (
        GateRecord,
        analysis,
        build_network,
        contract,
        io,
        record_gates,
        torch_forward,
    )

    assert (save, load_into) == (io.save, io.load_into)
    assert (collect_gates, counterfactual_histogram, edit_experts, edit_experts_) == (
        analysis.collect_gates, analysis.counterfactual_histogram,
        analysis.edit_experts, analysis.edit_experts_,
    )  # fmt: skip
    assert (GateRecord, record_gates) == (analysis.GateRecord, analysis.record_gates)
    assert torch_forward is contract.torch_forward
    assert build_network is importlib.import_module("mumoe").build_network


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        importlib.import_module("mumoe.inference").nothing  # noqa: B018


def test_the_partial_sort_window_and_the_demos_one_seed(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="mumoe.nn and the demo need torch")
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    import io

    import mumoe.nn.gating
    from mumoe import simplex
    from mumoe.cli import main
    from mumoe.demo import run

    with pytest.warns(DeprecationWarning, match="mumoe.simplex.WINDOW"):
        assert mumoe.nn.gating.PARTIAL_SORT == simplex.WINDOW
    options = {"experts": [4], "epochs": 1, "output": None, "progress": False, "threads": 1}
    with pytest.warns(DeprecationWarning, match=r"run\(seeds=\(seed,\)\)"):
        old = run(seed=3, stream=io.StringIO(), **options)
    assert old.to_json() == run(seeds=(3,), stream=io.StringIO(), **options).to_json()
    argv = ["demo", "--seed", "3", "--experts", "4", "--epochs", "1", "--threads", "1",
            "--no-progress", "--json", "out.json", "--output", "figures"]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # the files the command writes
    assert main(argv) == 0
    assert (tmp_path / "out.json").exists()
    assert "--seed is deprecated; use --seeds 3" in capsys.readouterr().err
