"""Paper recipes of methods/grpo.py, for GPU clusters (--recipe NAME; check with --dry-run). Spec methods_a.md §3

Each entry maps a flag to (value, source); base="other" builds on entry `other`; a value without its own
source takes the entry's `source`."""
from recipes.datasets import PROMPTS

RECIPES = {
    "paper": dict(
        source="GRPO as in DeepSeekMath (arXiv 2402.03300) §4.2",
        model=("deepseek-ai/deepseek-math-7b-instruct", "DeepSeekMath §4.2: RL from DeepSeekMath-Instruct 7B"),
        dataset=("math_train", "UNKNOWN: its ~144k GSM8K/MATH questions are not released (our choice: MATH train)"),
        preset=("grpo", "DeepSeekMath Eq. 3: std-normalised A, per-sequence token mean, k3 KL, beta 0.04"),
        reward=("math", "deviation: DeepSeekMath scores with a reward model (not released); math-verify here"),
        num_generations=(64, "DeepSeekMath §4.2: 64 outputs per question"),
        prompts_per_step=(16, "DeepSeekMath §4.2: batch 1024 (read as 16 questions x 64 outputs)"),
        steps_per_generation=(1, "DeepSeekMath §4.2: a single update per exploration stage"),
        max_prompt_length=(1024, "UNKNOWN (our choice)"),
        max_new_tokens=(1024, "DeepSeekMath §4.2: max length 1024"),
        lr=(1e-6, "DeepSeekMath §4.2"),
        max_steps=(500, "UNKNOWN (our choice)"),
        grad_accum=(16, "our choice: 8 sequences per micro-batch on 8 GPUs (does not change the gradient)"),
        eval_dataset=("math500", "DeepSeekMath reports MATH (our choice: MATH-500)"),
        eval_size=(500, "all of MATH-500"),
        eval_every=(25, "UNKNOWN in the sources (our choice)"),
        generator=("vllm", "our choice for GPUs: a colocated vLLM engine per rank"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "our choice: FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "dr_grpo": dict(
        source="Dr. GRPO (arXiv 2503.20783), Oat-Zero-7B: understand-r1-zero examples/qwen2.5-math-7b.sh",
        model=("Qwen/Qwen2.5-Math-7B", "Oat-Zero-7B's base (README)"),
        dataset=("math_lvl3to5", "MATH level 3-5 (README); their 8k file is not on the hub: MATH-lighteval train, "
                                 "levels 3-5"),
        system_prompt=(PROMPTS["qwen_math"], "the Qwen-Math template (README), also at evaluation"),
        preset=("dr_grpo", "critic_type drgrpo: A = R - mean, token sum / generate_max_length, beta 0"),
        reward=("math", "--oracle math, verifier math_verify"),
        num_generations=(8, "N_SAMPLE=8"),
        prompts_per_step=(128, "rollout_batch_size 128 prompts = 1024 samples (the spec reads 16 x 8; oat's buffer "
                               "holds 128 x 8 / 8 GPUs)"),
        steps_per_generation=(8, "train_batch_size 128 samples per optimizer step: 1024 / 128"),
        max_prompt_length=(1024, "prompt_max_length 1024"),
        max_new_tokens=(3000, "generate_max_length 3000 (also eval_generate_max_length)"),
        lr=(1e-6, "learning_rate 1e-6, lr_scheduler constant"),
        beta2=(0.95, "oat OATArgs default adam_beta_2 (the script sets none)"),
        weight_decay=(0.0, "oat OATArgs default l2"),
        max_steps=(1330, "UNKNOWN: the script allows 20 epochs (~1330 rollout steps over ~8.5k prompts); the paper "
                         "ran 27 h"),
        grad_accum=(16, "train_batch_size_per_device 1: 16 micro-batches of 1 per GPU (does not change the "
                        "gradient)"),
        eval_dataset=("math500", "one of Oat-Zero's five benchmarks (all five: evaluate.py --setting dr_grpo)"),
        eval_size=(500, "all of MATH-500"),
        eval_every=(16, "eval_steps 16"),
        generator=("vllm", "our choice for GPUs: a colocated vLLM engine per rank"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (the script: --bf16)"),
        fsdp=(True, "our choice: FSDP"),
        gradient_checkpointing=(True, "our choice: the script: --gradient-checkpointing"),
    ),
    "dr_grpo_1.5b": dict(
        source="Dr. GRPO Table 6: all experiments, also 1.5B",
        base="dr_grpo",
        model="Qwen/Qwen2.5-Math-1.5B",
    ),
    "dapo": dict(
        source="DAPO (arXiv 2503.14476) §5 and verl docs/algo/dapo.md: Qwen2.5-32B on DAPO-Math-17k",
        model=("Qwen/Qwen2.5-32B", "DAPO §5 base model"),
        dataset=("dapo_math_17k", 'DAPO-Math-17k (the "Answer:" instruction is part of each prompt)'),
        preset=("dapo", "clip-higher 0.28, token-level loss, dynamic sampling, overlong shaping 4096 of 20480, no "
                        "KL"),
        reward=("math", "DAPO reads the \"Answer:\" line (the preset's answer_format); deviation: math-verify "
                        "compares it"),
        num_generations=(16, "DAPO §5: 16 responses per prompt"),
        prompts_per_step=(512, "DAPO §5: prompt batch 512"),
        steps_per_generation=(16, "DAPO §5: mini-batch 32 prompts (512 responses), 16 updates per rollout step"),
        max_gen_batches=(3, "gen_batch_size 1536 = 3 x 512 prompts (verl's max_num_gen_batches: UNKNOWN)"),
        max_prompt_length=(2048, "UNKNOWN in the spec (our choice: 2 x 1024)"),
        max_new_tokens=(20480, "DAPO §5: 16384 + 4096 overlong buffer"),
        lr=(1e-6, "DAPO §5: constant 1e-6"),
        warmup_steps=(20, "DAPO §5: 20-step linear warmup"),
        weight_decay=(0.1, "UNKNOWN: third-party DAPO-style verl scripts (the official run script was not read)"),
        max_steps=(500, "UNKNOWN (our choice)"),
        grad_accum=(64, "our choice: 1 sequence per micro-batch on 8 GPUs (DAPO ran 128 GPUs: WORLD_SIZE=128 "
                        "--grad-accum 4)"),
        eval_dataset=("aime24", "DAPO §5 reports AIME 2024 (avg@32: evaluate.py --setting dapo)"),
        eval_size=(30, "all of AIME 2024"),
        eval_every=(25, "UNKNOWN in the sources (our choice)"),
        generator=("vllm", "our choice for GPUs: a colocated vLLM engine per rank"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "our choice: FSDP"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
    "gppo": dict(
        source="Klear-Reasoner GPPO (arXiv 2508.07629), math run: Kwai-Klear/KlearReasoner recipe/dapo/"
               "perf_run_dapo_ours_math.sh; spec methods_c.md §5. Deviation: the script's positive_loss_coeff 0.1 "
               "(a token-mean NLL on the policy's own correct rollouts, dp_actor.py) is not implemented",
        model=("Qwen/Qwen3-8B-Base", "UNKNOWN: Klear-Reasoner-8B's RL starts from its long-CoT SFT checkpoint "
                                     "(distilled from DeepSeek-R1-0528), whose base the spec's sources do not name "
                                     "(our choice: an 8B base; run an SFT first)"),
        dataset=("Kwai-Klear/KlearReasoner-MathSub-30K", "the math RL data (README); its columns were not read: "
                                                         "UNKNOWN (give --prompt-column / --answer-column)"),
        preset=("gppo", "loss_func gppo, clip_ratio_low 0.2, clip_ratio_high 0.28, clip_ratio_c 10.0, loss_agg_mode "
                        "token-mean, no KL (loss or reward), entropy_coeff 0; deviation: positive_loss_coeff 0.1 "
                        "(NLL on own correct rollouts) not implemented"),
        gppo_beta_low=(1.0, "README: beta1 = beta2 = 1 for Klear-Reasoner-8B (compute_gppo_loss has no beta)"),
        gppo_beta_high=(1.0, "README: beta1 = beta2 = 1 for Klear-Reasoner-8B"),
        reward=("math", "math_verify (README)"),
        num_generations=(8, "n 8"),
        prompts_per_step=(128, "train batch 128 prompts"),
        dynamic_sampling=(True, "DAPO recipe filter_groups (metric acc): keep groups with reward std > 0"),
        max_gen_batches=(2, "gen batch 256 prompts = 2 x 128, max_num_gen_batches 1 (no regeneration); ours "
                            "generates the second 128 only when needed and fills up with equal-reward groups, Klear "
                            "trains on fewer"),
        steps_per_generation=(8, "mini-batch 16 prompts: 8 optimizer steps per rollout step (spec §5; the code "
                                 "reads 32 -> 4 steps: UNKNOWN which ran)"),
        max_prompt_length=(4096, "max prompt 4096"),
        max_new_tokens=(32768, "max response 32768 (README: 16K is highly unstable with GPPO or GRPO)"),
        overlong_buffer_ratio=(0.0, "overlong buffer off"),
        lr=(1e-6, "lr 1e-6 (math; code 5e-7)"),
        warmup_steps=(10, "10 warmup steps"),
        weight_decay=(0.1, "weight decay 0.1"),
        max_grad_norm=(1.0, "grad clip 1.0"),
        temperature=(1.0, "rollout temperature 1.0"),
        top_p=(1.0, "rollout top-p 1.0"),
        max_steps=(240, "UNKNOWN: the README ablation figure (docker/GPPO.png) runs ~240 steps (our choice)"),
        grad_accum=(16, "our choice: 1 sequence per micro-batch on 8 GPUs (does not change the gradient)"),
        eval_dataset=("aime24", "Klear reports AIME24 (avg@64), AIME25, HMMT25, LiveCodeBench"),
        eval_size=(30, "all of AIME 2024"),
        eval_samples=(64, "avg@64 (AIME/HMMT)"),
        eval_temperature=(0.6, "eval temperature 0.6 (top-p 0.95: not a flag here, UNKNOWN effect)"),
        eval_every=(25, "UNKNOWN in the sources (our choice)"),
        generator=("vllm", "our choice for GPUs: a colocated vLLM engine per rank"),
        bf16=(True, "our choice: bf16 autocast with fp32 master weights (as verl)"),
        fsdp=(True, "our choice: FSDP (verl)"),
        gradient_checkpointing=(True, "our choice: memory only (the gradient is the same)"),
    ),
}
