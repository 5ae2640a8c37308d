"""``mumoe demo lm``: a small language model's MLP decomposed into experts, offline.

A character-level GPT-2 (``transformers``, from a config) is trained on the
text that ships with Python itself (``pydoc_data.topics``, the help topics of
the standard library: about 465,000 characters of English), then the MLP of
its last layer is decomposed:

1. the exact start: :func:`mumoe.nn.replace_mlp` with MxD as published, whose
   ΔCE at conversion is zero up to float32 rounding;
2. the sparsity–faithfulness frontier (:func:`mumoe.nn.frontier`): for each
   ``k``, an MxD block started from the MLP, one started at random, and a
   transcoder with as many parameters (at random), distilled by the same loop,
   measured by held-out NMSE and spliced-in ΔCE, over seeds;
3. what the experts specialise on: for the most used experts of one block,
   the characters whose tokens give them the largest coefficients.

Nothing is downloaded.  It needs ``torch``, ``transformers`` and matplotlib
(``pip install "mumoe[torch,demo,models]"``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from mumoe.demo._experiment import _check_paths as check_paths
from mumoe.demo._experiment import _write_atomically as write_atomically

__all__ = ["LM_SETTINGS", "report_lm", "run_lm"]

#: The settings of a full run and of ``--fast`` (a smoke run).
LM_SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "train_steps": 600,
        "distill_steps": 300,
        "ks": [4, 16, 64],
        "experts": 512,
        "train_batches": 64,
        "test_batches": 8,
    },
    "fast": {
        "train_steps": 20,
        "distill_steps": 10,
        "ks": [4],
        "experts": 64,
        "train_batches": 4,
        "test_batches": 2,
    },
}

#: The model: a 2-layer GPT-2 of width 64 over characters, windows of 64.
MODEL: dict[str, Any] = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 256, "n_positions": 64}
WINDOW, BATCH = 64, 32


def corpus() -> tuple[str, list[str]]:
    """The text of ``pydoc_data.topics`` (topics in sorted order) and its characters.

    Returns
    -------
    text : str
    chars : list of str
        Sorted: a character's index is its token.

    Examples
    --------
    >>> text, chars = corpus()
    >>> len(text) > 400_000, chars == sorted(set(text))
    (True, True)
    """
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    return text, sorted(set(text))


def _windows(ids: Any, count: int, generator: Any) -> list[dict[str, Any]]:
    import torch

    starts = torch.randint(0, len(ids) - WINDOW, (count, BATCH), generator=generator)
    return [{"input_ids": torch.stack([ids[s : s + WINDOW] for s in row])} for row in starts]


def run_lm(
    *,
    seeds: Sequence[int] = (0, 1, 2),
    fast: bool = False,
    output: str | Path | None = "mumoe-demo-lm",
    json_path: str | Path | None = None,
    stream: IO[str] | None = None,
) -> dict[str, Any]:
    """Train the character-level GPT-2, decompose its last MLP, and report.

    Parameters
    ----------
    seeds : sequence of int, default (0, 1, 2)
        Seeds of the decompositions (the language model is trained once, seed 0).
    fast : bool, default False
        A smoke run (:data:`LM_SETTINGS`).
    output : path, optional
        Folder for ``frontier.png``; None: no figure.
    json_path : path, optional
        Write the results there (atomically).
    stream : file, optional
        Where the report goes; standard output by default.

    Returns
    -------
    dict
        The results, as written to JSON.

    Raises
    ------
    ValueError
        For no seeds, or an output folder or JSON path that cannot be written
        (before anything is trained).

    Examples
    --------
    >>> import io
    >>> result = run_lm(seeds=(0,), fast=True, output=None, stream=io.StringIO())
    >>> kinds = sorted({r["kind"] for r in result["frontier"]})
    >>> abs(result["exact_start"]["delta_ce"]) < 1e-4, kinds
    (True, ['mxd', 'mxd-scratch', 'transcoder'])
    """
    import torch
    import transformers

    from mumoe.nn import find_mlps, frontier, replace_mlp, splice_report
    from mumoe.plotting import plot_frontier

    stream = stream or sys.stdout
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    check_paths(output, json_path)  # before minutes of training, not after
    settings = LM_SETTINGS["fast" if fast else "full"]
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    torch.manual_seed(0)
    text, chars = corpus()
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text])
    cut = int(0.9 * len(ids))
    train_ids, test_ids = ids[:cut], ids[cut:]
    config = transformers.GPT2Config(
        vocab_size=len(chars),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **MODEL,
    )
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(settings["train_steps"]):
        (batch,) = _windows(train_ids, 1, generator)
        loss = model(**batch, labels=batch["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    train_batches = _windows(train_ids, settings["train_batches"], generator)
    test_batches = _windows(test_ids, settings["test_batches"], generator)
    mxd: dict[str, Any] = {"activation": "relu_topk", "normalization": None, "gate_bias": True}
    parts = find_mlps(model)[-1]
    exact = splice_report(
        model,
        test_batches,
        {
            parts.name: replace_mlp(
                _copy(model),
                include=f"^{parts.name}$",
                expert_dims=settings["experts"],
                top_k=settings["ks"][0],
                **mxd,
            ).get_submodule(parts.name)
        },
    )
    records = frontier(
        model,
        parts,
        train_batches,
        test_batches,
        ks=settings["ks"],
        expert_dims=settings["experts"],
        seeds=list(seeds),
        steps=settings["distill_steps"],
        lr=3e-3,
        batch_size=256,
        buffer_size=8192,
        from_scratch=True,
    )
    experts = _specialisation(model, parts, train_batches, test_batches, chars, settings, seeds)
    result: dict[str, Any] = {
        "corpus": {"characters": len(text), "vocabulary": len(chars)},
        "model": {
            **MODEL,
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_steps": settings["train_steps"],
            "final_train_loss": round(float(np.mean(losses[-20:])), 4),
            "test_loss": round(exact.loss, 4),
        },
        "mlp": parts.name,
        "starts": {
            "mxd": "from the MLP: its layers as encoder and decoder, the gate random and "
            "calibrated",
            "mxd-scratch": "random (as the MxD paper trains it)",
            "transcoder": "random",
        },
        "exact_start": {"delta_ce": exact.delta, "l0": exact.l0},
        "frontier": [{k: _round(v) for k, v in r.items()} for r in records],
        "summary": _summary(records),
        "experts": experts,
        "seeds": list(seeds),
        "fast": fast,
    }
    report_lm(result, stream)
    print(f"({time.perf_counter() - started:.0f} s)", file=stream)
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        plot_frontier(records, title="char-level GPT-2, last MLP").savefig(
            Path(output) / "frontier.png", dpi=120
        )
    if json_path is not None:
        write_atomically(Path(json_path), json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    return result


def _copy(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Mean and standard deviation over the seeds, per kind and k.
    out = []
    for kind in ("mxd", "mxd-scratch", "transcoder"):
        for k in sorted({r["k"] for r in records}):
            group = [r for r in records if r["kind"] == kind and r["k"] == k]
            row: dict[str, Any] = {"kind": kind, "k": k, "params": group[0]["params"]}
            for key in ("nmse", "delta_ce", "l0"):
                values = np.array([r[key] for r in group], dtype=float)
                row[key] = round(float(values.mean()), 4)
                row[f"{key}_sd"] = round(float(values.std()), 4)
            out.append(row)
    return out


def _specialisation(
    model: Any,
    parts: Any,
    train: list[Any],
    test: list[Any],
    chars: list[str],
    settings: dict[str, Any],
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    # One MxD block (the largest k, the first seed), distilled again, and per used expert
    # the characters (the current token) with the largest mean coefficient.
    import torch

    from mumoe.nn import ActivationPairs, block_from_mlp, distill

    torch.manual_seed(seeds[0])
    fc1, fc2 = model.get_submodule(parts.fc1), model.get_submodule(parts.fc2)
    pairs = ActivationPairs(model, train, inputs_of=parts.name, batch_size=256, buffer_size=8192)
    block = block_from_mlp(
        fc1,
        fc2,
        "mxd",
        expert_dims=settings["experts"],
        hidden_activation=parts.activation,
        activation="relu_topk",
        top_k=settings["ks"][-1],
        normalization=None,
        gate_bias=True,
        gate_init="random",
        calibrate=next(iter(pairs))[0],
    )
    distill(block, pairs, steps=settings["distill_steps"], lr=3e-3)
    block.eval()
    sums = torch.zeros(settings["experts"], len(chars))
    counts = torch.zeros(len(chars))
    taken: dict[str, Any] = {}
    handle = model.get_submodule(parts.name).register_forward_pre_hook(
        lambda module, args: taken.__setitem__("x", args[0])
    )
    with torch.no_grad():
        for batch in test:
            model(**batch)
            x = taken["x"].reshape(-1, taken["x"].shape[-1])
            a = block.gate(x)[0]
            ids = batch["input_ids"].reshape(-1)
            sums.index_add_(1, ids, a.T)
            counts += torch.bincount(ids, minlength=len(chars)).float()
    handle.remove()
    mean = sums / counts.clamp_min(1)
    usage = sums.sum(1)
    out = []
    for expert in torch.argsort(usage, descending=True)[:8].tolist():
        seen = counts > 0
        scores = torch.where(seen, mean[expert], torch.full_like(counts, -1.0))
        top = torch.argsort(scores, descending=True)[:5].tolist()
        out.append(
            {
                "expert": expert,
                "share": round(float(usage[expert] / usage.sum()), 4),
                "top_characters": [chars[i] for i in top],
            }
        )
    return out


def report_lm(result: dict[str, Any], stream: IO[str]) -> None:
    """Print what :func:`run_lm` found, from its results (as stored in JSON).

    Parameters
    ----------
    result : dict
        :func:`run_lm`'s return value, or its JSON read back.
    stream : file
    """
    model = result["model"]
    print(
        f"char-level GPT-2 ({model['parameters']:,} parameters) on pydoc_data.topics "
        f"({result['corpus']['characters']:,} characters): train loss "
        f"{model['final_train_loss']:.3f}, test cross-entropy {model['test_loss']:.3f} nats",
        file=stream,
    )
    print(
        f"{result['mlp']} as MxD at conversion: ΔCE {result['exact_start']['delta_ce']:+.2e} "
        "(the exact start)",
        file=stream,
    )
    print(
        "frontier (mean ± sd over seeds " + ",".join(map(str, result["seeds"])) + "):", file=stream
    )
    print(f"  {'kind':<11} {'k':>3} {'params':>8} {'L0':>6} {'NMSE':>15} {'ΔCE':>17}", file=stream)
    for row in result["summary"]:
        print(
            f"  {row['kind']:<11} {row['k']:>3} {row['params']:>8,} {row['l0']:>6.1f} "
            f"{row['nmse']:>7.4f} ± {row['nmse_sd']:.4f} {row['delta_ce']:>+8.4f} ± "
            f"{row['delta_ce_sd']:.4f}",
            file=stream,
        )
    print("most used experts and the characters they read most:", file=stream)
    for e in result["experts"]:
        shown = " ".join(repr(c) for c in e["top_characters"])
        print(f"  expert {e['expert']:>4} ({e['share']:.1%} of the mass): {shown}", file=stream)
