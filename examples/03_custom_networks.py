"""
Declaring your own factorised MoE
=================================

A network is a spec string: one group of legs per core.  ``n1``, ``n2``, ...
are the expert modes, ``i`` the input, ``o`` the output, and every other name
a bond, summed over.  A role leg may be shared by several cores: it stays
open, and the cores act elementwise along it.  Any such network is a μMoE
layer; this tutorial declares variants, checks them against Eq. 1, and
trains one.
"""

# %%
# A hybrid: CP over the experts, a train over input and output
# ------------------------------------------------------------
#
# Two expert levels share a hyperedge ``a`` (as in CP), which then feeds a
# tensor train over the input and output.  The spec says exactly that.
import matplotlib.pyplot as plt
import numpy as np
import torch

import mumoe
from mumoe.plotting import draw_network

hybrid = mumoe.Network(
    "n1 a, n2 a, a i b, b o", 64, 10, expert_dims=(32, 8), rank={"a": 6, "b": 12}
)
print(mumoe.describe(hybrid, batch_size=128))

# %%
# Rank-:math:`R` Hadamard experts: ``"n1 r o, i r o"`` keeps the output leg
# ``o`` open on both cores (an open hyperedge, as Mixture of Decoders below) and
# adds a bond ``r`` between them, so that
# :math:`\mathcal{W}[n, i, o] = \sum_r C[n, r, o]\, D[i, r, o]`: each output
# column of every expert is a rank-:math:`R` product of an expert part and an
# input part.  With ``r`` of size 1 it is MxD; no preset has it.
hadamard = mumoe.Network("n1 r o, i r o", 64, 10, expert_dims=64, rank={"r": 4})
print(mumoe.describe(hadamard, batch_size=128))

# %%
# A spec that is a preset with its legs renamed (``"n1 p q, i p c, o q c"`` is
# the tensor ring ``tr(64, 10, expert_dims=64)`` with bonds called ``p, q, c``) computes the
# same layer, but mumoe does not recognise it as the preset: deciding that two
# networks are the same up to leg names is a graph-isomorphism question, and a
# custom spec gets the variance-matched initialisation of every custom network
# (:func:`mumoe.spec.custom_init`).  Use the preset's name for its scheme.
renamed = mumoe.Network(
    "n1 p q, i p c, o q c", 64, 10, expert_dims=64, rank={"p": 4, "q": 4, "c": 16}
)
print(renamed.format, mumoe.tr(64, 10, expert_dims=64, rank=(4, 4, 16)).format)

fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
_ = draw_network(hybrid, axes[0])
_ = draw_network(hadamard, axes[1])

# %%
# Invalid specs are refused
# -------------------------
#
# The error names the leg or core that is wrong.
for spec in ("n1 a, i a, o b", "n1a, ia, oa", "n2 a, i a, o a"):
    try:
        mumoe.Network(spec, 16, 4, expert_dims=8, rank=3)
    except ValueError as error:
        print(f"{spec!r}: {error}")

# %%
# Open hyperedges: Hadamard and low-rank experts
# ----------------------------------------------
#
# Mixture of Decoders (Oldfield et al., 2025) factorises
# :math:`\mathcal{W}[n, i, o] = C[n, o] D[i, o]`: the output leg ``o`` is
# shared by both cores and kept open, so the forward pass is
# :math:`y = (C^\top a) * (D^\top z)`, two GEMMs and a Hadamard product.
# Written from its spec string, it is the ``mxd`` format; ``"n i r, n o r"``
# gives every expert its own rank-``r`` matrix (the ``lowrank`` format).
hadamard = mumoe.Network("n o, i o", 64, 10, expert_dims=256)
print(hadamard.format, hadamard.core_shapes, f"{hadamard.n_params:,} parameters")
print(mumoe.describe(hadamard, batch_size=128).split("path")[1].split("FLOPs")[0])
low_rank = mumoe.Network("n i r, n o r", 64, 10, expert_dims=16, rank=4)
print(low_rank.format, low_rank.core_shapes)

# %%
# Splitting the input and output: TT-matrix experts
# -------------------------------------------------
#
# ``i1 ... iK`` and ``o1 ... oL`` split the input and output into legs, their
# sizes given by ``in_shape=`` and ``out_shape=`` (``x`` and ``y`` are
# reshaped row-major).  A core per pair of legs, after a core of experts, is
# the TT-matrix μMoE (the ``ttm`` format, tensorly-torch's BlockTT with
# experts; :doc:`/theory/ttm`).  The bias is one more slice of ``i1``.
tt_matrix = mumoe.Network(
    "n1 r1, r1 i1 o1 r2, r2 i2 o2",
    64,
    10,
    expert_dims=32,
    rank={"r1": 4, "r2": 8},
    in_shape=(8, 8),
    out_shape=(5, 2),
)
print(tt_matrix.format, tt_matrix.core_shapes, f"{tt_matrix.n_params:,} parameters")
print(mumoe.describe(tt_matrix, batch_size=128).split("path")[1].split("FLOPs")[0])
_ = draw_network(tt_matrix)

# %%
# Checking a variant against Eq. 1
# --------------------------------
#
# :func:`mumoe.testing.dense_forward` is Eq. 1 over the materialised tensor,
# in float64 NumPy: the oracle the test suite holds every network to.
from mumoe.testing import dense_forward

rng = np.random.default_rng(0)
x = rng.standard_normal((16, 64))
for net in (hybrid, hadamard, low_rank, tt_matrix):
    cores = mumoe.random_cores(net, random_state=0)
    gates = [rng.dirichlet(np.ones(n), size=16) for n in net.expert_dims]
    y = mumoe.forward(net, cores, x, gates)
    oracle = dense_forward(mumoe.materialize(net, cores), x, gates, bias=True)
    print(f"{net.spec}: max |forward - Eq. 1| = {np.abs(y - oracle).max():.1e}")

# %%
# ... and against TensorLy's reconstructions
# ------------------------------------------
#
# A spec written like a preset is the preset: the tensor it materialises is
# TensorLy's own reconstruction of the same factors.
import tensorly as tl
from tensorly.cp_tensor import cp_to_tensor

as_cp = mumoe.Network("n1 r, i r, o r", 5, 3, expert_dims=8, rank=4)
factors = mumoe.random_cores(as_cp, random_state=1)
print(np.allclose(mumoe.materialize(as_cp, factors), cp_to_tensor((tl.ones(4), factors))))

# %%
# Training a custom layer
# -----------------------
#
# :class:`mumoe.nn.MuMoE` takes the spec directly; with no preset to go by,
# the cores are initialised so that W has the variance of an ``nn.Linear``
# weight (see :mod:`mumoe.nn`).
from mumoe.nn import MuMoE

torch.manual_seed(0)
layer = MuMoE(64, 10, "n1 a, n2 a, a i b, b o", expert_dims=(32, 8), rank={"a": 6, "b": 12})
print(f"{layer.init_scheme=}, {sum(p.numel() for p in layer.parameters()):,} parameters")
inputs, targets = torch.randn(1024, 64), torch.randn(1024, 10)
optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
for step in range(101):
    loss = torch.nn.functional.mse_loss(layer(inputs), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 50 == 0:
        print(f"step {step:3d}: loss {loss.item():.3f}")
