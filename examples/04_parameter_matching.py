"""
Parameter matching against a linear layer
=========================================

The paper compares μMoE layers with the linear layers they replace at the
same parameter count, gate included.  :func:`mumoe.spec.match_rank`
finds the rank; ``rank="same"`` (or a fraction) does it when building a
layer.
"""

# %%
# The ranks of the paper's CLIP head
# ----------------------------------
#
# ``nn.Linear(768, 1000)`` has 769,000 parameters.  For each expert count,
# the largest CP and TR ranks whose layer fits them:
import matplotlib.pyplot as plt
import torch

import mumoe
from mumoe.nn import CPMuMoE, TRMuMoE
from mumoe.spec import gate_params, linear_params, match_rank

budget = linear_params(768, 1000)
print(f"budget: {budget:,}")
print(f"{'N':>5}  {'CP rank':>7}  {'TR rank':>12}  {'gate':>8}")
for n in (16, 64, 256, 512):
    print(
        f"{n:>5}  {match_rank('cp', 768, 1000, expert_dims=n)!s:>7}  "
        f"{match_rank('tr', 768, 1000, expert_dims=n)!s:>12}  {gate_params(768, n):>8,}"
    )

# %%
# ``rank="same"`` in a layer gives the same answer, and the layer's
# parameters, gate included, stay within the budget:
head = CPMuMoE(768, 1000, expert_dims=512, rank="same")
count = sum(p.numel() for p in head.parameters())
print(head.network.ranks, f"{count:,} <= {budget:,}: {count <= budget}")

half = TRMuMoE(768, 1000, expert_dims=128, rank=mumoe.Budget(0.5))  # half the budget
print(half.network.ranks, f"{sum(p.numel() for p in half.parameters()):,}")

# %%
# Parameters against the number of experts
# ----------------------------------------
#
# A dense mixture pays :math:`N I' O` parameters; a factorised one at fixed
# rank pays only for the :math:`N R` entries of its expert factor (and the
# gate).  At a fixed budget the rank falls instead:
counts = [2**k for k in range(1, 10)]  # 1,024 experts: the gate alone would exceed the budget
fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
left.plot(
    counts,
    [mumoe.dense(768, 1000, expert_dims=n).n_params for n in counts],
    "o-",
    label="dense MoE",
)
left.plot(
    counts,
    [mumoe.cp(768, 1000, expert_dims=n, rank=256).n_params for n in counts],
    "o-",
    label="CP, rank 256",
)
left.plot(
    counts,
    [mumoe.tr(768, 1000, expert_dims=n, rank=(4, 4, 64)).n_params for n in counts],
    "o-",
    label="TR, ranks 4, 4, 64",
)
left.axhline(budget, color="gray", ls="--", label="nn.Linear(768, 1000)")
left.set(xscale="log", yscale="log", xlabel="experts N", ylabel="parameters (no gate)")
left.legend(fontsize=8)
right.plot(
    counts, [match_rank("cp", 768, 1000, expert_dims=n) for n in counts], "o-", label="CP rank"
)
right.plot(
    counts,
    [match_rank("tr", 768, 1000, expert_dims=n)[-1] for n in counts],
    "o-",
    label="TR rank (input-output bond)",
)
right.set(xscale="log", xlabel="experts N", ylabel="rank at the linear layer's budget")
_ = right.legend(fontsize=8)

# %%
# When the budget cannot be met
# -----------------------------
#
# Past a point the gate alone (:math:`I N`) exceeds the budget; the error
# says by how much.
try:
    match_rank("cp", 768, 1000, expert_dims=1024)
except ValueError as error:
    print(error)

# %%
# A module with a budget is still a module
# ----------------------------------------
print(head(torch.randn(4, 768)).shape)
