"""What watching the experts costs: issue #18's overhead target.

``python -m benchmarks.health [--rounds R]``: a training step (forward and
backward) of the CLIP-size CP layer (768 -> 1000, 512 experts, rank 512,
batch 256), with and without an :class:`mumoe.nn.ExpertMonitor` recording
every step, and with a balance loss (``importance_cv2`` and ``z_loss``) on
top.  Rounds are interleaved, and the overhead is the ratio of medians from
the same run, so a busy machine slows both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mumoe.nn import ExpertMonitor, MuMoE, collect_aux_losses

SIZES = (768, 1000)
OPTIONS = {"expert_dims": 512, "rank": 512}
BATCH = 256


def _layer(**extra: object) -> MuMoE:
    torch.manual_seed(0)
    layer = MuMoE(*SIZES, "cp", **OPTIONS, **extra)  # type: ignore[arg-type]
    assert layer.gate is not None
    torch.nn.init.normal_(layer.gate.projections[0], std=SIZES[0] ** -0.5)
    return layer


def _step(layer: MuMoE, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        (layer(x).square().mean() + collect_aux_losses(layer)).backward()

    return run


def main() -> int:
    """Measure and print the overheads."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.health")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(BATCH, SIZES[0], generator=torch.Generator().manual_seed(0))
    plain, watched = _layer(), _layer()
    balanced = _layer(balance={"importance_cv2": 0.01, "z_loss": 1e-3})
    monitor = ExpertMonitor(watched, window=100)
    steps = {
        "plain": _step(plain, x),
        "monitored": _step(watched, x),
        "balance loss": _step(balanced, x),
    }
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    monitor.close()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    print(
        f"# Expert health overhead, CP 768 -> 1000, N = 512, batch {BATCH}, "
        f"{args.threads} threads, {args.rounds} rounds\n"
    )
    print("| training step | median ms | / plain |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / medians['plain']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
