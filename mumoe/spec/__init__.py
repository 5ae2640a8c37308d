r"""What the weight tensor is: specs, ranks, formats, networks, presets and budgets.

A spec names the legs of each core (``"n r, i r, o r"``); a
:class:`Network` is a spec with sizes, an immutable value that knows its core
shapes, parameter count and einsum equations.  The formats (dense, CP,
Tucker, TT, TR, TT-matrix, MxD, low-rank) are records of :data:`FORMATS`,
built by the presets for any number of expert levels, the input and output
split into legs or not (:func:`balanced_shape`); :class:`Budget` and
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
from mumoe.spec._parse import (
    INPUT,
    OUTPUT,
    ParsedSpec,
    is_expert_leg,
    is_input_leg,
    is_output_leg,
    is_role_leg,
    parse_spec,
)
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
    ttm,
    ttm_shapes,
    tucker,
)
from mumoe.spec._ranks import (
    validate_cp_rank,
    validate_tr_rank,
    validate_tt_rank,
    validate_tucker_rank,
)
from mumoe.spec._shapes import balanced_shape

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
    "balanced_shape",
    "build_network",
    "cp",
    "custom_init",
    "dense",
    "format_of",
    "gate_params",
    "is_expert_leg",
    "is_input_leg",
    "is_output_leg",
    "is_role_leg",
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
    "ttm",
    "ttm_shapes",
    "tucker",
    "validate_cp_rank",
    "validate_tr_rank",
    "validate_tt_rank",
    "validate_tucker_rank",
]
