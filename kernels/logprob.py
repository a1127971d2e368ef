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

The model-level engine that feeds these kernels (`FusedLM`: one pass of the
transformer body, padding-free packing, shared-prompt passes) is kernels/engine.py.
"""
from __future__ import annotations

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
