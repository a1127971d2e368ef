"""methods/luffy.py: the mixed-policy loss against the spec's equations (values and gradients, methods_b.md §1), the
demonstration-token gradient -A gamma p / (p + gamma)^2, no clip on demonstration tokens, GA x DDP, bad inputs, the
demonstration inside each group end to end, and `--recipe paper --dry-run` against the spec's defaults."""
import functools
import json
import math

import pytest
import torch
from conftest import REPO, run_method, torchrun
from test_recipes import dry_run

from tests_util import load_method, rand_batch

luffy = load_method("luffy")


def luffy_reference(logp, old, adv, mask, demo, ent, *, gamma=0.1, shaping=True, clip=False, eps=0.2,
                    agg="seq_mean_token_sum_norm", T_max=20, c_ent=0.0):
    """Spec methods_b.md §1, token by token: on-policy -A r (clip: max(-A r, -A clip(r, 1-eps, 1+eps))), demonstration
    -A f(p), f(p) = p / (p + gamma) (pi_phi := 1; no shaping: f(p) = p), never clipped. Aggregation: token sum / T_max
    per sequence, mean over sequences (loss_remove_token_mean), or / the token count (the paper's Z); minus c x the
    token-mean entropy."""
    B, T = mask.shape
    total = torch.zeros(())
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            if demo[i, t]:
                p = torch.exp(logp[i, t])
                l = -adv[i] * (p / (p + gamma) if shaping else p)
            else:
                r = torch.exp(logp[i, t] - old[i, t])
                l = -adv[i] * r
                if clip:
                    l = torch.max(l, -adv[i] * torch.clamp(r, 1 - eps, 1 + eps))
            total = total + l
    n_tok = mask.sum()
    pg = total / T_max / B if agg == "seq_mean_token_sum_norm" else total / n_tok
    return pg - c_ent * (ent * mask).sum() / n_tok


def _inputs(seed=0, B=4, T=7):
    logp, mask = rand_batch(B, T, seed)
    g = torch.Generator().manual_seed(seed + 1)
    old = logp + 0.5 * torch.randn(B, T, generator=g)  # ratios about 0.4 .. 2.5: the clip is active on some tokens
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5])[:B]
    demo = torch.zeros(B, T)
    demo[1], demo[3] = 1, 1  # rows 1 and 3 are demonstrations
    ent = torch.rand(B, T, generator=g)
    return logp, old, adv, mask, demo * mask, ent


@pytest.mark.parametrize("clip,shaping,agg,c_ent", [(False, "p_div_p", "seq_mean_token_sum_norm", 0.001),
                                                    (True, "p_div_p", "token_mean", 0.0),
                                                    (False, "none", "token_mean", 0.01),
                                                    (True, "none", "seq_mean_token_sum_norm", 0.0)])
def test_luffy_loss_matches_reference(clip, shaping, agg, c_ent):
    logp, old, adv, mask, demo, ent = _inputs()
    lp1, lp2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    e1, e2 = ent.clone().requires_grad_(), ent.clone().requires_grad_()
    B, n_tok = mask.shape[0], mask.sum()
    z = torch.tensor(float(B)) if agg == "seq_mean_token_sum_norm" else n_tok
    loss, m = luffy.luffy_loss(lp1, old, adv, mask, z, prefix_mask=demo, entropy=e1, token_normalizer=n_tok,
                               shaping=shaping, gamma=0.1, clip=clip, entropy_coef=c_ent, loss_agg=agg, max_len=20)
    ref = luffy_reference(lp2, old, adv, mask, demo.bool(), e2, shaping=shaping == "p_div_p", clip=clip, agg=agg,
                          c_ent=c_ent)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(loss, [lp1, e1], allow_unused=True)
    g2 = torch.autograd.grad(ref, [lp2, e2], allow_unused=True)
    torch.testing.assert_close(g1[0], g2[0], rtol=1e-6, atol=1e-6)
    if c_ent:
        torch.testing.assert_close(g1[1], g2[1], rtol=1e-6, atol=1e-6)
    assert m["demo_frac"].item() == pytest.approx((demo.sum() / n_tok).item())
    if clip:  # the on-policy clip is active somewhere in this batch (the test would not see a missing clip otherwise)
        assert m["clip_frac_low"].item() + m["clip_frac_high"].item() > 0


