"""methods/relift.py: the RL loss as released (no clip, no std, sum / T_max, token-mean entropy) and the fine-tuning
loss against their equations (values and gradients), the entropy gradient through the fused kernel, the hardest-
question buffer, GA x DDP, presets, bad inputs, end to end with separate optimizers, resume with the buffer."""
import functools
import json
import shutil

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method, rand_batch

relift = load_method("relift")


@functools.lru_cache(None)
def _worker_batch():
    """The 8-row batch tests/_ddp_loss_worker.py builds (deterministic), to count the step's tokens."""
    import _ddp_loss_worker
    import data
    return _ddp_loss_worker.make_batch(len(data.build_embedded_tokenizer()))


def _ddp_loss(m, o, b, z, agg, n_micro):
    """The worker passes the normalizer of `agg`; the entropy bonus also needs the step's token count: the same
    global count main() all-reduces, taken from the worker's full batch and scaled like z (1 / world size)."""
    full = _worker_batch()
    mode = agg
    z_tok = full["loss_mask"].sum() * z / relift.normalizer_count(full["loss_mask"], mode)
    ent = -o["logp"].exp() * o["logp"]  # a per-token stand-in for the entropy that carries a gradient
    return m.relift_rl_loss(o["logp"], o["logp"].detach() + b["old_shift"], b["advantages"], b["loss_mask"], z,
                            entropy=ent, token_normalizer=z_tok, entropy_coef=0.1, loss_agg=agg, max_len=20)[0]


# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch)
DDP_ADAPTER = (lambda agg: agg, _ddp_loss)


def rl_reference(logp, old, adv, ent, mask, clip, agg, T_max, c_ent, eps=0.2):
    """ReLIFT core_algos.compute_policy_loss: -A r per token (clip: max(-A r, -A clip(r))), token sum / T_max per
    sequence and mean over sequences (loss_remove_token_mean, Dr. GRPO) or a global token mean; minus c x the
    token-mean entropy (verl masked_mean)."""
    B, T = mask.shape
    pg = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            r = torch.exp(logp[i, t] - old[i, t])
            l = -adv[i] * r
            if clip:
                l = torch.max(l, -adv[i] * torch.clamp(r, 1 - eps, 1 + eps))
            pg[i, t] = l * mask[i, t]
    pg = pg.sum() / (T_max * B) if agg == "seq_mean_token_sum_norm" else pg.sum() / mask.sum()
    return pg - c_ent * (ent * mask).sum() / mask.sum()


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("agg", ["seq_mean_token_sum_norm", "token_mean"])
def test_relift_rl_loss_matches_reference(clip, agg):
    logp, mask = rand_batch()
    g = torch.Generator().manual_seed(1)
    old = logp + 0.5 * torch.randn(logp.shape, generator=g)  # ratios far outside [0.8, 1.2]
    ent = torch.rand(logp.shape, generator=g) * 2
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    adv = rewards - rewards.mean()  # no std (grpo_use_std=False)
    B = mask.shape[0]
    z = torch.tensor(float(B)) if agg == "seq_mean_token_sum_norm" else mask.sum()
    lp, en = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, m = relift.relift_rl_loss(lp, old, adv, mask, z, entropy=en, token_normalizer=mask.sum(), clip=clip,
                                    loss_agg=agg, max_len=10)
    lr, er = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    ref = rl_reference(lr, old, adv, er, mask, clip, agg, 10, 1e-3)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    loss.backward(); ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(en.grad, er.grad)
    clipped = float(m["clip_frac_low"]) + float(m["clip_frac_high"])
    assert (clipped > 0) == clip  # no clip: the ratio is never cut
    if not clip:  # and the loss really is -A r: every token has a gradient
        assert bool((lp.grad[mask.bool() & (adv[:, None] != 0)] != 0).all())


def test_relift_sft_loss_matches_reference():
    logp, mask = rand_batch()
    ent = torch.rand(logp.shape, generator=torch.Generator().manual_seed(2))
    lp, en = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    loss, m = relift.relift_sft_loss(lp, mask, mask.sum(), entropy=en, entropy_coef=0.01)
    lr, er = logp.clone().requires_grad_(), ent.clone().requires_grad_()
    n = mask.sum()
    ref = -(lr * mask).sum() / n - 0.01 * (er * mask).sum() / n  # L_FT = NLL - alpha H, token means
    torch.testing.assert_close(loss, ref)
    loss.backward(); ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad)
    torch.testing.assert_close(en.grad, er.grad)
    torch.testing.assert_close(m["sft_nll"], -(logp * mask).sum() / n)


