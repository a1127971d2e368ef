"""methods/kdrl.py: kdrl_loss against the equations (every aggregation, estimator, KD normalisation), the estimators'
expected gradients by exact enumeration on a categorical (k2 = reverse KL, k3 = forward KL, k1 = 0), the beta
schedule, the KD mask modes, the teacher tokenizer check, GA x DDP against one full batch, end to end."""
import json

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method, rand_batch

import common
import data

kdrl = load_method("kdrl")
# used by tests/_ddp_loss_worker.py: teacher log-probs = logp.detach() + aux; KD only on rows with a negative advantage
DDP_ADAPTER = (lambda agg: agg,
               lambda m, o, b, z, agg, n_micro: m.kdrl_loss(o["logp"], o["logp"].detach() + b["old_shift"],
                                                            b["advantages"], b["loss_mask"], z,
                                                            teacher_logp=o["logp"].detach() + b["aux"],
                                                            kd_mask=b["loss_mask"] * (b["advantages"] < 0).float()[:, None],
                                                            beta=0.5, dual_clip=3.0, loss_agg=agg, max_len=20)[0])


def reference(logp, old, adv, mask, t_logp, kd_mask, beta, est, eps, dual, agg, L, kd_norm):
    """J_GRPO - beta * D_KD (KDRL Eq. 26-27 via spec §5), written with Python loops from the per-token formulas."""
    B, T = mask.shape
    pg, kd = torch.zeros(B, T), torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            l = torch.max(-a * r, -a * torch.clamp(r, 1 - eps, 1 + eps))
            if dual is not None and a < 0:
                l = torch.min(l, -a * dual)
            x = logp[i, t] - t_logp[i, t]  # log pi_theta - log pi_T
            k = {"k1": x, "k2": 0.5 * x**2, "k3": torch.exp(-x) - 1 + x}[est]  # k3 = pi_T/pi - 1 - log(pi_T/pi)
            pg[i, t] = l * mask[i, t]
            kd[i, t] = k * mask[i, t] * kd_mask[i, t]

    def agg_(v):
        if agg == "token_mean":
            return v.sum() / mask.sum()
        if agg == "seq_mean_token_mean":
            return sum(v[i].sum() / mask[i].sum() for i in range(B)) / B
        return sum(v[i].sum() / L for i in range(B)) / B  # dr_grpo
    if kd_norm == "all":
        return agg_(pg) + beta * agg_(kd)
    return agg_(pg) + beta * kd.sum() / (mask * kd_mask).sum()


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("est", ["k1", "k2", "k3"])
@pytest.mark.parametrize("kd_norm", ["all", "kept"])
def test_kdrl_loss_matches_reference(agg, est, kd_norm):
    logp, mask = rand_batch()
    g = torch.Generator().manual_seed(3)
    old = logp + 0.4 * torch.randn(logp.shape, generator=g)
    t_logp = logp + 0.5 * torch.randn(logp.shape, generator=g)
    adv = torch.tensor([1.5, -2.0, 0.7, -0.4])
    kd_mask = torch.tensor([1.0, 0.0, 1.0, 1.0])[:, None].expand_as(mask).clone()
    z = mask.sum() if agg == "token_mean" else torch.tensor(4.0)
    kz = (mask * kd_mask).sum() if kd_norm == "kept" else None
    lp = logp.clone().requires_grad_()
    loss, m = kdrl.kdrl_loss(lp, old, adv, mask, z, teacher_logp=t_logp, kd_mask=kd_mask, beta=0.3, entropy=None,
                             eps_low=0.2, eps_high=0.2, dual_clip=3.0, kl_estimator=est, entropy_coef=0.0,
                             loss_agg=agg, max_len=10, kd_normalizer=kz)
    lr = logp.clone().requires_grad_()
    ref = reference(lr, old, adv, mask, t_logp, kd_mask, 0.3, est, 0.2, 3.0, agg, 10, kd_norm)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-5, atol=1e-7)
    assert float(m["kd_frac"]) == pytest.approx(float((mask * kd_mask).sum() / mask.sum()))
    torch.testing.assert_close(m["kd_kl"], ((logp - t_logp) * mask).sum() / mask.sum())


