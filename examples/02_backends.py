"""
Backends: NumPy, PyTorch, JAX, and moving weights between them
==============================================================

mumoe computes on whatever backend TensorLy has active, chosen with
``tl.set_backend``; it never switches the backend itself, and it never
converts arrays behind your back.  Here: the same network on several
backends, a mistake it refuses, and a layer trained in PyTorch served on
NumPy.
"""

# %%
# The same computation on every backend
# -------------------------------------
#
# :func:`mumoe.random_cores` draws with NumPy's generator and converts, so the
# same seed gives the same cores on every backend.
import tempfile
from pathlib import Path

import numpy as np
import tensorly as tl
import torch

import mumoe
from mumoe.backends import declared_backends, unavailable_reason

net = mumoe.tr(24, 8, expert_dims=(16, 4), rank=(2, 2, 2, 6))
rng = np.random.default_rng(0)
x_host = rng.standard_normal((3, 24))
gates_host = [rng.dirichlet(np.ones(n), size=3) for n in net.expert_dims]

outputs = {}
for backend in declared_backends():
    if unavailable_reason(backend) is not None:
        print(f"{backend.name}: skipped ({unavailable_reason(backend)})")
        continue
    tl.set_backend(backend.name)
    dtype = tl.backend.float32 if backend.name == "jax" else tl.backend.float64
    cores = mumoe.random_cores(net, random_state=0, dtype=dtype)
    x = tl.tensor(x_host, dtype=dtype)
    gates = [tl.tensor(g, dtype=dtype) for g in gates_host]
    outputs[backend.name] = tl.to_numpy(mumoe.forward(net, cores, x, gates))
    print(f"{backend.name}: {type(outputs[backend.name]).__name__} {outputs[backend.name].shape}")
tl.set_backend("numpy")

reference = outputs["numpy"]
for name, y in outputs.items():
    print(f"{name} vs numpy: max difference {np.abs(y - reference).max():.1e}")

# %%
# Arrays of another backend are refused
# -------------------------------------
#
# Passing torch tensors while NumPy is active is a mistake, not something to
# convert silently; the error says what was expected.
cores = mumoe.random_cores(net, random_state=0)
try:
    mumoe.forward(net, cores, torch.from_numpy(x_host), gates_host)
except TypeError as error:
    print(error)

# %%
# Moving cores between backends
# -----------------------------
#
# Cores are plain arrays: go through NumPy with ``tl.to_numpy`` and
# ``tl.tensor``.
tl.set_backend("pytorch")
torch_cores = [tl.tensor(c) for c in cores]  # from NumPy arrays to torch tensors
print([type(c).__name__ for c in torch_cores])
back = [tl.to_numpy(c) for c in torch_cores]
tl.set_backend("numpy")
print(all(np.array_equal(a, b) for a, b in zip(cores, back, strict=True)))

# %%
# Train in PyTorch, serve on NumPy
# --------------------------------
#
# :func:`mumoe.nn.save` writes the layer (cores, gate, batch-norm
# statistics, network) to a safetensors file with a JSON description; reading
# it executes no code.  :func:`mumoe.inference.load` builds an eval-mode layer on the
# active backend.  The torch modules run on the pytorch backend for their own
# thread only, so this works whatever backend the program has chosen.
from mumoe.inference import load
from mumoe.nn import TRMuMoE, save

torch.manual_seed(0)
layer = TRMuMoE(24, 8, expert_dims=(16, 4), rank=(2, 2, 2, 6), dtype=torch.float64)
optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
data = torch.randn(512, 24, dtype=torch.float64)
for _ in range(50):  # a few steps, so that the batch-norm statistics move
    loss = layer(data).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
layer.eval()

with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "layer.safetensors"
    save(layer, path)
    served = load(path)  # NumPy is active: NumPy arrays
print(served)
with torch.no_grad():
    expected = layer(torch.from_numpy(x_host)).numpy()
print(f"max difference torch vs NumPy: {np.abs(served(x_host) - expected).max():.1e}")
