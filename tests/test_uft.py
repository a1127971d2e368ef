"""methods/uft.py: uft_loss against the spec's equations (PPO clip, k3 KL, entropy, hint NLL; values and gradients),
the hint schedule against the spec's validation numbers (mean revealed fraction at t = 1, 75, 150, 225, 300, 301),
the stage / uniform baselines, the step splitting, bad flags, GA x DDP against one full batch (the hint scored
through FusedLM's prompt_mask), the paper recipe's dry run, end to end with resume."""
import json
import math
import shutil

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method, rand_batch

import common

uft = load_method("uft")
# used by tests/_ddp_loss_worker.py (which adds, for uft, the hint: FusedLM's prompt_mask, b["hint_mask"] and the
# step's b["hint_normalizer"]); aux plays the reference log-probs
DDP_ADAPTER = (lambda agg: agg,
               lambda m, o, b, z, agg, n_micro: m.uft_loss(o["logp"], o["logp"].detach() + b["old_shift"],
                                                           b["advantages"], b["loss_mask"], z,
                                                           hint_logp=o["prompt_logp"], hint_mask=b["hint_mask"],
                                                           hint_normalizer=b["hint_normalizer"], hint_coef=0.5,
                                                           ref_logp=o["logp"].detach() + 0.1 * b["aux"], beta=0.01,
                                                           entropy_coef=0.0, loss_agg=agg, max_len=20)[0])


def reference(logp, old, ref, ent, adv, mask, hint_lp, hint_mask, hint_count, eps, beta, ent_coef, hint_coef, agg, L):
    """UFT loss (spec methods_c.md §7 'Math'), with Python loops: the GRPO clipped surrogate + beta k3 KL - entropy
    bonus per response token, aggregated, plus hint_coef x the mean NLL over the step's hint tokens."""
    B, T = mask.shape
    out = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            lt = -torch.min(r * a, torch.clamp(r, 1 - eps, 1 + eps) * a)
            d = ref[i, t] - logp[i, t]
            lt = lt + beta * (torch.exp(d) - d - 1) - ent_coef * ent[i, t]  # low_var_kl (k3)
            out[i, t] = lt * mask[i, t]
    if agg == "token_mean":
        rl = out.sum() / mask.sum()
    elif agg == "seq_mean_token_mean":
        rl = sum(out[i].sum() / mask[i].sum() for i in range(B)) / B
    else:
        rl = sum(out[i].sum() / L for i in range(B)) / B
    nll = sum(-hint_lp[i, t] for i in range(B) for t in range(T) if hint_mask[i, t])
    return rl + hint_coef * nll / hint_count


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("beta,hint_coef", [(0.001, 0.001), (0.04, 0.5), (0.0, 0.0)])
def test_uft_loss_matches_reference(agg, beta, hint_coef):
    logp, mask = rand_batch(B=4, T=9)
    g = torch.Generator().manual_seed(5)
    old = logp + 0.4 * torch.randn(logp.shape, generator=g)  # ratios outside [0.8, 1.2]: clipping active
    ref = logp + 0.3 * torch.randn(logp.shape, generator=g)
    ent = torch.rand(logp.shape, generator=g) * 2
    hint_lp = -torch.rand(logp.shape, generator=g) * 4
    hint_mask = torch.zeros_like(mask)
    hint_mask[0, :3] = hint_mask[2, 1:6] = 1  # 8 hint tokens in two rows, none in the others
    adv = torch.tensor([1.5, -2.0, 0.7, -0.4])
    z = mask.sum() if agg == "token_mean" else torch.tensor(4.0)
    lp, hp, en = (x.clone().requires_grad_() for x in (logp, hint_lp, ent))
    loss, m = uft.uft_loss(lp, old, adv, mask, z, hint_logp=hp, hint_mask=hint_mask, hint_normalizer=torch.tensor(8.0),
                           hint_coef=hint_coef, ref_logp=ref, entropy=en, beta=beta, kl_estimator="k3",
                           entropy_coef=0.001, loss_agg=agg, max_len=12)
    lr, hr, er = (x.clone().requires_grad_() for x in (logp, hint_lp, ent))
    expect = reference(lr, old, ref, er, adv, mask, hr, hint_mask, 8.0, 0.2, beta, 0.001, hint_coef, agg, 12)
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    loss.backward()
    expect.backward()
    for a, b in ((lp, lr), (hp, hr), (en, er)):  # hint_coef 0: the hint log-probs are not used (no gradient)
        torch.testing.assert_close(torch.zeros_like(a) if a.grad is None else a.grad, b.grad, rtol=1e-5, atol=1e-7)
    if hint_coef:  # the hint gradient: -hint_coef / (hint tokens of the step) on each hint token, 0 elsewhere
        torch.testing.assert_close(hp.grad, -hint_coef * hint_mask / 8.0)
        assert float(m["hint_nll"]) == pytest.approx(float(-(hint_lp * hint_mask).sum() / 8))


