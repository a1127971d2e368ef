"""Benchmark: naive vs fused log-probs (forward + backward), time and peak memory.

    python -m kernels.bench                      # default sizes (a few minutes on CPU)
    python -m kernels.bench --quick              # small sizes, smoke test
    python -m kernels.bench --sizes 4096x896x151936,1024x896x151936 --out bench.md

Each measurement runs in a fresh child process so that peak memory is its own:
on CPU the growth of the peak resident set (VmHWM, reset to the current RSS after the
inputs are allocated; `ru_maxrss` where that is unavailable), on CUDA
`max_memory_allocated` over the allocated baseline.
Time is wall-clock (the process CPU time is printed per run too, a check on a
shared machine), the median over `--repeats` rounds; each round runs every variant once (a
fresh child: a small warm-up call, then one timed forward+backward), so that the
variants are interleaved and a slow spell of a shared machine hits them alike.
The step is  loss = <logp, g> (+ <entropy, g_H>),  gradients w.r.t. hidden and weight.

Variants: naive (fp32 (N, V) logits -> log_softmax -> gather), fused, fused with
entropy (and naive with entropy with --naive-entropy).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULT_SIZES = [(1024, 896, 151936), (2048, 896, 32000), (4096, 896, 151936)]
QUICK_SIZES = [(256, 64, 3000), (500, 96, 10007)]
# targets checked at the reference size (fp32): memory ratio, time ratio, entropy overhead
TARGET_SIZE = (4096, 896, 151936)
TARGETS = {"mem": 1 / 8, "time": 1.0, "entropy": 1.1}


# ----------------------------------------------------------------------------------
# child process: one (size, variant)
# ----------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_memory_baseline() -> int:
    """Reset the peak-RSS high-water mark to the current RSS (Linux: write 5 to
    /proc/self/clear_refs) and return that baseline in bytes.  Without it, fall back to
    the lifetime peak `ru_maxrss`, which may hide up to the size of set-up transients."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except (OSError, TypeError):
        return _rss_peak_bytes()


def _rss_peak_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_case(N, d, V, variant, dtype, device, chunk_size, vocab_chunk_size):
    """Time and peak memory of one forward+backward of one variant, after a warm-up
    call on the first 64 rows (thread pools, allocator); returns a dict."""
    import torch

    from kernels.logprob import fused_logprobs, naive_logprobs

    dt = getattr(torch, dtype)
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, d, generator=g).to(dev, dt).requires_grad_()
    weight = torch.randn(V, d, generator=g).mul_(d ** -0.5).to(dev, dt).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(dev)
    up_logp = torch.randn(N, generator=g).to(dev)
    up_ent = torch.randn(N, generator=g).to(dev)
    with_entropy = variant.endswith("+entropy")

    def step(rows):
        h, t = hidden[:rows], targets[:rows]
        if variant.startswith("fused"):
            logp, ent = fused_logprobs(h, weight, t, None, 1.0, chunk_size, with_entropy, vocab_chunk_size)
        else:
            logp, ent = naive_logprobs(h, weight, t, None, 1.0, with_entropy=with_entropy)
        loss = (logp * up_logp[:rows]).sum()
        if with_entropy:
            loss = loss + (ent * up_ent[:rows]).sum()
        grads = torch.autograd.grad(loss, (hidden, weight))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return grads

    step(min(N, 64))  # warm-up (its gradients are freed on return)

    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _cpu_memory_baseline()
    t0, c0 = time.perf_counter(), time.process_time()
    grads = step(N)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    del grads
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss_peak_bytes()) - base
    return {"time_s": elapsed, "cpu_s": cpu, "peak_bytes": max(peak, 0)}


def _child(args) -> int:
    N, d, V = map(int, args.worker[:3])
    res = run_case(N, d, V, args.worker[3], args.dtype, args.device, args.chunk_size, args.vocab_chunk_size)
    print("RESULT " + json.dumps(res), flush=True)
    return 0


# ----------------------------------------------------------------------------------
# parent: run every case in a fresh process, print the table
# ----------------------------------------------------------------------------------
def _spawn(N, d, V, variant, args) -> dict:
    cmd = [sys.executable, "-m", "kernels.bench", "--worker", str(N), str(d), str(V), variant,
           "--dtype", args.dtype, "--device", args.device, "--chunk-size", str(args.chunk_size)]
    if args.vocab_chunk_size:
        cmd += ["--vocab-chunk-size", str(args.vocab_chunk_size)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"benchmark child failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")


