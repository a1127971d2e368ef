"""kernels/advantage.py against hand-computed numbers and independent references."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels.advantage import (  # noqa: E402
    aggregate,
    group_advantages,
    group_reward_std,
    kl_estimate,
    normalizer_count,
    ppo_clip_loss,
)

# ----------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------
# Ragged groups: group 0 = [1, 0, 1, 1], group 1 = [0.5] (singleton), group 2 = [2, 4].
REWARDS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 2.0, 4.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 2, 2])
# group 0: mean 0.75, deviations (0.25, -0.75, 0.25, 0.25), squares sum 0.75, unbiased var 0.75/3 = 0.25, std 0.5
# group 1: singleton -> deviation 0, std 0
# group 2: mean 3, deviations (-1, 1), unbiased var 2/1 = 2, std sqrt(2)
CENTRED = [0.25, -0.75, 0.25, 0.25, 0.0, -1.0, 1.0]
GROUP_STD = [0.5, 0.5, 0.5, 0.5, 0.0, math.sqrt(2), math.sqrt(2)]
# whole batch: mean 9.5/7 = 1.357142857, sum r^2 = 23.25, SS = 23.25 - 9.5^2/7 = 72.5/7, var = SS/6 = 1.726190476,
# std = 1.313845682
BATCH_STD = 1.313845682030609


def test_group_advantages_none():
    a = group_advantages(REWARDS, GROUPS, scale="none")
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, torch.tensor(CENTRED), rtol=0, atol=1e-7)


def test_group_advantages_group_scale():
    a = group_advantages(REWARDS, GROUPS, scale="group", eps=0.0)
    expected = [0.5, -1.5, 0.5, 0.5, 0.0, -0.7071067811865475, 0.7071067811865475]
    torch.testing.assert_close(a, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    # with eps: divided by (std + eps); singleton stays exactly 0
    a = group_advantages(REWARDS, GROUPS, scale="group", eps=1e-6)
    torch.testing.assert_close(a, torch.tensor([c / (s + 1e-6) for c, s in zip(CENTRED, GROUP_STD)]))
    assert a[4] == 0.0


def test_group_advantages_batch_scale():
    a = group_advantages(REWARDS, GROUPS, scale="batch", eps=0.0)
    expected = [0.19028109877684682, -0.5708432963305404, 0.19028109877684682, 0.19028109877684682, 0.0,
                -0.7611243951073873, 0.7611243951073873]
    torch.testing.assert_close(a, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    assert abs(BATCH_STD - REWARDS.std().item()) < 1e-6


def test_group_advantages_zero_std_group_and_order():
    # interleaved group ids, one group with identical rewards -> 0 (TRL behaviour), no nan
    r = torch.tensor([1.0, 3.0, 1.0, 5.0, 1.0])
    g = torch.tensor([1, 0, 1, 0, 1])
    a = group_advantages(r, g, scale="group", eps=1e-6)
    assert torch.isfinite(a).all()
    assert a[0] == 0 and a[2] == 0 and a[4] == 0
    # group 0 = [3, 5]: mean 4, std sqrt(2)
    torch.testing.assert_close(a[[1, 3]], torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 1e-6))
    # identical non-representable rewards: exactly 0 (no rounding residue of the mean), std exactly 0
    r = torch.tensor([0.1, 0.1, 0.1, 0.7])
    g = torch.tensor([0, 0, 0, 1])
    for scale in ("group", "batch", "none"):
        assert (group_advantages(r, g, scale)[:3] == 0).all()
    assert (group_reward_std(r, g) == 0).all()


def test_group_advantages_num_groups_and_errors():
    r = torch.tensor([1.0, 2.0])
    g = torch.tensor([7, 7])  # ids >= N need num_groups
    torch.testing.assert_close(group_advantages(r, g, "none", num_groups=8), torch.tensor([-0.5, 0.5]))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, torch.tensor([0, 0]), scale="bogus")
    with pytest.raises(ValueError, match="group_index"):
        group_advantages(r, torch.tensor([0, 0, 0]))


def test_group_reward_std():
    torch.testing.assert_close(group_reward_std(REWARDS, GROUPS), torch.tensor(GROUP_STD))


# ----------------------------------------------------------------------------------
# PPO clipped surrogate
# ----------------------------------------------------------------------------------
def _ppo_reference(lp, old, adv, eps_low, eps_high, dual_clip):
    """Element by element with Python floats: value and d value / d logp."""
    ratio = math.exp(lp - old)
    unclipped = -adv * ratio
    clipped = -adv * min(max(ratio, 1 - eps_low), 1 + eps_high)
    if clipped > unclipped:  # clip active: constant -> zero gradient
        loss, grad = clipped, 0.0
    else:
        loss, grad = unclipped, -adv * ratio
    if dual_clip is not None and adv < 0 and loss > -adv * dual_clip:
        loss, grad = -adv * dual_clip, 0.0
    return loss, grad


# log-ratios spread over [-1.2, 1.2] (ratios 0.30 .. 3.3), none exactly on a clip boundary
LOG_RATIOS = torch.tensor([[-1.2, -0.5, -0.1, 0.0, 0.05], [0.15, 0.3, 0.7, 1.2, -0.25]])
OLD = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -0.7], [-1.5, -0.2, -2.5, -0.9, -1.1]])


@pytest.mark.parametrize("eps_low,eps_high,dual_clip", [(0.2, 0.2, None), (0.2, 0.28, None), (0.1, 0.4, 3.0),
                                                         (0.2, 0.2, 1.5)])
@pytest.mark.parametrize("adv_kind", ["seq", "token"])
def test_ppo_clip_loss_matches_reference(eps_low, eps_high, dual_clip, adv_kind):
    logp = (OLD + LOG_RATIOS).clone().requires_grad_()
    if adv_kind == "seq":
        adv = torch.tensor([1.5, -2.0])
        adv_full = adv[:, None].expand_as(OLD)
    else:
        adv = torch.tensor([[1.0, -1.0, 2.0, -0.5, 0.3], [-1.2, 0.8, -2.0, 1.1, -0.4]])
        adv_full = adv
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    loss, m = ppo_clip_loss(logp, OLD, adv, eps_low, eps_high, dual_clip, mask=mask)
    (grad,) = torch.autograd.grad(loss.sum(), logp)

    ref_loss, ref_grad = torch.zeros_like(OLD), torch.zeros_like(OLD)
    low = high = dual = 0
    for i in range(2):
        for j in range(5):
            lp, old, a = float(logp.detach()[i, j]), float(OLD[i, j]), float(adv_full[i, j])
            ref_loss[i, j], ref_grad[i, j] = _ppo_reference(lp, old, a, eps_low, eps_high, dual_clip)
            if mask[i, j]:
                r = math.exp(lp - old)
                low += r < 1 - eps_low and a < 0
                high += r > 1 + eps_high and a > 0
                clipped_max = max(-a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high))
                dual += dual_clip is not None and a < 0 and clipped_max > -a * dual_clip
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    n = mask.sum().item()
    assert m["clip_frac_low"].item() == pytest.approx(low / n)
    assert m["clip_frac_high"].item() == pytest.approx(high / n)
    assert m["dual_clip_frac"].item() == pytest.approx(dual / n)
    ratios = (LOG_RATIOS.exp() * mask).sum() / n
    assert m["ratio_mean"].item() == pytest.approx(ratios.item(), rel=1e-6)
    assert all(v.dim() == 0 for v in m.values())


def test_ppo_clip_loss_hand_values():
    # ratio 2 (log 2), A = 1, eps 0.2: max(-2, -1.2) = -1.2 (clipped); A = -1: max(2, 1.2) = 2, dual clip 1.5 -> 1.5
    old = torch.zeros(1, 3)
    logp = torch.tensor([[math.log(2.0), math.log(2.0), math.log(0.5)]])
    loss, m = ppo_clip_loss(logp, old, torch.tensor([[1.0, -1.0, -1.0]]), dual_clip=1.5)
    # third: ratio 0.5, A = -1: max(0.5, 0.8) = 0.8 (lower clip), below the dual bound 1.5
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 1.5, 0.8]]))
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)


def test_ppo_log_ratio_clamp():
    logp, old, adv = torch.tensor([[30.0]]), torch.tensor([[0.0]]), torch.tensor([-1.0])
    loss, m = ppo_clip_loss(logp, old, adv, log_ratio_clamp=20.0)
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-5)
    loss, m = ppo_clip_loss(logp, old, adv, log_ratio_clamp=None)
    assert loss.item() == pytest.approx(math.exp(30.0), rel=1e-5)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_clip_loss(logp, old, adv, dual_clip=0.5)


# ----------------------------------------------------------------------------------
# GPPO clip mode (spec methods_c.md §5, the case table of "Gradient")
# ----------------------------------------------------------------------------------
def _gppo_case(r, a, eps_l, eps_h, c, b_l, b_h):
    """The spec's case table: (region, loss value, d loss / d log pi) of one token, ratio r, advantage a."""
    if c is not None and a < 0 and r > c:
        return "dual", -c * a, 0.0
    if a > 0 and r > 1 + eps_h:
        return "high", -b_h * (1 + eps_h) * a, -b_h * (1 + eps_h) * a
    if a < 0 and r < 1 - eps_l:
        return "low", -b_l * (1 - eps_l) * a, -b_l * (1 - eps_l) * a
    if 1 - eps_l <= r <= 1 + eps_h:
        return "inside", -a * r, -a * r
    return "other_side", -a * r, -a * r  # A > 0 with r < 1 - eps_l, or A < 0 with 1 + eps_h < r <= c


