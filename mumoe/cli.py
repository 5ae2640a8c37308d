"""The ``mumoe`` command line: ``mumoe demo``, ``mumoe backends``, ``mumoe describe``.

Run ``mumoe --help`` (or ``python -m mumoe --help``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from typing import Any

from mumoe.backends import declared_backends, unavailable_reason
from mumoe.plan import PlanTooLargeError, describe
from mumoe.spec import FORMATS, Budget, build_network

__all__ = ["main"]


def _backends(_: argparse.Namespace) -> int:
    rows = [("backend", "usable here", "install", "device", "autograd", "dtypes tested")]
    for backend in declared_backends():
        reason = unavailable_reason(backend)
        extra = f"mumoe[{backend.extra}]" if backend.extra else "(core)"
        rows.append(
            (
                backend.name,
                "yes" if reason is None else f"no: {reason}",
                extra,
                backend.device,
                "yes" if backend.differentiable else "no",
                ", ".join(backend.dtypes),
            )
        )
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    for backend in declared_backends():
        if backend.note:
            print(f"\n{backend.name}: {backend.note}")
    print("\nChoose one with tensorly.set_backend(name); mumoe never switches it for you.")
    return 0


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise TypeError(f"{what} must be an int, got {text!r}") from None


def _rank(values: Sequence[str] | None) -> Any:
    # "--rank 8", "--rank 2 3 4", "--rank a=2 b=3", or a budget: "--rank same", "--rank 0.5".
    if not values:
        return None
    if len(values) == 1 and values[0] == "same":
        return "same"
    if len(values) == 1 and "." in values[0]:
        try:
            fraction = float(values[0])
        except ValueError:
            raise TypeError(f"--rank must be numbers, got {values[0]!r}") from None
        return Budget(fraction)
    if all("=" in v for v in values):
        pairs = (v.split("=", 1) for v in values)
        return {name: _int(size, f"--rank {name}") for name, size in pairs}
    numbers = [_int(v, "--rank") for v in values]
    return numbers[0] if len(numbers) == 1 else tuple(numbers)


def _describe(args: argparse.Namespace) -> int:
    dims = args.expert_dims
    if dims is None:
        raise ValueError("mumoe describe needs --expert-dims (experts per level, e.g. 32 4)")
    net = build_network(
        args.in_features,
        args.out_features,
        args.network,
        expert_dims=dims[0] if len(dims) == 1 else tuple(dims),
        rank=_rank(args.rank),
        bias=not args.no_bias,
        in_shape=args.in_shape,
        out_shape=args.out_shape,
    )
    support = None
    if args.support:
        support = args.support[0] if len(args.support) == 1 else tuple(args.support)
    print(
        describe(
            net,
            batch_size=args.batch,
            support=support,
            backend=args.backend,
            training=args.training,
        )
    )
    return 0


#: ``mumoe demo --fast``: a smoke run (the test suite's).
FAST_EXPERTS, FAST_EPOCHS = [4, 16], 3


#: The digits demo's own options (and their defaults), refused by ``mumoe demo lm``.
DIGITS_ONLY = ("experts", "network", "budget", "epochs", "edit_class", "threads")
DIGITS_DEFAULTS = {"network": "cp", "budget": 8}


def _demo(args: argparse.Namespace) -> int:
    if args.task == "lm":
        return _demo_lm(args)
    missing = [m for m in ("torch", "sklearn", "matplotlib", "tqdm") if find_spec(m) is None]
    if missing:
        raise ValueError(
            f"mumoe demo needs {', '.join(missing)}: pip install torch==2.13.0 "
            "(or another torch build) and pip install 'mumoe[torch,demo]'"
        )
    from mumoe.demo import run

    seeds = args.seeds
    experts = args.experts or (FAST_EXPERTS if args.fast else [8, 32, 128, 512])
    epochs = args.epochs if args.epochs is not None else (FAST_EPOCHS if args.fast else 40)
    run(
        experts=experts,
        network=args.network,
        budget=args.budget,
        epochs=epochs,
        seeds=seeds,
        edit_class=args.edit_class,
        output=args.output or "mumoe-demo",
        json_path=args.json,
        progress=not args.no_progress,
        threads=args.threads,
    )
    return 0


def _demo_lm(args: argparse.Namespace) -> int:
    given = [
        "--" + name.replace("_", "-")
        for name in DIGITS_ONLY
        if getattr(args, name) not in (None, DIGITS_DEFAULTS.get(name))
    ]
    if given:
        raise ValueError(f"{', '.join(given)} are options of the digits demo, not of 'lm'")
    missing = [m for m in ("torch", "transformers", "matplotlib") if find_spec(m) is None]
    if missing:
        raise ValueError(
            f"mumoe demo lm needs {', '.join(missing)}: pip install torch==2.13.0 "
            "(or another torch build) and pip install 'mumoe[torch,demo,models]'"
        )
    from mumoe.demo import run_lm

    run_lm(
        seeds=args.seeds,
        fast=args.fast,
        output=args.output or "mumoe-demo-lm",
        json_path=args.json,
    )
    return 0


def _positive(text: str) -> int:
    """A positive integer argument (``--budget``, ``--epochs``, ``--experts``, ...)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: a comma-separated list of non-negative integers."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 0,1,2, got {text!r}"
        ) from None
    return seeds


