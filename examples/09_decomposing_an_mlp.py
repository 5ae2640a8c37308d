"""
Decomposing a language model's MLP
==================================

MxD (Oldfield et al., 2025) replaces a language model's MLP by a layer of
many Hadamard-factorised experts, gated sparsely from the MLP's input, and
judges it by what the model loses when it is spliced in.  This tutorial
walks through it on a small GPT-2 from ``transformers`` (built from a config,
trained here for a few seconds on text that ships with Python; nothing is
downloaded):

1. find the model's MLPs and turn one into a block that starts *exactly* at it;
2. stream the MLP's inputs and outputs and distil a sparse block on them;
3. splice the block in and measure the change of the model's loss (ΔCE);
4. compare it with a transcoder of the same size, over the sparsity ``k``.

``mumoe demo lm`` runs the same steps at a larger budget, over three seeds.
"""

from pydoc_data.topics import topics

import matplotlib.pyplot as plt
import torch
import transformers

from mumoe.nn import (
    ActivationPairs,
    block_from_mlp,
    distill,
    find_mlps,
    frontier,
    splice_report,
)
from mumoe.plotting import plot_frontier

transformers.logging.set_verbosity_error()
torch.manual_seed(0)

# %%
# A small language model
# ----------------------
#
# Characters of the standard library's help topics are the tokens; a
# 2-layer GPT-2 of width 64 learns them for a few hundred steps.
text = "\n".join(topics[name] for name in sorted(topics))
chars = sorted(set(text))
index = {c: i for i, c in enumerate(chars)}
ids = torch.tensor([index[c] for c in text[:200_000]])
config = transformers.GPT2Config(
    vocab_size=len(chars),
    n_positions=64,
    n_embd=64,
    n_layer=2,
    n_head=4,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
model = transformers.GPT2LMHeadModel(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)


def batches(count, start, stop):
    starts = torch.randint(start, stop - 64, (count, 32))
    return [{"input_ids": torch.stack([ids[s : s + 64] for s in row])} for row in starts]


for batch in batches(200, 0, 180_000):
    loss = model(**batch, labels=batch["input_ids"]).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
model.eval()
train, test = batches(32, 0, 180_000), batches(4, 180_000, 200_000)
print(f"training loss {loss.item():.2f} nats per character")

# %%
# The MLPs, and a block that starts exactly at one
# ------------------------------------------------
#
# :func:`~mumoe.nn.find_mlps` recognises MLPs by their layers (GPT-2's
# ``c_fc`` and ``c_proj``) and their activation by its values (GPT-2's
# ``gelu_new`` is GELU's tanh form).  :func:`~mumoe.nn.block_from_mlp` builds
# MxD as published: a dense encoder (the MLP's ``c_fc``), and a decoder of
# ``N`` experts ``D diag(c_n)`` with ``D`` the MLP's ``c_proj``, gated by
# ReLU-top-k on the MLP's input.  At the start every expert is the MLP, so
# the model's loss does not move.
parts = find_mlps(model)[-1]
print(parts)
mlp = model.get_submodule(parts.name)
options = {"activation": "relu_topk", "normalization": None, "gate_bias": True}
exact = block_from_mlp(
    mlp.c_fc,
    mlp.c_proj,
    "mxd",
    expert_dims=256,
    hidden_activation=parts.activation,
    top_k=8,
    **options,
)
print(f"ΔCE at conversion: {splice_report(model, test, {parts.name: exact}).delta:+.1e}")
print(exact.describe(batch_size=1).split("\n\n")[0])

# %%
# Distillation on the MLP's own activations
# -----------------------------------------
#
# :class:`~mumoe.nn.ActivationPairs` runs the model over the batches and
# streams what the MLP reads and writes (the model stops at the MLP), through
# a shuffle buffer of bounded size.  The exact start keeps every expert tied
# at ``1/N``, which training would switch off at once, so the block to train
# starts from a random gate instead, calibrated on a batch so that it starts
# near the MLP; :func:`~mumoe.nn.distill` then fits it by normalised MSE.
pairs = ActivationPairs(model, train, inputs_of=parts.name, batch_size=256, buffer_size=8192)
block = block_from_mlp(
    mlp.c_fc,
    mlp.c_proj,
    "mxd",
    expert_dims=256,
    hidden_activation=parts.activation,
    top_k=8,
    gate_init="random",
    calibrate=next(iter(pairs))[0],
    **options,
)
history = distill(block, pairs, steps=150, lr=3e-3, log_every=10)
print(f"NMSE {history.nmse[0]:.4f} -> {history.nmse[-1]:.4f}, L0 {history.l0[-1]:.1f}")

# %%
# Spliced into the model
# ----------------------
#
# :func:`~mumoe.nn.splice_report` runs the model as it is, with the block in
# place of the MLP, and with the MLP's output zeroed: the loss change (ΔCE),
# the share of the zero ablation's loss the block recovers, and L0.
report = splice_report(model, test, {parts.name: block})
print(
    f"CE {report.loss:.3f} -> {report.loss_spliced:.3f} (ΔCE {report.delta:+.4f}); "
    f"zeroed {report.loss_zero:.3f}; recovered {report.recovered:.1%}; L0 {report.l0:.1f}"
)

# %%
# Against a transcoder of the same size
# -------------------------------------
#
# :func:`~mumoe.nn.frontier` fits, for each ``k``, an MxD block from the MLP,
# one from scratch (``from_scratch=True``) and a transcoder with as many
# parameters (ReLU-top-k latents, a linear decoder), by the same loop.  One
# seed and short fits here; ``mumoe demo lm`` runs three seeds.
records = frontier(
    model,
    parts,
    train,
    test,
    ks=[4, 16],
    expert_dims=256,
    steps=100,
    lr=3e-3,
    batch_size=256,
    buffer_size=8192,
    from_scratch=True,
)
for r in records:
    print(f"{r['kind']:<11} k={r['k']:<3} NMSE {r['nmse']:.4f}  ΔCE {r['delta_ce']:+.4f}")
fig, ax = plt.subplots(figsize=(5, 3.4), layout="constrained")
_ = plot_frontier(records, ax=ax, title="one seed, 100 steps")
