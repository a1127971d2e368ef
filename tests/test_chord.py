"""methods/chord.py: chord_loss against the paper's equations (values and gradients, each SFT weighting), the phi
gradient identity, the mu schedule, the expert batch size, GA x DDP with the two token means, presets, bad inputs,
end to end."""
import functools
import json
import math

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method

chord = load_method("chord")


@functools.lru_cache(None)
def _worker_batch():
    """The 8-row batch tests/_ddp_loss_worker.py builds (deterministic), to count the step's two kinds of tokens."""
    import _ddp_loss_worker
    import data
    return _ddp_loss_worker.make_batch(len(data.build_embedded_tokenizer()))


def _ddp_is_expert(b):
    """Rows 0, 1, 4, 5 of the worker's batch are expert rows: every micro-batch of every rank then mixes both kinds
    with different lengths (a per-micro-batch mean would fail). Rows are recognised by their (unique) advantage."""
    row = (b["advantages"][:, None] == _worker_batch()["advantages"][None]).float().argmax(1)
    return row % 4 < 2


def _ddp_loss(m, o, b, z, agg, n_micro):
    """The worker passes one normalizer (all tokens of the step / world size, mode token_mean); CHORD needs two. Both
    are the same global counts main() all-reduces, taken here from the worker's full batch and scaled like z."""
    full, e = _worker_batch(), _ddp_is_expert(b)
    scale = z / full["loss_mask"].sum()  # 1 / world size
    z_on, z_ex = (full["loss_mask"][k].sum() * scale for k in (~_ddp_is_expert(full), _ddp_is_expert(full)))
    if agg == "local":  # negative control: each micro-batch's own counts (a per-micro-batch mean of each kind)
        z_on, z_ex = b["loss_mask"][~e].sum() * n_micro, b["loss_mask"][e].sum() * n_micro
    return m.chord_loss(o["logp"], o["logp"].detach() + b["old_shift"], b["advantages"], b["loss_mask"], z_on,
                        is_expert=e, expert_normalizer=z_ex, mu=0.3,
                        sft_weighting="phi" if agg == "local" else agg)[0]


# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch); `agg` carries
# the SFT weighting here
DDP_ADAPTER = (lambda agg: "token_mean", _ddp_loss)


def reference(logp, old, adv, mask, is_expert, mu, weighting, eps=0.2, dual=3.0):
    """Written from CHORD Eq. 5-7 and the Trinity dual-clip PPO loss: (1-mu) token mean over on-policy tokens of
    max(-A r, -A clip(r)) (capped at -3A where A<0) + mu token mean over expert tokens of -w log p."""
    B, T = mask.shape
    grpo, n_on, sft, n_ex = 0.0, 0.0, 0.0, 0.0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            if is_expert[i]:
                p = float(torch.exp(logp[i, t].detach()))  # a plain number: no gradient through the weight
                w = {"none": 1.0, "phi": p * (1 - p), "is": p}[weighting]
                sft = sft - w * logp[i, t]
                n_ex += 1
            else:
                r = torch.exp(logp[i, t] - old[i, t])
                a = adv[i]
                l = torch.max(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps))
                if dual is not None and a < 0:
                    l = torch.min(l, -a * dual)
                grpo = grpo + l
                n_on += 1
    return (1 - mu) * grpo / n_on + mu * sft / n_ex


