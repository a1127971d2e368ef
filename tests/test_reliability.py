"""Resume after SIGKILL equals the uninterrupted run; same seed, same metrics; NaN stops the run with the last
checkpoint intact; bad flags stop before training with one clear sentence."""
import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_method

import common

SFT = ["--max-steps", 12, "--save-every", 4, "--eval-every", 6, "--eval-size", 16, "--batch-size", 16,
       "--keep-last", 5, "--quiet"]
GRPO = ["--max-steps", 6, "--save-every", 2, "--eval-every", 3, "--eval-size", 16, "--prompts-per-step", 4,
        "--num-generations", 4, "--keep-last", 5, "--quiet", "--max-new-tokens", 24]


def metrics(path):
    """metrics.jsonl without the timing and memory entries (they differ between runs by nature)."""
    out = []
    for line in (path / "metrics.jsonl").read_text().splitlines():
        rec = {k: v for k, v in json.loads(line).items() if not k.startswith("perf/") or k == "perf/tokens"}
        out.append(rec)
    return out


def kill_when(method, args, out, ready, may_finish=False):
    """Start a run, SIGKILL it as soon as `ready(out)` is true; returns its stdout (what it printed until then).
    may_finish: the run may end by itself before it is killed (a kill after its last row is as good as the end)."""
    cmd = [sys.executable, str(REPO / "methods" / f"{method}.py"), *map(str, args), "--output-dir", str(out)]
    log = out.parent / f"{out.name}.stdout"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not ready(out):
            if p.poll() is not None:
                assert may_finish, f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
                break
            assert time.time() < deadline
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
    return log.read_text()


def kill_after_checkpoint(method, args, out, ckpt):
    """Start a run, SIGKILL it as soon as `ckpt` is complete (mid-run)."""
    kill_when(method, args, out, lambda o: (o / ckpt / "COMPLETE").exists())


def rows(out):
    """The metrics rows written so far, as (step, kind) pairs (a partial last line is ignored)."""
    keys = []
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        keys.append((rec["step"], "eval" if any(k.startswith("eval/") for k in rec) else "train"))
    return keys


@pytest.mark.slow
@pytest.mark.parametrize("method,args,ckpt", [("sft", SFT, "checkpoint-0000004"),
                                              ("grpo", GRPO, "checkpoint-0000002")])
def test_kill_and_resume_matches_uninterrupted(tmp_path, method, args, ckpt):
    run_method(method, *args, "--output-dir", tmp_path / "a")
    kill_after_checkpoint(method, args, tmp_path / "b", ckpt)
    killed = metrics(tmp_path / "b")
    assert killed != metrics(tmp_path / "a")  # it really was interrupted
    run_method(method, *args, "--output-dir", tmp_path / "b", "--resume")
    assert metrics(tmp_path / "b") == metrics(tmp_path / "a")


