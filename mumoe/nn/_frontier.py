"""The sparsity–faithfulness frontier: MxD blocks against parameter-matched transcoders.

A :class:`Transcoder` (ReLU-top-k latents, a linear decoder) is the baseline
MxD is judged against: the same parameters, the same sparsity ``k``, trained
by the same loop (:func:`~mumoe.nn.distill`).  :func:`frontier` sweeps ``k``
(and the number of experts) over seeds, and records for each fit its
held-out NMSE and FVU, its L0 and, spliced into the model, its ΔCE.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mumoe.nn._block import MuMoEBlock
from mumoe.nn._convert import block_from_mlp
from mumoe.nn._distill import ActivationPairs, distill, fit_metrics
from mumoe.nn._gate import TORCH_KERNELS
from mumoe.nn._mlp import MLPParts
from mumoe.nn._splice import splice_report
from mumoe.validation import positive_int

__all__ = ["Transcoder", "frontier", "transcoder_width"]


class Transcoder(nn.Module):
    r"""A transcoder: :math:`y = W_d\, \operatorname{TopK}_k(\max(W_e x + b_e, 0)) + b_d`.

    The baseline of MxD (Dunefsky et al., 2024, with top-k latents as in the
    MxD paper): ``width`` latents of which each token keeps the ``k``
    largest rectified ones (:func:`mumoe.gates.relu_topk`'s rule).

    Parameters
    ----------
    in_features, width, out_features : int
    top_k : int
    device, dtype
        Of the parameters.

    Examples
    --------
    >>> tc = Transcoder(16, 64, 16, top_k=4)
    >>> y, (latents,) = tc(torch.randn(3, 16), return_gates=True)
    >>> y.shape, bool((torch.count_nonzero(latents, dim=-1) <= 4).all())
    (torch.Size([3, 16]), True)
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        out_features: int,
        *,
        top_k: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.top_k = positive_int(top_k, "top_k")
        self.encoder = nn.Linear(in_features, width, device=device, dtype=dtype)
        self.decoder = nn.Linear(width, out_features, device=device, dtype=dtype)
        self.in_features, self.width, self.out_features = in_features, width, out_features

    def forward(
        self, x: torch.Tensor, *, return_gates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The transcoder's output, and with ``return_gates`` its latents.

        Parameters
        ----------
        x : torch.Tensor, shape (..., I)
        return_gates : bool, default False

        Returns
        -------
        torch.Tensor, shape (..., O)
            And ``[latents]`` (``(..., width)``) with ``return_gates``.

        Examples
        --------
        >>> Transcoder(4, 8, 2, top_k=2)(torch.randn(5, 4)).shape
        torch.Size([5, 2])
        """
        latents = TORCH_KERNELS["relu_topk"](self.encoder(x), self.top_k)
        y = self.decoder(latents)
        return (y, [latents]) if return_gates else y


def transcoder_width(n_params: int, in_features: int, out_features: int) -> int:
    """The widest transcoder with at most ``n_params`` parameters.

    A transcoder of width :math:`W` has :math:`W (I + O + 1) + O` parameters.

    Parameters
    ----------
    n_params, in_features, out_features : int

    Returns
    -------
    int

    Raises
    ------
    ValueError
        If not even one latent fits.

    Examples
    --------
    >>> transcoder_width(37752562, 768, 768)  # MxD's GPT-2 block, N = 21,490
    24562
    """
    width = (n_params - out_features) // (in_features + out_features + 1)
    if width < 1:
        raise ValueError(f"no transcoder of {in_features} -> {out_features} fits {n_params}")
    return width


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def frontier(
    model: nn.Module,
    parts: MLPParts,
    train: Iterable[Any],
    test: Sequence[Any],
    *,
    ks: Sequence[int],
    expert_dims: int | Sequence[int],
    seeds: Sequence[int] = (0,),
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 256,
    buffer_size: int = 16384,
    block_kwargs: Mapping[str, Any] | None = None,
    from_scratch: bool = False,
) -> list[dict[str, Any]]:
    """Fit an MxD block and a parameter-matched transcoder for every ``k`` and seed.

    Each MxD block starts from the MLP (:func:`block_from_mlp`: a dense
    encoder and decoder from its layers, ReLU-top-k gating with a bias, the
    gate at random, ``gate_init="random"``, calibrated on the first batch of
    inputs so that the block starts near the MLP), each transcoder at random
    (as in the MxD paper: the comparison is of what each starts from too) with as many
    parameters or fewer (:func:`transcoder_width`); both are trained by
    :func:`distill` for ``steps`` on the MLP's pairs over ``train`` and
    measured on ``test``: NMSE, FVU and L0 on its pairs, ΔCE spliced in
    (:func:`splice_report`).

    Parameters
    ----------
    model : torch.nn.Module
        A language model whose batches hold ``input_ids`` (and an
        ``attention_mask``).
    parts : MLPParts
        The MLP (:func:`find_mlps`); a two-layer or gated one.
    train, test : iterables of batches
        ``test`` is iterated several times (a list).
    ks : sequence of int
        The sparsities.
    expert_dims : int or sequence of int
        The MxD decoder's experts.
    seeds : sequence of int, default (0,)
    steps, lr, batch_size, buffer_size
        Of the fits (:func:`distill`, :class:`ActivationPairs`).
    block_kwargs : mapping, optional
        More :func:`block_from_mlp` arguments.
    from_scratch : bool, default False
        Also fit an MxD block of the same form started at random (kind
        ``"mxd-scratch"``), as the MxD paper trains it: what the MLP's
        weights are worth as a start.

    Returns
    -------
    list of dict
        One per fit: ``kind`` ("mxd", "mxd-scratch" or "transcoder"), ``k``,
        ``experts`` (the MxD block's :math:`N`: call once per ``expert_dims`` to
        sweep it too), ``seed``,
        ``params``, ``nmse``, ``fvu``, ``l0``, ``delta_ce``, ``recovered``.

    Raises
    ------
    ValueError
        For a split MLP (splice it by hand), or no ``ks``.

    Examples
    --------
    >>> import transformers
    >>> from mumoe.nn import find_mlps
    >>> _ = torch.manual_seed(0)
    >>> config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40)
    >>> model = transformers.GPT2LMHeadModel(config).eval()
    >>> batches = [{"input_ids": torch.randint(0, 40, (4, 12))} for _ in range(3)]
    >>> records = frontier(model, find_mlps(model)[0], batches[:2], batches[2:], ks=[4],
    ...                    expert_dims=32, steps=5, batch_size=32, buffer_size=64)
    >>> [(r["kind"], r["k"], r["params"]) for r in records]
    [('mxd', 4, 3184), ('transcoder', 4, 3184)]
    """
    if parts.split is not None:
        raise ValueError("frontier takes a two-layer or gated MLP; a split MLP is spliced by hand")
    if not ks:
        raise ValueError("ks must name at least one sparsity")
    fc1, fc2 = model.get_submodule(parts.fc1), model.get_submodule(parts.fc2)
    up = None if parts.up is None else model.get_submodule(parts.up)
    pairs = ActivationPairs(
        model, train, inputs_of=parts.name, batch_size=batch_size, buffer_size=buffer_size
    )
    held_out = list(ActivationPairs(model, test, inputs_of=parts.name, batch_size=4096))
    options = {"normalization": None, "gate_bias": True, **(block_kwargs or {})}
    calibration = next(iter(pairs))[0]  # the MLP's inputs the random gate is scaled on
    records = []
    for k in ks:
        for seed in seeds:
            torch.manual_seed(seed)
            block = block_from_mlp(
                fc1,
                fc2,
                "mxd",
                expert_dims=expert_dims,
                up=up,
                hidden_activation=parts.activation,
                activation="relu_topk",
                top_k=k,
                gate_init="random",
                calibrate=calibration,
                **options,
            )
            n_params = _parameters(block)
            weight = next(block.parameters())
            torch.manual_seed(seed)
            transcoder = Transcoder(
                block.in_features,
                transcoder_width(n_params, block.in_features, block.out_features),
                block.out_features,
                top_k=k,
                device=weight.device,
                dtype=weight.dtype,
            )
            candidates: list[tuple[str, nn.Module]] = [("mxd", block)]
            if from_scratch:
                torch.manual_seed(seed)
                candidates.append(("mxd-scratch", _scratch(block)))
            candidates.append(("transcoder", transcoder))
            for kind, candidate in candidates:
                distill(candidate, pairs, steps=steps, lr=lr)
                candidate.eval()
                fits = []
                with torch.no_grad():
                    for x, y in held_out:
                        prediction, gates = candidate(x, return_gates=True)
                        fits.append(fit_metrics(prediction, y, gates) | {"rows": len(x)})
                report = splice_report(model, test, {parts.name: candidate})
                rows = sum(f["rows"] for f in fits)
                records.append(
                    {
                        "kind": kind,
                        "k": k,
                        "experts": block.fc2.network.n_experts,
                        "seed": seed,
                        "params": _parameters(candidate),
                        "nmse": sum(f["nmse"] * f["rows"] for f in fits) / rows,
                        "fvu": sum(f["fvu"] * f["rows"] for f in fits) / rows,
                        "l0": sum(f.get("l0", math.nan) * f["rows"] for f in fits) / rows,
                        "delta_ce": report.delta,
                        "recovered": report.recovered,
                    }
                )
    return records


def _scratch(block: MuMoEBlock) -> MuMoEBlock:
    # A block of the same form and sizes, every parameter at its own initialisation.
    gate = block.gate
    return MuMoEBlock(
        block.in_features,
        block.hidden_features,
        block.out_features,
        block.fc2.network.spec,
        expert_dims=block.fc2.network.expert_dims,
        bias=block.bias is not None or block.fc2.network.bias,
        encoder=block.encoder,
        hidden_activation=block.hidden_activation,
        glu=block.glu,
        output_bias=block.output_bias,
        normalization=gate.normalization,
        activation=gate.activation_name,
        top_k=gate.top_k,
        gate_bias=gate.biases is not None,
        device=gate.projections[0].device,
        dtype=gate.projections[0].dtype,
    )
