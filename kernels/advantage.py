"""Advantages, the PPO clipped surrogate, KL estimators and loss aggregation.

Shared by every rollout method so that they all use the same, tested arithmetic.
Everything is elementwise / scatter based: no `.item()`, no Python loop over groups
or tokens, so it runs unchanged on CPU and CUDA.

The normalisation convention (why `aggregate` takes a `normalizer`)
--------------------------------------------------------------------
A loss is a SUM over tokens (or sequences) divided by a count taken over the whole
optimizer step: all micro-batches of gradient accumulation and all ranks.  The
caller computes the local count of each micro-batch with `normalizer_count`, sums
it over its micro-batches, all-reduces (sum) it over ranks, and passes

    normalizer = global_count / world_size.

Why this gives exactly the gradient of one big batch: micro-batch m on rank r
contributes grad(S_{r,m}) * world_size / C, where S is its sum and C the global
count.  Gradient accumulation adds the micro-batches:  world_size * grad(S_r) / C.
DDP averages over ranks:  (1 / world_size) sum_r world_size * grad(S_r) / C
= grad(sum_r S_r) / C, the gradient of the full-batch loss S / C.  A per-micro-batch
mean (dividing by the local count) would instead weight tokens of short
micro-batches more, and would change with the way a batch is split.
"""
from __future__ import annotations

import torch

__all__ = [
    "group_advantages",
    "group_reward_std",
    "ppo_clip_loss",
    "kl_estimate",
    "aggregate",
    "normalizer_count",
    "reward_moments",
    "masked_mean",
    "AGGREGATION_MODES",
]

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "seq_sum", "micro_token_mean")


