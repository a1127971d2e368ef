"""Paper recipes of methods/prefix_rft.py, for GPU clusters (--recipe NAME; check with --dry-run). Prefix-RFT (arXiv
2507.01679). The repository ships no run configuration: values are from prefix_rft_trainer.yaml and the paper as
summarised (spec methods_b.md §3); what neither gives is UNKNOWN and set as LUFFY's (same data, same comparisons)

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
from recipes.datasets import PROMPTS

RECIPES = {
    "paper": dict(
        model=("Elliott/Qwen2.5-Math-7B-16k-think", "paper: Qwen2.5-Math-7B; UNKNOWN how its 4k context was "
                                                    "extended (our choice: LUFFY's 16k copy)"),
        dataset=("openr1_46k", "LUFFY's OpenR1 46k subset, one R1 demonstration per problem"),
        system_prompt=(PROMPTS["luffy"], "UNKNOWN (our choice: the data's own system prompt, LUFFY's)"),
        num_generations=(8, "N = 8 (7 on-policy + 1 hybrid): inferred from the LUFFY-matched setup (spec)"),
        num_prefix=(1, "the paper: the N-th member is the hybrid"),
        prompts_per_step=(128, "UNKNOWN (our choice: LUFFY's train_batch_size 128)"),
        steps_per_generation=(2, "UNKNOWN (our choice: LUFFY's ppo_mini_batch_size 64)"),
        max_prompt_length=(1024, "UNKNOWN (our choice: LUFFY's)"),
        max_new_tokens=(8192, "UNKNOWN (our choice: LUFFY's; the demonstrations are <= 8192 tokens)"),
        lr=(1e-6, "prefix_rft_trainer.yaml (constant)"),
        weight_decay=(0.01, "prefix_rft_trainer.yaml"),
        max_grad_norm=(1.0, "prefix_rft_trainer.yaml grad_clip"),
        entropy_coef=(0.001, "prefix_rft_trainer.yaml entropy_coeff"),
        dual_clip=(3.0, "core_algos.compute_policy_loss clip_ratio_c"),
        scale_rewards=("none", "Dr. GRPO advantage (the paper, per secondary notes)"),
        loss_agg=("seq_mean_token_sum_norm", "Dr. GRPO aggregation (the paper, per secondary notes)"),
        prefix_high=(0.95, "the paper: prefix fraction window 95% -> 5%"),
        prefix_low_start=(0.95, "the paper: prefix fraction window 95% -> 5%"),
        prefix_low_end=(0.05, "the paper: prefix fraction window 95% -> 5%"),
        entropy_mask_ratio=(0.8, "the paper: only the top-20% entropy prefix tokens keep their advantage"),
        max_steps=(500, "UNKNOWN (our choice)"),
        prefix_decay_steps=(500, "UNKNOWN horizon of the cosine (our choice: the whole run)"),
        grad_accum=(16, "our choice: 4 sequences per micro-batch on 8 GPUs (does not change the gradient)"),
        eval_dataset=("math500", "one of the paper's six benchmarks (AIME24/25, AMC, MATH-500, Minerva, Olympiad)"),
        eval_size=(500, "all of MATH-500"),
        eval_every=(25, "UNKNOWN in the sources (our choice)"),
        generator=("vllm", "our choice for GPUs: a colocated vLLM engine per rank (the official code: verl + vLLM)"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "verl FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
}
