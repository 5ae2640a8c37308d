"""Expert health in a torch training loop: balance losses set by the gate, masks, the monitor."""

from __future__ import annotations

import pytest
import tensorly as tl
import torch

from mumoe.gates import importance_cv2, uniform_kl


def test_a_layer_built_with_a_loss_sets_it_on_every_forward():
    from mumoe.nn import MuMoE, MuMoEBlock, collect_aux_losses

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        MuMoE(8, 8, "cp", expert_dims=6, rank=3, balance={"uniform_kl": 0.5, "z_loss": 0.1}),
        MuMoEBlock(8, 16, expert_dims=(4, 2), rank=2, balance={"importance_cv2": 1.0}),
    )
    torch.nn.init.normal_(model[0].gate.projections[0])
    x = torch.randn(10, 8)
    model(x)
    first = model[0].gate.aux_loss
    with torch.no_grad():
        gates = model[0].gate(x)
    assert torch.allclose(first, model[0].gate.aux_loss)  # replaced, not added
    model(x)
    total = collect_aux_losses(model)
    assert torch.allclose(total, model[0].gate.aux_loss + model[1].gate.aux_loss)
    with tl.backend_context("pytorch"):
        expected = 0.5 * uniform_kl(gates[0]) + 1.0 * importance_cv2(model[1].gate(x)[0])
    assert total > 0 and torch.isfinite(total) and expected > 0
    total.backward()
    assert model[0].gate.projections[0].grad.abs().sum() > 0
    assert "balance={'uniform_kl': 0.5, 'z_loss': 0.1}" in repr(model[0].gate)
    plain = MuMoE(8, 8, "cp", expert_dims=6, rank=3)
    plain(x)
    assert plain.gate.aux_loss is None and float(collect_aux_losses(plain)) == 0.0


def test_padding_is_left_out_of_the_loss_and_the_monitor():
    from mumoe.nn import ExpertMonitor, MuMoE, gate_mask

    torch.manual_seed(0)
    layer = MuMoE(
        8, 4, "cp", expert_dims=6, rank=2, normalization=None, balance={"importance_cv2": 1.0}
    )
    torch.nn.init.normal_(layer.gate.projections[0])
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    padded = x.clone()
    padded[0, 3:] = 100.0  # whatever padding holds
    with ExpertMonitor(layer) as monitor, gate_mask(layer, mask):
        layer(padded)
        masked_loss = layer.gate.aux_loss
    layer(x[mask.bool()])  # the real tokens alone
    torch.testing.assert_close(masked_loss, layer.gate.aux_loss)
    with ExpertMonitor(layer) as alone:
        layer(x[mask.bool()])
    assert monitor.metrics() == alone.metrics()
    assert layer.gate.mask is None  # restored
    with gate_mask(layer, torch.ones(3, 5)), pytest.raises(ValueError, match="tokens' shape"):
        layer(x)


def test_the_monitor_finds_dead_experts_and_keeps_bounded_memory():
    from mumoe.nn import ExpertMonitor, MuMoE

    layer = MuMoE(8, 4, "cp", expert_dims=5, rank=2, normalization=None)
    with torch.no_grad():  # expert 3 can never win: a hugely negative logit
        layer.gate.projections[0].zero_()
    bias = torch.tensor([0.0, 0.0, 0.0, -1e3, 0.0])
    layer.gate.activation = lambda z, a=layer.gate.activation: a(z + bias)
    monitor = ExpertMonitor(layer, window=4, every=2, history=3)
    for _ in range(10):
        layer(torch.randn(6, 8))
    layer.eval()
    layer(torch.randn(6, 8))  # not recorded: training_only
    monitor.close()
    layer.train()
    layer(torch.randn(6, 8))  # not recorded: closed
    assert monitor.steps == 10 and monitor.dead_experts("gate") == [3]
    metrics = monitor.metrics()
    assert metrics["gate/0/dead"] == 1.0
    assert metrics["gate/0/effective_experts"] == pytest.approx(4.0)
    assert monitor.history("gate").shape == (3, 5)  # every 2nd of 10, at most 3 kept
    assert all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(KeyError, match="no gate 'fc1'; the monitored gates are \\['gate'\\]"):
        monitor.history("fc1")


def test_layers_without_gates_say_so():
    from mumoe.nn import ExpertMonitor, MuMoE, collect_aux_losses, gate_mask

    ungated = MuMoE(8, 4, "cp", expert_dims=5, rank=2, gated=False)
    for call in (
        lambda: collect_aux_losses(ungated),
        lambda: ExpertMonitor(ungated),
        lambda: gate_mask(ungated, torch.ones(3)).__enter__(),
    ):
        with pytest.raises(ValueError, match="has no MuMoEGate: a layer built with gated=False"):
            call()
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        ExpertMonitor(MuMoE(8, 4, "cp", expert_dims=5, rank=2), window=0)
