"""``mumoe demo``: more experts, more specialised experts, on scikit-learn's digits.

The demo trains, on CPU and in seconds, a linear classifier and μMoE heads
with growing numbers of experts on the 8×8 digits that ship with
scikit-learn (nothing is downloaded), then measures what the paper measures:

1. test accuracy, with every head's experts matched to one parameter budget;
2. the mean class-level polysemanticity of the experts
   (:func:`mumoe.analysis.polysemanticity`), which falls as experts are added;
3. the digits each expert weights most (a PNG grid per head);
4. an edit: switching off the experts tied to one digit lowers the accuracy
   on that digit and leaves the others as they were.

Run ``mumoe demo --help`` for the options; :func:`run` is the same from Python.
It needs the ``torch`` and ``demo`` extras (``pip install "mumoe[torch,demo]"``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from mumoe import analysis
from mumoe.budget import gate_params, linear_params, match_rank
from mumoe.validation import positive_int

__all__ = ["DemoResult", "HeadResult", "run"]

#: What an expert must receive, at coefficient >= THRESHOLD, to be counted.
MIN_COUNT = 5
THRESHOLD = 0.5
#: An expert is tied to a digit when it gets at least this share of its gate mass from it.
TIED_SHARE = 0.8


@dataclass
class HeadResult:
    """What one trained head scored.

    Parameters
    ----------
    name : str
        ``"linear"`` or ``"cp N=128"``.
    n_experts : int
        0 for the linear baseline.
    rank : object
        The factorisation's rank (None for the linear baseline).
    expert_params, gate_params : int
        Parameters of the experts (the cores; the weight and bias of the
        linear layer) and of the gate projections.
    accuracy : float
        On the held-out test split.
    class_accuracy : numpy.ndarray, shape (10,)
    polysemanticity : float
        Mean class-level polysemanticity over the experts that process at
        least ``MIN_COUNT`` samples (NaN for the linear baseline).
    experts_counted : int
        How many experts that is.
    histogram : numpy.ndarray, shape (N, 10)
        Class histogram of every expert, over all samples.

    Examples
    --------
    >>> import numpy as np
    >>> head = HeadResult("cp N=4", 4, 19, 5135, 256, 0.95, np.full(10, 0.95))
    >>> head.expert_params + head.gate_params, head.polysemanticity
    (5391, nan)
    """

    name: str
    n_experts: int
    rank: Any
    expert_params: int
    gate_params: int
    accuracy: float
    class_accuracy: np.ndarray
    polysemanticity: float = math.nan
    experts_counted: int = 0
    histogram: np.ndarray | None = field(default=None, repr=False)


@dataclass
class DemoResult:
    """Every head's result, the edit, and the files written.

    Parameters
    ----------
    heads : list of HeadResult
        The linear baseline first, then the μMoE heads.
    edit_class : int or None
        The digit whose experts were switched off (None: no edit).
    edited_experts : list of int
        Those experts, in the head with the most experts.
    accuracy_before, accuracy_after : numpy.ndarray, shape (10,), or None
        That head's per-digit test accuracy without and with the edit.
    figures : list of pathlib.Path
        The PNG files written.

    Examples
    --------
    >>> import numpy as np
    >>> linear = HeadResult("linear", 0, None, 650, 0, 0.9, np.full(10, 0.9))
    >>> DemoResult([linear], None, [], None, None, []).heads[0].name
    'linear'
    """

    heads: list[HeadResult]
    edit_class: int | None
    edited_experts: list[int]
    accuracy_before: np.ndarray | None
    accuracy_after: np.ndarray | None
    figures: list[Path]


def _digits(seed: int, test_size: float) -> tuple[np.ndarray, ...]:
    """Standardised train/test splits of the digits, and each sample's row in the data set."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target
    x_train, x_test, y_train, y_test, rows_train, rows_test = train_test_split(
        x, y, np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # some border pixels are constant
    return (
        (x_train - mean) / std, (x_test - mean) / std, y_train, y_test,
        digits.images[np.concatenate([rows_train, rows_test])],
    )  # fmt: skip


def _train(model: Any, x: Any, y: Any, *, epochs: int, seed: int, progress: Any) -> None:
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            rows = order[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        progress.update(1)
    model.eval()


def _class_accuracy(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([np.mean(predictions[labels == c] == c) for c in range(10)])


def _predict(model: Any, x: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(x).argmax(-1).numpy()


def _tied_experts(mass: np.ndarray) -> dict[int, list[int]]:
    """Per digit, the experts that receive most of their gate mass from it."""
    totals = mass.sum(1)
    tied: dict[int, list[int]] = {}
    for expert in np.flatnonzero(totals >= 1.0):  # at least one sample's worth
        digit = int(np.argmax(mass[expert]))
        if mass[expert, digit] >= TIED_SHARE * totals[expert]:
            tied.setdefault(digit, []).append(int(expert))
    return tied


def run(
    *,
    experts: Sequence[int] = (8, 32, 128, 512),
    network: str = "cp",
    budget: int = 8,
    epochs: int = 40,
    seed: int = 0,
    edit_class: int | None = None,
    output: str | Path | None = "mumoe-demo",
    progress: bool = True,
    stream: IO[str] | None = None,
    threads: int = 1,
) -> DemoResult:
    """Train the heads, measure their experts, edit one, and draw the figures.

    Parameters
    ----------
    experts : sequence of int, default (8, 32, 128, 512)
        Expert counts of the μMoE heads.
    network : {"cp", "tucker", "tt", "tr"}, default "cp"
        Their factorisation.
    budget : int, default 8
        Every head's experts get as many parameters as ``budget`` linear
        classifiers (``budget * 650``); the rank is chosen by
        :func:`mumoe.budget.match_rank`.  The gate (``64 * N``) comes on top.
    epochs : int, default 40
    seed : int, default 0
        Seeds the split, the initialisation and the batches; the global
        torch RNG is left as it was.
    edit_class : int, optional
        The digit whose experts are switched off in the head with the most
        experts; by default the digit with the most experts tied to it.
    output : path or None, default "mumoe-demo"
        Folder for the PNG figures (created); None draws no figures (the
        report and the result are the same).
    progress : bool, default True
        Show tqdm progress bars (on stderr).
    stream : text stream, optional
        Where the report is printed; standard output by default.
    threads : int, default 1
        Torch's intra-op threads while the demo runs (restored after).  The
        models are tiny: more threads only add synchronisation (a batch-norm
        step of the gate took 48 ms with 2 threads on a busy 2-core machine,
        46 µs with 1), and one thread makes the results the same on every
        machine whatever its core count.

    Returns
    -------
    DemoResult

    Examples
    --------
    >>> import io, tempfile
    >>> report = io.StringIO()
    >>> result = run(experts=(4,), epochs=1, progress=False, output=None,  # no figures
    ...              stream=report, edit_class=0)
    >>> print(report.getvalue().splitlines()[4])  # the table's header
    head    rank  experts+gate params  test accuracy  polysemanticity  counted
    >>> [(head.name, head.n_experts, head.expert_params) for head in result.heads]
    [('linear', 0, 650), ('cp N=4', 4, 5135)]
    >>> result.figures
    []
    """
    import torch
    from tqdm.auto import tqdm

    from mumoe.nn import MuMoE

    started = time.perf_counter()
    out = stream if stream is not None else sys.stdout
    threads = positive_int(threads, "threads")
    experts = [int(n) for n in experts]
    if not experts or any(n < 1 for n in experts):
        raise ValueError(f"experts must be positive expert counts, got {experts}")
    if edit_class is not None and not 0 <= edit_class <= 9:
        raise ValueError(f"edit_class must be a digit 0-9, got {edit_class}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    folder = None if output is None else Path(output)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    with _torch_threads(threads):  # the whole computation, edit included
        # The statistics of the experts use every sample (train, then test): they
        # describe what the gate routes, not how well the head generalises.
        x_train, x_test, y_train, y_test, images = _digits(seed, test_size=0.25)
        x_all = np.concatenate([x_train, x_test])
        y_all = np.concatenate([y_train, y_test])
        xt_train, xt_test, xt_all = map(torch.from_numpy, (x_train, x_test, x_all))
        yt_train = torch.from_numpy(y_train)

        linear = linear_params(64, 10)
        heads: list[HeadResult] = []
        models: dict[int, Any] = {}
        bar = tqdm(total=epochs * (1 + len(experts)), disable=not progress, desc="training",
                   unit="epoch", leave=False, file=sys.stderr)  # fmt: skip
        with torch.random.fork_rng(devices=[]), bar:
            torch.manual_seed(seed)
            model: Any = torch.nn.Linear(64, 10)
            bar.set_postfix_str("linear")
            _train(model, xt_train, yt_train, epochs=epochs, seed=seed, progress=bar)
            predictions = _predict(model, xt_test)
            heads.append(
                HeadResult("linear", 0, None, linear, 0, float(np.mean(predictions == y_test)),
                           _class_accuracy(predictions, y_test))
            )  # fmt: skip
            for n in experts:
                rank = match_rank(network, n, 64, 10, budget=budget * linear, gates=False)
                torch.manual_seed(seed)
                model = MuMoE(64, 10, network, expert_dims=n, rank=rank)
                bar.set_postfix_str(f"{network} N={n}")
                _train(model, xt_train, yt_train, epochs=epochs, seed=seed, progress=bar)
                predictions = _predict(model, xt_test)
                coefficients = analysis.collect_gates(model, xt_all)[0]
                histogram = analysis.class_histogram(
                    coefficients, y_all, n_classes=10, threshold=THRESHOLD
                )
                heads.append(
                    HeadResult(
                        f"{network} N={n}", n, rank, model.network.n_params, gate_params(64, n),
                        float(np.mean(predictions == y_test)), _class_accuracy(predictions, y_test),
                        analysis.mean_polysemanticity(histogram, min_count=MIN_COUNT),
                        int(np.sum(histogram.sum(1) >= MIN_COUNT)), histogram,
                    )
                )  # fmt: skip
                models[n] = (model, coefficients)

        _report(heads, budget * linear, out)
        largest = max(models)
        model, coefficients = models[largest]
        head = next(h for h in heads if h.n_experts == largest)
        tied = _tied_experts(analysis.class_mass(coefficients, y_all, n_classes=10))
        digit = edit_class
        if digit is None and tied:
            digit = max(sorted(tied), key=lambda c: len(tied[c]))
        edited = tied.get(digit, []) if digit is not None else []
        before = after = None
        if digit is not None:
            before = head.class_accuracy
            with analysis.edit_experts(model, dict.fromkeys(edited, 0.0)):
                after = _class_accuracy(_predict(model, xt_test), y_test)
            _report_edit(largest, digit, edited, before, after, out)
        else:
            print(f"\nNo expert of the N={largest} head is tied to one digit: no edit.", file=out)

        figures: list[Path] = []
        if folder is not None:
            figures.append(_plot_trend(heads, folder / "polysemanticity.png"))
            for n in sorted({min(models), largest}):
                figures.append(
                    _plot_experts(
                        models[n][1], n, images, y_all, folder / f"experts_N{n}.png", seed
                    )
                )
            if before is not None and after is not None and digit is not None:
                figures.append(_plot_edit(before, after, digit, largest, folder / "edit.png"))
            print("\nFigures: " + ", ".join(str(f) for f in figures), file=out)
    elapsed = time.perf_counter() - started
    print(
        f"\nDone in {elapsed:.1f} s ({threads} torch thread{'s' if threads > 1 else ''}).", file=out
    )
    return DemoResult(heads, digit, edited, before, after, figures)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _report(heads: list[HeadResult], budget: int, out: IO[str]) -> None:
    print(
        f"μMoE heads on scikit-learn's digits (1,797 8x8 images, 10 classes; 25% held out).\n"
        f"Every head's experts have {budget:,} parameters; the gate (64 x N) comes on top.\n"
        f"Polysemanticity, over all 1,797 digits: mean over the experts that receive >= "
        f"{MIN_COUNT} of them at coefficient >= {THRESHOLD} (0 = one digit per expert).\n",
        file=out,
    )
    rows = [("head", "rank", "experts+gate params", "test accuracy", "polysemanticity", "counted")]
    for h in heads:
        params = f"{h.expert_params:,}" + (f" + {h.gate_params:,}" if h.gate_params else "")
        psi = "-" if h.n_experts == 0 else f"{h.polysemanticity:.3f}"
        counted = "-" if h.n_experts == 0 else f"{h.experts_counted}/{h.n_experts}"
        rank = "-" if h.rank is None else str(h.rank)
        rows.append((h.name, rank, params, f"{h.accuracy:.3f}", psi, counted))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for k, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _report_edit(
    n: int, digit: int, edited: list[int], before: np.ndarray, after: np.ndarray, out: IO[str]
) -> None:
    print(
        f"\nEdit: in the N={n} head, switch off the {len(edited)} experts that get >= "
        f"{TIED_SHARE:.0%} of their gate mass from digit {digit}:",
        file=out,
    )
    print("  digit     " + "".join(f"{c:>6}" for c in range(10)), file=out)
    print("  before    " + "".join(f"{a:6.2f}" for a in before), file=out)
    print("  after     " + "".join(f"{a:6.2f}" for a in after), file=out)
    others = np.delete(np.arange(10), digit)
    print(
        f"  digit {digit}: {before[digit]:.2f} -> {after[digit]:.2f}; the other digits' "
        f"mean accuracy: {before[others].mean():.3f} -> {after[others].mean():.3f}",
        file=out,
    )


def _figure(width: float, height: float) -> Any:
    # matplotlib's object API: no pyplot, no global backend or figure state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plot_trend(heads: list[HeadResult], path: Path) -> Path:
    moe = [h for h in heads if h.n_experts]
    linear = heads[0]
    fig = _figure(9, 3.4)
    left, right = fig.subplots(1, 2)
    counts = [h.n_experts for h in moe]
    left.plot(counts, [h.polysemanticity for h in moe], "o-")
    left.set(xscale="log", xlabel="experts N", ylabel="mean polysemanticity",
             title="Class-level polysemanticity (lower: more specialised)")  # fmt: skip
    right.plot(counts, [h.accuracy for h in moe], "o-", label="μMoE heads")
    right.axhline(linear.accuracy, color="gray", ls="--", label="linear")
    right.set(xscale="log", xlabel="experts N", ylabel="test accuracy", title="Accuracy")
    right.legend()
    for ax in (left, right):
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.minorticks_off()
    fig.savefig(path, dpi=110)
    return path


def _plot_experts(
    coefficients: np.ndarray, n: int, images: np.ndarray, labels: np.ndarray, path: Path, seed: int
) -> Path:
    rows, columns = min(6, n), 10
    processed = coefficients >= THRESHOLD
    load = processed.sum(0)
    chosen = np.argsort(-load, kind="stable")[:rows]  # the busiest experts
    rng = np.random.default_rng(seed)
    fig = _figure(columns * 0.8, rows * 0.95)
    axes = fig.subplots(rows, columns, squeeze=False)
    fig.suptitle(f"N={n}: digits drawn at random from those each of its busiest experts processes")
    for r, expert in enumerate(chosen):
        samples = np.flatnonzero(processed[:, expert])
        shown = rng.choice(samples, size=min(columns, samples.size), replace=False)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c < shown.size:
                ax.imshow(images[shown[c]], cmap="gray_r")
                ax.set_title(str(labels[shown[c]]), fontsize=8)
            else:
                ax.set_frame_on(False)
        axes[r, 0].set_ylabel(f"expert {expert}\n({load[expert]} samples)", fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def _plot_edit(before: np.ndarray, after: np.ndarray, digit: int, n: int, path: Path) -> Path:
    fig = _figure(6, 3)
    ax = fig.subplots()
    positions = np.arange(10)
    ax.bar(positions - 0.2, before, 0.4, label="before")
    ax.bar(positions + 0.2, after, 0.4, label=f"experts of digit {digit} off")
    ax.set(xticks=positions, xlabel="digit", ylabel="test accuracy", ylim=(0, 1.05),
           title=f"Editing the N={n} head")  # fmt: skip
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.savefig(path, dpi=110)
    return path
