"""GPU check (issue 23): the fused log-prob kernels and a GRPO step of a 0.5B-shaped model on a CUDA machine.

    ./run.sh bench --gpu                       # = python tests/gpu_check.py (needs CUDA)
    python tests/gpu_check.py --cpu-smoke      # tiny sizes on CPU: checks that this script itself works
    python tests/gpu_check.py --no-grpo --sizes 4096x896x151936

What it does, in order, and writes to ONE file ($OUT/gpu_check.md when $OUT is set, else runs/bench/gpu_check.md;
--out overrides):
(a) correctness: kernels.logprob.fused_logprobs against the naive path (fp32 (N, V) logits -> log_softmax ->
    gather, and the entropy -sum p log p) on the same inputs, values and gradients w.r.t. hidden and weight of
    loss = <logp, g> (+ <entropy, g_H>) with random upstream g, g_H; in fp32 and bf16 inputs, at every --sizes
    (default N 4096, d 896 and 2048, V 151,936). TF32 is switched off for the check (both sides then do fp32
    matmuls). Error = max |fused - naive| / max |naive| per tensor. Tolerances (TOL): values and entropy 1e-5
    (both sides compute in fp32; only the summation order differs); gradients 1e-4 for fp32 inputs (dW sums N
    rows in another order), 1e-2 for bf16 inputs (the fused kernel returns gradients in the input dtype: bf16's
    8-bit mantissa is a relative step of 2^-8 = 3.9e-3). FusedLM (kernels/engine.py) is checked too: on a
    random 2-layer model with the size's d and V, its per-token log-probs and the gradient of the head weight
    against the model's own logits -> log_softmax -> gather (same tolerances).
(b) speed and memory: one forward+backward of naive, fused, fused+entropy, and Liger-Kernel's fused linear
    cross-entropy (LigerFusedLinearCrossEntropyLoss, reduction "sum" = -sum logp: the same quantity; skipped with
    the reason printed when liger_kernel is not importable), median of --repeats timed calls after 2 warm-up
    calls, CUDA-synchronised; peak memory = torch.cuda.max_memory_allocated over the baseline of the inputs.
(c) GRPO: methods/grpo.py --generator hf on a randomly initialised model of Qwen2.5-0.5B's shape (hidden 896, 24
    layers, 14 heads, 2 KV heads, intermediate 4864, vocab 151,936, tied embeddings), built locally with
    from_config and saved with save_pretrained, with a tokenizer of exactly 151,936 entries: the embedded
    character tokenizer's pipeline and chat template, its 83 tokens first, then filler tokens made of 2-3
    embedded characters (never produced by encoding, but they decode to text, so every sampled id is readable).
    The reward is tests/bench_trl.py:digit_reward (a random model's exact-match reward is 0 everywhere).
    Reported: s/step (generation + training; median of the steps after the first) and peak memory (the method's
    perf/peak_memory_mb), in fp32 and with --bf16 autocast.
Exit status: 1 when any value/gradient check fails (or a GRPO run fails), else 0.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOL = {"float32": {"value": 1e-5, "grad": 1e-4}, "bfloat16": {"value": 1e-5, "grad": 1e-2}}
QWEN05 = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1000000.0,
              rms_norm_eps=1e-6)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU, one GRPO step (tests/test_gpu_check)")
    ap.add_argument("--sizes", default=None, help="comma-separated NxDxV (default 4096x896x151936,4096x2048x151936)")
    ap.add_argument("--time-sizes", default=None, help="NxDxV for the timing (default: --sizes and 16384x896x151936)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median)")
    ap.add_argument("--grpo-steps", type=int, default=4, help="GRPO steps of the 0.5B-shaped model (first: warm-up)")
    ap.add_argument("--no-grpo", action="store_true", help="skip (c)")
    ap.add_argument("--out", default=None, help="result file (default $OUT/gpu_check.md or runs/bench/gpu_check.md)")
    a = ap.parse_args()
    a.sizes = _sizes(a.sizes or ("64x40x1000" if a.cpu_smoke else "4096x896x151936,4096x2048x151936"))
    a.time_sizes = _sizes(a.time_sizes) if a.time_sizes else (a.sizes[:1] if a.cpu_smoke else
                                                              a.sizes + [(16384, 896, 151936)])
    if a.out is None:
        a.out = str(Path(os.environ["OUT"]) / "gpu_check.md") if os.environ.get("OUT") else str(
            REPO / "runs" / "bench" / "gpu_check.md")
    return a


def _sizes(text):
    return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s.strip()]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def inputs(N, d, V, dtype, dev, seed=0):
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, d, generator=g).to(dev, dtype).requires_grad_()
    w = torch.randn(V, d, generator=g).mul_(d ** -0.5).to(dev, dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g).to(dev)
    return h, w, t, torch.randn(N, generator=g).to(dev), torch.randn(N, generator=g).to(dev)


# ----------------------------------------------------------------------------------------------------------------
# (a) values and gradients
# ----------------------------------------------------------------------------------------------------------------
def check_kernel(N, d, V, dtype_name, dev, report):
    import torch
    from kernels.logprob import fused_logprobs, naive_logprobs
    dtype, tol, ok = getattr(torch, dtype_name), TOL[dtype_name], True
    for with_ent in (False, True):
        h, w, t, g, gh = inputs(N, d, V, dtype, dev)
        res = {}
        for name, fn in (("naive", naive_logprobs), ("fused", fused_logprobs)):
            logp, ent = fn(h, w, t, None, 1.0, 1024, with_ent)
            loss = (logp * g).sum() + ((ent * gh).sum() if with_ent else 0)
            gh_, gw_ = torch.autograd.grad(loss, (h, w))
            res[name] = dict(logp=logp.detach(), ent=None if ent is None else ent.detach(), dh=gh_, dw=gw_)
            del logp, ent, loss
        errs = {"logp": (rel_err(res["fused"]["logp"], res["naive"]["logp"]), tol["value"]),
                "dL/dh": (rel_err(res["fused"]["dh"], res["naive"]["dh"].to(dtype)), tol["grad"]),
                "dL/dW": (rel_err(res["fused"]["dw"], res["naive"]["dw"].to(dtype)), tol["grad"])}
        if with_ent:
            errs["entropy"] = (rel_err(res["fused"]["ent"], res["naive"]["ent"]), tol["value"])
        for k, (e, tl) in errs.items():
            good = e <= tl
            ok &= good
            report.append(f"| fused_logprobs | {N}x{d}x{V} | {dtype_name} | {'logp+entropy' if with_ent else 'logp'} "
                          f"| {k} | {e:.2e} | {tl:.0e} | {'ok' if good else 'FAIL'} |")
        del res, h, w
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return ok


def check_fusedlm(d, V, dtype_name, dev, report, B=4, L=256):
    """FusedLM's log-probs and head-weight gradient against the wrapped model's own logits on a random 2-layer model."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from kernels.engine import FusedLM
    dtype, tol = getattr(torch, dtype_name), TOL[dtype_name]
    heads = max(d // 64, 2)
    cfg = Qwen2Config(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=2 if heads % 2 == 0 else 1,
                      max_position_embeddings=max(L, 256), tie_word_embeddings=True)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(cfg).to(dev, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g).to(dev)
    am = torch.ones_like(ids)
    am[0, : L // 4] = 0  # one left-padded row
    lmask = torch.zeros_like(ids)
    lmask[:, L // 2:] = 1
    up = torch.randn(B, L, generator=g).to(dev)
    # naive: the model's logits (B, L, V), fp32 log_softmax, gather (positions shifted by one)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = lm(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False).logits.float()
    ref = torch.zeros(B, L, device=dev)
    ref[:, 1:] = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    ref = ref * lmask
    (gw_ref,) = torch.autograd.grad((ref * up).sum(), (lm.get_output_embeddings().weight,))
    del logits
    fused = FusedLM(lm, fast=True)
    out = fused(ids, am, lmask, 1.0, False)
    (gw,) = torch.autograd.grad((out["logp"] * up).sum(), (lm.get_output_embeddings().weight,))
    ok = True
    for k, e, tl in (("logp", rel_err(out["logp"], ref), tol["value"] * 100),
                     ("dL/dW_head", rel_err(gw, gw_ref), tol["grad"] * 10)):
        good = e <= tl
        ok &= good
        report.append(f"| FusedLM ({fused.summary.split(';')[-1].strip()}) | B{B} L{L} d{d} V{V} | {dtype_name} | "
                      f"logp | {k} | {e:.2e} | {tl:.0e} | {'ok' if good else 'FAIL'} |")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# (b) time and peak memory
# ----------------------------------------------------------------------------------------------------------------
def time_variant(N, d, V, dtype_name, dev, variant, repeats):
    import torch
    from kernels.logprob import fused_logprobs, naive_logprobs
    dtype = getattr(torch, dtype_name)
    h, w, t, g, gh = inputs(N, d, V, dtype, dev)
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def step():
        if variant == "liger":
            loss = ce(w, h, t)
            loss = loss[0] if isinstance(loss, tuple) else loss
        else:
            fn = fused_logprobs if variant.startswith("fused") else naive_logprobs
            logp, ent = fn(h, w, t, None, 1.0, 1024, variant.endswith("+entropy"))
            loss = (logp * g).sum() + ((ent * gh).sum() if ent is not None else 0)
        grads = torch.autograd.grad(loss, (h, w))
        sync(dev)
        return loss.detach(), grads

    for _ in range(2):
        step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        del out
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else float("nan")
    return statistics.median(times), peak


def liger_value_check(N, d, V, dtype_name, dev):
    """Liger's summed cross-entropy against -sum(naive logp): relative error (informative, not a pass/fail)."""
    import torch
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    from kernels.logprob import naive_logprobs
    h, w, t, _, _ = inputs(N, d, V, getattr(torch, dtype_name), dev)
    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(w, h, t)
    loss = loss[0] if isinstance(loss, tuple) else loss
    ref = -naive_logprobs(h, w, t)[0].sum()
    return abs(float(loss) - float(ref)) / abs(float(ref))


def sync(dev):
    import torch
    if dev.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# (c) GRPO steps of a 0.5B-shaped random model
# ----------------------------------------------------------------------------------------------------------------
def build_tokenizer(vocab_size):
    """The embedded character tokenizer's pipeline and chat template with exactly `vocab_size` entries: its own
    tokens first, then filler tokens of 2-3 embedded characters (decodable, never produced by encoding)."""
    import itertools
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    import data
    chars = [data._byte_level(c) for c in data.CHARS]
    vocab = {t: i for i, t in enumerate(data.SPECIAL + chars)}
    for n in (2, 3):
        for combo in itertools.product(chars, repeat=n):
            if len(vocab) >= vocab_size:
                break
            vocab.setdefault("".join(combo), len(vocab))
    if len(vocab) != vocab_size:
        raise SystemExit(f"error: cannot build a tokenizer of {vocab_size} entries (got {len(vocab)})")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(data.QWEN2_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   unk_token="<|pad|>", additional_special_tokens=data.SPECIAL[2:])
    fast.chat_template = data.CHAT_TEMPLATE
    return fast


def build_model(path, config, vocab_size):
    """A randomly initialised Qwen2 of `config` with a `vocab_size` tokenizer, saved to `path` (cached)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    if (Path(path) / "config.json").exists():
        return str(path)
    tok = build_tokenizer(vocab_size)
    cfg = Qwen2Config(vocab_size=vocab_size, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.eos_token_id, **config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = Path(str(path) + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)
    return str(path)


def run_grpo(model_path, steps, smoke, extra, work):
    out = Path(work) / ("grpo" + "".join(extra).replace("-", "_"))
    cmd = [sys.executable, str(REPO / "methods" / "grpo.py"), "--model", model_path, "--generator", "hf",
           "--max-steps", str(steps), "--eval-size", "4", "--eval-every", "0", "--eval-samples", "0",
           "--save-every", "0", "--quiet", "--reward", "tests/bench_trl.py:digit_reward", "--output-dir", str(out),
           "--overwrite", "--max-prompt-length", "64", "--warmup-steps", "0"]
    cmd += (["--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "8"] if smoke else ["--prompts-per-step", "8", "--num-generations", "8", "--max-new-tokens", "128"]) + extra
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return None, f"failed (exit {p.returncode}): {(p.stdout + p.stderr)[-1500:]}"
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "perf/gen_time" in r]
    keep = rows[1:] or rows
    return dict(step_s=statistics.median(r["perf/gen_time"] + r["perf/train_time"] for r in keep),
                gen_s=statistics.median(r["perf/gen_time"] for r in keep),
                train_s=statistics.median(r["perf/train_time"] for r in keep),
                peak_mb=max(r.get("perf/peak_memory_mb", float("nan")) for r in rows), steps=len(rows),
                wall_s=wall, reward=[round(r.get("train/reward", float("nan")), 3) for r in rows]), None


# ----------------------------------------------------------------------------------------------------------------
def main():
    a = parse()
    import torch
    if a.cpu_smoke:
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this check is for a GPU machine (on CPU: --cpu-smoke)")
    else:
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (smoke test)"
    lines = [f"# GPU check ({name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"command: python tests/gpu_check.py {' '.join(sys.argv[1:])}", "",
             "## (a) values and gradients, fused vs naive (error = max|fused - naive| / max|naive|)", "",
             "| kernel | shape | input dtype | loss | tensor | error | tolerance | result |", "|---|---|---|---|---|---|---|---|"]
    ok = True
    for N, d, V in a.sizes:
        for dt in ("float32", "bfloat16"):
            ok &= check_kernel(N, d, V, dt, dev, lines)
            print(lines[-1], flush=True)
    for N, d, V in a.sizes:
        ok &= check_fusedlm(d, V, "float32", dev, lines, L=32 if a.cpu_smoke else 256)
        print(lines[-1], flush=True)

    lines += ["", f"## (b) time and peak memory of one forward+backward (median of {a.repeats}, after 2 warm-up calls)", ""]
    try:
        import liger_kernel  # noqa: F401
        variants, liger_note = ["naive", "fused", "fused+entropy", "liger"], "Liger-Kernel " + getattr(
            liger_kernel, "__version__", "(version unknown)")
    except ImportError as e:
        variants, liger_note = ["naive", "fused", "fused+entropy"], f"Liger-Kernel skipped: not importable ({e})"
    if variants[-1] == "liger" and dev.type != "cuda":
        variants, liger_note = variants[:-1], "Liger-Kernel skipped: its Triton kernels need CUDA"
    lines += [liger_note, "", "| shape | dtype | " + " | ".join(f"{v} ms" for v in variants) + " | "
              + " | ".join(f"{v} MB" for v in variants) + " | fused/naive time | fused/naive mem |",
              "|" + "---|" * (2 * len(variants) + 4)]
    print(liger_note, flush=True)
    for N, d, V in a.time_sizes:
        for dt in ("float32", "bfloat16"):
            res = {}
            for v in variants:
                try:
                    res[v] = time_variant(N, d, V, dt, dev, v, a.repeats)
                except Exception as e:  # e.g. naive out of memory at the largest shape: say so, keep going
                    res[v] = (float("nan"), float("nan"))
                    lines.append(f"<!-- {v} at {N}x{d}x{V} {dt}: {type(e).__name__}: {str(e)[:200]} -->")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            tn, mn = res["naive"]
            tf, mf = res["fused"]
            lines.append(f"| {N}x{d}x{V} | {dt} | " + " | ".join(f"{res[v][0] * 1e3:.1f}" for v in variants) + " | "
                         + " | ".join(f"{res[v][1]:.0f}" for v in variants) + f" | {tf / tn:.2f} | {mf / mn:.3f} |")
            print(lines[-1], flush=True)
    if "liger" in variants:
        N, d, V = a.sizes[0]
        lines.append(f"\nLiger's summed cross-entropy vs -sum(naive logp) at {N}x{d}x{V} fp32: relative error "
                     f"{liger_value_check(N, d, V, 'float32', dev):.2e}")

    if not a.no_grpo:
        import common
        lines += ["", "## (c) GRPO (methods/grpo.py --generator hf)", ""]
        if a.cpu_smoke:
            path = build_model(common.CACHE / "bench" / "smoke-v1000", SMOKE_MODEL, 1000)
            shape, steps = f"smoke model {SMOKE_MODEL}, vocab 1000", 1
        else:
            path = build_model(common.CACHE / "bench" / "qwen2.5-0.5b-shape", QWEN05, 151936)
            shape, steps = f"random Qwen2.5-0.5B shape {QWEN05}, vocab 151,936", a.grpo_steps
        lines += [f"model: {shape} at {path}", "",
                  "| run | steps | s/step | generation s | training s | peak MB | rewards | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        import tempfile
        with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
            for label, extra in (("fp32", []), ("bf16 autocast", ["--bf16"])):
                if extra and dev.type != "cuda":
                    continue
                r, err = run_grpo(path, steps, a.cpu_smoke, extra, work)
                if r is None:
                    ok = False
                    lines.append(f"| {label} | GRPO {err.replace(chr(10), ' ')} |")
                else:
                    lines.append(f"| {label} | {r['steps']} | {r['step_s']:.3f} | {r['gen_s']:.3f} | "
                                 f"{r['train_s']:.3f} | {r['peak_mb']:.0f} | {r['reward']} | {r['wall_s']:.0f} |")
                print(lines[-1], flush=True)
    lines += ["", f"RESULT: {'all checks passed' if ok else 'A CHECK FAILED'}; the check took "
              f"{time.perf_counter() - t_start:.0f} s"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"{lines[-1]}\nwrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
