"""Fused, chunked log-probabilities of an LM head, with hand-written backward passes.

Every post-training loss in this project needs per-token quantities of the policy
distribution pi(. | prefix) = softmax(z / T) with logits z = h W^T + b:

    log p(target)  = z_t / T - logsumexp(z / T)                 (fused_logprobs)
    entropy        = -sum_v p_v log p_v                           (fused_logprobs)
    KL(ref || pi)  = sum_v p_ref,v (log p_ref,v - log p_v)       (full_vocab_kl, ASFT)
    E_w[log p]     = sum_a w(a) log p(a)                          (expected_reward_logprob, OTR)
    draws a ~ softmax(z / kappa)                                  (sample_tokens, OTR)

The obvious way builds the (N, V) logits, their log-softmax, and in the backward
pass one or two more (N, V) gradients.  With V = 151,936 (Qwen2) that is 0.6 GB
per 1,024 tokens per buffer, and sweeping those buffers through memory costs as
much time as the matmul itself.  The kernels here never hold more than one
(chunk x vocab_chunk) tile of logits (two for entropy / KL / OTR):

* the rows (tokens) are processed `chunk_size` at a time and the vocabulary
  `vocab_chunk_size` columns at a time ("2-D tiling");
* the forward pass keeps, per token, only the log-sum-exp (and the entropy when
  asked), which are exact combinations of per-block statistics (see
  `_merge_blocks`);
* the backward pass recomputes each tile of logits in fp32 and turns it in place
  into dL/dz, then accumulates dL/dh (chunk x d) and dL/dW (V x d, fp32) with two
  matmuls.  Per token and vocabulary entry this is 8 d FLOPs (forward 2, backward
  2 + 2 + 2) instead of 6 d for the naive path, but it touches no (N, V) buffer.

Precision: matmuls, softmax statistics and all accumulations are fp32 whatever
the input dtype (bf16 / fp16 / fp32); only the returned gradients are cast back to
the dtype of the input they belong to.  Autocast is switched off inside.

Device friendliness: no `.item()`, no data-dependent Python branching; Python loops
only over chunks (token chunks and vocabulary blocks), never over tokens.  Tiles are
preallocated once per call and reused through `out=` / in-place ops, which matters
on CPU where every fresh large allocation costs page faults.

Every kernel has a `naive_*` twin: plain fp32 logits -> log_softmax -> gather with
ordinary autograd.  The twins are the references for the tests and the benchmark.

`FusedLM` wraps a Hugging Face causal LM so that the fused head runs inside the
forward of the module that DDP / FSDP2 wrap (their gradient hooks and the
unsharding of the root parameters, embeddings and lm_head, need that).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "fused_logprobs",
    "naive_logprobs",
    "full_vocab_kl",
    "naive_full_vocab_kl",
    "expected_reward_logprob",
    "naive_expected_reward_logprob",
    "sample_tokens",
    "naive_sample_tokens",
    "FusedLM",
    "response_hidden",
    "target_positions",
    "default_position_ids",
]


# ----------------------------------------------------------------------------------
# Small helpers shared by the kernels
# ----------------------------------------------------------------------------------
def _default_vocab_chunk(device: torch.device) -> int:
    """Columns per vocabulary block.  8192 keeps a 1024-token tile at 32 MB on CPU
    (measured as fast as full-width tiles); on GPUs wider blocks mean fewer kernel
    launches."""
    return 8192 if device.type == "cpu" else 32768


def _spans(n: int, size: int):
    """Yield (start, end) of consecutive chunks of `size` covering range(n)."""
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _no_autocast(t: torch.Tensor):
    """The kernels choose their own precision (fp32); an outer autocast must not
    silently turn their matmuls into bf16."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _tile_buffer(rows: int, cols: int, device) -> torch.Tensor:
    """Flat fp32 storage for one (rows x cols) tile; smaller tiles are carved from
    its front so that every view is contiguous (required by `out=`)."""
    return torch.empty(rows * cols, dtype=torch.float32, device=device)


def _logits_block(buf, x, weight, bias, v0, v1, scale):
    """Tile of scaled logits for vocabulary columns [v0, v1).

    x:      (n, d) fp32, already multiplied by `scale` (= 1 / temperature)
    weight: (V, d) any dtype; only the block is upcast to fp32
    bias:   (V,) or None (multiplied by `scale` here)
    Returns z (n, v1 - v0) fp32, a view of `buf`, and the fp32 weight block (w, d).
    """
    n = x.shape[0]
    w_blk = weight[v0:v1].float()  # (w, d); a no-op view when weight is fp32
    z = buf[: n * (v1 - v0)].view(n, v1 - v0)
    if bias is None:
        torch.mm(x, w_blk.t(), out=z)
    else:
        torch.addmm(bias[v0:v1].float(), x, w_blk.t(), beta=scale, out=z)
    return z, w_blk


def _gather_block(z, t, v0, v1):
    """z[i, t[i, k] - v0] where the target falls in block [v0, v1), else 0.

    z: (n, w) tile; t: (n, K) global token ids.  Returns (n, K).  Summing this over
    all blocks gathers each target's logit exactly once, without a branch.
    """
    inside = (t >= v0) & (t < v1)
    idx = (t - v0).clamp(0, v1 - v0 - 1)
    return torch.where(inside, z.gather(1, idx), 0.0)


def _log_softmax_(z):
    """In place z <- log_softmax(z, -1) within the block; returns its row log-sum-exp (n,).

    `torch.log_softmax(z, out=z)` is safe: each row's max and sum are computed before
    that row is written.  The row maximum of the result is exactly -log(sum exp(z - m)),
    so lse = m - max(result) comes out with no extra exp pass.
    """
    m = z.amax(-1)
    torch.log_softmax(z, -1, out=z)
    return m - z.amax(-1)


def _lse_(z):
    """Row log-sum-exp of the tile (n,), overwriting z with exp(z - rowmax).
    Cheaper than `_log_softmax_` when the log-probabilities themselves are not needed."""
    m = z.amax(-1, keepdim=True)
    s = z.sub_(m).exp_().sum(-1)
    return m[:, 0] + s.log()


def _mm_into(dst, a, b, accumulate):
    """dst = a @ b, or dst += a @ b when `accumulate`; no temporary either way.

    Gradient buffers start as `torch.empty` and the first block writes them, which
    saves a zero-fill pass over the (V x d) weight gradient."""
    if accumulate:
        dst.addmm_(a, b)
    else:
        torch.mm(a, b, out=dst)


def _mv_into(dst, a, x, accumulate):
    """dst = a @ x, or dst += a @ x when `accumulate` (bias gradients)."""
    if accumulate:
        dst.addmv_(a, x)
    else:
        torch.mv(a, x, out=dst)


def _grad_buffers(N, d, V, need_h, need_w, need_b, device):
    """Uninitialised fp32 gradient buffers (zeros when there are no rows to write them)."""
    new = torch.zeros if N == 0 else torch.empty
    f32 = dict(dtype=torch.float32, device=device)
    return (new(N, d, **f32) if need_h else None, new(V, d, **f32) if need_w else None,
            new(V, **f32) if need_b else None)