def test_entropy_gradient_flows_through_the_fused_head():
    """The fine-tuning loss on FusedLM(with_entropy=True) has the gradient of the same loss written with full
    logits, log_softmax and -sum p log p: the fused kernel differentiates the entropy term."""
    import data
    from kernels.engine import FusedLM
    tok = data.build_embedded_tokenizer()
    torch.manual_seed(0)
    lm = data.build_embedded_model(tok).float()
    seqs = [([5, 6, 7, 8], [9, 10, 11, 1]), ([12, 13], [14, 15, 16, 17, 18, 1]), ([7, 7, 7], [20, 1])]
    b = data.collate(seqs, tok.pad_token_id)
    alpha = 0.5  # large, so the entropy part of the gradient is visible

    def grads(loss):
        return [g.clone() for g in torch.autograd.grad(loss, list(lm.parameters()), retain_graph=True)]

    o = FusedLM(lm)(b["input_ids"], b["attention_mask"], b["loss_mask"], 1.0, True)
    g_fused = grads(relift.relift_sft_loss(o["logp"], b["loss_mask"], b["loss_mask"].sum(), entropy=o["entropy"],
                                           entropy_coef=alpha)[0])
    logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()[:, :-1]
    lsm = torch.log_softmax(logits, -1)  # position i-1 predicts token i
    logp = lsm.gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    ent = -(lsm.exp() * lsm).sum(-1)
    m = b["loss_mask"][:, 1:]
    g_naive = grads((-(logp * m).sum() - alpha * (ent * m).sum()) / m.sum())
    for gf, gn in zip(g_fused, g_naive):
        torch.testing.assert_close(gf, gn, rtol=1e-4, atol=1e-6)
    g_nll = grads((-(logp * m).sum()) / m.sum())
    assert max(float((a - c).abs().max()) for a, c in zip(g_naive, g_nll)) > 1e-4  # the entropy term mattered


def test_buffer_fires_at_m_on_the_newest_and_keeps_the_rest():
    buf = relift.HardestBuffer(4)
    buf.add([1, 2])
    assert buf.take() is None and buf.entries == [1, 2]
    buf.add([3])
    assert buf.take() is None and len(buf.entries) == 3
    buf.add([4, 5, 6])  # 6 entries, newest first: [4, 5, 6, 3, 1, 2]
    assert buf.entries == [4, 5, 6, 3, 1, 2]
    assert buf.take() == [4, 5, 6, 3]  # exactly M, the newest
    assert buf.entries == [1, 2]  # the rest is kept
    assert buf.take() is None
    buf.add([7, 8])
    assert buf.take() == [7, 8, 1, 2] and buf.entries == []
    off = relift.HardestBuffer(-1, range(500))  # sft_data_size=-1: the plain-RL baseline never fine-tunes
    assert off.take() is None and len(off.entries) == 500
    restored = relift.HardestBuffer(2, json.loads(json.dumps(buf.entries + [9, 10])))  # survives a checkpoint
    assert restored.take() == [9, 10]


def test_demonstration_is_cut_then_ends_with_eos():
    import data
    tok = data.build_embedded_tokenizer()
    ids = tok("7+8=15#15", add_special_tokens=False)["input_ids"]
    assert relift.demonstration(tok, "7+8=15#15", 100) == ids + [tok.eos_token_id]
    assert relift.demonstration(tok, "7+8=15#15", 4) == ids[:4] + [tok.eos_token_id]


def test_presets_and_defaults():
    import common
    presets = {"preset": relift.PRESETS, "recipe": relift.RECIPES}
    real = ["--model", "Qwen/Qwen2.5-Math-7B"]
    a = common.parse_args(relift.Args, real, presets)
    assert (a.scale_rewards, a.clip, a.loss_agg, a.max_new_tokens, a.entropy_coef) == ("none", False, "seq_mean_token_sum_norm", 8192,
                                                                                        1e-3)
    assert (a.max_grad_norm, a.lr, a.prompts_per_step, a.num_generations, a.steps_per_generation) == (0.7, 1e-6, 128,
                                                                                                        8, 2)
    assert (a.sft_buffer_size, a.sft_entropy_coef, a.sft_lr, a.sft_max_grad_norm) == (128, 1e-3, None, 1.0)
    a = common.parse_args(relift.Args, real + ["--preset", "relift_paper"], presets)
    assert (a.clip, a.scale_rewards) == (True, "group")
    a = common.parse_args(relift.Args, [], presets)  # embedded demo: a small M so the buffer fires
    assert (a.sft_buffer_size, a.max_steps, a.steps_per_generation) == (16, 80, 1)


@pytest.mark.parametrize("agg", ["seq_mean_token_sum_norm", "token_mean"])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, agg):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "relift", agg, out, timeout=300)
    assert json.loads(out.read_text())["max_rel_diff"] < 1e-5


