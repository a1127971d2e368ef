"""Paper recipes: `--recipe NAME --dry-run` of every method against the spec's numbers (written here by hand from
/work/shared/specs), sources and overrides, the batch and memory lines; the dataset and benchmark presets through
local copies (tests/data/<preset>.jsonl, same columns as the hub); the model-shape parameter count and the
activation estimate against real models; evaluate.py on the embedded task."""
import ast
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import REPO
from tests_util import load_method

import common
import data
import rollout
import recipes.datasets
import recipes.dry_run
import recipes
from kernels.norm import fuse_rmsnorm


def dry_run(method, *flags, world=None):
    """Run `methods/<method>.py FLAGS --dry-run`; returns ({field: value}, {field: source}, stdout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if world:
        env["WORLD_SIZE"] = str(world)
    p = subprocess.run([sys.executable, str(REPO / "methods" / f"{method}.py"), *flags, "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    values, sources = {}, {}
    for line in p.stdout.splitlines():
        if line.startswith("  ") and len(line) > 74 and line[2:26].strip().isidentifier():
            name, shown = line[2:26].strip(), line[27:73].strip()
            values[name] = shown if shown.endswith("...'") else ast.literal_eval(shown)
            sources[name] = line[74:]
    assert "--dry-run" not in values and values, p.stdout
    return values, sources, p.stdout


# (method, recipe): the values the spec gives for that paper setting (spec section in the comment)
SPEC = {
    ("sft", "paper"): dict(  # methods_a §2 DFT defaults (the SFT baseline trains with the same settings)
        model="Qwen/Qwen2.5-Math-1.5B", dataset="numina_cot", num_demos=100_000, max_length=2048, batch_size=256,
        max_steps=390, lr=5e-5, beta1=0.9, beta2=0.95, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0,
        max_new_tokens=4096, bf16=True, fsdp=True),
    ("dft", "paper"): dict(model="Qwen/Qwen2.5-Math-1.5B", dataset="numina_cot", num_demos=100_000, max_length=2048,
                           batch_size=256, lr=5e-5, beta2=0.95, warmup_ratio=0.1, kl_weight=0.0),
    ("dft", "paper_7b"): dict(model="Qwen/Qwen2.5-Math-7B", lr=5e-5, batch_size=256),
    ("dft", "paper_llama3b"): dict(model="meta-llama/Llama-3.2-3B", lr=5e-5),
    ("dft", "paper_llama8b"): dict(model="meta-llama/Llama-3.1-8B", lr=2e-5),  # "2e-5 for LLaMA-3.1-8B"
    ("dft", "paper_deepseekmath"): dict(model="deepseek-ai/deepseek-math-7b-base", lr=5e-5),
    ("dft", "asft"): dict(kl_weight=0.1, lr=5e-5, batch_size=256, max_length=2048),  # methods_a §2 ASFT, train.sh
    ("otr", "paper"): dict(num_samples=256, kappa=1.3, beta=-0.1, loss_agg="seq_mean_token_mean", lr=5e-5,
                           batch_size=256),  # methods_a §4 (optimizer: "identical settings" to SFT)
    ("grpo", "paper"): dict(  # methods_a §3 DeepSeekMath defaults
        model="deepseek-ai/deepseek-math-7b-instruct", lr=1e-6, beta=0.04, kl_estimator="k3", num_generations=64,
        max_new_tokens=1024, num_iterations=1, steps_per_generation=1, scale_rewards="group", loss_agg="seq_mean_token_mean",
        eps_low=0.2, eps_high=0.2),
    ("grpo", "dr_grpo"): dict(  # methods_a §3 Dr. GRPO recipe (+ the rollout batch of examples/qwen2.5-math-7b.sh)
        model="Qwen/Qwen2.5-Math-7B", dataset="math_lvl3to5", lr=1e-6, beta=0.0, num_generations=8, temperature=1.0,
        max_new_tokens=3000, num_iterations=1, eps_low=0.2, eps_high=0.2, scale_rewards="none", loss_agg="seq_mean_token_sum_norm",
        warmup_steps=0, prompts_per_step=128, steps_per_generation=8, system_prompt=recipes.datasets.PROMPTS["qwen_math"][:40]),
    ("grpo", "dr_grpo_1.5b"): dict(model="Qwen/Qwen2.5-Math-1.5B", max_new_tokens=3000, loss_agg="seq_mean_token_sum_norm"),
    ("grpo", "dapo"): dict(  # methods_a §3 DAPO recipe
        model="Qwen/Qwen2.5-32B", dataset="dapo_math_17k", eps_low=0.2, eps_high=0.28, dynamic_sampling=True,
        loss_agg="token_mean", beta=0.0, lr=1e-6, warmup_steps=20, prompts_per_step=512, num_generations=16,
        steps_per_generation=16, max_new_tokens=20480, overlong_buffer_ratio=0.2, overlong_penalty=1.0,
        temperature=1.0),
    ("chord", "paper"): dict(  # methods_b §2 (mix_chord.yaml, CHORD-phi row of the schedule table)
        model="Qwen/Qwen2.5-7B-Instruct", num_generations=8, prompts_per_step=32, expert_data_ratio=0.2,
        steps_per_generation=1, max_new_tokens=10240, lr=1e-6, mu_warmup_steps=0, mu_decay_steps=0, mu_peak=0.1,
        mu_valley=0.1, sft_weighting="phi", beta=0.0, eps_low=0.2, eps_high=0.2, dual_clip=3.0, temperature=1.0,
        max_grad_norm=1.0, entropy_coef=0.0, scale_rewards="group", loss_agg="token_mean"),
    ("chord", "mu"): dict(mu_warmup_steps=0, mu_decay_steps=200, mu_peak=0.9, mu_valley=0.05, sft_weighting="none",
                          model="Qwen/Qwen2.5-7B-Instruct"),  # methods_b §2, CHORD-mu row
    ("prefix_rft", "paper"): dict(  # methods_b §3 defaults
        dataset="openr1_46k", num_generations=8, num_prefix=1, lr=1e-6, weight_decay=0.01, max_grad_norm=1.0,
        entropy_coef=0.001, dual_clip=3.0, eps_low=0.2, eps_high=0.2, scale_rewards="none", loss_agg="seq_mean_token_sum_norm",
        prefix_high=0.95, prefix_low_start=0.95, prefix_low_end=0.05, entropy_mask_ratio=0.8, prefix_beta_a=1.0,
        prefix_beta_b=1.0),
    ("relift", "paper"): dict(  # methods_b §4 defaults (examples/math-7b/train.sh)
        model="RoadQAQ/Qwen2.5-Math-7B-16k-think", dataset="openr1_46k", num_generations=8, prompts_per_step=128,
        steps_per_generation=2, num_iterations=1, max_prompt_length=1024, max_new_tokens=8192, lr=1e-6,
        weight_decay=0.01, max_grad_norm=0.7, entropy_coef=0.001, clip=False, scale_rewards="none",
        loss_agg="seq_mean_token_sum_norm", beta=0.0, temperature=1.0, sft_buffer_size=128, sft_micro_batch_size=4, sft_lr=1e-6,
        sft_max_grad_norm=1.0, sft_entropy_coef=1e-3),
    ("relift", "math_1.5b"): dict(model="RoadQAQ/Qwen2.5-Math-1.5B-16k-think", sft_micro_batch_size=2, lr=1e-6),
    ("relift", "qwen_7b"): dict(model="RoadQAQ/Qwen2.5-7B-think", sft_micro_batch_size=2),
    ("kdrl", "paper"): dict(  # methods_b §5 (secondary sources)
        model="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", teacher="Skywork/Skywork-OR1-Math-7B", beta=5e-3,
        beta_decay=5e-5, beta_min=1e-3, kl_estimator="k2", kd_mask="none", max_steps=280),
    ("kdrl", "masking"): dict(kd_mask="response", kl_estimator="k2"),
}


@pytest.mark.parametrize("method,recipe", list(SPEC))
def test_recipe_matches_spec(method, recipe):
    values, sources, out = dry_run(method, "--recipe", recipe)
    for name, want in SPEC[method, recipe].items():
        got = values[name]
        if isinstance(got, str) and got.endswith("...'"):  # long values are printed truncated
            assert want.startswith(got[1:-4]), (name, got)
        else:
            assert got == want, (name, got, want)
    for name, src in sources.items():  # every value the recipe sets prints its source
        if src.startswith(("recipe", "preset", "variant")):
            assert len(src.split(": ", 1)[1]) > 3, (name, src)
    unknown = [n for n, s in sources.items() if "UNKNOWN" in s]
    if unknown:
        assert f"left UNKNOWN by the sources (our choices, see above): {', '.join(unknown)}" in out


def test_every_method_has_a_paper_recipe():
    for method in ("sft", "dft", "otr", "grpo", "chord", "prefix_rft", "relift", "kdrl"):
        assert (method, "paper") in SPEC


def test_explicit_flags_and_presets_override_a_recipe():
    values, sources, _ = dry_run("grpo", "--recipe", "dapo", "--lr", "2e-6", "--preset", "dr_grpo")
    assert values["lr"] == 2e-6 and sources["lr"] == "command line"
    assert values["preset"] == "dr_grpo" and sources["preset"] == "command line"
    assert values["scale_rewards"] == "none" and sources["scale_rewards"].startswith("preset dr_grpo: ")
    assert values["model"] == "Qwen/Qwen2.5-32B" and sources["model"].startswith("recipe dapo: DAPO")
    assert sources["max_new_tokens"] == "recipe dapo: DAPO §5: 16384 + 4096 overlong buffer"
    # a named alternative builds on its base entry: the base's values keep the base's source
    values, sources, _ = dry_run("dft", "--recipe", "paper_llama8b")
    assert sources["lr"].startswith("recipe paper_llama8b: ") and sources["max_steps"].startswith("recipe paper: DFT")
    assert sources["beta1"] == "default: DFT code sft_trainer.yaml"


def test_embedded_default_is_unchanged_by_recipes():
    values, sources, out = dry_run("grpo")
    assert values["recipe"] == "embedded" and values["model"] == "embedded:warm" and values["max_new_tokens"] == 40
    assert sources["max_new_tokens"].startswith("recipe embedded") and "world size 1" in out


def test_batch_and_memory_lines():
    _, _, out = dry_run("grpo", "--recipe", "dapo", "--grad-accum", "4", world=128)
    assert ("global batch per optimizer step (16 x 1 per rollout batch of 512 prompts): 32 prompts, 512 sequences, "
            f"<= {512 * (2048 + 20480):,} tokens; per GPU 4 micro-batch(es) of 1 sequences x <= 22528 tokens") in out
    n = recipes.dry_run.param_count(recipes.dry_run.MODELS["Qwen/Qwen2.5-32B"])
    assert f"weights {n * 4 / 128 / 2**30:.1f}, gradients {n * 4 / 128 / 2**30:.1f}, AdamW state " \
           f"{2 * n * 4 / 128 / 2**30:.1f}" in out and "FSDP over 128" in out
    _, _, out = dry_run("sft", "--recipe", "paper")
    assert "256 prompts, 256 sequences, <= 524,288 tokens; per GPU 8 micro-batch(es) of 4 sequences" in out
    _, _, out = dry_run("kdrl", "--recipe", "paper")  # the teacher is a frozen, unsharded fp32 copy
    t = recipes.dry_run.param_count(recipes.dry_run.MODELS["Skywork/Skywork-OR1-Math-7B"])
    assert f"frozen models {t * 4 / 2**30:.1f}" in out
    _, _, out = dry_run("grpo", "--recipe", "dr_grpo", "--max-new-tokens", "8000")
    assert "WARNING: 9024 tokens per sequence exceed the model's max_position_embeddings 4096" in out
    _, _, out = dry_run("grpo", "--recipe", "dapo", "--model", "someone/unknown-model")
    assert "memory: no shape for 'someone/unknown-model'" in out


def test_param_count_is_exact(tiny_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig
    for model in (AutoModelForCausalLM.from_pretrained(tiny_dir),  # Qwen2: tied, qkv bias
                  AutoModelForCausalLM.from_config(LlamaConfig(  # Llama: untied, no bias
                      vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False))):
        c = model.config
        shape = (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads,
                 c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings, 0, c.model_type == "qwen2")
        assert recipes.dry_run.param_count(shape) == sum(p.numel() for p in model.parameters())
    assert recipes.dry_run.model_shape(tiny_dir)[:7] == recipes.dry_run.model_shape("embedded")[:7]  # config.json read = built-in shape
    assert round(recipes.dry_run.param_count(recipes.dry_run.MODELS["Qwen/Qwen2.5-Math-7B"]) / 1e9, 2) == 7.62  # the hub's model card


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_activation_estimate_matches_saved_tensors(dtype, autocast):
    """Bytes autograd keeps for backward in a forward of a small Qwen2 with our RMSNorm (as load_model gives),
    counted with saved_tensors_hooks."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).train()
    assert fuse_rmsnorm(model) == 7
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 300, (2, 96))

    def measure(checkpointing):
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16,
                                                                                         enabled=autocast):
            model.model(input_ids=ids, use_cache=False)
        return sum(seen.values())
    shape = (128, 3, 352, 4, 2, 300, True, 0, True)
    w = 4 if dtype == torch.float32 else 2
    est = recipes.dry_run.activation_bytes(shape, ids.numel(), w, autocast, False)
    assert abs(est / measure(False) - 1) < 0.03
    # with checkpointing the forward keeps the layer inputs; the estimate adds one layer recomputed in backward
    one_layer = recipes.dry_run.activation_bytes((128, 1, 352, 4, 2), ids.numel(), w, autocast, False)
    kept = measure(True)
    assert kept < recipes.dry_run.activation_bytes(shape, ids.numel(), w, autocast, True) < kept + one_layer