def _combine_repeats(t, vals):
    """Make a later scatter-add order-independent: vals (n, K) for targets t (n, K).

    Where a token repeats within a row (K samples drawn with replacement), the row is
    sorted by token (stable) and the last occurrence of each token gets the sum of its
    repeats' values (a difference of running sums along the sorted row), the others an
    exact 0.0. Each (row, token) then receives at most one non-zero addend, so the
    scatter-add cannot depend on thread order (bit-reproducible runs, CPU and CUDA),
    and no host sync is needed. O(n K log K) work. Returns (sorted targets, values).
    """
    K = t.shape[1]
    if K == 1:
        return t, vals
    ts, perm = t.sort(dim=1, stable=True)  # (n, K)
    cs = vals.gather(1, perm).cumsum(1)  # running sums in sorted order
    new = torch.ones_like(ts, dtype=torch.bool)
    new[:, 1:] = ts[:, 1:] != ts[:, :-1]  # first occurrence of a token
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]  # last occurrence of a token
    ar = torch.arange(K, device=t.device).expand_as(ts)
    start = torch.where(new, ar, 0).cummax(1).values  # index of the first occurrence
    before = torch.cat([torch.zeros_like(cs[:, :1]), cs[:, :-1]], 1).gather(1, start)  # running sum before it
    return ts, torch.where(last, cs - before, 0.0)


def _scatter_block_(z, t, vals, v0, v1):
    """z[i, t[i, k] - v0] += vals[i, k] for the targets inside block [v0, v1).

    Targets outside the block add an exact 0.0 at a clamped column, which changes
    nothing, so no branch (and no host sync) is needed."""
    inside = (t >= v0) & (t < v1)
    idx = (t - v0).clamp(0, v1 - v0 - 1)
    z.scatter_add_(1, idx, torch.where(inside, vals, 0.0))


def _rowdot_(a, b):
    """sum_v a[:, v] * b[:, v], overwriting `a` (no temporary tile)."""
    return a.mul_(b).sum(-1)


def _merge_blocks(lse_b, ent_b=None):
    """Combine per-block statistics into whole-vocabulary ones.

    lse_b: (nb, n) log-sum-exp of each vocabulary block; ent_b: (nb, n) entropy of
    the block-local softmax p^b.  With block masses w_b = exp(lse_b - lse):

        lse = logsumexp_b lse_b
        H   = sum_b w_b H_b  -  sum_b w_b log w_b        (chain rule of entropy)

    Both terms are non-negative, so the entropy has no cancellation even when the
    logits are large.  Returns lse (n,) and H (n,) or None.
    """
    lse = torch.logsumexp(lse_b, 0)
    if ent_b is None:
        return lse, None
    log_w = lse_b - lse
    ent = (log_w.exp() * (ent_b - log_w)).sum(0)
    return lse, ent


def _check_rows(name, t, n):
    if t.dim() < 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have {n} rows (one per hidden state), got shape {tuple(t.shape)}")


def _check_head(hidden, weight, bias):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, d), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, d={hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V={weight.shape[0]},), got shape {tuple(bias.shape)}")


def _check_targets(targets, vocab):
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    # Asynchronous on CUDA (no host sync); an out-of-range id would otherwise be
    # silently treated as a logit of 0.
    torch._assert_async(((targets >= 0) & (targets < vocab)).all(), "target token id outside [0, V)")


def _check_chunks(chunk_size, vocab_chunk_size):
    if int(chunk_size) < 1 or int(vocab_chunk_size) < 1:
        raise ValueError(f"chunk sizes must be positive, got {chunk_size} and {vocab_chunk_size}")


