"""Resume after SIGKILL equals the uninterrupted run (weights and the whole metrics log); damaged checkpoints are
skipped; --resume refuses another method's run and changed trajectory flags; same seed, same metrics; NaN stops the
run with the last checkpoint intact; bad flags, files and models stop before training with one clear sentence; a
stuck rank or a dead launcher ends a torchrun job."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_method

import common
import data
import rollout

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
@pytest.mark.parametrize("method,args,ckpt", [("grpo", GRPO, "checkpoint-0000002")])  # sft: the three-kill test below
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
    assert last.name == "checkpoint-0000012" and data.load_model(str(last)) is not None
    # --skip-nonfinite: the step is skipped and logged, the run goes on
    p = run_method("sft", *args, "--output-dir", tmp_path / "b", "--skip-nonfinite", env=env)
    assert "[summary] 1 of 16 optimizer steps were skipped as non-finite (--skip-nonfinite): those steps did not " \
           "train" in p.stdout
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
    # each problem's held-out score lands in its own place when ranks score shards: the start's greedy outcomes of
    # the 2-rank run are those of one process (eval_outcomes.jsonl, what the demo pairs start and end with)
    run_method(method, *args, "--eval-size", 8, "--eval-samples", 2, "--save-every", 0, "--quiet", "--max-steps", 1,
               "--output-dir", tmp_path / "one")
    start = [json.loads((tmp_path / name / "eval_outcomes.jsonl").read_text().splitlines()[0]) for name in ("ddp", "one")]
    assert start[0]["step"] == start[1]["step"] == 0 and len(start[0]["greedy"]) == 8 == len(start[0]["sampled"])
    assert start[0]["greedy"] == start[1]["greedy"], start


def damage(ckpt, how):
    """What a crash, a full disk or a bad copy leaves in a checkpoint directory."""
    if how == "truncated model.safetensors":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how.startswith("missing "):
        (ckpt / how.split()[1]).unlink()
    elif how == "random bytes in trainer_state.pt":
        (ckpt / "trainer_state.pt").write_bytes(random.Random(0).randbytes(5000))
    elif how == "same-size random bytes in trainer_state.pt":
        f = ckpt / "trainer_state.pt"
        f.write_bytes(random.Random(0).randbytes(f.stat().st_size))
    elif how == "bad state.json":
        (ckpt / "state.json").write_text('{"step": ')


DAMAGE = {"truncated model.safetensors": "model.safetensors is truncated or altered",
          "missing state.json": "state.json is missing", "missing trainer_state.pt": "trainer_state.pt is missing",
          "random bytes in trainer_state.pt": "trainer_state.pt is truncated or altered",
          "same-size random bytes in trainer_state.pt": "trainer_state.pt is not a readable torch file",
          "bad state.json": "state.json is truncated or altered"}


@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGE)
def test_resume_walks_back_past_a_damaged_checkpoint(tmp_path, reference, capsys, how):
    """The newest checkpoint damaged: --resume takes the one before it, with a warning naming what is wrong."""
    for name in ("checkpoint-0000004", "checkpoint-0000008"):
        shutil.copytree(reference / name, tmp_path / name)
    damage(tmp_path / "checkpoint-0000008", how)
    got = common.latest_checkpoint(SimpleNamespace(resume=True, output_dir=str(tmp_path)))
    err = capsys.readouterr().err
    assert got == tmp_path / "checkpoint-0000004", err
    assert f"warning: skipping damaged checkpoint {tmp_path / 'checkpoint-0000008'}: {DAMAGE[how]}" in err


@pytest.mark.slow
def test_damaged_payload_stops_with_message_and_resume_after_damage_is_exact(tmp_path, reference):
    """A damaged tensor payload of the right size passes the cheap checks: load_checkpoint reads every file before
    it changes anything and stops with one sentence. End to end: a truncated newest checkpoint, --resume continues
    from the one before it and the log equals the uninterrupted run's."""
    from kernels.engine import FusedLM
    ck = tmp_path / "checkpoint-0000004"
    shutil.copytree(reference / ck.name, ck)
    f = ck / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n:] = random.Random(0).randbytes(len(raw) - 8 - n)  # weights -> random bytes, some NaN
    f.write_bytes(bytes(raw))
    assert common.checkpoint_problem(ck) is None  # same size, valid header: not caught without reading it
    (ck / "trainer_state.pt").write_bytes(b"PK" + random.Random(1).randbytes(100))
    model = FusedLM(data.load_model(str(reference / "checkpoint-0000008")))
    opt = torch.optim.AdamW(model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(common.UserError, match="checkpoint .*checkpoint-0000004 is damaged .*delete it and run again "
                                               "with --resume to continue from the one before it"):
        common.load_checkpoint(ck, model, [opt], [], common.Dist())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing half-restored
    run = tmp_path / "run"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("final"))
    damage(run / "checkpoint-0000008", "truncated model.safetensors")
    p = run_method("sft", *TINY, "--resume", "--output-dir", run)
    assert "warning: skipping damaged checkpoint" in p.stderr and "resumed from checkpoint-0000004" in p.stdout
    assert metrics(run) == metrics(reference)


