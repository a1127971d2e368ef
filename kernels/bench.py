"""Benchmark: naive vs fused log-probs (forward + backward), time and peak memory.

    python -m kernels.bench                      # default sizes (a few minutes on CPU)
    python -m kernels.bench --quick              # small sizes, smoke test
    python -m kernels.bench --sizes 4096x896x151936,1024x896x151936 --out bench.md
    python -m kernels.bench --sweep --out runs/bench/kernels.md      # N {1k,4k,16k} x V {32k,152k,256k}, d 896
    python -m kernels.bench --sweep --sweep-n 1024,4096 --sweep-v 32000,151936   # the subset ./run.sh bench runs

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
entropy (and naive with entropy with --naive-entropy).  In a --sweep, fused with
entropy runs at the reference size only (its overhead is a ratio that does not depend
on the shape much), and the naive path is not run where it would not fit: its peak is
estimated as NAIVE_COPIES (N, V) fp32 buffers (measured 2.9 at V = 151,936: ~1.8 GB
per 1,024 tokens) plus the weight and its gradient, against --mem-budget-gib (default
60% of the memory available at start on CPU, of the device's free memory on CUDA);
the table then says so and gives the fused figures alone.  With --out, a sweep also
writes how time and memory grow with N and V (log-log slopes) and a plot next to
the table (kernels.png).
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
SWEEP_N, SWEEP_V, SWEEP_D = (1024, 4096, 16384), (32000, 151936, 256000), 896
NAIVE_COPIES = 3  # (N, V) fp32 buffers alive at the naive path's peak (logits, log-softmax, its gradient); measured 2.9


def naive_bytes(N, d, V):
    """Estimated peak of the naive path: NAIVE_COPIES (N, V) fp32 buffers, plus the weight, its fp32 gradient and
    the hidden states with theirs."""
    return NAIVE_COPIES * N * V * 4 + 2 * V * d * 4 + 2 * N * d * 4


def default_budget(device):
    """Bytes the naive path may use: 60% of MemAvailable (CPU) or of the free device memory (CUDA)."""
    if device == "cuda":
        import torch
        return 0.6 * torch.cuda.mem_get_info()[0]
    kib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kib = int(line.split()[1])
    except OSError:
        pass
    return 0.6 * (kib * 1024 if kib else 8 * 2**30)


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
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="time = wall clock, or process CPU time "
                    "(with OMP_NUM_THREADS=1 on a machine other jobs share: what a call costs, whatever else runs)")
    ap.add_argument("--sweep", action="store_true", help=f"N in --sweep-n x V in --sweep-v at d {SWEEP_D}")
    ap.add_argument("--sweep-n", default=",".join(map(str, SWEEP_N)), help="token counts of the sweep")
    ap.add_argument("--sweep-v", default=",".join(map(str, SWEEP_V)), help="vocabulary sizes of the sweep")
    ap.add_argument("--mem-budget-gib", type=float, default=None, help="naive runs only where its estimated peak "
                    "fits (default: 60%% of the available memory)")
    ap.add_argument("--worker", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.worker:
        return _child(args)

    if args.sweep:
        sizes = sorted(((N, SWEEP_D, V) for V in map(int, args.sweep_v.split(",")) for N in
                        map(int, args.sweep_n.split(","))), key=lambda s: (s[0] * s[2], s))  # cheapest first
    else:
        sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    variants = ["naive", "fused", "fused+entropy"] + (["naive+entropy"] if args.naive_entropy else [])
    budget = args.mem_budget_gib * 2**30 if args.mem_budget_gib else default_budget(args.device)
    t_start = time.perf_counter()
    mem_kind = "peak RSS growth" if args.device == "cpu" else "peak allocated growth"
    print(f"# fused log-probs benchmark: {args.device}, {args.dtype}, chunk {args.chunk_size}, "
          f"vocab chunk {args.vocab_chunk_size or 'default'}, median of {args.repeats} interleaved rounds; "
          f"time = {'process CPU time' if args.clock == 'cpu' else 'wall clock'}; "
          f"memory = {mem_kind}", flush=True)

    header = ["N", "d", "V", "naive s", "fused s", "fused+ent s", "naive MB", "fused MB", "fused+ent MB",
              "fused/naive time", "fused/naive mem", "ent/no-ent time", "fused/naive cpu"]
    if args.naive_entropy:
        header += ["naive+ent s", "naive+ent MB"]
    rows, verdicts, notes, measured = [], [], [], {}
    def report(final):
        """The table, notes, verdicts and growth so far: printed at the end, written to --out after every shape
        (a sweep cut short keeps what it measured)."""
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        table = "\n".join(lines)
        growth = growth_lines(measured) if args.sweep else []
        took = (f"the benchmark took {time.perf_counter() - t_start:.0f} s (per shape, all its runs: "
                + ", ".join(f"{N}x{V} {m['cost_s']:.0f} s" for (N, d, V), m in measured.items()) + ")")
        if final:
            print()
            print(table)
            for v in notes + verdicts + growth + [took]:
                print(v)
        else:
            took += f"; PARTIAL: {len(rows)} of {len(sizes)} shapes so far"
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(f"fused log-probs benchmark ({args.device}, {args.dtype}, {mem_kind}; time = "
                        f"{'process CPU time' if args.clock == 'cpu' else 'wall clock'}; "
                        f"{os.environ.get('OMP_NUM_THREADS', 'default')} OpenMP thread(s); command: python -m kernels.bench "
                        f"{' '.join(sys.argv[1:])})\n\n{table}\n")
                for v in notes:
                    f.write(f"\n{v}\n")
                if verdicts:
                    f.write("\nTargets (time <= 1.0x naive, memory <= 1/8 of naive, at V >= 32k):\n\n"
                            + "\n".join(f"- {v}" for v in verdicts) + "\n")
                if growth:
                    f.write("\nHow time and memory grow (log-log slope between the smallest and largest value of one "
                            "dimension, the other fixed; 1.0 = linear):\n\n" + "\n".join(f"- {g}" for g in growth) + "\n")
                f.write(f"\n{took}\n")
            if args.sweep:
                plot(measured, os.path.join(os.path.dirname(os.path.abspath(args.out)), "kernels.png"), mem_kind)
    for N, d, V in sizes:
        here = [v for v in variants if not (args.sweep and v == "fused+entropy" and (N, d, V) != TARGET_SIZE)]
        if any(v.startswith("naive") for v in here) and naive_bytes(N, d, V) > budget:
            here = [v for v in here if not v.startswith("naive")]
            notes.append(f"{N}x{d}x{V}: naive not run: it would need ~{naive_bytes(N, d, V) / 2**30:.1f} GiB "
                         f"({NAIVE_COPIES} x N x V fp32 + weights) > the {budget / 2**30:.1f} GiB budget; fused only")
            print("  " + notes[-1], flush=True)
        runs = {v: [] for v in here}
        t_size = time.perf_counter()
        for round_ in range(args.repeats):
            for v in here:
                res = _spawn(N, d, V, v, args)
                if args.clock == "cpu":
                    res = {**res, "wall_s": res["time_s"], "time_s": res["cpu_s"]}
                runs[v].append(res)
                print(f"  {N}x{d}x{V} round {round_ + 1} {v:14s} {res.get('wall_s', res['time_s']):8.3f} s wall "
                      f"{res['cpu_s']:8.3f} s cpu {res['peak_bytes'] / 2**20:9.1f} MB", flush=True)
        nan = float("nan")
        r = {v: {"time_s": statistics.median(x["time_s"] for x in runs[v]) if v in runs else nan,
                 "cpu_s": statistics.median(x["cpu_s"] for x in runs[v]) if v in runs else nan,
                 "peak_bytes": max(x["peak_bytes"] for x in runs[v]) if v in runs else nan} for v in variants}
        nt, ft, et = r["naive"]["time_s"], r["fused"]["time_s"], r["fused+entropy"]["time_s"]
        nm, fm, em = (r[k]["peak_bytes"] / 2**20 for k in ("naive", "fused", "fused+entropy"))
        ratios = (ft / nt, fm / max(nm, 1e-9), et / ft)
        measured[(N, d, V)] = dict(naive_s=nt, fused_s=ft, naive_mb=nm, fused_mb=fm, cost_s=time.perf_counter() - t_size)

        def f(x, fmt):
            return "-" if x != x else fmt.format(x)  # NaN: not run

        row = [N, d, V, f(nt, "{:.3f}"), f(ft, "{:.3f}"), f(et, "{:.3f}"), f(nm, "{:.0f}"), f(fm, "{:.0f}"),
               f(em, "{:.0f}"), f(ratios[0], "{:.2f}"), f(ratios[1], "{:.3f}"), f(ratios[2], "{:.2f}"),
               f(r['fused']['cpu_s'] / max(r['naive']['cpu_s'], 1e-9), "{:.2f}")]
        if args.naive_entropy:
            row += [f(r['naive+entropy']['time_s'], "{:.3f}"), f(r['naive+entropy']['peak_bytes'] / 2**20, "{:.0f}")]
        rows.append(row)
        if args.sweep and V >= 32000 and nt == nt:
            verdicts.append(f"{N}x{d}x{V}: time {ratios[0]:.2f} (<= {TARGETS['time']:.1f}: "
                            f"{'met' if ratios[0] <= TARGETS['time'] else 'MISSED'}), memory {ratios[1]:.3f} (<= 1/8: "
                            f"{'met' if ratios[1] <= TARGETS['mem'] else 'MISSED'})")
        if (N, d, V) == TARGET_SIZE and args.dtype == "float32":
            verdicts.append(
                f"targets at {N}x{d}x{V}: fused/naive memory {ratios[1]:.3f} (<= {TARGETS['mem']:.3f}: "
                f"{'ok' if ratios[1] <= TARGETS['mem'] else 'MISSED'}), fused/naive time {ratios[0]:.2f} "
                f"(<= {TARGETS['time']:.2f}: {'ok' if ratios[0] <= TARGETS['time'] else 'MISSED'}), "
                f"entropy/no-entropy time {ratios[2]:.2f} (<= {TARGETS['entropy']:.2f}: "
                f"{'ok' if ratios[2] <= TARGETS['entropy'] else 'MISSED'})")
        if args.out:
            report(False)

    report(True)
    return 0


def growth_lines(measured):
    """Log-log slopes of time and memory in N (V fixed) and in V (N fixed), fused and naive."""
    import math
    out = []
    Ns, Vs = sorted({k[0] for k in measured}), sorted({k[2] for k in measured})
    for axis, values, others in (("N", Ns, Vs), ("V", Vs, Ns)):
        if len(values) < 2:
            continue
        for o in others:
            for side in ("fused", "naive"):
                keys = [((x, SWEEP_D, o) if axis == "N" else (o, SWEEP_D, x)) for x in values]
                pts = [(x, measured[k]) for x, k in zip(values, keys) if k in measured]
                pts = [(x, m) for x, m in pts if m[f"{side}_s"] == m[f"{side}_s"]]
                if len(pts) < 2:
                    continue
                (x0, m0), (x1, m1) = pts[0], pts[-1]
                k = math.log(x1 / x0)
                st = math.log(m1[f"{side}_s"] / m0[f"{side}_s"]) / k
                sm = math.log(max(m1[f"{side}_mb"], 1) / max(m0[f"{side}_mb"], 1)) / k
                out.append(f"{side} in {axis} ({x0} -> {x1}) at {'V' if axis == 'N' else 'N'} = {o}: time x"
                           f"{m1[f'{side}_s'] / m0[f'{side}_s']:.1f} (slope {st:.2f}), memory x"
                           f"{max(m1[f'{side}_mb'], 1) / max(m0[f'{side}_mb'], 1):.1f} (slope {sm:.2f})")
    return out


def plot(measured, path, mem_kind):
    """Time and peak memory against N, one line per V, fused solid and naive dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -r requirements-demo.txt)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for V in sorted({k[2] for k in measured}):
        for side, style in (("fused", "o-"), ("naive", "s--")):
            pts = sorted((N, m) for (N, _, v), m in measured.items() if v == V and m[f"{side}_s"] == m[f"{side}_s"])
            if not pts:
                continue
            axes[0].plot([N for N, _ in pts], [m[f"{side}_s"] for _, m in pts], style, label=f"{side} V={V}")
            axes[1].plot([N for N, _ in pts], [m[f"{side}_mb"] for _, m in pts], style, label=f"{side} V={V}")
    for ax, lab in zip(axes, ("forward+backward s", f"MB ({mem_kind})")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title(f"fused vs naive log-probs, d = {SWEEP_D}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
