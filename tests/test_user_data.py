"""Issue 18: a user's own data, model and reward. Small files in the formats users have (tests/data/user_*.jsonl:
arithmetic questions with signed numbers and expressions, competition answers written in words, boxed LaTeX,
conversational prompts, TRL messages and prompt/completion rows) through the real tokenizer, chat template,
math-verify and method files."""
import json
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, run_method

import common
import data
import rollout
import recipes.datasets
import recipes

DATA = REPO / "tests" / "data"
TINY = ["--max-steps", 2, "--eval-size", 2, "--prompts-per-step", 2, "--num-generations", 2, "--max-new-tokens", 8,
        "--quiet"]


def rows(name):
    return [json.loads(x) for x in (DATA / name).read_text().splitlines()]


def metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return data.load_tokenizer(tiny_dir)


# ---------------------------------------------------------------- rewards ----------------------------------------
def test_answer_formats_follow_the_sources():
    text = "First \\boxed{3}, then \\boxed{\\frac{1}{2}}.\nAnswer: 42\n#### 7"
    assert rollout.extract_answer(text, "boxed") == "\\frac{1}{2}"  # the LAST \boxed{}, braces balanced
    assert rollout.extract_answer(text, "answer_line") == "42"  # DAPO: the last 'Answer:' line
    assert rollout.extract_answer(text, "hash") == "7"  # embedded '#', GSM8K '####'
    assert rollout.extract_answer("it is 1,250 or -3.5 units", "last_number") == "-3.5"
    # auto: boxed, else Answer:, else a '#' on the last line, else the last number, else the last line
    assert rollout.extract_answer(text, "auto") == "\\frac{1}{2}"
    assert rollout.extract_answer("so\nAnswer: $-9$.", "auto") == "-9"
    assert rollout.extract_answer("# Plan\n7+8=15#125", "auto") == "125"
    assert rollout.extract_answer("there are 3 apples and 4 pears, 7 in all", "auto") == "7"
    assert rollout.extract_answer("Yes", "auto") == "Yes" and rollout.extract_answer("no answer", "boxed") == ""
    # every dataset preset says where its completions' answer is, and its rows carry it
    assert {k: p["answer_format"] for k, p in recipes.dataset_presets().items()}["dapo_math_17k"] == "answer_line"
    assert all(p["answer_format"] in rollout.ANSWER_FORMATS for p in recipes.dataset_presets().values())
    assert {r["answer_format"] for r in data.load_examples("math500:tests/data/math500.jsonl", need_response=False)
            } == {"boxed"}
    assert data.load_examples("embedded", limit=1)[0]["answer_format"] == "hash"


def test_echoing_an_arithmetic_question_earns_nothing():
    """The issue's cases: 'Calculate -2 + -1137.' answered '-2 + -1137', or '413*20' for 8260, scored 1.0 because
    math-verify evaluates the expression. Now only a computed number is paid, in every answer format."""
    for r in rows("user_arithmetic.jsonl"):
        ex = {"prompt": r["question"], "answer": r["answer"]}
        expr = r["question"].split(" ", 1)[1].rstrip(".?").removeprefix("is ").removeprefix("out ")
        for echo in (expr, f"\\boxed{{{expr}}}", f"Answer: {expr}", r["question"]):
            assert rollout.math_reward(echo, ex) == 0.0, (echo, ex)
        worked = [f"{expr} = {r['answer']}"] if r["answer"] != "True" else []  # no marker: the last number
        for good in (f"\\boxed{{{r['answer']}}}", f"Answer: {r['answer']}", *worked):
            assert rollout.math_reward(good, ex) == 1.0, (good, ex)
    assert rollout.math_reward("\\boxed{413 \\times 20}", {"prompt": "", "answer": "8260"}) == 0.0
    assert rollout.math_reward("\\boxed{8260}", {"prompt": "", "answer": "8260"}) == 1.0
    assert rollout.math_reward("so \\boxed{-\\frac{7}{4}}", {"prompt": "", "answer": "-1.75"}) == 1.0  # a number form
    assert rollout.math_reward("\\boxed{90^\\circ}", {"prompt": "", "answer": "90"}) == 1.0  # a unit, not a power
    assert rollout.math_reward("\\boxed{-36/4}", {"prompt": "", "answer": "-9"}) == 0.0  # a reduced fraction only
    # the measurement, in miniature: the old reward (math-verify on the raw completion, gold in $...$) paid
    # for echoes; evaluate.py's reward (get_reward_fn auto on a user's file) does not
    from math_verify import parse, verify
    ar = rows("user_arithmetic.jsonl")
    echoes = [(r["question"].split(" ", 1)[1].rstrip(".?").removeprefix("is ").removeprefix("out "),
               {"prompt": r["question"], "answer": r["answer"]}) for r in ar]
    old = sum(bool(verify(parse(f"${e['answer']}$"), parse(t))) for t, e in echoes)
    new = rollout.get_reward_fn("auto", None, "auto", str(DATA / "user_arithmetic.jsonl"))
    assert old >= 6 and sum(new(t, e) for t, e in echoes) == 0