def test_demonstration_gradient_is_the_shaped_weight():
    # d/dlogp of -A f(p), f = p / (p + gamma): -A gamma p / (p + gamma)^2 (spec §1), normalizer 1, token sum
    logp, old, adv, mask, demo, ent = _inputs(seed=3)
    logp[1, 0] = math.log(0.01)  # a rare expert token (row 1 is a demonstration, its first token is in the mask)
    lp = logp.clone().requires_grad_()
    loss, _ = luffy.luffy_loss(lp, old, adv, mask, 1.0, prefix_mask=demo, gamma=0.1, loss_agg="token_mean")
    (g,) = torch.autograd.grad(loss, lp)
    p = logp.exp()
    want = -adv[:, None] * 0.1 * p / (p + 0.1) ** 2
    sel = demo.bool()
    torch.testing.assert_close(g[sel], want.expand_as(p)[sel], rtol=1e-6, atol=1e-7)
    # low-probability expert tokens get a larger weight than plain importance sampling (f(p) = p: weight A p)
    assert (want / (-adv[:, None] * p))[1, 0].item() == pytest.approx(0.1 / 0.11 ** 2)  # 8.3 x the IS weight


def test_demonstration_tokens_are_never_clipped_and_ignore_old_logp():
    logp, old, adv, mask, demo, ent = _inputs(seed=5)
    for clip in (False, True):
        outs = []
        for shift in (0.0, 3.0):  # a wild old log-prob on demonstration tokens changes nothing
            lp = logp.clone().requires_grad_()
            o = old + shift * demo
            loss, _ = luffy.luffy_loss(lp, o, adv, mask, 4.0, prefix_mask=demo, clip=clip, eps_low=0.01,
                                       eps_high=0.01, dual_clip=1.5, max_len=20)
            outs.append((loss.detach(), torch.autograd.grad(loss, lp)[0]))
        torch.testing.assert_close(outs[0][0], outs[1][0])
        torch.testing.assert_close(outs[0][1], outs[1][1])
        assert (outs[0][1][demo.bool()] != 0).all()  # every demonstration token has a gradient, clip or not


@functools.lru_cache(None)
def _worker_batch():
    """The 8-row batch tests/_ddp_loss_worker.py builds (deterministic), to count the step's tokens."""
    import _ddp_loss_worker
    import data
    return _ddp_loss_worker.make_batch(len(data.build_embedded_tokenizer()))


def _ddp_loss(m, o, b, z, agg, n_micro):
    """The worker passes the normalizer of `agg`; the entropy bonus also needs the step's token count (the global
    count main() all-reduces, from the worker's full batch, scaled like z). Demonstration rows: aux[:, 0] > 0."""
    full = _worker_batch()
    z_tok = full["loss_mask"].sum() * z / m.normalizer_count(full["loss_mask"], agg)
    demo = (b["aux"][:, :1] > 0).float() * b["loss_mask"]
    ent = -o["logp"].exp() * o["logp"]  # a per-token stand-in for the entropy that carries a gradient
    return m.luffy_loss(o["logp"], o["logp"].detach() + b["old_shift"], b["advantages"], b["loss_mask"], z,
                        prefix_mask=demo, entropy=ent, token_normalizer=z_tok, entropy_coef=0.1, loss_agg=agg,
                        max_len=20, clip=True, eps_low=0.02, eps_high=0.02)[0]


# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch)
DDP_ADAPTER = (lambda agg: agg, _ddp_loss)


def test_ddp2_x_accum2_equals_full_batch(tmp_path):
    full = _worker_batch()
    assert 0 < (full["aux"][:, 0] > 0).sum() < 8  # the worker's batch mixes demonstration and on-policy rows
    out = tmp_path / "r.json"  # the released aggregation (sum / L_max, mean over sequences), with the clip on
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "luffy", "seq_mean_token_sum_norm", out, timeout=300)
    rel = json.loads(out.read_text())["max_rel_diff"]
    assert rel < 1e-5, rel


