"""methods/hpt.py: hpt_loss against the spec's equations (values and gradients; our global means and the official
per-micro-batch form, a micro-batch without demonstration rows included), the gate on hand-made rewards, GA x DDP,
bad inputs, the paper recipe's dry run, end to end."""
import functools
import json
import math
import os
import sys

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method

hpt = load_method("hpt")
L_MAX = 16  # the constant of the RL term's token sum / L_max in these tests


@functools.lru_cache(None)
def _worker_batch():
    """The 8-row batch tests/_ddp_loss_worker.py builds (deterministic)."""
    import _ddp_loss_worker
    import data
    return _ddp_loss_worker.make_batch(len(data.build_embedded_tokenizer()))


def _ddp_is_expert(b):
    """Rows 0, 1, 4, 5 of the worker's batch are demonstration rows: every micro-batch of every rank mixes both kinds
    with different lengths. Rows are recognised by their (unique) advantage."""
    row = (b["advantages"][:, None] == _worker_batch()["advantages"][None]).float().argmax(1)
    return row % 4 < 2


def _ddp_loss(m, o, b, z, agg, n_micro):
    """The worker passes one normalizer (all tokens of the step / world size); HPT needs three, the same global counts
    main() all-reduces, taken from the worker's full batch and scaled like z. The entropy stand-in -logp |aux| carries
    a gradient (the worker's forward has no entropy). agg: global (ours), global_clip, local (official form)."""
    full, e = _worker_batch(), _ddp_is_expert(b)
    scale = z / full["loss_mask"].sum()  # 1 / world size
    fe = _ddp_is_expert(full)
    z_rl, z_ex, z_tok = (~fe).sum() * scale, full["loss_mask"][fe].sum() * scale, full["loss_mask"].sum() * scale
    return m.hpt_loss(o["logp"], o["logp"].detach() + b["old_shift"], b["advantages"], b["loss_mask"], z_rl,
                      is_expert=e, expert_normalizer=z_ex, token_normalizer=z_tok, sft_coef=0.3,
                      sft_agg="per_microbatch" if agg == "local" else "token_mean",
                      entropy=-o["logp"] * b["aux"].abs(), entropy_coef=0.01, clip=agg == "global_clip",
                      loss_agg="seq_mean_token_sum_norm", max_len=L_MAX)[0]


# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch)
DDP_ADAPTER = (lambda agg: "token_mean", _ddp_loss)


def reference(logp, old, adv, mask, is_expert, entropy, sft_coef, ent_coef, clip, eps=0.2):
    """Written from the spec (methods_c.md §1 Math): for the RL rows sum_t -(r_i - mean) rho_t (PPO-clipped with
    --clip), a token sum / L_max, averaged over the RL sequences of the step; sft_coef x the token mean of -log pi
    over the demonstration tokens; minus ent_coef x the token mean of the entropy over all tokens."""
    B, T = mask.shape
    rl, n_rl, sft, n_ex, ent, n_tok = 0.0, 0, 0.0, 0, 0.0, 0
    for i in range(B):
        n_rl += int(not is_expert[i])
        for t in range(T):
            if not mask[i, t]:
                continue
            ent, n_tok = ent + entropy[i, t], n_tok + 1
            if is_expert[i]:
                sft, n_ex = sft - logp[i, t], n_ex + 1
            else:
                rho = torch.exp(logp[i, t] - old[i, t])
                term = -adv[i] * rho
                if clip:
                    term = torch.max(term, -adv[i] * torch.clamp(rho, 1 - eps, 1 + eps))
                rl = rl + term / L_MAX
    return rl / max(n_rl, 1) + sft_coef * sft / max(n_ex, 1) - ent_coef * ent / max(n_tok, 1)