# one token per region and more: (log ratio, advantage); ratios 0.30 .. 5.0, none on a boundary
GPPO_CASES = [(0.0, 1.3), (0.1, -0.7), (-0.15, 2.0),  # inside
              (0.5, 1.5), (1.2, 0.4),  # A > 0 above 1 + eps_h
              (-0.5, -1.1), (-1.2, -2.0),  # A < 0 below 1 - eps_l
              (math.log(5.0), -0.9), (math.log(4.0), -1.6),  # A < 0 above the dual clip c = 3
              (-0.6, 0.8), (-1.0, 1.7),  # A > 0 below 1 - eps_l: unclipped side
              (0.6, -1.3), (0.9, -0.3)]  # A < 0 between 1 + eps_h and c: unclipped side


@pytest.mark.parametrize("eps_low,eps_high,dual_clip,b_l,b_h", [(0.2, 0.28, 3.0, 1.0, 1.0), (0.2, 0.28, 3.0, 0.25, 1.0),
                                                                  (0.1, 0.4, None, 0.5, 2.0)])
def test_gppo_value_and_gradient_per_region(eps_low, eps_high, dual_clip, b_l, b_h):
    lr = torch.tensor([[x for x, _ in GPPO_CASES]], dtype=torch.float64)
    adv = torch.tensor([[a for _, a in GPPO_CASES]], dtype=torch.float64)
    old = torch.linspace(-3.0, -0.2, lr.shape[1], dtype=torch.float64)[None]
    logp = (old + lr).float().requires_grad_()
    loss, m = ppo_clip_loss(logp, old.float(), adv.float(), eps_low, eps_high, dual_clip, clip_mode="gppo",
                            gppo_beta_low=b_l, gppo_beta_high=b_h)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    cases = [_gppo_case(math.exp(x), a, eps_low, eps_high, dual_clip, b_l, b_h) for x, a in GPPO_CASES]
    regions = {name for name, _, _ in cases}
    assert regions >= {"inside", "high", "low", "other_side"} | ({"dual"} if dual_clip else set())
    torch.testing.assert_close(loss[0].double(), torch.tensor([v for _, v, _ in cases], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[0].double(), torch.tensor([g for _, _, g in cases], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    # the gradient outside the clip range is not zero (float-bound clamping, i.e. PPO, would give 0 there)
    ppo_loss, _ = ppo_clip_loss(logp, old.float(), adv.float(), eps_low, eps_high, dual_clip)
    (ppo_grad,) = torch.autograd.grad(ppo_loss.sum(), logp)
    for j, (name, _, g) in enumerate(cases):
        if name in ("high", "low"):
            assert ppo_grad[0, j].item() == 0.0 and abs(grad[0, j].item()) > 0.05
            assert grad[0, j].item() == pytest.approx(g, rel=1e-6)
        else:
            assert ppo_grad[0, j].item() == pytest.approx(grad[0, j].item(), rel=1e-6, abs=1e-7)
    n = len(cases)
    assert m["clip_frac_high"].item() == pytest.approx(sum(c[0] == "high" for c in cases) / n)
    assert m["clip_frac_low"].item() == pytest.approx(sum(c[0] == "low" for c in cases) / n)
    assert m["dual_clip_frac"].item() == pytest.approx(sum(c[0] == "dual" for c in cases) / n)


def test_gppo_value_equals_ppo_with_unit_betas():
    # Klear's README: the forward is exactly clip-higher (dual-clip) PPO; random tensors over every region
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(16, 24, generator=g) * 3
    logp = old + torch.randn(16, 24, generator=g) * 0.6
    adv = torch.randn(16, generator=g) * 1.5
    gppo, _ = ppo_clip_loss(logp, old, adv, 0.2, 0.28, 10.0, clip_mode="gppo")
    ppo, _ = ppo_clip_loss(logp, old, adv, 0.2, 0.28, 10.0)
    torch.testing.assert_close(gppo, ppo, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="clip_mode"):
        ppo_clip_loss(logp, old, adv, clip_mode="cispo")
    # a ratio that underflows to 0 (no log-ratio clamp) keeps a finite gradient: the low-side weight, not 0 / 0
    lp = torch.tensor([[-200.0, 0.0]], requires_grad=True)
    loss, _ = ppo_clip_loss(lp, torch.zeros(1, 2), torch.tensor([-1.0]), log_ratio_clamp=None, clip_mode="gppo")
    (g,) = torch.autograd.grad(loss.sum(), lp)
    torch.testing.assert_close(g, torch.tensor([[0.8, 1.0]]))  # -b_l (1 - eps_low) A, and -A r with r = 1


# ----------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------
def test_kl_estimate_values():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-2.0, -1.0, -0.5])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.5, 0.5, 0.0]))
    # k3 = exp(d) - d - 1 with d = ref - logp: d = -1 -> e^-1 = 0.36787944; d = 1 -> e - 2 = 0.71828183
    expected_k3 = torch.tensor([0.36787944117144233, 0.7182818284590451, 0.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), expected_k3)
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimate_gradients():
    logp = torch.tensor([-1.0, -2.0, -0.3, -4.0]).requires_grad_()
    ref = torch.tensor([-2.0, -1.0, -0.5, -3.5])
    (g1,) = torch.autograd.grad(kl_estimate(logp, ref, "k1").sum(), logp)
    torch.testing.assert_close(g1, torch.ones(4))
    (g2,) = torch.autograd.grad(kl_estimate(logp, ref, "k2").sum(), logp)
    torch.testing.assert_close(g2, (logp - ref).detach())  # k2 gradient = logp - ref
    (g3,) = torch.autograd.grad(kl_estimate(logp, ref, "k3").sum(), logp)
    torch.testing.assert_close(g3, 1 - (ref - logp.detach()).exp())  # d/dlogp [e^d - d - 1] = 1 - e^d