# ----------------------------------------------------------------------------------
# Group statistics
# ----------------------------------------------------------------------------------
def _group_stats(rewards, group_index, num_groups):
    """Per-sample centred reward r - mean_group, unbiased group std (0 for singletons).

    rewards (N,) float, group_index (N,) long in [0, num_groups).  Rewards are first
    shifted by their group's maximum (a standard trick for stable variances), so a
    group of identical rewards gives exactly 0 deviation and 0 std, with no rounding
    residue from computing its mean.  index_add_ / scatter_reduce: no Python loop.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both be (N,), got {tuple(rewards.shape)} and {tuple(group_index.shape)}"
        )
    r = rewards.float()
    gi = group_index.long()
    G = r.shape[0] if num_groups is None else int(num_groups)
    zeros = torch.zeros(G, dtype=torch.float32, device=r.device)
    shift = zeros.scatter_reduce(0, gi, r, reduce="amax", include_self=False)[gi]  # (N,) group max
    d = r - shift
    count = zeros.index_add(0, gi, torch.ones_like(r))  # (G,) group sizes
    mean_d = (zeros.index_add(0, gi, d) / count.clamp(min=1))[gi]
    centred = d - mean_d  # (N,) = r - mean_group(r)
    sq = zeros.index_add(0, gi, centred * centred)
    var = sq / (count - 1).clamp(min=1)  # unbiased; a singleton's sq is 0 -> std 0
    return centred, var.sqrt()[gi]


def group_reward_std(rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int | None = None):
    """Unbiased std of each sample's group, (N,) float32 (0 for singleton groups).

    Useful for "fraction of zero-std groups" metrics and DAPO-style filtering
    (keep groups with std > 0).  `num_groups` defaults to N, which is enough when the
    group ids are 0..G-1 (every id < N); pass it when ids may be larger.
    """
    return _group_stats(rewards, group_index, num_groups)[1]


def reward_moments(rewards: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of `rewards` as a (3,) float64 tensor: all-reduce (sum) it over ranks and pass
    it as `group_advantages(..., batch_moments=...)` to scale by the std of the whole batch of every rank."""
    r = rewards.double()
    return torch.stack([torch.tensor(float(r.numel()), dtype=torch.float64, device=r.device), r.sum(), (r * r).sum()])


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    scale: str = "group",
    eps: float = 1e-6,
    num_groups: int | None = None,
    batch_moments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group-relative advantages, (N,) float32.

        A_i = r_i - mean_{group(i)}(r)                      scale="none"   (Dr. GRPO)
        A_i = (r_i - mean_group) / (std_group + eps)        scale="group"  (GRPO)
        A_i = (r_i - mean_group) / (std_batch + eps)        scale="batch"  (PPO-Lite / TRL)

    std is the unbiased (n - 1) standard deviation, as `torch.std` in TRL and verl.
    Groups may have different sizes.  A singleton group gets advantage 0 (its reward
    equals its mean); verl / Trinity instead return r / (1 + eps) for singletons, TRL's
    zero-std groups give 0 as here.  `num_groups` as in `group_reward_std`.
    scale="batch": std_batch is taken over `rewards`, or, when `batch_moments` is given, over the batch those
    moments describe (`reward_moments` all-reduced over ranks: TRL gathers every process's rewards).
    """
    centred, std_group = _group_stats(rewards, group_index, num_groups)
    if scale == "none":
        return centred
    if scale == "group":
        std = std_group
    elif scale == "batch":
        n, s1, s2 = (reward_moments(rewards) if batch_moments is None else batch_moments.double()).unbind()
        var = (s2 - s1 * s1 / n.clamp(min=1)) / (n - 1).clamp(min=1)  # unbiased; 0 for a single sample
        std = var.clamp(min=0).sqrt().float()
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    # std == 0 means every centred value of that group is exactly 0: keep 0 even if eps == 0
    return torch.where(std > 0, centred / (std + eps), 0.0)


# ----------------------------------------------------------------------------------
# PPO clipped surrogate
# ----------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over mask == 1 as a 0-dim tensor (0 for an empty mask)."""
    v = values.float()
    if mask is None:
        return v.mean() if v.numel() else v.new_zeros(())
    m = mask.bool()
    return torch.where(m, v, 0.0).sum() / m.sum().clamp(min=1)


def ppo_clip_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float | None = 20.0,
    mask: torch.Tensor | None = None,
    *,
    clip_mode: str = "ppo",
    gppo_beta_low: float = 1.0,
    gppo_beta_high: float = 1.0,
):
    """Per-token PPO clipped surrogate (to be minimised) and its clip statistics.

    logp, old_logp (B, T); advantages (B,) (broadcast over T) or (B, T).

        ratio = exp(clamp(logp - old_logp, -c, c))           (c = log_ratio_clamp; None: no clamp)
        loss  = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
        dual clip (c2 = dual_clip > 1, Ye et al. 2020): where A < 0, loss = min(loss, -A c2)

    eps_high > eps_low is DAPO's "clip-higher".  The log-ratio clamp only guards
    exp() against overflow; with |logp - old_logp| < c it changes nothing.

    clip_mode="gppo" (Klear-Reasoner's GPPO, arXiv 2508.07629; Kwai-Klear/KlearReasoner verl/trainer/ppo/
    core_algos.py `compute_gppo_loss` @defde20 and `compute_gppo_loss_general_beta`): the clip bound is written
    as (1 +- eps) * ratio / sg(ratio), whose VALUE is the bound and whose GRADIENT is (1 +- eps) grad log pi, so
    a clipped token keeps a bounded gradient (b_l = gppo_beta_low, b_h = gppo_beta_high, sg = stop-gradient):
        A > 0, ratio > 1 + eps_high      loss = -b_h (1 + eps_high) A ratio / sg(ratio)   (PPO: gradient 0)
        A < 0, ratio < 1 - eps_low       loss = -b_l (1 - eps_low) A ratio / sg(ratio)    (PPO: gradient 0)
        elsewhere                        loss = -A ratio                                  (as PPO)
        then the dual clip as above: A < 0, -A ratio > -A c2 -> loss = -A c2 (value capped, gradient 0)
    With b_l = b_h = 1 the value equals PPO's everywhere; only the gradient differs. Clamping with float bounds
    (ratio.clamp(1 - eps, 1 + eps)) would give PPO's zero gradient back: the bound must carry ratio / sg(ratio).

    Returns (per_token_loss (B, T) float32, metrics) with 0-dim tensor metrics, masked
    means over `mask` (all tokens if None):
      clip_frac_low   ratio < 1 - eps_low and A < 0  (lower clip active: no gradient; gppo: scaled gradient)
      clip_frac_high  ratio > 1 + eps_high and A > 0 (upper clip active: no gradient; gppo: scaled gradient)
      dual_clip_frac  A < 0 and the dual clip bound is the active term
      ratio_mean      mean ratio
    """
    if logp.shape != old_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and old_logp {tuple(old_logp.shape)} differ")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if clip_mode not in ("ppo", "gppo"):
        raise ValueError(f"clip_mode must be 'ppo' or 'gppo', got {clip_mode!r}")
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv[:, None]  # (B, 1) -> broadcast over T
    adv = adv.expand_as(logp)
    log_ratio = logp.float() - old_logp.float()
    if log_ratio_clamp is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = log_ratio.exp()  # (B, T)
    unclipped = -adv * ratio
    if clip_mode == "gppo":  # value of the bound, gradient (1 +- eps) grad log pi: ratio / sg(ratio) has value 1
        keep = (log_ratio - log_ratio.detach()).exp()  # = ratio / sg(ratio), without 0 / 0 where ratio underflows
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        loss = torch.where(high, -adv * (gppo_beta_high * (1.0 + eps_high)) * keep, unclipped)
        loss = torch.where(low, -adv * (gppo_beta_low * (1.0 - eps_low)) * keep, loss)
    else:
        clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
        loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (loss > bound)
        loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)
    else:
        dual_active = torch.zeros_like(loss, dtype=torch.bool)
    with torch.no_grad():
        metrics = {
            "clip_frac_low": masked_mean(((ratio < 1.0 - eps_low) & (adv < 0)).float(), mask),
            "clip_frac_high": masked_mean(((ratio > 1.0 + eps_high) & (adv > 0)).float(), mask),
            "dual_clip_frac": masked_mean(dual_active.float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------
def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token single-sample estimators of KL(pi || pi_ref) (Schulman, "Approximating
    KL divergence"), tokens sampled from pi, float32, same shape as the inputs.

        k1 = logp - ref_logp                   unbiased value; its expected gradient
                                               on-policy is 0 (E_pi[grad log pi] = 0)
        k2 = 0.5 (logp - ref_logp)^2           gradient (logp - ref) grad log pi, whose
                                               expectation is the reverse-KL gradient
                                               grad KL(pi || pi_ref)
        k3 = exp(d) - d - 1,  d = ref - logp   verl "low_var_kl": unbiased, >= 0; gradient
             (d clamped to [-20, 20], k3 to    (1 - pi_ref / pi) grad log pi, whose expectation
             [-10, 10] as in verl)             is the forward-KL gradient grad KL(pi_ref || pi)
    """
    diff = logp.float() - ref_logp.float()
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff * diff
    if kind == "k3":
        d = (-diff).clamp(-20.0, 20.0)
        return (d.exp() - d - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kind must be 'k1', 'k2' or 'k3', got {kind!r}")


# ----------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------
def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    normalizer,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce per-token values (B, T) to a 0-dim loss with a GLOBAL normalizer.

    `normalizer` = (count over all micro-batches and ranks of the optimizer step) /
    world_size, see the module docstring; the local counts come from
    `normalizer_count(mask, mode)`.  With n_i = sum_t mask[i, t]:

      token_mean               sum_{i,t} v m / normalizer               (normalizer: tokens)
      seq_mean_token_mean      sum_i [sum_t v m / max(n_i, 1)] / normalizer  (sequences)
      seq_mean_token_sum_norm  sum_i [sum_t v m / max_len] / normalizer      (sequences; Dr. GRPO,
                               max_len a constant, required)
      seq_sum                  sum_{i,t} v m / normalizer               (sequences)
      micro_token_mean         [sum_{i,t} v m / max(sum m, 1)] / normalizer  (micro-batches: a LOCAL token mean
                               per micro-batch, then / grad_accum; the pre-Oct-2024 transformers behaviour and the
                               official DFT code. It weights a token by the inverse size of its micro-batch, so the
                               gradient depends on how the step is split; kept to reproduce old runs)

    All-masked sequences add 0 to the numerator; they are counted in the normalizer
    because the caller counts rows (TRL counts them too, verl's seq-mean excludes them).
    Masked-out entries are ignored even if they hold inf / nan.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.bool()
    v = torch.where(m, values.float(), 0.0)  # (B, T)
    if mode in ("token_mean", "seq_sum"):
        total = v.sum()
    elif mode == "seq_mean_token_mean":
        total = (v.sum(-1) / m.sum(-1).clamp(min=1)).sum()
    elif mode == "micro_token_mean":
        total = v.sum() / m.sum().clamp(min=1)
    elif mode == "seq_mean_token_sum_norm":
        if max_len is None:
            raise ValueError("mode 'seq_mean_token_sum_norm' needs max_len (a constant, e.g. the max response length)")
        total = v.sum() / float(max_len)
    else:
        raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")
    # a step that counts no token at all (e.g. --mask-truncated with every completion truncated) has total 0: it
    # gives 0, not 0 / 0 = nan; any normalizer > 0 is used as it is
    z = torch.as_tensor(normalizer, dtype=torch.float32, device=total.device)
    return total / z.clamp(min=torch.finfo(torch.float32).tiny)


def normalizer_count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """LOCAL count of this micro-batch for `aggregate`'s normalizer, 0-dim float32:
    masked tokens for "token_mean", 1 (the micro-batch itself) for "micro_token_mean",
    rows (sequences, including all-masked ones) otherwise.  Sum over micro-batches,
    all-reduce over ranks, divide by world size."""
    if mode == "token_mean":
        return mask.float().sum()
    if mode == "micro_token_mean":
        return torch.ones((), device=mask.device)
    if mode in AGGREGATION_MODES:
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    raise ValueError(f"mode must be one of {AGGREGATION_MODES}, got {mode!r}")
