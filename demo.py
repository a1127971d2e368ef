"""The main job (`./run.sh`): every method on the embedded default, same budget, same start, side by side.

The teacher-forcing methods (sft, dft, otr) start from the randomly initialised tiny model; the rollout methods
(grpo, chord, prefix_rft, relift, kdrl) start from the shared weak SFT warm start, as the papers start RL from an
SFT or instruct model. KDRL's teacher is a longer SFT run of the same model. Each method is a subprocess running
its own file with default flags plus the shared budget below. Output: runs/demo/summary.md and curves.png.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import common  # noqa: E402

TEACHER_FORCING = ["sft", "dft", "otr"]
ROLLOUT = ["grpo", "chord", "prefix_rft", "relift", "kdrl"]
# the same budget for every method of a family: optimizer steps x samples per step
BUDGET = {
    "sft": ["--max-steps", "300", "--batch-size", "64", "--eval-every", "50"],
    "rollout": ["--max-steps", "60", "--prompts-per-step", "16", "--num-generations", "8", "--eval-every", "10"],
}


def read_metrics(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def run(method, extra, out):
    budget = BUDGET["sft"] if method in TEACHER_FORCING else BUDGET["rollout"]
    cmd = [sys.executable, str(REPO / "methods" / f"{method}.py"), *budget, "--output-dir", str(out / method),
           "--overwrite", "--save-every", "0", "--quiet", *extra]
    print(f"\n[demo] {method}: {' '.join(cmd[1:])}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.time() - t


def summarize(out, methods, walls):
    rows, curves = [], {}
    for m in methods:
        rec = read_metrics(out / m / "metrics.jsonl")
        acc = [(r["step"], r["eval/accuracy"]) for r in rec if "eval/accuracy" in r]
        reward = [(r["step"], r["train/reward"]) for r in rec if "train/reward" in r]
        last = [r for r in rec if "perf/tokens" in r][-1]
        curves[m] = (acc, reward)
        rows.append((m, acc[0][1], acc[-1][1], walls[m], last["perf/tokens"], last.get("perf/peak_memory_mb", 0.0)))
    lines = ["| method | start accuracy | final accuracy | wall time (s) | tokens processed | peak memory (MB) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {a0:.3f} | {a1:.3f} | {w:.0f} | {tok:,} | {mem:.0f} |" for m, a0, a1, w, tok, mem in rows]
    return "\n".join(lines), curves, rows


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for m, (acc, reward) in curves.items():
        ax1.plot(*zip(*acc), marker="o", ms=3, label=m)
        if reward:
            steps, r = zip(*reward)
            k = 5  # moving average: per-step rewards are noisy
            sm = [sum(r[max(0, i - k + 1):i + 1]) / len(r[max(0, i - k + 1):i + 1]) for i in range(len(r))]
            ax2.plot(steps, sm, label=m)
    ax1.set(title="held-out accuracy (greedy)", xlabel="training step", ylabel="accuracy")
    ax2.set(title="training reward (rollout methods, 5-step mean)", xlabel="rollout step", ylabel="reward")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(TEACHER_FORCING + ROLLOUT), help="comma-separated subset")
    p.add_argument("--output-dir", default="runs/demo")
    a = p.parse_args()
    methods = a.methods.split(",")
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # 1. the shared starting points (cached after the first run)
    for stage in ["embedded", "embedded:warm"] + (["embedded:teacher"] if "kdrl" in methods else []):
        t = time.time()
        print(f"[demo] {stage}: {common.resolve_model(stage)} ({time.time() - t:.0f} s)", flush=True)
    # 2. every method, one after the other (2 cores: running them side by side would only slow each down)
    walls = {m: run(m, [], out) for m in methods}
    # 3. the table and the curves
    table, curves, rows = summarize(out, methods, walls)
    total = time.time() - t0
    text = (f"# postrain demo: every method on the embedded default\n\nTotal time {total:.0f} s. Teacher-forcing "
            f"methods start from the random base model ({' '.join(BUDGET['sft'])}); rollout methods from the "
            f"SFT warm start ({' '.join(BUDGET['rollout'])}).\n\n{table}\n")
    (out / "summary.md").write_text(text)
    plot(curves, out / "curves.png")
    print("\n" + text)
    print(f"[demo] wrote {out / 'summary.md'} and {out / 'curves.png'}")
    worse = [m for m, a0, a1, *_ in rows if a1 <= a0]
    if worse:
        print(f"[demo] warning: final accuracy did not rise for {', '.join(worse)}")


if __name__ == "__main__":
    main()
