"""kernels/logprob.py: fused kernels vs naive fp32 twins (values and gradients),
FusedLM vs plain Hugging Face logits, DDP / FSDP2 vs a single process, bench smoke test."""
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kernels.engine import FusedLM, default_position_ids, response_hidden  # noqa: E402
from kernels.logprob import (  # noqa: E402
    expected_reward_logprob,
    full_vocab_kl,
    fused_logprobs,
    naive_expected_reward_logprob,
    naive_full_vocab_kl,
    naive_logprobs,
    naive_sample_tokens,
    sample_tokens,
)

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    """max |a - b| / max |b|  (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_head(N, d, V, dtype=torch.float32, bias=True, seed=0, scale=1.0):
    """Random hidden (N, d), weight (V, d), bias (V,) with logits of a few units."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) * scale / math.sqrt(d) * 2).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    return h, w, b


def grads_of(outputs, upstream, params):
    """Gradients of sum_i <outputs_i, upstream_i> w.r.t. the non-None params."""
    loss = sum((o * u).sum() for o, u in zip(outputs, upstream) if o is not None)
    live = [p for p in params if p is not None]
    return torch.autograd.grad(loss, live)


# ----------------------------------------------------------------------------------
# fused_logprobs
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "N,K,chunk,vchunk,T,with_entropy,bias",
    [
        (50, 1, 7, 17, 1.0, False, True),  # N not a multiple of the chunk, V not of the vocab block
        (50, 1, 33, 64, 0.7, True, True),
        (50, 3, 7, 101, 1.3, True, False),  # K > 1 targets, one vocabulary block
        (64, 2, 1024, 30, 1.0, True, True),  # one token chunk
        (1, 1, 7, 17, 0.7, True, True),  # a single token
    ],
)
def test_fused_logprobs_matches_naive(N, K, chunk, vchunk, T, with_entropy, bias):
    d, V = 24, 101
    h, w, b = make_head(N, d, V, bias=bias)
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, V, (N, K) if K > 1 else (N,), generator=g)
    up_logp = torch.randn(t.shape, generator=g)
    up_ent = torch.randn(N, generator=g)
    lp_f, ent_f = fused_logprobs(h, w, t, b, T, chunk, with_entropy, vocab_chunk_size=vchunk)
    lp_n, ent_n = naive_logprobs(h, w, t, b, T, with_entropy=with_entropy)
    assert lp_f.shape == t.shape and lp_f.dtype == torch.float32
    assert rel_err(lp_f, lp_n) < 1e-5
    if with_entropy:
        assert ent_f.shape == (N,) and rel_err(ent_f, ent_n) < 1e-5
    else:
        assert ent_f is None
    params = (h, w, b)
    gf = grads_of((lp_f, ent_f), (up_logp, up_ent), params)
    gn = grads_of((lp_n, ent_n), (up_logp, up_ent), params)
    for a, c in zip(gf, gn):
        assert rel_err(a, c) < 1e-5


def test_fused_logprobs_repeated_targets_exact_and_bit_reproducible():
    """K samples with replacement repeat tokens within a row and across rows; the
    gradients still match naive, and two runs are bit-identical (2 threads)."""
    N, d, V, K = 300, 16, 7, 6
    h, w, b = make_head(N, d, V, seed=40)
    g = torch.Generator().manual_seed(41)
    t = torch.randint(0, V, (N, K), generator=g)
    assert (t[:, :, None] == t[:, None, :]).sum() > N * K  # repeats within rows
    up = torch.randn(N, K, generator=g)
    runs = []
    for _ in range(2):
        lp, ent = fused_logprobs(h, w, t, b, 0.9, 64, True, vocab_chunk_size=4)
        runs.append(torch.autograd.grad((lp * up).sum() + ent.sum(), (h, w, b)))
    lp_n, ent_n = naive_logprobs(h, w, t, b, 0.9, with_entropy=True)
    ref = torch.autograd.grad((lp_n * up).sum() + ent_n.sum(), (h, w, b))
    for a, a2, c in zip(*runs, ref):
        assert torch.equal(a, a2)
        assert rel_err(a, c) < 1e-5


@pytest.mark.parametrize("which", ["logp_only", "entropy_only"])
def test_fused_logprobs_one_output_used(which):
    """Gradient paths where one of the two outputs gets no upstream gradient."""
    N, d, V = 40, 16, 77
    h, w, b = make_head(N, d, V, seed=3)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    up = torch.randn(N, generator=torch.Generator().manual_seed(4))
    out_f = fused_logprobs(h, w, t, b, 0.8, 9, True, vocab_chunk_size=20)
    out_n = naive_logprobs(h, w, t, b, 0.8, with_entropy=True)
    i = 0 if which == "logp_only" else 1
    gf = torch.autograd.grad((out_f[i] * up).sum(), (h, w, b))
    gn = torch.autograd.grad((out_n[i] * up).sum(), (h, w, b))
    for a, c in zip(gf, gn):
        assert rel_err(a, c) < 1e-5


