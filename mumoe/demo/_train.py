"""One head, one seed: the unit of work of ``mumoe demo``.

:func:`train_head` seeds everything it uses and trains with one torch
thread, so what it returns depends on its :class:`Job` alone: not on the
process it runs in, on the other jobs, or on the machine's core count.  The
models are tiny (a 64-feature input, batches of 64), so torch's intra-op
threads would only add synchronisation to every step; ``mumoe demo`` runs
jobs side by side in processes instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mumoe import analysis
from mumoe.demo._results import EditResult
from mumoe.spec import gate_params, linear_params, match_rank

__all__ = [
    "MIN_COUNT",
    "THRESHOLD",
    "TIED_SHARE",
    "Job",
    "Run",
    "choose_edit",
    "digits",
    "train_head",
]

#: An expert is counted when it processes (coefficient >= THRESHOLD) at least MIN_COUNT digits.
MIN_COUNT = 5
THRESHOLD = 0.5
#: An expert is tied to a digit when it gets at least this share of its gate mass from it.
TIED_SHARE = 0.8
IN_FEATURES, CLASSES = 64, 10
BATCH, LEARNING_RATE = 64, 5e-3


@dataclass(frozen=True)
class Job:
    """What to train: one head (``n_experts=0``: the linear baseline) for one seed."""

    seed: int
    n_experts: int
    network: str
    budget: int
    epochs: int
    edit: bool = False
    edit_class: int | None = None
    keep_coefficients: bool = False


@dataclass
class Run:
    """What one job measured (see :class:`mumoe.demo.HeadResult` for the fields)."""

    job: Job
    rank: object
    expert_params: int
    gate_params: int
    accuracy: float
    class_accuracy: np.ndarray
    polysemanticity: float = float("nan")
    experts_counted: int = 0
    histogram: np.ndarray | None = None
    coefficients: np.ndarray | None = None
    edit: EditResult | None = None


def digits(seed: int, test_size: float = 0.25) -> tuple[np.ndarray, ...]:
    """Standardised train/test splits of scikit-learn's digits, and every sample's image.

    Returns ``x_train, x_test, y_train, y_test, images``; ``images`` follows the
    order train then test.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.data.astype(np.float32), data.target
    x_train, x_test, y_train, y_test, rows_train, rows_test = train_test_split(
        x, y, np.arange(len(y)), test_size=test_size, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # some border pixels are constant
    return (
        (x_train - mean) / std,
        (x_test - mean) / std,
        y_train,
        y_test,
        data.images[np.concatenate([rows_train, rows_test])],
    )


def train_head(job: Job) -> Run:
    """Train, test and measure one head; edit it when ``job.edit``.

    The global torch RNG and thread count are left as they were.
    """
    import torch

    from mumoe.nn import MuMoE, collect_gates, edit_experts

    with _one_thread(), torch.random.fork_rng(devices=[]):
        x_train, x_test, y_train, y_test, _ = digits(job.seed)
        xt_train, xt_test = torch.from_numpy(x_train), torch.from_numpy(x_test)
        torch.manual_seed(job.seed)
        model: Any
        if job.n_experts == 0:
            rank, expert_params, gates = None, linear_params(IN_FEATURES, CLASSES), 0
            model = torch.nn.Linear(IN_FEATURES, CLASSES)
        else:
            rank = match_rank(
                job.network,
                IN_FEATURES,
                CLASSES,
                expert_dims=job.n_experts,
                budget=job.budget,
                gates=False,
            )
            model = MuMoE(IN_FEATURES, CLASSES, job.network, expert_dims=job.n_experts, rank=rank)
            expert_params = model.network.n_params
            gates = gate_params(IN_FEATURES, job.n_experts)
        _train(model, xt_train, torch.from_numpy(y_train), job)
        predictions = _predict(model, xt_test)
        run = Run(
            job,
            rank,
            expert_params,
            gates,
            float(np.mean(predictions == y_test)),
            _class_accuracy(predictions, y_test),
        )
        if job.n_experts == 0:
            return run
        # The statistics of the experts use every digit (train, then test): they
        # describe what the gate routes, not how well the head generalises.
        y_all = np.concatenate([y_train, y_test])
        coefficients = collect_gates(model, torch.cat([xt_train, xt_test]))[0]
        run.histogram = analysis.class_histogram(
            coefficients, y_all, n_classes=CLASSES, threshold=THRESHOLD
        )
        run.polysemanticity = analysis.mean_polysemanticity(run.histogram, min_count=MIN_COUNT)
        run.experts_counted = int(np.sum(run.histogram.sum(1) >= MIN_COUNT))
        if job.keep_coefficients:
            run.coefficients = coefficients
        if job.edit:
            mass = analysis.class_mass(coefficients, y_all, n_classes=CLASSES)
            chosen = choose_edit(mass, job.edit_class)
            if chosen is not None:
                digit, experts, share = chosen
                with edit_experts(model, dict.fromkeys(experts, 0.0)):
                    after = _class_accuracy(_predict(model, xt_test), y_test)
                run.edit = EditResult(job.seed, digit, experts, share, run.class_accuracy, after)
        return run


def choose_edit(mass: np.ndarray, digit: int | None = None) -> tuple[int, list[int], float] | None:
    """The digit to edit, its tied experts, and the share of its gate mass they carry.

    Parameters
    ----------
    mass : numpy.ndarray, shape (N, 10)
        Gate mass of every expert from every digit (:func:`mumoe.analysis.class_mass`).
    digit : int, optional
        The digit to edit.  By default the digit whose tied experts carry
        the largest share of its mass (the lowest such digit on a tie); None
        when no expert is tied to any digit.

    Examples
    --------
    >>> import numpy as np
    >>> mass = np.zeros((3, 10)); mass[0, 2] = 9; mass[0, 5] = 1; mass[1, 5] = 3; mass[2, 5] = 3
    >>> choose_edit(mass)  # expert 0 carries all of digit 2's mass; 1 and 2, 6/7 of digit 5's
    (2, [0], 1.0)
    >>> choose_edit(mass, 5)
    (5, [1, 2], 0.8571428571428571)
    >>> choose_edit(np.full((3, 10), 1.0)) is None
    True
    """
    totals = mass.sum(1)
    tied: dict[int, list[int]] = {}
    for expert in np.flatnonzero(totals >= 1.0):  # at least one sample's worth
        main = int(np.argmax(mass[expert]))
        if mass[expert, main] >= TIED_SHARE * totals[expert]:
            tied.setdefault(main, []).append(int(expert))
    digit_mass = mass.sum(0)
    shares = {d: float(mass[e, d].sum() / digit_mass[d]) for d, e in tied.items()}
    if digit is None:
        if not shares:
            return None
        digit = max(sorted(shares), key=shares.__getitem__)
    return digit, tied.get(digit, []), shares.get(digit, 0.0)


def _train(model: Any, x: Any, y: Any, job: Job) -> None:
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(job.seed)
    model.train()
    for _ in range(job.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            rows = order[start : start + BATCH]
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def _predict(model: Any, x: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.asarray(model(x).argmax(-1).numpy())


def _class_accuracy(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([np.mean(predictions[labels == c] == c) for c in range(CLASSES)])


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