def _batch(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3 - 0.01
    logp[:, 1] = -0.05  # some tokens with p near 1 (phi small, IS near 1)
    mask = (torch.arange(T)[None] < torch.tensor([7, 3, 5, 6, 2, 4])[:B, None]).float()
    old = logp + 0.4 * torch.randn(B, T, generator=g)  # ratios well outside [0.8, 1.2]: clipping active
    old[5] -= 1.5  # ratio ~4.5 > 3 where A < 0: the dual clip is active
    adv = torch.tensor([1.5, -2.0, 0.7, -0.4, 0.3, -1.1])[:B]
    is_expert = torch.tensor([False, True, False, True, True, False])[:B]
    return logp, old, adv, mask, is_expert


@pytest.mark.parametrize("weighting", ["none", "phi", "is"])
@pytest.mark.parametrize("mu,dual", [(0.1, 3.0), (0.9, 3.0), (0.475, None)])
def test_chord_loss_matches_reference(weighting, mu, dual):
    logp, old, adv, mask, e = _batch()
    old_bad = torch.where(e[:, None], torch.zeros_like(old), old)  # Trinity: expert rows carry logprobs 0
    z_on, z_ex = mask[~e].sum(), mask[e].sum()
    lp = logp.clone().requires_grad_()
    loss, m = chord.chord_loss(lp, old_bad, adv, mask, z_on, is_expert=e, expert_normalizer=z_ex, mu=mu,
                               sft_weighting=weighting, dual_clip=dual)
    lr = logp.clone().requires_grad_()
    ref = reference(lr, old, adv, mask, e, mu, weighting, dual=dual)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward(); ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-5, atol=1e-7)
    assert float(m["clip_frac_low"]) + float(m["clip_frac_high"]) > 0
    if dual is not None:
        assert float(m["dual_clip_frac"]) > 0


def test_dual_clip_inf_is_the_chord_era_loss_without_dual_clip():
    """--dual-clip inf (how the flag turns off the default c = 3) gives the plain clipped loss, with finite gradients
    also on rows whose advantage is 0 (expert rows, equal-reward groups)."""
    logp, old, adv, mask, e = _batch()
    adv[2] = 0.0
    out = []
    for dual in (float("inf"), None):
        lp = logp.clone().requires_grad_()
        loss, _ = chord.chord_loss(lp, old, adv, mask, mask[~e].sum(), is_expert=e, expert_normalizer=mask[e].sum(),
                                   mu=0.3, dual_clip=dual)
        loss.backward()
        out.append((loss, lp.grad))
    torch.testing.assert_close(out[0], out[1])
    assert bool(torch.isfinite(out[0][1]).all())


def test_expert_rows_never_reach_ppo_and_onpolicy_rows_never_reach_sft():
    logp, old, adv, mask, e = _batch()
    z_on, z_ex = mask[~e].sum(), mask[e].sum()
    lp = logp.clone().requires_grad_()
    loss, _ = chord.chord_loss(lp, old, adv, mask, z_on, is_expert=e, expert_normalizer=z_ex, mu=0.3)
    loss.backward()
    # garbage old log-probs and huge advantages on expert rows change nothing
    old2 = torch.where(e[:, None], old + 30.0, old)
    adv2 = torch.where(e, torch.tensor(1e6), adv)
    lp2 = logp.clone().requires_grad_()
    loss2, _ = chord.chord_loss(lp2, old2, adv2, mask, z_on, is_expert=e, expert_normalizer=z_ex, mu=0.3)
    loss2.backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(lp.grad, lp2.grad)
    # mu = 1: pure SFT, no gradient on on-policy rows; mu = 0: pure GRPO, none on expert rows
    for mu, rows in [(1.0, ~e), (0.0, e)]:
        lp3 = logp.clone().requires_grad_()
        chord.chord_loss(lp3, old, adv, mask, z_on, is_expert=e, expert_normalizer=z_ex, mu=mu)[0].backward()
        assert float(lp3.grad[rows].abs().max()) == 0.0
        assert float(lp3.grad[~rows].abs().max()) > 0.0