def test_fused_logprobs_frozen_weight_and_default_chunks():
    """Only hidden requires grad (e.g. a frozen head); default chunk sizes."""
    N, d, V = 30, 16, 50
    h, w, b = make_head(N, d, V, seed=5)
    w = w.detach()
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    lp_f, _ = fused_logprobs(h, w, t)
    lp_n, _ = naive_logprobs(h, w, t)
    (gf,) = torch.autograd.grad(lp_f.sum(), h)
    (gn,) = torch.autograd.grad(lp_n.sum(), h)
    assert rel_err(lp_f, lp_n) < 1e-5 and rel_err(gf, gn) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_logprobs_half_inputs(dtype):
    """bf16 / fp16 inputs: fp32 math inside; compare with fp32 naive on the same rounded
    inputs.  Values agree to fp32 precision; gradients are returned in the input dtype,
    so they agree to its rounding (looser tolerance)."""
    N, d, V = 45, 32, 120
    h, w, b = make_head(N, d, V, dtype=dtype, seed=6)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, V, (N, 2), generator=g)
    up_logp, up_ent = torch.randn(N, 2, generator=g), torch.randn(N, generator=g)
    lp_f, ent_f = fused_logprobs(h, w, t, b, 0.7, 16, True, vocab_chunk_size=50)
    lp_n, ent_n = naive_logprobs(h, w, t, b, 0.7, with_entropy=True)
    assert lp_f.dtype == torch.float32 and ent_f.dtype == torch.float32
    assert rel_err(lp_f, lp_n) < 1e-5 and rel_err(ent_f, ent_n) < 1e-5
    gf = grads_of((lp_f, ent_f), (up_logp, up_ent), (h, w, b))
    gn = grads_of((lp_n, ent_n), (up_logp, up_ent), (h, w, b))
    for a, c in zip(gf, gn):
        assert a.dtype == dtype
        assert rel_err(a, c) < 1e-2


def test_fused_logprobs_under_autocast():
    """An outer autocast must not push the kernel's matmuls to bf16."""
    N, d, V = 20, 16, 40
    h, w, b = make_head(N, d, V, seed=8)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp_f, _ = fused_logprobs(h, w, t, b)
    lp_n, _ = naive_logprobs(h, w, t, b)
    assert rel_err(lp_f, lp_n) < 1e-5


def test_fused_logprobs_bad_inputs():
    h, w, b = make_head(4, 8, 10)
    with pytest.raises(ValueError, match="targets must have 4 rows"):
        fused_logprobs(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        fused_logprobs(h, w[:, :5], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        fused_logprobs(h, w, torch.zeros(4))
    with pytest.raises(RuntimeError, match="outside"):
        fused_logprobs(h, w, torch.full((4,), 10, dtype=torch.long))


# ----------------------------------------------------------------------------------
# full_vocab_kl
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,vchunk,bias", [(7, 17, True), (33, 64, False), (1024, 1000, True)])
def test_full_vocab_kl_matches_naive(chunk, vchunk, bias):
    N, d, d_ref, V = 50, 24, 20, 101
    h, w, b = make_head(N, d, V, bias=bias, seed=10)
    rh, rw, rb = make_head(N, d_ref, V, bias=bias, seed=11)
    up = torch.randn(N, generator=torch.Generator().manual_seed(12))
    kl_f = full_vocab_kl(h, w, rh, rw, b, rb, chunk, vocab_chunk_size=vchunk)
    kl_n = naive_full_vocab_kl(h, w, rh, rw, b, rb)
    assert kl_f.shape == (N,) and (kl_f >= -1e-6).all()
    assert rel_err(kl_f, kl_n) < 1e-5
    params = (h, w, b)
    gf = grads_of((kl_f,), (up,), params)
    gn = grads_of((kl_n,), (up,), params)
    for a, c in zip(gf, gn):
        assert rel_err(a, c) < 1e-5
    # the reference side is a constant even if its tensors require grad
    assert kl_f.grad_fn is not None
    assert torch.autograd.grad(kl_f.sum(), rh, allow_unused=True)[0] is None


def test_full_vocab_kl_zero_for_identical_models():
    h, w, b = make_head(20, 16, 60, seed=13)
    kl = full_vocab_kl(h, w, h.detach(), w.detach(), b, b.detach(), 7, vocab_chunk_size=13)
    assert kl.abs().max().item() < 1e-6
    (gh,) = torch.autograd.grad(kl.sum(), h)  # grad = p - p_ref = 0 at the minimum
    assert gh.abs().max().item() < 1e-6


# ----------------------------------------------------------------------------------
# expected_reward_logprob (OTR)
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kappa,beta,chunk,vchunk", [(1.0, 0.3, 7, 17), (0.5, 0.0, 33, 64), (2.0, 1.0, 8, 101),
                                                      (1.5, -0.5, 1024, 40)])
