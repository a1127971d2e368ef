"""The model-execution engine: run a Hugging Face causal LM's body once and the fused head of kernels/logprob.py on
the rows that predict a loss token, without ever building (B, L, V) logits.

`FusedLM` wraps a causal LM so that the fused head runs inside the forward of the module that DDP / FSDP2 wrap
(their gradient hooks and the unsharding of the root parameters, embeddings and lm_head, need that). Its body pass
(`_decoder_hidden`) is padding-free where a one-time probe per model shows it exact: the real tokens of every row
are packed into one sequence and attention runs per length group (`_packed_hidden`, `_packed_attention`); GRPO-style
batches (many completions of one prompt) pack the shared prompt once, in the same pass, and every completion attends
to its keys and values. Models the probe refuses (other attention implementations, sliding windows, dropout) keep
plain padded passes (there the shared prompt runs once into a KV cache).

Global state: the packed attention reaches the model through Hugging Face's attention registry: the registered
"sdpa" function is wrapped once so that a call carrying `postrain_spans` takes the packed path and every other call
(generation, any other model in the process) runs the original function unchanged.

Why not transformers' own padding-free path (packed rows described by restarting `position_ids`,
`attention_mask=None`)? It is exact (hidden states within 6e-6 of a padded pass in fp32, transformers 5.24) but, with
the attention implementations that run everywhere, slow: for sdpa/eager, masking_utils turns the positions into one
dense N x N block-diagonal mask over all N packed tokens, so attention costs the square of the whole batch instead of
the sum of each row's square. Forward+backward on one CPU thread, relative to `FusedLM(fast=False)`: 4.2x on the
embedded SFT batch, 20x and 1.6 GB more peak memory on the embedded GRPO batch (256 short rows), 1.2-1.9x on 8-16
rows of 64-512 tokens; this path took 0.87x, 0.89x and 0.66-0.73x. `flex_attention` has no backward on CPU (torch
2.13) and the varlen (`cu_seqlens`) path needs flash-attention (CUDA only); none runs a GRPO prompt once for its
completions. So the hand-written path stays; on a GPU with flash-attention, transformers' varlen path is the first
thing to measure against (not measured here).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch

from kernels.logprob import _spans, fused_logprobs
from kernels.norm import fuse_rmsnorm

__all__ = ["FusedLM", "response_hidden", "target_positions", "default_position_ids"]


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


def _decoder_hidden(lm, input_ids, attention_mask, position_ids, loss_mask=None, rows_per_group=32, max_groups=4,
                    context_mask=None):
    """Last hidden states (B, L, d) of the transformer body (final norm included).

    With `loss_mask`, only what the scored tokens need is computed (issue 11; positions not computed are 0):
    * the hidden state at i - 1 predicts token i, so a row's tokens from its last target on are never inputs and
      are cut (the EOS and the right padding of SFT/RL batches);
    * rows that begin with the same context (the G completions of a GRPO prompt: same tokens before the first
      target) share it: each distinct context is computed once and the rest of every row (its suffix) attends to
      its keys and values, gradients flowing back into the shared tokens.  On the embedded GRPO batch this is a
      third fewer tokens;
    * one padding-free pass (`_packed_hidden`; SDPA models with full attention in every layer, checked once per
      model by a probe): the contexts and the real input tokens every row still needs are packed into one
      sequence, rows sorted by length in groups each padded to its own longest row, attention per row (and to the
      row's context, packed in the same pass).  One pass, not a context pass and then the rest: each weight then
      gets one gradient matmul over all tokens instead of a second thin one (K = the context tokens) and a sum,
      which cost GRPO forward + backward 11% at 0.6M, 4% at 8M and 6-17% at 40M parameters (A/B, one thread).
      Forward + backward against the padded passes below: the embedded SFT batch 9% faster, the embedded GRPO batch
      (32 prompts x 8) 5% faster (before the one-pass contexts, which took another 11% off it);
    * otherwise the contexts run once into a KV cache (when the body may run more than once) and the suffixes are
      sorted by length and split into up to `max_groups` groups of at least
      `rows_per_group` rows, each trimmed to its own longest row, when that saves over 5% of the padded tokens;
      with no shared context and right-padded rows (ones, then zeros) no attention mask is passed: under the causal
      mask a real token never sees a later pad, so SDPA takes its causal path without building a mask.
    The results equal one plain pass up to float rounding.  One or two host syncs (the mask and the prompt tokens).
    Under FSDP2 or gradient checkpointing the packed pass (contexts included) is still one pass; without packing it
    is then one plain pass, as with dropout while training.
    `context_mask` (B, L): more scored tokens that may lie inside a row's shared context (UFT's hint, the same in
    all G completions of a prompt): they extend the rows like loss_mask tokens but do not end the shared context,
    whose hidden states (with their gradient) serve them.
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
    first = torch.where(scored, ar, L).amin(1)  # (B,) positions [0, first) are context only
    if context_mask is not None:  # scored too, but inside the context
        scored |= context_mask.detach().bool()
        scored[:, 0] = False
    last = (scored * ar).amax(1)  # (B,) positions [0, last) are inputs to a scored position
    left = bool((am[:, 1:] > am[:, :-1]).any()) if L > 1 else False
    need = last.clamp(min=1).tolist()
    first = [min(f, n) for f, n in zip(first.tolist(), need)]
    multi_pass = _multi_pass_ok(lm)
    packing = _packing_ok(lm)

    # 1. shared contexts: rows that begin with the same tokens (ids, mask and positions) before their first target
    cache, hu, prefix, gid, rep = None, None, [0] * B, [0] * B, []
    if packing or (multi_pass and multi_pass != "no_cache"):
        P = max(first)
        rows = torch.cat([input_ids[:, :P], am[:, :P], pos[:, :P]], 1).tolist()  # the host sync for the contexts
        keys = {}
        for b in range(B):
            f = first[b]
            gid[b] = keys.setdefault((tuple(rows[b][:f]), tuple(rows[b][P:P + f]), tuple(rows[b][2 * P:2 * P + f])),
                                     len(keys))
            if gid[b] == len(rep):
                rep.append(b)  # the first row of each context stands for it
        if sum(first) - sum(len(k[0]) for k in keys) <= 0.1 * sum(need):  # too little shared to be worth it
            gid, rep = [0] * B, []

    # 2. one padding-free pass over the tokens every row still needs: each shared context once, in the same pass
    if packing:
        shared = (gid, first, rep) if rep else None
        packed = _packed_hidden(lm, decoder, input_ids, am, pos, need, shared)
        if packed is not None:
            return packed
        gid, rep = [0] * B, []

    # 3. otherwise (padded passes): one pass over each distinct context into a KV cache
    if rep:
        from transformers import DynamicCache
        rep_t = torch.tensor(rep, device=dev)
        f_u = torch.tensor([first[b] for b in rep], device=dev)
        P = int(f_u.max())
        pm = am.index_select(0, rep_t)[:, :P] * (ar[None, :P] < f_u[:, None])  # (U, P) valid context tokens
        cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
        hu = body(input_ids.index_select(0, rep_t)[:, :P], pm if left else None, pos.index_select(0, rep_t)[:, :P],
                  cache)  # (U, P, d)
        prefix = first

    # 4. the rest of every row, in groups of similar length (separate passes)
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
    longest row of the batch. With `context` (shared prompts, see `_packed_hidden`), group 0 holds the contexts and
    each row of a later group also attends to its context's keys and values (taken from group 0 of this layer,
    so their gradients flow back into the same pass), through a mask. Returns (1, N, H, D) as Hugging Face
    attention functions do."""
    if attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError("a packed pass got an attention mask or more than one row")
    H, D = query.shape[1], query.shape[-1]
    sizes = [n * length for _, n, length in spans]
    # split, not one slice per group: the backward of split is one cat, that of each slice a zero-filled full copy
    parts = zip(*(t.squeeze(0).split(sizes, dim=1) for t in (query, key, value)))
    outs, ck, cv = [], None, None
    for g, ((_, n, length), qkv) in enumerate(zip(spans, parts)):
        q, k, v = (t.unflatten(1, (n, length)).transpose(0, 1) for t in qkv)  # (n, heads, length, D) views
        mask = None
        if context is not None and g == 0:  # the contexts themselves: causal, like any group
            ck, cv = k, v  # (U, Hkv, Pc, D)
        elif context is not None:  # prepend each row's context keys / values
            sel = context["rows"][g]
            k, v = torch.cat([ck.index_select(0, sel), k], 2), torch.cat([cv.index_select(0, sel), v], 2)
            mask = context["masks"][g]  # (n, 1, length, Pc + length): valid context tokens, then causal
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


def _packed_hidden(lm, decoder, input_ids, am, pos, need, shared=None):
    """Hidden states (B, L, d) from one pass over only the tokens [0, need[b]) of each row b that attention_mask
    keeps, packed into a single sequence: rows sorted by length and cut into groups (`_length_groups`), each group
    padded to its own longest row, attention within each row (`_packed_attention`). Positions not computed are 0.
    With `shared` = (gid, first, rep): the tokens of row b before first[b] are its context, the same for every row
    with the same gid[b] (rep[u]: the row that stands for context u). Each context is packed once, the contexts
    together as the first group (padded to the longest), and the rest of each row attends to its context's keys
    and values of the same layer: one pass, so every weight sees all tokens in one matmul (a separate context pass
    would add a second, thin weight-gradient matmul and a sum per weight). None when nothing is left."""
    B, L = input_ids.shape
    dev = input_ids.device
    ar = torch.arange(L, device=dev)
    keep = am.bool() & (ar[None] < torch.tensor(need, device=dev)[:, None])  # (B, L) the inputs to score from
    if shared is not None:
        gid, first, rep = shared
        first_t = torch.tensor(first, device=dev)
        in_ctx = keep & (ar[None] < first_t[:, None])  # (B, L) context tokens of each row
        keep &= ~in_ctx
    n_b = keep.sum(1).tolist()  # host sync
    order = sorted((b for b in range(B) if n_b[b] > 0), key=lambda b: -n_b[b])
    spans, rows, base, off = [], [], torch.zeros(B, dtype=torch.long), 0
    ids_parts, pos_parts = [], []
    if shared is not None:  # group 0: the U contexts, each padded to the longest (real tokens only)
        rep_t = torch.tensor(rep, device=dev)
        c_keep = in_ctx.index_select(0, rep_t)  # (U, L)
        c_len = c_keep.sum(1)  # (U,)
        U, Pc = len(rep), int(c_len.max())
        if Pc == 0:
            shared = None
        else:
            c_slot = (torch.arange(U, device=dev) * Pc)[:, None] + c_keep.long().cumsum(1) - 1
            c_ids = input_ids.new_zeros(U * Pc)
            c_ids[c_slot[c_keep]] = input_ids.index_select(0, rep_t)[c_keep]
            c_pos = pos.new_zeros(U * Pc)
            c_pos[c_slot[c_keep]] = pos.index_select(0, rep_t)[c_keep]
            ids_parts.append(c_ids)
            pos_parts.append(c_pos)
            spans.append((0, U, Pc))
            rows.append(None)
            off = U * Pc
    if not order and shared is None:
        return None
    lengths = [n_b[b] for b in order]
    for i, j in (_length_groups(lengths) if order else []):
        n, length = j - i, lengths[i]
        base[order[i:j]] = off + torch.arange(n) * length
        spans.append((off, n, length))
        rows.append(torch.tensor(order[i:j], device=dev))
        off += n * length
    start = spans[len(ids_parts)][0] if len(spans) > len(ids_parts) else off  # where the rows' own tokens begin
    slot = base.to(dev)[:, None] + keep.long().cumsum(1) - 1  # (B, L) slot of each kept token
    where = slot[keep]
    ids = input_ids.new_zeros(off - start)  # filler slots: token 0 (never attended to by a real token)
    ids[where - start] = input_ids[keep]
    p = pos.new_zeros(off - start)
    p[where - start] = pos[keep]
    ids, p = torch.cat(ids_parts + [ids]), torch.cat(pos_parts + [p])
    ctx = None
    if shared is not None:  # per later group: each row's context and the mask [valid context | causal]
        valid = torch.arange(Pc, device=dev)[None] < c_len[:, None]  # (U, Pc)
        gid_t = torch.tensor(gid, device=dev)
        sel = [None] + [gid_t.index_select(0, r) for r in rows[1:]]
        masks = [None] + [torch.cat([valid.index_select(0, c)[:, None, None, :].expand(len(c), 1, length, Pc),
                                     torch.ones(length, length, dtype=torch.bool, device=dev).tril()
                                     .expand(len(c), 1, -1, -1)], -1)
                          for c, (_, _, length) in zip(sel[1:], spans[1:])]
        ctx = {"rows": sel, "masks": masks}
    _register_packed_attention()
    # an all-ones mask: Hugging Face then builds no mask (with none it would see the restarting positions as packed
    # sequences and build an N x N one); `postrain_spans` reaches every attention call, recomputations included
    out = decoder(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], position_ids=p[None],
                  use_cache=False, postrain_spans=spans, postrain_context=ctx)
    h = (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]  # (off, d)
    index = torch.where(keep, slot, off)  # not computed: the zero row
    if shared is not None:  # context tokens: row b's copy is its context's (same tokens in the same order)
        c_of = gid_t[:, None] * Pc + in_ctx.long().cumsum(1) - 1
        index = torch.where(in_ctx, c_of, index)
    return torch.cat([h, h.new_zeros(1, h.shape[-1])]).index_select(0, index.reshape(-1)).view(B, L, -1)


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


def _split_prompt_side(out: dict, loss_mask: torch.Tensor, prompt_mask: torch.Tensor | None) -> dict:
    """A pass that scored loss_mask | prompt_mask -> "logp" and "entropy" on loss_mask tokens, "prompt_logp" on
    prompt_mask tokens (FusedLM's prompt_mask); unchanged without a prompt_mask."""
    if prompt_mask is None:
        return out
    resp, side = loss_mask.bool(), prompt_mask.bool()
    return {"logp": torch.where(resp, out["logp"], 0.0), "prompt_logp": torch.where(side, out["logp"], 0.0),
            "entropy": None if out["entropy"] is None else torch.where(resp, out["entropy"], 0.0)}


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
    * prompt_mask (B, L), optional: prompt-side tokens to score as well (UFT's hint, a revealed prefix of the
      demonstration inside the prompt). The same fused pass (one head call, no (B, L, V) logits) scores
      loss_mask | prompt_mask; the result gains "prompt_logp" (B, L): the log-probs, at the same temperature and
      with their gradient, where prompt_mask == 1 (i >= 1), 0 elsewhere. "logp" and "entropy" keep their meaning
      (loss_mask tokens only). Default head only.

    Wrap this module (not `lm`) in DDP / FSDP2 so the head runs inside the wrapped
    forward.  If the config applies soft-capping or a logit scale after lm_head, the
    forward falls back to `lm(...)` logits with a per-chunk fp32 log-softmax (and a
    warning); `head=` is then unavailable.

    fast=True (every method's --fast-paths, the default) changes the model, once, here: the RMSNorm modules get
    kernels/norm.py's forward where a probe shows it reproduces theirs, and the padding-free pass is probed now
    (it then wraps transformers' global "sdpa" attention entry, see the module docstring). `summary` says what
    was decided; the method files print it at start-up. fast=False leaves the model's modules and the global
    attention registry untouched and runs plain padded passes.
    """

    def __init__(self, lm: torch.nn.Module, chunk_size: int = 1024, vocab_chunk_size: int | None = None,
                 fast: bool = True):
        super().__init__()
        self.lm = lm
        self.chunk_size = int(chunk_size)
        self.vocab_chunk_size = vocab_chunk_size
        self.unfused_reason = _unfusable_reason(lm.config)
        if lm.get_output_embeddings() is None:
            raise ValueError(f"{type(lm).__name__} has no output embeddings (lm_head)")
        if not fast:
            lm._postrain_packing_ok = False  # never probed, never registered: padded passes
            self.summary = "fast paths off (--no-fast-paths): the model's own RMSNorm, padded passes"
            return
        norms = fuse_rmsnorm(lm)
        packed = _packing_ok(lm)
        self.summary = (f"fast paths: RMSNorm kernel in {norms} modules; padding-free passes "
                        + ("on (probe passed)" if packed else "off (not plain SDPA full attention, dropout on, or "
                                                              "the probe disagreed): padded passes"))

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
        prompt_mask: torch.Tensor | None = None,
    ) -> dict:
        if input_ids.shape != loss_mask.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and loss_mask {tuple(loss_mask.shape)} differ")
        if prompt_mask is not None and (head is not None or prompt_mask.shape != loss_mask.shape):
            raise ValueError(f"prompt_mask must be (B, L) = {tuple(loss_mask.shape)} and works with the default head "
                             f"only, got shape {tuple(prompt_mask.shape)}" + (" and head=" if head else ""))
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = default_position_ids(attention_mask)
        score = loss_mask if prompt_mask is None else loss_mask.bool() | prompt_mask.bool()  # one pass for both
        pos = target_positions(score)  # (N,) flat token indices
        targets = input_ids.reshape(-1).index_select(0, pos)  # (N,)

        if self.unfused_reason is not None:
            if head is not None:
                raise NotImplementedError(
                    f"head= needs the fused path, which is off for this model ({self.unfused_reason})"
                )
            return _split_prompt_side(self._unfused_forward(input_ids, attention_mask, position_ids, pos, targets,
                                                            temperature, with_entropy), loss_mask, prompt_mask)

        hidden = _decoder_hidden(self.lm, input_ids, attention_mask, position_ids, loss_mask,
                                 context_mask=prompt_mask)  # (B, L, d)
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
        return _split_prompt_side({
            k: _scatter_rows(v, pos, B, L) if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v
            for k, v in result.items()
        }, loss_mask, prompt_mask)

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
