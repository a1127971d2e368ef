"""methods/srft.py: srft_loss against independent references of both forms (the paper's equations, the third-party
HPT-repository code as the spec quotes it; values and gradients), the clip acting only on the low side, GA x DDP,
bad inputs, the recipes' dry runs, end to end."""
import functools
import json
import sys

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method

srft = load_method("srft")
L_MAX = 16  # the constant of the third party's token sum / L_max in these tests


@functools.lru_cache(None)
def _worker_batch():
    """The 8-row batch tests/_ddp_loss_worker.py builds (deterministic)."""
    import _ddp_loss_worker
    import data
    return _ddp_loss_worker.make_batch(len(data.build_embedded_tokenizer()))


def _rows(b):
    """Row number of each row of a micro-batch in the worker's batch (advantages are unique)."""
    return (b["advantages"][:, None] == _worker_batch()["advantages"][None]).float().argmax(1)


def _ddp_loss(m, o, b, z, agg, n_micro):
    """Rows 0, 1, 4, 5 are demonstration rows, 2 and 6 correct own rollouts, 3 and 7 wrong ones: every micro-batch of
    every rank holds all three kinds. The normalizers are the global counts main() all-reduces, from the worker's full
    batch scaled like z (1 / world size). Entropy stand-in -logp |aux| carries a gradient (the worker's forward has
    none). agg: paper, hpt_repo (both must match one full batch), batch (H per micro-batch: split-dependent)."""
    full, r = _worker_batch(), _rows(b)
    scale = z / full["loss_mask"].sum()
    fe = torch.arange(8) % 4 < 2
    form = dict(demo_rl="shape", loss_agg="seq_mean_token_sum_norm", entropy_coef=0.01) if agg == "hpt_repo" else \
        dict(demo_rl="clip", loss_agg="token_mean", entropy_coef=0.0)
    z_rl = (8 if agg == "hpt_repo" else full["loss_mask"].sum()) * scale
    return m.srft_loss(o["logp"], None, b["advantages"], b["loss_mask"], z_rl, is_expert=r % 4 < 2,
                       expert_normalizer=full["loss_mask"][fe].sum() * scale, token_normalizer=full["loss_mask"].sum()
                       * scale, entropy=-o["logp"] * b["aux"].abs(), correct=r % 4 == 2, max_len=L_MAX,
                       entropy_weights="batch" if agg == "batch" else "sequence", **form)[0]


# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch)
DDP_ADAPTER = (lambda agg: "token_mean", _ddp_loss)


def _H(entropy, mask):
    return [float((entropy[i].detach() * mask[i]).sum() / max(float(mask[i].sum()), 1.0)) for i in range(len(mask))]


def reference_paper(logp, adv, mask, is_expert, entropy, correct, eps=0.2, w_sft=0.5, w_pos=0.1):
    """The paper's equations (spec §2): SFT 0.5 e^-H (-log p) as a token mean over demonstration tokens; demo RL
    max(-A p, -A clip(p)); self RL -0.1 e^H log p (correct) and +log p (wrong); both RL terms a token mean over all
    tokens of the step; H the detached token-mean entropy of the row."""
    B, T = mask.shape
    H = _H(entropy, mask)
    sft, n_ex, rl, n = 0.0, 0, 0.0, 0
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            n += 1
            if is_expert[i]:
                p = torch.exp(logp[i, t])
                sft, n_ex = sft + w_sft * torch.exp(torch.tensor(-H[i])) * -logp[i, t], n_ex + 1
                rl = rl + torch.max(-adv[i] * p, -adv[i] * torch.clamp(p, 1 - eps, 1 + eps))
            elif correct[i]:
                rl = rl - w_pos * torch.exp(torch.tensor(H[i])) * logp[i, t]
            else:
                rl = rl + logp[i, t]
    return sft / n_ex + rl / n


def reference_third_party(logp, adv, mask, is_expert, entropy, correct, ent_coef=0.001):
    """The HPT repository's srft branch, one micro-batch, as the spec quotes it (mix_actor.py +
    compute_token_on_off_policy_srft_loss, srft_type paper, off_policy_reshape p_div_p_0.1, no clip):
    H_coef = masked_mean(entropy, mask, -1).detach(); sft = masked_mean(-logp * 0.5 exp(-H), demo rows);
    on_adv = where(correct, 0.1 exp(H), -1); pg = (where(demo, -A p/(p+0.1), -on_adv logp) * mask).sum() / L_max;
    loss = sft + pg - ent_coef masked_mean(entropy, mask)."""
    H = ((entropy * mask).sum(-1) / mask.sum(-1)).detach()
    e = is_expert[:, None]
    sft = (-logp * (0.5 * torch.exp(-H))[:, None] * mask)[is_expert].sum() / mask[is_expert].sum()
    on_adv = torch.where(correct, 0.1 * torch.exp(H), torch.tensor(-1.0))
    p = logp.exp()
    pg = (torch.where(e, -adv[:, None] * p / (p + 0.1), -on_adv[:, None] * logp) * mask).sum() / L_MAX
    return sft + pg - ent_coef * (entropy * mask).sum() / mask.sum()


