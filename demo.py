"""The main job (`./run.sh`): every method on the embedded default, each run exactly as `python methods/X.py`.

Each method runs as a subprocess with its own defaults (its `embedded` recipe: the tiny-model settings, with the
source of every choice in the method file), so the table shows what a user gets with no arguments. Starting points:
SFT trains the randomly initialised tiny model; every other method starts from the shared weak SFT warm start
(`embedded:warm`), as the papers start from a base or instruct model that can already attempt the task. Two
same-start baselines make the families comparable: `sft (warm)` is sft.py from the warm start with dft.py's and
otr.py's steps, batch and lr; `grpo` is the base of the rollout family. KDRL's teacher is a longer SFT run
(`embedded:teacher`). Runs go --jobs at a time (default 2, each with cores / jobs threads; on 2 cores, 100 grpo.py
steps took 114 s for two one-thread runs side by side and 95 s for one two-thread run: 1.7x the throughput), longest
first, each as soon as the starting point it needs is built. Held-out accuracy is logged greedy and as mean@4 at
T 0.7 (every file's --eval-samples/--eval-temperature in its embedded recipe). Output: runs/demo/summary.md and
runs/demo/curves.png.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import data  # noqa: E402

# name -> (method file, extra flags); no extra flags = the method's own no-argument defaults
RUNS = {
    "sft": ("sft", []),
    "sft (warm)": ("sft", ["--model", "embedded:warm", "--lr", "2e-4"]),  # dft.py's and otr.py's start and lr
    "dft": ("dft", []),
    "otr": ("otr", []),
    "grpo": ("grpo", []),
    "chord": ("chord", []),
    "prefix_rft": ("prefix_rft", []),
    "relift": ("relift", []),
    "kdrl": ("kdrl", []),
}
TEACHER_FORCING = ["sft", "dft", "otr"]


def read_metrics(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def run(name, out, threads):
    """One method as a subprocess with `threads` CPU threads; its output goes to <run dir>/log.txt."""
    method, extra = RUNS[name]
    path = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    cmd = [sys.executable, str(REPO / "methods" / f"{method}.py"), *extra, "--output-dir", str(path),
           "--overwrite", "--save-every", "0", "--quiet"]
    print(f"[demo] start {name}: python {' '.join(cmd[1:])}", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with open(out / f"{path.name}.log", "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
    if r.returncode:
        raise SystemExit(f"[demo] {name} failed (exit {r.returncode}); its output: {out / f'{path.name}.log'}")
    print(f"[demo] done {name} in {time.time() - t:.0f} s", flush=True)
    return time.time() - t, path


def build(stage, threads):
    t = time.time()
    r = subprocess.run([sys.executable, "-c", f"import common; data.resolve_model({stage!r})"], cwd=REPO,
                       env=_env(threads))
    if r.returncode:
        raise SystemExit(f"[demo] building {stage} failed (see the output above)")
    print(f"[demo] {stage} ready ({time.time() - t:.0f} s)", flush=True)


def _env(threads):
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def summarize(results):
    rows, curves = [], {}
    for name, (wall, path) in results.items():
        rec = read_metrics(path / "metrics.jsonl")
        curve = {key: [(r["step"], r[key]) for r in rec if key in r]
                 for key in ("eval/accuracy", "eval/sampled_accuracy", "train/reward")}
        acc, smp = curve["eval/accuracy"], curve["eval/sampled_accuracy"] or [(0, float("nan"))]
        last = [r for r in rec if "perf/tokens" in r][-1]
        start = json.loads((path / "config.json").read_text())["args"]["model"]
        curves[name] = curve
        rows.append((name, start, acc[0][1], acc[-1][1], max(a for _, a in acc), smp[0][1], smp[-1][1], acc[-1][0],
                     wall, last["perf/tokens"], last.get("perf/peak_memory_mb", 0.0)))
    lines = ["| method | starts from | greedy: start | final | best | mean@4: start | final | steps | wall time (s) "
             "| tokens | peak memory (MB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s} | {a0:.3f} | {a1:.3f} | {ab:.3f} | {s0:.3f} | {s1:.3f} | {k} | {w:.0f} | {tok:,} | "
              f"{mem:.0f} |" for n, s, a0, a1, ab, s0, s1, k, w, tok, mem in rows]
    return "\n".join(lines), curves, rows


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for i, (name, c) in enumerate(curves.items()):
        col, color = (0 if RUNS[name][0] in TEACHER_FORCING else 1), f"C{i}"
        axes[0, col].plot(*zip(*c["eval/accuracy"]), marker="o", ms=3, color=color, label=name)
        if c["eval/sampled_accuracy"]:
            axes[1, col].plot(*zip(*c["eval/sampled_accuracy"]), marker="o", ms=3, color=color, label=name)
        if c["train/reward"]:  # rollout methods: the training reward, mean of 10 steps
            steps, r = zip(*c["train/reward"])
            smooth = [sum(r[max(0, j - 9):j + 1]) / len(r[max(0, j - 9):j + 1]) for j in range(len(r))]
            axes[1, 1].plot(steps, smooth, ls=":", color=color, label=f"{name}: training reward")
    for row, what in enumerate(["greedy", "mean@4 of samples"]):
        axes[row, 0].set(title=f"teacher forcing: held-out accuracy ({what})", xlabel="optimizer step")
        axes[row, 1].set(title=f"rollout methods: held-out accuracy ({what})", xlabel="rollout step")
    for ax in axes.flat:
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each with (CPU cores / jobs) threads (on 2 "
                   "cores, 100 grpo.py steps: two one-thread runs side by side took 114 s, one two-thread run 95 s)")
    a = p.parse_args()
    names = [m.strip() for m in a.methods.split(",")]
    unknown = [m for m in names if m not in RUNS]
    if unknown:
        raise common.UserError(f"--methods: unknown {unknown}; choose from {', '.join(RUNS)}")
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    t0 = time.time()
    data.resolve_model("embedded")
    # 1. the shared starting points (methods/sft.py runs, cached under .cache/embedded) and every method, --jobs at
    # a time: the longest first, each run once the starting point it needs is built
    stages = ["embedded:teacher"] * ("kdrl" in names) + ["embedded:warm"] * any(n != "sft" for n in names)
    short = [n for n in names if n != "sft" and RUNS[n][0] in TEACHER_FORCING]  # the 400-step warm-start runs
    order = [n for n in names if n not in short] + short
    needs = {n: [] if n == "sft" else ["embedded:warm"] + ["embedded:teacher"] * (n == "kdrl") for n in names}
    with ThreadPoolExecutor(a.jobs) as pool:
        built = {s: pool.submit(build, s, threads) for s in stages}  # submitted first, so never waited on unstarted

        def start_after_needs(name):
            for s in needs[name]:
                built[s].result()
            return run(name, out, threads)
        futures = {n: pool.submit(start_after_needs, n) for n in order}
        results = {n: futures[n].result() for n in names}
    # 2. the table and the curves
    table, curves, rows = summarize(results)
    total = time.time() - t0
    text = (f"# postrain demo: every method on the embedded default\n\nTotal time {total:.0f} s (including building "
            f"the cached starting points), {a.jobs} runs at a time with {threads} thread(s) each. Each row is "
            f"`python methods/<file>.py` with its defaults; `sft (warm)` adds `{' '.join(RUNS['sft (warm)'][1])}`. "
            "Held-out accuracy on the 256 problems of the eval split: greedy exact match, and mean@4, the mean "
            "exact match of 4 samples per problem at temperature 0.7 (what the rollout methods optimise; the papers "
            "report avg@k).\n\n" + table + "\n")
    (out / "summary.md").write_text(text)
    plot(curves, out / "curves.png")
    print("\n" + text)
    print(f"[demo] wrote {out / 'summary.md'} and {out / 'curves.png'}")
    worse = [r[0] for r in rows if r[3] <= r[2] or r[6] <= r[5]]
    if worse:
        print(f"[demo] warning: final accuracy did not rise for {', '.join(worse)}")


if __name__ == "__main__":
    main()
