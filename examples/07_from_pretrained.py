"""
From a pretrained model
=======================

The paper puts μMoE layers into existing architectures: parameter-matched
μMoE MLPs in GPT-2, a μMoE head on CLIP.  :func:`mumoe.nn.replace_linear`
does it in one call for any PyTorch model, and each new layer starts where
the dense layer was: its every expert *is* the dense layer (MxD, and any
format at full rank), or the best approximation the format's rank allows
(:func:`mumoe.nn.from_linear`, :mod:`mumoe.functional`).

Here: a small GPT-2 from ``transformers``, built from a config (random
weights, nothing downloaded), its MLPs converted, trained briefly on a toy
language, its experts looked at over a stream of batches and steered, and
the converted model saved and loaded back the Hugging Face way.
"""

import copy
import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

from mumoe.analysis import class_mass
from mumoe.nn import (
    collect_aux_losses,
    from_linear,
    from_linears,
    gate_statistics,
    load_model,
    prune_bonds,
    record_gates,
    regularize_bonds,
    replace_linear,
    save_model,
    steer_experts,
)

transformers.logging.set_verbosity_error()
torch.manual_seed(0)
config = GPT2Config(
    vocab_size=48,
    n_positions=24,
    n_embd=64,
    n_layer=2,
    n_head=4,
    bos_token_id=0,
    eos_token_id=0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
dense = GPT2LMHeadModel(config).eval()
tokens = torch.randint(0, config.vocab_size, (16, 24))
with torch.no_grad():
    reference = dense(tokens).logits


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# %%
# MxD: the same outputs, exactly
# ------------------------------
#
# GPT-2's MLP is ``c_fc`` (64 → 256) and ``c_proj`` (256 → 64), ``Conv1D``
# layers of ``transformers`` (linear layers with the weight transposed).
# Mixture-of-Decoders experts ``W_n = D diag(c_n)`` start at ``c_n = 1``,
# ``D = [W^T; b]``: every expert is the dense layer.
mxd = replace_linear(
    copy.deepcopy(dense), include=r"mlp\.c_(fc|proj)$", network="mxd", expert_dims=64
)
with torch.no_grad():
    difference = (mxd(tokens).logits - reference).abs().max().item()
print(f"parameters: dense {n_params(dense):,}, MxD {n_params(mxd):,}")
print(f"largest output difference after the conversion: {difference:.1e}")

# %%
# CP: the best rank-R approximation
# ---------------------------------
#
# A CP layer's experts share the input and output factors; started from a
# dense layer, each expert is the truncated SVD of ``[W^T; b]``, the best
# rank-R matrix (Eckart–Young).  The relative error falls with the rank to
# zero at full rank (``min(I + 1, O)``); ``rank="same"`` (the default) is the
# rank that keeps the parameter count of the dense layer, gates included.
layer = dense.transformer.h[0].mlp.c_fc
ranks = [2, 4, 8, 16, 32, 64]
errors = [from_linear(layer, "cp", expert_dims=32, rank=r).conversion_error for r in ranks]
matched = from_linear(layer, "cp", expert_dims=32)  # rank="same"
for r, e in zip(ranks, errors, strict=True):
    print(f"rank {r:>2}: relative error {e:.3f}")
print(f"rank='same' -> {matched.network.ranks['r']}, error {matched.conversion_error:.3f}")

fig, ax = plt.subplots(figsize=(4, 2.6))
ax.plot(ranks, errors, "o-")
ax.set(xscale="log", xlabel="CP rank", ylabel="relative error", title="c_fc of block 0")
ax.set_xticks(ranks, [str(r) for r in ranks])
fig.tight_layout()

cp = replace_linear(
    copy.deepcopy(dense), include=r"mlp\.c_(fc|proj)$", network="cp", expert_dims=32
)
print(f"parameters with rank='same': dense {n_params(dense):,}, CP {n_params(cp):,}")

# %%
# Train briefly
# -------------
#
# A toy language: each sequence counts up from a random start by a random
# stride (mod the vocabulary), so the next token is predictable from the
# previous two.  The converted model trains like any other.


def toy_batch(n, generator):
    start = torch.randint(0, config.vocab_size, (n, 1), generator=generator)
    stride = torch.randint(1, 4, (n, 1), generator=generator)
    return (start + stride * torch.arange(24)) % config.vocab_size


generator = torch.Generator().manual_seed(0)
optimizer = torch.optim.Adam(mxd.parameters(), lr=3e-3)
mxd.train()
losses = []
for _ in range(60):
    batch = toy_batch(32, generator)
    loss = mxd(batch, labels=batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
print(f"loss: {losses[0]:.2f} at the first step, {np.mean(losses[-5:]):.2f} at the last five")

# %%
# Which tokens each expert takes
# ------------------------------
#
# The gate of the first MLP routes every position to a mix of 64 experts.
# :func:`mumoe.analysis.class_mass` sums each expert's coefficients per input
# token: an expert whose mass sits on a few tokens has specialised.
mxd.eval()
batch = toy_batch(256, generator)
with torch.no_grad(), record_gates(mxd) as record:
    mxd(batch)
name = next(n for n in record if n.startswith("transformer.h.0"))
coefficients = record[name][0].reshape(-1, 64).numpy()  # (positions, experts)
mass = class_mass(coefficients, batch.reshape(-1).numpy(), n_classes=config.vocab_size)
share = mass / mass.sum(axis=1, keepdims=True)  # each expert's mass over the tokens
for expert in np.argsort(-mass.sum(axis=1))[:4]:
    top = np.argsort(-share[expert])[:3]
    taken = ", ".join(f"token {t} ({share[expert, t]:.0%})" for t in top)
    print(f"expert {expert:>2}: {taken}")

# %%
# Over a data set, in constant memory
# -----------------------------------
#
# :func:`mumoe.nn.gate_statistics` runs the model over any iterable of batches
# (a ``DataLoader``, a generator of dict batches) and folds each gate's
# coefficients into per-expert statistics as they come, so a corpus' tokens
# fit: here 64 batches, each token labelled by itself (``labels="input_ids"``)
# and kept with a window of the tokens around it (``tokens="input_ids"``).


def stream(n_batches):
    for _ in range(n_batches):
        ids = toy_batch(32, generator)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


statistics = gate_statistics(
    mxd,
    stream(64),
    gates="transformer.h.0.mlp.c_fc",
    labels="input_ids",
    mask="attention_mask",
    tokens="input_ids",
    window=(3, 0),
    n_classes=config.vocab_size,
    k=3,
)["transformer.h.0.mlp.c_fc.gate"][0]
print(f"{statistics.rows:,} tokens counted")
busiest = int(statistics.mass.argmax())
print(f"expert {busiest} carries {statistics.mass[busiest] / statistics.rows:.1%} of the mass;")
print("the contexts it weights most (3 tokens before, then the token):")
for window, value in zip(
    statistics.top_contexts[busiest], statistics.top_values[busiest], strict=True
):
    print(f"  {window.tolist()}  coefficient {value:.3f}")

# %%
# Steering by an expert
# ---------------------
#
# :func:`mumoe.nn.steer_experts` sets, clamps or scales chosen experts'
# coefficients while a ``with`` block lasts (MxD's ``a_hook``): here the
# busiest expert of the first MLP is given to every token with coefficient 1,
# and the model's loss on held-out sequences moves.
held_out = toy_batch(64, generator)
with torch.no_grad():
    before = mxd(held_out, labels=held_out).loss.item()
    with steer_experts(mxd, gates="transformer.h.0.mlp.c_fc", values={busiest: 1.0}):
        steered = mxd(held_out, labels=held_out).loss.item()
print(f"held-out loss {before:.3f}; with expert {busiest} set to 1 for every token: {steered:.3f}")

# %%
# Saving and loading the converted model
# --------------------------------------
#
# ``save_pretrained`` writes the model's folder as ``transformers`` always
# does, and :func:`mumoe.nn.save_model` adds ``mumoe.json`` (which modules
# were replaced, by what) and ``mumoe.safetensors`` (their weights) beside it.
# ``from_pretrained`` of that folder builds the dense GPT-2 back (its MLP
# layers at random, with a warning ``transformers`` keeps quiet here);
# :func:`mumoe.nn.load_model` puts the trained μMoE layers in, all or
# nothing, after checking that the model is the one they came from.
folder = tempfile.mkdtemp()
mxd.save_pretrained(folder)
save_model(mxd, folder)
loaded = load_model(GPT2LMHeadModel.from_pretrained(folder), folder)
with torch.no_grad():
    same = torch.equal(loaded(held_out).logits, mxd(held_out).logits)
print(f"loaded: {type(loaded.transformer.h[0].mlp.c_fc).__name__} layers, same logits: {same}")

# %%
# Experts from several layers
# ---------------------------
#
# :func:`mumoe.nn.from_linears` makes one μMoE layer whose experts start as
# several dense layers of one shape: here the ``c_fc`` of both blocks of the
# dense GPT-2, two experts, fitted as a Tucker network at about half their
# parameters (TensorLy's ``tucker``), each expert's relative error reported.
# These weights are random, with little structure to share, so the errors are
# large; ``"dense"`` would hold both exactly.
pair = [block.mlp.c_fc for block in dense.transformer.h]
two = from_linears(pair, "tucker", rank=(2, 24, 48))
dense_params = sum(n_params(layer) for layer in pair)
print(f"two c_fc layers ({dense_params:,} parameters) as one Tucker layer ", end="")
print(f"({two.network.n_params:,} in its cores): errors {two.conversion_error.round(3)}")

# %%
# Rank regularisation and pruning
# -------------------------------
#
# Any bond of any layer can have tensor dropout and a lasso on its components
# (:func:`mumoe.nn.regularize_bonds`); :func:`mumoe.nn.prune_bonds` then
# removes the components of small norm, shrinking the cores.  Here the CP
# model's first ``c_fc`` trains briefly with a lasso on its rank and keeps the
# 16 largest of its components.
layer = cp.transformer.h[0].mlp.c_fc
regularize_bonds(layer, lasso={"r": 1e-3}, dropout={"r": 0.1})
optimizer = torch.optim.Adam(cp.parameters(), lr=3e-3)
cp.train()
for _ in range(20):
    batch = toy_batch(32, generator)
    loss = cp(batch, labels=batch).loss + collect_aux_losses(cp)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
report = prune_bonds(layer, keep=16)
print(f"c_fc of block 0: rank {report.ranks[''][0]['r']} -> {report.ranks[''][1]['r']}, ", end="")
print(f"{report.params_before:,} -> {report.params_after:,} core parameters")
