"""Sparse gates executed sparsely: cost with the experts a token uses, not with N.

Usage::

    python -m benchmarks.sparse                       # every group, 2 CPU threads
    python -m benchmarks.sparse --groups mxd,crossover --json out.json
    python -m benchmarks.sparse --quick               # seconds: small shapes, a smoke run
    python -m benchmarks.sparse --device cuda --groups mxd,million --json gpu.json

Groups:

* ``mxd``: MxD's decoder at GPT-2 size (N = 24,576, H = 3,072, O = 768, batch
  256), top-32 supports given: mumoe's sparse path against a hand-written sparse
  limit (``embedding_bag`` of C with the 32 weights, times ``z @ D[:H] + D[H]``)
  and against mumoe's dense-gate path (the same coefficients as a dense matrix);
* ``mxd-gate``: the same layer with its ReLU-top-32 gate computed from its input,
  the time split into gate and contraction, sparse against dense;
* ``entmax``: a CP layer with entmax-1.5 gates at the support their logits give
  (measured and printed), sparse against dense;
* ``crossover``: sparse against dense over the support density k / N, for CP and
  MxD layers: where sparse stops paying (``sparse_crossover`` in the backend's TOML);
* ``floor``: the same at k/N = 1/64 over the size of the dense step it replaces:
  where a gather's fixed cost stops mattering (``sparse_min_work``);
* ``million``: 2^20 experts as two levels of 1,024 (CP, top-k per level), I = O =
  768: time per token for training, and peak memory (in a fresh process);
* ``peer``: PEER (``peer-pytorch``) and a two-level μMoE of the same N, I and O:
  time per token, parameters, peak memory (each in a fresh process).

Implementations are interleaved round by round and each time is the median of
the rounds; ratios compare medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.run import time_interleaved
from mumoe import SparseGate, mxd
from mumoe.backends import thread_backend
from mumoe.functional import contract
from mumoe.gates import relu_topk_support
from mumoe.nn import MuMoE, entmax15
from mumoe.plan import Planner, planner_of

Fn = Callable[[], Any]


def measure(fns: dict[str, Fn], rounds: int, params: list) -> tuple[dict, dict]:
    """Median seconds a call, forward (no grad) and forward+backward, interleaved by round.

    Each forward+backward call starts with the gradients set to None, as a training step
    after ``optimizer.zero_grad()`` does: a backward pass then allocates them afresh.
    """
    forward = time_interleaved(fns, False, rounds, MIN_SAMPLE, params, _sync)
    fresh = {name: _with_fresh_grads(fn, params) for name, fn in fns.items()}
    both = time_interleaved(fresh, True, rounds, MIN_SAMPLE, params, _sync)
    return forward, both


def _with_fresh_grads(fn: Fn, params: list) -> Fn:
    def call() -> Any:
        for p in params:
            p.grad = None
        return fn()

    return call


def forward_only(fns: dict[str, Fn], rounds: int) -> dict[str, float]:
    """Median seconds a call, without gradients (NumPy, or torch under no_grad)."""
    return time_interleaved(fns, False, rounds, MIN_SAMPLE, [], _sync)


#: The shortest timed sample: calls are repeated until one lasts this long.
MIN_SAMPLE = 0.05

_DEVICE = torch.device("cpu")


def _sync() -> None:
    if _DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _random_support(rows: int, n: int, k: int, seed: int = 0) -> SparseGate:
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(rows, n, generator=g).topk(k, dim=-1).indices
    values = torch.rand(rows, k, generator=g)
    return SparseGate(indices.to(_DEVICE), values.to(_DEVICE), n)


def _dense(gate: SparseGate) -> torch.Tensor:
    rows = gate.indices.shape[0]
    return torch.zeros(rows, gate.n_experts, device=_DEVICE).scatter(1, gate.indices, gate.values)


def _contraction(layer: MuMoE, crossover: float) -> Callable[..., torch.Tensor]:
    # The layer's contraction with given gates, under a planner of the given crossover.
    planner = Planner(layer.network, crossover=crossover)
    cores = list(layer.cores)

    def run(x: torch.Tensor, gates: list[Any]) -> torch.Tensor:
        with thread_backend("pytorch"):
            return contract(layer.network, cores, x, gates, planner=planner, backend="pytorch")

    return run


# --------------------------------------------------------------------------- mxd


def mxd_given(rounds: int, quick: bool) -> dict[str, Any]:
    """MxD's decoder with top-32 supports given: sparse, the hand-written limit, dense."""
    n, hidden, out, batch, k = (1024, 256, 64, 32, 8) if quick else (24576, 3072, 768, 256, 32)
    layer = MuMoE(hidden, out, mxd(hidden, out, expert_dims=n), gated=False, device=_DEVICE)
    c, d = layer.cores
    z = torch.randn(batch, hidden, device=_DEVICE)
    support = _random_support(batch, n, k)
    dense = _dense(support)
    sparse_run, dense_run = _contraction(layer, 1.0), _contraction(layer, 0.0)

    def limit() -> torch.Tensor:
        mixed = torch.nn.functional.embedding_bag(
            support.indices, c, mode="sum", per_sample_weights=support.values
        )
        return mixed * torch.addmm(d[hidden], z, d[:hidden])

    fns = {
        "mumoe sparse": lambda: sparse_run(z, [support]),
        "limit": limit,
        "mumoe dense gates": lambda: dense_run(z, [dense]),
    }
    _agree(fns, "limit")
    params = [c, d]
    forward, both = measure(fns, rounds, params)
    return _table(
        "mxd",
        f"MxD decoder N={n}, H={hidden}, O={out}, batch {batch}, top-{k} supports given",
        forward,
        both,
        ("mumoe sparse", "limit"),
        ("mumoe sparse", "mumoe dense gates"),
    )


