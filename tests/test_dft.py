"""methods/dft.py: dft_loss against DFT Eq. 9 (+ the ASFT KL term), the ASFT fused head against full logits of a
tiny model and a perturbed reference, GA x DDP against one full batch, the flag check, end to end."""
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

dft = load_method("dft")


def _loss(m, o, b, z, agg, n_micro):
    """One micro-batch of the DDP worker. The worker runs FusedLM with its default head (no reference model), so
    the ASFT variant ("...:kl") stands in for the full-vocabulary KL with a per-token term that has a gradient,
    0.5 (logp - logp.detach() - aux)^2; the normalisation under test is the same for any per-token term."""
    agg, _, kl = agg.partition(":")
    stand_in = 0.5 * (o["logp"] - o["logp"].detach() - b["aux"]) ** 2 if kl else None
    return m.dft_loss(o["logp"], b["loss_mask"], z, loss_agg=agg, kl=stand_in,
                      kl_weight=0.5 if kl else 0.0)[0]


# used by tests/_ddp_loss_worker.py: (aggregation mode for normalizer_count, loss of one micro-batch)
DDP_ADAPTER = (lambda agg: agg.partition(":")[0], _loss)


def reference(logp, mask, kl, lam, agg):
    """DFT Eq. 9 token by token, -sg(p) log p, plus ASFT's lam * KL, then the aggregation's own formula."""
    B, T = mask.shape
    per = torch.zeros(B, T)
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                p = torch.exp(logp[i, t]).detach()
                per[i, t] = -p * logp[i, t] + (lam * kl[i, t] if lam else 0.0)
    if agg == "token_mean":
        return per.sum() / mask.sum()
    if agg == "seq_mean_token_mean":
        return sum(per[i].sum() / mask[i].sum() for i in range(B)) / B
    return per.sum() / B  # seq_sum: Eq. 9 is a sum over the tokens of each sequence


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum"])
@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_dft_loss_matches_reference(agg, lam):
    logp, mask = rand_batch()
    kl = torch.rand(logp.shape, generator=torch.Generator().manual_seed(3))  # any non-negative per-token KL
    z = mask.sum() if agg == "token_mean" else torch.tensor(float(mask.shape[0]))
    lp, kp = logp.clone().requires_grad_(), kl.clone().requires_grad_()
    loss, m = dft.dft_loss(lp, mask, z, loss_agg=agg, kl=kp, kl_weight=lam)
    lr, kr = logp.clone().requires_grad_(), kl.clone().requires_grad_()
    ref = reference(lr, mask, kr, lam, agg)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)
    loss.backward(); ref.backward()
    torch.testing.assert_close(lp.grad, lr.grad, rtol=1e-6, atol=1e-8)
    if lam:
        torch.testing.assert_close(kp.grad, kr.grad, rtol=1e-6, atol=1e-8)
    else:
        assert kp.grad is None  # plain DFT ignores the KL
    torch.testing.assert_close(m["nll_sum"], -(logp * mask).sum())  # train/nll is the plain NLL


def test_dft_gradient_is_sft_gradient_times_p():
    """The rectification: d loss / d logp = p * (the SFT gradient), token by token."""
    logp, mask = rand_batch()
    lp = logp.clone().requires_grad_()
    dft.dft_loss(lp, mask, mask.sum())[0].backward()
    torch.testing.assert_close(lp.grad, logp.exp() * (-mask / mask.sum()))


def test_micro_token_mean_is_the_official_code_formula():
    """yongliang-wu/DFT: sum / tokens of the micro-batch, then / n_micro."""
    logp, mask = rand_batch()
    halves = [(logp[:2], mask[:2]), (logp[2:], mask[2:])]
    z = sum(dft.normalizer_count(m, "micro_token_mean") for _, m in halves)  # 2 micro-batches, as main() counts
    loss = sum(dft.dft_loss(lp, m, z, loss_agg="micro_token_mean")[0] for lp, m in halves)
    ref = sum((-lp.exp() * lp * m).sum() / m.sum() for lp, m in halves) / 2
    torch.testing.assert_close(loss, ref)
    assert not torch.allclose(loss, dft.dft_loss(logp, mask, mask.sum())[0])  # differs from the global token mean


