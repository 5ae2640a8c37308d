"""The configurations the benchmarks time: the paper's, a tiny one, and a scaling sweep."""

from __future__ import annotations

from dataclasses import dataclass

from mumoe.spec import FORMATS, match_rank


@dataclass(frozen=True)
class Config:
    """One layer shape to time.

    ``rank`` is the preset's rank; ``None`` means matched to ``nn.Linear``'s
    parameter count with the gate projections counted, as in the paper.
    """

    name: str
    format: str
    in_features: int
    out_features: int
    expert_dims: tuple[int, ...]
    batch_shape: tuple[int, ...]
    rank: object = None
    group: str = "paper"
    #: Of the gate logits; batch norm cannot train on a batch of one row.
    normalization: str = "bn"
    #: Time the dense and sparse MoE baselines too (slow: seconds per call).
    baselines: bool = False

    def resolved_rank(self) -> object:
        """The rank to build the layer with (matched to ``nn.Linear`` when ``rank`` is None)."""
        if self.rank is not None or not FORMATS[self.format].has_rank:
            return self.rank
        return match_rank(
            self.format, self.in_features, self.out_features, expert_dims=self.expert_dims
        )

    @property
    def rows(self) -> int:
        """The number of rows once the batch dimensions are flattened."""
        rows = 1
        for d in self.batch_shape:
            rows *= d
        return rows


def paper_configs() -> list[Config]:
    """The configurations of the paper's experiments, ranks matched to the linear layer."""
    configs = []
    for fmt in ("cp", "tr"):
        for n in (32, 128, 512):
            for batch in (8, 256):
                baselines = batch == 256 and n <= 128
                configs.append(
                    Config(
                        f"clip-{fmt}-N{n}-b{batch}",
                        fmt,
                        768,
                        1000,
                        (n,),
                        (batch,),
                        baselines=baselines,
                    )
                )
        configs.append(Config(f"clip-{fmt}-N32x4-b256-h2", fmt, 768, 1000, (32, 4), (256,)))
        configs.append(Config(f"gpt2-mlp-{fmt}-N256", fmt, 768, 3072, (256,), (2, 1024)))
        configs.append(Config(f"mixer-channel-{fmt}-N64", fmt, 512, 2048, (64,), (16, 256)))
    for fmt in ("tucker", "tt"):
        configs.append(Config(f"clip-{fmt}-N128-b256", fmt, 768, 1000, (128,), (256,)))
        configs.append(Config(f"clip-{fmt}-N32x4-b256-h2", fmt, 768, 1000, (32, 4), (256,)))
    return configs


def tiny_configs() -> list[Config]:
    """Batch 1, N = I = O = R = 16: the per-call overhead (layer-norm gating)."""
    return [
        Config("tiny-cp", "cp", 16, 16, (16,), (1,), rank=16, group="tiny", normalization="ln"),
        Config(
            "tiny-tr", "tr", 16, 16, (16,), (1,), rank=(4, 4, 16), group="tiny", normalization="ln"
        ),
    ]


def mxd_configs() -> list[Config]:
    """MxD's Hadamard experts at GPT-2 small's decoder, 3072 -> 768, 256 tokens.

    2,048 experts, and MxD's own 24,576 (where the gate's activations are compared).
    """
    return [
        Config("gpt2-mxd-N2048", "mxd", 3072, 768, (2048,), (256,), group="mxd"),
        Config("gpt2-mxd-N24576", "mxd", 3072, 768, (24576,), (256,), group="mxd"),
    ]


def sweep_configs(ns: tuple[int, ...] = (16, 64, 256, 1024, 2048, 4096)) -> list[Config]:
    """Experts from 16 to 4096 at a fixed rank (CP 256; TR 4, 4, 64), batch 256."""
    configs = []
    for n in ns:
        configs.append(
            Config(
                f"sweep-cp-N{n}",
                "cp",
                768,
                1000,
                (n,),
                (256,),
                rank=256,
                group="sweep",
                baselines=True,
            )
        )
        configs.append(
            Config(f"sweep-tr-N{n}", "tr", 768, 1000, (n,), (256,), rank=(4, 4, 64), group="sweep")
        )
    return configs


def quick_configs() -> list[Config]:
    """Small shapes for the ``--quick`` smoke run (seconds, not a measurement)."""
    return [
        Config("quick-cp", "cp", 32, 24, (16,), (8,), rank=8, group="quick", baselines=True),
        Config("quick-tr-h2", "tr", 32, 24, (8, 2), (4, 3), rank=(2, 2, 2, 4), group="quick"),
        Config("quick-tucker", "tucker", 32, 24, (8,), (8,), rank=4, group="quick"),
        Config("quick-tt", "tt", 32, 24, (8, 2), (8,), rank=3, group="quick"),
        Config("quick-mxd", "mxd", 32, 24, (16,), (8,), group="quick"),
        *tiny_configs(),
    ]