@pytest.mark.parametrize("flags,message", [
    (["--sft-buffer-size", "0"], "--sft-buffer-size 0 must be -1 (plain RL) or a positive multiple"),
    (["--sft-buffer-size", "-3"], "--sft-buffer-size -3 must be -1 (plain RL) or a positive multiple"),
    (["--sft-micro-batch-size", "0"], "--sft-micro-batch-size 0: must be >= 1 (a count)"),
])
def test_bad_inputs(tmp_path, flags, message):
    p = run_method("relift", *flags, "--output-dir", tmp_path / "out", "--quiet", check=False, timeout=300)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


SMALL = ["--prompts-per-step", 8, "--num-generations", 4, "--sft-buffer-size", 2, "--eval-every", 0, "--eval-size",
         16, "--max-new-tokens", 24, "--steps-per-generation", 2, "--quiet"]


@pytest.mark.slow
def test_relift_end_to_end_separate_optimizers_and_resume(tmp_path):
    """3 rollout steps, a checkpoint after each; the fine-tuning steps fire; the checkpoint holds two optimizers
    with different moments and step counts; resuming from step 1 reproduces steps 2 and 3 (buffer restored)."""
    a = tmp_path / "a"
    run_method("relift", *SMALL, "--max-steps", 3, "--save-every", 1, "--keep-last", 3, "--output-dir", a)
    train = [r for r in _records(a) if "train/reward" in r]
    assert len(train) == 3
    for k in ["train/loss", "train/buffer_size", "train/sft_steps", "train/frac_hardest", "train/grad_norm",
              "train/entropy", "train/ratio_mean"]:
        assert k in train[0], k
    fired = [r for r in train if "train/sft_nll" in r]
    assert fired and train[-1]["train/sft_steps"] == len(fired)
    size = 0  # every hardest prompt joins the buffer; a firing takes the newest M = 2 and keeps the rest (code)
    for r in train:
        size += round(r["train/frac_hardest"] * 8) - (2 if "train/sft_nll" in r else 0)
        assert r["train/buffer_size"] == size
        assert ("train/sft_nll" in r) == (size + (2 if "train/sft_nll" in r else 0) >= 2)
    assert train[0]["train/sft_steps"] >= 1 and train[0]["train/buffer_size"] + 2 * train[0]["train/sft_steps"] == (
        round(train[0]["train/frac_hardest"] * 8))  # every hardest prompt went into the buffer
    # two optimizers with their own state: RL stepped 2 x 3 times, the fine-tuning optimizer once per firing
    ts = torch.load(a / "checkpoint-0000003" / "trainer_state.pt", weights_only=True)  # final/ has the model only
    (rl, ft) = ts["optimizers"]
    k = next(iter(rl["state"]))
    assert int(rl["state"][k]["step"]) == 6 and int(ft["state"][k]["step"]) == len(fired)
    assert not torch.allclose(rl["state"][k]["exp_avg"], ft["state"][k]["exp_avg"])
    state1 = json.loads((a / "checkpoint-0000001" / "state.json").read_text())
    assert len(state1["buffer"]) == train[0]["train/buffer_size"] and state1["sft_steps"] == train[0]["train/sft_steps"]
    # resume from step 1 in a fresh directory: steps 2 and 3 are reproduced
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(a / "checkpoint-0000001", b / "checkpoint-0000001")
    run_method("relift", *SMALL, "--max-steps", 3, "--save-every", 0, "--output-dir", b, "--resume")
    resumed = [r for r in _records(b) if "train/reward" in r]
    assert [r["step"] for r in resumed] == [2, 3]
    for r, s in zip(resumed, train[1:]):
        assert ("train/sft_nll" in r) == ("train/sft_nll" in s)
        for key in ["train/reward", "train/buffer_size", "train/sft_steps", "train/loss", "train/sft_nll"]:
            if key in s:
                assert r[key] == pytest.approx(s[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_relift_ddp_ranks_fine_tune_together(tmp_path):
    """torchrun, 2 ranks: the buffer is gathered so both ranks take the fine-tuning step at the same time (a rank
    that skipped it would leave the other blocked in DDP's gradient all-reduce until the timeout)."""
    torchrun(REPO / "methods" / "relift.py", *SMALL, "--max-steps", 2, "--save-every", 2, "--output-dir", tmp_path,
             timeout=300)
    train = [r for r in _records(tmp_path) if "train/reward" in r]
    assert len(train) == 2 and train[-1]["train/sft_steps"] >= 1
    state = json.loads((tmp_path / "checkpoint-0000002" / "state.json").read_text())  # final/ has the model only
    assert len(state["buffer"]) == train[-1]["train/buffer_size"]
