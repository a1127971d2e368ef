"""--dry-run: the resolved config of a method file with the source of every value (command line, the recipe or
preset entry that set it, or the Args default and its comment), the global batch of one optimizer step and a per-GPU
memory estimate, from the model shapes below. Loads no weights and no data."""
import dataclasses
import json
import os
import sys
from pathlib import Path

import common
import data

# Model shapes for --dry-run: (hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings, max positions,
# qkv bias), from each model's config.json on the hub; "assumed": that copy's own config was not read.
_Q7, _Q15, _L3 = (3584, 28, 18944, 28, 4, 152064, False), (1536, 28, 8960, 12, 2, 151936), (3072, 28, 8192, 24, 8)
MODELS = {
    "Qwen/Qwen2.5-Math-1.5B": (*_Q15, True, 4096, True),
    "Qwen/Qwen2.5-1.5B": (*_Q15, True, 131072, True),  # assumed: as Qwen2.5-Math-1.5B with 128k positions (UFT)
    "Qwen/Qwen2.5-Math-7B": (*_Q7, 4096, True),
    "Qwen/Qwen2.5-7B-Instruct": (*_Q7, 32768, True),
    "Qwen/Qwen2.5-32B": (5120, 64, 27648, 40, 8, 152064, False, 131072, True),
    "Elliott/Qwen2.5-Math-7B-16k-think": (*_Q7, 16384, True),  # as Elliott/Qwen2.5-Math-7B-SFT (rope_theta 40000)
    "RoadQAQ/Qwen2.5-Math-7B-16k-think": (*_Q7, 16384, True),  # assumed: as Elliott's 16k copy
    "RoadQAQ/Qwen2.5-Math-1.5B-16k-think": (*_Q15, True, 16384, True),  # assumed: Qwen2.5-Math-1.5B, 16k
    "RoadQAQ/Qwen2.5-7B-think": (*_Q7, 16384, True),  # assumed: Qwen2.5-7B, 16k
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (*_Q15, False, 131072, True),
    "Skywork/Skywork-OR1-Math-7B": (*_Q7, 131072, True),  # assumed: as DeepSeek-R1-Distill-Qwen-7B, its base
    "meta-llama/Llama-3.2-3B": (*_L3, 128256, True, 131072, False),
    "meta-llama/Llama-3.2-3B-Instruct": (*_L3, 128256, True, 131072, False),
    "meta-llama/Llama-3.1-8B": (4096, 32, 14336, 32, 8, 128256, False, 131072, False),
    "Qwen/Qwen3-8B-Base": (4096, 36, 12288, 32, 8, 151936, False, 32768, False),  # assumed (q/k norms not counted)
    "deepseek-ai/deepseek-math-7b-base": (4096, 30, 11008, 32, 32, 102400, False, 4096, False),
    "deepseek-ai/deepseek-math-7b-instruct": (4096, 30, 11008, 32, 32, 102400, False, 4096, False),
}


def model_shape(name):
    """MODELS entry, the config.json of a local directory, the embedded tiny model, or None when unknown."""
    cfg = Path(os.path.expanduser(name)) / "config.json"
    if name.startswith("embedded") or cfg.exists():
        c = {**data.TINY, "vocab_size": len(data.SPECIAL) + len(data.CHARS), "model_type": "qwen2", **(
            json.loads(cfg.read_text()) if cfg.exists() else {})}
        return (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"],
                c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"],
                c.get("tie_word_embeddings", False), c.get("max_position_embeddings", 0), c["model_type"] == "qwen2")
    return MODELS.get(name)


def param_count(shape):
    h, n_layers, inter, heads, kv_heads, vocab, tied, _, bias = shape
    kv = h // heads * kv_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h + ((h + 2 * kv) if bias else 0)  # attn, MLP, 2 norms
    return vocab * h * (1 if tied else 2) + n_layers * layer + h


def activation_bytes(shape, tokens, w, autocast, checkpointing):
    """Bytes autograd keeps for the backward of the decoder (checked against saved tensors, tests/test_recipes.py).
    Per token and layer, with w the weight bytes: two RMSNorms (kernels/norm.py) keep their input, wh each, and a
    4-byte 1/rms;
    the linear layers keep their input (one bf16 cast per projection under autocast with fp32 weights), SDPA its q,
    k, v and output (no L x L matrix), the SwiGLU MLP 4I. Autocast with fp32 weights also keeps bf16 copies of the
    layer weights. Checkpointing keeps each layer's input and recomputes one layer at a time in backward."""
    h, n_layers, inter, heads, kv_heads = shape[:5]
    kv, a = h // heads * kv_heads, 2 if autocast or w == 2 else 4
    per_layer = 2 * (w * h + 4) + a * ((5 if autocast and w == 4 else 2) * h + 2 * h + 2 * kv + 4 * inter)
    weights = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter) if autocast and w == 4 else 0  # one layer's bf16 copies
    if checkpointing:
        return tokens * (n_layers * (4 if w == 4 else 2) * h + per_layer + w * h + 4) + weights
    return tokens * (n_layers * per_layer + w * h + 4) + n_layers * weights  # w h + 4: the final norm


