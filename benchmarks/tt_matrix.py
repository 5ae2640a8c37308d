"""TT-matrix experts at equal parameters: issue #30's digits check.

``python -m benchmarks.tt_matrix [--seeds 10] [--experts 8] [--budget 2000]``: a
TT-matrix μMoE head (64 -> 10, the input split (8, 8), the output (5, 2)) on
scikit-learn's digits, with one expert and with N, each at the largest TT-matrix
rank whose layer (gate included) fits the same parameter budget
(:func:`mumoe.spec.match_rank` with ``gates=True``).  Each seed is its own split
of the data and its own initialisation, trained as ``mumoe demo`` trains its
heads (:mod:`mumoe.demo`, Adam, one torch thread); the test accuracy is
reported per seed, with its mean and standard deviation over seeds, and the
difference the experts make seed by seed (the same split for both).  The
figures of ``docs/torch.rst`` and ``benchmarks/README.md`` come from the
default run and ``--budget 3000 --experts 16``, ``--budget 1500 --experts 4``.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from mumoe.demo._train import Job, _one_thread, _predict, _train, digits
from mumoe.nn import TTMatrixMuMoE
from mumoe.spec import match_rank

IN_SHAPE, OUT_SHAPE = (8, 8), (5, 2)
EPOCHS = 30


@dataclass
class Result:
    """One trained head: its experts, rank, parameters and test accuracy."""

    experts: int
    rank: object
    params: int
    accuracy: float


def train(seed: int, experts: int, budget: int, epochs: int = EPOCHS) -> Result:
    """Train one TT-matrix head of ``experts`` experts within ``budget`` parameters."""
    rank = match_rank(
        "ttm",
        64,
        10,
        expert_dims=experts,
        budget=budget,
        in_shape=IN_SHAPE,
        out_shape=OUT_SHAPE,
    )
    with _one_thread(), torch.random.fork_rng(devices=[]):
        x_train, x_test, y_train, y_test, _ = digits(seed)
        torch.manual_seed(seed)
        model = TTMatrixMuMoE(
            64, 10, expert_dims=experts, rank=rank, in_shape=IN_SHAPE, out_shape=OUT_SHAPE
        )
        job = Job(seed=seed, n_experts=experts, network="ttm", budget=budget, epochs=epochs)
        _train(model, torch.from_numpy(x_train), torch.from_numpy(y_train), job)
        predictions = _predict(model, torch.from_numpy(x_test))
    params = sum(p.numel() for p in model.parameters())
    return Result(experts, rank, params, float(np.mean(predictions == y_test)))


def compare(
    seeds: list[int], experts: int, budget: int, epochs: int = EPOCHS
) -> dict[int, list[Result]]:
    """One expert against ``experts``, every seed, at the same budget."""
    return {n: [train(seed, n, budget, epochs) for seed in seeds] for n in (1, experts)}


def main() -> None:
    """Train both heads for every seed and print the table of ``benchmarks/README.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    results = compare(list(range(args.seeds)), args.experts, args.budget, args.epochs)
    print(f"TT-matrix head 64 -> 10, in {IN_SHAPE}, out {OUT_SHAPE}, budget {args.budget:,}")
    for n, runs in results.items():
        accuracies = [r.accuracy for r in runs]
        seeds = ", ".join(f"{a:.4f}" for a in accuracies)
        print(
            f"  N={n:<3} rank {runs[0].rank}  params {runs[0].params:,}  accuracy "
            f"{_mean_sd(accuracies, sign=False)}  (seeds: {seeds})"
        )
    # Seed by seed, the same split of the data: the difference the experts make.
    single, mixture = results[1], results[args.experts]
    differences = [m.accuracy - s.accuracy for s, m in zip(single, mixture, strict=True)]
    wins = sum(d > 0 for d in differences)
    ties = sum(d == 0 for d in differences)
    print(
        f"  N={args.experts} - N=1, per seed: {_mean_sd(differences)}; better on {wins}, "
        f"equal on {ties}, worse on {len(differences) - wins - ties} of {len(differences)} seeds"
    )


def _mean_sd(values: list[float], sign: bool = True) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if sign else ''}.4f} +- {spread:.4f}"


if __name__ == "__main__":
    main()
