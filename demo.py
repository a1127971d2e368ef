"""The main job (`./run.sh`): every method on the embedded default, each run exactly as `python methods/X.py`.

Each method runs as a subprocess with its own defaults (its `embedded` recipe: the tiny-model settings, with the
source of every choice in the method file), so the table shows what a user gets with no arguments. Starting points:
SFT trains the randomly initialised tiny model; every other method starts from the shared weak SFT warm start
(`embedded:warm`), as the papers start from a base or instruct model that can already attempt the task. Two
same-start baselines make the families comparable: `sft (warm)` is sft.py from the warm start with dft.py's and
otr.py's steps, batch and lr; `grpo` is the base of the rollout family. KDRL's teacher is a longer SFT run
(`embedded:teacher`). Output: runs/demo/summary.md and runs/demo/curves.png.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
import common  # noqa: E402

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


def run(name, out):
    method, extra = RUNS[name]
    cmd = [sys.executable, str(REPO / "methods" / f"{method}.py"), *extra,
           "--output-dir", str(out / name.replace(" ", "_").replace("(", "").replace(")", "")),
           "--overwrite", "--save-every", "0", "--quiet"]
    print(f"\n[demo] {name}: python {' '.join(cmd[1:])}", flush=True)
    t = time.time()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.time() - t, Path(cmd[cmd.index("--output-dir") + 1])


def summarize(results):
    rows, curves = [], {}
    for name, (wall, path) in results.items():
        rec = read_metrics(path / "metrics.jsonl")
        acc = [(r["step"], r["eval/accuracy"]) for r in rec if "eval/accuracy" in r]
        last = [r for r in rec if "perf/tokens" in r][-1]
        start = json.loads((path / "config.json").read_text())["args"]["model"]
        curves[name] = acc
        rows.append((name, start, acc[0][1], acc[-1][1], max(a for _, a in acc), acc[-1][0], wall, last["perf/tokens"],
                     last.get("perf/peak_memory_mb", 0.0)))
    lines = ["| method | starts from | start acc. | final acc. | best acc. | steps | wall time (s) | tokens | "
             "peak memory (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s} | {a0:.3f} | {a1:.3f} | {ab:.3f} | {k} | {w:.0f} | {tok:,} | {mem:.0f} |"
              for n, s, a0, a1, ab, k, w, tok, mem in rows]
    return "\n".join(lines), curves, rows


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, acc in curves.items():
        ax = axes[0] if RUNS[name][0] in TEACHER_FORCING else axes[1]
        ax.plot(*zip(*acc), marker="o", ms=3, label=name)
    axes[0].set(title="teacher forcing: held-out accuracy (greedy)", xlabel="optimizer step", ylabel="accuracy")
    axes[1].set(title="rollout methods: held-out accuracy (greedy)", xlabel="rollout step", ylabel="accuracy")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--output-dir", default="runs/demo")
    a = p.parse_args()
    names = [m.strip() for m in a.methods.split(",")]
    unknown = [m for m in names if m not in RUNS]
    if unknown:
        raise common.UserError(f"--methods: unknown {unknown}; choose from {', '.join(RUNS)}")
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # 1. the shared starting points (built once by methods/sft.py, then cached under .cache/embedded)
    for stage in ["embedded", "embedded:warm"] + (["embedded:teacher"] if "kdrl" in names else []):
        t = time.time()
        print(f"[demo] {stage}: {common.resolve_model(stage)} ({time.time() - t:.0f} s)", flush=True)
    # 2. every method, one after the other (on 2 cores, side by side would only slow each down)
    results = {n: run(n, out) for n in names}
    # 3. the table and the curves
    table, curves, rows = summarize(results)
    total = time.time() - t0
    text = (f"# postrain demo: every method on the embedded default\n\nTotal time {total:.0f} s (including building "
            f"the cached starting points). Each row is `python methods/<file>.py` with its defaults; `sft (warm)` "
            f"adds `{' '.join(RUNS['sft (warm)'][1])}`. Accuracy: greedy exact match on the 256 held-out problems."
            f"\n\n{table}\n")
    (out / "summary.md").write_text(text)
    plot(curves, out / "curves.png")
    print("\n" + text)
    print(f"[demo] wrote {out / 'summary.md'} and {out / 'curves.png'}")
    worse = [r[0] for r in rows if r[3] <= r[2]]
    if worse:
        print(f"[demo] warning: final accuracy did not rise for {', '.join(worse)}")


if __name__ == "__main__":
    main()
