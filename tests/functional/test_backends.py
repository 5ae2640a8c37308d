"""The one file that runs mumoe on every backend declared in mumoe/backends/.

Each test is parametrised by the backends usable on this machine (and the
dtypes each declares); the others are skipped with the reason.  CI can run
this file alone per backend.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe import (
    SparseGate,
    cp,
    expert_weight,
    forward,
    materialize,
    planner_of,
    random_cores,
    scale_experts,
    tr,
    tucker,
)
from mumoe.functional import densify
from mumoe.plan import Planner
from mumoe.testing import (
    assert_close,
    backend_dtype,
    batch_shapes,
    dense_forward,
    n_terms,
    networks,
    random_inputs,
    seeds,
    to_numpy64,
)
from mumoe.validation import dtype_name
from tests.helpers import AVAILABLE, BACKENDS, backend_dtype_params, backend_params, use_backend


def test_expected_backends_are_usable():
    """CI names the backends it installed; a silently skipped backend fails here."""
    expected = [n for n in os.environ.get("MUMOE_EXPECT_BACKENDS", "").split(",") if n]
    declared = {s.name for s in BACKENDS}
    for name in expected:
        assert name in declared, f"MUMOE_EXPECT_BACKENDS names {name!r}, not in mumoe/backends/"
        assert name in AVAILABLE, f"backend {name!r} was expected but is not usable here"


@pytest.fixture(params=backend_dtype_params())
def backend_and_dtype(request):
    name, dtype = request.param
    with use_backend(name):
        yield name, dtype


def operands(net, batch_shape, seed, dtype):
    rng = np.random.RandomState(seed)
    host = [rng.uniform(-1, 1, shape) for shape in net.core_shapes]
    x, gates = random_inputs(net, batch_shape, random_state=rng)
    x_host, gates_host = to_numpy64(x), [to_numpy64(g) for g in gates]
    # Cast on the host: a backend that compiles per shape (JAX) need not compile a cast.
    cast = lambda a: tl.tensor(a.astype(dtype), dtype=backend_dtype(dtype))  # noqa: E731
    return [cast(c) for c in host], cast(x_host), [cast(g) for g in gates_host], host


def examples_on(name):
    """The property-test settings of backend ``name``: its declared example budget, if any."""
    declared = next(b for b in BACKENDS if b.name == name).max_examples
    return settings(max_examples=declared) if declared else settings()


def test_scale_experts_matches_the_scaled_w(backend_and_dtype):
    name, dtype = backend_and_dtype

    @examples_on(name)
    @given(networks(max_levels=2), seeds(), st.data())
    def check(net, seed, data):
        level = data.draw(st.integers(0, net.n_levels - 1))
        scales = np.random.RandomState(seed).uniform(-2, 2, net.expert_dims[level])
        cores, _, _, host = operands(net, (), seed, dtype)
        scaled = scale_experts(net, cores, level, scales)
        assert all(dtype_name(c.dtype) == dtype and tl.is_tensor(c) for c in scaled)
        shape = [1] * (net.n_levels + 2)
        shape[level] = -1
        expected = to_numpy64(materialize(net, [tl.tensor(c) for c in host]))
        assert_close(
            materialize(net, scaled), expected * scales.reshape(shape), dtype, scale=n_terms(net)
        )

    check()


def test_forward_equals_the_oracle(backend_and_dtype):
    name, dtype = backend_and_dtype

    @examples_on(name)
    @given(networks(), batch_shapes(), seeds())
    def check(net, batch_shape, seed):
        cores, x, gates, host = operands(net, batch_shape, seed, dtype)
        y = forward(net, cores, x, gates)
        assert tl.is_tensor(y)
        assert dtype_name(y.dtype) == dtype
        assert tuple(tl.shape(y)) == (*batch_shape, net.out_features)
        weight = materialize(net, [tl.tensor(c) for c in host])
        assert_close(y, dense_forward(weight, x, gates, net.bias), dtype, scale=n_terms(net))

    check()


def test_sparse_gates_equal_the_oracle_on_every_backend(backend_and_dtype):
    # Supports (SparseGate) gathered on the backend's arrays, with its declared kernels.
    name, dtype = backend_and_dtype

    @examples_on(name)
    @given(networks(max_levels=2), batch_shapes(), seeds(), st.data())
    def check(net, batch_shape, seed, data):
        cores, x, _, host = operands(net, batch_shape, seed, dtype)
        rng = np.random.RandomState(seed)
        rows = int(np.prod(batch_shape, dtype=int))
        gates, dense = [], []
        for n in net.expert_dims:
            k = data.draw(st.integers(1, n))
            indices = np.argsort(rng.uniform(size=(rows, n)), axis=-1)[:, :k]
            values = rng.uniform(size=(rows, k))
            matrix = np.zeros((rows, n))
            np.put_along_axis(matrix, indices, values, axis=-1)
            dense.append(matrix.reshape(*batch_shape, n))
            gates.append(
                SparseGate(
                    tl.tensor(indices.reshape(*batch_shape, k)),
                    tl.tensor(
                        values.reshape(*batch_shape, k).astype(dtype), dtype=backend_dtype(dtype)
                    ),
                    n,
                )
            )
        y = forward(net, cores, x, gates, planner=Planner(net, crossover=1.0))
        assert dtype_name(y.dtype) == dtype
        weight = materialize(net, [tl.tensor(c) for c in host])
        assert_close(y, dense_forward(weight, x, dense, net.bias), dtype, scale=n_terms(net))
        for gate, matrix in zip(gates, dense, strict=True):
            assert_close(densify(gate), matrix, dtype)

    check()


def test_expert_weight_and_materialize_on_every_backend(backend_and_dtype):
    name, dtype = backend_and_dtype

    @examples_on(name)
    @given(networks(max_levels=2), st.data(), seeds())
    def check(net, data, seed):
        index = tuple(data.draw(st.integers(0, n - 1)) for n in net.expert_dims)
        cores, _, _, host = operands(net, (), seed, dtype)
        weight = materialize(net, cores)
        assert dtype_name(weight.dtype) == dtype
        expected = materialize(net, [tl.tensor(c) for c in host])
        assert_close(weight, expected, dtype, scale=n_terms(net))
        expert = expert_weight(net, cores, index)
        assert_close(
            expert.weight, to_numpy64(expected)[index][: net.in_features], dtype, n_terms(net)
        )

    check()


def test_plans_use_the_kernels_their_backend_declares(backend):
    from mumoe.plan import backend_kernels

    net = cp(3, 2, expert_dims=4, rank=2)
    x, gates = random_inputs(net, (5,), random_state=0)
    plan = planner_of(net).forward(5, backend, x.dtype)
    kernels = backend_kernels(backend)
    assert plan.program.kernels == kernels and plan.bias_program.kernels == kernels
    declared = next(b for b in BACKENDS if b.name == backend)
    assert (kernels.addmm is None) == (not declared.addmm)
    assert (kernels.bias_matmul is None) == (not declared.bias_matmul)
    assert (kernels.jit is None) == (not declared.jit)
    cores = random_cores(net, random_state=1)
    y = forward(net, cores, x, gates)  # the bias added inside, with the declared kernel if any
    expected = dense_forward(materialize(net, cores), x, gates, net.bias)
    assert_close(y, expected, dtype_name(x.dtype), scale=n_terms(net))


def test_output_lives_where_the_input_lives(backend):
    net = cp(3, 2, expert_dims=4, rank=2)
    cores = random_cores(net, random_state=0)
    x, gates = random_inputs(net, (5,), random_state=0)
    y = forward(net, cores, x, gates)
    assert type(y) is type(x)
    assert tl.context(y).get("device") == tl.context(x).get("device")


def test_numpy_and_pytorch_give_the_same_numbers():
    pytest.importorskip("torch", reason="torch is not installed (pip install 'mumoe[torch]')")
    net = tr(5, 4, expert_dims=(3, 2), rank=(2, 3, 2, 2))
    results = {}
    for name in ("numpy", "pytorch"):
        with use_backend(name):
            cores = random_cores(net, random_state=3)
            x, gates = random_inputs(net, (2, 3), random_state=4)
            results[name] = to_numpy64(forward(net, cores, x, gates))
    np.testing.assert_allclose(results["numpy"], results["pytorch"], rtol=1e-12, atol=1e-14)


def test_switching_backends_never_reuses_a_plan():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    net = cp(5, 2, expert_dims=(4, 3), rank=2)
    planner = Planner(net)
    with use_backend("numpy"):
        cores, x, gates = (
            random_cores(net, random_state=0),
            *random_inputs(net, (6,), random_state=1),
        )
        y_numpy = forward(net, cores, x, gates, planner=planner)
    with use_backend("pytorch"):
        t_cores = [tl.tensor(c) for c in cores]
        t_x, t_gates = tl.tensor(x), [tl.tensor(g) for g in gates]
        y_torch = forward(net, t_cores, t_x, t_gates, planner=planner)
    with use_backend("numpy"):
        y_again = forward(net, cores, x, gates, planner=planner)
    assert isinstance(y_numpy, np.ndarray) and isinstance(y_again, np.ndarray)
    assert isinstance(y_torch, torch.Tensor)
    assert sorted(k[2] for k in planner.cache.keys()) == ["numpy", "pytorch"]
    assert planner.cache.misses == 2
    np.testing.assert_allclose(y_torch.numpy(), y_numpy, rtol=1e-12)


def test_thread_local_backends_are_respected():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    net = cp(3, 2, expert_dims=4, rank=2)
    planner = Planner(net)
    out = {}

    def worker():
        tl.set_backend("pytorch", local_threadsafe=True)
        cores = random_cores(net, random_state=0)
        x, gates = random_inputs(net, (3,), random_state=0)
        out["torch"] = forward(net, cores, x, gates, planner=planner)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    cores = random_cores(net, random_state=0)
    x, gates = random_inputs(net, (3,), random_state=0)
    out["numpy"] = forward(net, cores, x, gates, planner=planner)
    assert isinstance(out["torch"], torch.Tensor) and isinstance(out["numpy"], np.ndarray)
    assert sorted(k[2] for k in planner.cache.keys()) == ["numpy", "pytorch"]
    np.testing.assert_allclose(out["torch"].numpy(), out["numpy"], rtol=1e-12)


@pytest.mark.parametrize(("active", "foreign"), [("numpy", "pytorch"), ("pytorch", "numpy")])
def test_arrays_of_another_backend_are_refused(active, foreign):
    for name in (active, foreign):
        if name not in AVAILABLE:
            pytest.skip(f"backend {name} is not usable here")
    net = cp(3, 2, expert_dims=4, rank=2)
    with use_backend(foreign):
        cores = random_cores(net, random_state=0)
        x, gates = random_inputs(net, (3,), random_state=0)
    with use_backend(active):
        with pytest.raises(
            TypeError, match=f"not a tensor of the active TensorLy backend '{active}'"
        ):
            forward(net, cores, x, gates)
        with pytest.raises(TypeError, match=r"cores\[0\] is a .*, not a tensor of the active"):
            materialize(net, cores)


# --------------------------------------------------------------- differentiable


GRAD_NETWORKS = pytest.mark.parametrize(
    "net",
    [
        cp(3, 2, expert_dims=(3, 2), rank=2),
        tr(2, 2, expert_dims=3, rank=2),
        tucker(2, 2, expert_dims=3, rank=2, bias=False),
    ],
    ids=["cp-2-levels", "tr", "tucker-no-bias"],
)


@GRAD_NETWORKS
def test_torch_gradcheck_through_cores_input_and_gates(net):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    with use_backend("pytorch"):
        cores = [c.requires_grad_() for c in random_cores(net, random_state=0)]
        x, gates = random_inputs(net, (2, 2), random_state=1)
        x.requires_grad_()
        gates = [g.requires_grad_() for g in gates]
        n_cores = len(cores)

        def fn(*args):
            return forward(net, list(args[:n_cores]), args[n_cores], list(args[n_cores + 1 :]))

        assert torch.autograd.gradcheck(fn, (*cores, x, *gates), fast_mode=True)


def _gradients(backend, net, cores, x, gates):
    """d sum(forward) / d (cores, x, gates) on ``backend``, as float64 NumPy arrays."""
    n_cores = len(cores)
    with use_backend(backend):
        args = [tl.tensor(a, dtype=backend_dtype("float32")) for a in (*cores, x, *gates)]

        def loss(*args):
            y = forward(net, list(args[:n_cores]), args[n_cores], list(args[n_cores + 1 :]))
            return (y * y).sum()

        if backend == "pytorch":
            import torch

            args = [a.requires_grad_() for a in args]
            return [to_numpy64(g) for g in torch.autograd.grad(loss(*args), args)]
        if backend == "jax":
            import jax

            grads = jax.grad(loss, argnums=tuple(range(len(args))))(*args)
            return [to_numpy64(g) for g in grads]
    raise NotImplementedError(f"no gradient oracle for {backend}")


@pytest.mark.parametrize(
    "backend_name",
    [p for p in backend_params(differentiable=True) if p.id != "pytorch"],
)
@GRAD_NETWORKS
def test_gradients_agree_with_pytorch(backend_name, net):
    if "pytorch" not in AVAILABLE:
        pytest.skip("the oracle is pytorch, which is not usable here")
    rng = np.random.RandomState(0)
    cores = [rng.uniform(-1, 1, s) for s in net.core_shapes]
    x = rng.uniform(-1, 1, (4, net.in_features))
    gates = [rng.uniform(0, 1, (4, n)) for n in net.expert_dims]
    expected = _gradients("pytorch", net, cores, x, gates)
    for got, want in zip(_gradients(backend_name, net, cores, x, gates), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_non_contiguous_torch_input_gives_the_same_numbers():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    net = cp(5, 2, expert_dims=(4, 3), rank=2)
    with use_backend("pytorch"):
        cores = random_cores(net, random_state=0)
        x, gates = random_inputs(net, (6,), random_state=1)
        x_t = torch.tensor(to_numpy64(x).T.copy()).T  # same values, transposed strides
        assert not x_t.is_contiguous()
        cores_t = [torch.tensor(to_numpy64(c).T.copy()).T for c in cores]
        torch.testing.assert_close(
            forward(net, cores_t, x_t, gates), forward(net, cores, x, gates), rtol=1e-12, atol=0
        )


# ------------------------------------------------------------------ CUDA torch


def _torch_cuda():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("network", ["cp", "tr", "tucker"])
def test_torch_layers_on_cuda_equal_the_cpu_layers(network):
    """Outputs and gradients on CUDA equal the CPU's; every result stays on the device."""
    torch = _torch_cuda()
    from mumoe.nn import MuMoE, MuMoEBlock

    rank = {"cp": 6, "tr": (2, 3, 2, 4), "tucker": (2, 3, 4, 4)}[network]
    torch.manual_seed(0)
    for cpu in (
        MuMoE(12, 5, network, expert_dims=(6, 3), rank=rank, dtype=torch.float64),
        MuMoEBlock(
            12,
            16,
            5,
            network=network,
            expert_dims=(6, 3),
            rank=rank,
            input_norm=True,
            dtype=torch.float64,
        ),
    ):
        for p in cpu.parameters():
            p.data.uniform_(-1, 1)
        gpu = __import__("copy").deepcopy(cpu).cuda()
        for rows in (1, 64):  # the bias inside the contraction (bias_matmul), small and large
            x = torch.randn(rows, 3, 12, dtype=torch.float64)
            y_cpu, y_gpu = cpu(x), gpu(x.cuda())
            assert y_gpu.device.type == "cuda"
            torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
            y_cpu.square().sum().backward()
            y_gpu.square().sum().backward()
            for (name, a), b in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
                assert b.grad.device.type == "cuda", name
                torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-8, atol=1e-8)
            cpu.zero_grad(), gpu.zero_grad()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            y = gpu.float()(x.float().cuda())
        assert y.dtype == torch.bfloat16 and y.device.type == "cuda"


def test_topk_gating_on_every_backend(backend_and_dtype):
    from mumoe.gates import topk

    _, dtype = backend_and_dtype
    z = np.random.default_rng(0).standard_normal((4, 40))
    z[0, :5] = 3.0  # a tie across the boundary: all five kept
    with use_backend("numpy"):
        expected = topk(z, 3)
    out = to_numpy64(topk(tl.tensor(z.astype(dtype), dtype=backend_dtype(dtype)), 3))
    np.testing.assert_array_equal(out > 0, expected > 0)
    np.testing.assert_allclose(out, expected, rtol=1e-5 if dtype == "float32" else 1e-12)