def official_microbatch(logp, old, adv, mask, is_expert, entropy, sft_coef, ent_coef):
    """The official composition (mix_actor.py update_policy, branch "sft") of ONE micro-batch, as the spec quotes it:
    sft = masked_mean(-logp[demo rows]) (NaN without demo rows: skipped), pg = (-A rho mask).sum() / L_max over the
    RL rows, loss = pg + sft_coef sft - ent_coef masked_mean(entropy, mask) over all rows."""
    on = ~is_expert
    sft = (-logp[is_expert] * mask[is_expert]).sum() / mask[is_expert].sum()  # verl masked_mean: no epsilon
    pg = (-adv[on, None] * torch.exp(logp[on] - old[on]) * mask[on]).sum() / L_MAX
    loss = pg if torch.isnan(sft) else sft * sft_coef + pg
    return loss - ent_coef * (entropy * mask).sum() / mask.sum()


def _batch(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3 - 0.01
    mask = (torch.arange(T)[None] < torch.tensor([7, 3, 5, 6, 2, 4])[:B, None]).float()
    old = logp + 0.4 * torch.randn(B, T, generator=g)  # ratios outside [0.8, 1.2]: --clip acts
    adv = torch.tensor([1.5, -2.0, 0.7, -0.4, 0.3, -1.1])[:B]
    is_expert = torch.tensor([False, True, False, True, True, False])[:B]
    entropy = torch.rand(B, T, generator=g) * 2
    return logp, old, adv, mask, is_expert, entropy


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("sft_coef,ent_coef", [(1.0, 0.001), (0.3, 0.0), (0.3, 0.5)])
def test_hpt_loss_matches_reference(clip, sft_coef, ent_coef):
    logp, old, adv, mask, e, ent = _batch()
    old_bad = torch.where(e[:, None], old + 30.0, old)  # demonstration rows: whatever old log-probs they carry
    adv_bad = torch.where(e, torch.tensor(1e6), adv)  # and whatever advantage
    out = []
    for fn in ("hpt", "ref"):
        lp, en = logp.clone().requires_grad_(), ent.clone().requires_grad_()
        if fn == "hpt":
            loss, m = hpt.hpt_loss(lp, old_bad, adv_bad, mask, (~e).sum(), is_expert=e, expert_normalizer=mask[e].sum(),
                                   token_normalizer=mask.sum(), sft_coef=sft_coef, entropy=en, entropy_coef=ent_coef,
                                   clip=clip, max_len=L_MAX)
        else:
            loss = reference(lp, old, adv, mask, e, en, sft_coef, ent_coef, clip)
        loss.backward()
        out.append((loss, lp.grad, en.grad if ent_coef else torch.zeros_like(ent)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if clip:
        assert float(m["clip_frac_low"]) + float(m["clip_frac_high"]) > 0  # the clip acted in this batch
    assert float(out[0][1][e].abs().sum()) > 0 and float(out[0][1][~e].abs().sum()) > 0


def test_unclipped_ratio_gradient_is_advantage_times_ratio():
    """No clip (the released code): d/dlogp of -A rho is -A rho, also far outside [1 - eps, 1 + eps]."""
    logp, old, adv, mask, _, _ = _batch()
    e = torch.zeros(6, dtype=torch.bool)
    lp = logp.clone().requires_grad_()
    hpt.hpt_loss(lp, old, adv, mask, torch.tensor(6.0), is_expert=e, expert_normalizer=torch.tensor(1.0),
                 token_normalizer=mask.sum(), entropy_coef=0.0, max_len=L_MAX)[0].backward()
    torch.testing.assert_close(lp.grad, -adv[:, None] * torch.exp(logp - old) * mask / (L_MAX * 6))


def test_per_microbatch_form_is_the_official_composition():
    """--sft-agg per_microbatch: the sum over micro-batches of hpt_loss equals the official per-micro-batch loss
    summed (dynamic batch size: gradient_accumulation 1), values and gradients; the micro-batch [0, 2] holds no
    demonstration row (the official SFT term is NaN there and skipped, ours 0)."""
    logp, old, adv, mask, e, ent = _batch()
    splits = [torch.tensor([0, 2]), torch.tensor([1, 3, 5]), torch.tensor([4])]
    assert not e[splits[0]].any()
    out = []
    for fn in ("hpt", "official"):
        lp, en = logp.clone().requires_grad_(), ent.clone().requires_grad_()
        total = 0.0
        for idx in splits:
            args = (lp[idx], old[idx], adv[idx], mask[idx])
            if fn == "hpt":
                total = total + hpt.hpt_loss(*args, torch.tensor(123.0), is_expert=e[idx],
                                             expert_normalizer=torch.tensor(456.0), token_normalizer=torch.tensor(7.0),
                                             sft_coef=0.3, sft_agg="per_microbatch", entropy=en[idx],
                                             entropy_coef=0.001, max_len=L_MAX)[0]
            else:
                total = total + official_microbatch(*args, e[idx], en[idx], 0.3, 0.001)
        total.backward()
        out.append((total, lp.grad, en.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the official form depends on the split: one micro-batch gives another loss
    lp = logp.clone()
    one = hpt.hpt_loss(lp, old, adv, mask, 1.0, is_expert=e, expert_normalizer=1.0, token_normalizer=1.0,
                       sft_coef=0.3, sft_agg="per_microbatch", entropy=ent, max_len=L_MAX)[0]
    assert not torch.allclose(one, out[0][0])


def test_gate_on_hand_made_rewards():
    r = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1],
                      [-0.5, 0, 0, 0], [0.9, 0, 0, 0]], dtype=torch.float32)  # DAPO-penalised failure; partial
    assert hpt.hpt_gate(r, 0).tolist() == [True, False, False, False, False, True, False]
    assert hpt.hpt_gate(r, 2).tolist() == [True, True, True, False, False, True, True]  # LLaMA: <= 2 of 8


@pytest.mark.parametrize("case,equal", [("global", True), ("local", False)])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, case, equal):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "hpt", case, out, timeout=300)
    rel = json.loads(out.read_text())["max_rel_diff"]
    if equal:
        assert rel < 1e-5, rel
    else:  # the official per-micro-batch means weight a demonstration token by its micro-batch: another gradient
        assert rel > 1e-2, rel