# ----------------------------------------------------------------------------------
# 1. log p(target) (+ entropy) at a temperature
# ----------------------------------------------------------------------------------
class _FusedLogprobs(torch.autograd.Function):
    """log softmax(z / T)[targets] and entropy of softmax(z / T), z = h W^T + b.

    Backward.  With p = softmax(z / T), upstream gradients g (N, K) for the log-probs
    and g_H (N,) for the entropy, and G = sum_k g_k:

        d log p_t / d(z/T)_v = 1[v = t] - p_v
        d H / d(z/T)_v       = -p_v (log p_v + H)
        dL/dz_v = (1/T) [ sum_k g_k 1[v = t_k]  +  p_v (c - g_H log p_v) ],  c = -G - g_H H

    Each tile is turned in place into dL/dz (the one-hot part is a scatter-add of K
    entries per row into the tile), then  dh += dz W_blk  and  dW_blk += dz^T h.
    Putting the one-hot part into the tile (rather than scatter-adding (n x d) rows
    into dW afterwards, where different rows collide on the same token) keeps the
    weight gradient bit-reproducible without sorting or host syncs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, vocab_chunk, with_entropy):
        # hidden (N, d) ; weight (V, d) ; bias (V,) | None ; targets (N, K) long
        with _no_autocast(hidden):
            N, V, K = hidden.shape[0], weight.shape[0], targets.shape[1]
            dev = hidden.device
            inv_t = 1.0 / temperature
            nb = -(-V // vocab_chunk)  # number of vocabulary blocks
            logp = torch.empty(N, K, dtype=torch.float32, device=dev)
            lse = torch.empty(N, dtype=torch.float32, device=dev)
            ent = torch.empty(N if with_entropy else 0, dtype=torch.float32, device=dev)
            rows, cols = min(chunk_size, N), min(vocab_chunk, V)
            buf = _tile_buffer(rows, cols, dev)
            tmp = _tile_buffer(rows, cols, dev) if with_entropy else None

            for c0, c1 in _spans(N, chunk_size):
                n = c1 - c0
                x = hidden[c0:c1].float() * inv_t  # (n, d), temperature folded in
                t = targets[c0:c1]  # (n, K)
                z_t = torch.zeros(n, K, dtype=torch.float32, device=dev)  # target logits / T
                lse_b = torch.empty(nb, n, dtype=torch.float32, device=dev)
                ent_b = torch.empty(nb, n, dtype=torch.float32, device=dev) if with_entropy else None
                for b, (v0, v1) in enumerate(_spans(V, vocab_chunk)):
                    z, _ = _logits_block(buf, x, weight, bias, v0, v1, inv_t)  # (n, w)
                    z_t += _gather_block(z, t, v0, v1)
                    if with_entropy:
                        lse_b[b] = _log_softmax_(z)  # z <- block-local log p^b
                        p = torch.exp(z, out=tmp[: z.numel()].view_as(z))
                        ent_b[b] = -_rowdot_(p, z)  # H_b = -sum p^b log p^b
                    else:
                        lse_b[b] = _lse_(z)
                lse_c, ent_c = _merge_blocks(lse_b, ent_b)
                lse[c0:c1] = lse_c
                logp[c0:c1] = z_t - lse_c[:, None]
                if with_entropy:
                    ent[c0:c1] = ent_c

        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.cfg = (inv_t, chunk_size, vocab_chunk, with_entropy)
        ctx.set_materialize_grads(False)
        if not with_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        inv_t, chunk_size, vocab_chunk, with_entropy = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        use_ent = with_entropy and g_ent is not None
        N, d = hidden.shape
        V, K = weight.shape[0], targets.shape[1]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        dh, dW, db = _grad_buffers(N, d, V, need_h, need_w, need_b, dev)  # fp32 accumulators

        with _no_autocast(hidden):
            if g_logp is None and not use_ent:  # nothing flows back
                for grad in (dh, dW, db):
                    if grad is not None:
                        grad.zero_()
            else:
                rows, cols = min(chunk_size, N), min(vocab_chunk, V)
                buf = _tile_buffer(rows, cols, dev)
                tmp = _tile_buffer(rows, cols, dev) if use_ent else None
                ones = torch.ones(rows, **f32)  # column sums of a tile as a matrix-vector product
                for c0, c1 in _spans(N, chunk_size):
                    n = c1 - c0
                    h = hidden[c0:c1].float()  # (n, d)
                    x = h * inv_t
                    t = targets[c0:c1]  # (n, K)
                    lse_c = lse[c0:c1, None]  # (n, 1)
                    g = g_logp[c0:c1].float() if g_logp is not None else torch.zeros(n, K, **f32)
                    # row coefficient c / T  with  c = -G - g_H H
                    c_row = -g.sum(1)
                    if use_ent:
                        g_h = g_ent[c0:c1].float()
                        c_row = c_row - g_h * ent[c0:c1]
                        g_h_col = (g_h * inv_t)[:, None]
                    c_col = (c_row * inv_t)[:, None]  # (n, 1)
                    t, onehot = _combine_repeats(t, g * inv_t)  # (n, K): g_k / T at column t_k
                    acc = dh[c0:c1] if need_h else None  # dL/dh rows of this chunk (n, d)
                    more = c0 > 0  # dW, db already hold earlier chunks

                    for v0, v1 in _spans(V, vocab_chunk):
                        z, w_blk = _logits_block(buf, x, weight, bias, v0, v1, inv_t)
                        z.sub_(lse_c)  # log p   (n, w)
                        if use_ent:
                            p = torch.exp(z, out=tmp[: z.numel()].view_as(z))
                            # z <- p * (c/T - (g_H/T) log p)
                            torch.addcmul(c_col, z, g_h_col, value=-1.0, out=z).mul_(p)
                        else:
                            z.exp_().mul_(c_col)  # p * c/T
                        _scatter_block_(z, t, onehot, v0, v1)  # z = dL/dz for this block
                        if need_h:
                            _mm_into(acc, z, w_blk, v0 > 0)
                        if need_w:
                            _mm_into(dW[v0:v1], z.t(), h, more)
                        if need_b:
                            _mv_into(db[v0:v1], z.t(), ones[:n], more)

        grad_h = dh.to(hidden.dtype) if need_h else None
        grad_w = dW.to(weight.dtype) if need_w else None
        grad_b = db.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    vocab_chunk_size: int | None = None,
):
    """Log-probabilities of `targets` (and entropy) under softmax((h W^T + b) / T).

    hidden (N, d) any float dtype; weight (V, d); bias (V,) or None;
    targets (N,) or (N, K) long (K > 1: several tokens scored per position).
    Returns (logp, entropy): logp float32 with the shape of `targets`; entropy
    float32 (N,) of the whole softmax(z / T), or None unless `with_entropy`.
    Gradients flow to hidden, weight and bias from both outputs.

    Peak extra memory: one (chunk_size x vocab_chunk_size) fp32 tile (two with
    entropy) plus, in backward, the fp32 weight-gradient accumulator (V x d).
    """
    _check_head(hidden, weight, bias)
    _check_rows("targets", targets, hidden.shape[0])
    _check_targets(targets, weight.shape[0])
    vocab_chunk = vocab_chunk_size or _default_vocab_chunk(hidden.device)
    _check_chunks(chunk_size, vocab_chunk)
    t2 = (targets[:, None] if targets.dim() == 1 else targets).long()  # (N, K)
    logp, ent = _FusedLogprobs.apply(
        hidden, weight, bias, t2, float(temperature), int(chunk_size), int(vocab_chunk), bool(with_entropy)
    )
    return logp.reshape(targets.shape), (ent if with_entropy else None)


def naive_logprobs(hidden, weight, targets, bias=None, temperature=1.0, chunk_size=1024, with_entropy=False):
    """Reference for `fused_logprobs`: full fp32 (N, V) logits -> log_softmax -> gather.
    `chunk_size` is accepted for signature compatibility and ignored."""
    z = hidden.float() @ weight.float().t()  # (N, V)
    if bias is not None:
        z = z + bias.float()
    if temperature != 1.0:
        z = z / temperature
    logp_all = z.log_softmax(-1)  # (N, V)
    t2 = (targets[:, None] if targets.dim() == 1 else targets).long()
    logp = logp_all.gather(1, t2).reshape(targets.shape)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, ent


# ----------------------------------------------------------------------------------
# 2. Full-vocabulary forward KL(pi_ref || pi_theta)  (ASFT)
# ----------------------------------------------------------------------------------
class _FullVocabKL(torch.autograd.Function):
    """KL(p_ref || p) = sum_v p_ref,v (log p_ref,v - log p_v) per token, temperature 1.

    Forward, block by block: with block-local distributions p^b, p_ref^b and block
    masses w_b = exp(lse_b - lse), w^ref_b likewise, the chain rule of KL gives

        KL = sum_b w^ref_b [ KL(p_ref^b || p^b) + log w^ref_b - log w_b ].

    Backward (the reference is a constant):  dKL/dz_v = p_v - p_ref,v.
    Both tiles are recomputed, so this kernel costs 6 matmul passes per element
    (forward 2, backward 2 recomputes + 2 gradients).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, chunk_size, vocab_chunk):
        with _no_autocast(hidden):
            N, V = hidden.shape[0], weight.shape[0]
            dev = hidden.device
            nb = -(-V // vocab_chunk)
            kl = torch.empty(N, dtype=torch.float32, device=dev)
            lse = torch.empty(N, dtype=torch.float32, device=dev)
            lse_ref = torch.empty(N, dtype=torch.float32, device=dev)
            rows, cols = min(chunk_size, N), min(vocab_chunk, V)
            buf = _tile_buffer(rows, cols, dev)
            buf_ref = _tile_buffer(rows, cols, dev)

            for c0, c1 in _spans(N, chunk_size):
                n = c1 - c0
                x = hidden[c0:c1].float()  # (n, d)
                x_ref = ref_hidden[c0:c1].float()  # (n, d_ref)
                stats = torch.empty(3, nb, n, dtype=torch.float32, device=dev)
                lse_b, lse_ref_b, kl_b = stats[0], stats[1], stats[2]
                for b, (v0, v1) in enumerate(_spans(V, vocab_chunk)):
                    z, _ = _logits_block(buf, x, weight, bias, v0, v1, 1.0)
                    z_ref, _ = _logits_block(buf_ref, x_ref, ref_weight, ref_bias, v0, v1, 1.0)
                    lse_b[b] = _log_softmax_(z)  # z <- log p^b
                    lse_ref_b[b] = _log_softmax_(z_ref)  # z_ref <- log p_ref^b
                    torch.sub(z_ref, z, out=z)  # z <- log p_ref^b - log p^b
                    kl_b[b] = _rowdot_(z_ref.exp_(), z)  # KL(p_ref^b || p^b)
                lse_c, _ = _merge_blocks(lse_b)
                lse_ref_c, _ = _merge_blocks(lse_ref_b)
                log_w = lse_b - lse_c  # (nb, n)
                log_w_ref = lse_ref_b - lse_ref_c
                kl[c0:c1] = (log_w_ref.exp() * (kl_b + log_w_ref - log_w)).sum(0)
                lse[c0:c1] = lse_c
                lse_ref[c0:c1] = lse_ref_c

        ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, lse_ref)
        ctx.cfg = (chunk_size, vocab_chunk)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g_kl):
        hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, lse_ref = ctx.saved_tensors
        chunk_size, vocab_chunk = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, d = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        dh, dW, db = _grad_buffers(N, d, V, need_h, need_w, need_b, dev)

        with _no_autocast(hidden):
            rows, cols = min(chunk_size, N), min(vocab_chunk, V)
            buf = _tile_buffer(rows, cols, dev)
            buf_ref = _tile_buffer(rows, cols, dev)
            for c0, c1 in _spans(N, chunk_size):
                n = c1 - c0
                h = hidden[c0:c1].float()
                x_ref = ref_hidden[c0:c1].float()
                g = g_kl[c0:c1].float()  # (n,)
                h_scaled = h * g[:, None]  # upstream grad folded into the (n x d) operand
                acc = torch.empty(n, d, **f32)
                more = c0 > 0
                for v0, v1 in _spans(V, vocab_chunk):
                    z, w_blk = _logits_block(buf, h, weight, bias, v0, v1, 1.0)
                    z_ref, _ = _logits_block(buf_ref, x_ref, ref_weight, ref_bias, v0, v1, 1.0)
                    z.sub_(lse[c0:c1, None]).exp_()  # p
                    z_ref.sub_(lse_ref[c0:c1, None]).exp_()  # p_ref
                    z.sub_(z_ref)  # p - p_ref   (n, w)
                    if need_h:
                        _mm_into(acc, z, w_blk, v0 > 0)
                    if need_w:
                        _mm_into(dW[v0:v1], z.t(), h_scaled, more)
                    if need_b:
                        _mv_into(db[v0:v1], z.t(), g, more)
                if need_h:
                    dh[c0:c1] = acc.mul_(g[:, None])

        grad_h = dh.to(hidden.dtype) if need_h else None
        grad_w = dW.to(weight.dtype) if need_w else None
        grad_b = db.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def full_vocab_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    vocab_chunk_size: int | None = None,
):
    """Per-token forward KL(pi_ref || pi_theta) over the whole vocabulary, (N,) float32.

    pi_theta = softmax(hidden W^T + bias), pi_ref = softmax(ref_hidden ref_W^T + ref_bias)
    (temperature 1; the two may have different hidden sizes but share V).  Gradients
    flow to hidden, weight and bias; the reference side is a constant (never gets a
    gradient, even if its tensors require one).  dKL/dz = p_theta - p_ref.
    """
    _check_head(hidden, weight, bias)
    _check_head(ref_hidden, ref_weight, ref_bias)
    _check_rows("ref_hidden", ref_hidden, hidden.shape[0])
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"policy and reference vocabularies differ: {weight.shape[0]} vs {ref_weight.shape[0]}")
    vocab_chunk = vocab_chunk_size or _default_vocab_chunk(hidden.device)
    _check_chunks(chunk_size, vocab_chunk)
    return _FullVocabKL.apply(
        hidden, weight, bias, ref_hidden.detach(), ref_weight.detach(),
        None if ref_bias is None else ref_bias.detach(), int(chunk_size), int(vocab_chunk),
    )


