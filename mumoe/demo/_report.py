"""The text ``mumoe demo`` prints: every figure as mean ± standard deviation over the seeds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

import numpy as np

from mumoe.demo._results import DemoResult, mean_sd
from mumoe.demo._train import MIN_COUNT, THRESHOLD, TIED_SHARE

__all__ = ["print_report"]


def print_report(result: DemoResult, out: IO[str]) -> None:
    """Print the heads' table and the edit's table of ``result`` to ``out``."""
    seeds = result.seeds
    budget = result.settings["budget"]
    linear = result.heads[0]
    print(
        "μMoE heads on scikit-learn's digits (1,797 8x8 images, 10 classes; 450 held out, "
        "about 45 per digit).\n"
        f"Every head's experts have at most {budget * linear.expert_params:,} parameters (those "
        f"of {budget} linear heads); the gate (64 x N) comes on top.\n"
        f"Polysemanticity, over all 1,797 digits: mean over the experts that process >= "
        f"{MIN_COUNT} of them (gate coefficient >= {THRESHOLD}); 0 = one digit per expert.\n"
        f"{_over(seeds)}; 'vs linear' is the accuracy minus the linear head's, seed by seed.\n",
        file=out,
    )
    rows = [
        (
            "head",
            "rank",
            "experts+gate params",
            "test accuracy",
            "vs linear",
            "polysemanticity",
            "counted",
        )
    ]
    for h in result.heads:
        params = f"{h.expert_params:,}" + (f" + {h.gate_params:,}" if h.gate_params else "")
        moe = h.n_experts > 0
        rows.append(
            (
                h.name,
                str(h.rank) if moe else "-",
                params,
                _pm(h.accuracy, 3),
                _pm(h.accuracy - linear.accuracy, 3, sign=True) if moe else "-",
                _pm(h.polysemanticity, 3) if moe else "-",
                f"{_span(h.experts_counted)}/{h.n_experts}" if moe else "-",
            )
        )
    _table(rows, out)
    _print_edit(result, out)


def _print_edit(result: DemoResult, out: IO[str]) -> None:
    edits = [e for e in result.edits if e is not None]
    n = result.edit_experts
    if not edits:
        print(f"\nNo expert of the N={n} heads is tied to one digit: no edit.", file=out)
        return
    chosen = (
        f"digit {result.settings['edit_class']}"
        if result.settings.get("edit_class") is not None
        else "the digit whose tied experts carry the largest share of its gate mass"
    )
    print(
        f"\nEdit: in each seed's N={n} head, switch off the experts that get >= "
        f"{TIED_SHARE:.0%} of their gate mass from one digit: {chosen}.",
        file=out,
    )
    rows = [
        (
            "seed",
            "digit",
            "experts",
            "share",
            "accuracy on the digit",
            "mean accuracy on the others",
        )
    ]
    for seed, edit in zip(result.seeds, result.edits, strict=True):
        if edit is None:
            rows.append((str(seed), "-", "0", "-", "no expert tied to a digit", "-"))
            continue
        others = np.delete(np.arange(10), edit.digit)
        rows.append(
            (
                str(seed),
                str(edit.digit),
                str(len(edit.experts)),
                f"{edit.share:.2f}",
                f"{edit.before[edit.digit]:.2f} -> {edit.after[edit.digit]:.2f}",
                f"{edit.before[others].mean():.3f} -> {edit.after[others].mean():.3f}",
            )
        )
    _table(rows, out, indent="  ")
    on_digit = _pm([e.change_on_digit for e in edits], 3, sign=True)
    on_others = _pm([e.change_on_others for e in edits], 3, sign=True)
    print(
        f"  Change of accuracy on the edited digit: {on_digit}; on the others: {on_others}\n"
        f"  ({_over([e.seed for e in edits]).lower()}).",
        file=out,
    )


def _over(seeds: Sequence[int]) -> str:
    listed = ", ".join(str(s) for s in seeds)
    if len(seeds) == 1:
        return f"One seed ({listed}): no spread is shown"
    return f"Mean ± standard deviation over {len(seeds)} seeds ({listed})"


def _pm(values: Sequence[float] | np.ndarray, digits: int, sign: bool = False) -> str:
    mean, sd = mean_sd(values)
    if np.isnan(mean):
        return "-"
    mean = round(mean, digits) or 0.0  # no "-0.000"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if len(values) == 1 else f"{text} ± {sd:.{digits}f}"


def _span(values: np.ndarray) -> str:
    low, high = int(np.min(values)), int(np.max(values))
    return str(low) if low == high else f"{low}-{high}"


def _table(rows: Sequence[tuple[str, ...]], out: IO[str], indent: str = "") -> None:
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for k, row in enumerate(rows):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        print(indent + line, file=out)
        if k == 0:
            print(indent + "  ".join("-" * w for w in widths), file=out)
