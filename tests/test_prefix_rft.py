"""methods/prefix_rft.py: prefix_rft_loss against the equations (entropy clipping, dual-clip PPO, Dr. GRPO
aggregation, entropy bonus), the entropy mask keeps exactly the top 20% of prefix tokens, the prefix sampler's
schedule and bounds, GA x DDP against one full batch (sequence scope), bad flags, end to end with resume."""
import json
import math
import shutil
import sys

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method, rand_batch

import common

prx = load_method("prefix_rft")
# used by tests/_ddp_loss_worker.py: the "sequence" scope makes the loss split-invariant, so DDP x GA must equal the
# full batch; aux plays the entropy (selection only) and marks the prefix (aux > 0 on response tokens)
DDP_ADAPTER = (lambda agg: agg,
               lambda m, o, b, z, agg, n_micro: m.prefix_rft_loss(o["logp"], o["logp"].detach() + b["old_shift"],
                                                                  b["advantages"], b["loss_mask"], z,
                                                                  prefix_mask=(b["aux"] > 0).float() * b["loss_mask"],
                                                                  entropy=b["aux"].abs(), entropy_coef=0.0,
                                                                  loss_agg=agg, max_len=20,
                                                                  entropy_scope="sequence")[0])


def kept_reference(entropy, prefix, mask_ratio, scope):
    """Independent top-k: list the prefix positions in scope, sort by (entropy, position), drop the first
    int(n * mask_ratio) (official dp_actor.py: split_point = int(len(indices) * entropy_mask_ratio))."""
    B, T = prefix.shape
    pools = [[(i, t) for i in range(B) for t in range(T) if prefix[i, t]]] if scope == "batch" else \
        [[(i, t) for t in range(T) if prefix[i, t]] for i in range(B)]
    keep = set()
    for pool in pools:
        order = sorted(pool, key=lambda it: (float(entropy[it]), it[0] * T + it[1]))
        keep.update(order[int(len(order) * mask_ratio):])
    return keep


def reference(logp, old, adv, mask, prefix, entropy, eps, dual, ent_coef, agg, L, mask_ratio, scope):
    """Prefix-RFT loss (spec §3 'Math'), written from the equations with Python loops; the entropy bonus is a token
    mean whatever the policy aggregation (official dp_actor.py: entropy_coef * agg_loss(entropy, mask, "token-mean"))."""
    B, T = mask.shape
    keep = kept_reference(entropy.detach(), prefix * mask, mask_ratio, scope)
    out = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            a = adv[i] if not prefix[i, t] or (i, t) in keep else torch.tensor(0.0)  # entropy clipping
            r = torch.exp(logp[i, t] - old[i, t])
            l = torch.max(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps))
            if dual is not None and a < 0:
                l = torch.min(l, -a * dual)
            out[i, t] = l * mask[i, t]
    bonus = ent_coef * (entropy * mask).sum() / mask.sum()  # token mean over every response token
    if agg == "token_mean":
        return out.sum() / mask.sum() - bonus
    if agg == "seq_mean_token_mean":
        return sum(out[i].sum() / mask[i].sum() for i in range(B)) / B - bonus
    return sum(out[i].sum() / L for i in range(B)) / B - bonus  # Dr. GRPO: token sum / constant L_max, mean over rows


