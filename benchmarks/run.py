"""Time mumoe against the paper's contraction order, the GEMM limit and MoE baselines.

Usage::

    python -m benchmarks                  # paper configurations, tiny case, scaling sweep
    python -m benchmarks --quick          # seconds: small shapes, a smoke run
    python -m benchmarks --groups paper --filter clip-cp --json out.json

Implementations are interleaved within each configuration (every round runs
each once, in a shuffled order) and the reported time is the median over
rounds; ratios compare medians of the same run.  Timing is noisy on shared
machines: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import tensorly as tl
import torch

from benchmarks.configs import (
    Config,
    mxd_configs,
    paper_configs,
    quick_configs,
    sweep_configs,
    tiny_configs,
)
from benchmarks.impls import Setup, contraction_impls, layer_impls, plugins
from mumoe.backends import thread_backend
from mumoe.plan import flops

Fn = Callable[[], torch.Tensor]


def _parameters(fns: Iterable[Fn]) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for fn in fns:
        for cell in getattr(fn, "__closure__", None) or ():
            value = cell.cell_contents
            if isinstance(value, torch.nn.Module):
                for p in value.parameters():
                    seen[id(p)] = p
    return list(seen.values())


def _step(fn: Fn, backward: bool) -> None:
    if backward:
        fn().sum().backward()
    else:
        with torch.no_grad():
            fn()


def saved_bytes(fn: Fn, exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward pass (parameters and input excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def time_interleaved(
    fns: dict[str, Fn],
    backward: bool,
    rounds: int,
    min_sample: float,
    params: list,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per call of each implementation, interleaved over rounds.

    ``sync`` waits for queued device work (``torch.cuda.synchronize``) before a
    clock is read; nothing on the CPU.
    """
    loops = {}
    for name, fn in fns.items():  # warm up and calibrate: each sample lasts >= min_sample
        _step(fn, backward)
        start = time.perf_counter()
        _step(fn, backward)
        sync()
        once = max(time.perf_counter() - start, 1e-6)
        loops[name] = max(1, min(1000, int(min_sample / once)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(0)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for name in order:
            fn, n = fns[name], loops[name]
            start = time.perf_counter()
            for _ in range(n):
                _step(fn, backward)
            sync()
            samples[name].append((time.perf_counter() - start) / n)
            for p in params:
                p.grad = None
    return {name: statistics.median(values) for name, values in samples.items()}


def check_agreement(fns: dict[str, Fn], anchor: str, shape: tuple[int, ...]) -> None:
    """Every implementation computes the anchor's numbers (a benchmark of wrong code is void)."""
    with torch.no_grad():
        expected = fns[anchor]().reshape(shape)
        for name, fn in fns.items():
            got = fn().reshape(shape)
            scale = expected.abs().max().item() + 1e-12
            error = (got - expected).abs().max().item() / scale
            if error > 1e-3:
                raise AssertionError(f"{name} differs from {anchor}: relative error {error:.2e}")


def run_config(config: Config, rounds: int, min_sample: float) -> list[dict]:
    """Check, then time, both tables of one configuration; one record per implementation."""
    setup = Setup.build(config)
    network = setup.layer.network
    records = []
    for table, build, anchor in (
        ("contraction", contraction_impls, "limit"),
        ("layer", layer_impls, "mumoe"),
    ):
        fns = build(setup)
        modules = [setup.layer] + [
            cell.cell_contents
            for fn in fns.values()
            for cell in (getattr(fn, "__closure__", None) or ())
            if isinstance(cell.cell_contents, torch.nn.Module)
        ]
        for module in modules:
            module.eval()
        agreeing = {
            k: v
            for k, v in fns.items()
            if not k.startswith(("sparse", "nn.Linear", "gate", "activation"))
        }
        if table == "layer":
            agreeing = {k: v for k, v in agreeing.items() if k in ("mumoe", "reference")}
        check_agreement(agreeing, anchor, (config.rows, config.out_features))
        params = _parameters(fns.values()) + list(setup.layer.parameters())
        forward = time_interleaved(fns, False, rounds, min_sample, params)
        for module in modules:
            module.train()
        both = time_interleaved(fns, True, rounds, min_sample, params)
        exclude = [*params, setup.x, *setup.gates]
        for name, fn in fns.items():
            records.append(
                {
                    "config": config.name,
                    "group": config.group,
                    "format": config.format,
                    "expert_dims": list(config.expert_dims),
                    "batch_shape": list(config.batch_shape),
                    "rank": dict(network.ranks),
                    "table": table,
                    "impl": name,
                    "forward_ms": forward[name] * 1e3,
                    "forward_backward_ms": both[name] * 1e3,
                    "saved_mb": saved_bytes(fn, exclude) / 2**20,
                    "params": network.n_params,
                    "flops": flops(network, config.rows),
                }
            )
    return records


def _ratio(records: list[dict], table: str, impl: str, key: str, base: str) -> float | None:
    by = {r["impl"]: r for r in records if r["table"] == table}
    if impl not in by or base not in by:
        return None
    return by[impl][key] / by[base][key]


def print_config(records: list[dict], out: object = sys.stdout) -> None:
    """Print one configuration's two tables, with ratios to the limit and to the reference."""
    first = records[0]
    print(
        f"\n## {first['config']}  ({first['format']}, N={first['expert_dims']}, "
        f"batch {first['batch_shape']}, rank {first['rank']}, {first['params']:,} params, "
        f"{first['flops'] / 1e6:,.1f} MFLOP)",
        file=out,
    )
    for table, base in (("contraction", "limit"), ("layer", "reference")):
        rows = [r for r in records if r["table"] == table]
        header = f"{'':>4}{table:<22}{'fwd ms':>10}{'fwd+bwd ms':>12}"
        header += f"{'fwd/' + base:>16}{'f+b/' + base:>16}{'saved MB':>10}"
        print(header, file=out)
        for r in rows:
            ratios = [
                _ratio(records, table, r["impl"], k, base)
                for k in ("forward_ms", "forward_backward_ms")
            ]
            cells = "".join(f"{x:>16.2f}" if x is not None else f"{'-':>16}" for x in ratios)
            print(
                f"{'':>4}{r['impl']:<22}{r['forward_ms']:>10.3f}"
                f"{r['forward_backward_ms']:>12.3f}{cells}{r['saved_mb']:>10.1f}",
                file=out,
            )


def main(argv: list[str] | None = None) -> int:
    """Run the suite; see ``python -m benchmarks --help``."""
    description = __doc__.split("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=description)
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument(
        "--groups", default="paper,tiny,mxd,sweep", help="comma-separated: paper, tiny, mxd, sweep"
    )
    parser.add_argument("--filter", default="", help="only configurations whose name has this")
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7)")
    parser.add_argument("--json", default=None, help="write the records to this file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.quick:
        configs = quick_configs()
        rounds, min_sample = args.rounds or 2, 0.001
    else:
        groups = {g.strip() for g in args.groups.split(",")}
        configs = []
        if "paper" in groups:
            configs += paper_configs()
        if "tiny" in groups:
            configs += tiny_configs()
        if "mxd" in groups:
            configs += mxd_configs()
        if "sweep" in groups:
            configs += sweep_configs()
        rounds, min_sample = args.rounds or 7, 0.02
    configs = [c for c in configs if args.filter in c.name]

    print(
        f"# mumoe benchmarks: torch {torch.__version__}, {args.threads} threads, "
        f"{platform.machine()}, {rounds} rounds"
    )
    records: list[dict] = []
    started = time.perf_counter()
    with thread_backend("pytorch"):
        plugins.use_opt_einsum()
    try:
        for config in configs:
            result = run_config(config, rounds, min_sample)
            print_config(result)
            sys.stdout.flush()
            records += result
    finally:
        with thread_backend("pytorch"):
            plugins.use_default_einsum()
    print(f"\n# {len(configs)} configurations in {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "threads": args.threads,
                    "tensorly": tl.__version__,
                    "records": records,
                },
                f,
                indent=1,
            )
    return 0