def test_expected_reward_logprob_matches_naive(kappa, beta, chunk, vchunk):
    N, d, V = 50, 24, 101
    h, w, b = make_head(N, d, V, seed=20)
    g = torch.Generator().manual_seed(21)
    t = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    out_f = expected_reward_logprob(h, w, t, kappa, beta, b, chunk, vocab_chunk_size=vchunk)
    out_n = naive_expected_reward_logprob(h, w, t, kappa, beta, b)
    assert out_f.shape == (N,) and rel_err(out_f, out_n) < 1e-5
    gf = grads_of((out_f,), (up,), (h, w, b))
    gn = grads_of((out_n,), (up,), (h, w, b))
    for a, c in zip(gf, gn):
        assert rel_err(a, c) < 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.9])
def test_expected_reward_logprob_kappa1_is_scaled_dft_gradient(beta):
    """With kappa = 1, sum_a sg(p_a) grad log p_a = 0, so the gradient is (1 - beta)
    times that of the DFT term sg(p_t) log p_t."""
    N, d, V = 30, 16, 64
    h, w, b = make_head(N, d, V, seed=22)
    t = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(23))
    out = expected_reward_logprob(h, w, t, 1.0, beta, b, 7, vocab_chunk_size=20)
    g_otr = torch.autograd.grad(out.sum(), (h, w, b))
    lp, _ = fused_logprobs(h, w, t, b, 1.0, 7, vocab_chunk_size=20)
    dft = (lp.detach().exp() * lp).sum()
    g_dft = torch.autograd.grad(dft, (h, w, b))
    for a, c in zip(g_otr, g_dft):
        assert rel_err(a, (1 - beta) * c) < 1e-5


# ----------------------------------------------------------------------------------
# sample_tokens
# ----------------------------------------------------------------------------------
# Critical value of the chi-square distribution with 9 degrees of freedom at p = 0.001
# (scipy.stats.chi2.ppf(0.999, 9) = 27.877).  The draws are seeded, so the test is
# deterministic; a wrong distribution (e.g. kappa ignored) gives statistics in the thousands.
CHI2_9_CRIT = 27.877


@pytest.mark.parametrize("kappa", [1.0, 0.6, 1.7])
def test_sample_tokens_chi_square(kappa):
    N, d, V, K = 5, 8, 10, 10000
    h, w, b = make_head(N, d, V, seed=30, scale=0.3)
    gen = torch.Generator().manual_seed(31)
    draws = sample_tokens(h, w, K, kappa, b, generator=gen, chunk_size=2)  # 3 chunks
    assert draws.shape == (N, K) and draws.dtype == torch.long and not draws.requires_grad
    with torch.no_grad():
        probs = ((h @ w.t() + b) / kappa).softmax(-1).double()  # (N, V)
    for i in range(N):
        observed = torch.bincount(draws[i], minlength=V).double()
        expected = probs[i] * K
        assert expected.min() > 5  # chi-square approximation valid
        stat = ((observed - expected) ** 2 / expected).sum().item()
        assert stat < CHI2_9_CRIT, f"row {i}: chi2 = {stat:.1f}"
    # wrong kappa is detected by the same statistic
    wrong = ((h @ w.t() + b) / (kappa * 3)).softmax(-1).double().detach()
    stats = [(((torch.bincount(draws[i], minlength=V) - wrong[i] * K) ** 2) / (wrong[i] * K)).sum().item()
             for i in range(N)]
    assert max(stats) > CHI2_9_CRIT


def test_sample_tokens_reproducible_and_naive_twin():
    N, d, V = 12, 8, 30
    h, w, b = make_head(N, d, V, seed=32)
    a = sample_tokens(h, w, 6, 0.9, b, generator=torch.Generator().manual_seed(5), chunk_size=5)
    c = sample_tokens(h, w, 6, 0.9, b, generator=torch.Generator().manual_seed(5), chunk_size=5)
    assert torch.equal(a, c)
    assert ((a >= 0) & (a < V)).all()
    n = naive_sample_tokens(h, w, 6, 0.9, b, generator=torch.Generator().manual_seed(5))
    assert n.shape == a.shape