def mxd_gate(rounds: int, quick: bool) -> dict[str, Any]:
    """The same layer with its ReLU-top-32 gate from its input: gate and contraction apart."""
    n, hidden, out, batch, k = (1024, 256, 64, 32, 8) if quick else (24576, 3072, 768, 256, 32)
    layer = MuMoE(
        hidden,
        out,
        mxd(hidden, out, expert_dims=n),
        activation="relu_topk",
        top_k=k,
        normalization=None,
        gate_bias=True,
        device=_DEVICE,
    )
    z = torch.randn(batch, hidden, device=_DEVICE)
    projection = layer.gate.projections[0]
    bias = layer.gate.biases[0]  # type: ignore[index]

    def gate_sparse() -> Any:
        with thread_backend("pytorch"):
            return relu_topk_support(torch.addmm(bias, z, projection), k, 1.0)

    def gate_dense() -> torch.Tensor:
        return layer.gate(z)[0]

    with torch.no_grad():
        support, dense = gate_sparse(), gate_dense()
    sparse_run, dense_run = _contraction(layer, 1.0), _contraction(layer, 0.0)
    fns = {
        "layer sparse": lambda: sparse_run(z, [gate_sparse()]),
        "layer dense": lambda: dense_run(z, [gate_dense()]),
        "gate sparse": lambda: gate_sparse().values,
        "gate dense": gate_dense,
        "contraction sparse": lambda: sparse_run(z, [support]),
        "contraction dense": lambda: dense_run(z, [dense]),
    }
    params = [*layer.parameters()]
    forward, both = measure(fns, rounds, params)
    return _table(
        "mxd-gate",
        f"MxD layer N={n}, H={hidden}, O={out}, batch {batch}, ReLU-top-{k} gate from the input",
        forward,
        both,
        ("layer sparse", "layer dense"),
        ("gate sparse", "layer sparse"),
        ("contraction sparse", "contraction dense"),
    )


# ------------------------------------------------------------------------ entmax


def entmax_support(rounds: int, quick: bool) -> dict[str, Any]:
    """A CP layer with entmax-1.5 gates at their measured support: sparse against dense."""
    n, features, rank, batch = (512, 64, 32, 32) if quick else (4096, 768, 256, 256)
    layer = MuMoE(features, features, "cp", expert_dims=n, rank=rank, gated=False, device=_DEVICE)
    x = torch.randn(batch, features, device=_DEVICE)
    records = []
    for scale in (2.0, 8.0):
        # Logits of spread `scale` (a trained gate's are spread): entmax-1.5's support.
        logits = torch.randn(batch, n, device=_DEVICE) * scale
        dense = entmax15(logits)
        k = int((dense != 0).sum(-1).max())
        with thread_backend("pytorch"):
            values, indices = torch.topk(dense, k, dim=-1)
        support = SparseGate(indices, values, n)
        sparse_run, dense_run = _contraction(layer, 1.0), _contraction(layer, 0.0)
        fns = {
            "sparse": lambda support=support, run=sparse_run: run(x, [support]),
            "dense": lambda dense=dense, run=dense_run: run(x, [dense]),
        }
        _agree(fns, "dense")
        params = list(layer.parameters())
        forward, both = measure(fns, rounds, params)
        records.append(
            _table(
                "entmax",
                f"CP N={n}, I=O={features}, rank {rank}, batch {batch}, entmax-1.5 at logit "
                f"scale {scale}: support k = {k} (k/N = {k / n:.3f})",
                forward,
                both,
                ("sparse", "dense"),
            )
        )
    return {"group": "entmax", "tables": records}