def test_mix_ratio_does_not_change_the_loss():
    """Each term is a mean over its own kind: tripling the expert rows (a different mix ratio) leaves the loss and
    the per-token gradient of the original rows as they were (one shared token mean would not)."""
    logp, old, adv, mask, e = _batch()
    lp = logp.clone().requires_grad_()
    loss, _ = chord.chord_loss(lp, old, adv, mask, mask[~e].sum(), is_expert=e, expert_normalizer=mask[e].sum(),
                               mu=0.3, sft_weighting="phi")
    big = [torch.cat([x, x[e], x[e]]) for x in (logp, old, adv, mask, e)]
    loss3, _ = chord.chord_loss(big[0], big[1], big[2], big[3], big[3][~big[4]].sum(), is_expert=big[4],
                                expert_normalizer=big[3][big[4]].sum(), mu=0.3, sft_weighting="phi")
    torch.testing.assert_close(loss, loss3)
    shared = chord.chord_loss(logp, old, adv, mask, mask.sum(), is_expert=e, expert_normalizer=mask.sum(), mu=0.3,
                              sft_weighting="phi")[0]
    shared3 = chord.chord_loss(*big[:4], big[3].sum(), is_expert=big[4], expert_normalizer=big[3].sum(), mu=0.3,
                               sft_weighting="phi")[0]
    assert not torch.allclose(shared, shared3)