def test_kd_term_is_zero_where_masked_and_beta_scales_it():
    logp, mask = rand_batch()
    t_logp = logp - 1.0
    adv = torch.zeros(4)
    off, _ = kdrl.kdrl_loss(logp, logp, adv, mask, mask.sum(), teacher_logp=t_logp, kd_mask=torch.zeros_like(mask),
                            beta=0.5)
    assert float(off) == 0.0
    on, m = kdrl.kdrl_loss(logp, logp, adv, mask, mask.sum(), teacher_logp=t_logp, kd_mask=torch.ones_like(mask),
                           beta=0.5)
    torch.testing.assert_close(on, torch.tensor(0.5 * 0.5))  # beta * mean(1/2 (logp - t_logp)^2) = 0.5 * 0.5
    assert float(m["kd"]) == pytest.approx(0.5)


def expected_grad(est, theta, teacher_logp):
    """E_{a ~ pi_theta}[grad_theta of the kdrl_loss of one sampled token a], by exact enumeration over a (samples fixed:
    the gradient flows through log pi_theta(a) only, as in training)."""
    probs = torch.softmax(theta, 0).detach()
    total = torch.zeros_like(theta)
    for a in range(theta.shape[0]):
        th = theta.detach().clone().requires_grad_()
        lp = torch.log_softmax(th, 0)[a].reshape(1, 1)
        one = torch.ones(1, 1)
        loss, _ = kdrl.kdrl_loss(lp, lp.detach(), torch.zeros(1), one, one.sum(),
                                 teacher_logp=teacher_logp[a].reshape(1, 1), kd_mask=one, beta=1.0,
                                 kl_estimator=est)  # zero advantage: only the KD term has a gradient
        loss.backward()
        total += probs[a] * th.grad
    return total


def test_estimator_expected_gradients_by_enumeration():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(6, generator=g)
    teacher_logp = torch.log_softmax(torch.randn(6, generator=g) * 2, 0)
    th = theta.clone().requires_grad_()
    p_logp = torch.log_softmax(th, 0)
    rkl = (p_logp.exp() * (p_logp - teacher_logp)).sum()  # KL(pi_theta || pi_T)
    g_rkl, = torch.autograd.grad(rkl, th)
    th2 = theta.clone().requires_grad_()
    fkl = (teacher_logp.exp() * (teacher_logp - torch.log_softmax(th2, 0))).sum()  # KL(pi_T || pi_theta)
    g_fkl, = torch.autograd.grad(fkl, th2)
    assert (g_rkl - g_fkl).abs().max() > 0.05  # the two gradients differ here, so the test can tell them apart
    torch.testing.assert_close(expected_grad("k2", theta, teacher_logp), g_rkl, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expected_grad("k3", theta, teacher_logp), g_fkl, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(expected_grad("k1", theta, teacher_logp), torch.zeros(6), atol=1e-6, rtol=0)


def test_beta_schedule_linear_decay_to_floor():
    b = kdrl.kd_beta
    assert b(1) == pytest.approx(5e-3) and b(2) == pytest.approx(5e-3 - 5e-5)
    assert b(41) == pytest.approx(3e-3) and b(81) == pytest.approx(1e-3)  # floor reached after 80 steps
    assert b(82) == pytest.approx(1e-3) and b(10_000) == pytest.approx(1e-3)
    vals = [b(t) for t in range(1, 200)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))
    assert b(50, 0.0) == 0.0 and b(50, 0.01, 0.0) == 0.01  # --beta 0 turns KD off; --beta-decay 0 is constant


def test_kd_mask_modes():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5])  # groups of 4: [1, 0, 0, 0], [0, 0, 1, 0.5]
    assert kdrl.kd_sample_mask(r, 4, "none").tolist() == [1.0] * 8
    assert kdrl.kd_sample_mask(r, 4, "response").tolist() == [0, 1, 1, 1, 1, 1, 0, 0]
    assert kdrl.kd_sample_mask(r, 4, "group").tolist() == [0.0] * 8  # both groups have a correct member
    r2 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    assert kdrl.kd_sample_mask(r2, 4, "group").tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert kdrl.kd_sample_mask(torch.tensor([-0.5, 0.0]), 2, "group").tolist() == [1, 1]  # shaped: <= 0 is wrong