def test_answers_in_words_latex_and_numbers_are_parsed_as_what_they_are():
    """Gold answers were wrapped in $...$: 'The limit exists and is equal to 1' became a product of letters and no
    completion matched. Text with words is compared as text and parsed as prose; LaTeX and numbers as math."""
    good = ["so the limit is \\boxed{1}", "\\boxed{\\text{No real solutions}}", "Answer: yes", "\\boxed{x^2+2x+1}",
            "\\boxed{\\frac{\\sqrt3}{2}}", "\\boxed{4}"]
    wrong = ["\\boxed{2}", "\\boxed{x = i}", "\\boxed{no}", "\\boxed{(x+1)^2}", "\\boxed{\\frac12}", "\\boxed{2^{n-1}}"]
    for r, g, w in zip(rows("user_competition.jsonl"), good, wrong):
        ex = {"prompt": r["problem"], "answer": r["answer"]}
        assert rollout.math_reward(g, ex) == 1.0, (g, ex)
        assert rollout.math_reward(w, ex) == 0.0, (w, ex)  # '(x+1)^2' restates the question: 0
        assert rollout.math_reward(f"Answer: {r['answer']}", ex) == 1.0  # the words themselves
    # exact: the extracted answer as a string, in any format (the old exact reward read only the text after '#')
    assert rollout.exact_reward("so \\boxed{19}", {"answer": "19"}) == 1.0
    assert rollout.exact_reward("7+8=15#125", {"answer": "125", "answer_format": "hash"}) == 1.0
    assert rollout.exact_reward("12#5 \\boxed{125}", {"answer": "125"}, answer_format="hash") == 0.0