# Each preset read from its local copy through the code a hub name goes through: (prompt start, response start,
# answer, system start) of every row kept, written by hand from tests/data/<preset>.jsonl.
QWEN, LUFFY, CHORD = "Please reason step by step", "Your task is to follow", "You are a helpful assistant"
PRESET_ROWS = {
    "numina_cot": [("Compute $3+4$.", "Adding, $3+4=7$.", "7", None), ("Find $x$", "Divide by 2", "\\frac{1}{2}", None),
                   ("Tom has 5 apples", "5 - 2 = 3", "", None)],  # no \boxed{}: kept as a demonstration, no answer
    "openr1_46k": [("What is $2^{10}$?", "<think>\n2^10", "1024", LUFFY), ("Solve $x^2=9$", "<think>\nx = 3", "3", LUFFY),
                   ("Simplify", "<think>\nDivide", "\\frac{3}{4}", LUFFY)],
    "openr1_chord_sft": [("Compute $6 \\cdot 7$.", "<think>6*7=42", "42", CHORD),  # the correct trace, not the first
                         ("Find $\\sqrt{2}^2$.", "<think>It is 2.", "2", CHORD)],  # Chinese / no correct trace: dropped
    "openr1_chord_rl": [("Compute $6 \\cdot 7$.", None, "42", CHORD), ("Compute $-2", None, "-10", CHORD)],
    "dapo_math_17k": [("Solve the following math problem step by step.", None, a, None) for a in ("5", "6", "24")],
    "math_lvl3to5": [("Solve $2x+3=7$.", "So $x=", "2", QWEN), ("Find the area", "The area", "4\\pi", QWEN)],
    "math_train": [("What is $1+2$?", "$1+2=", "3", QWEN), ("Solve $2x+3=7$.", "So", "2", QWEN),
                   ("Find the area", "The area", "4\\pi", QWEN)],
    "math500": [("Convert the point", None, "\\left( 3, \\frac{\\pi}{2} \\right)", QWEN),
                ("What is the value", None, "26000", QWEN), ("How many positive", None, "9", QWEN)],
    "aime24": [("Find the number", None, "10", QWEN), ("Find the remainder", None, "24", QWEN), ("Let $N", None, "111", QWEN)],
    "aime25": [("Find the sum", None, "70", QWEN), ("How many integers", None, "14", QWEN), ("Compute", None, "156", QWEN)],
    "amc23": [("Cities $A$", None, "27.0", QWEN), ("What is $2+3", None, "14.0", QWEN), ("What is half", None, "4.5", QWEN)],
    "minerva": [("Preamble", None, "10", QWEN), ("Compute the kinetic", None, "9", QWEN), ("What is $\\ln", None, "2", QWEN)],
    "olympiadbench": [("Xenia", None, "$2$", QWEN), ("Find the smallest", None, "$8$", QWEN),
                      ("Determine all", None, "$0$, $1$", QWEN)],
}