# ----------------------------------------------------------------------------------
# FusedLM on tiny Hugging Face models
# ----------------------------------------------------------------------------------
def tiny_qwen2(tied=True, bias=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    if bias:  # a head with a bias (no HF Qwen2 has one): replace lm_head
        head = torch.nn.Linear(32, 50, bias=True)
        with torch.no_grad():
            head.weight.copy_(lm.lm_head.weight)
            head.bias.normal_(0, 0.5)
        lm.lm_head = head
    return lm


def batch(B=4, L=11, V=50, seed=0, left_pad=True):
    """ids, attention_mask (right and left padding), loss_mask (a prompt of 3-4 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 8:] = 0  # right padding
    if left_pad:
        am[2, :3] = 0  # left padding
    lmask = am.clone()
    lmask[:, :4] = 0  # prompt
    lmask[3, 2:4] = 1  # a row whose loss starts earlier
    lmask[0, 0] = 1  # position 0 must be ignored
    return ids, am, lmask


def reference(lm, ids, am, lmask, T=1.0):
    """Token-aligned (B, L) log-probs and entropies from plain full logits."""
    logits = lm(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).logits.float() / T
    logp_all = logits[:, :-1].log_softmax(-1)  # position i-1 predicts token i
    logp = torch.zeros(ids.shape)
    ent = torch.zeros(ids.shape)
    m = lmask.clone().bool()
    m[:, 0] = False
    logp[:, 1:] = logp_all.gather(-1, ids[:, 1:, None])[..., 0]
    ent[:, 1:] = -(logp_all.exp() * logp_all).sum(-1)
    return logp * m, ent * m


@pytest.mark.parametrize("tied,bias,T", [(True, False, 1.0), (False, False, 0.7), (False, True, 1.3)])
def test_fused_lm_matches_hf_logits(tied, bias, T):
    ids, am, lmask = batch()
    g = torch.Generator().manual_seed(9)
    up_logp, up_ent = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)

    lm_ref = tiny_qwen2(tied, bias)
    lp_r, ent_r = reference(lm_ref, ids, am, lmask, T)
    ((lp_r * up_logp).sum() + (ent_r * up_ent).sum()).backward()

    model = FusedLM(tiny_qwen2(tied, bias), chunk_size=7, vocab_chunk_size=16)
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight if tied else True
    out = model(ids, am, lmask, temperature=T, with_entropy=True)
    assert set(out) == {"logp", "entropy"}
    assert out["logp"].shape == ids.shape and out["logp"].dtype == torch.float32
    assert (out["logp"][:, 0] == 0).all() and (out["logp"][lmask == 0] == 0).all()
    assert rel_err(out["logp"], lp_r) < 1e-5 and rel_err(out["entropy"], ent_r) < 1e-5
    ((out["logp"] * up_logp).sum() + (out["entropy"] * up_ent).sum()).backward()
    ref_params = dict(lm_ref.named_parameters())
    for name, p in model.lm.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-4, name  # through 2 layers: fp32 noise ~1e-6


def test_fused_lm_without_entropy_and_no_targets():
    model = FusedLM(tiny_qwen2())
    ids, am, lmask = batch(left_pad=False)
    out = model(ids, am, lmask)
    assert out["entropy"] is None
    lp_r, _ = reference(model.lm, ids, am, lmask)
    assert rel_err(out["logp"], lp_r) < 1e-5
    empty = model(ids, am, torch.zeros_like(lmask), with_entropy=True)  # nothing to score
    assert empty["logp"].shape == ids.shape and (empty["logp"] == 0).all()
    (empty["logp"].sum() + empty["entropy"].sum()).backward()
    assert all((p.grad is None) or (p.grad == 0).all() for p in model.parameters())


def test_fused_lm_head_hook_sampling_and_kl():
    """head= runs custom kernels inside the forward: OTR-style sampled targets (N, K)
    and an ASFT-style KL against a frozen reference's hidden states."""
    ids, am, lmask = batch()
    model = FusedLM(tiny_qwen2(tied=False, bias=True, seed=0))
    ref_lm = tiny_qwen2(tied=True, seed=1).eval()
    with torch.no_grad():
        ref_h = response_hidden(ref_lm, ids, am, lmask)  # (N, d)
    ref_w = ref_lm.get_output_embeddings().weight

    def head(h, w, b, targets):
        draws = sample_tokens(h, w, 3, kappa=0.8, bias=b, generator=torch.Generator().manual_seed(0))
        lp_k, _ = fused_logprobs(h, w, draws, b)
        kl = full_vocab_kl(h, w, ref_h, ref_w, b)
        return {"draws": draws, "logp_k": lp_k, "kl": kl, "n": targets.shape[0]}

    out = model(ids, am, lmask, head=head)
    B, L = ids.shape
    assert out["draws"].shape == (B, L, 3) and out["draws"].dtype == torch.long
    assert out["logp_k"].shape == (B, L, 3) and out["kl"].shape == (B, L)
    m = lmask.bool().clone()
    m[:, 0] = False
    assert out["n"] == int(m.sum())  # non-row outputs pass through

    # reference from full logits of both models
    logits = model.lm(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).logits.float()
    with torch.no_grad():
        ref_logits = ref_lm(input_ids=ids, attention_mask=am, position_ids=default_position_ids(am)).logits.float()
    lp_all, ref_all = logits[:, :-1].log_softmax(-1), ref_logits[:, :-1].log_softmax(-1)
    kl_r = (ref_all.exp() * (ref_all - lp_all)).sum(-1) * m[:, 1:]
    lpk_r = lp_all.gather(-1, out["draws"][:, 1:]) * m[:, 1:, None]
    assert rel_err(out["kl"][:, 1:], kl_r) < 1e-5
    assert rel_err(out["logp_k"][:, 1:], lpk_r) < 1e-5
    assert (out["kl"][~m] == 0).all()
    g_f = torch.autograd.grad(out["kl"].sum() + out["logp_k"].sum(), list(model.lm.parameters()))
    g_r = torch.autograd.grad(kl_r.sum() + lpk_r.sum(), list(model.lm.parameters()))
    for a, c in zip(g_f, g_r):
        assert rel_err(a, c) < 1e-4


def test_fused_lm_softcapping_fallback():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=0.5)  # small cap: it changes the log-probs a lot
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    model = FusedLM(lm, chunk_size=5)
    ids, am, lmask = batch(left_pad=False)
    with pytest.warns(UserWarning, match="final_logit_softcapping"):
        out = model(ids, am, lmask, temperature=0.9, with_entropy=True)
    lp_r, ent_r = reference(lm, ids, am, lmask, 0.9)
    assert rel_err(out["logp"], lp_r) < 1e-5 and rel_err(out["entropy"], ent_r) < 1e-5
    # the cap matters here: fusing lm_head alone would give different numbers
    h = response_hidden(lm, ids, am, lmask)
    t = ids.reshape(-1)[(lmask.bool() & (torch.arange(ids.shape[1]) > 0)).reshape(-1)]
    uncapped, _ = fused_logprobs(h, lm.get_output_embeddings().weight, t, temperature=0.9)
    assert (uncapped - out["logp"][:, 1:][lmask[:, 1:].bool()]).abs().max() > 1e-2
    (g,) = torch.autograd.grad(out["logp"].sum(), [lm.model.embed_tokens.weight])
    assert torch.isfinite(g).all()
    with pytest.raises(NotImplementedError, match="head="), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(ids, am, lmask, head=lambda h, w, b, t: {})