# --------------------------------------------------------------------- crossover


def crossover(rounds: int, quick: bool) -> dict[str, Any]:
    """Sparse against dense over k / N: where a gather stops beating the GEMM."""
    n, features, batch = (256, 32, 32) if quick else (4096, 768, 256)
    densities = (
        (1 / 64, 1 / 8, 1 / 2)
        if quick
        else (1 / 256, 1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4)
    )
    rows = []
    for form, layer in (
        (
            "cp rank 256",
            MuMoE(
                features,
                features,
                "cp",
                expert_dims=n,
                rank=min(256, features),
                gated=False,
                device=_DEVICE,
            ),
        ),
        (
            "mxd",
            MuMoE(
                features,
                features,
                mxd(features, features, expert_dims=n),
                gated=False,
                device=_DEVICE,
            ),
        ),
        (
            "tt rank 16",
            MuMoE(
                features, features, "tt", expert_dims=n, rank=(16, 16), gated=False, device=_DEVICE
            ),
        ),
    ):
        x = torch.randn(batch, features, device=_DEVICE)
        sparse_run, dense_run = _contraction(layer, 1.0), _contraction(layer, 0.0)
        params = list(layer.parameters())
        for density in densities:
            k = max(1, round(density * n))
            support = _random_support(batch, n, k)
            dense = _dense(support)
            fns = {
                "sparse": lambda s=support, run=sparse_run, x=x: run(x, [s]),
                "dense": lambda d=dense, run=dense_run, x=x: run(x, [d]),
            }
            forward, both = measure(fns, rounds, params)
            numpy = forward_only(_numpy_pair(layer, x, support, dense), rounds)
            rows.append(
                {
                    "form": form,
                    "k": k,
                    "density": k / n,
                    "forward_ratio": forward["sparse"] / forward["dense"],
                    "forward_backward_ratio": both["sparse"] / both["dense"],
                    "numpy_forward_ratio": numpy["sparse"] / numpy["dense"],
                }
            )
            print(
                f"  {form:<12} k/N={k / n:7.4f}  torch sparse/dense: fwd "
                f"{rows[-1]['forward_ratio']:.2f}, fwd+bwd {rows[-1]['forward_backward_ratio']:.2f}"
                f";  numpy fwd {rows[-1]['numpy_forward_ratio']:.2f}",
                flush=True,
            )
    return {"group": "crossover", "n": n, "features": features, "batch": batch, "rows": rows}


def _numpy_pair(layer: MuMoE, x: torch.Tensor, support: SparseGate, dense: torch.Tensor) -> dict:
    # The same contraction on NumPy arrays (forward only: NumPy has no autograd).
    network = layer.network
    cores = [c.detach().cpu().numpy() for c in layer.cores]
    rows = x.cpu().numpy()
    gate = SparseGate(
        support.indices.cpu().numpy(), support.values.cpu().numpy(), support.n_experts
    )
    matrix = dense.cpu().numpy()
    sparse_planner = Planner(network, crossover=1.0)
    dense_planner = Planner(network, crossover=0.0)

    def run(gates: list[Any], planner: Planner) -> Any:
        with thread_backend("numpy"):
            return contract(network, cores, rows, gates, planner=planner, backend="numpy")

    return {
        "sparse": lambda: run([gate], sparse_planner),
        "dense": lambda: run([matrix], dense_planner),
    }