@pytest.mark.parametrize("name", sorted(recipes.dataset_presets()))
def test_dataset_preset_from_local_copy(name):
    assert name in PRESET_ROWS  # every preset has a local copy and expected rows
    rows = data.load_examples(f"{name}:{REPO}/tests/data/{name}.jsonl", need_response=True)
    want = PRESET_ROWS[name]
    assert len(rows) == len(want)
    for row, (prompt, response, answer, system) in zip(rows, want):
        assert row["prompt"].startswith(prompt) and row["answer"] == answer
        assert (row["response"] is None) if response is None else row["response"].startswith(response)
        assert (row["system"] is None) if system is None else row["system"].startswith(system)
    if name in ("numina_cot",):  # RL prompts and benchmarks need an answer: the unboxed row is dropped
        assert len(data.load_examples(f"{name}:tests/data/{name}.jsonl", need_response=False)) == len(want) - 1
    assert len(data.load_examples(f"{name}:tests/data/{name}.jsonl", limit=1)) == 1


def test_openr1_46k_system_prompt_is_luffys():
    rows = data.load_examples("openr1_46k:tests/data/openr1_46k.jsonl")
    assert rows[0]["system"] == recipes.datasets.PROMPTS["luffy"]  # the data's own prompt[0] equals the recipes' system prompt