@pytest.mark.parametrize("agg", ["seq_mean_token_sum_norm", "token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
@pytest.mark.parametrize("dual", [3.0, None])
def test_prefix_rft_loss_matches_reference(agg, scope, dual):
    logp, mask = rand_batch(B=4, T=9)
    mask[1, :7] = 1  # rows of 9, 7, 1, 5 tokens
    g = torch.Generator().manual_seed(2)
    old = logp + 0.4 * torch.randn(logp.shape, generator=g)  # ratios outside [0.8, 1.2]: clipping active
    prefix = torch.zeros_like(mask)
    prefix[0, :6] = 1  # 6 prefix tokens in row 0, 4 in row 1, the last row has none
    prefix[1, :4] = 1
    entropy = torch.rand(logp.shape, generator=g) * 2
    adv = torch.tensor([1.5, -2.0, 0.7, -0.4])
    z = mask.sum() if agg == "token_mean" else torch.tensor(4.0)
    lp, ent = logp.clone().requires_grad_(), entropy.clone().requires_grad_()
    loss, m = prx.prefix_rft_loss(lp, old, adv, mask, z, prefix_mask=prefix, entropy=ent, ref_logp=None, eps_low=0.2,
                                  eps_high=0.2, dual_clip=dual, beta=0.0, kl_estimator="k3", entropy_coef=0.01,
                                  loss_agg=agg, max_len=12, entropy_mask_ratio=0.8, entropy_scope=scope,
                                  token_normalizer=mask.sum())
    lr, er = logp.clone().requires_grad_(), entropy.clone().requires_grad_()
    ref = reference(lr, old, adv, mask, prefix, er, 0.2, dual, 0.01, agg, 12, 0.8, scope)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ent.grad, er.grad, rtol=1e-5, atol=1e-7)
    n_kept = 10 - int(10 * 0.8) if scope == "batch" else (6 - int(6 * 0.8)) + (4 - int(4 * 0.8))
    assert float(m["prefix_kept_frac"]) == pytest.approx(n_kept / 10)
    assert float(m["prefix_frac"]) == pytest.approx(10 / mask.sum().item())


def test_dropped_prefix_tokens_get_no_policy_gradient_kept_ones_do():
    """Ratio 1 (old = logp.detach()): a kept prefix token's gradient is -A / (B L_max) (REINFORCE), a dropped one 0."""
    logp, mask = rand_batch(B=2, T=10)
    mask[:] = 1
    prefix = torch.zeros_like(mask)
    prefix[0] = 1  # 10 prefix tokens: the top 2 by entropy keep A
    entropy = torch.arange(20.0).reshape(2, 10).flip(-1)  # row 0: entropies 9..0, the highest at t = 0, 1
    adv = torch.tensor([1.0, -1.0])
    lp = logp.clone().requires_grad_()
    loss, _ = prx.prefix_rft_loss(lp, lp.detach(), adv, mask, torch.tensor(2.0), prefix_mask=prefix, entropy=entropy,
                                  entropy_coef=0.0, max_len=10)
    loss.backward()
    expected = torch.zeros(2, 10)
    expected[0, :2] = -1.0 / (2 * 10)
    expected[1, :] = 1.0 / (2 * 10)  # the ordinary rollout: every token keeps its advantage
    torch.testing.assert_close(lp.grad, expected)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 10, 11, 20, 37])
def test_entropy_mask_keeps_top_20_percent_sequence_scope(n):
    g = torch.Generator().manual_seed(n)
    ent = torch.rand(3, 40, generator=g)
    prefix = torch.zeros(3, 40, dtype=torch.bool)
    prefix[0, 3:3 + n] = True  # row 0: n prefix tokens, row 1: 10, row 2: none
    prefix[1, :10] = True
    keep = prx.entropy_keep_mask(ent, prefix, 0.8, "sequence")
    assert not (keep & ~prefix).any()  # only prefix tokens are ever kept
    k0 = n - int(n * 0.8)  # the official split point
    assert k0 == math.ceil(0.2 * n)  # = ceil(20%) for these n
    assert int(keep[0].sum()) == k0 and int(keep[1].sum()) == 2 and int(keep[2].sum()) == 0
    top = ent[0, 3:3 + n].topk(k0).indices + 3
    assert set(keep[0].nonzero().squeeze(1).tolist()) == set(top.tolist())
    assert set(keep[1].nonzero().squeeze(1).tolist()) == set(ent[1, :10].topk(2).indices.tolist())


