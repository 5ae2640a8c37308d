"""Gate statistics and balance losses over a process group: two gloo processes, started here."""

from __future__ import annotations

import copy
import datetime
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mumoe.nn import ExpertMonitor, MuMoE, collect_aux_losses, gate_mask, reduce_balance_over
from tests.nn.test_ddp import free_port

WORLD = 2
STEPS = 2
BALANCE = {"importance_cv2": 1.0, "uniform_kl": 0.5, "z_loss": 0.1}


def build():
    """Layer-norm gating (no cross-row statistics), two levels, every balance loss."""
    torch.manual_seed(0)
    layer = MuMoE(
        6, 3, "cp", expert_dims=(4, 3), rank=2, normalization="ln", balance=BALANCE
    ).double()
    for projection in layer.gate.projections:
        torch.nn.init.normal_(projection)  # unbalanced routing: losses with a gradient
    return layer


def batch(rank, step):
    """Batches of unequal sizes and padding; on step 1, rank 1 holds padding only."""
    generator = torch.Generator().manual_seed(10 * step + rank)
    x = torch.randn(2, 3 + 2 * rank, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(x.shape[:-1], generator=generator) < 0.6
    mask[0, 0] = rank == 0 or step != 1
    if rank == 1 and step == 1:
        mask[:] = False
    return x, mask


def step_loss(model, layer, x, mask):
    """A task term of this process's tokens, plus the balance losses."""
    with gate_mask(layer, mask):
        y = model(x)
    aux = collect_aux_losses(layer)
    return (y * mask[..., None]).sum(), aux


def worker(rank, port, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A collective one process misses fails within the minute instead of hanging.
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timeout)
    try:
        layer = reduce_balance_over(build())
        model = DistributedDataParallel(layer)
        results = {
            "aux": [],
            "grads": [],
            "kept": layer.gate.balance_group is dist.group.WORLD,
            # (Before a forward pass: a gate's aux_loss, a non-leaf, cannot be deep-copied.)
            "copied_group": copy.deepcopy(layer).gate.balance_group,
        }
        with ExpertMonitor(layer, process_group=True) as monitor:
            for step in range(STEPS):
                model.zero_grad()
                task, aux = step_loss(model, layer, *batch(rank, step))
                (task + aux).backward()  # DDP averages the gradients over the processes
                results["aux"].append(aux.detach())
                results["grads"].append([p.grad.clone() for p in layer.gate.projections])
        results["metrics"] = monitor.metrics()
        results["history"] = [monitor.history("gate", level) for level in (0, 1)]
        layer.eval()  # eval passes stay local: each process its own batch
        layer(batch(rank, STEPS)[0])
        results["eval_aux"] = layer.gate.aux_loss.detach()
        torch.save(results, os.path.join(out, f"rank-{rank}.pt"))
        dist.barrier()  # both ranks leave together (see tests/nn/test_ddp.py)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/nn/test_ddp.py: no interpreter teardown on a gloo thread


@pytest.mark.slow
def test_two_processes_see_the_global_batchs_usage_loss_and_gradient(tmp_path):
    torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=False) for r in range(WORLD)]

    # One process that sees the concatenated batch (as rows: the ranks' shapes differ).
    single = build()
    with ExpertMonitor(single) as monitor:
        for step in range(STEPS):
            parts = [batch(rank, step) for rank in range(WORLD)]
            x = torch.cat([p[0].reshape(-1, 6) for p in parts])
            mask = torch.cat([p[1].reshape(-1) for p in parts])
            single.zero_grad()
            task, aux = step_loss(single, single, x, mask)
            (task / WORLD + aux).backward()  # DDP's mean of the processes' task terms
            for result in results:
                torch.testing.assert_close(result["aux"][step], aux.detach(), rtol=1e-12, atol=0)
                for got, projection in zip(
                    result["grads"][step], single.gate.projections, strict=True
                ):
                    assert projection.grad.abs().max() > 1e-3
                    torch.testing.assert_close(got, projection.grad, rtol=1e-10, atol=1e-12)
    expected = monitor.metrics()
    for result in results:
        assert result["kept"] and result["copied_group"] is None
        assert result["metrics"].keys() == expected.keys()
        for key, value in expected.items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
        for level in (0, 1):
            torch.testing.assert_close(
                torch.from_numpy(result["history"][level]),
                torch.from_numpy(monitor.history("gate", level)),
                rtol=1e-6,
                atol=1e-7,
            )
    single.eval()
    local = []
    for rank, result in enumerate(results):
        single(batch(rank, STEPS)[0])
        local.append(single.gate.aux_loss.detach())
        torch.testing.assert_close(result["eval_aux"], local[-1], rtol=1e-12, atol=0)
    assert not torch.allclose(local[0], local[1])  # so the check above tells local from global


def test_a_process_group_needs_torch_distributed_initialised():
    assert not dist.is_initialized()
    layer = MuMoE(8, 4, "cp", expert_dims=5, rank=2, balance={"uniform_kl": 1.0})
    message = r"=True sums over processes, but torch.distributed is not initialised: call"
    for call in (
        lambda: reduce_balance_over(layer),
        lambda: reduce_balance_over(layer, True),
        lambda: ExpertMonitor(layer, process_group=True),
        lambda: setattr(layer.gate, "balance_group", True),
    ):
        with pytest.raises(RuntimeError, match=message):
            call()
    assert layer.gate.balance_group is None


def test_a_process_group_of_another_type_is_refused():
    layer = MuMoE(8, 4, "cp", expert_dims=5, rank=2, balance={"uniform_kl": 1.0})
    expected = (
        r"process_group must be a torch.distributed.ProcessGroup, True \(the default group\) "
        r"or None \(this process alone\), got "
    )
    for bad, name in (("world", "str"), (1, "int"), (object(), "object")):
        with pytest.raises(TypeError, match=expected + name):
            reduce_balance_over(layer, bad)
        with pytest.raises(TypeError, match=expected + name):
            ExpertMonitor(layer, process_group=bad)
        with pytest.raises(TypeError, match=r"^balance_group must be"):
            layer.gate.balance_group = bad
    with pytest.raises(ValueError, match="has no MuMoEGate: a layer built with gated=False"):
        reduce_balance_over(MuMoE(8, 4, "cp", expert_dims=5, rank=2, gated=False), None)


def test_without_a_group_the_gates_measure_their_own_batch():
    torch.manual_seed(0)
    layer = MuMoE(8, 4, "cp", expert_dims=5, rank=2, balance={"importance_cv2": 1.0})
    torch.nn.init.normal_(layer.gate.projections[0])
    x = torch.randn(6, 8)
    layer(x)
    before = layer.gate.aux_loss
    for off in (None, False):
        assert reduce_balance_over(layer, off) is layer and layer.gate.balance_group is None
        layer(x)
        torch.testing.assert_close(layer.gate.aux_loss, before, rtol=0, atol=0)
    with (
        ExpertMonitor(layer, process_group=None) as a,
        ExpertMonitor(layer, process_group=False) as b,
    ):
        layer(x)
    assert a.metrics() == b.metrics() and a.metrics()