def _main(monkeypatch, capsys, *argv):
    """hpt.main() in this process (dry runs and refusals load nothing): (stdout, the SystemExit message or None)."""
    monkeypatch.setattr(sys, "argv", ["hpt.py", *map(str, argv)])
    try:
        hpt.main()
        code = None
    except SystemExit as e:
        code = str(e.code)
    return capsys.readouterr().out, code


def test_paper_recipe_dry_run(monkeypatch, capsys):
    out, _ = _main(monkeypatch, capsys, "--recipe", "paper", "--dry-run")
    vals = {ln.split()[0]: ln.split()[1] for ln in out.splitlines() if ln.startswith("  ") and len(ln.split()) > 1}
    spec = {"lr": "5e-06", "gate": "0", "sft_coef": "1.0", "num_generations": "8", "prompts_per_step": "128",
            "steps_per_generation": "2", "max_new_tokens": "8192", "max_prompt_length": "1024", "clip": "False",
            "scale_rewards": "'none'", "loss_agg": "'seq_mean_token_sum_norm'", "entropy_coef": "0.001",
            "max_grad_norm": "1.0", "skip_grad_norm": "80.0", "beta": "0.0", "max_steps": "500",
            "temperature": "1.0", "system_prompt": "''", "dataset": "'openr1_46k'"}
    assert {k: vals.get(k) for k in spec} == spec
    assert "64 prompts, 576 sequences" in out  # 2 x (64 x 8 + 64 demos)
    out, _ = _main(monkeypatch, capsys, "--recipe", "math_1.5b", "--dry-run")
    assert "sft_coef                 0.3" in out and "Qwen/Qwen2.5-Math-1.5B" in out