# ----------------------------------------------------------------------------------
# FusedLM(prompt_mask=...): prompt-side tokens (UFT's hint) scored in the same fused pass
# ----------------------------------------------------------------------------------
def hinted_batch(n_prompts=6, G=8, V=50, seed=7, left_pad=False):
    """n_prompts prompts x G ragged completions; each prompt ends in a hint of 0-4 tokens shared by its G rows
    (the UFT layout: the hint is part of the prompt). Returns ids, am, loss_mask, hint_mask."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for j in range(n_prompts):
        p = torch.randint(0, V, (int(torch.randint(3, 7, (1,), generator=g)),), generator=g).tolist()
        h = torch.randint(0, V, (j % 5,), generator=g).tolist()  # j % 5 hint tokens (0 for the first prompt)
        for k in range(G):
            c = torch.randint(0, V, (int(torch.randint(0 if k == 0 else 1, 9, (1,), generator=g)),), generator=g)
            rows.append((p, h, c.tolist()))  # k == 0 may have no completion token: its hint is still scored
    L = max(len(p) + len(h) + len(c) for p, h, c in rows)
    B = len(rows)
    ids, am = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    lmask, hmask = torch.zeros(B, L), torch.zeros(B, L)
    for i, (p, h, c) in enumerate(rows):
        s = p + h + c
        o = L - len(s) if left_pad and i % 2 else 0
        ids[i, o:o + len(s)] = torch.tensor(s)
        am[i, o:o + len(s)] = 1
        hmask[i, o + len(p):o + len(p) + len(h)] = 1
        lmask[i, o + len(p) + len(h):o + len(s)] = 1
    return ids, am, lmask, hmask


@pytest.mark.parametrize("fast,left_pad", [(True, False), (True, True), (False, False), (False, True)])
def test_fused_lm_prompt_mask_matches_naive(fast, left_pad):
    """prompt_mask: log-probs of prompt-side tokens (and their gradients) from the same fused pass equal plain fp32
    logits -> log-softmax -> gather, with odd chunk sizes, packing and shared contexts on (fast) and off; "logp" and
    "entropy" stay those of the loss_mask tokens only."""
    from kernels import engine as K
    ids, am, lmask, hmask = hinted_batch(left_pad=left_pad)
    T = 0.7
    lm_ref = tiny_qwen2(tied=False, bias=True)
    lp_r, _ = reference(lm_ref, ids, am, (lmask + hmask).clamp(max=1), T)
    _, ent_r = reference(lm_ref, ids, am, lmask, T)
    g = torch.Generator().manual_seed(3)
    up = [torch.randn(ids.shape, generator=g) for _ in range(3)]
    ((lp_r * lmask * up[0]).sum() + (lp_r * hmask * up[1]).sum() + 0.1 * (ent_r * up[2]).sum()).backward()
    lm = tiny_qwen2(tied=False, bias=True)
    contexts = []
    original = K._packed_attention

    def spy(*args, **kwargs):
        contexts.append(kwargs.get("context") is not None)
        return original(*args, **kwargs)
    K._packed_attention = spy
    try:
        model = FusedLM(lm, chunk_size=7, vocab_chunk_size=13, fast=fast)
        out = model(ids, am, lmask, temperature=T, with_entropy=True, prompt_mask=hmask)
    finally:
        K._packed_attention = original
    assert set(out) == {"logp", "prompt_logp", "entropy"}
    if fast:  # the hint sits inside the shared prompt context: served by the one shared pass
        assert lm._postrain_packing_ok is True and contexts and contexts[-1]
    else:
        assert not contexts
    assert rel_err(out["logp"], lp_r * lmask) < 1e-5 and rel_err(out["prompt_logp"], lp_r * hmask) < 1e-5
    assert rel_err(out["entropy"], ent_r) < 1e-5
    assert (out["prompt_logp"][hmask == 0] == 0).all() and (out["logp"][lmask == 0] == 0).all()
    assert (out["prompt_logp"] != 0).sum() == hmask.sum()  # every hint token scored
    ((out["logp"] * up[0]).sum() + (out["prompt_logp"] * up[1]).sum() + 0.1 * (out["entropy"] * up[2]).sum()).backward()
    ref_params = dict(lm_ref.named_parameters())
    for name, p in lm.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-4, name


def test_fused_lm_prompt_mask_leaves_existing_calls_unchanged():
    """Without prompt_mask (every existing call) the result is what it was; an all-zero prompt_mask gives the same
    logp bit for bit; prompt_mask with head= is refused."""
    ids, am, lmask, hmask = hinted_batch(n_prompts=3, G=4)
    model = FusedLM(tiny_qwen2(), chunk_size=5)
    plain = model(ids, am, lmask, 0.9, True)
    assert set(plain) == {"logp", "entropy"}
    zero = model(ids, am, lmask, 0.9, True, prompt_mask=torch.zeros_like(hmask))
    assert torch.equal(plain["logp"], zero["logp"]) and torch.equal(plain["entropy"], zero["entropy"])
    assert (zero["prompt_logp"] == 0).all()
    with pytest.raises(ValueError, match="default head only"):
        model(ids, am, lmask, prompt_mask=hmask, head=lambda h, w, b, t: {})


# ----------------------------------------------------------------------------------
# The padding-free pass (one packed sequence, attention per row) against plain padded passes
# ----------------------------------------------------------------------------------
def ragged_batch(B=19, L=23, V=50, seed=3):
    """Rows of many lengths, right-padded, left-padded and with a prompt of 2-5 tokens; one row fully padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    am = torch.zeros(B, L, dtype=torch.long)
    lmask = torch.zeros(B, L)
    for b in range(B - 1):
        n = int(torch.randint(4, L + 1, (1,), generator=g))
        lo = 0 if b % 3 else L - n  # every third row left-padded
        am[b, lo:lo + n] = 1
        lmask[b, lo + int(torch.randint(2, 4, (1,), generator=g)):lo + n] = 1
    return ids, am, lmask


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_pass_equals_padded_pass(checkpointing):
    """FusedLM's padding-free pass (used: the probe says so, and the groups are several) gives the log-probs and
    gradients of plain full logits on a padded batch, with and without gradient checkpointing."""
    from kernels import engine as K
    ids, am, lmask = ragged_batch()
    lm_ref = tiny_qwen2(tied=False)
    lp_r, ent_r = reference(lm_ref, ids, am, lmask, 0.8)
    (lp_r.sum() + 0.1 * ent_r.sum()).backward()
    lm = tiny_qwen2(tied=False)
    if checkpointing:
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    lm.train()
    spans = []
    original = K._packed_attention

    def spy(*args, **kwargs):
        spans.append(kwargs["spans"])
        return original(*args, **kwargs)
    K._packed_attention = spy
    try:
        out = FusedLM(lm, chunk_size=16)(ids, am, lmask, temperature=0.8, with_entropy=True)
    finally:
        K._packed_attention = original
    assert lm._postrain_packing_ok is True
    groups = spans[-1]  # (offset, rows, length) of the last call
    assert len(groups) > 1 and sum(n for _, n, _ in groups) == 18  # 18 non-empty rows, in several length groups
    assert sum(n * length for _, n, length in groups) < 18 * 23  # fewer slots than a padded batch
    assert rel_err(out["logp"], lp_r) < 1e-5 and rel_err(out["entropy"], ent_r) < 1e-5
    (out["logp"].sum() + 0.1 * out["entropy"].sum()).backward()
    ref_params = dict(lm_ref.named_parameters())
    for name, p in lm.named_parameters():
        assert rel_err(p.grad, ref_params[name].grad) < 1e-4, name


