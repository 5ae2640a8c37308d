"""Reliability: global state, hostile input, concurrency, determinism, on NumPy.

The torch side (mixed precision, autocast, the layers' input checks, loading
into a module) is in ``tests/nn/test_reliability.py``; the file checks of
``mumoe.inference.load`` are in ``tests/nn/test_io.py`` and ``tests/inference/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import cp, forward, materialize, random_cores, tr
from mumoe.plan import Planner
from mumoe.testing import assert_close, batch_shapes, dense_forward, n_terms, networks, seeds
from tests.helpers import ROOT, public_modules, use_backend

# ------------------------------------------------------------- no global state

MODULES = public_modules()

SNAPSHOT = """
import warnings, numpy as np, tensorly as tl
try:
    import torch  # before the first snapshot: importing torch adds warning filters
except ImportError:
    torch = None
def snapshot():
    state = {"tl": tl.get_backend(), "np.err": np.geterr(), "np.print": np.get_printoptions(),
             "warnings": len(warnings.filters)}
    if torch is None:
        return state
    state.update(dtype=str(torch.get_default_dtype()), threads=torch.get_num_threads(),
                 grad=torch.is_grad_enabled(), det=torch.are_deterministic_algorithms_enabled(),
                 rng=torch.get_rng_state().sum().item())
    return state