DEMO_EPILOG = """\
--json PATH writes what the report shows, per seed, as one JSON object:
  {"version": 1, "seeds": [0, 1, 2],
   "settings": {"experts", "network", "budget", "epochs", "edit_class"},
   "heads": [{"name": "linear" or "cp N=8", "experts": int (null for the linear head),
              "rank", "expert_params", "gate_params",
              "accuracy": [one per seed], "class_accuracy": [per seed, 10 digits],
              "polysemanticity": [one per seed] (null for the linear head),
              "experts_counted": [one per seed] (null for the linear head)}, ...],
   "edit": {"experts": N of the edited head, and one entry per seed (null where no
            expert is tied to a digit) of "digit", "experts_switched_off", "share",
            "accuracy_before", "accuracy_after", "change_on_digit", "change_on_others"}}
It holds no wall time or thread count: the same seeds and options give the same file.

mumoe demo lm --json PATH writes {"corpus", "model", "mlp", "starts", "exact_start",
"frontier": [one entry per kind, k and seed: "params", "nmse", "fvu", "l0", "delta_ce",
"recovered"], "summary": [mean and sd over the seeds per kind and k], "experts", "seeds",
"fast"}; it takes --seeds, --output, --json and --fast, and needs transformers.
"""


def _version() -> str:
    # The installed distribution's version, which hatch reads from mumoe.__version__.
    try:
        return importlib.metadata.version("mumoe")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mumoe`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        The exit status: 0, or 2 for bad arguments (the reason on stderr).

    Examples
    --------
    >>> main(["describe", "cp", "--expert-dims", "8", "--in-features", "4",
    ...       "--out-features", "2", "--rank", "3"])  # doctest: +ELLIPSIS
    Network 'cp': 1 expert level, 8 experts, with bias
    ...
    0
    """
    parser = argparse.ArgumentParser(
        prog="mumoe", description="Multilinear Mixture-of-Experts layers as tensor networks."
    )
    parser.add_argument("--version", action="version", version=f"mumoe {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train μMoE heads on scikit-learn's digits and show their experts specialise",
        description="Train a linear classifier and μMoE heads with more and more experts on "
        "scikit-learn's bundled digits (CPU, no download) for several seeds, print accuracy "
        "and class-level polysemanticity per expert count as mean ± standard deviation over "
        "the seeds, switch off the experts of one digit, and write PNG figures.",
    )
    demo.add_argument(
        "task",
        nargs="?",
        default="digits",
        choices=["digits", "lm"],
        help="digits (default): μMoE heads on scikit-learn's digits; lm: a character-level "
        "GPT-2 trained on Python's own help topics, its last MLP decomposed into MxD experts "
        "against parameter-matched transcoders",
    )
    demo.add_argument(
        "--experts",
        type=_positive,
        nargs="+",
        metavar="N",
        help="expert counts of the heads (default: 8 32 128 512)",
    )
    demo.add_argument(
        "--network",
        default="cp",
        choices=["cp", "tucker", "tt", "tr"],
        help="factorisation of the heads (default: cp)",
    )
    demo.add_argument(
        "--budget",
        type=_positive,
        default=8,
        help="expert parameters, in linear classifiers (default: 8)",
    )
    demo.add_argument("--epochs", type=_positive, help="training epochs per head (default: 40)")
    demo.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        metavar="S,S,...",
        help="seeds of the split, init and batches, one run each (default: 0,1,2)",
    )
    demo.add_argument(
        "--edit-class",
        type=int,
        metavar="DIGIT",
        help="digit whose experts to switch off (default, per seed: the digit "
        "whose tied experts carry the largest share of its gate mass)",
    )
    demo.add_argument(
        "--output",
        help="folder for the figures (default: ./mumoe-demo, ./mumoe-demo-lm for lm)",
    )
    demo.add_argument("--json", metavar="PATH", help="write the results there (see below)")
    demo.add_argument(
        "--fast", action="store_true", help="a smoke run: experts 4 16, 3 epochs (unless given)"
    )
    demo.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (there is none where stderr is not a terminal)",
    )
    demo.add_argument(
        "--threads",
        type=_positive,
        help="heads trained at once, each in its own process with ONE torch "
        "thread (default: the usable CPUs, at most 4). The models are tiny: "
        "torch's intra-op threads would only add synchronisation, and would make "
        "the numbers depend on the thread count; these do not.",
    )
    demo.set_defaults(run=_demo)
    backends = commands.add_parser("backends", help="the array backends and which are usable here")
    backends.set_defaults(run=_backends)
    describe = commands.add_parser(
        "describe", help="a network's cores, parameters, contraction path and FLOPs"
    )
    describe.add_argument(
        "network", help=f"a format ({', '.join(FORMATS)}) or a spec string such as 'n r, i r, o r'"
    )
    describe.add_argument(
        "--expert-dims",
        type=int,
        nargs="+",
        metavar="N",
        help="experts per level, e.g. --expert-dims 32 4",
    )
    describe.add_argument("--in-features", type=int, required=True)
    describe.add_argument("--out-features", type=int, required=True)
    for role in ("in", "out"):
        describe.add_argument(
            f"--{role}-shape",
            type=int,
            nargs="+",
            metavar="SIZE",
            help=f"split the {role}put into legs of these sizes, e.g. --{role}-shape 32 24",
        )
    describe.add_argument(
        "--rank",
        nargs="*",
        help="one rank, one per bond, NAME=SIZE pairs, or a budget: "
        "'same' or a fraction such as 0.5 (formats only)",
    )
    describe.add_argument(
        "--batch", type=_positive, default=1, help="batch size of the path and FLOPs (default: 1)"
    )
    describe.add_argument("--no-bias", action="store_true", help="experts without a bias")
    describe.add_argument(
        "--support",
        type=_positive,
        nargs="+",
        metavar="K",
        help="entries a row of each level's support (a top-k gate's k): say which levels a "
        "call given such sparse gates contracts sparsely, and why",
    )
    describe.add_argument(
        "--backend",
        default="numpy",
        help="the backend whose sparse crossover applies (default: numpy)",
    )
    describe.add_argument(
        "--training",
        action="store_true",
        help="with --support: gradients flow to the cores (another crossover)",
    )
    describe.set_defaults(run=_describe)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, TypeError, PlanTooLargeError) as error:
        print(f"mumoe {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader left (``mumoe describe ... | head``): no traceback. Point stdout at
        # devnull so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