def test_packing_off_for_sliding_windows_and_eager_attention():
    """Layers with sliding windows or a non-default attention implementation keep the padded passes."""
    from kernels.engine import _packing_ok
    ids, am, lmask = ragged_batch(B=6, seed=4)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=4, max_window_layers=0)
    for lm in (transformers.AutoModelForCausalLM.from_config(cfg),
               transformers.AutoModelForCausalLM.from_config(tiny_qwen2().config, attn_implementation="eager")):
        assert not _packing_ok(lm)
        out = FusedLM(lm)(ids, am, lmask)
        lp_r, _ = reference(lm, ids, am, lmask)
        assert rel_err(out["logp"], lp_r) < 1e-5


@pytest.mark.parametrize("broken", ["no_causal", "no_context"])
def test_packing_probe_catches_a_wrong_packed_attention(broken):
    """The one-time probe compares the packed passes with a plain one: a packed attention that is wrong (not causal;
    or ignoring the shared context) turns packing off for the model, and FusedLM stays exact."""
    from kernels import engine as K
    original = K._packed_attention

    def wrong(module, query, key, value, attention_mask, dropout=0.0, scaling=None, spans=(), context=None, **kw):
        if broken == "no_causal":  # every token sees the whole packed sequence
            return torch.nn.functional.scaled_dot_product_attention(
                query, key, value, scale=scaling, enable_gqa=True).transpose(1, 2), None
        return original(module, query, key, value, attention_mask, dropout, scaling, spans, None, **kw)
    K._packed_attention = wrong
    try:
        lm = tiny_qwen2()
        assert not K._packing_ok(lm) and lm._postrain_packing_ok is False
        ids, am, lmask = ragged_batch(B=6, seed=5)
        out = FusedLM(lm)(ids, am, lmask)
    finally:
        K._packed_attention = original
    lp_r, _ = reference(lm, ids, am, lmask)
    assert rel_err(out["logp"], lp_r) < 1e-5


