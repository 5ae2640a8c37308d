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

``python -m benchmarks.tt_matrix --timing [--rounds 21]``: instead, the time of
a TT-matrix layer 768 -> 3072 (legs (32, 24) -> (64, 48), bond 16, batch 256)
in mumoe with one expert (gates given) and with 256 (its gate included),
against tensorly-torch's BlockTT ``FactorizedLinear`` of the same factors;
forward under ``no_grad`` and forward+backward, rounds interleaved, the ratio
of medians from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
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


def _timed(call: Callable[[], object], rounds: int) -> list[float]:
    call()  # warm-up: plans built, kernels loaded
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def timing(rounds: int = 21, batch: int = 256) -> dict[str, dict[str, float]]:
    """Median seconds of each implementation, forward and forward+backward."""
    from mumoe.backends import preserved_backend, thread_backend

    with preserved_backend():
        import tltorch  # sets TensorLy's backend at import

    torch.manual_seed(0)
    in_shape, out_shape = (32, 24), (64, 48)
    with preserved_backend():
        blocktt = tltorch.FactorizedLinear(
            in_shape, out_shape, bias=False, factorization="blocktt", rank=(1, 16, 1)
        )
    one = TTMatrixMuMoE(
        768, 3072, expert_dims=1, rank=(1, 16), bias=False, in_shape=in_shape,
        out_shape=out_shape, gated=False,
    )  # fmt: skip
    with torch.no_grad():
        one.cores[0].fill_(1.0)
        for core, factor in zip(one.cores[1:], blocktt.weight.factors, strict=True):
            core.copy_(factor.detach().transpose(1, 2).reshape(core.shape))
    many = TTMatrixMuMoE(
        768, 3072, expert_dims=256, rank=(4, 16), in_shape=in_shape, out_shape=out_shape
    )
    x = torch.randn(batch, 768)
    ones = [torch.ones(batch, 1)]

    def run_blocktt() -> torch.Tensor:
        with thread_backend("pytorch"):
            return blocktt(x)

    calls = {
        "tltorch BlockTT": run_blocktt,
        "mumoe, 1 expert": lambda: one(x, ones),
        "mumoe, 256 experts + gate": lambda: many(x),
    }
    assert torch.allclose(calls["mumoe, 1 expert"](), run_blocktt(), atol=1e-5)
    results: dict[str, dict[str, list[float]]] = {
        name: {"forward": [], "train": []} for name in calls
    }
    for _ in range(rounds):  # interleaved: each round runs every implementation once
        for name, call in calls.items():
            with torch.no_grad():
                results[name]["forward"] += _timed(call, 1)

            def step(call: Callable[[], torch.Tensor] = call) -> None:
                call().sum().backward()

            results[name]["train"] += _timed(step, 1)
    return {
        name: {mode: statistics.median(values) for mode, values in modes.items()}
        for name, modes in results.items()
    }


def main() -> None:
    """Train both heads for every seed and print the table of ``benchmarks/README.md``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--budget", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--timing", action="store_true", help="time against tltorch instead")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    if args.timing:
        medians = timing(args.rounds)
        base = medians["tltorch BlockTT"]
        print(f"TT-matrix 768 -> 3072, bond 16, batch 256, {torch.get_num_threads()} threads")
        for name, times in medians.items():
            print(
                f"  {name:<26} forward {times['forward'] * 1e3:7.2f} ms "
                f"({times['forward'] / base['forward']:.2f}x)  forward+backward "
                f"{times['train'] * 1e3:7.2f} ms ({times['train'] / base['train']:.2f}x)"
            )
        return
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
