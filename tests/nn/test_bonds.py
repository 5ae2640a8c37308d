"""Rank regularisation on any bond (tensor dropout, a lasso on its components) and pruning,
on every format and a custom network: the function kept where it should be, cores shrunk."""

from __future__ import annotations

import pytest
import torch

import mumoe
from mumoe.backends import thread_backend
from mumoe.nn import (
    CPMuMoE,
    MuMoE,
    MuMoEBlock,
    collect_aux_losses,
    component_norms,
    prune_bonds,
    regularize_bonds,
    save_model,
)

NETWORKS = {
    "cp": ("cp", {"expert_dims": 4, "rank": 5}, ["r"]),
    "tucker": ("tucker", {"expert_dims": 4, "rank": (3, 4, 4)}, ["r1", "ri", "ro"]),
    "tt": ("tt", {"expert_dims": (4, 3), "rank": (2, 3, 4)}, ["r1", "r2", "r3"]),
    "tr": ("tr", {"expert_dims": 4, "rank": (2, 3, 3)}, ["r0", "r1", "r2"]),
    "lowrank": ("lowrank", {"expert_dims": 4, "rank": 3}, ["r"]),
    "custom": ("n1 a, n2 a b, i b c, o c", {"expert_dims": (4, 3), "rank": 3}, ["a", "b", "c"]),
}


def layer_of(name, seed=0):
    network, options, _ = NETWORKS[name]
    torch.manual_seed(seed)
    layer = MuMoE(10, 6, network, **options, normalization=None, activation="softmax")
    layer = layer.double()
    with torch.no_grad():
        for projection in layer.gate.projections:
            projection.normal_()
    return layer


@pytest.mark.parametrize("name", list(NETWORKS))
def test_a_lasso_and_dropout_start_where_the_layer_was(name):
    layer = layer_of(name)
    bonds = NETWORKS[name][2]
    x = torch.randn(5, 10, dtype=torch.float64)
    before = layer.eval()(x)
    regularize_bonds(layer, lasso=dict.fromkeys(bonds, 0.01), dropout={bonds[0]: 0.5})
    torch.testing.assert_close(layer.eval()(x), before, rtol=1e-10, atol=1e-12)
    weights = layer.bond_regularizer.weights
    expected = sum(0.01 * weights[b].abs().sum() for b in bonds)
    torch.testing.assert_close(collect_aux_losses(layer), expected)
    layer.train()
    layer(x).square().sum().backward()
    assert all(weights[b].grad is not None for b in bonds)


