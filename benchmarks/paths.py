"""FLOP excess of opt_einsum's optimisers over mumoe's FLOP-optimal default path.

``python -m benchmarks.paths``: for preset networks whose ``auto-hq`` path (mumoe's
default before ``mumoe.plan``) is not optimal, the FLOPs of each optimiser's path
relative to :func:`mumoe.plan.optimal_path`, and the time each search takes.  FLOP
counts are exact and the same on every machine; only the search times vary.
"""

from __future__ import annotations

import time

import opt_einsum

from mumoe import Network, cp, tr, tucker
from mumoe.plan import FlopOptimal

CASES: dict[str, Network] = {
    "cp-2-levels-clip": cp(768, 1000, expert_dims=(32, 4), rank=410),
    "tucker-1-level-clip": tucker(768, 1000, expert_dims=128, rank=(4, 244, 244)),
    "tucker-2-levels-small": tucker(16, 8, expert_dims=(4, 3), rank=(2, 3, 4, 4)),
    "tucker-2-levels-clip": tucker(768, 1000, expert_dims=(8, 8), rank=(8, 8, 64, 64)),
    "tr-3-levels": tr(10, 10, expert_dims=(4, 3, 2), rank=3),
    "tucker-3-levels": tucker(10, 10, expert_dims=(4, 3, 2), rank=3),
}
OPTIMIZERS = ("auto-hq", "optimal", "flop-optimal")
ROWS = 256


def measure(net: Network) -> dict[str, tuple[int, float]]:
    """FLOPs and search seconds of each optimiser on ``net``'s forward contraction."""
    shapes = net.forward_shapes(ROWS)
    results = {}
    for name in OPTIMIZERS:
        if name == "optimal" and len(shapes) > 8:
            continue  # opt_einsum's exhaustive search takes seconds to minutes beyond
        optimize = FlopOptimal() if name == "flop-optimal" else name
        start = time.perf_counter()
        _, info = opt_einsum.contract_path(
            net.einsum_equation, *shapes, shapes=True, optimize=optimize
        )
        results[name] = (int(info.opt_cost), time.perf_counter() - start)
    return results


def main() -> int:
    """Print the table (markdown)."""
    print(f"# FLOP excess over the FLOP-optimal path, batch {ROWS} (python -m benchmarks.paths)\n")
    header = " | ".join(f"{name} excess, search ms" for name in OPTIMIZERS)
    print(f"| network | operands | optimal FLOPs | {header} |")
    print("|---|---|---|" + "---|" * len(OPTIMIZERS))
    for label, net in CASES.items():
        results = measure(net)
        best = results["flop-optimal"][0]
        cells = []
        for name in OPTIMIZERS:
            if name not in results:
                cells.append("(not run)")
                continue
            flops, seconds = results[name]
            cells.append(f"{100 * (flops / best - 1):+.1f}%, {1e3 * seconds:.1f}")
        operands = len(net.forward_shapes(ROWS))
        print(f"| {label} | {operands} | {best:,} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