def tiny_pair(seed=0):
    """A tiny random Qwen2 (the embedded architecture) and a perturbed copy as the reference."""
    tok = data.build_embedded_tokenizer()
    lm = data.build_embedded_model(tok, seed=seed)
    ref = copy.deepcopy(lm)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return tok, lm, ref.eval().requires_grad_(False)


def naive_asft(lm, ref, b, lam):
    """ASFT from full fp32 logits of both models (zhuchichi56/ASFT train_v2.py, mode="asft"), token mean."""
    pos = default_position_ids(b["attention_mask"])
    logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=pos).logits.float()
    with torch.no_grad():
        ref_logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=pos).logits.float()
    logp_all = logits[:, :-1].log_softmax(-1)  # position i predicts token i + 1
    ref_logp_all = ref_logits[:, :-1].log_softmax(-1)
    logp = logp_all.gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    kl = (ref_logp_all.exp() * (ref_logp_all - logp_all)).sum(-1)  # F.kl_div(log p, p_ref).sum(-1)
    mask = b["loss_mask"][:, 1:]
    loss = ((-logp.detach().exp() * logp + lam * kl) * mask).sum() / mask.sum()
    return loss, logp, kl


def test_asft_head_matches_full_logits():
    tok, lm, ref = tiny_pair()
    g = torch.Generator().manual_seed(5)
    seqs = [(torch.randint(5, len(tok), (3 + i,), generator=g).tolist(),
             torch.randint(5, len(tok), (2 + 3 * i,), generator=g).tolist()) for i in range(4)]
    b = data.collate(seqs, tok.pad_token_id)
    lam = 0.3
    naive_lm = copy.deepcopy(lm)
    o = FusedLM(lm)(b["input_ids"], b["attention_mask"], b["loss_mask"], head=dft.asft_head(ref, b))
    loss, _ = dft.dft_loss(o["logp"], b["loss_mask"], b["loss_mask"].sum(), loss_agg="token_mean", kl=o["kl"],
                           kl_weight=lam)
    loss_ref, logp_ref, kl_ref = naive_asft(naive_lm, ref, b, lam)
    mask = b["loss_mask"][:, 1:].bool()
    torch.testing.assert_close(o["logp"][:, 1:][mask], logp_ref[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o["kl"][:, 1:][mask], kl_ref[mask], rtol=1e-4, atol=1e-6)
    assert kl_ref[mask].min() > 1e-4  # the perturbed reference really differs
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    loss.backward(); loss_ref.backward()
    ref_grads = dict(naive_lm.named_parameters())
    for name, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for p in ref.parameters())  # the reference stays frozen


def test_negative_kl_weight_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["dft.py", "--kl-weight", "-0.1", "--output-dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="--kl-weight -0.1 is negative"):
        dft.main()
    assert not (tmp_path / "config.json").exists()  # raised before anything was set up


@pytest.mark.parametrize("agg,equal", [("token_mean", True), ("token_mean:kl", True),
                                       ("seq_mean_token_mean", True), ("micro_token_mean", False)])
def test_ddp2_x_accum2_equals_full_batch(tmp_path, agg, equal):
    out = tmp_path / "r.json"
    torchrun(REPO / "tests" / "_ddp_loss_worker.py", "dft", agg, out, timeout=300)
    rel = json.loads(out.read_text())["max_rel_diff"]
    if equal:
        assert rel < 1e-5, rel
    else:  # the official code's per-micro-batch mean depends on the split: the gradient is demonstrably different
        assert rel > 1e-2, rel


def read_metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("extra,keys", [((), set()), (("--kl-weight", "0.1"), {"train/kl"})])
def test_dft_end_to_end(tmp_path, extra, keys):
    run_method("dft", "--max-steps", 3, "--eval-size", 32, "--output-dir", tmp_path, "--quiet", *extra)
    rec = read_metrics(tmp_path)
    train = [r for r in rec if "train/loss" in r]
    assert len(train) == 3
    expected = {"train/loss", "train/nll", "train/grad_norm", "train/lr"} | keys
    assert all(expected <= set(r) for r in train), train[0].keys()
    assert all(0 < r["train/loss"] < r["train/nll"] for r in train)  # sg(p) log p is smaller than the NLL
    if keys:
        assert train[0]["train/kl"] < 1e-6 < train[-1]["train/kl"]  # starts at the reference, then moves away
    assert [r["step"] for r in rec if "eval/accuracy" in r] == [0, 3]
    assert (tmp_path / "final" / "model.safetensors").exists()