def test_kl_estimate_k3_clamps():
    # d = ref - logp = 30 -> clamped to 20 -> e^20 - 21 -> clamped to 10; d = -30 -> -20 -> e^-20 + 19 -> 10
    # d = 2.5 -> e^2.5 - 3.5 = 8.68 (inside); both clamps give zero gradient
    logp = torch.tensor([-30.0, 0.0, -2.5]).requires_grad_()
    ref = torch.tensor([0.0, -30.0, 0.0])
    k3 = kl_estimate(logp, ref, "k3")
    torch.testing.assert_close(k3, torch.tensor([10.0, 10.0, math.exp(2.5) - 3.5]))
    (g,) = torch.autograd.grad(k3.sum(), logp)
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, 1 - math.exp(2.5)]))


# ----------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------
VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, float("inf")]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # last row all masked (and holds an inf)


def test_aggregate_hand_values():
    # masked sum = 1 + 2 + 4 = 7; tokens 3; sequences 3 (the all-masked row counts)
    assert normalizer_count(MASK, "token_mean").item() == 3
    for mode in ("seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_sum"):
        assert normalizer_count(MASK, mode).item() == 3
    assert aggregate(VALUES, MASK, "token_mean", 3.0).item() == pytest.approx(7 / 3)
    # (1 + 2) / 2 + 4 / 1 + 0 = 5.5, over 3 sequences
    assert aggregate(VALUES, MASK, "seq_mean_token_mean", 3.0).item() == pytest.approx(5.5 / 3)
    # (3 / 4 + 4 / 4 + 0) / 3 with max_len 4
    assert aggregate(VALUES, MASK, "seq_mean_token_sum_norm", 3.0, max_len=4).item() == pytest.approx(1.75 / 3)
    assert aggregate(VALUES, MASK, "seq_sum", 3.0).item() == pytest.approx(7 / 3)
    # normalizer may be a tensor (after all-reduce)
    assert aggregate(VALUES, MASK, "seq_sum", torch.tensor(2.0)).item() == pytest.approx(3.5)


