"""Evaluate any checkpoint on the math benchmarks the papers report: MATH-500, AIME24, AIME25, AMC23, Minerva and
OlympiadBench (hub names, splits and answer fields: the presets in recipes.dataset_presets()), scored with math-verify
(rollout.math_reward). With --samples k the score is avg@k: the mean accuracy of k completions per problem.

    python evaluate.py --model runs/grpo/final --benchmarks math500,aime24
    python evaluate.py --model Qwen/Qwen2.5-Math-1.5B --setting dft --generator vllm --dtype bfloat16
    torchrun --nproc_per_node 8 evaluate.py --model PATH --setting dr_grpo --generator vllm --dtype bfloat16
    python evaluate.py --model embedded:warm --benchmarks embedded          # CPU, no download: the arithmetic task

--setting chooses a paper's benchmarks and sampling (explicit flags win). A benchmark NAME:FILE reads a local copy
(.jsonl/.parquet) with the hub's columns. The prompt is the benchmark's question in the model's chat template with
a system prompt: the benchmark's (the Qwen2.5-Math chain-of-thought prompt, as DFT and Dr. GRPO evaluate) unless
--system-prompt names another (a recipes.datasets.PROMPTS key such as luffy, text, or none). Problems are sharded over ranks.
"""
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import data  # noqa: E402
import rollout  # noqa: E402
import recipes.datasets  # noqa: E402
import recipes  # noqa: E402


@dataclass
class Args:
    model: str = "embedded:warm"  # checkpoint directory (e.g. runs/grpo/final), hub name, or embedded:warm
    benchmarks: str = "math500"  # comma-separated: math500, aime24, aime25, amc23, minerva, olympiadbench, embedded; NAME:FILE for a local copy; or your own .jsonl/.parquet/.csv file or hub dataset (columns: --prompt-column, --answer-column)
    dataset_split: str = "test"  # split of a hub dataset of your own (the presets name theirs)
    dataset_config: Optional[str] = None  # configuration (subset) name of a hub dataset of your own
    prompt_column: str = "prompt"  # question column of your own file or hub dataset (the presets name theirs)
    answer_column: str = "answer"  # answer column of your own file or hub dataset
    reward: str = "auto"  # auto (exact on embedded, else math), exact (string match), math (math-verify) or FILE.py:FUNCTION; comma-separated for several
    reward_weights: Optional[str] = None  # comma-separated weights of the --reward entries (TRL reward_weights); default 1 each
    answer_format: Literal["auto", "boxed", "answer_line", "hash", "last_number"] = "auto"  # where a completion's answer is read: last \boxed{}, last 'Answer:' line (DAPO), after '#', last number; auto: the dataset's (embedded: hash, presets: boxed or answer_line), for your own file boxed, else Answer:, else #, else last number
    chat_template: Optional[str] = None  # a Jinja chat template (a file, or the template text) set over the tokenizer's
    setting: Optional[str] = None  # a paper's evaluation (benchmarks and sampling): dft, dr_grpo, dapo, relift
    samples: int = 1  # completions per problem; the score is their mean accuracy (avg@k)
    temperature: float = 0.0  # sampling temperature (0: greedy)
    max_new_tokens: int = 4096  # completion length
    max_prompt_length: int = 2048  # longer prompts are skipped and counted
    system_prompt: Optional[str] = None  # a recipes.datasets.PROMPTS name (qwen_math, luffy, chord), the text, or none; default: the benchmark's
    limit: Optional[int] = None  # only the first N problems of each benchmark
    batch_size: int = 64  # prompts per generation call and rank
    generator: Literal["hf", "vllm"] = "hf"  # Hugging Face generate, or a vLLM engine per rank
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weight dtype (bfloat16 on GPUs)
    trust_remote_code: bool = False  # let transformers run a model repository's own code
    output: Optional[str] = None  # also write the scores to this JSON file
    seed: int = 0  # sampling seed


SETTINGS = {  # what each paper reports (spec methods_a.md / methods_b.md); explicit flags win
    "dft": dict(benchmarks="math500,minerva,olympiadbench,aime24,amc23", samples=16, temperature=1.0,
                max_new_tokens=4096),  # DFT §4.1.1: Qwen2.5-Math eval, chat template + CoT, avg@16 at T 1.0, 4096
    "dr_grpo": dict(benchmarks="aime24,amc23,math500,minerva,olympiadbench", samples=1, temperature=0.0,
                    max_new_tokens=3000),  # Oat-Zero: eval_temperature 0, eval_generate_max_length 3000
    "dapo": dict(benchmarks="aime24", samples=32, temperature=1.0, max_new_tokens=20480),  # DAPO §5: AIME 2024 avg@32
    "relift": dict(benchmarks="aime24,aime25,amc23,math500,olympiadbench", temperature=0.6, max_new_tokens=8192,
                   system_prompt="luffy"),  # ReLIFT: validation at T 0.6 (samples per problem: UNKNOWN); no MMLU-Pro here
}


def main():
    args = common.parse_args(Args, presets={"setting": SETTINGS}, ranges={  # temperature 0 is greedy here
        "temperature": (lambda v: v >= 0, ">= 0 (0: greedy)"), "samples": (lambda v: v >= 1, ">= 1 (a count)"),
        "limit": (lambda v: v >= 1, ">= 1 (a count)")})
    # 1. setup: process group, model, tokenizer, optional vLLM engine
    d = common.setup_distributed(args.seed)
    path = data.resolve_model(args.model, d)
    tokenizer = data.load_tokenizer(path, args.trust_remote_code, args.chat_template)
    model = data.load_model(path, args.dtype, args.trust_remote_code, device=d.device).eval()
    engine = rollout.make_engine(args.generator, path, d, args.max_prompt_length + args.max_new_tokens)
    system = None if args.system_prompt in (None, "none") else recipes.datasets.PROMPTS.get(args.system_prompt, args.system_prompt)
    log = print if d.is_main else (lambda *a: None)

    # 2. each benchmark: its preset's rows, the chat template, avg@k (sharded over ranks, summed by all_reduce)
    scores = {}
    for name in args.benchmarks.split(","):
        preset = name.partition(":")[0] in recipes.dataset_presets() or name == "embedded"
        cols = {} if preset else dict(prompt_column=args.prompt_column, answer_column=args.answer_column)
        rows = data.load_examples(name, args.dataset_split, **cols, need_response=False, embedded_split="eval",
                                    limit=args.limit, config=None if preset else args.dataset_config)
        if args.system_prompt == "none":
            rows = [{**r, "system": None} for r in rows]
        examples = data.tokenize_examples(tokenizer, rows, args.max_prompt_length, system, False, log)
        reward_fn = rollout.get_reward_fn(args.reward, args.reward_weights, args.answer_format, name)
        t0 = common.timer()
        scores[name] = rollout.evaluate(model, tokenizer, examples, reward_fn, d, args.max_new_tokens, args.batch_size,
                                       args.samples, args.temperature, engine)
        log(f"[eval] {name}: {100 * scores[name]:.1f} on {len(examples)} problems (avg@{args.samples}, temperature "
            f"{args.temperature}, {args.max_new_tokens} new tokens, {common.timer() - t0:.0f} s)")

    # 3. report
    if len(scores) > 1:
        log(f"[eval] average of {len(scores)}: {100 * sum(scores.values()) / len(scores):.1f}")
    if args.output and d.is_main:
        result = {"model": args.model, "scores": scores, "settings": {k: v for k, v in vars(args).items()
                                                                      if not k.startswith("_")}, "time": time.time()}
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    del model, engine
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
