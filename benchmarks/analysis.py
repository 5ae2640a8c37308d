"""What analysing a data set costs: issue #29's dataset-scale gate statistics.

``python -m benchmarks.analysis [--rounds R]``: an evaluation pass of a CP layer
(768 -> 768, 1,024 experts, rank 64, entmax-1.5 gate) over 8 batches of 1,024
rows, alone and under :func:`mumoe.nn.gate_statistics` with labels of 10
classes and of a GPT-2-size vocabulary (50,257 classes: rows grouped by class,
no one-hot).  Rounds are interleaved and the cost is the ratio of medians from
the same run.  Then the peak memory Python allocates (``tracemalloc``) over 10
and 40 batches: flat for ``gate_statistics``, growing for ``collect_gates``,
which keeps every row.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterator

import torch

from mumoe.nn import MuMoE, collect_gates, gate_statistics

SIZES = (768, 768)
OPTIONS = {"expert_dims": 1024, "rank": 64}
ROWS = 1024
BATCHES = 8
VOCABULARY = 50257


def _layer() -> MuMoE:
    torch.manual_seed(0)
    layer = MuMoE(*SIZES, "cp", **OPTIONS)  # type: ignore[arg-type]
    assert layer.gate is not None
    torch.nn.init.normal_(layer.gate.projections[0], std=SIZES[0] ** -0.5)
    return layer.eval()


def _data(batches: int, classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(ROWS, SIZES[0], generator=generator), torch.randint(0, classes, (ROWS,)))
        for _ in range(batches)
    ]


def _stream(batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(batches):
        yield torch.randn(256, SIZES[0], generator=generator), torch.randint(0, 10, (256,))


def _peak(run: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    run()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def main() -> int:
    """Measure and print the costs."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.analysis")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    layer = _layer()
    few, many = _data(BATCHES, 10), _data(BATCHES, VOCABULARY)

    def plain() -> None:
        with torch.no_grad():
            for x, _ in few:
                layer(x)

    runs: dict[str, Callable[[], object]] = {
        "evaluation pass": plain,
        "gate_statistics, 10 classes": lambda: gate_statistics(layer, few, labels=1),
        f"gate_statistics, {VOCABULARY:,} classes": lambda: gate_statistics(
            layer, many, labels=1, n_classes=VOCABULARY
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    base = medians["evaluation pass"]
    print(
        f"# Gate statistics over a data set, CP 768 -> 768, N = 1024, {BATCHES} batches of "
        f"{ROWS} rows, {args.threads} threads, {args.rounds} rounds\n"
    )
    print("| pass | median ms | / evaluation pass |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f} |")
    small = _layer()
    print("\n| peak Python memory (tracemalloc) | 10 batches | 40 batches |")
    print("|---|---|---|")
    for name, collect in (
        ("gate_statistics", lambda n: gate_statistics(small, _stream(n), labels=1)),
        ("collect_gates", lambda n: collect_gates(small, _stream(n))),
    ):
        collect(2)  # plans built, kernels compiled
        peaks = [_peak(lambda n=n, collect=collect: collect(n)) / 2**20 for n in (10, 40)]
        print(f"| {name} | {peaks[0]:.2f} MiB | {peaks[1]:.2f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