def _batch(B=8, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3 - 0.01
    logp[1, :2] = -0.02  # demonstration tokens with p near 1
    mask = (torch.arange(T)[None] < torch.tensor([7, 3, 5, 6, 2, 4, 7, 1])[:B, None]).float()
    adv = torch.tensor([1.5, -2.0, 0.7, -0.4, 0.3, -1.1, 0.9, 0.2])[:B]
    is_expert = torch.tensor([False, True, False, True, False, False, True, False])[:B]
    correct = torch.tensor([True, False, False, False, True, False, False, True])[:B]
    entropy = torch.rand(B, T, generator=g) * 3
    return logp, adv, mask, is_expert, entropy, correct


def _grads(fn):
    logp, adv, mask, e, ent, c = _batch()
    lp, en = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss = fn(lp, adv, mask, e, en, c)
    loss.backward()
    return loss, lp.grad, torch.zeros_like(ent) if en.grad is None else en.grad


@pytest.mark.parametrize("w", [(0.5, 0.1), (0.3, 1.0)])
def test_paper_form_matches_reference(w):
    ours = _grads(lambda lp, adv, mask, e, en, c: srft.srft_loss(
        lp, None, adv, mask, mask.sum(), is_expert=e, expert_normalizer=mask[e].sum(), token_normalizer=mask.sum(),
        entropy=en, correct=c, w_sft_scale=w[0], w_pos_scale=w[1])[0])
    ref = _grads(lambda lp, adv, mask, e, en, c: reference_paper(lp, adv, mask, e, en, c, w_sft=w[0], w_pos=w[1]))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(ours[2].abs().max()) == 0.0  # the entropy weights carry no gradient (stop-gradient)


def test_third_party_form_matches_the_quoted_code():
    ours = _grads(lambda lp, adv, mask, e, en, c: srft.srft_loss(
        lp, None, adv, mask, 1.0, is_expert=e, expert_normalizer=mask[e].sum(), token_normalizer=mask.sum(),
        entropy=en, correct=c, demo_rl="shape", shaping_gamma=0.1, entropy_coef=0.001,
        loss_agg="seq_mean_token_sum_norm", max_len=L_MAX)[0])
    ref = _grads(reference_third_party)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(ours[2].abs().max()) > 0  # the entropy bonus has a gradient, the weights do not


def test_batch_entropy_weights():
    """--entropy-weights batch: one H per kind (demonstration tokens, own tokens), a token mean over the micro-batch."""
    logp, adv, mask, e, ent, c = _batch()
    ex, on = mask * e[:, None], mask * ~e[:, None]
    h_ex, h_on = float((ent * ex).sum() / ex.sum()), float((ent * on).sum() / on.sum())
    flat = {i: h_ex if e[i] else h_on for i in range(8)}
    ent_flat = torch.tensor([[flat[i]] * 7 for i in range(8)])  # per-row constant: the per-sequence form then agrees
    args = (logp, None, adv, mask, mask.sum())
    kw = dict(is_expert=e, expert_normalizer=mask[e].sum(), token_normalizer=mask.sum(), correct=c)
    torch.testing.assert_close(srft.srft_loss(*args, entropy=ent, entropy_weights="batch", **kw)[0],
                               srft.srft_loss(*args, entropy=ent_flat, **kw)[0])


def test_demo_clip_acts_only_on_the_low_side():
    """pi_beta = 1: p <= 1 < 1 + eps, so A > 0 demonstration tokens always keep the gradient -A p (d/dlogp), and A < 0
    tokens with p < 1 - eps get none."""
    logp, adv, mask, e, ent, c = _batch()
    lp = logp.clone().requires_grad_()
    only_rl = dict(is_expert=e, expert_normalizer=torch.tensor(1e30), token_normalizer=mask.sum(), entropy=ent,
                   correct=c)  # the SFT term scaled away
    srft.srft_loss(lp, None, adv, mask, mask.sum(), **only_rl)[0].backward()
    p, n = logp.exp(), mask.sum()
    for i in torch.nonzero(e).flatten().tolist():
        for t in range(7):
            if not mask[i, t]:
                continue
            want = -adv[i] * p[i, t] / n if adv[i] > 0 or p[i, t] >= 0.8 else 0.0
            assert float(lp.grad[i, t]) == pytest.approx(float(want), abs=1e-7)
    assert any(adv[i] < 0 and (p[i] < 0.8).any() for i in torch.nonzero(e).flatten().tolist())  # case present


@pytest.mark.parametrize("case", ["paper", "hpt_repo"])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, case):
    """Both forms: one full batch's gradient under 2 ranks x 2 micro-batches (--entropy-weights batch is not: one H
    per micro-batch depends on the split, as its flag says; the adapter keeps that case for manual checks)."""
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "srft", case, out, timeout=300)
    rel = json.loads(out.read_text())["max_rel_diff"]
    assert rel < 1e-5, rel