def test_reward_specs_weights_and_bad_specs(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def brevity(text, example):\n    return 1.0 / (1 + len(text))\n\ndef helper():\n    pass\n")
    r = rollout.get_reward_fn(f"math,{f}:brevity", "1,0.5", "auto", "file.jsonl")
    ex = {"prompt": "Calculate -2 + -1137.", "answer": "-1139"}
    assert r("\\boxed{-1139}", ex) == pytest.approx(1.0 + 0.5 / 14)
    assert r("-2 + -1137", ex) == pytest.approx(0.5 / 11)
    assert r.metrics() == pytest.approx({"train/reward/math": 0.5, "train/reward/brevity": (1 / 14 + 1 / 11) / 2})
    assert r.metrics() == {"train/reward/math": 0.0, "train/reward/brevity": 0.0}  # reset after each step
    assert r("x", ex, record=False) and r.count == 0  # evaluation does not touch the training metrics
    assert list(rollout.get_reward_fn("auto", None, "auto", "embedded").fns) == ["exact"]
    assert list(rollout.get_reward_fn("auto", None, "auto", "x.jsonl").fns) == ["math"]
    for spec, weights, msg in [
            ("nope.py:f", None, "reward file 'nope.py' does not exist"),
            (f"{f}:missing", None, f"reward file '{f}' has no function 'missing'; its functions are ['brevity', "
                                   "'helper']"),
            ("mathh", None, "unknown reward 'mathh'; --reward takes auto, exact, math or FILE.py:FUNCTION"),
            ("math,exact", "1", "--reward-weights has 1 value(s) for 2 reward(s)"),
            ("math", "one", "--reward-weights 'one' must be comma-separated numbers")]:
        with pytest.raises(SystemExit, match="error: " + msg.replace("(", r"\(").replace(")", r"\)").replace(
                "[", r"\[").replace("]", r"\]")):
            rollout.get_reward_fn(spec, weights, "auto", "x.jsonl")
    boom = tmp_path / "boom.py"
    boom.write_text("def r(text, example):\n    return example['missing']\n")
    with pytest.raises(SystemExit, match="error: reward 'r' raised KeyError: 'missing'"):
        rollout.get_reward_fn(f"{boom}:r")("x", {"answer": "1"})


@pytest.mark.slow
def test_custom_weighted_reward_logged_completions_and_zero_signal_warning(tmp_path):
    """grpo.py on the embedded default with a reward file: each reward is logged as train/reward/<name>, sample
    completions go to completions.jsonl at every evaluation, and with every group's rewards equal (the file's
    reward returns 0; the exact reward has weight 0) the zero-signal warning fires at step 5."""
    f = tmp_path / "user_reward.py"
    f.write_text("def zero(completion_text, example):\n    return 0.0\n")
    out = tmp_path / "run"
    p = run_method("grpo", *TINY[:-1], "--max-steps", 5, "--eval-every", 5, "--reward", f"exact,{f}:zero",
                   "--reward-weights", "0,1", "--output-dir", out, "--save-every", 4)
    steps = [r for r in metrics(out) if "train/loss" in r]
    assert len(steps) == 5 and all({"train/reward/exact", "train/reward/zero"} <= r.keys() for r in steps)
    assert all(r["train/reward"] == 0 and r["train/frac_zero_std_groups"] == 1.0 for r in steps)
    assert [r["train/zero_signal_steps"] for r in steps] == [1, 2, 3, 4, 5]
    assert ("[warning] step 5: every group's rewards have been equal for 5 steps (train/frac_zero_std_groups 1.0)"
            in p.stdout)
    assert "[sample] step 5, reward 0, advantage +0.000:" in p.stdout  # a few printed
    truncated = all(r["train/frac_truncated"] == 1.0 for r in steps)  # 8 new tokens: the embedded answers are longer
    assert truncated == ("[warning] step 5: every completion has been truncated at --max-new-tokens for 5 steps"
                         in p.stdout)
    recs = [json.loads(x) for x in (out / "completions.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and {r["step"] for r in recs} == {5}  # 2 prompts x 2 completions at the evaluation step
    assert set(recs[0]) == {"step", "prompt", "completion", "reward", "advantage", "finished", "answer"}
    assert recs[0]["prompt"].startswith("<|user|>") and recs[0]["prompt"].endswith("<|assistant|>")
    # final/ holds the model for from_pretrained and vLLM, the optimizer state stays in checkpoint-*
    assert sorted(x.name for x in (out / "final").iterdir()) == [
        "COMPLETE", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert (out / "checkpoint-0000004" / "trainer_state.pt").exists()
    # --resume continues from checkpoint-0000004 (final/ is not a resume point); the files keep their steps
    p = run_method("grpo", *TINY[:-1], "--max-steps", 6, "--eval-every", 5, "--reward", f"exact,{f}:zero",
                   "--reward-weights", "0,1", "--output-dir", out, "--save-every", 4, "--resume")
    assert "resumed from checkpoint-0000004" in p.stdout
    assert [r["step"] for r in metrics(out) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {json.loads(x)["step"] for x in (out / "completions.jsonl").read_text().splitlines()} == {5, 6}


# ---------------------------------------------------------------- tokenizer and data -----------------------------
def test_embedded_tokenizer_refuses_characters_it_cannot_encode(tok, tmp_path):
    """'Is 575 >= 1?' reached the model as 'Is 575 = 1?' and '2^(n-1)' as '2(n-1)': now one error line."""
    assert tok.decode(tok.encode("Is 575 >= 1?")) == "Is 575 = 1?"  # what the byte-level BPE does with '>'
    with pytest.raises(SystemExit) as e:
        data.tokenize_examples(tok, [{"prompt": "Is 575 >= 1?", "answer": "True"},
                                       {"prompt": "Find 2^(n-1) for n = 3 ≥ 1", "answer": "4"}], 128,
                                 with_response=False)
    msg = str(e.value)
    assert msg.startswith("error: the embedded character tokenizer cannot encode '>', ") and "'^'" in msg
    assert "'≥' (GREATER-THAN OR EQUAL TO)" in msg and "(2 of 2 examples" in msg and "--model" in msg
    with pytest.raises(SystemExit, match="cannot encode '≤'"):  # a message of a conversation, a system prompt
        data.tokenize_examples(tok, [{"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}], 128,
                                 system_prompt="x ≤ y", with_response=False)
    # end to end: the run stops before loading the model, with one line and no traceback
    p = run_method("sft", "--dataset", DATA / "user_arithmetic.jsonl", "--prompt-column", "question",
                   "--response-column", "answer", "--eval-size", 2, "--output-dir", tmp_path, "--quiet", check=False)
    assert p.returncode != 0 and "error: the embedded character tokenizer cannot encode '>'" in p.stderr
    assert "Traceback" not in p.stderr


def test_conversational_prompt_renders_exactly_as_apply_chat_template(tok):
    loaded = data.load_examples(str(DATA / "user_conversational.jsonl"), need_response=False)
    assert isinstance(loaded[0]["prompt"], list)  # not stringified to "role: user, content: ..."
    ex = data.tokenize_examples(tok, loaded, 256, with_response=False)
    for r, e in zip(rows("user_conversational.jsonl"), ex):
        want = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert e["prompt_ids"] == want["input_ids"]
    assert tok.decode(ex[1]["prompt_ids"]) == ("<|user|>What is 5+3?<|end|><|assistant|>5+3=8#8<|end|><|user|>And "
                                               "6+3?<|end|><|assistant|>")
    # --system-prompt goes in front unless the conversation has its own system message
    sys_ids = data.encode_prompt(tok, loaded[0]["prompt"], "Other.")
    assert tok.decode(sys_ids).startswith("<|system|>Answer with the digits after #.<|end|>")
    assert tok.decode(data.encode_prompt(tok, loaded[1]["prompt"], "Be brief.")).startswith(
        "<|system|>Be brief.<|end|><|user|>What is 5+3?")


def test_messages_and_prompt_completion_columns(tok):
    msgs = data.load_examples(str(DATA / "user_messages.jsonl"))
    assert msgs[0]["prompt"] == rows("user_messages.jsonl")[0]["messages"][:2]
    assert msgs[0]["response"] == "2+7=9,1+0=1#19"  # the last assistant turn is the response
    ex = data.tokenize_examples(tok, msgs[:1], 256)[0]
    full = tok.apply_chat_template(rows("user_messages.jsonl")[0]["messages"], tokenize=True, return_dict=True)
    assert ex["prompt_ids"] + ex["response_ids"] == full["input_ids"]  # the whole conversation, as the template
    pc = data.load_examples(str(DATA / "user_prompt_completion.jsonl"))
    assert [(r["prompt"], r["response"]) for r in pc] == [("12+7=", "2+7=9,1+0=1#19"), ("23+45=", "3+5=8,2+4=6#68")]


def test_heldout_split_is_random_seeded_and_eval_size_zero_means_none():
    def args(**kw):
        return SimpleNamespace(**{**dict(dataset=str(DATA / "user_messages.jsonl"), dataset_split="train",
                                         dataset_config=None, prompt_column="prompt", response_column="response",
                                         answer_column="answer", eval_dataset=None, eval_size=2, seed=0), **kw})
    train, held = data.load_train_eval(args())
    assert len(train) == 4 and len(held) == 2 and held != rows("user_messages.jsonl")[-2:]  # not the last rows
    assert data.load_train_eval(args(seed=7)) == (train, held)  # the same rows whatever --seed
    assert not {r["response"] for r in train} & {r["response"] for r in held}
    train0, held0 = data.load_train_eval(args(eval_size=0))
    assert len(train0) == 6 and held0 == []  # rows[:-0] used to empty the training set
    assert data.load_train_eval(args(dataset="embedded", eval_size=0))[1] == []
    with pytest.raises(SystemExit, match="no training examples are left"):
        data.load_train_eval(args(eval_size=6))


@pytest.mark.slow
def test_messages_sft_trains_with_eval_size_zero(tmp_path):
    p = run_method("sft", "--dataset", DATA / "user_messages.jsonl", "--eval-size", 0, "--max-steps", 2,
                   "--batch-size", 2, "--output-dir", tmp_path, "--quiet")
    assert "[sft] 6 demonstrations, 0 held-out" in p.stdout
    assert "done: no held-out evaluation (--eval-size 0)" in p.stdout
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == [1, 2] and not any("eval/accuracy" in r for r in m)
    assert all(r["train/loss"] > 0 for r in m)


@pytest.mark.slow
def test_sft_without_answers_scores_the_heldout_loss(tmp_path, tiny_dir, tok):
    """A TRL messages file has no answer column: SFT trains and evaluates the held-out demonstrations' loss
    (eval/nll), checked at step 0 against the plain Hugging Face forward of the untouched model."""
    p = run_method("sft", "--dataset", DATA / "user_messages_noanswer.jsonl", "--eval-size", 2, "--max-steps", 1,
                   "--batch-size", 2, "--output-dir", tmp_path, "--quiet")
    assert "done: held-out nll " in p.stdout and "(the held-out rows have no answers to score)" in p.stdout
    m = metrics(tmp_path)
    assert [sorted(r) for r in m if r["step"] == 0] == [["eval/nll", "step"]] and "eval/accuracy" not in m[-1]
    args = SimpleNamespace(dataset=str(DATA / "user_messages_noanswer.jsonl"), dataset_split="train",
                           dataset_config=None, prompt_column="prompt", response_column="response",
                           answer_column="answer", eval_dataset=None, eval_size=2, seed=0)
    _, held = data.load_train_eval(args, need_answer=False)
    assert all(r["answer"] is None for r in held)
    model, nll, n = data.load_model(tiny_dir).eval(), 0.0, 0
    for ex in data.tokenize_examples(tok, held, 256):
        ids = torch.tensor([ex["prompt_ids"] + ex["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        tgt = ids[0, len(ex["prompt_ids"]):]
        nll -= logp[len(ex["prompt_ids"]) - 1:].gather(-1, tgt[:, None]).sum().item()
        n += len(tgt)
    assert m[0]["eval/nll"] == pytest.approx(nll / n, rel=1e-4)


def test_chat_template_flag(tiny_dir, tmp_path):
    t = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")
    (tmp_path / "t.jinja").write_text(t)
    for value in (t, str(tmp_path / "t.jinja")):
        tok = data.load_tokenizer(tiny_dir, chat_template=value)
        assert tok.decode(data.encode_prompt(tok, "12+7=", "Be brief.")) == "system: Be brief.\nuser: 12+7=\nassistant: "
    with pytest.raises(SystemExit, match="error: --chat-template 'nofile.jinja' is neither a file nor a Jinja"):
        data.load_tokenizer(tiny_dir, chat_template="nofile.jinja")


# ---------------------------------------------------------------- the small ones ---------------------------------
@pytest.mark.slow
def test_evaluate_takes_the_column_format_and_reward_flags(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"question": f"{a}+{b}=", "gold": str(a + b)}) + "\n"
                         for a, b in [(12, 7), (23, 45), (31, 18)]))
    import subprocess
    p = subprocess.run([sys.executable, "evaluate.py", "--benchmarks", str(f), "--prompt-column", "question",
                        "--answer-column", "gold", "--answer-format", "hash", "--reward", "exact",
                        "--max-new-tokens", "24", "--output", str(tmp_path / "s.json")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"[eval] {f}: " in p.stdout and "on 3 problems" in p.stdout
    score = json.loads((tmp_path / "s.json").read_text())["scores"][str(f)]
    assert 0.0 <= score <= 1.0
    p = subprocess.run([sys.executable, "evaluate.py", "--benchmarks", str(f), "--max-new-tokens", "4"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "has no column prompt (--prompt-column)" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_offline_hub_model_and_too_long_lengths_one_error_line(tmp_path):
    p = run_method("sft", "--model", "someorg/no-such-model", "--output-dir", tmp_path / "a", check=False,
                   env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: cannot load the tokenizer of 'someorg/no-such-model' "
                                                        "(")
    p = run_method("grpo", "--max-new-tokens", 300, "--output-dir", tmp_path / "b", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert ("error: --max-prompt-length 64 + --max-new-tokens 300 = 364 tokens exceed the context of" in p.stderr
            and "(max_position_embeddings 256)" in p.stderr)


def test_no_future_warnings_from_our_generate_and_packed_passes(tiny_dir, tok):
    from kernels.engine import FusedLM
    model = data.load_model(tiny_dir)
    prompts = [data.encode_prompt(tok, "1+2="), data.encode_prompt(tok, "345+67=")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        comps, _, _ = rollout.generate(model, tok, prompts, n=3, max_new_tokens=4, seed=1)  # shared-prefix prefill
        b = data.collate([(prompts[i // 3], c) for i, c in enumerate(comps)], tok.pad_token_id)
        FusedLM(model)(b["input_ids"], b["attention_mask"], b["loss_mask"])
    assert rollout.cache_kwarg(model) in ("cache", "past_key_values")


@pytest.mark.slow
def test_report_to_each_tracker_offline_when_installed(tmp_path):
    """--report-to tensorboard,wandb,trackio: each installed tracker gets the metrics offline (W&B with
    WANDB_MODE=offline, trackio in its local store); one that is not installed is named and the run goes on."""
    import importlib.util
    with pytest.raises(SystemExit, match="error: --report-to tensorbord: unknown tensorbord; choose from none, "):
        common.MetricsLogger(tmp_path, common.Dist(), 1, report_to="tensorbord")
    out = tmp_path / "run"
    p = run_method("sft", "--max-steps", 2, "--batch-size", 8, "--eval-size", 4, "--output-dir", out, "--quiet",
                   "--report-to", "tensorboard,wandb,trackio",
                   env={"WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio")})
    for target in ("tensorboard", "wandb", "trackio"):
        if importlib.util.find_spec(target) is None:
            assert f"[log] --report-to {target}: {target} is not installed (pip install {target})" in p.stdout
    if importlib.util.find_spec("tensorboard"):
        assert any(f.name.startswith("events.out.tfevents") for f in (out / "tb").iterdir())
    if importlib.util.find_spec("wandb"):
        assert list((out / "wandb").glob("offline-run-*"))
    if importlib.util.find_spec("trackio"):
        assert list((tmp_path / "trackio").iterdir())
    assert len(metrics(out)) == 4  # metrics.jsonl as always: eval 0, steps 1-2, final eval


def test_heldout_samples_logged_for_teacher_forcing_methods(tiny_dir, tok, tmp_path):
    """sft/dft/otr have no rollouts: each evaluation writes a few greedy held-out completions instead."""
    ex = data.tokenize_examples(tok, data.embedded_task("eval")[:6], 128, with_response=False)
    log = common.MetricsLogger(tmp_path, common.Dist(), 1, quiet=True)
    args = SimpleNamespace(max_new_tokens=6, eval_samples=0, eval_temperature=1.0)
    reward = rollout.get_reward_fn("auto")
    acc = rollout.eval_metrics(data.load_model(tiny_dir), tok, ex, reward, common.Dist(), args, log=log, step=3)
    recs = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["step"] == 3 and r["advantage"] is None for r in recs)
    assert [r["answer"] for r in recs] == [e["answer"] for e in ex[:4]]
    assert all(r["reward"] == rollout.exact_reward(r["completion"], {"answer": r["answer"], "answer_format": "hash"})
               for r in recs) and list(acc) == ["eval/accuracy", "eval/accuracy_se", "eval/per_problem"]
    log.log(3, acc)  # the logger writes each problem's scores to eval_outcomes.jsonl, the scalars to metrics.jsonl
    assert "eval/per_problem" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    outcomes = [json.loads(x) for x in (tmp_path / "eval_outcomes.jsonl").read_text().splitlines()]
    assert len(outcomes) == 1 and outcomes[0]["step"] == 3 and len(outcomes[0]["greedy"]) == 6
    assert sum(outcomes[0]["greedy"]) / 6 == pytest.approx(acc["eval/accuracy"], abs=1e-4)
    assert reward.count == 0  # held-out scores are not training rewards


def test_dataset_config_selects_a_configuration(tmp_path):
    """--dataset-config reaches load_dataset: a dataset repository laid out as on the hub (README.md with configs),
    read from a local directory; a missing configuration is one error line."""
    (tmp_path / "README.md").write_text("---\nconfigs:\n- config_name: easy\n  data_files: easy.jsonl\n"
                                        "- config_name: hard\n  data_files: hard.jsonl\n---\n")
    for name, q in [("easy", "1+1="), ("hard", "12*34=")]:
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"prompt": q, "answer": str(eval(q[:-1]))}) + "\n")
    assert data.load_examples(str(tmp_path), config="hard", need_response=False)[0]["prompt"] == "12*34="
    assert data.load_examples(str(tmp_path), config="easy", need_response=False)[0]["answer"] == "2"
    with pytest.raises(SystemExit, match=f"error: could not load dataset '{tmp_path}' config 'medium' split 'train'"):
        data.load_examples(str(tmp_path), config="medium", need_response=False)


def test_zero_signal_warning_needs_consecutive_steps(tmp_path, capsys):
    log = common.MetricsLogger(tmp_path, common.Dist(), 12, quiet=True)
    seq = [1.0] * 4 + [0.5] + [1.0] * 5  # a step with signal resets the count
    for step, frac in enumerate(seq, 1):
        log.log(step, {"train/frac_zero_std_groups": frac, "train/frac_truncated": 0.0})
    out = capsys.readouterr().out
    assert out.count("[warning]") == 1 and "[warning] step 10: every group's rewards have been equal for 5" in out
    assert [json.loads(x)["train/zero_signal_steps"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
            ] == [1, 2, 3, 4, 0, 1, 2, 3, 4, 5]
    log.log(11, {"eval/accuracy": 0.5})  # an evaluation line neither counts nor resets
    assert "train/zero_signal_steps" not in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