def test_no_hint_tokens_no_hint_term():
    """After T_hint the step has no hint token: the loss is grpo's (the official masked_mean clamps its count)."""
    logp, mask = rand_batch()
    adv = torch.tensor([1.0, -1.0, 0.5, 0.0])
    zero = torch.zeros_like(mask)
    a, _ = uft.uft_loss(logp, logp, adv, mask, mask.sum(), hint_logp=-torch.ones_like(logp), hint_mask=zero,
                        hint_normalizer=torch.tensor(0.0), beta=0.0, entropy_coef=0.0)
    b, _ = uft.uft_loss(logp, logp, adv, mask, mask.sum(), beta=0.0, entropy_coef=0.0)
    assert torch.isfinite(a) and float(a) == float(b)


def expected_fraction(n_steps, t, low=0.05, high=0.95, horizon=300, chunks=5):
    """E[revealed steps] / n_steps written from the spec: k ~ Binomial(m, p_t) mapped through the official
    separation [round(i / m * n) for i in 0..m], last = n; no hint after the horizon."""
    if t > horizon:
        return 0.0
    m = min(chunks, n_steps)
    sep = [round(i / m * n_steps) for i in range(m + 1)]
    sep[-1] = n_steps
    p = low + 0.5 * (high - low) * (1 + math.cos(math.pi * t / horizon))
    return sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) * sep[k] for k in range(m + 1)) / n_steps


def test_hint_schedule_matches_the_spec_validation_numbers():
    """Spec §9: the official hint-length block on an 8-step hint, 20,000 draws at t = 1, 75, 150, 225, 300, 301 gave
    mean revealed fractions 0.941, 0.803, 0.498, 0.197, 0.058, 0.000 (+-0.002)."""
    spec = {1: 0.941, 75: 0.803, 150: 0.498, 225: 0.197, 300: 0.058, 301: 0.0}
    for t, want in spec.items():
        assert expected_fraction(8, t) == pytest.approx(want, abs=0.002), t
        draws = [uft.sample_hint(8, t, (0, t, i)) for i in range(20000)]
        assert sum(draws) / 8 / len(draws) == pytest.approx(want, abs=0.01), t  # 20,000 draws: sd < 0.0035
        assert set(draws) <= {0, 2, 3, 5, 6, 8}  # the official separation of 8 steps into 5 chunks
    assert uft.sample_hint(8, 75, (3, 75, 7)) == uft.sample_hint(8, 75, (3, 75, 7))  # keyed: --resume redraws it
    assert uft.sample_hint(0, 1, (0, 1, 0)) == 0  # no demonstration steps, no hint
    assert {uft.sample_hint(3, 150, (0, 150, i)) for i in range(200)} == {0, 1, 2, 3}  # 3 steps: 3 chunks of one step


def test_stage_and_uniform_baselines():
    """stage: num + 1 equal stages down to no hint at T_hint; uniform (R3): separation entries uniformly, every step,
    T_hint ignored (the official uniform branch is checked before the timestep)."""
    s = [uft.sample_hint(10, t, (0, t, 0), "stage", horizon=300) for t in (1, 49, 50, 150, 249, 250, 300, 301)]
    assert s == [10, 10, 8, 4, 2, 0, 0, 0]  # m = 5, stage length 300 // 6 = 50: k = 5 - t // 50
    u = [uft.sample_hint(10, t, (0, t, i), "uniform", horizon=300) for t in (1, 1000) for i in range(3000)]
    for v in (0, 2, 4, 6, 8, 10):
        assert u.count(v) / len(u) == pytest.approx(1 / 6, abs=0.03)


def test_hint_steps_split_like_the_official_lists():
    """The default split gives back the official step lists (countdown, MATH with '.\\t'), joined text unchanged;
    the embedded solution splits after ',' and stops before '#'."""
    cd = ["19 + 35 = 54\n", "44 + 54 = 98\n", "Therefore, the final equation is 44 + (19 + 35)"]
    assert uft.hint_steps("".join(cd)) == cd
    math_hint = ["We test small primes. ", "The smallest prime is $2$, but $f(2) = 3.5$. ", "A.\t", "So $x=3$!\n",
                 "\n", "Done"]
    assert uft.hint_steps("".join(math_hint)) == math_hint
    assert uft.hint_steps("7+8=15,5+6+1=12#125", r"(?<=,)", "#") == ["7+8=15,", "5+6+1=12"]
    assert uft.hint_steps("7*6=42,4*6+4=28#282", r"(?<=,)", None) == ["7*6=42,", "4*6+4=28#282"]
    assert uft.hint_steps("", r"(?<=,)", "#") == [] and uft.hint_steps("#5", r"(?<=,)", "#") == []