def naive_full_vocab_kl(hidden, weight, ref_hidden, ref_weight, bias=None, ref_bias=None, chunk_size=1024):
    """Reference for `full_vocab_kl` with full fp32 (N, V) tensors."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    with torch.no_grad():
        z_ref = ref_hidden.float() @ ref_weight.float().t()
        if ref_bias is not None:
            z_ref = z_ref + ref_bias.float()
        logp_ref = z_ref.log_softmax(-1)
    return (logp_ref.exp() * (logp_ref - z.log_softmax(-1))).sum(-1)


# ----------------------------------------------------------------------------------
# 3. Closed-form expected reward-weighted log-likelihood (OTR)
# ----------------------------------------------------------------------------------
class _ExpectedRewardLogprob(torch.autograd.Function):
    """out = sum_a w(a) log p(a),  p = softmax(z),  q = sg(softmax(z / kappa)),
    w(a) = beta q(a) for a != t,  w(t) = q(t);  i.e.  w = beta q + (1 - beta) q_t 1[a = t].

        out = beta sum_a q_a log p_a + (1 - beta) q_t log p_t
        d out / dz = w - S p,   S = sum_a w_a = beta + (1 - beta) q_t.

    Forward per block: sum_{a in b} q_a log p_a = wq_b (C_b + lse_b - lse), with
    C_b = sum q^b log p^b over the block-local distributions and wq_b the q-mass of
    the block; no (N, V) tensor and no large cancellations.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kappa, beta, chunk_size, vocab_chunk):
        # hidden (N, d) ; weight (V, d) ; targets (N,) long
        with _no_autocast(hidden):
            N, V = hidden.shape[0], weight.shape[0]
            dev = hidden.device
            nb = -(-V // vocab_chunk)
            out = torch.empty(N, dtype=torch.float32, device=dev)
            lse = torch.empty(N, dtype=torch.float32, device=dev)
            lse_q = torch.empty(N, dtype=torch.float32, device=dev)
            q_t = torch.empty(N, dtype=torch.float32, device=dev)
            rows, cols = min(chunk_size, N), min(vocab_chunk, V)
            buf = _tile_buffer(rows, cols, dev)
            buf_q = _tile_buffer(rows, cols, dev)

            for c0, c1 in _spans(N, chunk_size):
                n = c1 - c0
                x = hidden[c0:c1].float()
                t = targets[c0:c1, None]  # (n, 1)
                z_t = torch.zeros(n, 1, dtype=torch.float32, device=dev)
                stats = torch.empty(3, nb, n, dtype=torch.float32, device=dev)
                lse_b, lse_q_b, c_b = stats[0], stats[1], stats[2]
                for b, (v0, v1) in enumerate(_spans(V, vocab_chunk)):
                    z, _ = _logits_block(buf, x, weight, bias, v0, v1, 1.0)
                    z_t += _gather_block(z, t, v0, v1)
                    zq = torch.mul(z, 1.0 / kappa, out=buf_q[: z.numel()].view_as(z))  # z / kappa
                    lse_b[b] = _log_softmax_(z)  # z <- log p^b
                    lse_q_b[b] = _log_softmax_(zq)  # zq <- log q^b
                    c_b[b] = _rowdot_(zq.exp_(), z)  # C_b = sum q^b log p^b
                lse_c, _ = _merge_blocks(lse_b)
                lse_q_c, _ = _merge_blocks(lse_q_b)
                e_q_logp = ((lse_q_b - lse_q_c).exp() * (c_b + lse_b - lse_c)).sum(0)  # sum_a q_a log p_a
                z_t = z_t[:, 0]
                logp_t = z_t - lse_c
                qt = (z_t / kappa - lse_q_c).exp()
                out[c0:c1] = beta * e_q_logp + (1.0 - beta) * qt * logp_t
                lse[c0:c1], lse_q[c0:c1], q_t[c0:c1] = lse_c, lse_q_c, qt

        ctx.save_for_backward(hidden, weight, bias, targets, lse, lse_q, q_t)
        ctx.cfg = (kappa, beta, chunk_size, vocab_chunk)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):
        hidden, weight, bias, targets, lse, lse_q, q_t = ctx.saved_tensors
        kappa, beta, chunk_size, vocab_chunk = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, d = hidden.shape
        V = weight.shape[0]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        dh, dW, db = _grad_buffers(N, d, V, need_h, need_w, need_b, dev)

        with _no_autocast(hidden):
            rows, cols = min(chunk_size, N), min(vocab_chunk, V)
            buf = _tile_buffer(rows, cols, dev)
            buf_q = _tile_buffer(rows, cols, dev)
            for c0, c1 in _spans(N, chunk_size):
                n = c1 - c0
                h = hidden[c0:c1].float()
                t = targets[c0:c1]
                g = g_out[c0:c1].float()  # (n,)
                qt = q_t[c0:c1]
                s_col = (beta + (1.0 - beta) * qt)[:, None]  # S = sum_a w_a
                onehot = ((1.0 - beta) * qt)[:, None]  # (n, 1) extra weight of the target
                h_scaled = h * g[:, None]
                acc = torch.empty(n, d, **f32)
                more = c0 > 0
                for v0, v1 in _spans(V, vocab_chunk):
                    z, w_blk = _logits_block(buf, h, weight, bias, v0, v1, 1.0)
                    q = torch.mul(z, 1.0 / kappa, out=buf_q[: z.numel()].view_as(z))
                    q.sub_(lse_q[c0:c1, None]).exp_()  # q
                    z.sub_(lse[c0:c1, None]).exp_()  # p
                    z.mul_(s_col).neg_().add_(q, alpha=beta)  # beta q - S p   (n, w)
                    _scatter_block_(z, t[:, None], onehot, v0, v1)  # + (1 - beta) q_t at the target
                    if need_h:
                        _mm_into(acc, z, w_blk, v0 > 0)
                    if need_w:
                        _mm_into(dW[v0:v1], z.t(), h_scaled, more)
                    if need_b:
                        _mv_into(db[v0:v1], z.t(), g, more)
                if need_h:
                    dh[c0:c1] = acc.mul_(g[:, None])

        grad_h = dh.to(hidden.dtype) if need_h else None
        grad_w = dW.to(weight.dtype) if need_w else None
        grad_b = db.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def expected_reward_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    kappa: float,
    beta: float,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    vocab_chunk_size: int | None = None,
):
    """OTR's exact expectation  sum_a w(a) log pi_theta(a),  (N,) float32.

    q = softmax(logits / kappa) without gradient; reward 1 at the ground-truth token
    and beta elsewhere: w(a) = beta q(a) for a != target, w(target) = q(target).
    log pi_theta is at temperature 1 and carries the gradient
    (d/dz = w - (sum_a w_a) p).  With kappa = 1 the beta-part has zero gradient
    (sum_a sg(p_a) grad log p_a = 0), so the gradient is (1 - beta) times that of the
    DFT term sg(p_t) log p_t.
    """
    _check_head(hidden, weight, bias)
    if targets.dim() != 1:
        raise ValueError(f"targets must be (N,), got shape {tuple(targets.shape)}")
    _check_rows("targets", targets, hidden.shape[0])
    _check_targets(targets, weight.shape[0])
    if kappa <= 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    vocab_chunk = vocab_chunk_size or _default_vocab_chunk(hidden.device)
    _check_chunks(chunk_size, vocab_chunk)
    return _ExpectedRewardLogprob.apply(
        hidden, weight, bias, targets.long(), float(kappa), float(beta), int(chunk_size), int(vocab_chunk)
    )