def dry_run(args, frozen=(), extra_sequences=0):
    """--dry-run: print every flag with its value and source (command line, the `# comment` of the recipe or preset
    line that set it, or the flag's default), the global batch of one optimizer step and a per-GPU memory estimate.
    Loads no weights and no data. World size: $WORLD_SIZE, else 8 GPUs for a paper recipe, 1 for the embedded one."""
    module, sources = sys.modules[type(args).__module__], getattr(args, "_sources", {})
    world = int(os.environ.get("WORLD_SIZE") or (1 if args.recipe in (None, "embedded") else 8))
    defaults, unknown = common._field_comments(type(args)), []
    print(f"[dry run] {Path(module.__file__).name} --recipe {args.recipe}, world size {world} (nothing is loaded)")
    for f in dataclasses.fields(args):
        value, src = getattr(args, f.name), sources.get(f.name)
        if f.name in getattr(args, "_explicit", ()):
            src = "command line"
        elif not src:  # set by no table: the Args default and its comment
            src = f"default: {defaults.get(f.name, '')}"
        unknown += [f.name] * ("UNKNOWN" in src)
        shown = repr(value) if len(repr(value)) <= 46 else repr(value)[:40] + "...'"
        print(f"  {f.name:24s} {shown:46s} {src}")
    if hasattr(args, "batch_size"):  # teacher forcing: one demonstration per prompt
        seqs, prompts, seq_len, per = args.batch_size, args.batch_size, args.max_length, ""
    else:  # rollouts: --steps-per-generation optimizer steps (x --num-iterations passes) per rollout batch
        opt, seq_len = args.steps_per_generation, args.max_prompt_length + args.max_new_tokens
        prompts = args.prompts_per_step // opt
        seqs = (args.prompts_per_step * args.num_generations + extra_sequences) // opt
        per = f" ({opt} x {args.num_iterations} per rollout batch of {args.prompts_per_step} prompts)"
    micro = -(-seqs // (world * args.grad_accum))
    print(f"global batch per optimizer step{per}: {prompts} prompts, {seqs} sequences, <= {seqs * seq_len:,} tokens; "
          f"per GPU {args.grad_accum} micro-batch(es) of {micro} sequences x <= {seq_len} tokens")
    shape = model_shape(args.model)
    if shape is None:
        print(f"memory: no shape for '{args.model}' (not in recipes/dry_run.py MODELS); pass a local directory with config.json")
    else:
        n, w, shard = param_count(shape), data.DTYPES[args.dtype].itemsize, world if args.fsdp else 1
        h, vocab = shape[0], shape[5]
        act = {c: activation_bytes(shape, micro * seq_len, w, args.bf16 and w == 4, c) for c in (False, True)}
        parts = {"weights": n * w / shard, "gradients": n * w / shard, "AdamW state": 2 * n * w / shard,
                 "frozen models": sum(param_count(model_shape(m) or shape) * w for m in frozen),
                 "activations": act[args.gradient_checkpointing],  # the fused head: 2 tiles, fp32 dW and dh
                 "fused head": 4 * (2 * 1024 * min(32768, vocab) + vocab * h + micro * seq_len * h)}
        gib = {k: v / 2**30 for k, v in parts.items() if v}
        print(f"memory per GPU (GiB, {n / 1e6:,.0f}M parameters, {args.dtype} weights"
              f"{', bf16 autocast' if args.bf16 and w == 4 else ''}, {f'FSDP over {world}' if args.fsdp else 'DDP'}): "
              + ", ".join(f"{k} {v:.1f}" for k, v in gib.items()) + f"; total {sum(gib.values()):.1f}"
              + (" + the colocated vLLM engine" if getattr(args, "generator", "") == "vllm" else ""))
        print(f"  decoder activations of one micro-batch: {act[False] / 2**30:.1f} GiB without gradient checkpointing, "
              f"{act[True] / 2**30:.1f} GiB with; fused head: two 1024 x {min(32768, vocab)} fp32 tiles, the fp32 "
              f"weight gradient and dL/dh (never the {micro * seq_len} x {vocab} logits)")
        if shape[7] and seq_len > shape[7]:
            print(f"  WARNING: {seq_len} tokens per sequence exceed the model's max_position_embeddings {shape[7]}")
    if unknown:
        print(f"left UNKNOWN by the sources (our choices, see above): {', '.join(unknown)}")
