"""common.py: tokenisation masks, the embedded default, generation, rewards, checkpoints, distributed, bad inputs."""
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

import pytest
import torch
from conftest import REPO, torchrun

import common
import data
import rollout


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return data.load_tokenizer(tiny_dir)


def test_import_has_no_side_effects(tmp_path):
    """Importing common initialises no process group, writes nothing and pulls in no heavy library (transformers,
    datasets, math_verify, vllm load inside the functions that need them). A count of modules, not a timing: the
    shared test machine makes import times noisy."""
    code = ("import sys; import common; import torch.distributed as d; assert not d.is_initialized(); "
            "print(sorted(m for m in ('transformers', 'datasets', 'math_verify', 'vllm') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []  # wrote nothing


def test_parse_args_help_defaults_and_presets():
    @dataclass
    class A:
        lr: float = 1e-3  # from the paper
        agg: Literal["a", "b"] = "a"  # aggregation
        name: Optional[str] = None  # a name
        flag: bool = False  # a switch
        preset: Optional[str] = None  # preset

    presets = {"preset": {"fast": {"lr": 0.5, "flag": True}}}
    a = common.parse_args(A, ["--agg", "b", "--flag"], presets)
    assert (a.lr, a.agg, a.name, a.flag) == (1e-3, "b", None, True)
    a = common.parse_args(A, ["--preset", "fast", "--lr", "0.25"], presets)
    assert (a.lr, a.flag) == (0.25, True)  # explicit flag beats the preset
    with pytest.raises(SystemExit):
        common.parse_args(A, ["--agg", "c"])
    comments = common._field_comments(A)
    assert comments["lr"] == "from the paper"


def test_help_lists_every_flag_with_default_and_source():
    p = subprocess.run([sys.executable, "methods/sft.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    out = " ".join(p.stdout.split())
    for flag in ["--lr", "--loss-agg", "--max-grad-norm", "--warmup-ratio", "--resume", "--fsdp"]:
        assert flag in out
    assert "DFT paper §4.1.1" in out and "(default: 5e-05)" in out


def test_prompt_masked_and_eos_is_target(tok):
    rows = [{"prompt": "12+7=", "response": "2+7=9,1+0=1#19", "answer": "19"}]
    ex = data.tokenize_examples(tok, rows, 128, system_prompt="Answer exactly.")[0]
    b = data.collate([(ex["prompt_ids"], ex["response_ids"])], tok.pad_token_id)
    ids, mask = b["input_ids"][0], b["loss_mask"][0]
    n_prompt = len(ex["prompt_ids"])
    assert tok.decode(ids[:n_prompt]) == "<|system|>Answer exactly.<|end|><|user|>12+7=<|end|><|assistant|>"
    assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].sum() == len(ex["response_ids"])
    assert ids[-1].item() == tok.eos_token_id and mask[-1] == 1  # EOS is a target
    assert tok.decode(ids[mask.bool()], skip_special_tokens=True) == "2+7=9,1+0=1#19"
    # the chat template's {% generation %} mask agrees with our prompt/response split
    msgs = [{"role": "system", "content": "Answer exactly."}, {"role": "user", "content": "12+7="},
            {"role": "assistant", "content": "2+7=9,1+0=1#19"}]
    t = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert t["input_ids"] == ids.tolist() and t["assistant_masks"] == mask.long().tolist()


def test_embedded_reload_identical_logits(tmp_path):
    tok = data.build_embedded_tokenizer()
    model = data.build_embedded_model(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, model2 = data.load_tokenizer(str(tmp_path)), data.load_model(str(tmp_path))
    x = torch.tensor([tok2.encode("123+45=")])
    assert tok2.encode("123+45=") == tok.encode("123+45=")
    assert torch.equal(model.eval()(x).logits, model2.eval()(x).logits)
    assert model2.config.model_type == "qwen2" and tok2.chat_template == data.CHAT_TEMPLATE


def test_embedded_task_splits_disjoint_and_deterministic():
    s = {k: [r["prompt"] for r in data.embedded_task(k)] for k in ("sft", "rl", "eval")}
    assert not (set(s["sft"]) & set(s["eval"])) and not (set(s["rl"]) & set(s["eval"])) and not (
        set(s["sft"]) & set(s["rl"]))
    assert s["eval"] == [r["prompt"] for r in data.embedded_task("eval")]
    for r in data.embedded_task("eval")[:50]:
        assert rollout.exact_reward(r["response"], r) == 1.0 and eval(r["prompt"][:-1]) == int(r["answer"])


def test_hf_generation_shapes_and_eos_flags(tiny_dir, tok):
    model = data.load_model(tiny_dir)
    prompts = [data.encode_prompt(tok, "1+2="), data.encode_prompt(tok, "345+67=")]
    comps, fin, lps = rollout.generate(model, tok, prompts, n=3, max_new_tokens=6, temperature=1.0, seed=1)
    assert len(comps) == 6 and lps is None
    for c, f in zip(comps, fin):
        assert 1 <= len(c) <= 6 and f == (c[-1] == tok.eos_token_id) and tok.eos_token_id not in c[:-1]
    # a head that always prefers EOS: every completion is [EOS] and finished; one that never does: all truncated
    head = torch.nn.Linear(model.config.hidden_size, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 5.0
    model.lm_head = head
    comps2, fin2, _ = rollout.generate(model, tok, prompts, n=2, max_new_tokens=4, temperature=0)
    assert comps2 == [[tok.eos_token_id]] * 4 and all(fin2)
    with torch.no_grad():
        head.bias[tok.eos_token_id] = -5.0
        head.bias[tok.convert_tokens_to_ids("7")] = 5.0
    comps3, fin3, _ = rollout.generate(model, tok, prompts, n=2, max_new_tokens=4, temperature=0)
    assert [tok.decode(c) for c in comps3] == ["7777"] * 4 and not any(fin3)
    again, _, _ = rollout.generate(data.load_model(tiny_dir), tok, prompts, n=3, max_new_tokens=6, seed=1)
    assert again == comps  # sampling is a function of the seed


def test_math_verify_reward():
    assert rollout.math_reward("so the answer is \\boxed{1/2}", {"answer": "0.5"}) == 1.0
    assert rollout.math_reward("so the answer is \\boxed{2}", {"answer": "0.5"}) == 0.0
    assert rollout.math_reward("no answer here", {"answer": "0.5"}) == 0.0
    assert rollout.exact_reward("7+8=15#125", {"answer": "125"}) == 1.0
    assert rollout.exact_reward("7+8=15#126", {"answer": "125"}) == 0.0


def test_checkpoint_roundtrip_bit_exact(tmp_path, tiny_dir, tok, capsys):
    from kernels.engine import FusedLM
    d = common.Dist()
    model = FusedLM(data.load_model(tiny_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sch = common.lr_schedule(opt, 2, 10)
    x = torch.tensor([tok.encode("12+34=46")])
    for _ in range(2):
        model.lm(x).logits.sum().backward()
        opt.step(); sch.step(); opt.zero_grad()
    path = common.save_checkpoint(tmp_path, 2, model, tok, [opt], [sch], {"buffer": [1, 2]}, d)
    model2 = FusedLM(data.load_model(tiny_dir))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    sch2 = common.lr_schedule(opt2, 2, 10)
    state = common.load_checkpoint(path, model2, [opt2], [sch2], d)
    assert state == {"step": 2, "buffer": [1, 2]}
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert sch2.last_epoch == sch.last_epoch
    assert data.load_model(str(path)).lm_head.weight.data_ptr() != 0  # a plain save_pretrained dir
    # a partial checkpoint (no COMPLETE marker) is skipped with a warning
    (tmp_path / "checkpoint-0000009").mkdir()
    assert common.list_checkpoints(tmp_path) == [path]
    assert "warning: skipping incomplete checkpoint" in capsys.readouterr().err


def test_torchrun_all_reduce_token_count(tmp_path):
    out = tmp_path / "r.txt"
    torchrun(REPO / "tests" / "_dist_worker.py", out, nproc=2, timeout=120)
    assert out.read_text() == "3.0 0.5"


# ---- bad inputs that reach common.py: one clear sentence each -----------------------------------------------------
def test_missing_model_path():
    with pytest.raises(common.UserError, match="does not exist.*embedded"):
        data.load_model("./no/such/model")


def test_missing_dataset_column(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "1+1", "solution": "2", "answer": "2"}) + "\n")
    with pytest.raises(common.UserError, match=r"no column prompt \(--prompt-column\).*\['question', 'solution', "):
        data.load_examples(str(f), prompt_column="prompt", response_column="solution")
    rows = data.load_examples(str(f), prompt_column="question", response_column="solution")
    assert rows == [{"prompt": "1+1", "response": "2", "answer": "2"}]


def test_empty_dataset(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "1+1", "response": "2", "answer": "2"}) + "\n")
    import datasets
    datasets.Dataset.from_dict({"prompt": [], "response": [], "answer": []}).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(common.UserError, match="is empty"):
        data.load_examples(str(tmp_path / "e.parquet"))


def test_all_filtered_and_empty_demo(tok):
    rows = [{"prompt": "1+1=", "response": "1+1=2#2" * 50, "answer": "2"}, {"prompt": "1+2=", "response": " ",
                                                                           "answer": "3"}]
    with pytest.raises(common.UserError, match=r"filtered out \(1 longer than 64 tokens, 1 with an empty "
                                               r"demonstration\)"):
        data.tokenize_examples(tok, rows, 64)


def test_tokenizer_without_chat_template(tmp_path):
    tok = data.build_embedded_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(common.UserError, match="no chat template"):
        data.load_tokenizer(str(tmp_path))


def test_vllm_not_installed_message():
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(common.UserError, match="needs vLLM, which is not installed.*pip install vllm"):
        rollout.VLLMEngine("unused")


def test_output_dir_refuses_previous_run(tmp_path):
    @dataclass
    class A:
        output_dir: str = str(tmp_path)
        resume: bool = False
        overwrite: bool = False
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(common.UserError, match="already holds a run.*--resume.*--overwrite"):
        common.prepare_output_dir(A(), common.Dist())
    common.prepare_output_dir(A(overwrite=True), common.Dist())
    assert not (tmp_path / "metrics.jsonl").exists() and (tmp_path / "config.json").exists()


def test_bad_batch_division():
    with pytest.raises(common.UserError, match="not divisible by the world size"):
        data.batch_indices(100, 10, 0, 0, 0, 3)
    with pytest.raises(common.UserError, match="micro-batches"):
        data.split_micro(list(range(10)), 3)


def test_cached_import_time():
    t = time.time()
    import importlib
    importlib.reload(common)
    assert time.time() - t < 3


def test_eval_metrics_greedy_and_mean_at_k():
    """--eval-samples 0 logs greedy accuracy only; k > 0 adds mean@k at --eval-temperature, with fixed sampling seeds
    (two evaluations of one model give the same number), equal to the mean reward of k samples per prompt."""
    path = data.resolve_model("embedded:warm")
    tok, model = data.load_tokenizer(path), data.load_model(path).eval()
    ex = data.tokenize_examples(tok, data.embedded_task("eval")[:24], 512, None, False)
    d = common.Dist()

    @dataclass
    class A:
        max_new_tokens: int = 40
        eval_samples: int = 0
        eval_temperature: float = 0.7

    greedy = rollout.evaluate(model, tok, ex, rollout.exact_reward, d, 40)
    comps, _, _ = rollout.generate(model, tok, [e["prompt_ids"] for e in ex], 1, 40, 0.0, seed=0)
    right = [rollout.exact_reward(t, e) for t, e in zip(tok.batch_decode(comps, skip_special_tokens=True), ex)]
    p, n = sum(right) / len(ex), len(ex)  # the standard error of a mean of 0/1 outcomes: sqrt(p (1 - p) / (n - 1))
    m = rollout.eval_metrics(model, tok, ex, rollout.exact_reward, d, A())
    assert m.pop("eval/per_problem") == {"greedy": right} and greedy == pytest.approx(p)
    assert m == pytest.approx({"eval/accuracy": greedy, "eval/accuracy_se": (p * (1 - p) / (n - 1)) ** 0.5})
    m = rollout.eval_metrics(model, tok, ex, rollout.exact_reward, d, A(eval_samples=3))
    comps, _, _ = rollout.generate(model, tok, [e["prompt_ids"] for e in ex], 3, 40, 0.7, 1.0, seed=0)
    texts = tok.batch_decode(comps, skip_special_tokens=True)
    per = [sum(rollout.exact_reward(texts[3 * i + j], ex[i]) for j in range(3)) / 3 for i in range(n)]
    expected = sum(per) / n  # mean@3; its standard error is over problems (the 3 samples of one are not independent)
    se = (sum((x - expected) ** 2 for x in per) / (n - 1) / n) ** 0.5
    assert m["eval/accuracy"] == greedy and m["eval/sampled_accuracy"] == pytest.approx(expected)
    assert m["eval/sampled_accuracy_se"] == pytest.approx(se) and m["eval/per_problem"]["sampled"] == pytest.approx(
        per, abs=1e-4)
    assert m == rollout.eval_metrics(model, tok, ex, rollout.exact_reward, d, A(eval_samples=3))
    assert 0 < expected < 1 and expected != greedy


def test_help_shows_what_a_run_without_flags_uses():
    """Issues 18 and 20: grpo.py's `lr: float = 1e-6` (the paper's) is not what `python methods/grpo.py` uses on the
    embedded model; --help says so beside the default, with the table that replaces it."""
    p = subprocess.run([sys.executable, str(REPO / "methods" / "grpo.py"), "--help"], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "400"})
    assert p.returncode == 0, p.stderr
    blocks = " ".join(p.stdout.split()).split(" --")  # one block per flag, argparse's line wrapping undone
    lines = {"--" + b.split()[0]: b for b in blocks[1:]}
    assert "[a run without flags uses 5e-05: recipe embedded] (default: 1e-06)" in lines["--lr"]
    assert "[a run without flags uses 40: recipe embedded] (default: 1024)" in lines["--max-new-tokens"]
    assert "a run without flags uses" not in lines["--beta"]  # not replaced: the default is what a run uses