"""


@pytest.mark.slow
def test_importing_any_module_changes_nothing_global():
    """One interpreter imports every module in turn; the global state is compared after each."""
    code = SNAPSHOT + (
        "import importlib, json\n"
        "changes, before = {}, snapshot()\n"
        f"for module in {MODULES!r}:\n"
        "    try:\n"
        "        importlib.import_module(module)\n"
        "    except ImportError:  # an optional dependency is missing here\n"
        "        continue\n"
        "    after = snapshot()\n"
        "    diff = {k: repr((before[k], after[k])) for k in before if before[k] != after[k]}\n"
        "    if diff:\n"
        "        changes[module] = diff\n"
        "    before = after\n"
        "print(json.dumps(changes))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{}"


def test_mumoe_never_switches_the_global_backend():
    """Every ``set_backend`` call in the package is thread-local (``local_threadsafe=True``)."""
    calls = []
    for path in (ROOT / "mumoe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "set_backend":
                local = any(
                    k.arg == "local_threadsafe" and getattr(k.value, "value", None) is True
                    for k in node.keywords
                )
                calls.append((path.name, node.lineno, local))
    assert calls, "thread_backend's call was not found: the check would pass vacuously"
    assert all(local for *_, local in calls), calls


def test_a_thread_local_backend_does_not_leak_to_other_threads():
    from mumoe.backends import thread_backend

    seen = {}
    inside = threading.Event()
    done = threading.Event()

    def switch():
        with thread_backend("pytorch"):
            seen["worker"] = tl.get_backend()
            inside.set()
            done.wait(5)

    pytest.importorskip("torch", reason="needs a second backend")
    worker = threading.Thread(target=switch)
    worker.start()
    inside.wait(5)
    seen["main"] = tl.get_backend()
    done.set()
    worker.join()
    assert seen == {"worker": "pytorch", "main": "numpy"}


# ----------------------------------------------------------- hostile input

MUTATIONS = {
    "x rank 0": (ValueError, r"x must have shape \(\.\.\., \d+\) \(in_features\), got \(\)"),
    "x features": (ValueError, r"x must have shape \(\.\.\., \d+\) \(in_features\), got"),
    "one gate too many": (ValueError, r"expert level\(s\) .* but \d+ gate tensor\(s\) were given"),
    "one gate too few": (ValueError, r"expert level\(s\) .* but \d+ gate tensor\(s\) were given"),
    "gate width": (ValueError, r"gates\[\d+\] must have shape .* then n\d+=\d+\), got"),
    "gate batch": (ValueError, r"gates\[\d+\] must have shape \(.*\) \(the batch shape of x"),
    "core shape": (ValueError, r"cores\[\d+\] \(legs .*\) must have shape .*, got"),
    "core count": (ValueError, r"network '.*' has \d+ cores, got \d+ tensors"),
    "integer x": (TypeError, r"x has dtype int64; μMoE layers compute in a floating-point dtype"),
    "float32 gate": (TypeError, r"gates\[\d+\] has dtype float32 but x has float64"),
    "list x": (TypeError, r"x is a builtins.list, not a tensor of the active TensorLy backend"),
}


@settings(max_examples=120)
@given(networks(), batch_shapes(max_dims=2), st.sampled_from(sorted(MUTATIONS)), seeds())
def test_hostile_operands_raise_naming_what_was_expected(net, batch, mutation, seed):
    rng = np.random.RandomState(seed)
    cores = [rng.uniform(-1, 1, s) for s in net.core_shapes]
    x = rng.uniform(-1, 1, (*batch, net.in_features))
    gates = [rng.uniform(0, 1, (*batch, n)) for n in net.expert_dims]
    level = rng.randint(net.n_levels)
    if mutation == "x rank 0":
        x = np.asarray(1.0)
    elif mutation == "x features":
        x = rng.uniform(-1, 1, (*batch, net.in_features + 1 + rng.randint(3)))
    elif mutation == "one gate too many":
        gates = [*gates, gates[0]]
    elif mutation == "one gate too few":
        gates = gates[:-1]
    elif mutation == "gate width":
        gates[level] = np.ones((*batch, net.expert_dims[level] + 1))
    elif mutation == "gate batch":
        gates[level] = np.ones((*batch, 2, net.expert_dims[level]))
    elif mutation == "core shape":
        k = rng.randint(net.n_cores)
        cores[k] = np.ones(tuple(s + 1 for s in net.core_shapes[k]))
    elif mutation == "core count":
        cores = cores[:-1]
    elif mutation == "integer x":
        x = np.ones((*batch, net.in_features), dtype=np.int64)
    elif mutation == "float32 gate":
        gates[level] = gates[level].astype(np.float32)
    elif mutation == "list x":
        x = x.tolist()
    error, match = MUTATIONS[mutation]
    with pytest.raises(error, match=match):
        forward(net, cores, x, gates)


@st.composite
def odd_layouts(draw: st.DrawFn):
    """Operands that are valid but unusual: transposed, broadcast, zero-size."""
    net = draw(networks())
    rng = np.random.RandomState(draw(seeds()))
    kind = draw(st.sampled_from(["transposed", "broadcast", "zero rows", "zero tokens"]))
    n, i = net.expert_dims, net.in_features
    if kind == "transposed":  # non-contiguous views
        x = rng.uniform(-1, 1, (i, 5)).T
        gates = [rng.uniform(0, 1, (m, 5)).T for m in n]
    elif kind == "broadcast":  # zero strides: every row the same memory
        x = np.broadcast_to(rng.uniform(-1, 1, i), (4, i))
        gates = [np.broadcast_to(rng.uniform(0, 1, m), (4, m)) for m in n]
    elif kind == "zero rows":
        x, gates = np.zeros((0, i)), [np.zeros((0, m)) for m in n]
    else:
        x, gates = np.zeros((3, 0, i)), [np.zeros((3, 0, m)) for m in n]
    return net, [rng.uniform(-1, 1, s) for s in net.core_shapes], x, gates


@given(odd_layouts())
def test_unusual_layouts_give_the_same_numbers(case):
    net, cores, x, gates = case
    y = forward(net, cores, x, gates)
    assert y.shape == (*x.shape[:-1], net.out_features)
    expected = dense_forward(materialize(net, cores), x, gates, net.bias)
    assert_close(y, expected, scale=n_terms(net))


@given(networks(), st.integers(2, 6), seeds())
def test_nan_and_inf_stay_in_their_rows(net, rows, seed):
    rng = np.random.RandomState(seed)
    cores = [rng.uniform(-1, 1, s) for s in net.core_shapes]
    x = rng.uniform(-1, 1, (rows, net.in_features))
    gates = [rng.uniform(0, 1, (rows, m)) for m in net.expert_dims]
    bad = rng.randint(rows)
    x[bad, rng.randint(net.in_features)] = [np.nan, np.inf, -np.inf][rng.randint(3)]
    with np.errstate(invalid="ignore", over="ignore"):  # NumPy warns of the NaNs it makes
        y = forward(net, cores, x, gates)
    good = np.delete(np.arange(rows), bad)
    expected = dense_forward(materialize(net, cores), x[good], [g[good] for g in gates], net.bias)
    assert_close(y[good], expected, scale=n_terms(net))
    assert not np.all(np.isfinite(y[bad]))


# ------------------------------------------------------- concurrency and caches


def test_threads_share_a_bounded_cache_and_get_correct_results():
    """16 threads, batch sizes 0-300: every result equals Eq. 1, the cache stays in bound."""
    net = cp(12, 6, expert_dims=(8, 4), rank=5)
    planner = Planner(net, cache_size=6)
    cores = random_cores(net, random_state=0)
    weight = materialize(net, cores)
    barrier = threading.Barrier(16)
    sizes = []

    def work(seed):
        barrier.wait()
        rng = np.random.RandomState(seed)
        for _ in range(25):
            batch = int(rng.randint(0, 300))
            x = rng.uniform(-1, 1, (batch, 12))
            gates = [rng.uniform(0, 1, (batch, 8)), rng.uniform(0, 1, (batch, 4))]
            y = forward(net, cores, x, gates, planner=planner)
            assert_close(y, dense_forward(weight, x, gates, True), scale=n_terms(net))
            sizes.append(len(planner.cache))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(16)))  # re-raises a worker's failure
    # Buckets 1..512 are 10 keys: the bound of 6 is what keeps the cache small.
    assert max(sizes) <= 6 and len(planner.cache) <= 6


def test_a_plan_is_never_used_for_another_backend_or_dtype():
    torch = pytest.importorskip("torch", reason="needs a second backend")
    net = tr(5, 4, expert_dims=6, rank=2)
    planner = Planner(net)
    cores64 = random_cores(net, random_state=1)
    x = np.random.RandomState(2).uniform(-1, 1, (7, 5))
    gates = [np.random.RandomState(3).uniform(0, 1, (7, 6))]
    results = {}
    for backend, dtype in [
        ("numpy", "float64"),
        ("numpy", "float32"),
        ("pytorch", "float64"),
        ("pytorch", "float32"),
    ]:
        with use_backend(backend):
            kind = getattr(tl.backend, dtype)
            y = forward(
                net,
                [tl.tensor(c, dtype=kind) for c in cores64],
                tl.tensor(x, dtype=kind),
                [tl.tensor(g, dtype=kind) for g in gates],
                planner=planner,
            )
            assert str(y.dtype).endswith(dtype)
            results[backend, dtype] = y
    keys = {key[2:] for key in planner.cache.keys() if key[0] == "forward"}
    assert {(b, str(d)) for b, d in keys} == {
        ("numpy", "float64"),
        ("numpy", "float32"),
        ("pytorch", str(torch.float64)),
        ("pytorch", str(torch.float32)),
    }
    expected = dense_forward(materialize(net, cores64), x, gates, True)
    for (_, dtype), y in results.items():
        assert_close(y, expected, dtype, scale=n_terms(net))


# ------------------------------------------------------------------ determinism


def test_the_same_seed_gives_the_same_cores_and_outputs_on_every_backend():
    torch = pytest.importorskip("torch", reason="needs a second backend")
    net = tr(6, 5, expert_dims=(4, 3), rank=(2, 2, 2, 3))
    x = np.random.RandomState(0).uniform(-1, 1, (8, 6))
    gates = [np.random.RandomState(e).uniform(0, 1, (8, n)) for e, n in enumerate((4, 3))]
    first = random_cores(net, random_state=7)
    assert all(
        np.array_equal(a, b) for a, b in zip(first, random_cores(net, random_state=7), strict=True)
    )
    y_numpy = forward(net, first, x, gates)
    with use_backend("pytorch"):
        cores = random_cores(net, random_state=7, dtype=torch.float64)
        assert all(np.array_equal(a, b.numpy()) for a, b in zip(first, cores, strict=True))
        y_torch = forward(net, cores, torch.from_numpy(x), [torch.from_numpy(g) for g in gates])
    np.testing.assert_allclose(y_torch.numpy(), y_numpy, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_outputs_across_runs():
    code = (
        "import numpy as np, mumoe\n"
        "net = mumoe.cp(16, 6, expert_dims=(8, 4), rank=5)\n"
        "x = np.random.RandomState(0).uniform(-1, 1, (32, 16))\n"
        "g = [np.random.RandomState(1).dirichlet(np.ones(n), 32) for n in (8, 4)]\n"
        "print(mumoe.forward(net, mumoe.random_cores(net, random_state=3), x, g).tobytes().hex())"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(runs) == 1


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("wrap", [np.matrix, np.ma.masked_array], ids=["matrix", "masked"])
@pytest.mark.parametrize("operand", ["x", "gates", "cores"])
def test_array_subclasses_with_other_operators_are_refused(wrap, operand):
    # np.matrix's * is a matrix product: a CP forward gave wrong values when the batch
    # equalled the rank (issue #15, item 7).
    net = cp(3, 2, expert_dims=4, rank=2)
    cores = random_cores(net, random_state=0)
    x, gates = np.ones((2, 3)), [np.full((2, 4), 0.25)]
    if operand == "x":
        x = wrap(x)
    elif operand == "gates":
        gates = [wrap(gates[0])]
    else:
        cores = [wrap(c) if c.ndim == 2 else c for c in cores]
    name = {"x": "x", "gates": r"gates\[0\]", "cores": r"cores\[0\]"}[operand]
    with pytest.raises(TypeError, match=rf"{name} is a numpy\..*whose operators are not"):
        forward(net, cores, x, gates)
