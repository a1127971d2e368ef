"""The unified view (HPT, arXiv 2509.04419, "Towards a Unified View of Large Language Model Post-Training"): the
Unified Policy Gradient Estimator's per-token ascent direction is 1_stable * A * grad pi_theta / pi_ref, so a loss
    L = -agg_t sg(w_t) log pi_theta(token_t),   w = 1_stable * A * pi_theta / pi_ref
has exactly that gradient, up to the aggregation (token mean, sequence mean, ...), which is outside the view. For
every method whose loss fits (the README's table, spec methods_c.md §8), each case below builds w from the table's
components on random tensors, written here from the table and not from the method file, and checks that the
gradient of the method's `<method>_loss` equals the gradient of that reference loss.
"""
import pytest
import torch
from tests_util import load_method

from kernels.advantage import aggregate

B, T, EPS_LOW, EPS_HIGH, DUAL = 6, 9, 0.2, 0.28, 3.0


def batch(seed=0):
    """Random per-token log-probs (the leaf whose gradient is compared), an old policy, a ragged mask, advantages."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3 - 0.05
    logp = (old + torch.randn(B, T, generator=g) * 0.4).clamp(max=-1e-3)  # ratios on both sides of every clip
    lengths = torch.tensor([T, 7, 3, 1, 5, 8])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    adv = torch.randn(B, generator=g) * 1.5
    return logp.requires_grad_(), old, mask, adv


def stable(ratio, adv, dual=None):
    """1_stable of a PPO-clipped token: 0 where the clip (or the dual clip) is the active bound, else 1."""
    a = adv[:, None].expand_as(ratio)
    out = ~(((a > 0) & (ratio > 1 + EPS_HIGH)) | ((a < 0) & (ratio < 1 - EPS_LOW)))
    if dual is not None:
        out &= ~((a < 0) & (ratio > dual))
    return out.float()


def reference(w, logp, mask, agg, normalizer, max_len=None):
    """-agg sg(w) log pi_theta: the UPGE loss with the method's aggregation."""
    return aggregate(-w.detach() * logp, mask, agg, normalizer, max_len)


def grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


