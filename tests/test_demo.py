"""The demo's foundations: starting points built to a target held-out accuracy (--stop-at-accuracy and
data.EMBEDDED_STAGES), and the standard errors of its table (demo.paired_gain)."""
import json
import math
import random
import sys

import pytest

from conftest import REPO, run_method

sys.path.insert(0, str(REPO))
import data  # noqa: E402
import demo  # noqa: E402

FLAGS = ["--recipe", "embedded", "--lr", "1e-3", "--batch-size", "16", "--eval-size", "32", "--eval-samples", "0", "--save-every", "0",
         "--quiet"]


def evals(path):
    return [(r["step"], r["eval/accuracy"]) for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
            if "eval/accuracy" in r]


@pytest.mark.slow
def test_a_starting_point_is_trained_until_its_target_accuracy(tmp_path, monkeypatch, capfd):
    """--stop-at-accuracy stops at the first held-out evaluation that reaches the target (its final checkpoint is
    that step's model), and a cached embedded stage built with a target records what it reached; with a target it
    cannot reach it stops at its cap and says so."""
    warm = data.resolve_model("embedded:warm")
    run_method("sft", "--model", warm, "--max-steps", 12, "--eval-every", 3, *FLAGS, "--output-dir", tmp_path / "free",
               env={"OMP_NUM_THREADS": "1"})
    curve = evals(tmp_path / "free")  # steps 0, 3, 6, 9, 12: the trajectory without a target
    inner = [(s, a) for s, a in curve if 0 < s < 12]
    stop = next(((s, a) for i, (s, a) in enumerate(inner) if i and a > max(b for _, b in inner[:i])), None)
    assert stop is not None, f"the held-out accuracy never rose between evaluations: {curve}; change FLAGS"
    target = (stop[1] + max(b for s, b in inner if s < stop[0])) / 2  # between the best earlier value and stop's

    argv = ["--model", warm, "--max-steps", "12", "--eval-every", "3", *FLAGS]
    monkeypatch.setitem(data.EMBEDDED_STAGES, "warm", dict(target=target, argv=argv))
    data._build_stage("warm", tmp_path / "stage")
    info = data.stage_info(tmp_path / "stage")
    assert info == dict(stage="warm", target=target, accuracy=pytest.approx(stop[1], abs=1e-6), step=stop[0], cap=12,
                        reached=True, argv=argv)
    assert (tmp_path / "stage" / "model.safetensors").exists()
    assert f"held-out greedy accuracy {stop[1]:.3f} at step {stop[0]}" in capfd.readouterr().out

    monkeypatch.setitem(data.EMBEDDED_STAGES, "warm", dict(target=1.0, argv=argv))
    data._build_stage("warm", tmp_path / "capped")
    info = data.stage_info(tmp_path / "capped")
    assert info["step"] == 12 and info["reached"] is False and info["accuracy"] == pytest.approx(curve[-1][1], abs=1e-6)
    assert "hit its cap of 12 steps" in capfd.readouterr().out


def test_stop_at_accuracy_needs_evaluations():
    p = run_method("sft", "--stop-at-accuracy", 0.4, "--eval-every", 0, "--dry-run", check=False)
    assert p.returncode != 0 and "--stop-at-accuracy 0.4 acts only with --eval-every > 0" in p.stderr, p.stderr


def test_paired_gain_is_the_standard_error_of_per_problem_differences(tmp_path):
    """demo.paired_gain against a reference written here: mean and sample-SD / sqrt(n) of last - first, per problem."""
    rng = random.Random(0)
    n = 200
    first = [rng.choice([0, 0.25, 0.5, 0.75, 1.0]) for _ in range(n)]
    mid = [rng.random() for _ in range(n)]
    last = [min(1.0, max(0.0, x + rng.choice([-0.25, 0, 0.25, 0.5]))) for x in first]
    (tmp_path / "eval_outcomes.jsonl").write_text("".join(
        json.dumps({"step": s, "greedy": g, "sampled": g}) + "\n" for s, g in [(0, first), (5, mid), (10, last)]))
    d = [b - a for a, b in zip(first, last)]
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
    gain, got_se = demo.paired_gain(tmp_path, "sampled")
    assert gain == pytest.approx(mean, abs=1e-12) and got_se == pytest.approx(se, rel=1e-9)
    unpaired = math.sqrt(sum((x - sum(first) / n) ** 2 for x in first) / (n - 1) / n
                         + sum((x - sum(last) / n) ** 2 for x in last) / (n - 1) / n)
    assert got_se < unpaired  # correlated start and end: pairing removes the between-problem spread


def test_every_method_file_is_in_the_demo_and_in_run_sh():
    """A new method file runs as ./run.sh METHOD and has a row in the demo (./run.sh): nothing is left out."""
    files = sorted(p.stem for p in (REPO / "methods").glob("*.py"))
    case = next(ln for ln in (REPO / "run.sh").read_text().splitlines() if ln.strip().startswith("sft|"))
    assert sorted(case.strip().rstrip(")").split("|")) == files
    assert sorted({method for method, _ in demo.RUNS.values()}) == files


@pytest.mark.slow
def test_summary_row_and_curves_from_a_real_run(tmp_path):
    """demo.summarize reads a method's own files: the row's start/final accuracies and standard errors are those of
    metrics.jsonl, its gain is paired_gain's, and curves.png is written."""
    out = tmp_path / "grpo"
    run_method("grpo", "--max-steps", 2, "--eval-every", 1, "--eval-size", 12, "--eval-samples", 2,
               "--prompts-per-step", 2, "--num-generations", 4, "--save-every", 0, "--quiet", "--output-dir", out,
               env={"OMP_NUM_THREADS": "1"})
    table, curves, rows = demo.summarize({"grpo": (12.5, out)})
    ev = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/sampled_accuracy" in r]
    assert [r["step"] for r in ev] == [0, 1, 2] and len(rows) == 1
    r = rows[0]
    assert (r["s0"], r["s1"], r["s1_se"], r["g0"], r["steps"]) == (
        ev[0]["eval/sampled_accuracy"], ev[-1]["eval/sampled_accuracy"], ev[-1]["eval/sampled_accuracy_se"],
        ev[0]["eval/accuracy"], 2)
    assert (r["s"], r["s_se"]) == demo.paired_gain(out, "sampled")
    assert r["s"] == pytest.approx(r["s1"] - r["s0"], abs=1e-3)  # the mean of differences is the difference of means
    assert table.count("\n") == 2 and "| grpo | embedded:warm |" in table
    pytest.importorskip("matplotlib")  # ./run.sh (demo) installs it; the test environment may not have it
    demo.plot(curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
