"""Worker for tests/test_kernels_logprob.py::test_ddp_and_fsdp2_match_single_process.

Run:  python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_kernels_worker.py RESULT.json

Every rank builds the same tiny Qwen2 (tied, and untied with a biased lm_head), wraps
FusedLM(lm) in DDP or FSDP2 (`fully_shard` on each decoder layer, then on the root),
and back-propagates a loss on ITS half of a batch, normalised by the global token count
divided by the world size (kernels.advantage convention).  The gradients must equal
those of one process that sees the whole batch with the plain count.  Rank 0 writes
{case: max relative gradient error} to RESULT.json.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from kernels.advantage import aggregate, normalizer_count  # noqa: E402
from kernels.engine import FusedLM  # noqa: E402


def build(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # identical weights on every rank and for the reference
    cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    lm = transformers.AutoModelForCausalLM.from_config(cfg)
    if not tied:  # untied case also exercises a head with a bias
        head = torch.nn.Linear(32, 50, bias=True)
        with torch.no_grad():
            head.weight.copy_(lm.lm_head.weight)
            head.bias.normal_(0, 0.5)
        lm.lm_head = head
    return FusedLM(lm, chunk_size=5, vocab_chunk_size=16)


def make_batch():
    g = torch.Generator().manual_seed(0)
    B, L = 6, 10
    ids = torch.randint(0, 50, (B, L), generator=g)
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 7:] = 0
    am[4, :2] = 0  # left padding
    lmask = am.clone()
    lmask[:, :3] = 0
    lmask[5, 3:8] = 0  # rows with different token counts: a per-rank mean would be wrong
    return ids, am, lmask


def loss_fn(model, ids, am, lmask, normalizer):
    out = model(ids, am, lmask, temperature=0.8, with_entropy=True)
    return -aggregate(out["logp"], lmask, "token_mean", normalizer) - 0.1 * aggregate(
        out["entropy"], lmask, "token_mean", normalizer)


def max_rel_err(grads, ref):
    return max(((grads[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)


def main():
    out_path = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, am, lmask = make_batch()
    rows = slice(rank * ids.shape[0] // world, (rank + 1) * ids.shape[0] // world)
    mine = (ids[rows], am[rows], lmask[rows])
    # global normalizer: local counts summed over ranks, divided by the world size
    count = normalizer_count(lmask[rows], "token_mean")
    dist.all_reduce(count)
    normalizer = count / world

    errors = {}
    for tied, tag in ((True, "tied"), (False, "untied_bias")):
        ref = build(tied)
        loss_fn(ref, ids, am, lmask, normalizer_count(lmask, "token_mean")).backward()
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}

        ddp = DDP(build(tied))
        loss_fn(ddp, *mine, normalizer).backward()
        grads = {n.removeprefix("module."): p.grad for n, p in ddp.named_parameters()}
        errors[f"ddp_{tag}"] = max_rel_err(grads, ref_grads)

        mesh = init_device_mesh("cpu", (world,))
        fsdp = build(tied)
        for layer in fsdp.lm.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(fsdp, mesh=mesh)
        loss_fn(fsdp, *mine, normalizer).backward()
        grads = {n: p.grad.full_tensor() for n, p in fsdp.named_parameters()}  # collective: every rank
        errors[f"fsdp2_{tag}"] = max_rel_err(grads, ref_grads)
        del ref, ddp, fsdp, grads

    if rank == 0:
        Path(out_path).write_text(json.dumps(errors))
        print(errors)
    dist.barrier()  # models are gone before the process group (avoids a SIGABRT at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
