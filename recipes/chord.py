"""Paper recipes of methods/chord.py, for GPU clusters (--recipe NAME; check with --dry-run). CHORD (arXiv 2508.11408),
math setting, Trinity-RFT examples/mix_chord (mix_chord.yaml, get_openr1_data.py); spec methods_b.md §2

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
import re

from recipes.datasets import PROMPTS

RECIPES = {
    "paper": dict(
        model=("Qwen/Qwen2.5-7B-Instruct", "CHORD math policy model"),
        dataset=("openr1_chord_rl", "get_openr1_data.py RL set (20k sampled without a fixed seed, not released: "
                                    "all rows that pass)"),
        expert_dataset=("openr1_chord_sft", "get_openr1_data.py SFT set (5k sampled, not released: all rows that "
                                            "pass)"),
        system_prompt=(PROMPTS["chord"], "get_openr1_data.py SYSTEM_PROMPT (for the RL prompts: UNKNOWN, our "
                                         "choice the same)"),
        variant=("phi", "CHORD-phi, the full method (the paper's best: AMC 62.5, AIME24 18.2, AIME25 17.2)"),
        num_generations=(8, "repeat_times 8 (its comment: 16 for better performance in math)"),
        prompts_per_step=(32, "buffer batch_size 32 (x 8 = 256 on-policy experiences)"),
        expert_data_ratio=(0.2, "expert_data_ratio 0.20: 64 expert + 256 on-policy = ppo_mini_batch_size 320"),
        steps_per_generation=(1, "ppo_mini_batch_size 320 = train_batch_size 320: one optimizer step per step"),
        max_prompt_length=(1024, "max_model_len 11264 - max_response_tokens 10240"),
        max_new_tokens=(10240, "max_response_tokens 10240"),
        lr=(1e-6, "mix_chord.yaml (its comment: 5e-6 with warmup can be better for SFT)"),
        max_steps=(2500, "total_epochs 4 over 20k prompts at 32 per step (the paper's length: UNKNOWN)"),
        grad_accum=(10, "ppo_micro_batch_size_per_gpu 4: 40 sequences per GPU in 10 micro-batches (8 GPUs)"),
        eval_dataset=("aime24", "CHORD reports AIME24, AIME25, AMC (and MMLU-Pro)"),
        eval_size=(30, "all of AIME 2024"),
        eval_every=(10, "explorer eval_interval 10"),
        generator=("vllm", "vllm_async rollout engines (ours: a colocated engine per rank)"),
        bf16=(True, "rollout dtype bfloat16; our choice: bf16 autocast with fp32 master weights"),
        fsdp=(True, "verl trainer (FSDP)"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "mu": dict(base="paper", variant="mu", source="CHORD-mu: mu cosine 0.9 -> 0.05 over 200 steps, plain NLL"),
}


# CHORD's SFT and RL sets, filtered as get_openr1_data.py (which then samples 5k and 20k without a fixed seed); the
# fields as in recipes/datasets.py
def _r1_correct(r):  # OpenR1-Math-220k: the R1 generations math-verify marked correct
    return [g for g, ok in zip(r["generations"], r["correctness_math_verify"]) if ok]


def _chord(r, rl):  # get_openr1_data.py: no Chinese; SFT: a correct trace; RL: an integer answer, >= 2 correct traces
    ok = not re.search("[\u3400-\u4dbf\u4e00-\u9fff]", r["problem"]) and len(_r1_correct(r)) >= (2 if rl else 1)
    return ok and (not rl or re.fullmatch(r"-?\d+", str(r["answer"]).strip()))


_R220 = dict(hub="open-r1/OpenR1-Math-220k", config="default", split="train", prompt="problem", answer="answer",
             system=PROMPTS["chord"], needs=("generations", "correctness_math_verify"),
             answer_format="boxed")


DATASETS = {
    "openr1_chord_sft": dict(_R220, response=lambda r: (_r1_correct(r) or [None])[0], keep=lambda r: _chord(r, False)),
    "openr1_chord_rl": dict(_R220, keep=lambda r: _chord(r, True)),
}