def _main(monkeypatch, capsys, *argv):
    """srft.main() in this process (dry runs and refusals load nothing): (stdout, the SystemExit message or None)."""
    monkeypatch.setattr(sys, "argv", ["srft.py", *map(str, argv)])
    try:
        srft.main()
        code = None
    except SystemExit as e:
        code = str(e.code)
    return capsys.readouterr().out, code


def test_recipes_dry_run(monkeypatch, capsys):
    def _dry(recipe):
        out = _main(monkeypatch, capsys, "--recipe", recipe, "--dry-run")[0]
        return out, {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.startswith("  ") and len(ln.split()) > 1}
    out, v = _dry("paper")
    want = {"variant": "'paper'", "demo_rl": "'clip'", "scale_rewards": "'group'", "loss_agg": "'token_mean'",
            "entropy_coef": "0.0", "w_sft_scale": "0.5", "w_pos_scale": "0.1", "num_generations": "7",
            "prompts_per_step": "128", "lr": "1e-06", "beta": "0.0"}
    assert {k: v.get(k) for k in want} == want
    assert "64 prompts, 512 sequences" in out  # 2 optimizer steps of 64 x (7 own + 1 demonstration)
    out, v = _dry("hpt_repo")
    want = {"variant": "'hpt_repo'", "demo_rl": "'shape'", "shaping_gamma": "0.1", "scale_rewards": "'none'",
            "loss_agg": "'seq_mean_token_sum_norm'", "entropy_coef": "0.001", "max_new_tokens": "8192",
            "max_steps": "500", "num_generations": "7", "system_prompt": "''"}
    assert {k: v.get(k) for k in want} == want
    assert "left UNKNOWN" not in out


@pytest.mark.parametrize("flags,message", [
    (["--eps-high", "0.28"], "--eps-high never acts"),
    (["--variant", "hpt_repo", "--eps-low", "0.1"], "--eps-low acts only with --demo-rl clip"),
    (["--shaping-gamma", "0.2"], "--shaping-gamma (> 0) acts only with --demo-rl shape"),
    (["--w-pos-scale", "-1"], "--w-pos-scale -1.0: must be >= 0"),
])
def test_bad_inputs(monkeypatch, capsys, tmp_path, flags, message):
    """Refused with one `error:` line before anything is loaded."""
    _, code = _main(monkeypatch, capsys, *flags, "--output-dir", tmp_path / "out", "--quiet")
    assert code is not None and code.startswith("error:") and message in code and "\n" not in code, code


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--variant", "hpt_repo", "--entropy-weights", "batch"]])
def test_srft_end_to_end(tmp_path, flags):
    run_method("srft", "--max-steps", 2, "--prompts-per-step", 2, "--num-generations", 4, "--eval-every", 0,
               "--eval-size", 4, "--max-new-tokens", 32, "--output-dir", tmp_path / "out", "--quiet",
               "--save-every", 0, "--grad-accum", 2, *flags, env={"OMP_NUM_THREADS": "1"})
    rec = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/reward" in r]
    assert len(train) == 2
    for r in train:
        assert r["train/demo_reward"] == 1.0  # the embedded demonstrations are correct and fit in 32 tokens
        assert 0 < r["train/w_sft"] <= 0.5 and r["train/w_pos"] >= 0.1  # 0.5 e^-H, 0.1 e^H
        assert r["train/sft_loss"] > 0


SPY_ADVANTAGES = """
import json, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from tests_util import load_method
srft = load_method("srft")
seen = []
real = srft.group_advantages
def spy(rewards, group_index, *args, batch_moments=None, **kwargs):  # the real function, its inputs recorded
    seen.append(dict(rewards=rewards.tolist(), moments=batch_moments.tolist()))
    return real(rewards, group_index, *args, batch_moments=batch_moments, **kwargs)
srft.group_advantages = spy
sys.argv = ["srft.py"] + {argv!r}
srft.main()
print("SEEN", json.dumps(seen))
"""


@pytest.mark.slow
def test_batch_std_counts_the_demonstrations(tmp_path):
    """--scale-rewards batch: the advantages are taken over G_on U G_off (own rollouts and the demonstration of each
    question), so the batch std must be that of the same rewards, demonstrations included (it once used the own
    rollouts only)."""
    import os
    import subprocess
    argv = ["--max-steps", "1", "--prompts-per-step", "2", "--num-generations", "4", "--eval-every", "0",
            "--eval-size", "0", "--max-new-tokens", "8", "--output-dir", str(tmp_path / "out"), "--quiet",
            "--save-every", "0", "--scale-rewards", "batch"]
    p = subprocess.run([sys.executable, "-c", SPY_ADVANTAGES.format(repo=str(REPO), tests=str(REPO / "tests"),
                                                                    argv=argv)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(p.stdout.split("SEEN ", 1)[1])
    assert len(seen) == 1
    r = torch.tensor(seen[0]["rewards"], dtype=torch.float64)
    assert r.numel() == 2 * 4 + 2  # 8 own rollouts, then the 2 demonstrations
    expected = [float(r.numel()), float(r.sum()), float((r * r).sum())]
    assert seen[0]["moments"] == pytest.approx(expected)
