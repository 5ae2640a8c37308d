"""Training with DistributedDataParallel over two CPU processes (gloo), started here."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from mumoe.nn import MuMoEBlock, TRMuMoE

WORLD = 2
STEPS = 4


def build(normalization):
    torch.manual_seed(0)
    if normalization == "bn":
        return MuMoEBlock(6, 10, 3, network="cp", expert_dims=(4, 2), rank=3)
    return TRMuMoE(6, 3, expert_dims=4, rank=2, normalization="ln")


def batch(rank, step):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)


def train(model, data):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def join(rank, port):
    """Join the two-process gloo group on this machine, one thread each."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def worker(rank, port, out):
    join(rank, port)
    try:
        for normalization in ("bn", "ln"):
            model = DistributedDataParallel(build(normalization))
            train(model, [batch(rank, step) for step in range(STEPS)])
            model.eval()
            model(batch(rank, STEPS)[0])  # an eval forward broadcasts rank 0's buffers
            torch.save(model.module.state_dict(), os.path.join(out, f"{normalization}-{rank}.pt"))
        # Both ranks leave together: gloo aborts a process whose peer tears down first.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Under load, the interpreter's teardown in a spawned process sometimes aborts on a
    # gloo thread ("terminate called without an active exception", SIGABRT) after all
    # the work is done. The results are on disk: leave without that teardown.
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_keeps_replicas_identical_and_averages_gradients(tmp_path):
    torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for normalization in ("bn", "ln"):
        states = [torch.load(tmp_path / f"{normalization}-{r}.pt") for r in range(WORLD)]
        initial = build(normalization).state_dict()
        for key, value in states[0].items():
            torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=key)
        assert any(not torch.equal(states[0][k], initial[k]) for k in initial)

    # Without cross-sample statistics (layer-norm gating), DDP over two ranks is
    # plain training on the union of their batches.
    single = build("ln")
    union = []
    for step in range(STEPS):
        parts = [batch(rank, step) for rank in range(WORLD)]
        union.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    train(single, union)
    states = torch.load(tmp_path / "ln-0.pt")
    for key, value in single.state_dict().items():
        torch.testing.assert_close(states[key], value, rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------- FSDP


def build_fsdp(kind):
    """μMoE layers (layer-norm gating: no cross-rank statistics), or a converted model."""
    from mumoe.nn import MuMoE, replace_linear

    torch.manual_seed(0)
    if kind == "mumoe":
        return torch.nn.Sequential(
            MuMoE(6, 8, "cp", expert_dims=4, rank=3, normalization="ln"),
            torch.nn.GELU(),
            TRMuMoE(8, 3, expert_dims=4, rank=2, normalization="ln"),
        )
    dense = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    return replace_linear(dense, include="0|2", network="mxd", expert_dims=4, normalization="ln")


def fsdp_worker(rank, port, out):
    join(rank, port)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            set_model_state_dict,
        )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))

        def sharded(kind):
            model = build_fsdp(kind)
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh)  # each layer's cores and gate, sharded
            return fully_shard(model, mesh=mesh)

        for kind in ("mumoe", "converted"):
            model = sharded(kind)
            params = list(model.parameters())
            is_sharded = all(type(p).__name__ == "DTensor" for p in params) and sum(
                p.to_local().numel() for p in params
            ) < sum(p.numel() for p in params)  # this rank holds a part of each parameter
            train(model, [batch(rank, step) for step in range(STEPS)])
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            if rank == 0:
                torch.save(full, os.path.join(out, f"fsdp-{kind}.pt"))
            checkpoint = os.path.join(out, f"fsdp-{kind}-checkpoint")
            dcp.save(get_model_state_dict(model), checkpoint_id=checkpoint)  # sharded
            fresh = sharded(kind)
            state = get_model_state_dict(fresh)
            dcp.load(state, checkpoint_id=checkpoint)
            set_model_state_dict(fresh, state)
            x = batch(rank, STEPS)[0]
            with torch.no_grad():
                same = torch.equal(fresh(x), model(x))
            torch.save((is_sharded, same), os.path.join(out, f"fsdp-{kind}-reloaded-{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see worker()


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(__import__("torch.distributed.fsdp", fromlist=["x"]), "fully_shard"),
    reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2, torch >= 2.6)",
)
def test_fsdp_trains_as_one_process_and_its_sharded_checkpoint_reloads(tmp_path):
    port = free_port()
    torch.multiprocessing.spawn(fsdp_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=True)
    for kind in ("mumoe", "converted"):
        single = build_fsdp(kind)
        union = []
        for step in range(STEPS):
            parts = [batch(rank, step) for rank in range(WORLD)]
            union.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
        train(single, union)
        sharded = torch.load(tmp_path / f"fsdp-{kind}.pt")
        assert sharded.keys() == single.state_dict().keys()
        for key, value in single.state_dict().items():
            torch.testing.assert_close(sharded[key], value, rtol=1e-5, atol=1e-6, msg=key)
        for rank in range(WORLD):
            is_sharded, reloaded = torch.load(tmp_path / f"fsdp-{kind}-reloaded-{rank}.pt")
            assert is_sharded and reloaded, (kind, rank, is_sharded, reloaded)