def test_phi_gradient_is_minus_one_minus_p_times_grad_p():
    """CHORD-phi: grad[-sg(p(1-p)) log p] = -p(1-p) grad p / p = -(1-p) grad p, through the logits of a softmax."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, 11, generator=g, requires_grad=True)  # (B, T, V) logits
    tgt = torch.randint(0, 11, (5, 4), generator=g)
    mask = torch.ones(5, 4)
    e = torch.ones(5, dtype=torch.bool)  # every row expert
    logp = torch.log_softmax(z, -1).gather(-1, tgt[..., None])[..., 0]
    loss, _ = chord.chord_loss(logp, logp.detach(), torch.zeros(5), mask, torch.tensor(1.0), is_expert=e,
                               expert_normalizer=mask.sum(), mu=1.0, sft_weighting="phi")
    (gz,) = torch.autograd.grad(loss, z)
    p = torch.softmax(z, -1).gather(-1, tgt[..., None])[..., 0]
    (gz_ref,) = torch.autograd.grad((-(1 - p.detach()) * p).sum() / mask.sum(), z)
    torch.testing.assert_close(gz, gz_ref)


def test_mu_schedule_chord_mu_values():
    mu = functools.partial(chord.mu_schedule, warmup=0, decay=200, peak=0.9, valley=0.05)
    assert mu(0) == pytest.approx(0.90)
    assert mu(50) == pytest.approx(0.78, abs=5e-3)
    assert mu(100) == pytest.approx(0.475)
    assert mu(150) == pytest.approx(0.17, abs=5e-3)
    assert mu(200) == mu(1000) == pytest.approx(0.05)
    assert all(mu(t) > mu(t + 1) for t in range(200))
    # Trinity's example: linear warmup 0 -> 0.5 over 200 steps, cosine to 0.02 by step 600
    ex = functools.partial(chord.mu_schedule, warmup=200, decay=400, peak=0.5, valley=0.02)
    assert (ex(0), ex(100), ex(200), ex(400), ex(600)) == pytest.approx((0.0, 0.25, 0.5, 0.26, 0.02))
    assert chord.mu_schedule(0, 0, 0, 0.1, 0.1) == chord.mu_schedule(500, 0, 0, 0.1, 0.1) == 0.1  # CHORD-phi


def test_variants_recipe_and_explicit_override():
    import common
    presets = {"preset": chord.PRESETS, "variant": chord.VARIANTS, "recipe": chord.RECIPES}
    real = ["--model", "Qwen/Qwen2.5-7B-Instruct"]
    a = common.parse_args(chord.Args, real, presets)  # the default: CHORD-phi
    assert (a.variant, a.mu_peak, a.mu_valley, a.mu_decay_steps, a.sft_weighting) == ("phi", 0.1, 0.1, 0, "phi")
    assert (a.dual_clip, a.scale_rewards, a.loss_agg, a.beta, a.expert_data_ratio) == (3.0, "group", "token_mean", 0.0, 0.2)
    a = common.parse_args(chord.Args, real + ["--variant", "mu"], presets)
    assert (a.mu_warmup_steps, a.mu_decay_steps, a.mu_peak, a.mu_valley, a.sft_weighting) == (0, 200, 0.9, 0.05,
                                                                                                "none")
    a = common.parse_args(chord.Args, ["--variant", "mu"], presets)  # embedded demo: decay within the 80-step run
    assert (a.mu_decay_steps, a.max_steps, a.mu_peak) == (80, 80, 0.9)
    a = common.parse_args(chord.Args, ["--variant", "mu", "--mu-decay-steps", "200", "--sft-weighting", "is"], presets)
    assert (a.mu_decay_steps, a.sft_weighting) == (200, "is")
    assert common.parse_args(chord.Args, ["--dual-clip", "inf"], presets).dual_clip == float("inf")


def test_expert_batch_size_trinity_formula():
    # mix_chord.yaml: 256 on-policy + 64 expert = 320, expert_data_ratio 0.2 = ceil(0.2 x 320)
    assert chord.expert_batch_size(0.2, 256) == 64 == math.ceil(0.2 * 320)
    assert chord.expert_batch_size(0.2, 128) == 32
    assert chord.expert_batch_size(0.2, 128, world_size=3) == 33  # rounded up to a multiple of the world size
    assert chord.expert_batch_size(0.5, 10) == 10
    assert chord.expert_batch_size(0.1, 10) == 2  # ceil(1.11)
    assert chord.expert_batch_size(0.1, 63) == 7  # 0.1 / 0.9 x 63 = 7.000000000000001 in floating point


@pytest.mark.parametrize("weighting,equal", [("phi", True), ("none", True), ("local", False)])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, weighting, equal):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "chord", weighting, out, timeout=300)
    rel = json.loads(out.read_text())["max_rel_diff"]
    if equal:
        assert rel < 1e-5, rel
    else:  # per-micro-batch means weight tokens by the size of the micro-batch they land in: a different gradient
        assert rel > 1e-2, rel


def _small_eval(tmp_path, n=16):
    import data
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data.embedded_task("eval")[:n]))
    return path


@pytest.mark.parametrize("flags,message", [
    (["--expert-data-ratio", "0"], "--expert-data-ratio 0.0: must be in (0, 1)"),
    (["--expert-data-ratio", "1"], "--expert-data-ratio 1.0: must be in (0, 1)"),
    (["--mu-peak", "1.5"], "--mu-peak 1.5: must be in [0, 1]"),
    (["--mu-decay-steps", "-1"], "--mu-decay-steps -1: must be >= 0"),
    (["--dataset", "{rl}"], "needs --expert-dataset"),
])
def test_bad_inputs(tmp_path, flags, message):
    rl = _small_eval(tmp_path)
    flags = [f.replace("{rl}", str(rl)) for f in flags]
    p = run_method("chord", *flags, "--output-dir", tmp_path / "out", "--quiet", check=False, timeout=300)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["phi", "mu"])
def test_chord_end_to_end(tmp_path, variant):
    run_method("chord", "--variant", variant, "--max-steps", 3, "--prompts-per-step", 4, "--num-generations", 4,
               "--eval-every", 0, "--eval-size", 16, "--max-new-tokens", 24, "--output-dir", tmp_path / "out",
               "--quiet", "--grad-accum", 2, "--mu-decay-steps", 4, "--save-every", 0)
    rec = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/reward" in r]
    assert len(train) == 3
    for k in ["train/loss", "train/grpo_loss", "train/sft_loss", "train/expert_nll", "train/mu", "train/grad_norm",
              "train/entropy", "train/dual_clip_frac"]:
        assert k in train[0], k
    mus = [r["train/mu"] for r in train]
    if variant == "mu":  # cosine 0.9 -> 0.05 over 4 optimizer steps: mu(0), mu(1), mu(2)
        assert mus == pytest.approx([chord.mu_schedule(t, 0, 4, 0.9, 0.05) for t in range(3)], abs=1e-6)
    else:
        assert mus == pytest.approx([0.1] * 3)
        assert 0 < train[0]["train/expert_weight"] < 0.25  # sg[p(1-p)] <= 1/4