def naive_expected_reward_logprob(hidden, weight, targets, kappa, beta, bias=None, chunk_size=1024):
    """Reference for `expected_reward_logprob` with full fp32 (N, V) tensors."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    q = (z.detach() / kappa).softmax(-1)  # (N, V), no gradient
    w = beta * q
    w = w.scatter(1, targets.long()[:, None], q.gather(1, targets.long()[:, None]))
    return (w * z.log_softmax(-1)).sum(-1)


# ----------------------------------------------------------------------------------
# 4. Sampling tokens from softmax(z / kappa), chunk by chunk (OTR)
# ----------------------------------------------------------------------------------
@torch.no_grad()
def sample_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    num_samples: int,
    kappa: float = 1.0,
    bias: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
):
    """Draw `num_samples` tokens per position, i.i.d. with replacement, from
    softmax((h W^T + b) / kappa).  Returns (N, K) long; no gradient.

    Rows are processed `chunk_size` at a time with full-vocabulary fp32 rows
    (one (chunk_size x V) buffer, reused), so (N, V) is never built.  Uses
    `torch.multinomial(..., generator=generator)`: a seeded generator reproduces the
    draws for the same inputs and chunk size.
    """
    _check_head(hidden, weight, bias)
    if kappa <= 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    _check_chunks(chunk_size, 1)
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    out = torch.empty(N, int(num_samples), dtype=torch.long, device=dev)
    inv_k = 1.0 / kappa
    buf = _tile_buffer(min(chunk_size, N), V, dev)
    with _no_autocast(hidden):
        for c0, c1 in _spans(N, chunk_size):
            x = hidden[c0:c1].float() * inv_k
            z, _ = _logits_block(buf, x, weight, bias, 0, V, inv_k)  # (n, V)
            torch.softmax(z, -1, out=z)
            out[c0:c1] = torch.multinomial(z, int(num_samples), replacement=True, generator=generator)
    return out


@torch.no_grad()
def naive_sample_tokens(hidden, weight, num_samples, kappa=1.0, bias=None, generator=None, chunk_size=1024):
    """Reference for `sample_tokens`: multinomial on the full (N, V) softmax."""
    z = hidden.float() @ weight.float().t()
    if bias is not None:
        z = z + bias.float()
    return torch.multinomial((z / kappa).softmax(-1), int(num_samples), replacement=True, generator=generator)


# ----------------------------------------------------------------------------------
# 5. Model level: run the transformer body once, the fused head on selected rows
# ----------------------------------------------------------------------------------
_UNFUSABLE_LOGIT_FEATURES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def _unfusable_reason(config) -> str | None:
    """Why logits are not plain `lm_head(hidden)` for this config, or None.

    Soft-capping (Gemma 2/3) and logit scalings (Cohere `logit_scale`, Granite
    `logits_scaling`, ...) are applied in the CausalLM forward after lm_head; their
    meaning differs between model families, so we do not guess and fall back.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in _UNFUSABLE_LOGIT_FEATURES:
        value = getattr(cfg, name, None)
        if value is None or (name != "final_logit_softcapping" and value == 1):
            continue
        return f"{name}={value}"
    return None


