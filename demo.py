"""The main job (`./run.sh`): every method on the embedded default, each run exactly as `python methods/X.py`.

Each method runs as a subprocess with its own defaults (its `embedded` recipe: the tiny-model settings, with the
source of every choice in the method file), so the table shows what a user gets with no arguments. Starting points:
SFT trains the randomly initialised tiny model; every other method starts from the shared SFT warm start
(`embedded:warm`: sft.py run until its greedy held-out accuracy reaches a stated target, data.EMBEDDED_STAGES), as
the papers start from a base or instruct model that can already attempt the task. Two same-start baselines make the
families comparable: `sft (warm)` is sft.py from the warm start with dft.py's and otr.py's steps, batch and lr;
`grpo` is the base of the rollout family. KDRL's teacher (`embedded:teacher`) is SFT from the warm start to a higher
target. Runs go --jobs at a time (default 2, each with cores / jobs threads; on 2 cores, 100 grpo.py steps took
114 s for two one-thread runs side by side and 95 s for one two-thread run: 1.7x the throughput), longest first,
each as soon as the starting point it needs is built. Held-out accuracy (512 problems) is logged greedy and as
mean@4 at T 0.7, each with its standard error over problems; every evaluation writes each problem's score to
eval_outcomes.jsonl, and a gain's standard error is that of the per-problem differences (paired: same problems,
same sampling seeds). Output: runs/demo/summary.md and runs/demo/curves.png (runs/demo-seed<N> with --seed N).
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
import torch  # noqa: E402

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
    "luffy": ("luffy", []),
    "hpt": ("hpt", []),
    "srft": ("srft", []),
    "uft": ("uft", []),
}
TEACHER_FORCING = ["sft", "dft", "otr"]


def read_metrics(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def paired_gain(path, key):
    """(gain, standard error) of held-out `key` (greedy or sampled) from the run's first to its last evaluation.
    Both score the same problems with the same sampling seeds, so the error is that of the mean per-problem
    difference: std(d) / sqrt(problems), smaller than the unpaired sqrt(se_start^2 + se_end^2)."""
    rows = [r for r in read_metrics(path / "eval_outcomes.jsonl") if key in r]
    first, last = torch.tensor(rows[0][key], dtype=torch.float64), torch.tensor(rows[-1][key], dtype=torch.float64)
    diff = last - first
    return diff.mean().item(), (diff.std() / len(diff) ** 0.5).item()


def run(name, out, threads, seed):
    """One method as a subprocess with `threads` CPU threads; its output goes to <run dir>.log."""
    method, extra = RUNS[name]
    path = out / name.replace(" ", "_").replace("(", "").replace(")", "")
    cmd = [sys.executable, str(REPO / "methods" / f"{method}.py"), *extra, "--seed", str(seed), "--output-dir",
           str(path), "--overwrite", "--save-every", "0", "--quiet"]
    print(f"[demo] start {name}: python {' '.join(cmd[1:])}", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with open(out / f"{path.name}.log", "w") as f:
        r = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
    if r.returncode:
        raise SystemExit(f"[demo] {name} failed (exit {r.returncode}); its output: {out / f'{path.name}.log'}")
    wall = time.time() - t
    rec = [r for r in read_metrics(path / "metrics.jsonl") if "eval/sampled_accuracy" in r]
    gain, se = paired_gain(path, "sampled")
    print(f"[demo] done {name} in {wall:.0f} s: held-out mean@4 {rec[0]['eval/sampled_accuracy']:.3f} -> "
          f"{rec[-1]['eval/sampled_accuracy']:.3f} ({gain:+.3f} +- {se:.3f}, {gain / se:.1f} SE)", flush=True)
    return wall, path


def build(stage, threads):
    t = time.time()
    r = subprocess.run([sys.executable, "-c", f"import data; data.resolve_model({stage!r})"], cwd=REPO,
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
        curves[name] = {key: [(r["step"], r[key], r.get(f"{key}_se", 0.0)) for r in rec if key in r]
                        for key in ("eval/accuracy", "eval/sampled_accuracy", "train/reward")}
        ev = [r for r in rec if "eval/sampled_accuracy" in r]
        last = [r for r in rec if "perf/tokens" in r][-1]
        start = json.loads((path / "config.json").read_text())["args"]["model"]
        g, g_se = paired_gain(path, "greedy")
        s, s_se = paired_gain(path, "sampled")
        rows.append(dict(name=name, start=start, g0=ev[0]["eval/accuracy"], g1=ev[-1]["eval/accuracy"], g=g,
                         g_se=g_se, s0=ev[0]["eval/sampled_accuracy"], s0_se=ev[0]["eval/sampled_accuracy_se"],
                         s1=ev[-1]["eval/sampled_accuracy"], s1_se=ev[-1]["eval/sampled_accuracy_se"], s=s, s_se=s_se,
                         steps=ev[-1]["step"], wall=wall, tokens=last["perf/tokens"],
                         mem=last.get("perf/peak_memory_mb", 0.0)))
    lines = ["| method | starts from | greedy: start | final | gain +- SE | mean@4: start +- SE | final +- SE | "
             "**gain +- SE** | gain / SE | steps | wall time (s) | tokens | peak memory (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z = r["s"] / r["s_se"] if r["s_se"] > 0 else float("inf")
        mark = "" if z >= 3 else " (< 3 SE)" if z >= 2 else " (not significant: < 2 SE)"
        lines.append(f"| {r['name']} | {r['start']} | {r['g0']:.3f} | {r['g1']:.3f} | {r['g']:+.3f} +- {r['g_se']:.3f} "
                     f"| {r['s0']:.3f} +- {r['s0_se']:.3f} | {r['s1']:.3f} +- {r['s1_se']:.3f} | "
                     f"**{r['s']:+.3f} +- {r['s_se']:.3f}** | {z:.1f}{mark} | {r['steps']} | {r['wall']:.0f} | "
                     f"{r['tokens']:,} | {r['mem']:.0f} |")
    return "\n".join(lines), curves, rows


def plot(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for i, (name, c) in enumerate(curves.items()):
        col, color = (0 if RUNS[name][0] in TEACHER_FORCING else 1), f"C{i % 10}"
        style = "-" if i < 10 else "--"
        for row, key in enumerate(["eval/accuracy", "eval/sampled_accuracy"]):
            if c[key]:  # the held-out accuracy with a band of +- 1 standard error (over problems)
                steps, acc, se = map(torch.tensor, zip(*c[key]))
                axes[row, col].plot(steps, acc, marker="o", ms=3, ls=style, color=color, label=name)
                axes[row, col].fill_between(steps, acc - se, acc + se, color=color, alpha=0.15)
    for row, what in enumerate(["greedy", "mean@4, T 0.7"]):
        axes[row, 0].set(title=f"teacher forcing: held-out {what} (band: +-1 SE)", xlabel="optimizer step")
        axes[row, 1].set(title=f"rollout methods: held-out {what} (band: +-1 SE)", xlabel="rollout step")
    for ax in axes.flat:
        ax.set_ylabel("accuracy on the held-out problems")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    p.add_argument("--seed", type=int, default=0, help="every run's --seed (data order, sampling); the cached "
                   "starting points do not depend on it")
    p.add_argument("--output-dir", default=None, help="default: runs/demo (seed 0), runs/demo-seed<N> otherwise")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each with (CPU cores / jobs) threads (on 2 "
                   "cores, 100 grpo.py steps: two one-thread runs side by side took 114 s, one two-thread run 95 s)")
    a = p.parse_args()
    names = [m.strip() for m in a.methods.split(",")]
    unknown = [m for m in names if m not in RUNS]
    if unknown:
        raise common.UserError(f"--methods: unknown {unknown}; choose from {', '.join(RUNS)}")
    out = Path(a.output_dir or ("runs/demo" if a.seed == 0 else f"runs/demo-seed{a.seed}"))
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    t0 = time.time()
    data.resolve_model("embedded")
    # 1. the shared starting points (methods/sft.py runs to a target accuracy, cached under .cache/embedded) and
    # every method, --jobs at a time: the longest first, each run once the starting point it needs is built
    stages = ["embedded:warm"] * any(n != "sft" for n in names) + ["embedded:teacher"] * ("kdrl" in names)
    short = [n for n in names if RUNS[n][0] in TEACHER_FORCING]
    order = [n for n in names if n not in short] + short
    needs = {n: [] if n == "sft" else ["embedded:warm"] + ["embedded:teacher"] * (n == "kdrl") for n in names}
    with ThreadPoolExecutor(a.jobs) as pool:
        built = {s: pool.submit(build, s, threads) for s in stages}  # submitted first, so never waited on unstarted

        def start_after_needs(name):
            for s in needs[name]:
                built[s].result()
            return run(name, out, threads, a.seed)
        futures = {n: pool.submit(start_after_needs, n) for n in order}
        results = {n: futures[n].result() for n in names}
    # 2. the table and the curves
    table, curves, rows = summarize(results)
    total = time.time() - t0
    warm = [f"`{s}` reached greedy held-out accuracy {i['accuracy']:.3f} at SFT step {i['step']} (target "
            f"{i['target']}{'' if i['reached'] else ': NOT reached, the step cap was hit'})"
            for s in stages for i in [data.stage_info(data.resolve_model(s))]]
    n_eval = len(read_metrics(next(iter(results.values()))[1] / "eval_outcomes.jsonl")[0]["greedy"])
    text = (f"# postrain demo: every method on the embedded default (seed {a.seed})\n\nTotal time {total:.0f} s "
            f"(including building the cached starting points), {a.jobs} runs at a time with {threads} thread(s) "
            f"each. Each row is `python methods/<file>.py --seed {a.seed}` with its defaults; `sft (warm)` adds "
            f"`{' '.join(RUNS['sft (warm)'][1])}`. Starting points: {'; '.join(warm) or 'none'}.\n\n"
            f"Held-out accuracy on {n_eval} problems: greedy exact match, and mean@4, the mean exact match of 4 "
            "samples per problem at temperature 0.7 (what the rollout methods optimise; the papers report avg@k). "
            "SE: standard error over problems; a gain's SE is that of the per-problem differences between the "
            "run's first and last evaluation (same problems, same sampling seeds). Gains under 2 SE are marked not "
            "significant.\n\n" + table + "\n\nWhat this table shows: that each file, run as shipped, improves "
            "its own starting point on held-out problems by more than the evaluation noise, and what that cost "
            "(steps, tokens, wall time on one CPU thread). What it does not show: which method is better. The "
            "budgets differ by family, one tiny model and one toy task decide nothing about the papers' claims, "
            "and per unit of compute SFT on the exact solutions is the strongest row here.\n")
    (out / "summary.md").write_text(text)
    plot(curves, out / "curves.png")
    print("\n" + text)
    print(f"[demo] wrote {out / 'summary.md'} and {out / 'curves.png'}")
    weak = [r["name"] for r in rows if not r["s"] >= 3 * r["s_se"]]
    if weak:
        print(f"[demo] warning: the held-out mean@4 gain is under 3 standard errors for {', '.join(weak)}")


if __name__ == "__main__":
    main()
