"""Summarise a benchmark JSON file as the Markdown tables of ``benchmarks/README.md``.

Usage::

    python -m benchmarks.report results.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _index(records: list[dict]) -> dict[str, dict[tuple[str, str], dict]]:
    by_config: dict[str, dict[tuple[str, str], dict]] = defaultdict(dict)
    for r in records:
        by_config[r["config"]][(r["table"], r["impl"])] = r
    return by_config


def _ratio(rows: dict, table: str, impl: str, base: str, key: str) -> str:
    a, b = rows.get((table, impl)), rows.get((table, base))
    if a is None or b is None:
        return "-"
    return f"{a[key] / b[key]:.2f}"


def summary(records: list[dict]) -> str:
    """One row per configuration: mumoe's ratios to the reference and to the limit."""
    lines = [
        "| configuration | rank | layer fwd / ref | layer f+b / ref | contraction fwd / limit "
        "| contraction f+b / limit | contraction f+b / ref order | saved memory / ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config, rows in _index(records).items():
        if rows.get(("layer", "mumoe"), {}).get("group") == "sweep":
            continue
        rank = rows[("layer", "mumoe")]["rank"]
        rank_text = ",".join(str(v) for v in rank.values())
        cells = [
            _ratio(rows, "layer", "mumoe", "reference", "forward_ms"),
            _ratio(rows, "layer", "mumoe", "reference", "forward_backward_ms"),
            _ratio(rows, "contraction", "mumoe", "limit", "forward_ms"),
            _ratio(rows, "contraction", "mumoe", "limit", "forward_backward_ms"),
            _ratio(rows, "contraction", "mumoe", "reference order", "forward_backward_ms"),
            _ratio(rows, "layer", "mumoe", "reference", "saved_mb"),
        ]
        lines.append(f"| {config} | {rank_text} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gates(records: list[dict]) -> str:
    """The gate (projection, norm, activation) and the activation alone, against softmax."""
    columns = [
        ("gate", "entmax-1.5"),
        ("gate", "entmax full sort"),
        ("activation", "entmax-1.5"),
        ("activation", "top-2"),
        ("activation", "top-32"),
    ]
    lines = [
        "| configuration | N | gate softmax f+b ms | "
        + " | ".join(f"{what} {name} / softmax (fwd, f+b)" for what, name in columns)
        + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for config, rows in _index(records).items():
        soft = {
            what: rows.get(("contraction", f"{what} softmax")) for what in ("gate", "activation")
        }
        if not soft["gate"]:
            continue
        cells = []
        for what, name in columns:
            row, base = rows.get(("contraction", f"{what} {name}")), soft[what]
            cells.append(
                "-"
                if row is None or base is None
                else f"{row['forward_ms'] / base['forward_ms']:.2f}, "
                f"{row['forward_backward_ms'] / base['forward_backward_ms']:.2f}"
            )
        n = "x".join(map(str, soft["gate"]["expert_dims"]))
        lines.append(
            f"| {config} | {n} | {soft['gate']['forward_backward_ms']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def sweep(records: list[dict]) -> str:
    """Time and memory against the number of experts (forward+backward, batch 256)."""
    rows = [r for r in records if r["group"] == "sweep" and r["table"] == "layer"]
    impls = ["mumoe", "dense soft MoE", "sparse top-2"]
    lines = [
        "| N | CP ms | CP MB | TR ms | TR MB | dense soft MoE ms | MB | sparse top-2 ms | MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_n: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        n = r["expert_dims"][0]
        name = r["impl"] if r["impl"] != "mumoe" else f"mumoe-{r['format']}"
        by_n[n][name] = r
    for n in sorted(by_n):
        cells = []
        for name in ["mumoe-cp", "mumoe-tr", *impls[1:]]:
            r = by_n[n].get(name)
            cells += (
                ["-", "-"]
                if r is None
                else [f"{r['forward_backward_ms']:.1f}", f"{r['saved_mb']:.0f}"]
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Print the summary tables of a JSON file written by ``python -m benchmarks``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    with open(args[0]) as f:
        records = json.load(f)["records"]
    print(summary(records), gates(records), sweep(records), sep="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