def test_dropout_drops_whole_components_and_rescales_the_others():
    layer = layer_of("cp").train()
    regularize_bonds(layer, dropout={"r": 0.4})
    x = torch.randn(3, 10, dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    keep = torch.rand(5) >= 0.4  # the mask the pass drew (no other draw comes first)
    scale = keep.double() / 0.6
    with torch.no_grad():
        cores = [c.clone() for c in layer.cores]
        cores[0] = cores[0] * scale  # one core holding r, along r
        with thread_backend("pytorch"):
            expected = mumoe.forward(layer.network, cores, x, layer.gate(x))
    torch.testing.assert_close(y.detach(), expected)
    assert not keep.all()  # the check is not of the identity
    layer.eval()
    with torch.no_grad():
        with thread_backend("pytorch"):
            plain = mumoe.forward(layer.network, list(layer.cores), x, layer.gate(x))
        torch.testing.assert_close(layer(x), plain)  # no dropout in eval


@pytest.mark.parametrize("name", list(NETWORKS))
def test_pruning_zero_components_keeps_the_function_exactly(name):
    layer = layer_of(name).eval()
    network = layer.network
    bond = NETWORKS[name][2][-1]
    k = next(k for k, legs in enumerate(network.core_legs) if bond in legs)
    axis = network.core_legs[k].index(bond)
    with torch.no_grad():
        layer.cores[k].narrow(axis, 0, 1).zero_()  # component 0 contributes nothing
    x = torch.randn(4, 10, dtype=torch.float64)
    before = layer(x)
    report = prune_bonds(layer, threshold=0.0, bonds=[bond])
    assert report.ranks[""][1][bond] == network.ranks[bond] - 1
    assert report.params_after < report.params_before == network.n_params
    assert layer.network.n_params == report.params_after
    torch.testing.assert_close(layer(x), before, rtol=1e-10, atol=1e-12)


def test_a_lasso_trained_layer_prunes_within_the_lasso_tolerance():
    torch.manual_seed(0)
    teacher = CPMuMoE(16, 8, expert_dims=4, rank=2, normalization=None, activation="softmax")
    with torch.no_grad():
        for core in teacher.cores:
            core.normal_(std=0.5)
        teacher.gate.projections[0].normal_()
    student = CPMuMoE(16, 8, expert_dims=4, rank=8, normalization=None, activation="softmax")
    with torch.no_grad():
        student.gate.projections[0].copy_(teacher.gate.projections[0])
    regularize_bonds(student, lasso={"r": 3e-3})
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = torch.randn(512, 16)
    with torch.no_grad():
        target = teacher(x)
    for _ in range(600):
        loss = (student(x) - target).square().mean() + collect_aux_losses(student)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = student.bond_regularizer.weights["r"].detach().abs()
    threshold = 0.05
    assert (weights < threshold).any(), weights  # the lasso drove a component down
    student.eval()
    with torch.no_grad():
        before = student(x)
    report = prune_bonds(student, threshold=threshold)
    assert report.ranks[""][1]["r"] < 8 and report.params_after < report.params_before
    assert "bond_regularizer" not in student._modules
    with torch.no_grad():
        change = float((student(x) - before).norm() / before.norm())
    assert change < 1e-2


def test_keep_the_largest_components_per_bond_and_blocks():
    block = MuMoEBlock(8, 16, expert_dims=4, rank=6, normalization=None)
    norms = component_norms(block.fc2.network, list(block.fc2.cores), "r")
    report = prune_bonds(block, keep=4)
    assert report.ranks["fc1"][1] == {"r": 4} and report.ranks["fc2"][1] == {"r": 4}
    assert block.fc2.cores[0].shape == (4, 4)
    kept = torch.sort(torch.argsort(norms, descending=True)[:4]).values
    torch.testing.assert_close(
        component_norms(block.fc2.network, list(block.fc2.cores), "r"), norms[kept]
    )
    block(torch.randn(3, 8)).sum().backward()  # still trains


def test_bad_requests_are_refused_and_nothing_changes(tmp_path):
    layer = layer_of("cp")
    with pytest.raises(ValueError, match=r"\['q'\] are not bonds of 'n1 r, i r, o r', whose bonds"):
        regularize_bonds(layer, lasso={"q": 0.1})
    with pytest.raises(ValueError, match=r"probability in \[0, 1\)"):
        regularize_bonds(layer, dropout={"r": 1.0})
    with pytest.raises(ValueError, match="coefficient >= 0"):
        regularize_bonds(layer, lasso={"r": -1})
    with pytest.raises(ValueError, match="needs dropout= or lasso="):
        regularize_bonds(layer)
    assert "bond_regularizer" not in layer._modules
    with pytest.raises(ValueError, match="has no rank to regularise"):
        regularize_bonds(MuMoE(10, 6, "mxd", expert_dims=4), lasso={"r": 0.1})
    regularize_bonds(layer, lasso={"r": 0.1})
    with pytest.raises(ValueError, match="regularised already"):
        regularize_bonds(layer, dropout={"r": 0.1})
    with pytest.raises(ValueError, match="has a bond regularizer"):
        layer.get_config()
    shapes = [tuple(c.shape) for c in layer.cores]
    with pytest.raises(ValueError, match="keeps no component"):
        prune_bonds(layer, threshold=1e9)
    with pytest.raises(ValueError, match="exactly one of threshold= and keep="):
        prune_bonds(layer, threshold=0.1, keep=2)
    with pytest.raises(ValueError, match="keep must be a positive int"):
        prune_bonds(layer, keep=0)
    assert [tuple(c.shape) for c in layer.cores] == shapes
    assert "bond_regularizer" in layer._modules
    prune_bonds(layer, keep=3)
    model = torch.nn.Sequential(layer)
    save_model(model, tmp_path)  # folded: a configuration again
    with pytest.raises(TypeError, match=r"holds no mumoe\.nn\.MuMoE layer to prune"):
        prune_bonds(torch.nn.Linear(2, 2), keep=1)


def test_a_zero_component_gets_directions_and_can_grow():
    torch.manual_seed(0)
    layer = MuMoE(10, 6, "tt", expert_dims=4, rank=(4, 3), normalization=None)
    norms = component_norms(layer.network, list(layer.cores), "r1")
    assert (norms == 0).any()  # TT's start leaves components of r1 at zero
    x = torch.randn(5, 10)
    before = layer.eval()(x)
    regularize_bonds(layer, lasso={"r1": 0.0})
    weights = layer.bond_regularizer.weights["r1"]
    assert torch.equal(weights.detach() == 0, norms == 0)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6)  # unchanged
    layer.train()
    layer(x).square().sum().backward()
    assert (weights.grad[norms == 0] != 0).all()  # the dead components get a gradient


def test_a_refused_prune_leaves_the_regularizer_training():
    layer = layer_of("cp").train()
    regularize_bonds(layer, dropout={"r": 0.3})
    with pytest.raises(ValueError, match="keeps no component"):
        prune_bonds(layer, threshold=1e9)
    with pytest.raises(ValueError, match=r"keep names \['R'\], which prune_bonds does not prune"):
        prune_bonds(layer, keep={"R": 2})
    assert layer.bond_regularizer.training and layer.training


def test_a_regularized_layer_copies_and_is_refused_where_its_cores_are_read(tmp_path):
    import copy

    from mumoe.nn import edit_experts_, load_into, remove_experts_, save

    layer = layer_of("cp").train()
    regularize_bonds(layer, lasso={"r": 0.01}, dropout={"r": 0.2})
    layer(torch.randn(3, 10, dtype=torch.float64)).sum().backward()
    twin = copy.deepcopy(layer)  # no graph kept: the penalty is computed when read
    assert torch.equal(twin.bond_regularizer.weights["r"], layer.bond_regularizer.weights["r"])
    with pytest.raises(ValueError, match="bond regularizer"):
        save(layer, tmp_path / "layer.safetensors")
    save(layer_of("cp").eval(), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="bond regularizer"):
        load_into(layer, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="bond regularizer"):
        edit_experts_(layer, {0: 0.0})
    with pytest.raises(ValueError, match="bond regularizer"):
        remove_experts_(layer, [0])
    block = MuMoEBlock(8, 16, expert_dims=4, rank=3)
    regularize_bonds(block, lasso={"r": 0.01})
    with pytest.raises(ValueError, match="bond regularizers"):
        block.get_config()
    torch.manual_seed(3)
    a = layer.materialize()  # a view: no dropout drawn, the same twice
    assert torch.equal(a, layer.materialize())


def test_nothing_to_prune_keeps_the_parameters():
    layer = layer_of("cp")
    cores = list(layer.cores)
    report = prune_bonds(layer, keep=5)
    assert report.params_before == report.params_after
    assert all(a is b for a, b in zip(cores, layer.cores, strict=True))