def test_pruning_removes_the_marker_first(tmp_path, monkeypatch):
    """keep_last deletes the COMPLETE marker before the files: a deletion killed midway leaves a directory that is
    skipped as incomplete, never one marked complete with files missing."""
    for step in (1, 2):
        (tmp_path / f"checkpoint-000000{step}").mkdir()
        (tmp_path / f"checkpoint-000000{step}" / "COMPLETE").write_text("{}")
    seen = []
    monkeypatch.setattr(shutil, "rmtree", lambda p, **k: seen.append((p / "COMPLETE").exists()))  # killed here
    common._remove_checkpoint(tmp_path / "checkpoint-0000001")
    assert seen == [False] and common.list_checkpoints(tmp_path, quiet=True) == [tmp_path / "checkpoint-0000002"]


@pytest.mark.slow
def test_resume_refuses_another_method_and_changed_trajectory_flags(tmp_path, reference):
    """--resume on another method's run, or with a flag that changes the trajectory, stops with one line before
    anything is loaded; --overwrite with --resume continues anyway; flags that may change are applied and logged."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    p = run_method("grpo", "--resume", "--output-dir", run, "--quiet", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: --resume: '{run}' holds a sft.py run, not a grpo.py one; choose another --output-dir, or pass "
        "--overwrite without --resume to delete it and start over")
    p = run_method("sft", *TINY, "--resume", "--output-dir", run, "--lr", "0.01", "--seed", "3", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: --resume with flags that change the run's trajectory (--lr 0.003 -> 0.01, --seed 0 -> 3, against "
        f"{run / 'config.json'}); pass them as before, add --overwrite to continue with the new values anyway, or "
        "choose another --output-dir")
    p = run_method("sft", *TINY[2:], "--max-steps", 4, "--resume", "--output-dir", run, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1] == (
        f"error: --max-steps 4 is below step 8 of the newest checkpoint in '{run}'; pass --max-steps 8 or more to "
        "continue it, or choose another --output-dir")
    assert metrics(run) == metrics(reference)  # untouched
    args = [*TINY[:1], 9, *TINY[2:]]  # --max-steps 8 -> 9: one more step from checkpoint-8
    p = run_method("sft", *args, "--resume", "--output-dir", run, "--eval-every", 0, "--lr", "0.01", "--overwrite")
    assert ("[resume] flags changed since the run started, applied: --max-steps 8 -> 9, --lr 0.003 -> 0.01, "
            "--eval-every 3 -> 0") in p.stdout and "resumed from checkpoint-0000008" in p.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["args"]["lr"] == 0.01 and config["resumed_with_changes"] == [
        {"max_steps": [8, 9], "lr": [0.003, 0.01], "eval_every": [3, 0]}]
    assert rows(run)[-3:] == [(8, "eval"), (9, "train"), (9, "eval")]


RANGE_CASES = [  # (method, flags, the error line): every numeric flag is checked at parse time, from common.RANGES
    ("sft", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("grpo", ["--lr", "nan"], "--lr nan: must be > 0"),
    ("sft", ["--max-grad-norm", "-1"], "--max-grad-norm -1.0: must be > 0 (inf: no clipping)"),
    ("sft", ["--lr", "inf"], "--lr inf: must be > 0"),
    ("sft", ["--batch-size", "0"], "--batch-size 0: must be >= 1 (a count)"),
    ("sft", ["--max-steps", "-3"], "--max-steps -3: must be >= 1 (a count)"),
    ("sft", ["--num-demos", "0"], "--num-demos 0: must be >= 1 (a count)"),
    ("sft", ["--grad-accum", "0"], "--grad-accum 0: must be >= 1 (a count)"),
    ("sft", ["--warmup-ratio", "1.5"], "--warmup-ratio 1.5: must be in [0, 1]"),
    ("sft", ["--beta2", "1"], "--beta2 1.0: must be in [0, 1)"),
    ("sft", ["--eval-size", "-1"], "--eval-size -1: must be >= 0 (the held-out examples; 0: no held-out evaluation)"),
    ("grpo", ["--prompts-per-step", "0"], "--prompts-per-step 0: must be >= 1 (a count)"),
    ("grpo", ["--num-generations", "0"], "--num-generations 0: must be >= 1 (a count)"),
    ("grpo", ["--max-new-tokens", "0"], "--max-new-tokens 0: must be >= 1 (a count)"),
    ("grpo", ["--temperature", "0"], "--temperature 0.0: must be > 0 (it divides the logits; sampling needs > 0)"),
    ("grpo", ["--temperature", "-1"], "--temperature -1.0: must be > 0 (it divides the logits; sampling needs > 0)"),
    ("grpo", ["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    ("grpo", ["--eval-temperature", "0"], "--eval-temperature 0.0: must be > 0"),
    ("grpo", ["--dual-clip", "0.5"], "--dual-clip 0.5: must be > 1 (inf: no cap)"),
    ("grpo", ["--overlong-buffer-ratio", "2"], "--overlong-buffer-ratio 2.0: must be in [0, 1]"),
    ("relift", ["--sft-lr", "0"], "--sft-lr 0.0: must be > 0"),
    ("kdrl", ["--keep-last", "0"], "--keep-last 0: must be >= 1 (a count)"),
    ("chord", ["--dist-timeout", "0"], "--dist-timeout 0.0: must be > 0"),
    ("grpo", ["--beta", "-0.04"], "--beta -0.04: must be >= 0 (a KL or distillation coefficient)"),
]


@pytest.mark.parametrize("method,flags,line", RANGE_CASES)
def test_numeric_flags_range_checked_at_parse_time(method, flags, line):
    from tests_util import load_method
    mod = load_method(method)
    with pytest.raises(common.UserError) as e:
        common.parse_args(mod.Args, flags, presets={"recipe": mod.RECIPES})
    assert str(e.value) == "error: " + line


def test_a_method_can_drop_a_range_whose_name_means_something_else():
    """otr.py's --beta is the reward of a wrong draw (default -0.1), not RANGES' KL coefficient: its own RANGES
    entry replaces the shared one."""
    from tests_util import load_method
    otr = load_method("otr")
    assert common.parse_args(otr.Args, [], presets={"recipe": otr.RECIPES}, ranges=otr.RANGES).beta == -0.1
    with pytest.raises(common.UserError, match="--beta -0.1: must be >= 0"):
        common.parse_args(otr.Args, [], presets={"recipe": otr.RECIPES})
    with pytest.raises(common.UserError, match="must be below 1"):
        common.parse_args(otr.Args, ["--beta", "1"], presets={"recipe": otr.RECIPES}, ranges=otr.RANGES)


def test_max_steps_negative_writes_nothing_and_output_dir_a_file(tmp_path):
    """End to end: `--max-steps -3` stops at parse time with one line (no untrained final/, no directory at all);
    an --output-dir that is a file is refused."""
    p = run_method("sft", "--max-steps", "-3", "--output-dir", tmp_path / "o", check=False)
    assert p.returncode != 0 and p.stderr.strip() == "error: --max-steps -3: must be >= 1 (a count)"
    assert not (tmp_path / "o").exists()
    (tmp_path / "f").write_text("x")
    A = SimpleNamespace(output_dir=str(tmp_path / "f"), resume=False, overwrite=True)
    with pytest.raises(common.UserError, match=f"--output-dir '{tmp_path / 'f'}' is a file, not a directory"):
        common.prepare_output_dir(A, common.Dist())
    A.output_dir = str(tmp_path / "f" / "sub")
    with pytest.raises(common.UserError, match=f"cannot create --output-dir '{tmp_path / 'f' / 'sub'}' \\(Not a dir"):
        common.prepare_output_dir(A, common.Dist())
    assert (tmp_path / "f").read_text() == "x"


# ---- loaders: every library error a user can cause is one line -----------------------------------------------------
def test_dataset_files_empty_not_utf8_unparsable_and_null_prompts(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(common.UserError, match=r"dataset file '.*empty.jsonl' is empty \(0 bytes\); check the file"):
        data.load_examples(str(tmp_path / "empty.jsonl"))
    latin1 = '{"prompt": "café 1+1", "response": "2", "answer": "2"}\n'.encode("latin-1")
    (tmp_path / "latin1.jsonl").write_bytes(latin1)
    with pytest.raises(common.UserError, match=r"cannot read dataset file '.*latin1.jsonl' \(UnicodeDecodeError: .*\); "
                                               r"it is not UTF-8 text; re-encode it as UTF-8$"):
        data.load_examples(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "1+1", "response": "2", "answer": 2}\n{"prompt": \n')
    with pytest.raises(common.UserError, match=r"cannot read dataset file '.*bad.jsonl' \(.*\); a jsonl file is "
                                               "expected: one JSON object per line$"):
        data.load_examples(str(tmp_path / "bad.jsonl"))
    rows = [{"prompt": None, "response": "2", "answer": "2"}, {"prompt": "  ", "response": "2", "answer": "2"},
            {"prompt": "1+1=", "response": "2", "answer": None}, {"prompt": "2+2=", "response": "4", "answer": 4}]
    (tmp_path / "nulls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_examples(str(tmp_path / "nulls.jsonl")) == [  # SFT: the answer is only used to score
        {"prompt": "1+1=", "response": "2", "answer": ""}, {"prompt": "2+2=", "response": "4", "answer": "4"}]
    assert "skipped 2 rows with a null or empty prompt (--prompt-column prompt) and 0 with" in capsys.readouterr().err
    assert data.load_examples(str(tmp_path / "nulls.jsonl"), need_response=False) == [  # RL prompts need answers
        {"prompt": "2+2=", "response": None, "answer": "4"}]
    assert "skipped 2 rows with a null or empty prompt (--prompt-column prompt) and 1 with a null or empty answer " \
           "(--answer-column answer); 1 remain" in capsys.readouterr().err
    (tmp_path / "allnull.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    with pytest.raises(common.UserError, match=r"has no row with a prompt \(2 null or empty prompts, 0 null or empty "
                                               "answers\\); check --prompt-column/--answer-column"):
        data.load_examples(str(tmp_path / "allnull.jsonl"))


def test_model_and_tokenizer_loader_errors(tmp_path, tiny_dir):
    """A damaged weight file, a pad token outside the model's vocabulary, and (end to end, offline) a hub name."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(common.UserError, match=f"cannot load the model of '{bad}' \\(.*\\); the files in '{bad}' are "
                                               "damaged or incomplete: save the model again with save_pretrained"):
        data.load_model(str(bad))
    pad = tmp_path / "pad"
    shutil.copytree(tiny_dir, pad)
    tok = data.load_tokenizer(tiny_dir)
    tok.add_special_tokens({"pad_token": "<|newpad|>"})
    tok.save_pretrained(pad)
    vocab = json.loads((pad / "config.json").read_text())["vocab_size"]
    with pytest.raises(common.UserError, match=f"has pad_token_id {vocab}, outside the model's vocabulary "
                                               f"\\(vocab_size {vocab} in config.json\\); set pad_token to a token"):
        data.load_tokenizer(str(pad))
    p = run_method("sft", "--model", "nobody-xyz/no-such-model", "--output-dir", tmp_path / "o", check=False,
                   env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(
        "error: cannot load the tokenizer of 'nobody-xyz/no-such-model' (OSError: ")
    assert p.stderr.strip().endswith("'nobody-xyz/no-such-model' is not a local directory and the hub cannot be "
                                     "reached or has no such model: download it where there is network "
                                     "(huggingface-cli download nobody-xyz/no-such-model --local-dir DIR) and pass "
                                     "--model DIR")


def test_skipped_nonfinite_window_stops_and_summary(monkeypatch, capsys, tmp_path):
    """--skip-nonfinite: NONFINITE_WINDOW skipped steps in a row stop the run with a message; fewer are counted and
    summed up when the logger closes (e.g. 19 of 20 steps skipped used to end with `done`)."""
    monkeypatch.setattr(common, "_nonfinite", {"steps": 0, "skipped": 0, "in_a_row": 0})
    log = common.MetricsLogger(tmp_path, common.Dist(), 20, quiet=True)  # a run: counts start at 0
    nan, ok = {"loss": float("nan"), "grad_norm": 1.0}, {"loss": 1.0, "grad_norm": 1.0}
    for step in range(1, 20):  # skipped, except every 9th step: never 10 in a row
        assert common.nonfinite(step, ok if step % 9 == 0 else nan, skip=True) == (step % 9 != 0)
    log.close()
    assert "[summary] 17 of 19 optimizer steps were skipped as non-finite" in capsys.readouterr().out
    for step in range(20, 28):  # 19-27 skipped: 9 in a row
        common.nonfinite(step, nan, skip=True)
    with pytest.raises(common.UserError, match=r"step 28: the last 10 optimizer steps were all skipped as non-finite "
                                               r"\(loss=nan; --skip-nonfinite\): training cannot learn. The last "
                                               "complete checkpoint is intact; lower --lr or check the data"):
        common.nonfinite(28, nan, skip=True)


# ---- distributed: a stuck rank and a dead launcher end the job ------------------------------------------------------
HANG = """
import os, time
import torch
_clip, _calls = torch.nn.utils.clip_grad_norm_, [0]
def clip_grad_norm_(*a, **k):  # rank 1 hangs (alive, not dead) in its 2nd optimizer step
    _calls[0] += 1
    if _calls[0] == 2 and os.environ.get("RANK") == "1":
        time.sleep(600)
    return _clip(*a, **k)
torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
"""
DIST = ["--batch-size", 8, "--eval-size", 4, "--eval-samples", 0, "--max-new-tokens", 8, "--save-every", 0,
        "--eval-every", 0, "--quiet"]


def torchrun_cmd(*args):
    from conftest import free_port
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            str(REPO / "methods" / "sft.py"), *map(str, args)]


