"""methods/otr.py: otr_loss against Eq. 8, the exact and sampled OTR gradients against (1 - beta) x DFT at kappa = 1
and against each other at kappa = 1.3, the fused head against full logits, GA x DDP against one full batch, the flag
checks, end to end."""
import copy
import json
import sys

import pytest
import torch
from conftest import REPO, run_method, torchrun

from tests_util import load_method, rand_batch

import common  # noqa: E402  (tests_util puts the repository root on sys.path)
import data  # noqa: E402
from kernels.engine import FusedLM, default_position_ids  # noqa: E402
from kernels.logprob import sample_tokens  # noqa: E402

otr = load_method("otr")
dft = load_method("dft")

# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch).
# The worker runs FusedLM with its default head, so there are no draws: the ground-truth token serves as the one
# fixed "draw" per position (K = 1) and the batch's aux tensor fixes its reward (1 or beta). Sampling would differ
# between a rank's micro-batch and the full batch; the aggregation and normalisation under test do not depend on it.
DDP_ADAPTER = (lambda agg: agg,
               lambda m, o, b, z, agg, n_micro: m.otr_loss(o["logp"][..., None], b["loss_mask"], z,
                                                           rewards=torch.where(b["aux"] > 0, 1.0, -0.1)[..., None],
                                                           loss_agg=agg)[0])


def reference(logp, rewards, mask, agg):
    """Eq. 8 token by token: L_t = -(1/K) sum_j R_j log pi(a_j); the paper's (1/T) per sequence, or a token mean."""
    B, T, K = logp.shape
    per = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                per[i, t] = -sum(rewards[i, t, j] * logp[i, t, j] for j in range(K)) / K
    if agg == "token_mean":
        return per.sum() / mask.sum()
    return sum(per[i].sum() / mask[i].sum() for i in range(B)) / B


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
@pytest.mark.parametrize("K", [1, 5])
def test_otr_loss_matches_reference(agg, K):
    _, mask = rand_batch()
    g = torch.Generator().manual_seed(2)
    logp = -3 * torch.rand(*mask.shape, K, generator=g)
    rewards = torch.where(torch.rand(logp.shape, generator=g) < 0.3, 1.0, -0.1)
    z = mask.sum() if agg == "token_mean" else torch.tensor(float(mask.shape[0]))
    lp = logp.clone().requires_grad_()
    loss, m = otr.otr_loss(lp, mask, z, rewards=rewards, loss_agg=agg)
    lr = logp.clone().requires_grad_()
    ref = reference(lr, rewards, mask, agg)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    loss.backward(); ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(m["tokens"], mask.sum())


def small_head_inputs(N=3, V=6, seed=0):
    """Logits h @ I^T = h, so gradients w.r.t. h are gradients w.r.t. the logits."""
    g = torch.Generator().manual_seed(seed)
    h = (1.5 * torch.randn(N, V, generator=g)).requires_grad_()
    return h, torch.eye(V), torch.tensor([0, 2, 5])[:N]


def otr_grad(h, W, targets, head):
    """d/dh of the per-token OTR losses summed over positions (otr_loss with a token sum)."""
    out = head(h, W, None, targets)
    N = targets.shape[0]
    loss, _ = otr.otr_loss(out["logp"][None], torch.ones(1, N), 1.0, rewards=out["rewards"][None],
                           loss_agg="token_mean")
    return torch.autograd.grad(loss, h)[0]


def dft_grad(h, W, targets):
    logp = (h @ W.t()).log_softmax(-1).gather(1, targets[:, None])[:, 0]
    loss, _ = dft.dft_loss(logp[None], torch.ones(1, targets.shape[0]), 1.0, loss_agg="token_mean")
    return torch.autograd.grad(loss, h)[0]