def floor(rounds: int, quick: bool) -> dict[str, Any]:
    """Sparse against dense at k/N = 1/64 over the dense step's size: the fixed cost's floor."""
    rows = []
    cases = (
        ((256, 16, 8), (1024, 64, 32))
        if quick
        else (
            (256, 16, 16),
            (256, 64, 32),
            (1024, 64, 32),
            (1024, 64, 256),
            (4096, 64, 256),
            (4096, 256, 256),
            (16384, 256, 256),
        )
    )
    for n, rank, batch in cases:
        layer = MuMoE(64, 64, "cp", expert_dims=n, rank=rank, gated=False, device=_DEVICE)
        x = torch.randn(batch, 64, device=_DEVICE)
        support = _random_support(batch, n, max(1, n // 64))
        dense = _dense(support)
        sparse_run, dense_run = _contraction(layer, 1.0), _contraction(layer, 0.0)
        fns = {
            "sparse": lambda run=sparse_run, x=x, s=support: run(x, [s]),
            "dense": lambda run=dense_run, x=x, d=dense: run(x, [d]),
        }
        params = list(layer.parameters())
        forward, both = measure(fns, rounds, params)
        numpy = forward_only(_numpy_pair(layer, x, support, dense), rounds)
        row = {
            "n": n,
            "rank": rank,
            "batch": batch,
            "work": batch * n * rank,
            "forward_ratio": forward["sparse"] / forward["dense"],
            "forward_backward_ratio": both["sparse"] / both["dense"],
            "numpy_forward_ratio": numpy["sparse"] / numpy["dense"],
        }
        rows.append(row)
        print(
            f"  N={n:>6} R={rank:>4} B={batch:>4} B*N*R={row['work']:>12,}: torch fwd "
            f"{row['forward_ratio']:.2f}, fwd+bwd {row['forward_backward_ratio']:.2f}; numpy fwd "
            f"{row['numpy_forward_ratio']:.2f}",
            flush=True,
        )
    return {"group": "floor", "rows": rows}


# ---------------------------------------------------------------- million, peer


def _million_layer(features: int, levels: int, k: int, rank: int) -> MuMoE:
    return MuMoE(
        features,
        features,
        "cp",
        expert_dims=(levels, levels),
        rank=rank,
        activation="topk",
        top_k=k,
        normalization="ln",
        device=_DEVICE,
    )


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One model trained a few steps in this process: time per token, peak memory, params."""
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # torch imported
    torch.manual_seed(0)
    features, batch, steps = spec["features"], spec["batch"], spec["steps"]
    if spec["model"] == "peer":
        from PEER_pytorch import PEER

        model = PEER(
            dim=features,
            heads=spec["heads"],
            num_experts=spec["n"],
            num_experts_per_head=spec["k"],
            dim_key=spec["dim_key"],
            pre_rmsnorm=True,
        ).to(_DEVICE)
    else:
        model = _million_layer(features, spec["levels"], spec["k"], spec["rank"])
        torch.nn.init.normal_(model.gate.projections[0])
        torch.nn.init.normal_(model.gate.projections[1])
        if "crossover" in spec:  # 0: the dense path, to compare in the same run
            model.planner = planner_of(model.network, crossover=spec["crossover"])
    x = torch.randn(1, batch, features, device=_DEVICE)
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    if _DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model(x).square().mean()
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        _sync()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if _DEVICE.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    if _DEVICE.type != "cuda":
        peak -= baseline  # the growth past the interpreter with torch imported
    return {
        **spec,
        "params": sum(p.numel() for p in model.parameters()),
        "us_per_token": statistics.median(times[1:]) / batch * 1e6,
        "peak_mb": peak / 2**20,
        "loss_finite": bool(torch.isfinite(loss).item()),
    }


def _in_child(spec: dict[str, Any]) -> dict[str, Any]:
    code = (
        "import json, sys, torch; from benchmarks import sparse; "
        f"torch.set_num_threads({torch.get_num_threads()}); "
        f"sparse._DEVICE = torch.device({_DEVICE.type!r}); "
        "print(json.dumps(sparse.child_run(json.loads(sys.argv[1]))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"{spec['model']} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def million(rounds: int, quick: bool) -> dict[str, Any]:
    """2^20 experts as 1,024 x 1,024 (CP, top-k per level): training time and peak memory."""
    features, levels = (64, 64) if quick else (768, 1024)
    spec = {
        "model": "mumoe",
        "features": features,
        "levels": levels,
        "k": 16 if not quick else 4,
        "rank": 256 if not quick else 16,
        "batch": 256 if not quick else 32,
        "steps": 4 + 3 * rounds,
        "n": levels * levels,
    }
    # The layer's own choice (sparse at these sizes), then the dense path, then again.
    runs = [_in_child(spec), _in_child({**spec, "crossover": 0.0}), _in_child(spec)]
    for r in runs:
        path = "dense path" if "crossover" in r else "default (sparse)"
        print(
            f"  mumoe N={r['n']:,} ({levels} x {levels}), I=O={features}, {path}: "
            f"{r['params']:,} params, {r['us_per_token']:.1f} us/token (train step), "
            f"peak {r['peak_mb']:.0f} MB more",
            flush=True,
        )
    return {"group": "million", "runs": runs}


def peer(rounds: int, quick: bool) -> dict[str, Any]:
    """PEER and a two-level μMoE of the same N, I and O, each trained in a fresh process."""
    features, side = (64, 32) if quick else (768, 256)
    n = side * side
    common = {
        "features": features,
        "batch": 256 if not quick else 32,
        "steps": 4 + 3 * rounds,
        "n": n,
    }
    runs = [
        _in_child({**common, "model": "peer", "heads": 8, "k": 16, "dim_key": 128}),
        _in_child({**common, "model": "mumoe", "levels": side, "k": 16, "rank": 256}),
        # A larger N at no cost in time: 2^20 experts (1,024 x 1,024).
        _in_child(
            {
                **common,
                "n": (side * 4) ** 2,
                "model": "mumoe",
                "levels": side * 4,
                "k": 16,
                "rank": 256,
            }
        ),
    ]
    for r in runs:
        print(
            f"  {r['model']:<6} N={r['n']:,}, I=O={features}: {r['params']:,} params, "
            f"{r['us_per_token']:.1f} us/token (train step), peak {r['peak_mb']:.0f} MB more",
            flush=True,
        )
    return {"group": "peer", "runs": runs}


# ------------------------------------------------------------------------ report


def _agree(fns: dict[str, Fn], anchor: str) -> None:
    with torch.no_grad():
        expected = fns[anchor]()
        for name, fn in fns.items():
            got = fn()
            error = (got - expected).abs().max().item() / (expected.abs().max().item() + 1e-12)
            if error > 1e-4:
                raise AssertionError(f"{name} differs from {anchor}: relative error {error:.1e}")


def _table(
    group: str,
    title: str,
    forward: dict[str, float],
    both: dict[str, float],
    *ratios: tuple[str, str],
) -> dict[str, Any]:
    print(f"\n## {title}")
    print(f"    {'':<22}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    for name in forward:
        print(f"    {name:<22}{forward[name] * 1e3:>10.2f}{both[name] * 1e3:>12.2f}")
    table = {
        "group": group,
        "title": title,
        "forward_ms": {k: v * 1e3 for k, v in forward.items()},
        "forward_backward_ms": {k: v * 1e3 for k, v in both.items()},
        "ratios": {},
    }
    for a, b in ratios:
        pair = {"forward": forward[a] / forward[b], "forward_backward": both[a] / both[b]}
        table["ratios"][f"{a} / {b}"] = pair
        print(f"    {a} / {b}: fwd {pair['forward']:.2f}, fwd+bwd {pair['forward_backward']:.2f}")
    return table


GROUPS: dict[str, Callable[[int, bool], dict[str, Any]]] = {
    "mxd": mxd_given,
    "mxd-gate": mxd_gate,
    "entmax": entmax_support,
    "crossover": crossover,
    "floor": floor,
    "million": million,
    "peer": peer,
}


def main(argv: list[str] | None = None) -> int:
    """Run the groups asked for; print their tables, and write them as JSON if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    global _DEVICE
    _DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 3 if args.quick else args.rounds
    results = []
    for name in args.groups.split(","):
        if name not in GROUPS:
            parser.error(f"unknown group {name!r}; choose from {', '.join(GROUPS)}")
        print(f"# {name}", flush=True)
        results.append(GROUPS[name](rounds, args.quick))
    if args.json:
        meta = {
            "machine": platform.platform(),
            "device": str(_DEVICE),
            "threads": args.threads,
            "torch": torch.__version__,
            "quick": args.quick,
            # PyTorch's transparent-huge-page allocation, read from the environment at start.
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        }
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
