"""Paper recipes of methods/luffy.py, for GPU clusters (--recipe NAME; check with --dry-run). LUFFY (arXiv
2504.14945) as released, ElliottYan/LUFFY exp_scripts/train.sh and mix_src/config/mix_ppo_trainer.yaml; spec
methods_b.md §1

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
from recipes.datasets import PROMPTS

RECIPES = {
    "paper": dict(
        model=("Elliott/Qwen2.5-Math-7B-16k-think", "train.sh: Qwen2.5-Math-7B with a 16k context and a chat template "
                                                    "that appends <think>"),
        dataset=("openr1_46k", "Elliott/Openr1-Math-46k-8192: prompt, and the DeepSeek-R1 trace in `target`"),
        system_prompt=(PROMPTS["luffy"], "the data's own system prompt (prompt[0]), also at evaluation"),
        num_generations=(8, "rollout.n 8 (7 on-policy + 1 off-policy)"),
        num_off_policy=(1, "n_prefix 1, min/max_prefix_ratio 1.0: one full demonstration per group"),
        prompts_per_step=(128, "train_batch_size 128"),
        steps_per_generation=(2, "ppo_mini_batch_size 64: 2 optimizer steps per rollout step"),
        num_iterations=(1, "1 PPO epoch"),
        max_prompt_length=(1024, "max prompt 1024"),
        max_new_tokens=(8192, "max response 8192 (also the constant of loss_remove_token_mean)"),
        lr=(1e-6, "lr 1e-6, constant"),
        warmup_steps=(0, "constant lr"),
        max_grad_norm=(1.0, "grad_clip 1.0"),
        weight_decay=(0.01, "UNKNOWN in the spec (verl's actor optim default 0.01)"),
        temperature=(1.0, "rollout temperature 1.0"),
        scale_rewards=("none", "grpo_use_std=False (the paper: std over the mixed group)"),
        clip=(False, "loss_remove_clip=True: no clip on on-policy tokens"),
        loss_agg=("seq_mean_token_sum_norm", "loss_remove_token_mean=True: token sum / 8192"),
        shaping=("p_div_p", "off_policy_reshape p_div_p_0.1"),
        shaping_gamma=(0.1, "f(p) = p / (p + 0.1)"),
        entropy_coef=(0.001, "entropy_coeff 0.001"),
        beta=(0.0, "no KL, no reference model"),
        reward=("math", "reward_impl_version 3: math-verify (deviation: the official also requires </think>)"),
        max_steps=(500, "UNKNOWN in the spec (our choice)"),
        grad_accum=(16, "our choice: 4 sequences per micro-batch on 8 GPUs (does not change the gradient)"),
        eval_dataset=("math500", "one of the paper's six benchmarks (AIME24/25, AMC, MATH-500, Minerva, Olympiad)"),
        eval_size=(500, "all of MATH-500"),
        eval_every=(25, "UNKNOWN in the sources (our choice)"),
        generator=("vllm", "vLLM rollouts (verl; ours: a colocated engine per rank)"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "verl FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "paper_form": dict(
        source="the LUFFY paper's objective (spec methods_b.md §1): A / std over the mixed group, clipped on-policy "
               "ratio, normaliser = token count",
        base="paper",
        scale_rewards="group",
        clip=True,
        loss_agg="token_mean",
    ),
}
