"""Diagrams: every core, bond and open leg of any network is drawn; the usage heatmap."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'mumoe[demo]')")

import numpy as np
from hypothesis import given, settings
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

from mumoe.plotting import draw_network, plot_usage
from mumoe.testing import networks


@settings(max_examples=25)
@given(networks())
def test_every_core_bond_and_open_leg_is_drawn(net):
    fig = draw_network(net)
    ax = fig.axes[0]
    holders = {b: sum(b in legs for legs in net.core_legs) for b in net.bonds}
    shared = [
        leg for leg in (*net.expert_legs, "i", "o") if sum(leg in c for c in net.core_legs) > 1
    ]  # open hyperedges: one node each
    circles = [p for p in ax.patches if isinstance(p, Circle)]
    lines = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(circles) == net.n_cores + sum(n > 2 for n in holders.values()) + len(shared)
    assert len(lines) == sum(n == 2 for n in holders.values())
    texts = {t.get_text() for t in ax.texts}
    labels = [t.get_text() for t in ax.texts]
    for leg in (*net.expert_legs, "i", "o", *net.bonds):
        assert f"{leg}={net.sizes[leg]}" in texts
    for leg in (*net.expert_legs, "i", "o"):  # every open leg drawn once, shared or not
        assert labels.count(f"{leg}={net.sizes[leg]}") == 1
    assert ax.get_title() == f"{net.format}: {net.spec}"


def test_it_draws_on_the_axes_it_is_given():
    from mumoe import cp

    fig = Figure()
    ax = fig.subplots()
    assert draw_network(cp(3, 2, expert_dims=4, rank=2), ax, title="mine") is fig
    assert ax.get_title() == "mine"


def test_the_usage_heatmap_draws():
    history = np.random.default_rng(0).dirichlet(np.ones(6), size=12)
    figure = plot_usage(history, every=5)
    assert figure.axes[0].get_ylabel() == "forward pass"
    assert figure.axes[0].get_ylim() == (60.0, 0.0)  # 12 rows, every 5th pass
    assert figure.axes[0].images[0].get_clim() == (0.0, history.max())
    shared = plot_usage(history, vmax=0.1)
    assert shared.axes[0].images[0].get_clim() == (0.0, 0.1)
    with pytest.raises(ValueError, match="history must be \\(passes, experts\\)"):
        plot_usage(np.ones(3))