def test_last_boxed():
    assert data.last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}} end") == "\\frac{1}{2}"
    assert data.last_boxed("\\fbox{x^{2}}") == "x^{2}" and data.last_boxed("no box") == ""
    assert data.last_boxed("\\boxed{unclosed") == ""


def test_row_system_prompt_reaches_the_chat_template(tiny_dir):
    tok = data.load_tokenizer(tiny_dir)
    rows = data.load_examples("math500:tests/data/math500.jsonl", need_response=False)
    # the embedded character tokenizer refuses LaTeX ('$', '^', and the '\\boxed{}' of the Qwen-Math system prompt;
    # issue 18), so the row keeps the first words of its system prompt and a question without LaTeX
    with pytest.raises(common.UserError, match="cannot encode"):
        data.tokenize_examples(tok, rows[1:2], 512, None, False)
    rows = [{**r, "prompt": r["prompt"].replace("$", "").replace("^2", ""), "system": r["system"].split(",")[0]}
            for r in rows]
    default, = data.tokenize_examples(tok, rows[1:2], 512, None, False)
    assert tok.decode(default["prompt_ids"]).startswith("<|system|>Please reason step by step<|end|><|user|>What")
    mine, = data.tokenize_examples(tok, rows[1:2], 512, "Be brief.", False)  # an explicit system prompt wins
    assert tok.decode(mine["prompt_ids"]).startswith("<|system|>Be brief.<|end|><|user|>What is the value")