def target_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices b * L + i of the tokens to score, in row-major order, (N,) long.

    Token i (loss_mask[b, i] == 1, i >= 1) is predicted by the hidden state at i - 1,
    whose flat index is therefore this index minus one.  loss_mask[:, 0] is ignored:
    the first token has no prefix.  One `nonzero` (one host sync) per call.
    """
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be (B, L), got shape {tuple(loss_mask.shape)}")
    sel = loss_mask.bool().clone()
    sel[:, 0] = False
    return sel.reshape(-1).nonzero().squeeze(1)


def default_position_ids(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids that skip padding: cumsum(mask) - 1 (0 on pads), as HF `generate`
    does.  Left-padded rollouts then get the same positions as during sampling;
    for right padding this equals arange on the real tokens."""
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder_hidden(lm, input_ids, attention_mask, position_ids, loss_mask=None, rows_per_group=32, max_groups=4):
    """Last hidden states (B, L, d) of the transformer body (final norm included).

    With `loss_mask`, only what the scored tokens need is computed (issue 11; positions not computed are 0):
    * the hidden state at i - 1 predicts token i, so a row's tokens from its last target on are never inputs and
      are cut (the EOS and the right padding of SFT/RL batches);
    * rows that begin with the same context (the G completions of a GRPO prompt: same tokens before the first
      target) share it: the body runs on each distinct context once into a KV cache, and the rest of every row
      (its suffix) attends to that cache; gradients flow back through the cache into the shared pass.  On the
      embedded GRPO batch this is a third fewer tokens;
    * then one padding-free pass: the real input tokens every row still needs are packed into one sequence, rows
      sorted by length in groups each padded to its own longest row, attention per row (and to the row's shared
      context's cached keys and values) (`_packed_hidden`; SDPA models with full attention in every layer,
      checked once per model by a probe).  Forward + backward, one thread, against the padded passes below: the
      embedded SFT batch 9% faster, the embedded GRPO batch (32 prompts x 8) 5% faster;
    * otherwise the suffixes are sorted by length and split into up to `max_groups` groups of at least
      `rows_per_group` rows, each trimmed to its own longest row, when that saves over 5% of the padded tokens;
      with no shared context and right-padded rows (ones, then zeros) no attention mask is passed: under the causal
      mask a real token never sees a later pad, so SDPA takes its causal path without building a mask.
    The results equal one plain pass up to float rounding.  One or two host syncs (the mask and the prompt tokens).
    Under FSDP2 or gradient checkpointing, and with dropout while training, it is one pass (packed when possible).
    """
    decoder = lm.get_decoder()
    cache_arg = "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"

    def body(ids, am, pos, cache=None):
        # the cache argument is `cache` in transformers >= 5.2x (`past_key_values` is deprecated there)
        out = decoder(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=cache is not None,
                      **{cache_arg: cache})
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    if loss_mask is None:
        return body(input_ids, attention_mask, position_ids)
    B, L = input_ids.shape
    dev = input_ids.device
    am = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    pos = default_position_ids(am) if position_ids is None else position_ids
    scored = loss_mask.detach().bool().clone()
    scored[:, 0] = False
    ar = torch.arange(L, device=dev)
    last = (scored * ar).amax(1)  # (B,) positions [0, last) are inputs to a scored position
    first = torch.where(scored, ar, L).amin(1)  # (B,) positions [0, first) are context only
    left = bool((am[:, 1:] > am[:, :-1]).any()) if L > 1 else False
    need = last.clamp(min=1).tolist()
    first = [min(f, n) for f, n in zip(first.tolist(), need)]
    multi_pass = _multi_pass_ok(lm)

    # 1. shared contexts: one pass over each distinct context, kept as a KV cache
    cache, hu, prefix, gid = None, None, [0] * B, [0] * B
    if multi_pass and multi_pass != "no_cache":
        P = max(first)
        rows = torch.cat([input_ids[:, :P], am[:, :P], pos[:, :P]], 1).tolist()  # the host sync for the contexts
        keys = {}
        for b in range(B):
            f = first[b]
            gid[b] = keys.setdefault((tuple(rows[b][:f]), tuple(rows[b][P:P + f]), tuple(rows[b][2 * P:2 * P + f])),
                                     len(keys))
        saved = sum(first) - sum(len(k[0]) for k in keys)
        if saved > 0.1 * sum(need):
            from transformers import DynamicCache
            rep = {}
            for b in range(B):
                rep.setdefault(gid[b], b)
            rep = torch.tensor([rep[u] for u in range(len(keys))], device=dev)
            f_u = torch.tensor([len(k[0]) for k in keys], device=dev)
            P = int(f_u.max())
            pm = am.index_select(0, rep)[:, :P] * (ar[None, :P] < f_u[:, None])  # (U, P) valid context tokens
            cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
            hu = body(input_ids.index_select(0, rep)[:, :P], pm if left else None, pos.index_select(0, rep)[:, :P],
                      cache)  # (U, P, d)
            prefix = first
        else:
            gid = [0] * B

    # 2. one padding-free pass over the tokens every row still needs (attending to its shared context, if any)
    if _packing_ok(lm):
        context = None if hu is None else (hu, cache, pm, torch.tensor(gid, device=dev),
                                           torch.tensor(first, device=dev))
        packed = _packed_hidden(lm, decoder, input_ids, am, pos, need, context)
        if packed is not None:
            return packed

    # 3. the rest of every row, in groups of similar length (separate passes)
    suffix = [n - f for n, f in zip(need, prefix)]
    order = sorted(range(B), key=lambda b: -suffix[b])
    k = max(1, min(max_groups, B // rows_per_group)) if multi_pass else 1
    groups = [order[j * B // k:(j + 1) * B // k] for j in range(k)]
    if sum(len(g) * suffix[g[0]] for g in groups) > 0.95 * B * suffix[order[0]]:
        groups = [list(range(B))]  # not worth the extra passes
    off = torch.tensor(prefix, device=dev)
    g_of = torch.tensor(gid, device=dev)
    parts, index = [], torch.full((B, L), -1, dtype=torch.long, device=dev)
    if hu is not None:
        in_ctx = ar[None] < off[:, None]
        index = torch.where(in_ctx, g_of[:, None] * hu.shape[1] + ar[None], index)
        parts.append(hu.reshape(-1, hu.shape[-1]))
    base = sum(p.shape[0] for p in parts)
    for g in groups:
        n = max(suffix[b] for b in g)
        if n == 0:
            continue
        rows = torch.tensor(g, device=dev)
        cols = (off.index_select(0, rows)[:, None] + ar[None, :n]).clamp(max=L - 1)  # (b, n)
        valid = ar[None, :n] < torch.tensor([suffix[b] for b in g], device=dev)[:, None]
        sub_am = am.index_select(0, rows).gather(1, cols) * valid
        sub_cache = None
        if cache is not None:  # this group's copy of its contexts' keys and values
            from transformers import DynamicCache
            sub_cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
            for i, layer in enumerate(cache.layers):
                sel = g_of.index_select(0, rows)
                sub_cache.update(layer.keys.index_select(0, sel), layer.values.index_select(0, sel), i)
            sub_am = torch.cat([pm.index_select(0, g_of.index_select(0, rows)), sub_am], 1)
        h = body(input_ids.index_select(0, rows).gather(1, cols),
                 sub_am if (cache is not None or left) else None,
                 pos.index_select(0, rows).gather(1, cols), sub_cache)  # (b, n, d)
        in_sfx = (ar[None] >= off[rows][:, None]) & (ar[None] < (off[rows] + n)[:, None])
        local = base + torch.arange(len(g), device=dev)[:, None] * n + (ar[None] - off[rows][:, None])
        index[rows] = torch.where(in_sfx, local, index[rows])
        parts.append(h.reshape(-1, h.shape[-1]))
        base += h.shape[0] * n
    flat = torch.cat(parts + [parts[0].new_zeros(1, parts[0].shape[-1])])  # last row: zeros for what is not computed
    return flat.index_select(0, torch.where(index < 0, base, index).reshape(-1)).view(B, L, -1)


# ----------------------------------------------------------------------------------
# Padding-free pass: the rows' real tokens packed into one sequence (issue 11)
# ----------------------------------------------------------------------------------
_GROUP_COST = 16  # tokens: one more attention group must save more padded tokens than this (measured on CPU)


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, spans=(), context=None,
                      **kwargs):
    """Attention of a packed pass. query (1, H, N, D), key / value (1, Hkv, N, D) hold groups of equal-length
    sequences one after another; `spans` lists them as (offset, rows, length). Each group is viewed as
    (rows, H, length, D) and attends causally within each sequence: SDPA's causal path, no mask, no padding to the
    longest row of the batch. With `context` (shared prompts computed before, see `_packed_hidden`), each row also
    attends to its context's cached keys and values, through a mask. Returns (1, N, H, D) as Hugging Face
    attention functions do."""
    if attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError("a packed pass got an attention mask or more than one row")
    H, D = query.shape[1], query.shape[-1]
    sizes = [n * length for _, n, length in spans]
    # split, not one slice per group: the backward of split is one cat, that of each slice a zero-filled full copy
    parts = zip(*(t.squeeze(0).split(sizes, dim=1) for t in (query, key, value)))
    outs = []
    for g, ((_, n, length), qkv) in enumerate(zip(spans, parts)):
        q, k, v = (t.unflatten(1, (n, length)).transpose(0, 1) for t in qkv)  # (n, heads, length, D) views
        mask = None
        if context is not None:  # prepend each row's context keys / values (U, Hkv, P, D) of this layer
            ck, cv = context["kv"][module.layer_idx]
            sel = context["rows"][g]
            k, v = torch.cat([ck.index_select(0, sel), k], 2), torch.cat([cv.index_select(0, sel), v], 2)
            mask = context["masks"][g]  # (n, 1, length, P + length): valid context tokens, then causal
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                             is_causal=mask is None, scale=scaling,
                                                             enable_gqa=k.shape[1] != H)
        outs.append(o.transpose(1, 2).reshape(n * length, H, D))
    return torch.cat(outs)[None], None


def _register_packed_attention():
    """Route Hugging Face's "sdpa" attention through `_packed_attention` when a call carries `postrain_spans`,
    and unchanged otherwise (generation, every other model). The keyword travels with the layer's arguments, so
    gradient checkpointing's recomputation takes the same path; switching the model's attention implementation
    for the duration of a call would not survive into the backward pass."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(sdpa, "postrain_wraps", None) is not None:
        return

    def sdpa_or_packed(module, query, key, value, attention_mask, *args, **kwargs):
        spans, context = kwargs.pop("postrain_spans", None), kwargs.pop("postrain_context", None)
        if spans is None:
            return sdpa(module, query, key, value, attention_mask, *args, **kwargs)
        return _packed_attention(module, query, key, value, attention_mask, *args, spans=spans, context=context,
                                 **kwargs)
    sdpa_or_packed.postrain_wraps = sdpa
    AttentionInterface.register("sdpa", sdpa_or_packed)


def _length_groups(lengths, group_cost=_GROUP_COST):
    """lengths sorted in decreasing order -> [(start, end)] runs of rows, each padded to its first row's length,
    that minimise padded tokens + group_cost per group (dynamic programme over the distinct lengths)."""
    starts = [i for i in range(len(lengths)) if i == 0 or lengths[i] != lengths[i - 1]] + [len(lengths)]
    U = len(starts) - 1
    best, cut = [0.0] + [float("inf")] * U, [0] * (U + 1)
    for j in range(1, U + 1):
        for i in range(j):
            c = best[i] + (starts[j] - starts[i]) * lengths[starts[i]] + group_cost
            if c < best[j]:
                best[j], cut[j] = c, i
    runs, j = [], U
    while j > 0:
        runs.append((starts[cut[j]], starts[j]))
        j = cut[j]
    return runs[::-1]


def _packed_hidden(lm, decoder, input_ids, am, pos, need, context=None):
    """Hidden states (B, L, d) from one pass over only the tokens [0, need[b]) of each row b that attention_mask
    keeps, packed into a single sequence: rows sorted by length and cut into groups (`_length_groups`), each group
    padded to its own longest row, attention within each row (`_packed_attention`). Positions not computed are 0.
    With `context` = (hu (U, P, d), cache, pm (U, P), gid (B,), first (B,)), the tokens of row b before first[b]
    are its shared context, already run (hu) into `cache` (keys / values per layer, pm marks the valid ones): only
    the tokens from first[b] on are packed, and they attend to that context too. None when nothing is left."""
    B, L = input_ids.shape
    dev = input_ids.device
    ar = torch.arange(L, device=dev)
    keep = am.bool() & (ar[None] < torch.tensor(need, device=dev)[:, None])  # (B, L) the inputs to score from
    if context is not None:
        hu, cache, pm, gid, first = context
        keep &= ar[None] >= first[:, None]
    n_b = keep.sum(1).tolist()  # host sync
    order = sorted((b for b in range(B) if n_b[b] > 0), key=lambda b: -n_b[b])
    if not order:
        return None
    lengths = [n_b[b] for b in order]
    spans, rows, base, off = [], [], torch.zeros(B, dtype=torch.long), 0
    for i, j in _length_groups(lengths):
        n, length = j - i, lengths[i]
        base[order[i:j]] = off + torch.arange(n) * length
        spans.append((off, n, length))
        rows.append(torch.tensor(order[i:j], device=dev))
        off += n * length
    slot = base.to(dev)[:, None] + keep.long().cumsum(1) - 1  # (B, L) slot of each kept token
    where = slot[keep]
    ids = input_ids.new_zeros(off)  # filler slots: token 0 (never attended to by a real token)
    ids[where] = input_ids[keep]
    p = pos.new_zeros(off)
    p[where] = pos[keep]
    ctx = None
    if context is not None:  # per group: each row's context index and the mask [valid context | causal]
        P, valid = pm.shape[1], pm.bool()
        sel = [gid.index_select(0, r) for r in rows]
        masks = [torch.cat([valid.index_select(0, c)[:, None, None, :].expand(len(c), 1, length, P),
                            torch.ones(length, length, dtype=torch.bool, device=dev).tril().expand(len(c), 1, -1, -1)],
                           -1) for c, (_, _, length) in zip(sel, spans)]
        ctx = {"kv": [(layer.keys, layer.values) for layer in cache.layers], "rows": sel, "masks": masks}
    _register_packed_attention()
    # an all-ones mask: Hugging Face then builds no mask (with none it would see the restarting positions as packed
    # sequences and build an N x N one); `postrain_spans` reaches every attention call, recomputations included
    out = decoder(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], position_ids=p[None],
                  use_cache=False, postrain_spans=spans, postrain_context=ctx)
    h = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]  # (off, d)
    if context is None:
        index = torch.where(keep, slot, off)  # not computed: the zero row
        return torch.cat([h, h.new_zeros(1, h.shape[-1])]).index_select(0, index.reshape(-1)).view(B, L, -1)
    U, P = pm.shape
    in_ctx = ar[None] < first[:, None]
    index = torch.where(keep, U * P + slot, torch.where(in_ctx, gid[:, None] * P + ar[None], U * P + off))
    flat = torch.cat([hu.reshape(U * P, -1), h, h.new_zeros(1, h.shape[-1])])
    return flat.index_select(0, index.reshape(-1)).view(B, L, -1)


def _packing_ok(lm):
    """Whether `_decoder_hidden` may use the packed pass for this model: default SDPA attention, full attention in
    every layer (no sliding windows), no dropout while training, and a one-time probe (cached on the model) that
    the packed pass gives a plain padded pass's hidden states on a small batch with left and right padding."""
    decoder = lm.get_decoder()
    cfg = decoder.config
    if cfg._attn_implementation != "sdpa" or _dropout_active(lm, cfg) or any(
            t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return False
    ok = getattr(lm, "_postrain_packing_ok", None)
    if ok is None:
        lm._postrain_packing_ok = True  # tentatively, so that the probe's _decoder_hidden takes the packed paths
        try:
            ok = all(_probe_packing(lm, decoder, shared) for shared in (False, True))
        except Exception as e:  # an architecture this does not fit: keep the padded passes
            ok = False
            warnings.warn(f"FusedLM: padding-free packing is off for this model ({type(e).__name__}: {e})",
                          stacklevel=3)
        lm._postrain_packing_ok = ok
    return ok


def _probe_packing(lm, decoder, shared):
    """`_decoder_hidden` against one plain padded pass on a small batch: distinct rows with left and right padding
    (the packed pass alone), or 2 prompts x 3 completions (the shared-context pass, then the packed rest)."""
    cfg = decoder.config
    dev = next(lm.parameters()).device
    g = torch.Generator().manual_seed(0)
    V = min(getattr(cfg, "vocab_size", 32) or 32, 1000)
    if shared:
        prompts = torch.randint(0, V, (2, 4), generator=g)
        comps = torch.randint(0, V, (6, 4), generator=g)
        ids = torch.cat([prompts.repeat_interleave(3, 0), comps], 1)
        am = torch.ones(6, 8, dtype=torch.long)
        am[1, 6:] = am[4, 5:] = 0
        lmask = am.clone()
        lmask[:, :4] = 0
    else:
        ids = torch.randint(0, V, (3, 7), generator=g)
        am = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
        lmask = torch.tensor([[0] * 2 + [1] * 5, [0] * 2 + [1] * 2 + [0] * 3, [0] * 4 + [1] * 3])
    ids, am, lmask = ids.to(dev), am.to(dev), lmask.to(dev)
    pos = default_position_ids(am)
    with torch.no_grad():
        plain = decoder(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
        plain = plain.last_hidden_state if hasattr(plain, "last_hidden_state") else plain[0]
        packed = _decoder_hidden(lm, ids, am, pos, lmask)
    inputs = torch.zeros_like(am, dtype=torch.bool)
    inputs[:, :-1] = lmask[:, 1:].bool()  # the hidden states that predict scored tokens
    scale = plain[inputs].float().abs().max().clamp(min=1e-6)
    return bool(((packed[inputs].float() - plain[inputs].float()).abs().max() / scale) < 1e-3)


def _dropout_active(lm, cfg):
    """Whether a training forward of `lm` draws dropout masks (attention dropout or any active nn.Dropout)."""
    return lm.training and bool(getattr(cfg, "attention_dropout", 0) or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm.modules()))


def _multi_pass_ok(lm):
    """Whether `_decoder_hidden` may run the body more than once per forward: False under FSDP2 (each pass would
    gather every layer again) and gradient checkpointing; "no_cache" (groups but no shared contexts) when the
    model's cache is not a plain DynamicCache (sliding windows, state-space layers), is an encoder-decoder, or
    uses dropout while training (shared contexts would share their dropout masks)."""
    checkpointing = lm.is_activation_checkpointing if hasattr(type(lm), "is_activation_checkpointing") else getattr(
        lm, "is_gradient_checkpointing", False)
    if checkpointing or any(hasattr(m, "unshard") for m in lm.modules()):
        return False
    cfg = lm.config.get_text_config(decoder=True) if hasattr(lm.config, "get_text_config") else lm.config
    if _dropout_active(lm, cfg) or getattr(lm.config, "is_encoder_decoder", False) or not getattr(
            lm, "_supports_default_dynamic_cache", lambda: False)():
        return "no_cache"
    from transformers import DynamicCache
    plain = all(type(layer).__name__ == "DynamicLayer" for layer in DynamicCache(config=cfg).layers)
    return True if plain else "no_cache"


def response_hidden(lm, input_ids, attention_mask, loss_mask, position_ids=None) -> torch.Tensor:
    """Hidden states (N, d) that predict the loss_mask tokens, in `FusedLM` order.

    For a frozen reference model call it under `torch.no_grad()`; pair it with the
    reference's `get_output_embeddings()` weight in `full_vocab_kl`.
    """
    if position_ids is None:
        position_ids = default_position_ids(attention_mask)
    pos = target_positions(loss_mask)
    hidden = _decoder_hidden(lm, input_ids, attention_mask, position_ids, loss_mask)  # (B, L, d)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos - 1)


def _scatter_rows(values: torch.Tensor, pos: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """(N, ...) -> (B, L, ...) with values at flat positions `pos`, zeros elsewhere.

    Out-of-place `index_put`, so gradients flow back to `values` and the result is not
    a view (FSDP2 warns about views returned from a wrapped forward)."""
    full = values.new_zeros((B, L) + tuple(values.shape[1:]))
    return full.index_put((pos // L, pos % L), values)


HeadFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], dict]


class FusedLM(torch.nn.Module):
    """A causal LM whose forward returns per-token log-probs without (B, L, V) logits.

    forward(input_ids, attention_mask, loss_mask, temperature=1.0, with_entropy=False,
            head=None, position_ids=None) -> dict

    * input_ids, attention_mask, loss_mask: (B, L).  The body `lm.get_decoder()` runs
      once; the rows that predict a loss_mask token (i >= 1) go through the fused head
      with the output embedding's weight (the shared embedding when tied) and bias.
    * Default result: {"logp": (B, L), "entropy": (B, L) or None}, float32, aligned
      with TOKENS: logp[b, i] = log p(input_ids[b, i] | input_ids[b, :i]) at the given
      temperature where loss_mask[b, i] == 1 (i >= 1), 0 elsewhere.
    * head(h (N, d), weight (V, d), bias (V,) | None, targets (N,)) -> dict replaces the
      default head (e.g. sample_tokens + fused_logprobs with (N, K) targets, or
      expected_reward_logprob, or full_vocab_kl against `response_hidden` of a
      reference).  Every returned tensor with N rows is scattered to (B, L, ...);
      anything else is returned as is.  `temperature` / `with_entropy` only affect the
      default head.
    * position_ids default to `default_position_ids(attention_mask)`.

    Wrap this module (not `lm`) in DDP / FSDP2 so the head runs inside the wrapped
    forward.  If the config applies soft-capping or a logit scale after lm_head, the
    forward falls back to `lm(...)` logits with a per-chunk fp32 log-softmax (and a
    warning); `head=` is then unavailable.
    """

    def __init__(self, lm: torch.nn.Module, chunk_size: int = 1024, vocab_chunk_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.chunk_size = int(chunk_size)
        self.vocab_chunk_size = vocab_chunk_size
        self.unfused_reason = _unfusable_reason(lm.config)
        if lm.get_output_embeddings() is None:
            raise ValueError(f"{type(lm).__name__} has no output embeddings (lm_head)")

    def hidden_for(self, input_ids, attention_mask, loss_mask, position_ids=None):
        """`response_hidden` of the wrapped model."""
        return response_hidden(self.lm, input_ids, attention_mask, loss_mask, position_ids)

    def generate(self, *args, **kwargs):
        """Convenience pass-through to the wrapped model's `generate`."""
        return self.lm.generate(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        temperature: float = 1.0,
        with_entropy: bool = False,
        head: HeadFn | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict:
        if input_ids.shape != loss_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        pos = target_positions(loss_mask)  # (N,) flat token indices
        targets = input_ids.reshape(-1).index_select(0, pos)  # (N,)

        if self.unfused_reason is not None:
            if head is not None:
                raise NotImplementedError(
                    f"head= needs the fused path, which is off for this model ({self.unfused_reason})"
                )
            return self._unfused_forward(input_ids, attention_mask, position_ids, pos, targets, temperature,
                                         with_entropy)

        hidden = _decoder_hidden(self.lm, input_ids, attention_mask, position_ids, loss_mask)  # (B, L, d)
        h = hidden.reshape(B * L, -1).index_select(0, pos - 1)  # (N, d): row i-1 predicts token i
        out_emb = self.lm.get_output_embeddings()
        weight, bias = out_emb.weight, getattr(out_emb, "bias", None)
        if head is None:
            logp, ent = fused_logprobs(h, weight, targets, bias, temperature, self.chunk_size, with_entropy,
                                       self.vocab_chunk_size)
            result = {"logp": logp, "entropy": ent}
        else:
            result = head(h, weight, bias, targets)
        n = pos.shape[0]
        return {
            k: _scatter_rows(v, pos, B, L) if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v
            for k, v in result.items()
        }

    def _unfused_forward(self, input_ids, attention_mask, position_ids, pos, targets, temperature, with_entropy):
        """Full logits from `lm(...)`, then fp32 log-softmax chunk by chunk of rows."""
        warnings.warn(
            f"FusedLM: fused log-probs are off for this model ({self.unfused_reason} is applied after lm_head); "
            "using full logits from lm(...), which needs (B, L, V) memory.",
            stacklevel=3,
        )
        B, L = input_ids.shape
        logits = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits  # (B, L, V)
        rows = logits.reshape(B * L, -1).index_select(0, pos - 1)  # (N, V)
        logps, ents = [], []
        for c0, c1 in _spans(rows.shape[0], self.chunk_size):
            logp_all = (rows[c0:c1].float() / temperature).log_softmax(-1)  # (n, V) fp32
            logps.append(logp_all.gather(1, targets[c0:c1, None])[:, 0])
            if with_entropy:
                ents.append(-(logp_all.exp() * logp_all).sum(-1))
        logp = torch.cat(logps) if logps else rows.new_zeros(0, dtype=torch.float32)
        ent = (torch.cat(ents) if ents else rows.new_zeros(0, dtype=torch.float32)) if with_entropy else None
        return {
            "logp": _scatter_rows(logp, pos, B, L),
            "entropy": _scatter_rows(ent, pos, B, L) if with_entropy else None,
        }
