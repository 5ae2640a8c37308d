"""
Getting started
===============

Build a μMoE layer, look at what it computes, and train one as a classifier
head.  The layer keeps the weights of all its experts in one factorised
tensor and mixes them with soft gates; the weight tensor is never built.
"""

# %%
# A network: the factorised weight tensor
# ---------------------------------------
#
# :func:`mumoe.cp` declares a CP-factorised weight tensor for 64 experts
# mapping 32 features to 10.  It knows its cores, its parameter count and its
# cost before any array exists.
import numpy as np
import torch

import mumoe

net = mumoe.cp(32, 10, expert_dims=64, rank=16)
print(net.core_shapes)
print(f"{net.n_params:,} parameters instead of {net.n_dense_params:,} for the dense tensor")

# %%
# The functional forward pass
# ---------------------------
#
# :func:`mumoe.forward` contracts gates, input and cores on the active
# TensorLy backend (NumPy by default).  It equals Eq. 1 over the
# materialised tensor, which :func:`mumoe.materialize` builds for checking.
cores = mumoe.random_cores(net, random_state=0)
rng = np.random.default_rng(0)
x = rng.standard_normal((5, 32))
gates = rng.dirichlet(np.ones(64), size=5)  # one coefficient per expert, rows sum to 1
y = mumoe.forward(net, cores, x, [gates])

W = mumoe.materialize(net, cores)  # (64, 33, 10): experts, input + bias, output
z = np.concatenate([x, np.ones((5, 1))], axis=1)
print(np.allclose(y, np.einsum("bn,bi,nio->bo", gates, z, W)))

# %%
# A PyTorch layer with its own gate
# ---------------------------------
#
# :class:`mumoe.nn.CPMuMoE` owns the cores and a gate
# :math:`a = \mathrm{entmax}_{1.5}(\mathrm{BN}(x G))`.  ``rank="same"`` would
# choose the largest rank whose layer, gate included, has as many parameters
# as ``nn.Linear(32, 10)``; at this small size the gate alone (32 x 64) is
# over that budget, and the error says so.
from mumoe.nn import CPMuMoE, record_gates

try:
    CPMuMoE(32, 10, expert_dims=64, rank="same")
except ValueError as error:
    print(error)

head = CPMuMoE(32, 10, expert_dims=64, rank=16)
print(head)

# %%
# Training it
# -----------
#
# A toy task with two regimes: the inputs form two clusters (far apart along
# the first feature) and the label follows a different rule in each, which a
# single linear map cannot express but a mixture of experts can.
torch.manual_seed(0)
regime = torch.rand(2048) < 0.5
inputs = torch.randn(2048, 32)
inputs[:, 0] += torch.where(regime, 4.0, -4.0)
scores = torch.where(regime[:, None], inputs[:, 1:11], -inputs[:, 11:21])
labels = scores.argmax(1)


def accuracy(model):
    with torch.no_grad():
        return (model(inputs).argmax(1) == labels).float().mean().item()


def fit(model, steps=300):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        rows = torch.randint(0, len(inputs), (128,))
        loss = torch.nn.functional.cross_entropy(model(inputs[rows]), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


linear = fit(torch.nn.Linear(32, 10))
head = fit(CPMuMoE(32, 10, expert_dims=64, rank=16))
print(f"linear: {accuracy(linear):.3f}   μMoE head: {accuracy(head):.3f}")

# %%
# Which experts does each regime use?
# -----------------------------------
#
# :func:`mumoe.nn.record_gates` records the coefficients, detached.  Most
# experts the gate uses take nearly all their coefficient mass from one of
# the two regimes: the gate has split the task between them.
with record_gates(head) as record, torch.no_grad():
    head(inputs)
coefficients = record["gate"][0]  # (2048, 64)
mass = coefficients.sum(0)
share = coefficients[regime].sum(0) / mass.clamp_min(1e-12)
used = mass > 1  # at least one sample's worth of coefficient
print(f"experts in use: {int(used.sum())} of 64")
print(f"  > 90% of their mass from regime 1: {int((share[used] > 0.9).sum())}")
print(f"  > 90% of their mass from regime 2: {int((share[used] < 0.1).sum())}")
