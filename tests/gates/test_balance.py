"""Expert health (issue #18): utilisation metrics, balance losses, the monitor, padding."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from mumoe.gates import (
    LOSSES,
    balance_loss,
    check_balance,
    importance_cv2,
    joint_usage,
    router_z_loss,
    softmax,
    sparsemax,
    uniform_kl,
    usage,
)
from mumoe.testing import backend_dtype, to_numpy64
from tests.helpers import backend_params, use_backend

batches = st.tuples(
    st.integers(1, 40), st.integers(1, 60), st.floats(0.1, 10.0), st.integers(0, 2**31)
)


def draw(tokens, n, scale, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((tokens, n)) * scale
    mask = rng.random(tokens) < 0.7
    mask[0] = True  # at least one token
    return logits, sparsemax(logits), mask


@settings(max_examples=60)
@given(batches)
def test_usage_is_the_masked_mean_of_the_kept_tokens(case):
    logits, a, mask = draw(*case)
    u = usage(a, mask=mask)
    kept = a[mask]
    np.testing.assert_allclose(u.mass, kept.mean(0), atol=1e-12)
    np.testing.assert_allclose(u.support, (kept > 0).mean(0), atol=1e-12)
    np.testing.assert_allclose(u.mass.sum(), 1.0)
    p = kept.mean(0)
    h = -np.sum(p[p > 0] * np.log(p[p > 0]))
    n = a.shape[-1]
    np.testing.assert_allclose(float(u.effective_experts), np.exp(h), rtol=1e-10)
    np.testing.assert_allclose(float(u.entropy), h / np.log(n) if n > 1 else 1.0, rtol=1e-10)
    assert 1 - 1e-9 <= float(u.effective_experts) <= n + 1e-9
    np.testing.assert_allclose(float(u.mean_support), (kept > 0).sum(1).mean())
    assert u.tokens == mask.sum()
    # Padding changes nothing: the same as the kept tokens alone, whatever the padded hold.
    garbage = a.copy()
    garbage[~mask] = np.eye(a.shape[-1])[0]
    for fn in (importance_cv2, uniform_kl):
        np.testing.assert_allclose(float(fn(garbage, mask)), float(fn(kept)), atol=1e-12)
    np.testing.assert_allclose(
        float(router_z_loss(logits * 0 + 50 * ~mask[:, None], mask)),
        float(router_z_loss(logits[mask] * 0)),
        atol=1e-12,
    )


@settings(max_examples=40)
@given(batches)
def test_joint_usage_sums_the_products_of_the_levels(case):
    _, a, mask = draw(*case)
    b = softmax(np.random.default_rng(case[-1]).standard_normal((a.shape[0], 3)))
    joint = joint_usage([a, b], mask)
    expected = np.einsum("tn,tm->nm", a[mask], b[mask]) / mask.sum()
    np.testing.assert_allclose(joint, expected, atol=1e-12)
    np.testing.assert_allclose(joint.sum(1), usage(a, mask).mass, atol=1e-12)


def test_balanced_routing_scores_lower_than_collapsed():
    uniform = np.full((8, 4), 0.25)
    collapsed = np.tile([1.0, 0.0, 0.0, 0.0], (8, 1))
    spread = softmax(np.random.default_rng(0).standard_normal((8, 4)))
    for loss in (importance_cv2, uniform_kl):
        assert float(loss(uniform)) == pytest.approx(0.0, abs=1e-12)
        assert float(loss(uniform)) < float(loss(spread)) < float(loss(collapsed))
    assert float(importance_cv2(collapsed)) == pytest.approx(3.0)
    assert float(uniform_kl(collapsed)) == pytest.approx(np.log(4))
    assert float(router_z_loss(np.zeros((3, 4)))) < float(router_z_loss(np.full((3, 4), 5.0)))
    u = usage(collapsed)
    assert (float(u.entropy), float(u.effective_experts), u.as_floats()["dead"]) == (0.0, 1.0, 3.0)


@pytest.mark.parametrize("backend", backend_params(differentiable=True))
def test_gradients_push_routing_away_from_collapse(backend):
    # Softmax gates over logits that favour expert 0: every balance loss grows with
    # that logit, so gradient descent lowers it.
    logits = np.tile([3.0, 0.0, -1.0, 0.5], (6, 1))
    with use_backend(backend):
        for name, (loss, takes_logits) in LOSSES.items():
            grad = _gradient(
                backend, lambda z, f=loss, t=takes_logits: f(z if t else softmax(z)), logits
            )
            assert grad[:, 0].min() > 0, f"{name} on {backend}: {grad[:, 0]}"
            with use_backend("numpy"):
                expected = _numeric_gradient(
                    lambda z, f=loss, t=takes_logits: float(f(z if t else softmax(z))), logits
                )
            np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def _gradient(backend, fn, x):
    if backend == "pytorch":
        import torch

        leaf = torch.tensor(x, requires_grad=True)
        fn(leaf).backward()
        return leaf.grad.numpy()
    import jax

    return np.asarray(jax.grad(lambda z: fn(z))(tl.tensor(x.astype(np.float32))), dtype=float)


def _numeric_gradient(fn, x, eps=1e-6):
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[index] = eps
        grad[index] = (fn(x + step) - fn(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("backend", backend_params())
def test_metrics_and_losses_on_every_backend(backend):
    logits, a, mask = draw(12, 9, 1.0, 3)
    with use_backend("numpy"):
        expected = usage(a, mask)
        losses = {name: float(f(logits if t else a, mask)) for name, (f, t) in LOSSES.items()}
    with use_backend(backend):
        dtype = backend_dtype("float64" if backend != "jax" else "float32")
        ta, tz = tl.tensor(a, dtype=dtype), tl.tensor(logits, dtype=dtype)
        tmask = tl.tensor(mask)
        got = usage(ta, tmask)
        tolerance = 1e-5 if backend == "jax" else 1e-12
        for field in ("mass", "support"):
            np.testing.assert_allclose(
                to_numpy64(getattr(got, field)), getattr(expected, field), atol=tolerance
            )
        for name, (f, t) in LOSSES.items():
            assert float(f(tz if t else ta, tmask)) == pytest.approx(losses[name], rel=1e-4)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("n", [2, 3, 7, 32, 100, 1000])
def test_normalised_metrics_stay_within_their_bounds_in_float32(backend, n):
    # Issue #26, item 10: a uniform float32 mass gave entropy 1.0000001 and 32.000008
    # effective experts of 32.
    with use_backend(backend):
        for tokens in (1, 7, 13):
            uniform = tl.tensor(np.full((tokens, n), 1 / n), dtype=backend_dtype("float32"))
            got = usage(uniform)
            assert 0.0 <= float(got.entropy) <= 1.0
            assert 1.0 <= float(got.effective_experts) <= n
        one_hot = tl.tensor(np.eye(n)[:1], dtype=backend_dtype("float32"))
        assert float(usage(one_hot).entropy) == 0.0
        assert float(usage(one_hot).effective_experts) == 1.0


def test_bad_masks_and_empty_batches_say_what_was_expected():
    a = np.full((2, 3, 4), 0.25)
    with pytest.raises(
        ValueError, match=r"mask must have the tokens' shape \(2, 3\).*got \(3, 2\)"
    ):
        usage(a, np.ones((3, 2), dtype=bool))
    with pytest.raises(TypeError, match=r"mask must be bool or integer .* got float64"):
        usage(a, np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"an integer mask must hold 0 .* and 1 .* only"):
        usage(a, np.full((2, 3), 2))
    with pytest.raises(ValueError, match="every token of gates is masked"):
        uniform_kl(a, np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="has no tokens \\(an empty batch\\)"):
        usage(np.zeros((0, 4)))
    with pytest.raises(TypeError, match="must be a floating tensor"):
        usage(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="unknown balance loss 'cv'; expected one of"):
        check_balance({"cv": 1.0})
    with pytest.raises(ValueError, match="must be finite and >= 0, got -1"):
        check_balance({"z_loss": -1})
    with pytest.raises(ValueError, match="share their token shape"):
        joint_usage([np.ones((2, 3)), np.ones((3, 3))])
    with pytest.raises(ValueError, match="balance has no loss"):
        balance_loss({}, [a], [a])


def test_a_tensor_of_another_backend_is_refused_by_name():
    # Issue #26, item 5: a torch tensor while TensorLy's backend is NumPy failed inside NumPy
    # ("sum() got an unexpected keyword argument 'axis'").
    torch = pytest.importorskip("torch", reason="needs a second backend")
    with pytest.raises(TypeError, match=r"gates is a torch\.Tensor, not a tensor of the active"):
        usage(torch.full((3, 4), 0.25))
    with pytest.raises(TypeError, match=r"mask is a torch\.Tensor, not a tensor of the active"):
        usage(np.full((3, 4), 0.25), mask=torch.ones(3, dtype=torch.bool))
    with use_backend("pytorch"):
        assert float(usage(torch.full((3, 4), 0.25)).entropy) == pytest.approx(1.0)


@pytest.mark.parametrize("backend", backend_params())
def test_joint_usage_of_many_levels(backend):
    # Issue #26, item 12: 21 levels hit an einsum letter limit with NumPy's message.
    with use_backend(backend):
        ones = [tl.tensor(np.ones((3, 1)), dtype=backend_dtype("float32")) for _ in range(21)]
        assert tuple(tl.shape(joint_usage(ones))) == (1,) * 21
        halves = [tl.tensor(np.full((3, 2), 0.5), dtype=backend_dtype("float32"))] * 20
        joint = to_numpy64(joint_usage(halves))  # 2**20 joint experts: JOINT_LIMIT exactly
        assert joint.shape == (2,) * 20
        np.testing.assert_allclose(joint, 2.0**-20, rtol=1e-5)


# ------------------------------------------------- sums over processes (issue #29, item 4)


def two_processes(fn, mine, theirs):
    """``fn(*mine)`` under a fake two-process all-reduce: each sum plus ``fn(*theirs)``'s.

    Both calls must make the same reduce calls, in the same order (as ranks must).
    """
    sent = []
    # Their sums, recorded; their own result is thrown away (+ 1: a count that is never
    # zero, as the true total is not when this process has tokens).
    fn(*theirs, reduce=lambda sums: sent.append(sums) or sums + 1)
    count = len(sent)
    out = fn(*mine, reduce=lambda sums: sums + sent.pop(0))
    assert count > 0 and not sent, f"{count} sums sent, {len(sent)} left unused"
    return out


def _balance(values, logits, mask=None, reduce=None):
    weights = {"importance_cv2": 1.0, "uniform_kl": 0.5, "z_loss": 0.1}
    return balance_loss(weights, values, logits, mask, reduce=reduce)


@settings(max_examples=40)
@given(batches, st.integers(0, 40))
def test_two_halves_summed_measure_the_whole_batch(case, cut):
    logits, a, mask = draw(*case)
    cut = min(cut, len(a))  # an empty first half included
    b = softmax(np.random.default_rng(case[-1]).standard_normal((len(a), 3)))
    first = (slice(None, cut), slice(cut, None))
    halves = [(a[s], mask[s]) for s in first]
    u = two_processes(usage, *halves)
    whole = usage(a, mask)
    for field in ("mass", "support"):
        np.testing.assert_allclose(getattr(u, field), getattr(whole, field), atol=1e-12)
    for field in ("entropy", "effective_experts", "mean_support"):
        assert float(getattr(u, field)) == pytest.approx(float(getattr(whole, field)), rel=1e-12)
    assert u.tokens == whole.tokens == mask.sum()
    for name, (fn, takes_logits) in LOSSES.items():
        values = logits if takes_logits else a
        got = two_processes(fn, *[(values[s], mask[s]) for s in first])
        assert float(got) == pytest.approx(float(fn(values, mask)), rel=1e-10, abs=1e-12), name
    joint = two_processes(joint_usage, *[([a[s], b[s]], mask[s]) for s in first])
    np.testing.assert_allclose(joint, joint_usage([a, b], mask), atol=1e-12)
    got = two_processes(_balance, *[([a[s], b[s]], [logits[s]], mask[s]) for s in first])
    assert float(got) == pytest.approx(float(_balance([a, b], [logits], mask)), rel=1e-10)


@pytest.mark.parametrize("backend", backend_params())
def test_a_process_whose_tokens_are_all_padding_counts_none(backend):
    logits, a, mask = draw(10, 5, 2.0, 7)
    mask[:4] = False  # the first process: padding only
    with use_backend("numpy"):
        whole = usage(a, mask)
        losses = {name: float(f(logits if t else a, mask)) for name, (f, t) in LOSSES.items()}
    with use_backend(backend):
        dtype = backend_dtype("float64" if backend != "jax" else "float32")
        ta, tz, tmask = tl.tensor(a, dtype=dtype), tl.tensor(logits, dtype=dtype), tl.tensor(mask)
        tolerance = 1e-5 if backend == "jax" else 1e-12
        for mine, theirs in ((slice(None, 4), slice(4, None)), (slice(4, None), slice(None, 4))):
            u = two_processes(usage, (ta[mine], tmask[mine]), (ta[theirs], tmask[theirs]))
            assert u.tokens == whole.tokens
            np.testing.assert_allclose(to_numpy64(u.mass), whole.mass, atol=tolerance)
            np.testing.assert_allclose(to_numpy64(u.support), whole.support, atol=tolerance)
            for name, (f, t) in LOSSES.items():
                values = tz if t else ta
                got = two_processes(f, (values[mine], tmask[mine]), (values[theirs], tmask[theirs]))
                assert float(got) == pytest.approx(
                    losses[name], rel=1e-4 if tolerance > 1e-6 else 1e-10
                )


@pytest.mark.parametrize("backend", backend_params(differentiable=True))
def test_the_gradient_through_the_sums_is_the_whole_batchs(backend):
    logits = np.random.default_rng(1).standard_normal((9, 4)) * 2
    mask_np = np.arange(9) % 4 != 1
    with use_backend(backend):
        # Under jax.grad a mask's token count cannot be read back to check it: no mask there.
        mask = None if backend == "jax" else tl.tensor(mask_np)

        def whole(z):
            return _balance([softmax(z)], [z], mask)

        def split(z):
            halves = [(slice(None, 5),), (slice(5, None),)]
            args = [([softmax(z[s])], [z[s]], None if mask is None else mask[s]) for (s,) in halves]
            return two_processes(_balance, *args)

        expected = _gradient(backend, whole, logits)
        got = _gradient(backend, split, logits)
    assert np.abs(expected).max() > 1e-3  # a gradient worth comparing
    np.testing.assert_allclose(got, expected, rtol=1e-4 if backend == "jax" else 1e-10, atol=1e-7)


def test_a_bad_reduce_and_no_token_anywhere_say_so():
    a = np.full((3, 4), 0.25)
    with pytest.raises(
        ValueError,
        match=r"reduce must return the sum of its 1-D input, a tensor "
        r"of its shape \(9,\); got \(1,\)",
    ):
        usage(a, reduce=lambda sums: sums[:1])
    with pytest.raises(ValueError, match=r"reduce must return .* got float"):
        uniform_kl(a, reduce=lambda sums: float(sums.sum()))
    nothing = np.zeros(3, dtype=bool)
    for fn in (usage, importance_cv2, uniform_kl, router_z_loss):
        with pytest.raises(ValueError, match=r"has no token on any process \(all padding"):
            fn(a, nothing, reduce=lambda sums: sums)  # every process: padding only
    with pytest.raises(ValueError, match="gates has no token on any process"):
        usage(np.zeros((0, 4)), reduce=lambda sums: sums)
    with pytest.raises(ValueError, match=r"every token of gates is masked"):  # no reduce: local
        usage(a, nothing)


def test_half_precision_sums_do_not_overflow_over_a_large_or_global_batch():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from mumoe.backends import thread_backend
    from mumoe.gates import router_z_loss, usage

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40_000, 8, generator=generator)  # 80,000 tokens over two "ranks"
    gates = torch.softmax(logits, -1)
    with thread_backend("pytorch"):
        for reduce in (None, lambda t: 2 * t):
            half = usage(gates.half(), reduce=reduce).as_floats()
            full = usage(gates, reduce=reduce).as_floats()
            assert all(abs(half[k] - full[k]) < 1e-2 * max(1, abs(full[k])) for k in full)
            loss = router_z_loss(logits.half(), reduce=reduce)
            assert torch.isfinite(loss) and abs(float(loss) - float(router_z_loss(logits))) < 1e-2
