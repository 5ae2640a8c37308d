r"""What the weight tensor is: specs, ranks, formats, networks, presets and budgets.

A spec names the legs of each core (``"n r, i r, o r"``); a
:class:`Network` is a spec with sizes, an immutable value that knows its core
shapes, parameter count and einsum equations.  The formats (dense, CP,
Tucker, TT, TR, MxD, low-rank) are records of :data:`FORMATS`, built for any
number of expert levels by the presets; :class:`Budget` and
:func:`match_rank` choose a rank for a parameter budget, and
:func:`build_network` turns a layer's arguments into its network.  Nothing
here knows arrays or contraction paths.
"""

from mumoe.spec._budget import (
    Budget,
    as_budget,
    gate_params,
    linear_params,
    match_rank,
    resolve_budget,
)
from mumoe.spec._build import build_network
from mumoe.spec._formats import (
    FORMATS,
    Constant,
    CoreInit,
    DiagonalSlices,
    Format,
    Normal,
    Uniform,
    custom_init,
    format_of,
)
from mumoe.spec._network import Network
from mumoe.spec._parse import INPUT, OUTPUT, ParsedSpec, is_expert_leg, parse_spec
from mumoe.spec._presets import (
    PRESETS,
    cp,
    dense,
    lowrank,
    mxd,
    preset,
    preset_format,
    tr,
    tt,
    tucker,
)
from mumoe.spec._ranks import (
    validate_cp_rank,
    validate_tr_rank,
    validate_tt_rank,
    validate_tucker_rank,
)

__all__ = [
    "FORMATS",
    "INPUT",
    "OUTPUT",
    "PRESETS",
    "Budget",
    "Constant",
    "CoreInit",
    "DiagonalSlices",
    "Format",
    "Network",
    "Normal",
    "ParsedSpec",
    "Uniform",
    "as_budget",
    "build_network",
    "cp",
    "custom_init",
    "dense",
    "format_of",
    "gate_params",
    "is_expert_leg",
    "linear_params",
    "lowrank",
    "match_rank",
    "mxd",
    "parse_spec",
    "preset",
    "preset_format",
    "resolve_budget",
    "tr",
    "tt",
    "tucker",
    "validate_cp_rank",
    "validate_tr_rank",
    "validate_tt_rank",
    "validate_tucker_rank",
]
