"""describe and flops: what a network costs along the path a call uses."""

from __future__ import annotations

from hypothesis import given

from mumoe import cp, describe, flops, forward, random_cores, tr, tucker
from mumoe.plan import Planner
from mumoe.testing import networks, random_inputs


@given(networks())
def test_flops_are_affine_in_batch_within_a_bucket(net):
    # Batches 5..8 share one path (bucket 8): its FLOPs are a*b + c, where c
    # counts the contractions between cores alone.
    f5, f6, f7, f8 = (flops(net, b) for b in (5, 6, 7, 8))
    assert f6 - f5 == f7 - f6 == f8 - f7 > 0
    assert f5 - 5 * (f6 - f5) >= 0


def test_flops_of_cp_follow_the_chosen_path():
    # B rows: gate n (B N R) + input (B I' R) + Hadamard (B R) + output (B R O),
    # each pairwise product a multiply-add counted as two where it sums.
    net = cp(8, 4, expert_dims=16, rank=3)
    assert flops(net, 10) == 10 * (2 * 16 * 3 + 2 * 9 * 3 + 3 + 2 * 3 * 4)


def test_describe_shows_equation_cores_parameters_and_flops():
    text = describe(cp(768, 1000, expert_dims=128, rank=64), batch_size=256)
    assert "Network 'cp': 1 expert level, 128 experts, with bias" in text
    assert "n1 r, i r, o r" in text
    assert "(769, 64)" in text
    assert f"{64 * (128 + 769 + 1000):,}" in text
    assert "...n1, ...i, n1 r, i r, o r -> ...o" in text
    assert f"{flops(cp(768, 1000, expert_dims=128, rank=64), 256):,} for batch 256" in text


def test_describe_two_levels():
    text = describe(tr(16, 10, expert_dims=(8, 4), rank=2))
    assert "2 expert levels, 8 x 4 = 32 experts" in text
    assert "core 3" in text


def test_describe_and_flops_report_the_path_the_forward_pass_uses():
    import tensorly as tl

    net = tucker(6, 5, expert_dims=(4, 3), rank=(2, 2, 3, 3))
    planner = Planner(net, autotune=True)
    assert "autotune: not timed yet" in describe(net, batch_size=16, planner=planner)
    x, gates = random_inputs(net, (16,), random_state=0)
    forward(net, random_cores(net), x, gates, planner=planner)
    plan, source = planner.chosen(16, tl.get_backend(), x.dtype)
    assert source == "autotuned"
    text = describe(net, batch_size=16, planner=planner)
    assert "autotuned" in text and f"{flops(net, 16, planner=planner):,} for batch 16" in text
    assert flops(net, 16, planner=planner) == planner.flops(16, plan)
