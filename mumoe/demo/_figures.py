"""The PNG figures of ``mumoe demo``: every seed shown, with mean ± standard deviation.

matplotlib's object API only: no pyplot, no global backend or figure state.
The axes do not zoom to the data: polysemanticity runs from 0 to 1, and the
accuracy and edit axes say where they start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mumoe.demo._results import DemoResult, mean_sd
from mumoe.demo._train import MIN_COUNT, THRESHOLD

__all__ = ["plot_edit", "plot_experts", "plot_trend"]

PROCESSES = f"an expert processes a digit when its gate coefficient is >= {THRESHOLD}"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _seeds_and_mean(ax: Any, x: np.ndarray, per_seed: np.ndarray, label: str) -> None:
    """Each seed as a faint dot (spread sideways), the mean ± sd as a line with bars."""
    seeds = per_seed.shape[1]
    offsets = np.linspace(-0.06, 0.06, seeds) if seeds > 1 else np.zeros(1)
    for k in range(seeds):
        ax.plot(
            x * (1 + offsets[k]),
            per_seed[:, k],
            "o",
            color="C0",
            alpha=0.35,
            ms=4,
            label="one seed" if k == 0 else None,
        )
    stats = np.array([mean_sd(row) for row in per_seed])
    ax.errorbar(x, stats[:, 0], yerr=stats[:, 1], fmt="o-", color="C0", capsize=3, label=label)


def plot_trend(result: DemoResult, path: Path) -> Path:
    """Polysemanticity and test accuracy against the number of experts."""
    moe = [h for h in result.heads if h.n_experts]
    linear = result.heads[0]
    counts = np.array([h.n_experts for h in moe], dtype=float)
    seeds = len(result.seeds)
    spread = f"mean ± sd over {seeds} seeds" if seeds > 1 else "one seed"
    fig = _figure(10, 3.9)
    left, right = fig.subplots(1, 2)
    _seeds_and_mean(left, counts, np.array([h.polysemanticity for h in moe]), spread)
    left.set(
        xscale="log",
        xlabel="experts N",
        ylabel="mean polysemanticity",
        ylim=(0, 1),
        title="Polysemanticity (0: one digit per expert)",
    )
    fig.suptitle(
        f"Over the experts that process >= {MIN_COUNT} of the 1,797 digits; {PROCESSES}", fontsize=9
    )
    accuracy = np.array([h.accuracy for h in moe])
    _seeds_and_mean(right, counts, accuracy, f"μMoE heads, {spread}")
    mean, sd = mean_sd(linear.accuracy)
    right.axhspan(mean - sd, mean + sd, color="gray", alpha=0.2, lw=0)
    right.axhline(mean, color="gray", ls="--", label=f"linear head, {spread}")
    low = min(0.9, np.floor((min(accuracy.min(), linear.accuracy.min()) - 0.01) * 20) / 20)
    right.set(
        xscale="log",
        xlabel="experts N",
        ylabel="test accuracy",
        ylim=(low, 1.0),
        title=f"Test accuracy (450 digits; the axis starts at {low:.2f})",
    )
    right.legend(fontsize=8, loc="lower left")
    for ax in (left, right):
        ax.set_xticks(counts, [str(int(c)) for c in counts])
        ax.minorticks_off()
    fig.savefig(path, dpi=110)
    return path


def plot_experts(
    coefficients: np.ndarray,
    n: int,
    images: np.ndarray,
    labels: np.ndarray,
    path: Path,
    seed: int,
) -> Path:
    """Digits drawn at random from those each of the busiest experts processes.

    One image of ``rows x 10`` cells (drawing 60 separate axes took seconds).
    """
    rows, columns = min(6, n), 10
    height, width = 12, 10  # an 8x8 digit, a 3-pixel strip for its label, a 1-pixel margin
    processed = coefficients >= THRESHOLD
    load = processed.sum(0)
    chosen = np.argsort(-load, kind="stable")[:rows]  # the busiest experts
    rng = np.random.default_rng(seed)
    canvas = np.full((rows * height, columns * width), np.nan)
    fig = _figure(columns * 0.75 + 1.2, rows * 0.85 + 0.7)
    ax = fig.subplots()
    for r, expert in enumerate(chosen):
        samples = np.flatnonzero(processed[:, expert])
        shown = rng.choice(samples, size=min(columns, samples.size), replace=False)
        for c, sample in enumerate(shown):
            top, left = r * height + 3, c * width + 1
            canvas[top : top + 8, left : left + 8] = images[sample]
            ax.text(
                left + 3.5, top - 1.2, str(labels[sample]), ha="center", va="center", fontsize=7
            )
    from matplotlib import colormaps

    cmap = colormaps["gray_r"].with_extremes(bad="white")
    ax.imshow(canvas, cmap=cmap, interpolation="nearest", vmin=0, vmax=16)
    ax.set_xticks([])
    ax.set_yticks(
        np.arange(rows) * height + 7,
        [f"expert {e}\n({load[e]} digits)" for e in chosen],
        fontsize=7,
    )
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(
        f"N={n}, seed {seed}: digits drawn at random from those each of its "
        f"busiest experts processes\n({PROCESSES})",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return path


def plot_edit(result: DemoResult, path: Path) -> Path:
    """The change of accuracy on the edited digit and on the others, per seed."""
    edits = [e for e in result.edits if e is not None]
    fig = _figure(6.5, 3.6)
    ax = fig.subplots()
    one_image = 1 / 45  # about 45 test images per digit
    ax.axhspan(
        -one_image, one_image, color="gray", alpha=0.15, lw=0, label="± one test image of a digit"
    )
    ax.axhline(0, color="gray", lw=0.8)
    offsets = np.linspace(-0.12, 0.12, len(edits)) if len(edits) > 1 else np.zeros(1)
    groups = {0: [e.change_on_digit for e in edits], 1: [e.change_on_others for e in edits]}
    for x, changes in groups.items():
        for offset, edit, change in zip(offsets, edits, changes, strict=True):
            ax.plot(x + offset, change, "o", color=f"C{3 * (1 - x)}", alpha=0.6, ms=5)
            if x == 0:
                ax.annotate(
                    f"seed {edit.seed}: digit {edit.digit}",
                    (x + offset, change),
                    xytext=(6, 0),
                    textcoords="offset points",
                    fontsize=7,
                    va="center",
                )
        mean, sd = mean_sd(changes)
        ax.errorbar(
            x - 0.3,
            mean,
            yerr=sd,
            fmt="s",
            color="k",
            capsize=3,
            label="mean ± sd" if x == 0 else None,
        )
    values = [v for changes in groups.values() for v in changes]
    ax.set(
        xticks=[0, 1],
        xlim=(-0.6, 1.5),
        ylim=(min(-0.1, min(values) - 0.02), max(0.05, max(values) + 0.02)),
        ylabel="test accuracy, after - before",
    )
    ax.set_xticklabels(["the edited digit", "the other nine digits (mean)"])
    seeds = f"{len(edits)} seed{'s' if len(edits) > 1 else ''}"
    ax.set_title(
        f"Switching off the experts tied to one digit in the N={result.edit_experts} head, {seeds}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)
    return path
