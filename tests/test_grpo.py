"""methods/grpo.py: grpo_loss against the equations (every aggregation, clip, dual clip, KL estimator), the
REINFORCE identity at ratio 1, GA x DDP against one full batch, presets, end to end."""
import json

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method, rand_batch

grpo = load_method("grpo")
# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch)
DDP_ADAPTER = (lambda agg: agg,
               lambda m, o, b, z, agg, n_micro: m.grpo_loss(o["logp"], o["logp"].detach() + b["old_shift"],
                                                            b["advantages"], b["loss_mask"], z, loss_agg=agg,
                                                            max_len=20)[0])


def reference(logp, old, ref_logp, adv, mask, eps_low, eps_high, dual, beta, kl, agg, L):
    """Written from DeepSeekMath Eq. 3, DAPO Eq. 8 (clip-higher, token mean), Dr. GRPO (sum / L_max), verl dual clip."""
    B, T = mask.shape
    out = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            l = -torch.min(r * a, torch.clamp(r, 1 - eps_low, 1 + eps_high) * a)
            if dual is not None and a < 0:
                l = torch.min(l, -a * dual)
            if beta:
                x = logp[i, t] - ref_logp[i, t]  # log(pi / pi_ref)
                k = {"k1": x, "k2": 0.5 * x**2, "k3": torch.exp(-x) + x - 1}[kl]
                l = l + beta * k
            out[i, t] = l * mask[i, t]
    if agg == "token_mean":
        return out.sum() / mask.sum()
    if agg == "seq_mean_token_mean":
        return sum(out[i].sum() / mask[i].sum() for i in range(B)) / B
    return sum(out[i].sum() / L for i in range(B)) / B  # seq_mean_token_sum_norm (Dr. GRPO)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("clip", [(0.2, 0.2, None), (0.2, 0.28, None), (0.2, 0.2, 3.0)])
@pytest.mark.parametrize("beta,kl", [(0.0, "k3"), (0.04, "k1"), (0.04, "k2"), (0.04, "k3")])
def test_grpo_loss_matches_reference(agg, clip, beta, kl):
    logp, mask = rand_batch()
    g = torch.Generator().manual_seed(1)
    old = logp + 0.4 * torch.randn(logp.shape, generator=g)  # ratios well outside [0.8, 1.28]: clipping active
    ref_logp = logp + 0.3 * torch.randn(logp.shape, generator=g)
    adv = torch.tensor([1.5, -2.0, 0.7, -0.4])
    z = mask.sum() if agg == "token_mean" else torch.tensor(4.0)
    lp = logp.clone().requires_grad_()
    eps_low, eps_high, dual = clip
    loss, m = grpo.grpo_loss(lp, old, adv, mask, z, ref_logp=ref_logp, eps_low=eps_low, eps_high=eps_high,
                             dual_clip=dual, beta=beta, kl_estimator=kl, loss_agg=agg, max_len=10)
    lr = logp.clone().requires_grad_()
    ref = reference(lr, old, ref_logp, adv, mask, *clip, beta, kl, agg, 10)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward(); ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-5, atol=1e-7)
    assert 0 < float(m["clip_frac_low"]) + float(m["clip_frac_high"]) < 1


def test_ratio_one_gives_reinforce_with_baseline():
    """mu=1, one step per generation: old = logp.detach(), so r == 1 and grad = -sum A grad log pi / normalizer."""
    logp, mask = rand_batch()
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = rewards - rewards.mean()  # REINFORCE with the group-mean baseline (Dr. GRPO advantage)
    lp = logp.clone().requires_grad_()
    loss, m = grpo.grpo_loss(lp, lp.detach(), adv, mask, mask.sum(), loss_agg="token_mean")
    loss.backward()
    torch.testing.assert_close(float(m["ratio_mean"]), 1.0)
    expected = -(adv[:, None] * mask) / mask.sum()  # d/dlogp of -sum A logp / N
    torch.testing.assert_close(lp.grad, expected)


def test_entropy_bonus_lowers_loss_by_coef_times_entropy():
    logp, mask = rand_batch()
    ent = torch.rand(logp.shape)
    adv = torch.zeros(4)
    loss, _ = grpo.grpo_loss(logp, logp, adv, mask, mask.sum(), entropy=ent, entropy_coef=0.01, loss_agg="token_mean")
    torch.testing.assert_close(loss, -0.01 * (ent * mask).sum() / mask.sum())


def test_overlong_penalty_dapo_eq13():
    f = grpo.overlong_penalty
    assert f(70, 100, 20, 1.0) == 0.0 and f(80, 100, 20, 1.0) == 0.0
    assert f(90, 100, 20, 1.0) == pytest.approx(-0.5) and f(100, 100, 20, 1.0) == pytest.approx(-1.0)
    assert f(100, 100, 0, 1.0) == 0.0


def test_presets_and_explicit_override():
    import common
    a = common.parse_args(grpo.Args, ["--preset", "dapo", "--eps-high", "0.3"], {"preset": grpo.PRESETS,
                                                                                   "recipe": grpo.RECIPES})
    assert (a.eps_high, a.loss_agg, a.dynamic_sampling, a.overlong_buffer_ratio) == (0.3, "token_mean", True, 0.2)
    a = common.parse_args(grpo.Args, ["--preset", "dr_grpo"], {"preset": grpo.PRESETS, "recipe": grpo.RECIPES})
    assert (a.scale_rewards, a.loss_agg, a.beta) == ("none", "seq_mean_token_sum_norm", 0.0)
    a = common.parse_args(grpo.Args, ["--preset", "grpo", "--model", "Qwen/Qwen2.5-Math-1.5B"],
                          {"preset": grpo.PRESETS, "recipe": grpo.RECIPES})
    assert (a.scale_rewards, a.loss_agg, a.beta, a.kl_estimator, a.lr) == ("group", "seq_mean_token_mean", 0.04, "k3", 1e-6)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm", "seq_mean_token_mean"])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, agg):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "grpo", agg, out, timeout=300)
    assert json.loads(out.read_text())["max_rel_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["grpo", "dapo"])
def test_grpo_end_to_end(tmp_path, preset):
    run_method("grpo", "--preset", preset, "--max-steps", 3, "--prompts-per-step", 8, "--num-generations", 4,
               "--eval-every", 0, "--eval-size", 16, "--output-dir", tmp_path, "--quiet", "--steps-per-generation", 2,
               "--grad-accum", 2)
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/reward" in r]
    assert len(train) == 3
    for k in ["train/loss", "train/grad_norm", "train/clip_frac_low", "train/entropy", "train/completion_length",
              "train/frac_truncated", "train/frac_zero_std_groups", "perf/gen_time", "perf/train_time"]:
        assert k in train[0], k
    if preset == "grpo":
        assert "train/kl" in train[0]