def test_length_groups_is_optimal():
    from kernels.engine import _length_groups
    assert _length_groups([8, 8, 2, 2, 2, 2], group_cost=4) == [(0, 2), (2, 6)]  # 16 + 8 + 2 x 4 < 48 + 4
    assert _length_groups([8, 8, 7, 2], group_cost=100) == [(0, 4)]
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # brute force over every cut of up to 7 sorted lengths
        lengths = sorted(torch.randint(1, 12, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist(),
                         reverse=True)
        cost = float(torch.randint(0, 10, (1,), generator=g))

        def total(runs):
            return sum((j - i) * lengths[i] + cost for i, j in runs)
        n, best = len(lengths), float("inf")
        for mask in range(2 ** (n - 1)):
            cuts = [0] + [k + 1 for k in range(n - 1) if mask >> k & 1] + [n]
            best = min(best, total(list(zip(cuts, cuts[1:]))))
        runs = _length_groups(lengths, cost)
        assert runs[0][0] == 0 and runs[-1][1] == n and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert total(runs) == best


# ----------------------------------------------------------------------------------
# DDP and FSDP2 (2 processes, gloo): gradients equal a single full-batch process
# ----------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_match_single_process(tmp_path):
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "_ddp_kernels_worker.py"), str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    errors = json.loads(result.read_text())
    assert set(errors) == {"ddp_tied", "ddp_untied_bias", "fsdp2_tied", "fsdp2_untied_bias"}, errors
    for name, err in errors.items():
        assert err < 1e-5, (name, err)