@pytest.mark.parametrize("beta", [-0.1, 0.5])
def test_exact_gradient_at_kappa_1_is_one_minus_beta_times_dft(beta):
    """Spec [derived]: with kappa = 1, E[grad] = (1 - beta) pi(x) (e_x - pi), i.e. (1 - beta) x the DFT gradient."""
    h, W, t = small_head_inputs()
    g = otr_grad(h, W, t, otr.otr_head(1, 1.0, beta, True, None))
    torch.testing.assert_close(g, (1 - beta) * dft_grad(h, W, t), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kappa", [1.0, 1.3])
def test_exact_term_matches_closed_form(kappa):
    """Reviewer 2's closed form: pi'(x) log pi(x) + beta sum_{a != x} pi'(a) log pi(a), pi' = softmax(z / kappa)."""
    beta = -0.1
    h, W, t = small_head_inputs(seed=1)
    out = otr.otr_head(1, kappa, beta, True, None)(h, W, None, t)
    z = h @ W.t()
    logp_all, q = z.log_softmax(-1), (z.detach() / kappa).softmax(-1)
    ref = torch.stack([sum((1.0 if a == t[i] else beta) * q[i, a] * logp_all[i, a] for a in range(z.shape[1]))
                       for i in range(z.shape[0])])
    torch.testing.assert_close(out["logp"][:, 0], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["rewards"], torch.ones(3, 1))
    torch.testing.assert_close(out["hit"], q.gather(1, t[:, None])[:, 0])  # expected fraction of draws = target
    g1 = torch.autograd.grad(out["logp"].sum(), h)[0]
    g2 = torch.autograd.grad(ref.sum(), h)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kappa", [1.0, 1.3])
def test_sampled_gradient_matches_expectation(kappa):
    """The mean of M independent K-draw gradients equals the exact expected gradient within 5 standard errors
    (kappa = 1: (1 - beta) x DFT's gradient). Fixed seeds, so the test is deterministic."""
    beta, M, K = -0.1, 40, 1000
    h, W, t = small_head_inputs(seed=2)
    grads = torch.stack([otr_grad(h, W, t, otr.otr_head(K, kappa, beta, False, torch.Generator().manual_seed(m)))
                         for m in range(M)])  # (M, N, V)
    mean, se = grads.mean(0), grads.std(0) / M ** 0.5
    expected = otr_grad(h, W, t, otr.otr_head(1, kappa, beta, True, None))
    if kappa == 1.0:
        torch.testing.assert_close(expected, (1 - beta) * dft_grad(h, W, t), rtol=1e-5, atol=1e-7)
    assert se.max() < 0.05 * expected.abs().max()  # the bound is tight enough to mean something
    assert ((mean - expected).abs() <= 5 * se + 1e-7).all(), ((mean - expected) / se)


def test_sampled_head_matches_naive():
    """Draws from softmax(z / kappa), scored at temperature 1 (no importance correction); rewards 1 / beta."""
    g = torch.Generator().manual_seed(3)
    N, d, V, K, kappa, beta = 7, 16, 11, 9, 1.3, -0.1
    h = torch.randn(N, d, generator=g).requires_grad_()
    W = (0.5 * torch.randn(V, d, generator=g)).requires_grad_()
    bias = (0.3 * torch.randn(V, generator=g)).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    out = otr.otr_head(K, kappa, beta, False, torch.Generator().manual_seed(11))(h, W, bias, t)
    draws = sample_tokens(h.detach(), W.detach(), K, kappa, bias.detach(), torch.Generator().manual_seed(11))
    z = h @ W.t() + bias
    logp_ref = z.log_softmax(-1).gather(1, draws)  # temperature 1
    rewards_ref = torch.where(draws == t[:, None], 1.0, beta)
    torch.testing.assert_close(out["logp"], logp_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["rewards"], rewards_ref)
    torch.testing.assert_close(out["hit"], (draws == t[:, None]).float().mean(1))
    torch.testing.assert_close(out["target_logp"], z.log_softmax(-1).gather(1, t[:, None])[:, 0].detach())
    assert 0 < float((rewards_ref == 1).float().mean()) < 1  # both rewards occur
    up = torch.randn(N, K, generator=g)  # any upstream gradient
    g1 = torch.autograd.grad((out["logp"] * up).sum(), (h, W, bias))
    g2 = torch.autograd.grad((logp_ref * up).sum(), (h, W, bias))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    again = otr.otr_head(K, kappa, beta, False, torch.Generator().manual_seed(11))(h, W, bias, t)
    other = otr.otr_head(K, kappa, beta, False, torch.Generator().manual_seed(12))(h, W, bias, t)
    assert torch.equal(again["logp"], out["logp"])  # same seed, same draws: reproducible and resumable
    assert not torch.equal(other["logp"], out["logp"])


def tiny_batch():
    tok = data.build_embedded_tokenizer()
    lm = data.build_embedded_model(tok)
    g = torch.Generator().manual_seed(5)
    seqs = [(torch.randint(5, len(tok), (3 + i,), generator=g).tolist(),
             torch.randint(5, len(tok), (2 + 3 * i,), generator=g).tolist()) for i in range(4)]
    return lm, data.collate(seqs, tok.pad_token_id)


def test_exact_head_in_fused_lm_matches_full_logits():
    lm, b = tiny_batch()
    kappa, beta = 1.3, -0.1
    naive_lm = copy.deepcopy(lm)
    o = FusedLM(lm)(b["input_ids"], b["attention_mask"], b["loss_mask"], head=otr.otr_head(1, kappa, beta, True, None))
    loss, _ = otr.otr_loss(o["logp"], b["loss_mask"], torch.tensor(4.0), rewards=o["rewards"])
    logits = naive_lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      position_ids=default_position_ids(b["attention_mask"])).logits[:, :-1].float()
    logp_all, q = logits.log_softmax(-1), (logits.detach() / kappa).softmax(-1)
    tgt = b["input_ids"][:, 1:, None]
    w = (beta * q).scatter(-1, tgt, q.gather(-1, tgt))  # w(a) = pi'(a) R(a)
    per = -(w * logp_all).sum(-1)  # (B, L-1)
    mask = b["loss_mask"][:, 1:]
    ref = sum((per[i] * mask[i]).sum() / mask[i].sum() for i in range(4)) / 4  # paper: 1/T, then mean
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o["target_logp"][:, 1:] * mask, logp_all.gather(-1, tgt)[..., 0].detach() * mask,
                               rtol=1e-5, atol=1e-6)
    loss.backward(); ref.backward()
    ref_grads = dict(naive_lm.named_parameters())
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sampled_head_in_fused_lm_is_aligned_with_tokens():
    """(B, L, K) outputs: a draw rewarded 1 is the ground truth, so its log-prob is the target's log-prob."""
    lm, b = tiny_batch()
    o = FusedLM(lm)(b["input_ids"], b["attention_mask"], b["loss_mask"],
                    head=otr.otr_head(256, 1.3, -0.1, False, torch.Generator().manual_seed(0)))
    B, L = b["input_ids"].shape
    assert o["logp"].shape == o["rewards"].shape == (B, L, 256)
    on = b["loss_mask"].bool()
    assert (o["rewards"][~on] == 0).all() and (o["logp"][~on] == 0).all()  # prompt and padding: nothing
    hit = o["rewards"] == 1.0
    assert hit.any() and (hit | (o["rewards"] == -0.1))[on].all()
    torch.testing.assert_close(o["logp"][hit], o["target_logp"][..., None].expand(B, L, 256)[hit])
    torch.testing.assert_close(o["hit"], hit.float().mean(-1))


