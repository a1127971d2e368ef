"""Paper recipes of methods/uft.py, for GPU clusters (--recipe NAME; check with --dry-run). UFT (arXiv 2505.16984),
MATH(3,4,5) setting, liumy2010/UFT @ ad3c8ec (run.py, scripts/train.sh, verl/trainer/config/ppo_trainer.yaml,
verl/workers/fsdp_workers.py); spec methods_c.md §7

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""

RECIPES = {
    "paper": dict(
        model=("Qwen/Qwen2.5-1.5B", "run.py default --model (the paper's figure averages Qwen2.5-0.5B/1.5B/3B)"),
        dataset=("math_lvl3to5", "UFT's MATH(3,4,5): MATH-lighteval levels 3-5; UNKNOWN rows (the official "
                                 "data/math/train.parquet, TinyZero-style prompt without chat template, is not in "
                                 "the snapshot: our choice the preset, with its Qwen-Math system prompt)"),
        reward=("math", "deviation: the official TinyZero-style reward (format 0.1, correct 1.0 in <answer> tags); "
                        "math-verify on the last \\boxed{} here"),
        num_generations=(4, "run.py --n_rollouts 4 (ROLLOUT_N)"),
        prompts_per_step=(256, "scripts/train.sh data.train_batch_size 256"),
        steps_per_generation=(4, "ppo_mini_batch_size 64 prompts (x 4 rollouts): 256 / 64 optimizer steps"),
        max_prompt_length=(1024, "run.py MAX_PROMPT_LENGTH 1024 for math (prompt + hint)"),
        max_new_tokens=(1024, "run.py MAX_RESPONSE_LENGTH 1024"),
        lr=(1e-6, "scripts/train.sh actor.optim.lr 1e-6 (constant, no warmup)"),
        weight_decay=(0.01, "verl-0.2 fsdp_workers.py AdamW weight_decay default 1e-2"),
        max_grad_norm=(1.0, "ppo_trainer.yaml grad_clip 1.0"),
        temperature=(1.0, "ppo_trainer.yaml rollout temperature 1.0"),
        scale_rewards=("group", "algorithm.adv_estimator grpo: (r - mean) / (std + 1e-6)"),
        eps_low=(0.2, "ppo_trainer.yaml clip_ratio 0.2"),
        eps_high=(0.2, "ppo_trainer.yaml clip_ratio 0.2"),
        log_ratio_clamp=(None, "verl-0.2 compute_policy_loss: exp(log_prob - old_log_prob), no clamp"),
        beta=(0.001, "run.py USE_KL_LOSS=True, ppo_trainer.yaml kl_loss_coef 0.001"),
        kl_estimator=("k3", "ppo_trainer.yaml kl_loss_type low_var_kl"),
        entropy_coef=(0.001, "ppo_trainer.yaml entropy_coeff 0.001"),
        loss_agg=("token_mean", "verl-0.2 masked_mean over a micro-batch's tokens (ours: over the optimizer step)"),
        hint_coef=(0.001, "run.py --sft_loss_coef 0.001"),
        hint_schedule=("cosine", "run.py --algo uft (rl_dataset.py: Binomial chunk count)"),
        hint_low=(0.05, "run.py LOWER_PROB 0.05"),
        hint_high=(0.95, "run.py UPPER_PROB 0.95"),
        hint_decay_steps=(300, "run.py --T_hint 300"),
        hint_chunks=(5, "rl_dataset.py num = min(5, len(hint))"),
        max_steps=(500, "run.py --T 500"),
        grad_accum=(8, "our choice: 4 sequences per micro-batch on 8 GPUs (run.py PPO_MICROBATCH 4; does not change "
                       "the gradient)"),
        eval_dataset=("math500", "UNKNOWN rows of the official data/math/test.parquet (1024 MATH test problems; our "
                                 "choice: MATH-500)"),
        eval_size=(500, "all of MATH-500"),
        eval_every=(25, "scripts/train.sh trainer.test_freq 25"),
        save_every=(100, "scripts/train.sh trainer.save_freq 100"),
        generator=("vllm", "the official rollout is vLLM (ours: a colocated engine per rank)"),
        bf16=(True, "verl rollout dtype bfloat16; our choice: bf16 autocast with fp32 master weights"),
        fsdp=(True, "verl FSDP workers"),
        gradient_checkpointing=(True, "scripts/train.sh enable_gradient_checkpointing=True"),
    ),
    "stage": dict(base="paper", hint_schedule="stage",
                  source="run.py --algo stage: the hint shrinks in num + 1 equal stages to none at T_hint"),
    "r3": dict(base="paper", hint_schedule="uniform", hint_coef=0.0,
               source="run.py --algo r3: UNIFORM_SAMPLING, SFT_LOSS_COEF 0 (R^3 baseline)"),
}