# ----------------------------------------------------------------------------------
# benchmark smoke test
# ----------------------------------------------------------------------------------
def test_bench_quick_runs():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # one tiny size keeps this well under 20 s (`--quick` alone runs two small sizes)
    cmd = [sys.executable, "-m", "kernels.bench", "--quick", "--sizes", "128x32x1000", "--device", "cpu"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "fused/naive" in p.stdout


@pytest.mark.parametrize("layout", ["grpo_shared_prompts", "ragged_no_share", "left_padded", "grpo_checkpointing"])
def test_fusedlm_partial_passes_equal_one_plain_pass(layout):
    """FusedLM's body runs only what scored tokens need (cut after the last target, shared prompt contexts packed
    once in the same pass, length groups). Its log-probs and parameter gradients must equal one plain pass of the HF
    model (full logits, log-softmax, gather) on batches that exercise each path: 8 prompts x G=8 completions of
    ragged lengths (64 rows, so the grouping runs), rows with no target at all, left padding, and the shared
    prompts under gradient checkpointing (recomputed in backward)."""
    import data
    from kernels.engine import FusedLM
    tok = data.build_embedded_tokenizer()
    torch.manual_seed(0)
    lm = data.build_embedded_model(tok).float()
    g = torch.Generator().manual_seed(1)
    V, pad = lm.config.vocab_size, tok.pad_token_id
    rows = []
    for p in range(8):
        prompt = torch.randint(5, V, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for k in range(8):
            n = int(torch.randint(0, 13, (1,), generator=g))  # n = 0: a row without targets
            comp = torch.randint(5, V, (n,), generator=g).tolist()
            if not layout.startswith("grpo"):  # distinct contexts
                prompt = torch.randint(5, V, (len(prompt),), generator=g).tolist()
            rows.append((prompt, comp))
    L = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), L), pad)
    am, lm_mask = torch.zeros(len(rows), L, dtype=torch.long), torch.zeros(len(rows), L)
    for i, (p, c) in enumerate(rows):
        s = p + c
        o = L - len(s) if layout == "left_padded" else 0
        ids[i, o:o + len(s)] = torch.tensor(s)
        am[i, o:o + len(s)] = 1
        lm_mask[i, o + len(p):o + len(s)] = 1
    up = torch.randn(len(rows), L, generator=g)
    if layout == "grpo_checkpointing":  # the shared prompts in the one packed pass, recomputed in backward
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        lm.train()
    fused = FusedLM(lm)
    out = fused(ids, am, lm_mask)["logp"]
    loss_f = (out * up * lm_mask).sum()
    grads_f = torch.autograd.grad(loss_f, list(lm.parameters()), allow_unused=True)
    pos = (am.cumsum(1) - 1).clamp(min=0)
    logits = lm(input_ids=ids, attention_mask=am, position_ids=pos).logits.float()
    ref = torch.zeros(len(rows), L)
    ref[:, 1:] = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    loss_r = (ref * up * lm_mask).sum()
    grads_r = torch.autograd.grad(loss_r, list(lm.parameters()), allow_unused=True)
    m = lm_mask.bool()
    assert (out[m] - ref[m]).abs().max() < 1e-4
    for a, b in zip(grads_f, grads_r):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
            continue
        assert rel_err(a, b) < 1e-4


FAST_OFF = """
import sys, torch
sys.path.insert(0, {repo!r})
import common
import data
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from kernels.engine import FusedLM
lm = data.load_model({path!r})
fused = FusedLM(lm, fast=False)
b = data.collate([([5, 6, 7], [8, 9, 10, 11]), ([5, 6], [8, 9])], 0)
o = fused(b["input_ids"], b["attention_mask"], b["loss_mask"], 1.0, True)
(o["logp"].sum() + o["entropy"].sum()).backward()
assert not any("forward" in m.__dict__ for m in lm.modules()), "a module's forward was swapped"
assert getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "postrain_wraps", None) is None, "the global sdpa entry was wrapped"
fast = FusedLM(data.load_model({path!r}))
o2 = fast(b["input_ids"], b["attention_mask"], b["loss_mask"], 1.0, True)
assert getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "postrain_wraps", None) is not None
torch.testing.assert_close(o2["logp"], o["logp"], rtol=1e-5, atol=1e-5)
print(fused.summary); print(fast.summary)
"""


def test_fast_paths_off_changes_no_module_and_no_global_state(tmp_path):
    """Issue 20: every change to model or global state is one visible call (FusedLM(lm, fast=...) in each method's
    model setup, --fast-paths), printed at start-up; with fast=False the model's modules and transformers' attention
    registry stay as loaded (checked in a fresh process, where nothing else has registered anything)."""
    import subprocess
    import sys
    import data
    path = data.resolve_model("embedded")
    p = subprocess.run([sys.executable, "-c", FAST_OFF.format(repo=str(REPO), path=str(path))], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    off, on = p.stdout.strip().splitlines()[-2:]
    assert off.startswith("fast paths off")
    assert "RMSNorm kernel in 9 modules" in on and "padding-free passes on (probe passed)" in on
