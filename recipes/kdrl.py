"""Paper recipes of methods/kdrl.py, for GPU clusters (--recipe NAME; check with --dry-run). KDRL (arXiv 2506.02208).
No official code was found; the values come from secondary sources (spec methods_b.md §5); the training set, G, lr,
lengths and batch are UNKNOWN there and set to our choices

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
RECIPES = {
    "paper": dict(
        model=("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "the student (third-party, several sources)"),
        teacher=("Skywork/Skywork-OR1-Math-7B", "the teacher (third-party, several sources; same tokenizer family)"),
        dataset=("dapo_math_17k", "UNKNOWN training set (our choice: the instruction sits in the user turn, as R1 "
                                  "models expect)"),
        beta=(5e-3, "§3.3 linear annealing 5e-3 -> 1e-3 over 80 steps (third-party)"),
        beta_decay=(5e-5, "§3.3 linear annealing 5e-3 -> 1e-3 over 80 steps (third-party)"),
        beta_min=(1e-3, "§3.3 linear annealing 5e-3 -> 1e-3 over 80 steps (third-party)"),
        kl_estimator=("k2", "§3.2: k2 works best (third-party; the reverse-KL gradient)"),
        kd_mask=("none", "KDRL-Annealing, the best reported (57.2); `--recipe masking` for KDRL-masking"),
        scale_rewards=("group", "std-normalised GRPO assumed (spec pseudocode)"),
        num_generations=(8, "UNKNOWN (our choice)"),
        prompts_per_step=(128, "UNKNOWN (our choice)"),
        steps_per_generation=(1, "UNKNOWN (our choice)"),
        max_prompt_length=(1024, "UNKNOWN (our choice)"),
        max_new_tokens=(8192, "UNKNOWN (our choice)"),
        lr=(1e-6, "UNKNOWN (our choice)"),
        max_steps=(280, "about 280 steps (third-party)"),
        grad_accum=(32, "our choice: 4 sequences per micro-batch on 8 GPUs (does not change the gradient)"),
        eval_dataset=("aime24", 'UNKNOWN benchmark list ("six math benchmarks"; our choice: AIME 2024)'),
        eval_size=(30, "all of AIME 2024"),
        eval_every=(20, "UNKNOWN in the sources (our choice)"),
        generator=("vllm", "our choice for GPUs: a colocated vLLM engine per rank"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights"),
        fsdp=(True, "our choice: FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "masking": dict(
        source="§3.4 KDRL-masking: KD only on incorrect responses (third-party)",
        base="paper",
        kd_mask="response",
    ),
}