@pytest.mark.parametrize("argv,msg", [(["--num-samples", "0"], "--num-samples 0: must be >= 1"),
                                     (["--kappa", "0"], "--kappa 0.0: must be > 0"),
                                     (["--beta", "1"], "--beta 1.0: must be below 1")])
def test_bad_flags_are_user_errors(argv, msg):
    with pytest.raises(common.UserError, match=msg):
        common.parse_args(otr.Args, argv, {"recipe": otr.RECIPES}, otr.RANGES)
    common.parse_args(otr.Args, [], {"recipe": otr.RECIPES}, otr.RANGES)  # the defaults pass


def test_main_checks_flags_before_setup(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["otr.py", "--kappa", "-1", "--output-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="--kappa -1.0"):
        otr.main()
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, agg):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "otr", agg, out, timeout=300)
    assert json.loads(out.read_text())["max_rel_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--exact",)])
def test_otr_end_to_end(tmp_path, extra):
    run_method("otr", "--max-steps", 3, "--eval-size", 32, "--output-dir", tmp_path, "--quiet", *extra)
    rec = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rec if "train/loss" in r]
    assert len(train) == 3
    for r in train:
        assert {"train/loss", "train/nll", "train/frac_draws_gt", "train/grad_norm", "train/lr"} <= set(r), r.keys()
        assert 0 < r["train/frac_draws_gt"] < 1
    assert [r["step"] for r in rec if "eval/accuracy" in r] == [0, 3]
    assert (tmp_path / "final" / "model.safetensors").exists()