def _parse_sizes(text: str):
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"size {item!r} is not NxDxV")
        sizes.append(tuple(int(p) for p in parts))
    return sizes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    ap.add_argument("--sizes", type=_parse_sizes, default=None, help="comma-separated NxDxV, e.g. 4096x896x151936")
    ap.add_argument("--out", default=None, help="also write the table as markdown to this file")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (median time); default 3, quick 1")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--vocab-chunk-size", type=int, default=None)
    ap.add_argument("--naive-entropy", action="store_true", help="also run naive with entropy")
    ap.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.worker:
        return _child(args)

    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    variants = ["naive", "fused", "fused+entropy"] + (["naive+entropy"] if args.naive_entropy else [])
    mem_kind = "peak RSS growth" if args.device == "cpu" else "peak allocated growth"
    print(f"# fused log-probs benchmark: {args.device}, {args.dtype}, chunk {args.chunk_size}, "
          f"vocab chunk {args.vocab_chunk_size or 'default'}, median of {args.repeats} interleaved rounds; "
          f"memory = {mem_kind}", flush=True)

    header = ["N", "d", "V", "naive s", "fused s", "fused+ent s", "naive MB", "fused MB", "fused+ent MB",
              "fused/naive time", "fused/naive mem", "ent/no-ent time", "fused/naive cpu"]
    if args.naive_entropy:
        header += ["naive+ent s", "naive+ent MB"]
    rows, verdicts = [], []
    for N, d, V in sizes:
        runs = {v: [] for v in variants}
        for round_ in range(args.repeats):
            for v in variants:
                res = _spawn(N, d, V, v, args)
                runs[v].append(res)
                print(f"  {N}x{d}x{V} round {round_ + 1} {v:14s} {res['time_s']:8.3f} s wall "
                      f"{res['cpu_s']:8.3f} s cpu {res['peak_bytes'] / 2**20:9.1f} MB", flush=True)
        r = {v: {"time_s": statistics.median(x["time_s"] for x in runs[v]),
                 "cpu_s": statistics.median(x["cpu_s"] for x in runs[v]),
                 "peak_bytes": max(x["peak_bytes"] for x in runs[v])} for v in variants}
        nt, ft, et = r["naive"]["time_s"], r["fused"]["time_s"], r["fused+entropy"]["time_s"]
        nm, fm, em = (r[k]["peak_bytes"] / 2**20 for k in ("naive", "fused", "fused+entropy"))
        ratios = (ft / nt, fm / max(nm, 1e-9), et / ft)
        row = [N, d, V, f"{nt:.3f}", f"{ft:.3f}", f"{et:.3f}", f"{nm:.0f}", f"{fm:.0f}", f"{em:.0f}",
               f"{ratios[0]:.2f}", f"{ratios[1]:.3f}", f"{ratios[2]:.2f}",
               f"{r['fused']['cpu_s'] / max(r['naive']['cpu_s'], 1e-9):.2f}"]
        if args.naive_entropy:
            row += [f"{r['naive+entropy']['time_s']:.3f}", f"{r['naive+entropy']['peak_bytes'] / 2**20:.0f}"]
        rows.append(row)
        if (N, d, V) == TARGET_SIZE and args.dtype == "float32":
            verdicts.append(
                f"targets at {N}x{d}x{V}: fused/naive memory {ratios[1]:.3f} (<= {TARGETS['mem']:.3f}: "
                f"{'ok' if ratios[1] <= TARGETS['mem'] else 'MISSED'}), fused/naive time {ratios[0]:.2f} "
                f"(<= {TARGETS['time']:.2f}: {'ok' if ratios[0] <= TARGETS['time'] else 'MISSED'}), "
                f"entropy/no-entropy time {ratios[2]:.2f} (<= {TARGETS['entropy']:.2f}: "
                f"{'ok' if ratios[2] <= TARGETS['entropy'] else 'MISSED'})")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    table = "\n".join(lines)
    print()
    print(table)
    for v in verdicts:
        print(v)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"fused log-probs benchmark ({args.device}, {args.dtype}, {mem_kind})\n\n{table}\n")
            for v in verdicts:
                f.write(f"\n{v}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
