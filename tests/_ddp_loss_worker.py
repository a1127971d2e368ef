"""Gradient of a method's loss under world size 2 x gradient accumulation 2 vs one process with the full batch.

Usage (under torchrun, 2 ranks): _ddp_loss_worker.py METHOD AGG OUT.json
Every rank builds the same 8 sequences of different lengths; rank r takes 4 of them in 2 micro-batches; the
normalizer is counted over the whole step (all micro-batches, all ranks) / world size, as the method files do.
Rank 0 then computes the single-process full-batch gradient and writes the max relative difference to OUT.json.
"""
import copy
import gc
import importlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import data  # noqa: E402
from kernels.advantage import normalizer_count  # noqa: E402
from kernels.engine import FusedLM  # noqa: E402


def make_batch(vocab, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        p = torch.randint(5, vocab, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(5, vocab, (2 + 5 * (i % 4),), generator=g).tolist()  # lengths 2..17: micro-batches differ
        seqs.append((p, r))
    b = data.collate(seqs, 0)
    b["advantages"] = torch.randn(n, generator=g)
    b["old_shift"] = 0.05 * torch.randn(b["input_ids"].shape, generator=g)  # old = logp.detach() + shift
    b["aux"] = torch.randn(b["input_ids"].shape, generator=g)  # a second per-token tensor (ref / teacher logp)
    return b


def adapter(method):
    """tests/test_<method>.py defines DDP_ADAPTER = (mode_fn, loss_fn): mode_fn(agg) -> the aggregation mode whose
    normalizer_count the method uses; loss_fn(module, out, batch, normalizer, agg, n_micro) -> loss, where `out` is
    FusedLM's output dict and `batch` holds input_ids, attention_mask, loss_mask, advantages (B,), old_shift and
    aux (B, L) random tensors (e.g. old = logp.detach() + old_shift, ref/teacher logp = logp.detach() + aux)."""
    sys.path.insert(0, str(REPO / "tests"))
    return importlib.import_module(f"test_{method}").DDP_ADAPTER


def forward_kwargs(method, b):
    """More FusedLM arguments of a case: uft also scores a prompt-side mask (its hint: the last two prompt tokens of
    the rows whose aux > 0 at position 1), returned as "prompt_logp"; its loss reads the mask as b["hint_mask"] and
    the step's hint tokens (all micro-batches and ranks) / world size as b["hint_normalizer"]."""
    if method != "uft":
        return {}
    ends = b["loss_mask"].float().argmax(1, keepdim=True)  # first response position = prompt length
    ar = torch.arange(b["loss_mask"].shape[1])[None]
    return {"prompt_mask": ((ar >= ends - 2) & (ar < ends) & (b["aux"][:, 1:2] > 0)).float()}


def with_hint(method, mbs, world):
    """uft: each micro-batch gets hint_mask and hint_normalizer (see forward_kwargs); other methods: unchanged.
    world 1: the single process on rank 0 (no collective)."""
    if method != "uft":
        return mbs
    masks = [forward_kwargs(method, b)["prompt_mask"] for b in mbs]
    hz = sum(m.sum() for m in masks)
    hz = common.all_reduce(hz) / world if world > 1 else hz
    return [{**b, "hint_mask": m, "hint_normalizer": hz} for b, m in zip(mbs, masks)]


def grads_of(model, mbs, method, mod, agg, world):
    mode_fn, loss_fn = adapter(method)
    z = common.all_reduce(sum(normalizer_count(b["loss_mask"], mode_fn(agg)) for b in mbs)) / world
    mbs = with_hint(method, mbs, world)
    for k, b in enumerate(mbs):
        with common.no_sync(model, k == len(mbs) - 1):
            o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], **forward_kwargs(method, b))
            loss_fn(mod, o, b, z, agg, len(mbs)).backward()
    return {n: p.grad.clone() for n, p in getattr(model, "module", model).named_parameters()}


def main():
    method, agg, out = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, str(REPO / "tests"))
    from tests_util import load_method
    mod = load_method(method)
    d = common.setup_distributed(0)
    torch.manual_seed(0)
    tok = data.build_embedded_tokenizer()
    lm = data.build_embedded_model(tok)
    single = copy.deepcopy(FusedLM(lm))
    model = common.wrap_model(FusedLM(lm), d)
    full = make_batch(len(tok))
    sel = lambda b, idx: {k: v[idx] for k, v in b.items()}  # noqa: E731
    mine = torch.arange(8)[d.rank::d.world_size]  # rank 0: 0,2,4,6  rank 1: 1,3,5,7
    mbs = [sel(full, mine[:2]), sel(full, mine[2:])]
    g_ddp = grads_of(model, mbs, method, mod, agg, d.world_size)
    if d.is_main:
        z_mode, loss_fn = adapter(method)
        z = normalizer_count(full["loss_mask"], z_mode(agg))  # one process: the full count, world size 1
        o = single(full["input_ids"], full["attention_mask"], full["loss_mask"], **forward_kwargs(method, full))
        full = with_hint(method, [full], 1)[0]
        loss_fn(mod, o, full, z, agg, 1).backward()
        g_ref = {n: p.grad for n, p in single.named_parameters()}
        rel = max(((g_ddp[n] - g_ref[n]).norm() / g_ref[n].norm().clamp(min=1e-12)).item() for n in g_ref)
        Path(out).write_text(json.dumps({"max_rel_diff": rel}))
    del model, single, lm, mbs, g_ddp  # nothing holding DDP's hooks alive when the group goes (ENVIRONMENT.md: SIGABRT)
    gc.collect()
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