def test_preset_bad_inputs(tmp_path):
    with pytest.raises(common.UserError, match="local copy 'nope.jsonl' of dataset preset 'math500' does not exist"):
        data.load_examples("math500:nope.jsonl")
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    with pytest.raises(common.UserError, match=r"dataset preset 'math500' reads columns \['answer', 'problem'\] but .* "
                                                r"has no \['problem'\]; its columns are"):
        data.load_examples(f"math500:{bad}")
    bad.write_text(json.dumps({"problem": "What is 1+1?", "answer": ""}) + "\n")
    with pytest.raises(common.UserError, match="dataset preset 'math500' .* has no usable row"):
        data.load_examples(f"math500:{bad}", need_response=False)
    bad.write_text("not json\n")
    with pytest.raises(common.UserError, match=f"could not load dataset preset 'math500' from {bad} .*; check the "
                                                "network, or pass a local copy as math500:FILE"):
        data.load_examples(f"math500:{bad}")
    with pytest.raises(common.UserError, match="dataset preset 'math500:x.jsonl' fixes its own fields; drop "
                                                "--prompt-column"):
        data.load_examples("math500:x.jsonl", prompt_column="question")


@pytest.mark.slow
def test_evaluate_py_on_the_embedded_task(tmp_path, tiny_dir):
    out = tmp_path / "scores.json"
    p = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--model", "embedded:warm", "--benchmarks",
                        "embedded", "--limit", "24", "--max-new-tokens", "40", "--output", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    score = json.loads(out.read_text())["scores"]["embedded"]
    # the same 24 held-out problems, greedy, scored in this process through rollout.evaluate
    path = data.resolve_model("embedded:warm")
    tok, model = data.load_tokenizer(path), data.load_model(path).eval()
    ex = data.tokenize_examples(tok, data.embedded_task("eval")[:24], 512, None, False)
    assert score == rollout.evaluate(model, tok, ex, rollout.exact_reward, common.Dist(), 40, 64)
    assert 0 < score < 1 and f"[eval] embedded: {100 * score:.1f} on 24 problems (avg@1" in p.stdout


