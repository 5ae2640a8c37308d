"""``mumoe.demo.run``: train every head for every seed, then report, write and draw."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from mumoe.demo import _figures as figures
from mumoe.demo._report import print_report
from mumoe.demo._results import DemoResult, HeadResult
from mumoe.demo._train import Job, Run, digits, train_head
from mumoe.spec import linear_params
from mumoe.validation import positive_int

__all__ = ["default_threads", "run"]

#: At most this many processes by default: more only help with more seeds.
MAX_DEFAULT_THREADS = 4


def default_threads() -> int:
    """The CPUs this process may use, at most ``MAX_DEFAULT_THREADS``."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(MAX_DEFAULT_THREADS, usable or 1))


def run(
    *,
    experts: Sequence[int] = (8, 32, 128, 512),
    network: str = "cp",
    budget: int = 8,
    epochs: int = 40,
    seeds: Sequence[int] = (0, 1, 2),
    edit_class: int | None = None,
    output: str | Path | None = "mumoe-demo",
    json_path: str | Path | None = None,
    progress: bool = True,
    stream: IO[str] | None = None,
    threads: int | None = None,
) -> DemoResult:
    """Train the heads over several seeds, measure their experts, edit, and draw.

    Parameters
    ----------
    experts : sequence of int, default (8, 32, 128, 512)
        Expert counts of the μMoE heads.
    network : {"cp", "tucker", "tt", "tr"}, default "cp"
        Their factorisation.
    budget : int, default 8
        Every head's experts get at most as many parameters as ``budget``
        linear classifiers (``budget * 650``); the rank is chosen by
        :func:`mumoe.spec.match_rank`.  The gate (``64 * N``) comes on top.
    epochs : int, default 40
    seeds : sequence of int, default (0, 1, 2)
        One run per seed; each seeds the split, the initialisation and the
        batches.  The report gives mean ± standard deviation over them.  The
        global torch RNG is left as it was.
    edit_class : int, optional
        The digit whose experts are switched off in the head with the most
        experts.  By default, for each seed, the digit whose tied experts
        carry the largest share of its gate mass
        (see ``EditResult.share``).
    output : path or None, default "mumoe-demo"
        Folder for the PNG figures (created); None draws none.
    json_path : path, optional
        Write :meth:`DemoResult.to_json` there (indented; identical for
        identical seeds and options, whatever ``threads``).
    progress : bool, default True
        Show a tqdm progress bar on stderr, where stderr is a terminal (a
        log file gets none).
    stream : text stream, optional
        Where the report is printed; standard output by default.
    threads : int, optional
        How many heads train at once, each in its own process with one torch
        thread; 1 trains them one after another in this process.  By default
        the usable CPUs, at most 4.  The models are tiny, so torch's intra-op
        threads only add synchronisation (a batch-norm step of the gate took
        48 ms with 2 threads on a busy 2-core machine, 46 µs with 1); and
        with one torch thread per head the numbers are the same whatever
        ``threads`` and the machine's core count.

    Returns
    -------
    DemoResult

    Examples
    --------
    >>> import io
    >>> report = io.StringIO()
    >>> result = run(experts=(4,), epochs=1, seeds=(0, 1), output=None, threads=1,
    ...              progress=False, stream=report)
    >>> report.getvalue().splitlines()[5].split()[:3]  # the table's header
    ['head', 'rank', 'experts+gate']
    >>> [(head.name, head.expert_params, head.accuracy.shape) for head in result.heads]
    [('linear', 650, (2,)), ('cp N=4', 5135, (2,))]
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    out = stream if stream is not None else sys.stdout
    experts, seeds, threads = _check(experts, seeds, epochs, edit_class, threads)
    budget = positive_int(budget, "budget")
    _check_paths(output, json_path)  # before minutes of training, not after
    settings = {
        "experts": experts,
        "network": network,
        "budget": budget,
        "epochs": epochs,
        "edit_class": edit_class,
    }
    folder = None if output is None else Path(output)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    largest, drawn = max(experts), {min(experts), max(experts)}
    jobs = [
        Job(
            seed,
            n,
            network,
            budget * linear_params(64, 10),
            epochs,
            edit=n == largest,
            edit_class=edit_class,
            keep_coefficients=folder is not None and seed == seeds[0] and n in drawn,
        )
        for n in sorted({0, *experts}, reverse=True)  # the slowest first: better packing
        for seed in seeds
    ]
    bar = tqdm(
        total=len(jobs),
        disable=None if progress else True,  # None: off where stderr is no terminal
        desc="training heads",
        unit="head",
        leave=False,
        file=sys.stderr,
    )
    with bar:
        runs = {(r.job.seed, r.job.n_experts): r for r in _train_all(jobs, threads, bar)}
    result = _assemble(runs, seeds, [0, *experts], settings, largest)
    print_report(result, out)
    if json_path is not None:
        path = Path(json_path)
        _write_atomically(path, json.dumps(result.to_json(), indent=2) + "\n")
        print(f"\nResults: {path}", file=out)
    if folder is not None:
        result.figures = _draw(result, runs, folder, seeds[0], sorted(drawn))
        print("Figures: " + ", ".join(str(f) for f in result.figures), file=out)
    elapsed = time.perf_counter() - started
    workers = min(threads, len(jobs))
    print(
        f"\nDone in {elapsed:.1f} s ({len(jobs)} heads trained in {workers} "
        f"process{'es' if workers > 1 else ''}, one torch thread each).",
        file=out,
    )
    return result


def _check(
    experts: Sequence[int],
    seeds: Sequence[int],
    epochs: int,
    edit_class: int | None,
    threads: int | None,
) -> tuple[list[int], list[int], int]:
    experts = _ints(experts, "experts")
    if not experts or any(n < 1 for n in experts):
        raise ValueError(f"experts must be positive expert counts, got {experts}")
    if len(set(experts)) != len(experts):
        raise ValueError(f"experts must be different expert counts, got {experts}")
    seeds = _ints(seeds, "seeds")
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be different non-negative integers, got {seeds}")
    if edit_class is not None and not 0 <= edit_class <= 9:
        raise ValueError(f"edit_class must be a digit 0-9, got {edit_class}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    threads = default_threads() if threads is None else positive_int(threads, "threads")
    return experts, seeds, threads


def _check_paths(output: str | Path | None, json_path: str | Path | None) -> None:
    """Refuse, before any training, an output folder or a JSON path that cannot be written."""
    if output is not None:
        folder = Path(output)
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ValueError(
                f"the output folder {str(folder)!r} cannot be made: {str(existing)!r} is a file"
            )
    if json_path is not None:
        path = Path(json_path)
        if path.is_dir():
            raise ValueError(f"the JSON path {str(path)!r} is a folder; name a file in it")
        if not path.parent.is_dir():
            raise ValueError(
                f"the JSON path {str(path)!r} is in {str(path.parent)!r}, which is not a folder "
                "that exists; make it first or name another path"
            )


def _write_atomically(path: Path, text: str) -> None:
    # A failed write leaves the old file, or none, never half of one.
    part = path.with_name(f".{path.name}.part")
    try:
        part.write_text(text, encoding="utf-8")
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _ints(values: Sequence[int], what: str) -> list[int]:
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a sequence of ints, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{what} must be a sequence of ints, got {values!r}")
        out.append(int(value))
    return out


def _train_all(jobs: list[Job], threads: int, bar: Any) -> Iterable[Run]:
    if threads == 1:
        for job in jobs:
            yield train_head(job)
            bar.update(1)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn, not fork: a forked child of a process that has used torch's OpenMP pool can hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(threads, len(jobs)), mp_context=context) as pool:
        for future in as_completed([pool.submit(train_head, job) for job in jobs]):
            yield future.result()
            bar.update(1)


def _assemble(
    runs: dict[tuple[int, int], Run],
    seeds: list[int],
    counts: list[int],
    settings: dict[str, Any],
    largest: int,
) -> DemoResult:
    heads = []
    for n in counts:
        per_seed = [runs[seed, n] for seed in seeds]
        first = per_seed[0]
        heads.append(
            HeadResult(
                "linear" if n == 0 else f"{settings['network']} N={n}",
                n,
                first.rank,
                first.expert_params,
                first.gate_params,
                np.array([r.accuracy for r in per_seed]),
                np.array([r.class_accuracy for r in per_seed]),
                np.array([r.polysemanticity for r in per_seed]),
                np.array([r.experts_counted for r in per_seed]),
                [r.histogram for r in per_seed if r.histogram is not None],
            )
        )
    edits = [runs[seed, largest].edit for seed in seeds]
    return DemoResult(seeds, heads, settings, largest, edits)


def _draw(
    result: DemoResult,
    runs: dict[tuple[int, int], Run],
    folder: Path,
    seed: int,
    drawn: list[int],
) -> list[Path]:
    _, _, y_train, y_test, images = digits(seed)
    labels = np.concatenate([y_train, y_test])
    paths = [figures.plot_trend(result, folder / "polysemanticity.png")]
    for n in drawn:
        coefficients = runs[seed, n].coefficients
        assert coefficients is not None  # kept by the job (keep_coefficients)
        paths.append(
            figures.plot_experts(
                coefficients, n, images, labels, folder / f"experts_N{n}.png", seed
            )
        )
    if any(e is not None for e in result.edits):
        paths.append(figures.plot_edit(result, folder / "edit.png"))
    return paths
