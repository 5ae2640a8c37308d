"""The implementations the benchmarks compare, built for one configuration.

Every implementation shares the parameters of one mumoe layer, so they all
compute the same numbers (checked before timing, see ``run.py``):

contraction (the gates given)
    ``mumoe``                  the layer called with gates;
    ``reference order``        the paper's code's fixed sequence of einops
                               einsums after concatenating a ones column
                               (CP and TR, one or two expert levels);
    ``torch.einsum``           one call of the whole equation;
    ``opt_einsum optimal``     a FLOP-optimal ``contract_expression``,
                               built once;
    ``tensorly plugin``        ``tl.einsum`` with ``plugins.use_opt_einsum``;
    ``limit``                  the best hand-written sequence of matrix
                               multiplies for the format, bias by ``addmm``.

layer (the gate computed from the input)
    ``mumoe``, ``mumoe softmax gate``, ``reference``, ``dense soft MoE``
    (materialised W), ``sparse top-1`` / ``top-2`` MoE (a dense W per expert,
    tokens dispatched to their experts), ``nn.Linear``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import einops
import opt_einsum
import tensorly as tl
import torch
from entmax import entmax15
from tensorly import plugins

from benchmarks.configs import Config
from mumoe.backends import thread_backend
from mumoe.nn import TORCH_KERNELS, MuMoE, torch_gate_coefficients

Fn = Callable[[], torch.Tensor]

#: Above this many bytes a dense weight tensor is not built (dense and sparse MoE skipped).
DENSE_LIMIT_BYTES = 1_500_000_000


@dataclass
class Setup:
    """A layer, its input and gates, shared by every implementation."""

    config: Config
    layer: MuMoE
    x: torch.Tensor  # batch_shape + (I,)
    gates: list[torch.Tensor]  # batch_shape + (N_e,)

    @classmethod
    def build(cls, config: Config, seed: int = 0) -> Setup:
        """A layer with informative gates, an input and its gates, for ``config``."""
        torch.manual_seed(seed)
        layer = MuMoE(
            config.in_features,
            config.out_features,
            config.format,
            expert_dims=config.expert_dims,
            rank=config.resolved_rank(),
            normalization=config.normalization,
        )
        with torch.no_grad():  # informative gates, as after some training
            for projection in layer.gate.projections:
                projection.normal_(0, 1 / math.sqrt(config.in_features))
        x = torch.randn(*config.batch_shape, config.in_features)
        with torch.no_grad():
            gates = [g.detach() for g in layer.gate.eval()(x)]
        return cls(config, layer, x, gates)

    @property
    def cores(self) -> list[torch.Tensor]:
        """The layer's cores."""
        return list(self.layer.cores)

    def tokens(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input and gates as (b, t, ...), the reference code's layout."""
        b = self.config.batch_shape
        shape = (b[0], 1) if len(b) == 1 else (b[0], math.prod(b[1:]))
        x = self.x.reshape(*shape, -1)
        return x, [g.reshape(*shape, -1) for g in self.gates]

    def rows(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input and gates flattened to (rows, ...)."""
        n = self.config.rows
        return self.x.reshape(n, -1), [g.reshape(n, -1) for g in self.gates]


def _ones_column(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z, torch.ones(*z.shape[:-1], 1, dtype=z.dtype, device=z.device)], dim=-1)


# ------------------------------------------------------------ reference order


def reference_contraction(fmt: str, levels: int) -> Callable | None:
    """The paper's code's contraction order, in einops, or None where it has none."""
    if fmt == "cp" and levels in (1, 2):

        def cp(z: torch.Tensor, a: list[torch.Tensor], factors: list[torch.Tensor]) -> torch.Tensor:
            z = _ones_column(z)
            pieces = [einops.einsum(a[e], factors[e], "b t n, n r -> b t r") for e in range(levels)]
            pieces.append(einops.einsum(z, factors[levels], "b t i, i r -> b t r"))
            if levels == 1:
                return einops.einsum(*pieces, factors[-1], "b t r, b t r, o r -> b t o")
            return einops.einsum(*pieces, factors[-1], "b t r, b t r, b t r, o r -> b t o")

        return cp
    if fmt == "tr" and levels in (1, 2):

        def tr(z: torch.Tensor, a: list[torch.Tensor], factors: list[torch.Tensor]) -> torch.Tensor:
            z = _ones_column(z)
            train = einops.einsum(a[0], factors[0], "b t x, r1 x r2 -> b t r1 r2")
            if levels == 2:
                second = einops.einsum(a[1], factors[1], "b t x, r2 x r3 -> b t r2 r3")
                train = einops.einsum(train, second, "b t r1 r2, b t r2 r3 -> b t r1 r3")
            inp = einops.einsum(z, factors[levels], "b t x, r2 x r3 -> b t r2 r3")
            train = einops.einsum(inp, train, "b t r2 r3, b t r1 r2 -> b t r1 r3")
            return einops.einsum(factors[-1], train, "r3 o r1, b t r1 r3 -> b t o")

        return tr
    return None


def reference_gate(layer: MuMoE, x: torch.Tensor) -> list[torch.Tensor]:
    """The reference's gating on (b, t, i): x @ G, batch norm over (b, n, t), entmax-1.5."""
    gates = []
    for projection, norm in zip(layer.gate.projections, layer.gate.norms, strict=True):
        logits = x @ projection
        if isinstance(norm, torch.nn.BatchNorm1d):
            logits = einops.rearrange(
                norm(einops.rearrange(logits, "b t n -> b n t")), "b n t -> b t n"
            )
        else:
            logits = norm(logits)
        gates.append(entmax15(logits, dim=-1))
    return gates


# ------------------------------------------------------------------ the limit


def limit_contraction(fmt: str, network: object) -> Callable:
    """The best hand-written sequence of GEMMs: rows-major, bias by addmm, no ones column."""
    n_in = network.in_features  # type: ignore[attr-defined]
    levels = network.n_levels  # type: ignore[attr-defined]

    def input_matrix(x: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
        # x (rows, I), core (..., I+1, ...) with the i leg at axis `axis`: x @ core + bias.
        return torch.addmm(core[n_in], x, core[:n_in])

    if fmt == "cp":

        def cp(x: torch.Tensor, a: list[torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
            h = input_matrix(x, c[levels])
            for e in range(levels):
                h = h * (a[e] @ c[e])
            return h @ c[-1].T

        return cp

    if fmt == "tr":

        def tr(x: torch.Tensor, a: list[torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
            rows = x.shape[0]
            train = None
            for e in range(levels):
                r0, n, r1 = c[e].shape
                t = (a[e] @ c[e].permute(1, 0, 2).reshape(n, r0 * r1)).view(rows, r0, r1)
                train = t if train is None else torch.bmm(train, t)
            r1, _, r2 = c[levels].shape
            core = c[levels].permute(1, 0, 2).reshape(-1, r1 * r2)
            t = input_matrix(x, core).view(rows, r1, r2)
            train = torch.bmm(train, t)  # (rows, r0, r2)
            r2, o, r0 = c[-1].shape
            return train.reshape(rows, r0 * r2) @ c[-1].permute(2, 0, 1).reshape(r0 * r2, o)

        return tr

    if fmt == "tt":

        def tt(x: torch.Tensor, a: list[torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
            rows = x.shape[0]
            v = a[0] @ c[0]  # (rows, r1)
            for e in range(1, levels):
                r0, n, r1 = c[e].shape
                t = (a[e] @ c[e].permute(1, 0, 2).reshape(n, r0 * r1)).view(rows, r0, r1)
                v = torch.bmm(v.unsqueeze(1), t).squeeze(1)
            r1, _, r2 = c[levels].shape
            core = c[levels].permute(1, 0, 2).reshape(-1, r1 * r2)
            t = input_matrix(x, core).view(rows, r1, r2)
            v = torch.bmm(v.unsqueeze(1), t).squeeze(1)
            return v @ c[-1]

        return tt

    if fmt == "mxd":

        def mxd(x: torch.Tensor, a: list[torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
            h = input_matrix(x, c[levels])  # z @ D[:I] + D[I]
            for e in range(levels):
                h = h * (a[e] @ c[e])  # (a @ C) * (z @ D + d)
            return h

        return mxd

    if fmt == "tucker":

        def tucker(x: torch.Tensor, a: list[torch.Tensor], c: list[torch.Tensor]) -> torch.Tensor:
            rows = x.shape[0]
            h = input_matrix(x, c[levels])  # (rows, R_i)
            for e in reversed(range(levels)):
                p = a[e] @ c[e]
                h = (p.unsqueeze(2) * h.unsqueeze(1)).reshape(rows, -1)
            core = c[-1].reshape(h.shape[1], -1)  # (R_1..R_E R_i, R_o)
            return (h @ core) @ c[levels + 1].T

        return tucker

    raise ValueError(f"no hand-written limit for {fmt}")


# ---------------------------------------------------------------- baselines


def dense_weight_bytes(config: Config) -> int:
    """Bytes of the materialised float32 weight tensor of ``config``."""
    return math.prod(config.expert_dims) * (config.in_features + 1) * config.out_features * 4


class DenseSoftMoE(torch.nn.Module):
    """Soft MoE over a materialised W: y = sum_n a_n (x W_n + b_n), one expert level."""

    def __init__(self, layer: MuMoE) -> None:
        super().__init__()
        self.gate = layer.gate
        self.weight = torch.nn.Parameter(layer.materialize().detach().flatten(0, -3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gate, then mix the materialised experts: ``(..., I) -> (..., O)``."""
        rows = x.reshape(-1, x.shape[-1])
        gates = self.gate(rows)
        a = gates[0]
        for g in gates[1:]:
            a = (a.unsqueeze(-1) * g.unsqueeze(-2)).flatten(-2)
        z = (a.unsqueeze(-1) * _ones_column(rows).unsqueeze(1)).flatten(1)
        return (z @ self.weight.flatten(0, 1)).reshape(*x.shape[:-1], -1)


class SparseMoE(torch.nn.Module):
    """Top-k MoE: softmax over the logits, k experts per row, rows dispatched per expert."""

    def __init__(self, layer: MuMoE, k: int) -> None:
        super().__init__()
        self.k = k
        n = math.prod(layer.network.expert_dims)
        self.router = torch.nn.Parameter(torch.randn(layer.in_features, n) / layer.in_features**0.5)
        self.weight = torch.nn.Parameter(layer.materialize().detach().flatten(0, -3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route each row to its top-k experts: ``(..., I) -> (..., O)``."""
        rows = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(rows @ self.router, dim=-1)
        top, experts = probs.topk(self.k, dim=-1)
        top = top / top.sum(-1, keepdim=True)
        z = _ones_column(rows)
        out = torch.zeros(rows.shape[0], self.weight.shape[-1], dtype=x.dtype)
        flat_experts, flat_rows = (
            experts.flatten(),
            torch.arange(rows.shape[0]).repeat_interleave(self.k),
        )
        flat_weights = top.flatten()
        order = flat_experts.argsort()
        counts = torch.bincount(flat_experts, minlength=self.weight.shape[0]).tolist()
        # unbind: one gradient buffer for all experts, not one per indexing
        weights = self.weight.unbind(0)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                idx = order[start : start + count]
                r = flat_rows[idx]
                y = (z[r] @ weights[expert]) * flat_weights[idx].unsqueeze(-1)
                out = out.index_add(0, r, y)
                start += count
        return out.reshape(*x.shape[:-1], -1)


# ------------------------------------------------------------- the two tables


def contraction_impls(setup: Setup) -> dict[str, Fn]:
    """Implementations of the contraction alone, gates given; each returns (rows, O)."""
    config, layer = setup.config, setup.layer
    network = layer.network
    cores = setup.cores
    x_rows, a_rows = setup.rows()
    x_tok, a_tok = setup.tokens()
    impls: dict[str, Fn] = {}

    impls["mumoe"] = lambda: layer(x_rows, a_rows)

    reference = reference_contraction(config.format, network.n_levels)
    if reference is not None:
        impls["reference order"] = lambda: reference(x_tok, a_tok, cores).reshape(config.rows, -1)

    equation = network.einsum_equation
    impls["torch.einsum"] = lambda: torch.einsum(equation, *a_rows, _ones_column(x_rows), *cores)

    shapes = [tuple(a.shape) for a in a_rows]
    shapes += [(config.rows, network.sizes["i"]), *network.core_shapes]
    optimal = opt_einsum.contract_expression(equation, *shapes, optimize="optimal")
    impls["opt_einsum optimal"] = lambda: optimal(*a_rows, _ones_column(x_rows), *cores)

    def tensorly_plugin() -> torch.Tensor:
        with thread_backend("pytorch"):
            return tl.einsum(equation, *a_rows, _ones_column(x_rows), *cores)

    impls["tensorly plugin"] = tensorly_plugin

    limit = limit_contraction(config.format, network)
    impls["limit"] = lambda: limit(x_rows, a_rows, cores)

    # The gate beside the contraction: projection, normalisation, activation.
    gate = layer.gate

    def gate_with(activation: Callable[[torch.Tensor], torch.Tensor]) -> Fn:
        def run() -> torch.Tensor:
            coefficients = torch_gate_coefficients(
                x_rows, list(gate.projections), list(gate.norms), activation
            )
            return torch.cat([a.reshape(-1) for a in coefficients])

        return run

    impls["gate entmax-1.5"] = gate_with(TORCH_KERNELS["entmax15"])
    impls["gate entmax full sort"] = gate_with(lambda t: entmax15(t, dim=-1))
    impls["gate softmax"] = gate_with(TORCH_KERNELS["softmax"])
    for k in TOP_K:
        impls[f"gate top-{k}"] = gate_with(functools.partial(TORCH_KERNELS["topk"], k=k))

    # The activation alone, on the normalised logits (the projection dominates the gate at
    # large N and hides the activation's own cost).
    generator = torch.Generator().manual_seed(0)
    logits = [
        torch.randn(config.rows, n, generator=generator, dtype=x_rows.dtype).requires_grad_()
        for n in config.expert_dims
    ]

    def alone(activation: Callable[[torch.Tensor], torch.Tensor]) -> Fn:
        return lambda: torch.cat([activation(z).reshape(-1) for z in logits])

    impls["activation softmax"] = alone(TORCH_KERNELS["softmax"])
    impls["activation entmax-1.5"] = alone(TORCH_KERNELS["entmax15"])
    for k in TOP_K:
        impls[f"activation top-{k}"] = alone(functools.partial(TORCH_KERNELS["topk"], k=k))
    return impls


#: The k of the top-k gate rows: a sparse MoE's 2 and MxD's 32.
TOP_K = (2, 32)


def layer_impls(setup: Setup) -> dict[str, Fn]:
    """Whole layers, gate included; each returns batch_shape + (O,)."""
    config, layer = setup.config, setup.layer
    impls: dict[str, Fn] = {"mumoe": lambda: layer(setup.x)}

    softmax = MuMoE(
        config.in_features,
        config.out_features,
        layer.network,
        activation="softmax",
        normalization=config.normalization,
    )
    softmax.load_state_dict(layer.state_dict())
    impls["mumoe softmax gate"] = lambda: softmax(setup.x)

    reference = reference_contraction(config.format, layer.network.n_levels)
    if reference is not None:
        x_tok, _ = setup.tokens()
        cores = setup.cores

        def reference_layer() -> torch.Tensor:
            return reference(x_tok, reference_gate(layer, x_tok), cores).reshape(
                *config.batch_shape, -1
            )

        impls["reference"] = reference_layer

    if config.baselines and dense_weight_bytes(config) <= DENSE_LIMIT_BYTES:
        dense = DenseSoftMoE(layer)
        impls["dense soft MoE"] = lambda: dense(setup.x)
        for k in (1, 2):
            sparse = SparseMoE(layer, k)
            impls[f"sparse top-{k}"] = lambda sparse=sparse: sparse(setup.x)
    linear = torch.nn.Linear(config.in_features, config.out_features)
    impls["nn.Linear"] = lambda: linear(setup.x)
    return impls


__all__ = [
    "DENSE_LIMIT_BYTES",
    "DenseSoftMoE",
    "Setup",
    "SparseMoE",
    "contraction_impls",
    "dense_weight_bytes",
    "layer_impls",
    "limit_contraction",
    "plugins",
    "reference_contraction",
    "reference_gate",
]
