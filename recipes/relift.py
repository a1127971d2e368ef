"""Paper recipes of methods/relift.py, for GPU clusters (--recipe NAME; check with --dry-run). ReLIFT (arXiv
2506.07527) as released, TheRoadQaQ/ReLIFT examples/math-7b/train.sh and relift_trainer.yaml; spec methods_b.md §4

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
from recipes.datasets import PROMPTS

RECIPES = {
    "paper": dict(
        model=("RoadQAQ/Qwen2.5-Math-7B-16k-think", "train.sh (Qwen2.5-Math-7B with a 16k context and <think> "
                                                    "template)"),
        dataset=("openr1_46k", "Elliott/Openr1-Math-46k-8192, its `target` is the demonstration (as LUFFY)"),
        system_prompt=(PROMPTS["luffy"], "the data's own system prompt, also at evaluation"),
        num_generations=(8, "rollout n=8"),
        prompts_per_step=(128, "train_batch_size 128"),
        steps_per_generation=(2, "ppo_mini_batch_size 64: 2 updates per rollout step"),
        num_iterations=(1, "1 PPO epoch"),
        max_prompt_length=(1024, "max prompt 1024"),
        max_new_tokens=(8192, "max response 8192 (also T_max of the loss and the demonstration cut)"),
        lr=(1e-6, "constant"),
        weight_decay=(0.01, "AdamW wd 0.01"),
        max_grad_norm=(0.7, "RL grad_clip 0.7"),
        entropy_coef=(0.001, "entropy_coeff 0.001"),
        clip=(False, "loss_remove_clip=True"),
        scale_rewards=("none", "grpo_use_std=False"),
        loss_agg=("seq_mean_token_sum_norm", "loss_remove_token_mean=True: token sum / 8192"),
        sft_buffer_size=(128, "sft_data_size 128"),
        sft_micro_batch_size=(4, "Math-7B: sft_micro_batch_size 4"),
        sft_lr=(1e-6, "separate AdamW at lr 1e-6"),
        sft_max_grad_norm=(1.0, "relift_trainer.yaml sft_grad_clip"),
        sft_entropy_coef=(1e-3, "actor.sft.entropy_coeff 0.001 (the paper's best: 1e-4)"),
        max_steps=(1080, "3 epochs of 46k prompts at 128 per step"),
        grad_accum=(16, "our choice: 4 sequences per micro-batch on 8 GPUs (does not change the gradient)"),
        eval_dataset=("math500", "one of the paper's benchmarks (AIME24/25, AMC, MATH-500, Olympiad, MMLU-Pro)"),
        eval_size=(500, "all of MATH-500"),
        eval_every=(25, "UNKNOWN in the sources (our choice)"),
        generator=("vllm", "vLLM rollouts (verl; ours: a colocated engine per rank)"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "verl FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "math_1.5b": dict(
        source="examples/math-1.5b/train.sh",
        base="paper",
        model="RoadQAQ/Qwen2.5-Math-1.5B-16k-think",
        sft_micro_batch_size=(2, "2 for the models other than Math-7B"),
    ),
    "qwen_7b": dict(
        source="examples/7b/train.sh",
        base="paper",
        model="RoadQAQ/Qwen2.5-7B-think",
        sft_micro_batch_size=(2, "2 for the models other than Math-7B"),
    ),
}
