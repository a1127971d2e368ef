"""Paper recipes of methods/srft.py, for GPU clusters (--recipe NAME; check with --dry-run). SRFT (arXiv 2506.19767):
no official code; the paper's data, batch and optimiser settings were not readable (spec methods_c.md §2), so
`paper` takes the setup the HPT authors used for their SRFT re-run (LUFFY's), and `hpt_repo` is that re-run
(TsinghuaC3I/Unify-Post-Training exp_scripts/train_srft.sh) with the third-party loss.

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
from recipes.datasets import PROMPTS

RECIPES = {
    "paper": dict(
        model=("Elliott/Qwen2.5-Math-7B-16k-think", "the paper trains Qwen2.5-Math-7B (a summary); this 16k copy as "
                                                    "LUFFY and HPT's re-run: UNKNOWN which copy the paper used"),
        dataset=("openr1_46k", "UNKNOWN in the paper text read; LUFFY's Elliott/Openr1-Math-46k-8192, as HPT's re-run"),
        system_prompt=(PROMPTS["luffy"], "UNKNOWN; the data's own system prompt (LUFFY)"),
        variant=("paper", "the paper's equations (notes copy): clipped demo term, std A over G_on U G_off"),
        num_generations=(7, "UNKNOWN; HPT's re-run: n 8 with 1 demonstration = 7 own rollouts"),
        prompts_per_step=(128, "UNKNOWN; HPT's re-run: train_batch_size 128"),
        steps_per_generation=(2, "UNKNOWN; HPT's re-run: ppo_mini_batch_size 64"),
        max_prompt_length=(1024, "UNKNOWN; HPT's re-run: max prompt 1024"),
        max_new_tokens=(8192, "UNKNOWN; HPT's re-run: max response 8192"),
        temperature=(1.0, "UNKNOWN; HPT's re-run: rollout temperature 1.0"),
        lr=(1e-6, "UNKNOWN; HPT's re-run: lr 1e-6, constant"),
        max_grad_norm=(1.0, "UNKNOWN; HPT's re-run: grad_clip 1.0"),
        beta=(0.0, "no KL term in the paper's loss"),
        max_steps=(500, "UNKNOWN; HPT's re-run: 500 steps"),
        grad_accum=(16, "our choice: 64 rows per GPU per optimizer step (64 prompts x (7 + 1) / 8 GPUs) in "
                        "micro-batches of 4"),
        eval_dataset=("math500", "the paper reports five math benchmarks (names not readable); MATH-500 here"),
        eval_size=(500, "all of MATH-500"),
        eval_every=(10, "our choice (HPT's re-run: test_freq 10)"),
        generator=("vllm", "vLLM rollouts (verl; ours: a colocated engine per rank)"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "verl FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "hpt_repo": dict(
        source="TsinghuaC3I/Unify-Post-Training exp_scripts/train_srft.sh (the third-party re-run)",
        base="paper",
        variant=("hpt_repo", "offline_loss_type srft: p/(p+0.1) demo term, no clip, no std, token sum / 8192, "
                             "entropy 0.001"),
        model=("Elliott/Qwen2.5-Math-7B-16k-think", "Qwen2.5-Math-7B with rope_theta 40000 and 16k positions, as "
                                                    "train.sh"),
        dataset="openr1_46k",
        system_prompt=("", "data/prepare_train.py drops prompt[0] (the repository's data for every script)"),
        max_prompt_length=(1024, "max prompt 1024"),
        temperature=(1.0, "rollout temperature 1.0"),
        max_grad_norm=(1.0, "grad_clip 1.0 (no max_grad_norm skip, unlike HPT's own runs)"),
        num_generations=(7, "n 8 with n_prefix 1: 7 own rollouts + the demonstration"),
        prompts_per_step=(128, "train_batch_size 128"),
        steps_per_generation=(2, "ppo_mini_batch_size 64"),
        max_new_tokens=(8192, "max response 8192 (also the L_max of the token sum)"),
        lr=(1e-6, "lr 1e-6, constant"),
        max_steps=(500, "500 steps"),
        eval_every=(10, "test_freq 10"),
    ),
}