def test_aggregate_errors():
    with pytest.raises(ValueError, match="max_len"):
        aggregate(VALUES, MASK, "seq_mean_token_sum_norm", 1.0)
    with pytest.raises(ValueError, match="mode"):
        aggregate(VALUES, MASK, "mean", 1.0)
    with pytest.raises(ValueError, match="mode"):
        normalizer_count(MASK, "mean")


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_sum"])
def test_gradient_accumulation_and_ddp_equal_full_batch(mode):
    """Splitting a batch into micro-batches (and ranks) with the global normalizer
    gives the gradient of the full batch, for every aggregation mode."""
    torch.manual_seed(0)
    B, T = 7, 6
    theta = torch.randn(B, T, requires_grad=True)
    mask = (torch.rand(B, T) < 0.6).long()
    mask[3] = 0  # an all-masked sequence
    max_len = T

    def values(th):
        return th.tanh() * 2 + th ** 2  # any differentiable per-token function

    full = aggregate(values(theta), mask, mode, normalizer_count(mask, mode), max_len=max_len)
    (g_full,) = torch.autograd.grad(full, theta)

    # gradient accumulation: uneven micro-batches, one normalizer for the whole step
    splits = [slice(0, 2), slice(2, 7)]
    norm = sum(normalizer_count(mask[s], mode) for s in splits)
    g_acc = torch.zeros_like(theta)
    for s in splits:
        loss = aggregate(values(theta)[s], mask[s], mode, norm, max_len=max_len)
        g_acc += torch.autograd.grad(loss, theta)[0]
    torch.testing.assert_close(g_acc, g_full, rtol=1e-6, atol=1e-7)

    # simulated DDP, 2 ranks x 2 micro-batches: normalizer = global count / world, grads averaged
    world = 2
    rank_splits = [[slice(0, 1), slice(1, 3)], [slice(3, 4), slice(4, 7)]]
    global_count = sum(normalizer_count(mask[s], mode) for r in rank_splits for s in r)
    g_ddp = torch.zeros_like(theta)
    for r in rank_splits:
        for s in r:
            loss = aggregate(values(theta)[s], mask[s], mode, global_count / world, max_len=max_len)
            g_ddp += torch.autograd.grad(loss, theta)[0] / world  # DDP averages over ranks
    torch.testing.assert_close(g_ddp, g_full, rtol=1e-6, atol=1e-7)