def check(loss, ref, logp):
    torch.testing.assert_close(grad(loss, logp), grad(ref, logp), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_sum"])
def test_sft_is_w_equal_one(agg):
    """SFT: demonstration tokens, pi_ref = pi_theta, A = 1: w = 1."""
    sft = load_method("sft")
    logp, _, mask, _ = batch()
    z = torch.tensor(float(mask.sum() if agg == "token_mean" else B))
    loss, _ = sft.sft_loss(logp, mask, z, loss_agg=agg)
    check(loss, reference(torch.ones_like(logp), logp, mask, agg, z), logp)


def test_dft_is_sft_with_pi_ref_one():
    """DFT: pi_ref = 1 (a constant), A = 1: w = pi_theta(y_t)."""
    dft = load_method("dft")
    logp, _, mask, _ = batch(1)
    z = mask.sum()
    loss, _ = dft.dft_loss(logp, mask, z)
    check(loss, reference(logp.exp(), logp, mask, "token_mean", z), logp)


def test_otr_is_reinforce_on_k_draws():
    """OTR: K draws per position, pi_ref = pi_theta, A = R(a) in {1, beta}: w = R / K on each draw."""
    otr = load_method("otr")
    g = torch.Generator().manual_seed(2)
    K = 5
    logp = (-torch.rand(B, T, K, generator=g) * 4).requires_grad_()
    rewards = torch.where(torch.rand(B, T, K, generator=g) < 0.3, 1.0, -0.1)
    _, _, mask, _ = batch(2)
    loss, _ = otr.otr_loss(logp, mask, torch.tensor(float(B)), rewards=rewards, loss_agg="seq_mean_token_mean")
    ref = aggregate(-(rewards / K * logp).sum(-1), mask, "seq_mean_token_mean", torch.tensor(float(B)))
    torch.testing.assert_close(grad(loss, logp), grad(ref, logp), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("agg,dual", [("token_mean", None), ("seq_mean_token_mean", DUAL),
                                      ("seq_mean_token_sum_norm", None)])
def test_grpo_dr_grpo_dapo(agg, dual):
    """GRPO (seq mean), Dr. GRPO (sum / L_max), DAPO (token mean, eps_high 0.28): own tokens, pi_ref = pi_old,
    1_stable = the PPO clip (and the dual clip): w = 1_stable * A * pi_theta / pi_old."""
    grpo = load_method("grpo")
    logp, old, mask, adv = batch(3)
    z = torch.tensor(float(mask.sum() if agg == "token_mean" else B))
    loss, _ = grpo.grpo_loss(logp, old, adv, mask, z, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=dual,
                             log_ratio_clamp=None, loss_agg=agg, max_len=T)
    ratio = (logp - old).exp()
    check(loss, reference(stable(ratio, adv, dual) * adv[:, None] * ratio, logp, mask, agg, z, T), logp)


@pytest.mark.parametrize("weighting", ["none", "phi"])
def test_chord(weighting):
    """CHORD: own rows as GRPO with A x (1 - mu); expert rows with pi_ref = pi_theta and A = mu (CHORD-mu, w = mu)
    or pi_ref = 1, A = mu (1 - p) (CHORD-phi, w = mu p (1 - p)); each part aggregated over its own tokens."""
    chord = load_method("chord")
    logp, old, mask, adv = batch(4)
    is_expert = torch.tensor([False, False, False, True, False, True])
    on, ex = mask * (~is_expert)[:, None], mask * is_expert[:, None]
    z, z_ex, mu = on.sum(), ex.sum(), 0.3
    loss, _ = chord.chord_loss(logp, old, adv, mask, z, is_expert=is_expert, expert_normalizer=z_ex, mu=mu,
                               sft_weighting=weighting, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=DUAL)
    ratio, p = (logp - old).exp(), logp.exp()
    w_own = (1 - mu) * stable(ratio, adv, DUAL) * adv[:, None] * ratio
    w_demo = mu * (torch.ones_like(p) if weighting == "none" else p * (1 - p))
    ref = reference(w_own, logp, on, "token_mean", z) + reference(w_demo, logp, ex, "token_mean", z_ex)
    check(loss, ref, logp)


def test_prefix_rft_with_the_entropy_mask_as_a_stability_mask():
    """Prefix-RFT (the view fits only in part: the prefix tokens' behaviour policy is the expert): own and prefix
    tokens with pi_ref = pi_old, 1_stable = the PPO and dual clip x (not a low-entropy prefix token)."""
    prx = load_method("prefix_rft")
    logp, old, mask, adv = batch(5)
    g = torch.Generator().manual_seed(5)
    entropy = torch.rand(B, T, generator=g) * 2
    prefix = (torch.arange(T)[None] < torch.tensor([4, 0, 2, 0, 3, 0])[:, None]).float() * mask
    z = torch.tensor(float(B))
    loss, _ = prx.prefix_rft_loss(logp, old, adv, mask, z, prefix_mask=prefix, entropy=entropy, eps_low=EPS_LOW,
                                  eps_high=EPS_HIGH, dual_clip=DUAL, entropy_coef=0.0, max_len=T,
                                  entropy_mask_ratio=0.5, entropy_scope="sequence")
    n = prefix.sum(-1, keepdim=True)  # the lowest-entropy int(0.5 n) prefix tokens of each row lose their A
    rank = torch.where(prefix.bool(), entropy, float("inf")).argsort(dim=-1, stable=True).argsort(dim=-1)
    low_entropy_prefix = prefix.bool() & (rank < (n * 0.5).floor())
    ratio = (logp - old).exp()
    w = (~low_entropy_prefix).float() * stable(ratio, adv, DUAL) * adv[:, None] * ratio
    check(loss, reference(w, logp, mask, "seq_mean_token_sum_norm", z, T), logp)


def test_relift_rl_and_fine_tuning_steps():
    """ReLIFT: the RL step as released has no clip (1_stable = 1), pi_ref = pi_old: w = A pi/pi_old; the
    fine-tuning step is SFT (w = 1). Each step fits; their separate optimizers are outside the view."""
    relift = load_method("relift")
    logp, old, mask, adv = batch(6)
    z = torch.tensor(float(B))
    loss, _ = relift.relift_rl_loss(logp, old, adv, mask, z, entropy=torch.zeros(B, T), token_normalizer=mask.sum(),
                                    entropy_coef=0.0, max_len=T)
    ratio = (logp - old).exp()
    check(loss, reference(adv[:, None] * ratio, logp, mask, "seq_mean_token_sum_norm", z, T), logp)
    logp2, _, mask2, _ = batch(7)
    loss, _ = relift.relift_sft_loss(logp2, mask2, mask2.sum(), entropy=torch.zeros(B, T), entropy_coef=0.0)
    check(loss, reference(torch.ones_like(logp2), logp2, mask2, "token_mean", mask2.sum()), logp2)


@pytest.mark.parametrize("kd_mask_rows", [None, [1, 0, 1, 1, 0, 1]])
def test_kdrl_teacher_gives_a_dense_token_advantage(kd_mask_rows):
    """KDRL with k2: the GRPO part as grpo.py, plus a KD part with pi_ref = pi_theta and a token advantage
    A_KD = beta (log pi_T - log pi_theta) on the kept tokens: w = 1_stable A pi/pi_old + beta (log pi_T - log pi)."""
    kdrl = load_method("kdrl")
    logp, old, mask, adv = batch(8)
    teacher = old + torch.randn(B, T, generator=torch.Generator().manual_seed(8)) * 0.5
    keep = mask if kd_mask_rows is None else mask * torch.tensor(kd_mask_rows, dtype=torch.float)[:, None]
    z, beta = mask.sum(), 0.05
    loss, _ = kdrl.kdrl_loss(logp, old, adv, mask, z, teacher_logp=teacher, kd_mask=keep, beta=beta,
                             eps_low=EPS_LOW, eps_high=EPS_HIGH, log_ratio_clamp=None, kl_estimator="k2")
    ratio = (logp - old).exp()
    w = stable(ratio, adv) * adv[:, None] * ratio + keep * beta * (teacher - logp)
    check(loss, reference(w, logp, mask, "token_mean", z), logp)


GPPO_EXTRA = {  # the arguments that reduce each rollout loss to its PPO part on own tokens (no demonstration rows,
    # no KD, no hint, no entropy or KL term)
    "grpo": dict(),
    "chord": lambda B, T, m: dict(is_expert=torch.zeros(B, dtype=torch.bool), expert_normalizer=torch.tensor(1.0), mu=0.0),
    "prefix_rft": lambda B, T, m: dict(prefix_mask=torch.zeros(B, T), entropy=torch.zeros(B, T), entropy_coef=0.0,
                                       loss_agg="token_mean"),
    "relift": lambda B, T, m: dict(clip=True, entropy=torch.zeros(B, T), token_normalizer=m.sum(), entropy_coef=0.0,
                                   loss_agg="token_mean"),
    "kdrl": lambda B, T, m: dict(teacher_logp=torch.zeros(B, T), kd_mask=torch.zeros(B, T), beta=0.0),
    "luffy": lambda B, T, m: dict(prefix_mask=torch.zeros(B, T), clip=True, token_normalizer=m.sum(),
                                  entropy_coef=0.0, loss_agg="token_mean"),
    "hpt": lambda B, T, m: dict(is_expert=torch.zeros(B, dtype=torch.bool), expert_normalizer=torch.tensor(1.0),
                                token_normalizer=m.sum(), clip=True, entropy_coef=0.0, loss_agg="token_mean"),
    "uft": lambda B, T, m: dict(beta=0.0, entropy_coef=0.0),
}


@pytest.mark.parametrize("method", sorted(GPPO_EXTRA))
def test_gppo_moves_the_clip_into_pi_ref_in_every_rollout_method(method):
    """GPPO (Klear-Reasoner, --clip-mode gppo): own tokens, pi_ref = pi_old inside the clip range; outside it the
    ratio is replaced by its bound scaled by beta (pi_ref = sg(pi_theta) / (beta (1 +- eps))), so a clipped token
    keeps a gradient; only the dual-clip region has none: w = A rho inside, A beta_high (1 + eps_high) above,
    A beta_low (1 - eps_low) below, 0 in the dual-clip region. Every rollout file passes the mode to the kernel."""
    mod = load_method(method)
    loss_fn = getattr(mod, {"relift": "relift_rl_loss"}.get(method, f"{method}_loss"))
    logp, old, mask, adv = batch(9)
    z, lo, hi = mask.sum(), 0.5, 2.0
    extra = GPPO_EXTRA[method](B, T, mask) if callable(GPPO_EXTRA[method]) else {}
    loss, _ = loss_fn(logp, old, adv, mask, z, **{"eps_low": EPS_LOW, "eps_high": EPS_HIGH, "dual_clip": DUAL,
                                                  "log_ratio_clamp": None, "clip_mode": "gppo", "gppo_beta_low": lo,
                                                  "gppo_beta_high": hi, "loss_agg": "token_mean", **extra})
    ratio, a = (logp - old).exp(), adv[:, None].expand(B, T)
    w = torch.where((a > 0) & (ratio > 1 + EPS_HIGH), a * hi * (1 + EPS_HIGH),
                    torch.where((a < 0) & (ratio < 1 - EPS_LOW), a * lo * (1 - EPS_LOW), a * ratio))
    w = torch.where((a < 0) & (ratio > DUAL), 0.0, w)
    assert ((a > 0) & (ratio > 1 + EPS_HIGH) & (mask > 0)).any() and ((a < 0) & (ratio < 1 - EPS_LOW) & (mask > 0)).any()
    check(loss, reference(w, logp, mask, "token_mean", z), logp)


def test_luffy_demonstration_inside_the_group():
    """LUFFY (official code): own tokens without clip, pi_ref = pi_old: w = A rho; demonstration tokens with
    pi_ref = 1 and the shaping f(p) = p / (p + gamma) on the likelihood: w = A f'(p) p = A gamma p / (p + gamma)^2."""
    luffy = load_method("luffy")
    logp, old, mask, adv = batch(10)
    demo = (torch.arange(B) % 3 == 2)[:, None].float() * mask
    z, gamma = torch.tensor(float(B)), 0.1
    loss, _ = luffy.luffy_loss(logp, old, adv, mask, z, prefix_mask=demo, gamma=gamma, max_len=T)
    ratio, p, a = (logp - old).exp(), logp.exp(), adv[:, None]
    w = torch.where(demo.bool(), a * gamma * p / (p + gamma) ** 2, a * ratio)
    check(loss, reference(w, logp, mask, "seq_mean_token_sum_norm", z, T), logp)


def test_hpt_switches_all_components_per_question():
    """HPT: a question at or below the gate trains its demonstration (pi_ref = pi_theta, A = sft_coef: w =
    sft_coef, a token mean over the step's demonstration tokens); above it, its rollouts without clip (pi_ref =
    pi_old, A = r - mean: w = A rho)."""
    hpt = load_method("hpt")
    logp, old, mask, adv = batch(11)
    is_expert = torch.tensor([False, True, False, False, True, False])
    on, ex = mask * (~is_expert)[:, None], mask * is_expert[:, None]
    z, z_ex, coef = torch.tensor(float((~is_expert).sum())), ex.sum(), 0.3
    loss, _ = hpt.hpt_loss(logp, old, adv, mask, z, is_expert=is_expert, expert_normalizer=z_ex,
                           token_normalizer=mask.sum(), sft_coef=coef, entropy_coef=0.0, max_len=T)
    ratio = (logp - old).exp()
    ref = (reference(adv[:, None] * ratio, logp, on, "seq_mean_token_sum_norm", z, T)
           + reference(torch.full_like(logp, coef), logp, ex, "token_mean", z_ex))
    check(loss, ref, logp)


def test_srft_paper_form():
    """SRFT (paper form; no official code): demonstration tokens get an SFT weight 0.5 sg(e^-H) (pi_ref = pi_theta,
    a token mean over the demonstration tokens) plus the RL term with pi_ref = 1, whose clip acts on the low side
    only (p <= 1): w = 1[not (A < 0, p < 1 - eps_low)] A p; own tokens: w = 0.1 sg(e^H) if correct, else -1."""
    srft = load_method("srft")
    logp, old, mask, adv = batch(12)
    g = torch.Generator().manual_seed(12)
    entropy = torch.rand(B, T, generator=g)
    is_expert = torch.tensor([False, False, True, False, False, True])
    correct = torch.tensor([True, False, False, True, False, False])
    ex, own = mask * is_expert[:, None], mask * (~is_expert)[:, None]
    z, z_ex = mask.sum(), ex.sum()
    loss, _ = srft.srft_loss(logp, old, adv, mask, z, is_expert=is_expert, expert_normalizer=z_ex,
                             token_normalizer=mask.sum(), entropy=entropy, correct=correct, eps_low=EPS_LOW)
    H = (entropy * mask).sum(1) / mask.sum(1)  # per-sequence entropy (the default entropy weights)
    p, a = logp.exp(), adv[:, None].expand(B, T)
    w_demo_rl = torch.where((a < 0) & (p < 1 - EPS_LOW), 0.0, a * p)
    w_own = torch.where(correct, 0.1 * H.exp(), torch.tensor(-1.0))[:, None].expand(B, T)
    ref = (reference((0.5 * (-H).exp())[:, None].expand(B, T), logp, ex, "token_mean", z_ex)
           + reference(w_demo_rl, logp, ex, "token_mean", z) + reference(w_own, logp, own, "token_mean", z))
    check(loss, ref, logp)


def test_uft_own_tokens_and_hint_tokens():
    """UFT: own tokens of the hinted prompt as GRPO (w = 1_clip A rho); hint tokens with pi_ref = pi_theta and
    A = beta_h: w = beta_h, a token mean over the step's hint tokens. (The KL to pi_ref and the hint schedule, which
    changes the context, are outside the view.)"""
    uft = load_method("uft")
    logp, old, mask, adv = batch(13)
    g = torch.Generator().manual_seed(13)
    hint_logp = (-torch.rand(B, 4, generator=g) * 3).requires_grad_()
    hint_mask = (torch.arange(4)[None] < torch.tensor([4, 2, 0, 3, 1, 0])[:, None]).float()
    z, beta_h = mask.sum(), 0.05
    loss, _ = uft.uft_loss(logp, old, adv, mask, z, hint_logp=hint_logp, hint_mask=hint_mask,
                           hint_normalizer=hint_mask.sum(), hint_coef=beta_h, beta=0.0, entropy_coef=0.0,
                           eps_low=EPS_LOW, eps_high=EPS_HIGH)
    ratio = (logp - old).exp()
    check(loss, reference(stable(ratio, adv) * adv[:, None] * ratio, logp, mask, "token_mean", z), logp)
    ref_h = reference(torch.full_like(hint_logp, beta_h), hint_logp, hint_mask, "token_mean", hint_mask.sum())
    torch.testing.assert_close(grad(loss, hint_logp), grad(ref_h, hint_logp), atol=1e-6, rtol=1e-5)