def test_recipes_are_data_read_only_when_a_run_names_one():
    """Method files never import recipes/; parsing a plain run (the embedded recipe in the method file) reads nothing
    from recipes/, --recipe paper reads recipes/<method>.py, and the paper values are not in the method file."""
    for f in sorted((REPO / "methods").glob("*.py")):
        imports = [ln for ln in f.read_text().splitlines() if ln.startswith(("import ", "from "))]
        assert not [ln for ln in imports if "recipes" in ln], f.name
        assert set(load_method(f.stem).RECIPES) == {"embedded"}, f.name  # the paper recipes live in recipes/
    probe = ("import sys, importlib.util; sys.path.insert(0, '.'); import common\n"
             "spec = importlib.util.spec_from_file_location('m', 'methods/grpo.py'); m = importlib.util.module_from_spec"
             "(spec); sys.modules['m'] = m; spec.loader.exec_module(m)\n"
             "a = common.parse_args(m.Args, sys.argv[1:], {'preset': m.PRESETS, 'recipe': m.RECIPES})\n"
             "print(a.recipe, a.lr, any(k == 'recipes' or k.startswith('recipes.') for k in sys.modules))")
    for flags, want in (([], "embedded 5e-05 False"), (["--recipe", "paper"], "paper 1e-06 True")):
        p = subprocess.run([sys.executable, "-c", probe, *flags], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.stdout.split() == want.split(), p.stdout + p.stderr[-2000:]