def test_paper_recipe_dry_run_matches_spec():
    values, sources, out = dry_run("luffy", "--recipe", "paper")
    spec = dict(  # methods_b.md §1 Defaults (exp_scripts/train.sh, mix_ppo_trainer.yaml)
        model="Elliott/Qwen2.5-Math-7B-16k-think", dataset="openr1_46k", num_generations=8, num_off_policy=1,
        prompts_per_step=128, steps_per_generation=2, num_iterations=1, lr=1e-6, warmup_steps=0, max_grad_norm=1.0,
        temperature=1.0, max_prompt_length=1024, max_new_tokens=8192, entropy_coef=0.001, beta=0.0,
        scale_rewards="none", clip=False, loss_agg="seq_mean_token_sum_norm", shaping="p_div_p", shaping_gamma=0.1,
        reward="math", log_ratio_clamp=None)
    for name, want in spec.items():
        assert values[name] == want, (name, values[name], want)
    assert "global batch per optimizer step (2 x 1 per rollout batch of 128 prompts): 64 prompts, 512 sequences" in out
    for argv in (["--recipe", "paper_form"], ["--preset", "luffy_paper"]):  # the paper's objective: std, clip, tokens
        a = _parse(*argv)
        assert (a.scale_rewards, a.clip, a.loss_agg) == ("group", True, "token_mean"), argv


def _parse(*argv):
    return luffy.common.parse_args(luffy.Args, list(argv), presets={"preset": luffy.PRESETS, "recipe": luffy.RECIPES})


@pytest.mark.parametrize("argv,message", [
    (["--num-off-policy", "4"], "--num-off-policy 4 must be between 1 and --num-generations - 1 = 3"),
    (["--num-off-policy", "0"], "--num-off-policy 0 must be between 1"),
    (["--shaping", "none", "--shaping-gamma", "0.5"], "--shaping-gamma acts only with --shaping p_div_p"),
    (["--shaping-gamma", "0"], "--shaping-gamma 0.0 must be > 0"),
    (["--preset", "gppo", "--no-clip"], "--clip-mode gppo acts only with --clip"),
])
def test_flag_checks(argv, message):
    a = _parse("--num-generations", "4", *argv)
    with pytest.raises(SystemExit, match=message):
        luffy.check_luffy_args(a, 0, 10)
    luffy.check_luffy_args(_parse("--num-generations", "4", "--preset", "gppo") if "gppo" in argv else
                           _parse("--num-generations", "4"), 0, 10)  # the fix is accepted


def test_gppo_needs_the_clip():
    with pytest.raises(SystemExit, match="--clip-mode gppo acts only with --clip"):  # common.ACTS_ONLY_WITH
        _parse("--num-generations", "4", "--clip-mode", "gppo")
    a = _parse("--num-generations", "4", "--preset", "gppo")  # the preset switches the clip on
    assert a.clip and a.clip_mode == "gppo"


def test_long_demonstrations_are_counted_in_a_warning(capsys):
    luffy.check_luffy_args(_parse(), 3, 10)
    assert "warning: 3 of 10 demonstrations are longer than --max-new-tokens and are cut" in capsys.readouterr().out
    luffy.check_luffy_args(_parse(), 0, 10)
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_luffy_end_to_end(tmp_path):
    import data
    p = run_method("luffy", "--max-steps", 2, "--prompts-per-step", 2, "--num-generations", 4, "--eval-every", 0,
               "--eval-size", 4, "--eval-samples", 0, "--max-new-tokens", 32, "--steps-per-generation", 2,
               "--output-dir", tmp_path / "out", "--quiet", "--save-every", 0, env={"OMP_NUM_THREADS": "1"})
    assert "warning" not in p.stdout  # every embedded demonstration fits 32 tokens: none is cut
    rec = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/reward" in r]
    assert len(train) == 2
    for r in train:
        assert r["train/demo_frac"] > 0 and r["train/demo_reward"] == 1.0  # the embedded demonstrations are correct
        assert r["train/reward"] == pytest.approx((3 * r["train/on_policy_reward"] + r["train/demo_reward"]) / 4)
    demos = {r["prompt"]: r["response"] for r in data.embedded_task("rl")}
    comps = [json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert len(comps) == 8
    for j in range(2):  # each group: 3 rollouts, then the prompt's demonstration; A = R - mean over all 4
        group = comps[4 * j:4 * j + 4]
        prompt = next(p for p in demos if p in group[0]["prompt"])
        assert group[3]["completion"] == demos[prompt] and group[3]["reward"] == 1.0
        mean = sum(c["reward"] for c in group) / 4
        for c in group:
            assert c["advantage"] == pytest.approx(c["reward"] - mean, abs=1e-5)
