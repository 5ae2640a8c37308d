"""Gate activations alone, and whole CP layers, against softmax: issue #17's table.

``python -m benchmarks.activations [--rounds R] [--json PATH]``: for each logits
shape (rows x experts), the median time of the forward pass (no graph) and of
forward + backward, for softmax, mumoe's entmax-1.5 and sparsemax
(:mod:`mumoe.nn`: on CPU tensors, the compiled kernels of
:mod:`mumoe.gates.entmax_cpu`) and the ``entmax`` package's entmax-1.5 with the
partial sort mumoe used before (``k=32``, doubling); then NumPy's softmax
against :mod:`mumoe.gates.entmax_cpu` (the NumPy backend's kernels) and against the
array-API algorithm CuPy and JAX run (:mod:`mumoe.gates.entmax`); then the CLIP-size
CP layer (768 -> 1000, 512 experts) with an entmax-1.5 gate against the same
layer with a softmax gate.

Each ratio is of medians measured in the same run, interleaved round by round,
so a busy machine slows both sides alike.  Absolute times vary between
machines; the ratios are the result.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from entmax import entmax15 as package_entmax15

import mumoe.nn
from mumoe.gates import entmax, entmax_cpu
from mumoe.nn import MuMoE

SHAPES = ((1, 64), (8, 512), (256, 2048), (4096, 64), (256, 24576))
LAYER_BATCHES = (8, 256)
LAYER = {"in_features": 768, "out_features": 1000, "expert_dims": 512, "rank": 512}
#: --quick (the test suite's smoke run): tiny shapes, tiny layer.
QUICK_SHAPES = ((1, 8), (4, 100))
QUICK_LAYER = {"in_features": 12, "out_features": 6, "expert_dims": 16, "rank": 4}
Fn = Callable[[], object]


def _medians(functions: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round by round."""
    repeat = {}
    for name, fn in functions.items():  # warm up, and calls per round for ~2 ms
        fn()
        start = time.perf_counter()
        fn()
        repeat[name] = max(1, int(2e-3 / max(time.perf_counter() - start, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(repeat[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / repeat[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def _forward_backward(
    activation: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, g: torch.Tensor
) -> Fn:
    leaf = z.clone().requires_grad_()
    return lambda: torch.autograd.grad(activation(leaf), leaf, g)


def _package_entmax15(z: torch.Tensor) -> torch.Tensor:
    """What mumoe ran before issue #17: the entmax package, partial sort of 32, doubling."""
    return package_entmax15(z, dim=-1, k=32 if z.shape[-1] > 32 else None)


def torch_activations(
    rounds: int, shapes: tuple[tuple[int, int], ...] = SHAPES
) -> list[dict[str, Any]]:
    """Forward and forward + backward of each torch activation, per logits shape."""
    kernels: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "softmax": lambda z: torch.softmax(z, -1),
        "entmax15": mumoe.nn.entmax15,
        "sparsemax": mumoe.nn.sparsemax,
        "entmax15 package k=32": _package_entmax15,
    }
    rows = []
    for b, n in shapes:
        generator = torch.Generator().manual_seed(0)
        z = torch.randn(b, n, generator=generator)  # normalised logits: unit variance
        g = torch.randn(b, n, generator=generator)
        functions: dict[str, Fn] = {}
        for name, kernel in kernels.items():
            functions[f"{name} f"] = functools.partial(kernel, z)  # no graph: z needs no grad
            functions[f"{name} f+b"] = _forward_backward(kernel, z, g)
        rows.append({"shape": [b, n], "seconds": _medians(functions, rounds)})
    return rows


def numpy_activations(
    rounds: int, shapes: tuple[tuple[int, int], ...] = SHAPES
) -> list[dict[str, Any]]:
    """NumPy softmax against mumoe.gates.entmax_cpu and mumoe.gates.entmax, per logits shape."""

    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    rows = []
    for b, n in shapes:
        z = np.random.default_rng(0).standard_normal((b, n)).astype(np.float32)
        functions: dict[str, Fn] = {
            "softmax": functools.partial(softmax, z),
            "entmax15": functools.partial(entmax_cpu.entmax15, z),
            "sparsemax": functools.partial(entmax_cpu.sparsemax, z),
            "entmax15 array API": functools.partial(entmax.entmax15, z, np),
        }
        rows.append({"shape": [b, n], "seconds": _medians(functions, rounds)})
    return rows


def layers(rounds: int, sizes: dict[str, int] = LAYER) -> list[dict[str, Any]]:
    """The CLIP-size CP layer's forward + backward with an entmax-1.5 and a softmax gate."""
    rows = []
    for batch in LAYER_BATCHES:
        torch.manual_seed(0)
        shape = (sizes["in_features"], sizes["out_features"])
        options: dict[str, Any] = {"expert_dims": sizes["expert_dims"], "rank": sizes["rank"]}
        entmax = MuMoE(*shape, "cp", **options)
        softmax = MuMoE(*shape, "cp", activation="softmax", **options)
        softmax.load_state_dict(entmax.state_dict())
        for layer in (entmax, softmax):  # trained gates, not zero ones: spread logits
            assert layer.gate is not None
            torch.nn.init.normal_(layer.gate.projections[0], std=sizes["in_features"] ** -0.5)
        x = torch.randn(batch, sizes["in_features"])

        functions = {
            "entmax15 gate f+b": functools.partial(_step, entmax, x),
            "softmax gate f+b": functools.partial(_step, softmax, x),
        }
        rows.append({"batch": batch, "seconds": _medians(functions, rounds)})
    return rows


def _step(layer: MuMoE, x: torch.Tensor) -> None:
    layer.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def print_tables(result: dict[str, list[dict[str, Any]]]) -> None:
    """The three tables, in markdown."""
    print("## torch, the activation alone (ratios to softmax, same run)\n")
    print("| logits | softmax f | entmax-1.5 f | f+b | sparsemax f | f+b | package k=32 f | f+b |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["torch"]:
        s = row["seconds"]
        b, n = row["shape"]
        cells = [f"{b} × {n:,}", _us(s["softmax f"])]
        for name in ("entmax15", "sparsemax", "entmax15 package k=32"):
            cells.append(f"{_us(s[f'{name} f'])}, {s[f'{name} f'] / s['softmax f']:.1f}×")
            cells.append(f"{s[f'{name} f+b'] / s['softmax f+b']:.1f}×")
        print("| " + " | ".join(cells) + " |")
    print(
        "\n## NumPy (mumoe.gates.entmax_cpu; the array-API mumoe.gates.entmax) "
        "against NumPy softmax\n"
    )
    print("| logits | softmax | entmax-1.5 | sparsemax | entmax-1.5, array API |")
    print("|---|---|---|---|---|")
    for row in result["numpy"]:
        s = row["seconds"]
        b, n = row["shape"]
        ratios = [
            s[name] / s["softmax"] for name in ("entmax15", "sparsemax", "entmax15 array API")
        ]
        cells = " | ".join(f"{r:.1f}×" for r in ratios)
        print(f"| {b} × {n:,} | {_us(s['softmax'])} | {cells} |")
    print(
        "\n## CP layer, CLIP head (768 -> 1000, 512 experts, rank 512; --quick: tiny), "
        "forward + backward\n"
    )
    print("| batch | softmax gate | entmax-1.5 gate | ratio |")
    print("|---|---|---|---|")
    for row in result["layers"]:
        s = row["seconds"]
        ratio = s["entmax15 gate f+b"] / s["softmax gate f+b"]
        print(
            f"| {row['batch']} | {_us(s['softmax gate f+b'])} | "
            f"{_us(s['entmax15 gate f+b'])} | {ratio:.2f}× |"
        )


def main() -> int:
    """Measure, print the tables, and write the JSON if asked."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.activations")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", type=Path, help="write the medians there")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny shapes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    result = {
        "torch": torch_activations(args.rounds, shapes),
        "numpy": numpy_activations(args.rounds, shapes),
        "layers": layers(args.rounds, QUICK_LAYER if args.quick else LAYER),
    }
    print(
        f"# Gate activations against softmax ({platform.machine()}, torch "
        f"{torch.__version__}, {args.threads} threads, {args.rounds} rounds)\n"
    )
    print_tables(result)
    if args.json is not None:
        meta = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds}
        args.json.write_text(json.dumps({"meta": meta, **result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