# eval rows at steps 0, 3, 6 and 8 (final); checkpoints at 4 and 8; greedy evaluation only, short generations
TINY = ["--max-steps", 8, "--save-every", 4, "--eval-every", 3, "--eval-size", 8, "--batch-size", 8, "--keep-last", 5,
        "--eval-samples", 0, "--max-new-tokens", 8, "--quiet"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted tiny SFT run, shared by the resume tests below (they copy it before changing anything)."""
    out = tmp_path_factory.mktemp("ref") / "a"
    run_method("sft", *TINY, "--output-dir", out)
    assert rows(out) == [(0, "eval"), (1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train"),
                         (5, "train"), (6, "train"), (6, "eval"), (7, "train"), (8, "train"), (8, "eval")]
    return out


@pytest.mark.slow
def test_log_exact_after_kills_before_first_checkpoint_mid_run_and_after_final_eval(tmp_path, reference):
    """The whole metrics.jsonl (timings aside) after SIGKILLs at three moments, each followed by --resume, equals the
    uninterrupted run's row for row: no evaluation row is written twice, none is lost."""
    b = tmp_path / "b"
    # 1. before the first checkpoint: the step-0 evaluation is logged, no checkpoint is complete yet
    kill_when("sft", [*TINY, "--resume"], b, lambda o: (0, "eval") in rows(o))
    assert not common.list_checkpoints(b, quiet=True) and rows(b)[0] == (0, "eval")
    # 2. mid-run: right after checkpoint-4 is complete (resumed from nothing: it says it starts fresh)
    out = kill_when("sft", [*TINY, "--resume"], b, lambda o: (o / "checkpoint-0000004" / "COMPLETE").exists())
    assert "[resume] no complete checkpoint in" in out and "starting fresh from step 0" in out
    assert rows(b).count((0, "eval")) == 1 and (8, "eval") not in rows(b)
    # 3. after the final evaluation is logged (while final/ is written, or just after the run ended)
    out = kill_when("sft", [*TINY, "--resume"], b, lambda o: (8, "eval") in rows(o), may_finish=True)
    assert "resumed from checkpoint-0000004" in out
    p = run_method("sft", *TINY, "--resume", "--output-dir", b)
    assert "resumed from checkpoint-0000008" in p.stdout and (b / "final" / "COMPLETE").exists()
    assert metrics(b) == metrics(reference)


@pytest.mark.slow
def test_same_seed_same_metrics_and_partial_checkpoints_skipped(tmp_path):
    run_method("grpo", *GRPO, "--output-dir", tmp_path / "a")
    run_method("grpo", *GRPO, "--output-dir", tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    run_method("grpo", *GRPO, "--output-dir", tmp_path / "c", "--seed", "1")
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")
    # what a kill during a checkpoint write leaves behind: a .tmp directory, or one without the COMPLETE marker
    b = tmp_path / "b"
    (b / "checkpoint-0000008.tmp").mkdir()
    (b / "checkpoint-0000008.tmp" / "model.safetensors").write_bytes(b"partial")
    (b / "checkpoint-0000010").mkdir()
    p = run_method("grpo", *[str(x) for x in GRPO[:1]], "7", *map(str, GRPO[2:]), "--output-dir", b, "--resume")
    assert "skipping incomplete checkpoint" in p.stderr and "resumed from checkpoint-0000006" in p.stdout


FAULT = """
import torch
_clip, _calls = torch.nn.utils.clip_grad_norm_, [0]
def clip_grad_norm_(*a, **k):  # the 14th optimizer step sees a NaN gradient norm
    _calls[0] += 1
    norm = _clip(*a, **k)
    return norm * float("nan") if _calls[0] == 14 else norm
torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
"""


@pytest.mark.slow
def test_nonfinite_stops_with_message_and_checkpoint_intact(tmp_path):
    """A NaN injected into step 14 (through sitecustomize, so the method file runs unchanged)."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAULT)
    env = {"PYTHONPATH": str(tmp_path / "inject")}
    args = ["--max-steps", "16", *map(str, SFT[2:])]
    p = run_method("sft", *args, "--output-dir", tmp_path / "a", check=False, env=env)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "error: step 14: grad_norm=nan is not finite; the last complete checkpoint is intact" in p.stderr
    last = common.list_checkpoints(tmp_path / "a")[-1]
    assert last.name == "checkpoint-0000012" and common.load_model(str(last)) is not None
    # --skip-nonfinite: the step is skipped and logged, the run goes on
    run_method("sft", *args, "--output-dir", tmp_path / "b", "--skip-nonfinite", env=env)
    rec = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if r.get("train/skipped_nonfinite")] == [14]
    assert max(r["step"] for r in rec) == 16


BAD = [
    ("grpo", ["--num-generations", "1"], "need at least 2 completions per prompt"),
    ("grpo", ["--prompts-per-step", "3", "--grad-accum", "2", "--num-generations", "3"], "cannot be split into"),
    ("grpo", ["--eps-low", "-0.1"], "must be >= 0"),
    ("grpo", ["--generator", "vllm"], "needs vLLM, which is not installed"),
    ("sft", ["--model", "./no/such/dir"], "does not exist"),
    ("sft", ["--dataset", "missing.jsonl"], "does not exist"),
    ("sft", ["--max-length", "8"], "every one of the"),
    ("grpo", ["--dataset", "tests/data/math500.jsonl", "--prompt-column", "problem", "--answer-column", "answer"],
     "no training examples are left"),  # 5 rows, all held out by --eval-size 256
    ("sft", ["--batch-size", "10", "--grad-accum", "3"], "micro-batches"),
]


@pytest.mark.parametrize("method,flags,message", BAD)
def test_bad_input_one_clear_message(tmp_path, method, flags, message):
    if "vllm" in flags:
        pytest.importorskip("torch")
        try:
            import vllm  # noqa: F401
            pytest.skip("vLLM is installed here")
        except ImportError:
            pass
    p = run_method(method, *flags, "--output-dir", tmp_path / "o", "--max-steps", "1", "--quiet", check=False,
                   timeout=300)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    p = run_method("sft", "--output-dir", tmp_path, "--max-steps", "1", check=False)
    assert p.returncode != 0 and "already holds a run; pass --resume" in p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("method,args", [("sft", ["--max-steps", 3, "--batch-size", 8]),
                                         ("grpo", ["--max-steps", 3, "--prompts-per-step", 4])])
def test_fsdp2_run_equals_ddp_run(tmp_path, method, args):
    """--fsdp (FSDP2 fully_shard per layer, 2 ranks, gloo) trains like DDP: same losses, gradient norms and held-out
    accuracies (greedy and mean@2) step by step, and writes a final checkpoint. For grpo this covers generation with
    sharded weights before the first training forward (it once broke FSDP2's lazy root initialisation) and the
    DTensor gradient norm in the logged metrics."""
    from conftest import torchrun
    runs = {}
    for name, flag in [("ddp", []), ("fsdp", ["--fsdp"])]:
        out = tmp_path / name
        torchrun(REPO / "methods" / f"{method}.py", *args, *flag, "--eval-size", 8, "--eval-samples", 2,
                 "--save-every", 0, "--quiet", "--output-dir", out)
        runs[name] = [{k: v for k, v in r.items() if k.startswith(("train/loss", "train/grad_norm", "eval/"))}
                      for r in metrics(out)]
        assert (out / "final" / "COMPLETE").exists()
    assert len(runs["fsdp"]) == len(runs["ddp"]) and sum("train/grad_norm" in r for r in runs["ddp"]) == 3
    for a, b in zip(runs["fsdp"], runs["ddp"]):
        assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-4 * max(1.0, abs(b[k])) for k in a), (a, b)
