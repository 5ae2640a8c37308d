"""Tensor-network diagrams of :class:`~mumoe.Network` objects, and expert-usage heatmaps.

Needs matplotlib (``pip install "mumoe[demo]"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch

from mumoe.spec import Network

__all__ = ["FRONTIER_METRICS", "draw_network", "plot_frontier", "plot_usage"]

OPEN = {"i": "tab:blue", "o": "tab:green"}  # by the leg's first letter (i2: blue); experts: orange
RADIUS = 0.22


def _positions(network: Network) -> dict[int, np.ndarray]:
    k = network.n_cores
    # A core joined to every other by its own bonds (Tucker's) goes in the middle.
    pairwise = {b for b in network.bonds if sum(b in legs for legs in network.core_legs) == 2}
    shared = [
        {
            j
            for j, other in enumerate(network.core_legs)
            if j != c and set(legs) & set(other) & pairwise
        }
        for c, legs in enumerate(network.core_legs)
    ]
    hub = next((c for c in range(k) if k >= 4 and len(shared[c]) == k - 1), None)
    ring = [c for c in range(k) if c != hub]
    positions = {hub: np.zeros(2)} if hub is not None else {}
    for m, c in enumerate(ring):
        angle = math.pi / 2 + 2 * math.pi * m / len(ring) if len(ring) > 2 else math.pi * m
        positions[c] = 1.1 * np.array([math.cos(angle), math.sin(angle)])
    return positions


def _xy(point: np.ndarray) -> tuple[float, float]:
    return float(point[0]), float(point[1])


def _label(ax: Axes, at: np.ndarray, direction: np.ndarray, text: str, **style: object) -> None:
    # Anchor the text at ``at`` on the side it faces, so that it grows away along
    # ``direction``: a label beside or beyond a line never lies across it.
    dx, dy = direction / (np.linalg.norm(direction) + 1e-12)
    ha = "left" if dx > 0.38 else "right" if dx < -0.38 else "center"
    va = "bottom" if dy > 0.38 else "top" if dy < -0.38 else "center"
    ax.text(*_xy(at), text, ha=ha, va=va, **style)  # type: ignore[arg-type]


def _free_direction(node: np.ndarray, ends: list[np.ndarray]) -> np.ndarray:
    # A hyperedge's label goes into the widest gap between the lines leaving ``node``.
    angles = sorted(math.atan2(*(end - node)[::-1]) for end in ends)
    gaps = [(b - a, a) for a, b in zip(angles, [*angles[1:], angles[0] + 2 * math.pi], strict=True)]
    width, start = max(gaps)
    middle = start + width / 2
    # Far enough out that a label fits between the two lines of a narrow gap.
    reach = min(0.45, max(0.1, 0.18 / math.tan(min(width, 3.0) / 2)))
    return reach * np.array([math.cos(middle), math.sin(middle)])


def _open_hyperedge(
    ax: Axes, leg: str, holders: list[np.ndarray], centre: np.ndarray, k: int, n: int, size: int
) -> None:
    # An open leg shared by several cores: a node in the leg's colour joined to each,
    # with one free line, set off the line between the cores (where a bond may run).
    # The ``n`` shared legs alternate sides; those on one side fan out.
    color = OPEN.get(leg[0], "tab:orange")
    node = np.mean(holders, axis=0)
    direction = node - centre
    if np.linalg.norm(direction) < 1e-9:
        first, last = holders[0], holders[-1]
        direction = np.array([first[1] - last[1], last[0] - first[0]])
    direction = direction / (np.linalg.norm(direction) + 1e-12) * (-1) ** k
    on_side = (n + 1 - k % 2) // 2
    turn = math.radians(50) * (k // 2 - (on_side - 1) / 2)
    cos, sin = math.cos(turn), math.sin(turn)
    direction = np.array(
        [cos * direction[0] - sin * direction[1], sin * direction[0] + cos * direction[1]]
    )
    node = node + 0.6 * direction
    for point in holders:
        ax.plot(*zip(point, node, strict=True), color=color, lw=2.2, zorder=1)
    end = node + 0.45 * direction
    ax.plot(*zip(node, end, strict=True), color=color, lw=2.2, zorder=1)
    ax.add_patch(Circle(_xy(node), 0.06, color=color, zorder=3))
    _label(ax, end + 0.06 * direction, direction, f"{leg}={size}", fontsize=8.5, color=color)


def draw_network(network: Network, ax: Axes | None = None, title: str | None = None) -> Figure:
    r"""Draw the tensor network of ``network``.

    Cores are circles numbered as in ``network.core_legs``.  A bond held by two
    cores is a line between them, one held by three or more (a hyperedge, as
    in CP) a small black node joined to each; the open legs of
    :math:`\mathcal{W}` (the expert modes ``n_e`` in orange, the input ``i``
    in blue, the output ``o`` in green) are free lines labelled with their
    sizes, and an open leg shared by several cores (an open hyperedge, as
    MxD's ``o``) a node of its colour joined to each, with one free line.  A
    core joined to every other by its own bonds (Tucker's) is drawn
    in the middle, the others on a circle.

    Parameters
    ----------
    network : Network
    ax : matplotlib.axes.Axes, optional
        Where to draw; by default on a new :class:`matplotlib.figure.Figure`
        (not registered with pyplot).
    title : str, optional
        Defaults to the format and the spec.

    Returns
    -------
    matplotlib.figure.Figure
        The figure that holds ``ax``.

    Examples
    --------
    >>> from mumoe import tr
    >>> fig = draw_network(tr(16, 10, expert_dims=(8, 4), rank=(2, 2, 2, 3)))
    >>> len(fig.axes[0].patches)  # four cores and four bonds
    8
    """
    if ax is None:
        fig = Figure(figsize=(3.6, 3.4), layout="constrained")
        ax = fig.subplots()
    figure = ax.figure
    while not isinstance(figure, Figure):  # the Axes of a SubFigure
        figure = figure.figure
    pos = _positions(network)
    centre = np.mean(list(pos.values()), axis=0)
    sizes = network.sizes

    pairs: dict[tuple[int, int], int] = {}
    for bond in network.bonds:
        holders = [c for c, legs in enumerate(network.core_legs) if bond in legs]
        label = f"{bond}={sizes[bond]}"
        if len(holders) == 2:
            a, b = holders
            seen = pairs.get((a, b), 0)
            pairs[(a, b)] = seen + 1
            bend = 0.35 * ((seen + 1) // 2) * (-1) ** seen
            ax.add_patch(
                FancyArrowPatch(
                    _xy(pos[a]),
                    _xy(pos[b]),
                    arrowstyle="-",
                    connectionstyle=f"arc3,rad={bend}",
                    color="0.3",
                    lw=1.6,
                    zorder=1,
                    shrinkA=0,
                    shrinkB=0,
                )
            )
            # arc3 bows the line by bend/2 of its length, away from ``normal``.
            along = pos[b] - pos[a]
            normal = np.array([-along[1], along[0]]) / (np.linalg.norm(along) + 1e-12)
            apex = (pos[a] + pos[b]) / 2 - 0.5 * bend * np.linalg.norm(along) * normal
            if bend:
                side = -normal if bend > 0 else normal
            else:  # a straight bond: labelled on the side away from the centre
                side = normal if np.dot(normal, apex - centre) >= 0 else -normal
            _label(ax, apex + 0.07 * side, side, label, fontsize=8, color="0.25")
        else:
            node = np.mean([pos[c] for c in holders], axis=0)
            if np.linalg.norm(node - centre) < 1e-9 and any(
                np.linalg.norm(pos[c]) < 1e-9 for c in holders
            ):
                node = node + np.array([0.0, -0.45])
            for c in holders:
                ax.plot(*zip(pos[c], node, strict=True), color="0.3", lw=1.6, zorder=1)
            ax.add_patch(Circle(_xy(node), 0.05, color="black", zorder=3))
            free = _free_direction(node, [pos[c] for c in holders])
            _label(ax, node + free, free, label, fontsize=8, color="0.25")

    open_holders = {
        leg: [c for c, legs in enumerate(network.core_legs) if leg in legs]
        for leg in (*network.expert_legs, *network.input_legs, *network.output_legs)
    }
    shared = [leg for leg, cores in open_holders.items() if len(cores) > 1]
    for k, leg in enumerate(shared):
        points = [pos[c] for c in open_holders[leg]]
        _open_hyperedge(ax, leg, points, centre, k, len(shared), sizes[leg])

    for c, legs in enumerate(network.core_legs):
        ax.add_patch(
            Circle(_xy(pos[c]), RADIUS, facecolor="white", edgecolor="black", lw=1.6, zorder=2)
        )
        ax.text(pos[c][0], pos[c][1], f"#{c}", ha="center", va="center", fontsize=9, zorder=4)
        opened = [leg for leg in legs if leg not in network.bonds and leg not in shared]
        outward = pos[c] - centre
        base = (
            math.atan2(outward[1], outward[0]) if np.linalg.norm(outward) > 1e-9 else -math.pi / 2
        )
        spread = 0.7 if network.n_cores > 1 else 2 * math.pi / len(opened)
        for m, leg in enumerate(opened):
            angle = base + (m - (len(opened) - 1) / 2) * spread
            direction = np.array([math.cos(angle), math.sin(angle)])
            start, end = pos[c] + RADIUS * direction, pos[c] + 0.7 * direction
            color = OPEN.get(leg[0], "tab:orange")
            ax.plot(*zip(start, end, strict=True), color=color, lw=2.2, zorder=1)
            label = f"{leg}={sizes[leg]}"
            _label(ax, end + 0.06 * direction, direction, label, fontsize=8.5, color=color)

    ax.set_xlim(-2.2, 2.2)
    ax.set_ylim(-2.2, 2.2)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title if title is not None else f"{network.format}: {network.spec}", fontsize=9)
    return figure


def plot_usage(
    history: np.ndarray,
    ax: Axes | None = None,
    title: str | None = None,
    every: int = 1,
    vmax: float | None = None,
) -> Figure:
    """A heatmap of the experts' mass over training (:meth:`mumoe.nn.ExpertMonitor.history`).

    Parameters
    ----------
    history : array, shape (passes, N)
        The mean coefficient of each expert per recorded forward pass.
    ax : matplotlib.axes.Axes, optional
        Where to draw; by default on a new :class:`matplotlib.figure.Figure`.
    title : str, optional
    every : int, default 1
        Forward passes between recorded rows, to label the axis in passes.
    vmax : float, optional
        The top of the colour scale (larger masses saturate); give panels
        that are compared the same one.  The largest mass by default.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> fig = plot_usage(np.full((20, 8), 1 / 8), title="uniform")
    >>> fig.axes[0].get_xlabel()
    'expert'
    """
    history = np.asarray(history, dtype=float)
    if history.ndim != 2:
        raise ValueError(f"history must be (passes, experts), got shape {history.shape}")
    if ax is None:
        ax = Figure(figsize=(6, 3.2), layout="constrained").subplots()
    figure = ax.get_figure()
    assert isinstance(figure, Figure)
    extent = (-0.5, history.shape[1] - 0.5, history.shape[0] * every, 0)
    image = ax.imshow(
        history,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        vmin=0,
        vmax=vmax,
        extent=extent,
    )
    ax.set(xlabel="expert", ylabel="forward pass", title=title or "mean coefficient per expert")
    figure.colorbar(image, ax=ax, label="mass")
    return figure


#: The axis labels of :func:`plot_frontier`'s metrics.
FRONTIER_METRICS = {
    "delta_ce": "ΔCE spliced in (nats/token)",
    "nmse": "normalised MSE (held out)",
    "fvu": "fraction of variance unexplained",
}


def plot_frontier(
    records: Sequence[Mapping[str, Any]],
    ax: Axes | None = None,
    metric: str = "delta_ce",
    title: str | None = None,
) -> Figure:
    """The sparsity–faithfulness frontier: ``metric`` against L0, one curve per kind.

    Records (:func:`mumoe.nn.frontier`) of one kind and ``k`` are averaged
    over their seeds: a point at the mean L0 and the mean ``metric``, with
    error bars of one standard deviation both ways.

    Parameters
    ----------
    records : sequence of mappings
        Each with ``kind``, ``k``, ``l0`` and ``metric``.
    ax : matplotlib.axes.Axes, optional
    metric : {"delta_ce", "nmse", "fvu"}, default "delta_ce"
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        For no records, or an unknown metric.

    Examples
    --------
    >>> records = [{"kind": kind, "k": k, "seed": s, "l0": k, "delta_ce": 1 / k + s / 10}
    ...            for kind in ("mxd", "transcoder") for k in (2, 8) for s in (0, 1)]
    >>> fig = plot_frontier(records)
    >>> fig.axes[0].get_xlabel(), len(fig.axes[0].get_legend().get_texts())
    ('L0 (experts or latents a token uses)', 2)
    """
    if metric not in FRONTIER_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(FRONTIER_METRICS)}")
    if not records:
        raise ValueError("no records to plot")
    if ax is None:
        ax = Figure(figsize=(5, 3.4), layout="constrained").subplots()
    figure = ax.get_figure()
    assert isinstance(figure, Figure)
    kinds = sorted({r["kind"] for r in records})
    for kind in kinds:
        ks = sorted({r["k"] for r in records if r["kind"] == kind})
        points = []
        for k in ks:
            group = [r for r in records if r["kind"] == kind and r["k"] == k]
            l0 = np.array([r["l0"] for r in group], dtype=float)
            value = np.array([r[metric] for r in group], dtype=float)
            points.append((l0.mean(), value.mean(), l0.std(), value.std()))
        x, y, x_err, y_err = (np.array(column) for column in zip(*points, strict=True))
        ax.errorbar(x, y, xerr=x_err, yerr=y_err, marker="o", capsize=3, label=kind)
    ax.set(
        xlabel="L0 (experts or latents a token uses)",
        ylabel=FRONTIER_METRICS[metric],
        title=title or "sparsity–faithfulness frontier",
    )
    ax.legend()
    return figure