def _teacher_tokenizer(change):
    tok = data.build_embedded_tokenizer()
    if change == "added":
        tok.add_tokens(["<extra>"])
    elif change == "eos":
        tok.eos_token = "<|system|>"
    elif change == "pad":
        tok.pad_token = "<|end|>"
    elif change == "ids":  # same size and special tokens, two ordinary tokens swapped
        vocab = json.loads(tok.backend_tokenizer.to_str())
        v = vocab["model"]["vocab"]
        v["a"], v["b"] = v["b"], v["a"]
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(vocab)), pad_token="<|pad|>",
                                      eos_token="<|end|>", unk_token="<|pad|>")
    return tok


N = len(data.build_embedded_tokenizer())


@pytest.mark.parametrize("change,needle", [("added", f"vocabulary size {N} vs {N + 1}"),
                                           ("eos", "eos_token_id 1 vs 2"), ("pad", "pad_token_id 0 vs 1"),
                                           ("ids", "2 tokens missing or with other ids")])
def test_teacher_tokenizer_mismatch_is_a_user_error(change, needle):
    student = data.build_embedded_tokenizer()
    kdrl.check_teacher(student, data.build_embedded_tokenizer(), "s", "t")  # identical: no error
    with pytest.raises(common.UserError) as e:
        kdrl.check_teacher(student, _teacher_tokenizer(change), "my/student", "my/teacher")
    msg = str(e.value)
    assert needle in msg and "'my/teacher'" in msg and "'my/student'" in msg and "--teacher" in msg, msg


@pytest.mark.parametrize("flag", ["beta", "beta_decay", "beta_min"])
def test_negative_kd_coefficients_are_a_user_error(flag):
    with pytest.raises(common.UserError) as e:
        kdrl.check_kd_args(kdrl.Args(**{flag: -1e-3}))
    assert "must be >= 0" in str(e.value) and f"--{flag.replace('_', '-')} -0.001" in str(e.value)
    kdrl.check_kd_args(kdrl.Args())  # the defaults pass


def test_teacher_mismatch_stops_the_script_before_training(tmp_path):
    tok = _teacher_tokenizer("added")
    data.build_embedded_model(tok).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    p = run_method("kdrl", "--teacher", tmp_path / "teacher", "--output-dir", tmp_path / "run", "--quiet",
                   check=False, timeout=300)
    assert p.returncode != 0 and "does not share the tokenizer of the student 'embedded:warm'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum_norm", "seq_mean_token_mean"])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, agg):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "kdrl", agg, out, timeout=300)
    assert json.loads(out.read_text())["max_rel_diff"] < 1e-5


@pytest.mark.slow
def test_kdrl_end_to_end(tmp_path):
    """The student's own checkpoint as teacher: at step 1 both are identical, so the teacher's log-probs of the sampled
    tokens (same temperature) equal the student's and the KL estimate is exactly 0; after an update it is not."""
    run_method("kdrl", "--teacher", "embedded:warm", "--max-steps", 3, "--prompts-per-step", 4, "--num-generations", 4,
               "--eval-every", 0, "--eval-size", 16, "--output-dir", tmp_path, "--quiet", "--temperature", 0.7,
               "--kd-mask", "response", "--kd-norm", "kept", "--grad-accum", 2)
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/reward" in r]
    assert len(train) == 3
    assert train[0]["train/beta"] == pytest.approx(5e-3) and train[2]["train/beta"] == pytest.approx(4.9e-3)
    assert abs(train[0]["train/kd_kl"]) < 1e-4  # a temperature mismatch would show here
    assert abs(train[2]["train/kd_kl"]) > 0
    for k in ["train/kd", "train/kd_frac", "train/loss", "train/grad_norm", "train/entropy"]:
        assert k in train[0], k
