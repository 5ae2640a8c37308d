"""Diagrams: every core, bond and open leg of any network is drawn; the usage heatmap."""

from __future__ import annotations

import itertools

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'mumoe[demo]')")

import numpy as np
from hypothesis import given, settings
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

import mumoe
from mumoe.plotting import draw_network, plot_usage
from mumoe.testing import networks

FORMATS_DRAWN = ["cp", "tucker", "tt", "tr", "mxd", "lowrank", "dense"]


@settings(max_examples=25)
@given(networks())
def test_every_core_bond_and_open_leg_is_drawn(net):
    fig = draw_network(net)
    ax = fig.axes[0]
    holders = {b: sum(b in legs for legs in net.core_legs) for b in net.bonds}
    roles = (*net.expert_legs, *net.input_legs, *net.output_legs)
    shared = [
        leg for leg in roles if sum(leg in c for c in net.core_legs) > 1
    ]  # open hyperedges: one node each
    circles = [p for p in ax.patches if isinstance(p, Circle)]
    lines = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(circles) == net.n_cores + sum(n > 2 for n in holders.values()) + len(shared)
    assert len(lines) == sum(n == 2 for n in holders.values())
    texts = {t.get_text() for t in ax.texts}
    labels = [t.get_text() for t in ax.texts]
    for leg in (*roles, *net.bonds):
        assert f"{leg}={net.sizes[leg]}" in texts
    for leg in roles:  # every open leg drawn once, shared or not
        assert labels.count(f"{leg}={net.sizes[leg]}") == 1
    assert ax.get_title() == f"{net.format}: {net.spec}"


def _lines_under_labels(fig):
    """The labels whose box any drawn line crosses (core numbers excepted: they sit on cores)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    ax = fig.axes[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    to_data = ax.transData.inverted()
    polylines = [line.get_xydata() for line in ax.lines]
    for patch in ax.patches:
        if isinstance(patch, FancyArrowPatch):  # a bond, maybe curved: its drawn path
            for vertices in patch.get_path().to_polygons(closed_only=False):
                polylines.append(to_data.transform(patch.get_transform().transform(vertices)))
    crossed = []
    for text in ax.texts:
        if text.get_text().startswith("#"):
            continue
        box = text.get_window_extent(renderer)
        (x0, y0), (x1, y1) = to_data.transform([[box.x0, box.y0], [box.x1, box.y1]])
        samples = (
            a + t * (b - a)
            for line in polylines
            for a, b in itertools.pairwise(line)
            for t in np.linspace(0, 1, 60)
        )
        if any(x0 < x < x1 and y0 < y < y1 for x, y in samples):
            crossed.append(text.get_text())
    return crossed


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("fmt", FORMATS_DRAWN)
def test_labels_keep_off_the_lines(fmt, levels):
    # Issue #26, item 10: bond labels were centred on their lines, and hyperedge and
    # open-leg labels touched theirs (59 crossings over these 21 diagrams).
    rank = {} if fmt in ("mxd", "dense") else {"rank": 3}
    net = mumoe.preset(fmt, 768, 1000, expert_dims=(32, 4, 2)[:levels], **rank)
    assert _lines_under_labels(draw_network(net)) == []


@pytest.mark.parametrize("spec", ["n1 a, a i b, b o", "n o, i o", "n1 n2 a, a i b, b o"])
def test_labels_of_custom_networks_keep_off_the_lines(spec):
    levels = 2 if "n2" in spec else 1
    net = mumoe.Network(spec, 768, 1000, expert_dims=(32, 4)[:levels], rank=16)
    assert _lines_under_labels(draw_network(net)) == []


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


def test_the_frontier_plots_the_mean_and_spread_over_seeds():
    from mumoe.plotting import plot_frontier

    records = [
        {"kind": kind, "k": k, "seed": s, "l0": k + s, "nmse": 1 / k + s}
        for kind in ("mxd", "transcoder")
        for k in (2, 8)
        for s in (0, 1)
    ]
    fig = plot_frontier(records, metric="nmse")
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0].get_xdata(), [2.5, 8.5])  # mean L0 over the seeds
    np.testing.assert_allclose(lines[0].get_ydata(), [1.0, 0.625])
    with pytest.raises(ValueError, match="unknown metric 'ce'"):
        plot_frontier(records, metric="ce")
    with pytest.raises(ValueError, match="no records"):
        plot_frontier([])