@pytest.mark.slow
def test_stuck_rank_ends_the_job_after_dist_timeout(tmp_path):
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(HANG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path / "inject")}
    t = time.time()
    p = subprocess.run(torchrun_cmd(*DIST, "--max-steps", 4, "--dist-timeout", 5, "--output-dir", tmp_path / "o"),
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and time.time() - t < 200
    assert ("error: rank 0: a collective across ranks failed (no answer within --dist-timeout 5 s): another rank is "
            "stuck or died. The job stops; the last complete checkpoint is intact (--resume continues from it).") \
        in p.stderr, p.stderr[-3000:]


def children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(torchrun_cmd(*DIST, "--max-steps", 100000, "--output-dir", out), cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 300
        while (1, "train") not in rows(out):  # both workers are training
            assert agent.poll() is None and time.time() < deadline
            time.sleep(0.2)
        workers = children(agent.pid)
        assert len(workers) == 2
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        deadline = time.time() + 20
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "a worker outlived its launcher"
    finally:
        for w in workers:  # only the workers this test started
            if alive(w):
                os.kill(w, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()


def test_messages_name_the_flags_of_the_script(tiny_dir):
    """Messages from common.py name the flag the running script has: --max-prompt-length in the rollout files,
    --max-length in the teacher-forcing ones; the held-out advice names --eval-size 0, which now means no held-out
    evaluation."""
    from tests_util import load_method
    tok = data.load_tokenizer(tiny_dir)
    rows = [{"prompt": "12+34=" * 20, "response": "46", "answer": "46"}]
    for method, with_response, flag in [("grpo", False, "--max-prompt-length"), ("sft", True, "--max-length"),
                                        ("chord", True, "--max-prompt-length \\+ --max-new-tokens")]:
        mod = load_method(method)
        common.parse_args(mod.Args, [], presets={"recipe": mod.RECIPES})
        with pytest.raises(common.UserError, match=r"every one of the 1 examples was filtered out \(1 longer than 16 "
                                                   rf"tokens, 0 with an empty demonstration\); raise {flag}$"):
            data.tokenize_examples(tok, rows, 16, with_response=with_response)
    with pytest.raises(common.UserError, match=r"pass --eval-dataset FILE, a smaller --eval-size, or --eval-size 0 "
                                               r"\(no held-out evaluation\)$"):
        data.tokenize_examples(tok, [], 16)


def test_sampling_from_diverged_weights_is_one_line(tiny_dir):
    """A learning rate so large that the weights turn NaN makes torch.multinomial fail inside `generate`, before the
    loss's NaN check: one sentence instead of a traceback."""
    tok = data.load_tokenizer(tiny_dir)
    model = data.load_model(tiny_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(common.UserError, match=r"sampling failed: the model's next-token probabilities are NaN/inf "
                                               r"\(its weights have diverged\); the last complete checkpoint is "
                                               "intact"):
        rollout.generate(model, tok, [data.encode_prompt(tok, "1+1=")], n=2, max_new_tokens=4, temperature=1.0)


@pytest.mark.parametrize("method,flags,enabler,line", [
    ("grpo", ["--kl-estimator", "k2"], ["--beta", "0.04"],
     "--kl-estimator k2 acts only with --beta > 0 (the KL term; DeepSeekMath: 0.04); give that too"),
    ("chord", ["--kl-estimator", "k1"], ["--beta", "0.01"],
     "--kl-estimator k1 acts only with --beta > 0 (the KL term; DeepSeekMath: 0.04); give that too"),
    ("relift", ["--eps-high", "0.28"], ["--clip"],
     "--eps-high 0.28 acts only with --clip (the released loss of this method has no clip); give that too"),
    ("relift", ["--dual-clip", "3"], ["--clip"],
     "--dual-clip 3.0 acts only with --clip (the released loss of this method has no clip); give that too"),
    ("grpo", ["--gppo-beta-low", "0.25"], ["--clip-mode", "gppo"],
     "--gppo-beta-low 0.25 acts only with --clip-mode gppo (GPPO's gradient scales outside the clip range); give that too"),
])
def test_a_flag_that_would_change_nothing_is_refused(method, flags, enabler, line):
    """common.ACTS_ONLY_WITH: one shared table instead of a check in every method file."""
    from tests_util import load_method
    mod = load_method(method)
    with pytest.raises(common.UserError) as e:
        common.parse_args(mod.Args, flags, presets={"recipe": mod.RECIPES})
    assert str(e.value) == "error: " + line
    args = common.parse_args(mod.Args, flags + enabler, presets={"recipe": mod.RECIPES})  # with it: accepted
    assert args.beta > 0 or getattr(args, "clip", False) or args.clip_mode == "gppo"
    common.parse_args(mod.Args, [], presets={"recipe": mod.RECIPES})  # the defaults never trip it