@pytest.mark.parametrize("argv,needle", [
    (["--hint-coef", "-1"], "--hint-coef >= 0"),
    (["--hint-high", "1.5"], "--hint-high in [0, 1]"),
    (["--hint-chunks", "0"], "--hint-chunks >= 1"),
    (["--hint-schedule", "uniform", "--hint-decay-steps", "10"], "--hint-decay-steps acts only with"),
    (["--hint-schedule", "stage", "--hint-low", "0.1"], "--hint-low acts only with --hint-schedule cosine"),
    (["--hint-split", "(unclosed"], "--hint-split: missing ), unterminated subpattern"),
])
def test_bad_flags_raise_user_error(argv, needle):
    a = common.parse_args(uft.Args, argv, {"preset": uft.PRESETS, "recipe": uft.RECIPES})
    with pytest.raises(common.UserError) as e:
        uft.check_hint_args(a)
    assert needle in str(e.value)
    uft.check_hint_args(common.parse_args(uft.Args, ["--hint-schedule", "stage", "--hint-decay-steps", "10"],
                                          {"preset": uft.PRESETS, "recipe": uft.RECIPES}))  # acts with stage


def test_ddp2_x_accum2_equals_full_batch(tmp_path):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "uft", "token_mean", out, timeout=300)
    assert json.loads(out.read_text())["max_rel_diff"] < 1e-5


def test_paper_recipe_dry_run():
    """--recipe paper --dry-run: the spec's defaults (§7 Defaults) with their sources, and the batch they make."""
    p = run_method("uft", "--recipe", "paper", "--dry-run", timeout=120)
    rows = {line.split()[0]: line.split(None, 2)[1:] for line in p.stdout.splitlines() if line.startswith("  ")
            and len(line.split()) > 1}
    want = {"hint_decay_steps": "300", "max_steps": "500", "hint_low": "0.05", "hint_high": "0.95",
            "num_generations": "4", "prompts_per_step": "256", "lr": "1e-06", "eps_low": "0.2", "beta": "0.001",
            "kl_estimator": "'k3'", "entropy_coef": "0.001", "hint_coef": "0.001", "temperature": "1.0",
            "max_new_tokens": "1024", "max_grad_norm": "1.0", "hint_schedule": "'cosine'", "hint_chunks": "5",
            "model": "'Qwen/Qwen2.5-1.5B'"}
    for k, v in want.items():
        assert rows[k][0] == v and rows[k][1].startswith("recipe paper"), (k, rows.get(k))
    assert "64 prompts, 256 sequences" in p.stdout  # mini-batch 64 prompts x 4 rollouts: 4 optimizer steps
    r3 = run_method("uft", "--recipe", "r3", "--dry-run", timeout=120).stdout
    assert "'uniform'" in r3 and any(x.split()[:2] == ["hint_coef", "0.0"] for x in r3.splitlines() if x.strip())


@pytest.mark.slow
def test_uft_end_to_end_and_resume(tmp_path):
    """4 steps straight vs resuming that run's step-2 checkpoint: the same hints (keyed by step), rewards and
    losses; the hint shrinks to nothing after T_hint = 2 and its NLL is logged."""
    flags = ["--max-steps", 4, "--prompts-per-step", 4, "--num-generations", 4, "--max-new-tokens", 8,
             "--eval-every", 0, "--eval-size", 4, "--quiet", "--hint-decay-steps", 2, "--grad-accum", 2,
             "--save-every", 2]
    a, b = tmp_path / "a", tmp_path / "b"
    run_method("uft", "--output-dir", a, *flags, env={"OMP_NUM_THREADS": "1"})
    shutil.copytree(a, b)
    for p in ["checkpoint-0000004", "final"]:  # as if the run had stopped after step 2's checkpoint
        shutil.rmtree(b / p)
    run_method("uft", "--output-dir", b, "--resume", *flags, env={"OMP_NUM_THREADS": "1"})
    ra = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    rb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines() if "train/reward" in x]
    assert [r["step"] for r in ra] == [1, 2, 3, 4] == [r["step"] for r in rb]
    for x, y in zip(ra[2:], rb[2:]):
        for k in ["train/reward", "train/hint_frac", "train/completion_length", "train/loss", "train/kl"]:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
    assert ra[0]["train/hint_frac"] > 0 and ra[0]["train/hint_nll"] > 0  # t = 1: p_t = 0.5, a hint and its NLL
    assert ra[2]["train/hint_frac"] == ra[3]["train/hint_frac"] == 0 and ra[3]["train/hint_nll"] == 0  # t > T_hint
    comp = [json.loads(x) for x in (a / "completions.jsonl").read_text().splitlines()]
    assert all(c["prompt"].endswith("<|assistant|>") for c in comp if c["step"] == 4)  # no hint at step 4