def test_entropy_mask_batch_scope_pools_the_micro_batch():
    ent = torch.tensor([[9.0, 1.0, 2.0, 3.0, 0.5, 7.0], [8.0, 4.0, 5.0, 6.0, 0.0, 0.0], [10.0, 11.0, 0.0, 0.0, 0, 0]])
    prefix = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()  # 9 prefix tokens
    keep = prx.entropy_keep_mask(ent, prefix, 0.8, "batch")
    # 9 - int(7.2) = 2 kept: the two highest prefix entropies (9 and 8), never the non-prefix 7, 10, 11
    assert keep.nonzero().tolist() == [[0, 0], [1, 0]]
    seq = prx.entropy_keep_mask(ent, prefix, 0.8, "sequence")  # per row: 5 -> 1 kept (9), 4 -> 1 kept (8)
    assert seq.nonzero().tolist() == [[0, 0], [1, 0]]
    ent[1, 2], ent[1, 3] = 9.7, 9.5  # row 1 now holds the two highest: batch scope keeps both, sequence one per row
    assert prx.entropy_keep_mask(ent, prefix, 0.8, "batch").nonzero().tolist() == [[1, 2], [1, 3]]
    assert prx.entropy_keep_mask(ent, prefix, 0.8, "sequence").nonzero().tolist() == [[0, 0], [1, 2]]
    assert torch.equal(prx.entropy_keep_mask(ent, prefix, 0.0, "batch"), prefix)
    assert prx.entropy_keep_mask(ent, prefix, 0.5, "batch").sum() == 9 - int(9 * 0.5)


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.5, 0.8, 0.9, 1.0])
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_entropy_mask_count_is_the_official_int_n_times_ratio(ratio, scope):
    """Issue 17: with n prefix tokens the official code zeroes the advantage of int(n * entropy_mask_ratio) of them.
    The old flag (keep = 1 - ratio, floor(n * (1 - keep))) kept one token too many for keep 0.2 at n = 5, 10, ..."""
    for n in range(1, 41):
        prefix = torch.zeros(1, 45)
        prefix[0, 2:2 + n] = 1
        ent = torch.rand(1, 45, generator=torch.Generator().manual_seed(n))
        kept = prx.entropy_keep_mask(ent, prefix, ratio, scope)
        assert int(kept.sum()) == n - int(n * ratio), (n, ratio)
        # the kept ones are the highest-entropy prefix tokens
        if 0 < int(kept.sum()) < n:
            assert ent[kept.bool()].min() > ent[prefix.bool() & ~kept].max()


@pytest.mark.parametrize("agg", ["seq_mean_token_sum_norm", "seq_mean_token_mean"])
def test_entropy_bonus_is_a_token_mean_whatever_the_loss_agg(agg):
    """Issue 17: official dp_actor.py adds entropy_coef * agg_loss(entropy, response_mask, "token-mean"); folding the
    entropy into the Dr. GRPO aggregation gave each token the weight c / (L_max B) instead of c / #tokens."""
    logp, mask = rand_batch()
    ent = torch.rand(logp.shape, generator=torch.Generator().manual_seed(3)).requires_grad_()
    adv = torch.zeros(4)  # no policy term: the loss is the entropy bonus alone
    loss, _ = prx.prefix_rft_loss(logp, logp, adv, mask, torch.tensor(4.0), prefix_mask=torch.zeros_like(mask),
                                  entropy=ent, token_normalizer=mask.sum(), entropy_coef=0.001, loss_agg=agg,
                                  max_len=10)
    torch.testing.assert_close(loss, -0.001 * (ent * mask).sum() / mask.sum())
    loss.backward()
    torch.testing.assert_close(ent.grad, -0.001 * mask / mask.sum())