@pytest.mark.parametrize("flags,message", [
    (["--gate", "4", "--num-generations", "4"], "--gate 4 must be in [0, --num-generations)"),
    (["--sft-coef", "-1"], "--sft-coef >= 0"),
    (["--sft-agg", "per_microbatch", "--loss-agg", "token_mean"], "acts only with --loss-agg seq_mean_token_sum_norm"),
    (["--skip-grad-norm", "0"], "--skip-grad-norm 0.0: must be > 0"),
    (["--eps-high", "0.28"], "--eps-high 0.28 acts only with --clip"),
])
def test_bad_inputs(monkeypatch, capsys, tmp_path, flags, message):
    """Refused with one `error:` line before anything is loaded."""
    _, code = _main(monkeypatch, capsys, *flags, "--output-dir", tmp_path / "out", "--quiet")
    assert code is not None and code.startswith("error:") and message in code and "\n" not in code, code


def _run(tmp_path, *flags):
    run_method("hpt", "--max-steps", 2, "--prompts-per-step", 2, "--num-generations", 4, "--eval-every", 0,
               "--eval-size", 4, "--max-new-tokens", 24, "--output-dir", tmp_path / "out", "--quiet",
               "--save-every", 0, "--overwrite", *flags, env={"OMP_NUM_THREADS": "1"})
    rec = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rec if "train/reward" in r]


@pytest.mark.slow
def test_hpt_end_to_end(tmp_path):
    train = _run(tmp_path, "--grad-accum", 2)
    assert len(train) == 2
    for k in ["train/loss", "train/rl_loss", "train/sft_loss", "train/frac_gated", "train/skipped", "train/entropy"]:
        assert k in train[0], k
    for r in train:  # a gated question trains its demonstration; none gated: no SFT term
        assert (r["train/sft_loss"] > 0) == (r["train/frac_gated"] > 0)
    # every question gated (the untrained model solves none): pure SFT, RL term 0; a skip threshold below every
    # norm: no update
    train = _run(tmp_path, "--model", "embedded", "--gate", 3, "--skip-grad-norm", "1e-9", "--clip", "--sft-agg",
                 "per_microbatch")
    assert all(r["train/frac_gated"] == 1.0 and r["train/rl_loss"] == 0.0 and r["train/sft_loss"] > 0
               and r["train/skipped"] == 1.0 for r in train)
    assert math.isfinite(train[1]["train/loss"])


COUNT_GENERATE = """
import json, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import rollout
from tests_util import load_method
calls = [0]
generate = rollout.generate
def counting(*args, **kwargs):  # the real generate, counted
    calls[0] += 1
    return generate(*args, **kwargs)
rollout.generate = counting
sys.argv = ["hpt.py"] + {argv!r}
load_method("hpt").main()
print("GENERATE_CALLS", calls[0])
"""


@pytest.mark.slow
def test_dynamic_sampling_keeps_gated_groups(tmp_path):
    """DAPO's dynamic sampling drops groups whose rewards are all equal: no RL signal. In HPT a gated group (at most
    --gate correct, e.g. all wrong) trains on its demonstration, so it must be kept, not traded for more rollout
    batches. From the untrained model every question is all-fail, hence gated: one rollout batch per step suffices
    (before: --max-gen-batches batches per step, and a mixed group of a later batch displaced a gated one)."""
    import subprocess
    argv = ["--model", "embedded", "--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "4",
            "--eval-every", "0", "--eval-size", "0", "--max-new-tokens", "8", "--output-dir", str(tmp_path / "out"),
            "--quiet", "--save-every", "0", "--dynamic-sampling", "--max-gen-batches", "3"]
    p = subprocess.run([sys.executable, "-c", COUNT_GENERATE.format(repo=str(REPO), tests=str(REPO / "tests"),
                                                                    argv=argv)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "GENERATE_CALLS 2" in p.stdout, p.stdout[-1000:]
    rec = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/reward" in r]
    assert len(train) == 2 and all(r["train/frac_gated"] == 1.0 and r["train/sft_loss"] > 0 for r in train)
