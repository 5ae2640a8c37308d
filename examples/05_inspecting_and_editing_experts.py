"""
Inspecting and editing experts
==============================

With many experts each one specialises, and a specialised expert can be read
and edited.  This tutorial trains a CP μMoE head with 512 experts on
scikit-learn's bundled digits, measures what its experts do with
:mod:`mumoe.analysis`, and switches off the experts of one digit — first
inside a ``with`` block, then for good in the stored cores.  ``mumoe demo``
does the same across expert counts.
"""

# %%
# A trained head
# --------------
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from mumoe import analysis
from mumoe.nn import CPMuMoE, collect_gates, edit_experts, edit_experts_

digits = load_digits()
x = (digits.data - digits.data.mean(0)) / (digits.data.std(0) + 1e-6)
x_train, x_test, y_train, y_test, img_train, img_test = train_test_split(
    x.astype(np.float32),
    digits.target,
    digits.images,
    test_size=0.25,
    random_state=0,
    stratify=digits.target,
)
x_train, x_test = torch.from_numpy(x_train), torch.from_numpy(x_test)

torch.manual_seed(0)
head = CPMuMoE(64, 10, expert_dims=512, rank=8)
optimizer = torch.optim.Adam(head.parameters(), lr=5e-3)
for _ in range(40):
    for rows in torch.randperm(len(x_train)).split(64):
        loss = torch.nn.functional.cross_entropy(
            head(x_train[rows]), torch.from_numpy(y_train[rows])
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
head.eval()


def class_accuracy(model):
    with torch.no_grad():
        predicted = model(x_test).argmax(1).numpy()
    return np.array([np.mean(predicted[y_test == c] == c) for c in range(10)])


before = class_accuracy(head)
print(f"test accuracy {before.mean():.3f}")

# %%
# Expert load and polysemanticity
# -------------------------------
#
# :func:`~mumoe.nn.collect_gates` runs the model in eval mode and keeps
# every gate coefficient.  An expert *processes* a sample when its
# coefficient is at least 0.5; :func:`~mumoe.analysis.class_histogram` counts
# the classes it processes, and :func:`~mumoe.analysis.polysemanticity` is the
# distance from that class distribution to the one-hot vector of its main
# class (0: one class only).
coefficients = collect_gates(head, x_train)[0]  # (1347, 512)
load = analysis.expert_load(coefficients)
histogram = analysis.class_histogram(coefficients, y_train, n_classes=10)
psi = analysis.polysemanticity(histogram, min_count=5)
print(f"experts processing >= 5 training digits: {np.sum(load >= 5)} of {load.size}")
print(f"their mean polysemanticity: {np.nanmean(psi):.3f}")
busiest = np.argsort(-load)[:5]
for expert in busiest:
    print(f"expert {expert:3d}: {load[expert]:3d} digits, classes {histogram[expert].tolist()}")

# %%
# What the busiest experts see
# ----------------------------
#
# :func:`~mumoe.analysis.top_samples` gives each expert's most weighted
# (training) samples.
top = analysis.top_samples(coefficients, k=8)
fig, axes = plt.subplots(5, 8, figsize=(6.4, 4.4), layout="constrained")
for row, expert in zip(axes, busiest, strict=True):
    for ax, sample in zip(row, top[expert], strict=True):
        ax.imshow(img_train[sample], cmap="gray_r")
        ax.set_axis_off()
    row[0].set_title(f"expert {expert}", fontsize=8, loc="left")

# %%
# Switching off the experts of one digit
# --------------------------------------
#
# The experts most tied to a digit are those that take most of their gate
# mass from it (:func:`~mumoe.analysis.class_mass`).  Inside
# :func:`~mumoe.nn.edit_experts` they contribute nothing: the weights
# are untouched, the coefficients scaled.  Here, the experts of the digit 1:
mass = analysis.class_mass(coefficients, y_train, n_classes=10)
share = mass / np.maximum(mass.sum(1, keepdims=True), 1e-12)
digit = 1
tied = np.flatnonzero((share[:, digit] >= 0.8) & (mass.sum(1) >= 1)).tolist()
print(f"{len(tied)} experts take >= 80% of their mass from digit {digit}")

with edit_experts(head, dict.fromkeys(tied, 0.0)):
    edited = class_accuracy(head)
print("digit   " + " ".join(f"{c:5d}" for c in range(10)))
print("before  " + " ".join(f"{a:5.2f}" for a in before))
print("edited  " + " ".join(f"{a:5.2f}" for a in edited))
print("after   " + " ".join(f"{a:5.2f}" for a in class_accuracy(head)), "(the block restored it)")

# %%
# Rescaling instead of removing, and making it permanent
# ------------------------------------------------------
#
# Factors other than 0 rescale an expert; :func:`~mumoe.nn.edit_experts_`
# writes the edit into the cores (:func:`mumoe.scale_experts` multiplies the
# core that holds the expert leg), with the same outputs and no per-call cost.
with torch.no_grad(), edit_experts(head, dict.fromkeys(tied, 0.5)):
    halfway = head(x_test)
edit_experts_(head, dict.fromkeys(tied, 0.5))
with torch.no_grad():
    print(f"same outputs: {torch.allclose(head(x_test), halfway, atol=1e-6)}")
print("halved  " + " ".join(f"{a:5.2f}" for a in class_accuracy(head)))