def test_cosine_low_schedule():
    f = prx.prefix_low
    assert f(0, 0.95, 0.05, 100) == pytest.approx(0.95)
    assert f(50, 0.95, 0.05, 100) == pytest.approx(0.5)
    assert f(25, 0.95, 0.05, 100) == pytest.approx(0.05 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(100, 0.95, 0.05, 100) == pytest.approx(0.05) and f(1000, 0.95, 0.05, 100) == pytest.approx(0.05)
    vals = [f(t, 0.95, 0.05, 100) for t in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay


def test_prefix_sampler_bounds_reproducibility_and_mean():
    s = prx.sample_prefix_len
    # step 0: low == high == 0.95, so the fraction is exactly 0.95
    L, f = s(40, 0, (0, 1, 2), 0.95, 0.95, 0.05, 100, 1)
    assert f == pytest.approx(0.95) and L == int(f * 40)
    draws = [s(200, 50, (7, 50, i), 0.95, 0.95, 0.05, 100, 1) for i in range(2000)]
    fracs = [f for _, f in draws]
    assert all(0.5 - 1e-9 <= f <= 0.95 for f in fracs)  # uniform on [low_50 = 0.5, 0.95]
    assert sum(fracs) / len(fracs) == pytest.approx(0.725, abs=0.01)
    assert all(L == int(f * 200) for L, f in draws)
    assert s(200, 50, (7, 50, 3), 0.95, 0.95, 0.05, 100, 1) == draws[3]  # same key, same draw (resumable)
    assert len({f for f in fracs}) == len(fracs)  # different keys, different draws
    late = [s(200, 100, (7, 100, i), 0.95, 0.95, 0.05, 100, 1)[1] for i in range(2000)]
    assert min(late) >= 0.05 - 1e-9 and min(late) < 0.06 and max(late) > 0.94  # end: uniform on [0.05, 0.95]
    # clipping: raised to min_len, capped at demo_len - 1 (the policy always writes >= 1 demo token and the EOS)
    assert s(100, 100, (0, 0, 0), 0.1, 0.1, 0.1, 100, 30)[0] == 30
    assert s(3, 0, (0, 0, 0), 0.95, 0.95, 0.05, 100, 1)[0] == 2
    assert s(10, 0, (0, 0, 0), 1.0, 1.0, 1.0, 100, 1)[0] == 9
    assert s(1, 0, (0, 0, 0), 0.95, 0.95, 0.05, 100, 1)[0] == 0  # a one-token demonstration: no prefix


def test_regroup_keeps_groups_contiguous():
    assert prx.regroup(["a0", "a1", "b0", "b1"], ["A", "B"], 2, 1) == ["a0", "a1", "A", "b0", "b1", "B"]


@pytest.mark.parametrize("argv,needle", [
    (["--num-prefix", "8"], "--num-prefix 8 must be between 1 and --num-generations - 1 = 7"),
    (["--num-prefix", "0"], "--num-prefix 0 must be between 1"),
    (["--prefix-high", "1.2"], "--prefix-high 1.2: must be in [0, 1]"),
    (["--entropy-mask-ratio", "1.5"], "--entropy-mask-ratio 1.5: must be in [0, 1]"),
    (["--prefix-beta-a", "0"], "--prefix-beta-a 0.0: must be > 0"),
    (["--min-prefix-len", "-1"], "--min-prefix-len -1: must be >= 0"),
    (["--prefix-decay-steps", "-5"], "--prefix-decay-steps -5: must be >= 1"),
])
def test_bad_flags_raise_user_error(argv, needle, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prefix_rft.py", *argv, "--dry-run"])  # refused before the dry run prints
    with pytest.raises(common.UserError) as e:
        prx.main()
    assert needle in str(e.value)
    args = common.parse_args(prx.Args, [], {"preset": prx.PRESETS, "recipe": prx.RECIPES}, prx.RANGES)
    assert 1 <= args.num_prefix < args.num_generations  # the defaults pass


def test_bad_flag_stops_the_script_before_training(tmp_path):
    p = run_method("prefix_rft", "--num-prefix", 8, "--output-dir", tmp_path, "--quiet", check=False, timeout=300)
    assert p.returncode != 0 and "error: --num-prefix 8 must be between 1" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "final").exists()


def test_ddp2_x_accum2_equals_full_batch(tmp_path):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "prefix_rft", "seq_mean_token_sum_norm", out, timeout=300)
    assert json.loads(out.read_text())["max_rel_diff"] < 1e-5


@pytest.mark.slow
def test_prefix_rft_end_to_end_and_resume(tmp_path):
    """4 steps straight vs resuming that run's step-2 checkpoint: identical rewards and prefixes (the sampler is a
    function of the step), and the hybrid's prefix shows up in the metrics."""
    flags = ["--max-steps", 4, "--prompts-per-step", 4, "--num-generations", 4, "--eval-every", 0, "--quiet",
             "--prefix-decay-steps", 4, "--grad-accum", 2, "--save-every", 2, "--eval-size", 8]
    a, b = tmp_path / "a", tmp_path / "b"
    run_method("prefix_rft", "--output-dir", a, *flags)
    shutil.copytree(a, b)
    for p in ["checkpoint-0000004", "final"]:  # as if the run had stopped after step 2's checkpoint
        shutil.rmtree(b / p)
    run_method("prefix_rft", "--output-dir", b, "--resume", *flags)
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    assert [r["step"] for r in ra] == [1, 2, 3, 4] == [r["step"] for r in rb]
    for x, y in zip(ra[2:], rb[2:]):
        for k in ["train/reward", "train/prefix_frac", "train/hybrid_reward", "train/completion_length", "train/loss"]:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert 0 < ra[0]["train/prefix_frac"] < 1 and ra[0]["train/prefix_low"] == pytest.approx(0.95)
    assert 0 < ra[0]["train/prefix_kept_frac"] <= 1
