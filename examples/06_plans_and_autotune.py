"""
Reading a plan, and autotuning it
=================================

A network's planner (:func:`mumoe.planner_of`) searches its contraction path
once per batch-size bucket, backend and dtype, compiles it into matrix
multiplies, and caches the result.  This tutorial reads a plan, watches the
cache, and lets ``autotune=True`` time the candidate paths and keep the
fastest.
"""

# %%
# The plan of one call
# --------------------
import time

import numpy as np
import tensorly as tl

import mumoe

net = mumoe.tr(256, 256, expert_dims=(32, 4), rank=(4, 4, 4, 48))
plan = mumoe.planner_of(net).forward(128, tl.get_backend(), "float64")
print(f"einsum {plan.equation}")
print(f"path   {plan.path}  ({plan.flops:,} FLOPs)")
for step in plan.program.steps:  # one GEMM (or Hadamard/outer product) per step
    print(f"  {step.kind:8s} {step.equation:16s} operands {step.left}, {step.right}")

# %%
# ``describe`` says the same in words, with the FLOPs of the path:
print(mumoe.describe(net, batch_size=128))

# %%
# The cache
# ---------
#
# Plans are keyed on the batch size rounded up to a power of two, so a short
# last batch reuses the plan of the full ones; the cache is a bounded LRU.
cores = mumoe.random_cores(net, random_state=0)
rng = np.random.default_rng(0)


def call(batch):
    x = rng.standard_normal((batch, 256))
    gates = [rng.dirichlet(np.ones(n), size=batch) for n in net.expert_dims]
    return mumoe.forward(net, cores, x, gates)


for batch in (128, 100, 128, 7, 300):
    call(batch)
print(mumoe.planner_of(net).cache)

# %%
# Autotuning
# ----------
#
# The FLOP-optimal path is not always the fastest on a given machine.  With
# ``autotune=True`` the first call for each bucket times the distinct paths
# that several optimisers propose (``mumoe.plan.AUTOTUNE_OPTIMIZERS``) on the
# real operands, and keeps the fastest.  The policy belongs to a planner, not
# to the network: the same network, another planner.
default = mumoe.planner_of(net)
tuned = mumoe.planner_of(net, autotune=True)
x = rng.standard_normal((256, 256))
gates = [rng.dirichlet(np.ones(n), size=256) for n in net.expert_dims]
mumoe.forward(net, cores, x, gates, planner=tuned)  # the first call tunes
print("chosen:", tuned.forward(256, tl.get_backend(), "float64").path)
print("default:", default.forward(256, tl.get_backend(), "float64").path)


def best_of(planner, repeats=20):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mumoe.forward(net, cores, x, gates, planner=planner)
        times.append(time.perf_counter() - start)
    return min(times)


default_time, tuned_time = best_of(default), best_of(tuned)
print(f"tuned / default wall time on this machine: {tuned_time / default_time:.2f}")
