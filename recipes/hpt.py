"""Paper recipes of methods/hpt.py, for GPU clusters (--recipe NAME; check with --dry-run). HPT (arXiv 2509.04419)
as released, TsinghuaC3I/Unify-Post-Training exp_scripts/train.sh and config/mix_ppo_trainer.yaml; spec
methods_c.md §1

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""

RECIPES = {
    "paper": dict(
        model=("Elliott/Qwen2.5-Math-7B-16k-think", "train.sh: Qwen2.5-Math-7B with rope_theta 40000 and "
                                                    "max_position_embeddings 16384 'following LUFFY' (LUFFY's 16k "
                                                    "copy; UNKNOWN whether HPT edited its own copy)"),
        dataset=("openr1_46k", "Elliott/Openr1-Math-46k-8192 (LUFFY's data), `target` is the demonstration"),
        system_prompt=("", "data/prepare_train.py drops prompt[0], the data's system prompt"),
        gate=(0, "switch_gate = switch_gate_off = 0: SFT only when 0/8 rollouts are correct"),
        sft_coef=(1.0, "SFT_LOSS_COEF 1.0 (7B)"),
        sft_agg=("token_mean", "our choice: means over the whole step (official per micro-batch: --sft-agg "
                               "per_microbatch)"),
        clip=(False, "loss_remove_clip=True"),
        scale_rewards=("none", "grpo_use_std=False"),
        loss_agg=("seq_mean_token_sum_norm", "loss_remove_token_mean=True: token sum / 8192"),
        num_generations=(8, "n = n_verify = 8"),
        prompts_per_step=(128, "train_batch_size 128"),
        steps_per_generation=(2, "ppo_mini_batch_size 64 prompts (the code's count varies with the gated rows)"),
        num_iterations=(1, "1 PPO epoch"),
        max_prompt_length=(1024, "max prompt 1024"),
        max_new_tokens=(8192, "max response 8192 (also L_max of the RL term and the demonstration limit)"),
        temperature=(1.0, "rollout temperature 1.0"),
        lr=(5e-6, "HPT lr 5e-6, constant (the LUFFY and SRFT baseline scripts: 1e-6)"),
        warmup_steps=(0, "constant lr"),
        max_grad_norm=(1.0, "grad_clip 1.0"),
        skip_grad_norm=(80.0, "max_grad_norm 80: the update is skipped above it"),
        entropy_coef=(0.001, "entropy_coeff 0.001"),
        beta=(0.0, "no KL, no reference model"),
        max_steps=(500, "500 steps"),
        grad_accum=(18, "our choice: 72 rows per GPU per optimizer step (64 rollouts + 8 demonstration rows) in "
                        "micro-batches of 4 (the code: dynamic batches of 32768 tokens per GPU)"),
        eval_dataset=("math500", "validation on AIME24, AMC23, MATH-500 every 10 steps (MATH-500 here)"),
        eval_size=(500, "all of MATH-500"),
        eval_samples=(8, "validation: 8 samples per problem"),
        eval_temperature=(0.6, "validation temperature 0.6 (top-p 0.95: not a flag here)"),
        eval_every=(10, "test_freq 10"),
        generator=("vllm", "vLLM rollouts (verl; ours: a colocated engine per rank)"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "verl FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "math_1.5b": dict(
        source="train.sh comment: Qwen2.5-Math-1.5B with SFT_LOSS_COEF 0.3",
        base="paper",
        model=("Qwen/Qwen2.5-Math-1.5B", "Qwen2.5-Math-1.5B (UNKNOWN: the 16k config edit of the 7B run; "
                                         "4096 positions as released)"),
        sft_coef=0.3,
    ),
}
