"""CHORD: "On-Policy RL Meets Off-Policy Experts: Harmonizing SFT and RL via Dynamic Weighting" (arXiv 2508.11408).
A diff of grpo.py: every optimizer step mixes GRPO on the policy's own rollouts with an SFT loss on an independent
mini-batch of expert (prompt, demonstration) pairs.

Objective (Trinity-RFT chord_policy_loss.py MIXCHORDPolicyLossFn; the paper's equation numbers are not checked here,
the spec knows the paper through summaries, so the lines are named (a) to (c)):
    (a) L_CHORD = (1 - mu_t) L_GRPO + mu_t L_SFT
        L_GRPO  = sum over on-policy tokens of the dual-clip PPO loss / (on-policy tokens in the step)   [token mean]
                  A_i = (R_i - mean_G R) / (std_G R + eps) over the G on-policy rollouts of a prompt only
    (b) L_SFT   = - sum over expert tokens of w_t log p_t / (expert tokens in the step),  p_t = pi(y*_t | x, y*_<t)
                  w_t = 1 (CHORD-mu), sg[p_t (1 - p_t)] (CHORD-phi; gradient -(1 - p_t) grad p_t), sg[p_t] (IS)
    (c) mu_t    = linear warmup 0 -> mu_peak, then cosine decay mu_peak -> mu_valley (Trinity mu_schedule_function)
Variants (--variant): phi (default) CHORD-phi, constant mu = 0.1 with w = sg[p(1-p)], the full method and the
paper's best results; mu: CHORD-mu, mu cosine 0.9 -> 0.05 over 200 steps, w = 1. --sft-weighting chooses w for the
ablations (is: sg[p], "IS with pi_expert = 1", collapses entropy).

Differs from grpo.py by:
- an expert stream (--expert-dataset, default the embedded "sft" split, disjoint from the RL prompts as CHORD's
  sets): ceil(r/(1-r) x on-policy samples) expert rows per step, r = --expert-data-ratio, so experts are a fraction r
  of the step (Trinity mix_sample_strategy: 64 of 256 + 64), rounded up to the world size;
- chord_loss: the PPO term over on-policy rows only plus the SFT term, each a mean over its own tokens of the whole
  step (two normalizers over every micro-batch and rank), so the mix ratio does not change what mu means;
- mu_schedule, evaluated at the 0-based optimizer step (Trinity's global step);
- defaults from Trinity examples/mix_chord/mix_chord.yaml: 32 prompts x 8 rollouts, dual clip c = 3 (Trinity's
  later ppo_policy_loss; the CHORD-era file had no dual clip: --dual-clip inf), max response 10240, lr 1e-6.

Official code checked against: modelscope/Trinity-RFT trinity/algorithm/policy_loss_fn/chord_policy_loss.py,
sample_strategy/mix_sample_strategy.py, examples/mix_chord/mix_chord.yaml; ms-swift GRPOTrainer._compute_chord_loss.
Deviations: both token means are global over the step (Trinity: per micro-batch, rescaled by hand-copied batch
sizes); the PPO branch keeps --loss-agg (default token mean, CHORD's); demonstrations longer than
--max-prompt-length + --max-new-tokens are dropped; the embedded recipe decays CHORD-mu over its 80 steps.

Run:
    python methods/chord.py                         # CHORD-phi from a weak SFT warm start of the embedded model (CPU)
    python methods/chord.py --variant mu
    torchrun --nproc_per_node 8 methods/chord.py --recipe paper   # CHORD's math setting (recipes/chord.py)
"""
import math
import os
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402
import rollout  # noqa: E402
from kernels.advantage import (aggregate, group_advantages, kl_estimate, normalizer_count, ppo_clip_loss,  # noqa: E402
                               reward_moments)  # noqa: E402
from kernels.engine import FusedLM  # noqa: E402


@dataclass
class Args:
    # --- model and data (identical in every file of the family) ---
    model: str = "embedded:warm"  # hub name, local directory, or embedded:warm (tiny model after a short SFT)
    dataset: str = "embedded"  # hub name, local .json/.jsonl/.parquet/.csv, or embedded (arithmetic task)
    dataset_split: str = "train"  # split of a hub dataset
    dataset_config: Optional[str] = None  # configuration (subset) name of a hub dataset (load_dataset's second argument)
    prompt_column: str = "prompt"  # dataset column with the question
    response_column: str = "response"  # dataset column with a demonstration (methods that use expert data)
    answer_column: str = "answer"  # dataset column with the checkable final answer
    system_prompt: Optional[str] = None  # prepended as a system message through the chat template
    chat_template: Optional[str] = None  # a Jinja chat template (a file, or the template text) set over the tokenizer's
    max_prompt_length: int = 512  # longer prompts are skipped and counted
    max_new_tokens: int = 10240  # completion length (Trinity mix_chord.yaml max_response_tokens)
    eval_dataset: Optional[str] = None  # held-out set; default: embedded eval split, or --eval-size rows of --dataset drawn at random (fixed seed)
    eval_size: int = 256  # held-out examples (the first N of --eval-dataset or of the embedded eval split, or N random rows of --dataset, held out from training); 0: no held-out evaluation
    eval_samples: int = 0  # also log mean@k: k samples per held-out prompt at --eval-temperature (DFT avg@16, DAPO avg@32); 0: greedy only
    eval_temperature: float = 1.0  # sampling temperature of the mean@k evaluation (DFT, DAPO: 1.0)
    reward: str = "auto"  # auto (exact on embedded, else math), exact (string match), math (math-verify) or FILE.py:FUNCTION; comma-separated for several
    reward_weights: Optional[str] = None  # comma-separated weights of the --reward entries (TRL reward_weights); default 1 each
    answer_format: Literal["auto", "boxed", "answer_line", "hash", "last_number"] = "auto"  # where a completion's answer is read: last \boxed{}, last 'Answer:' line (DAPO), after '#', last number; auto: the dataset's (embedded: hash, presets: boxed or answer_line), for your own file boxed, else Answer:, else #, else last number
    generator: Literal["hf", "vllm"] = "hf"  # Hugging Face generate, or a colocated vLLM engine per rank
    recipe: Optional[str] = "auto"  # embedded (auto with --model embedded*): settings for the tiny CPU demo; the papers': recipes/<this file's name>.py
    preset: Optional[str] = None  # the paper's combination of the flags below (an entry of PRESETS)
    # --- rollout and optimisation ---
    max_steps: int = 200  # rollout steps (each: generate, then --steps-per-generation optimizer steps)
    prompts_per_step: int = 32  # prompts per rollout step, all ranks (mix_chord.yaml: 32 x 8 = 256 on-policy)
    num_generations: int = 8  # G, completions per prompt (TRL default; Dr. GRPO, LUFFY)
    steps_per_generation: int = 1  # optimizer steps per rollout batch (verl: train_batch / ppo_mini_batch)
    num_iterations: int = 1  # passes over each rollout batch, mu (DeepSeekMath, TRL default 1)
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    lr: float = 1e-6  # mix_chord.yaml (its comment: 5e-6 with warmup can be better for SFT)
    beta1: float = 0.9  # torch/verl AdamW default
    beta2: float = 0.999  # torch/verl AdamW default
    weight_decay: float = 0.01  # verl actor optim default
    warmup_steps: int = 0  # linear warmup, then constant (verl; DAPO paper uses 20)
    max_grad_norm: float = 1.0  # verl and TRL default
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature (TRL, verl)
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # A / std of the group, of the batch, or no std
    adv_eps: float = 1e-6  # verl (TRL: 1e-4)
    eps_low: float = 0.2  # PPO clip, ratio >= 1 - eps_low (DeepSeekMath, TRL, verl)
    eps_high: float = 0.2  # PPO clip, ratio <= 1 + eps_high (DAPO clip-higher: 0.28)
    dual_clip: Optional[float] = 3.0  # cap -A*c where A<0 (Trinity clip_ratio_c; the CHORD-era code had none: inf)
    log_ratio_clamp: Optional[float] = None  # |log pi/pi_old| cap before exp (CHORD-era Trinity-RFT: none; verl 20)
    clip_mode: Literal["ppo", "gppo"] = "ppo"  # gppo: clipped tokens keep a bounded gradient (Klear-Reasoner GPPO, KlearReasoner core_algos.py compute_gppo_loss)
    gppo_beta_low: float = 1.0  # GPPO beta1: gradient scale of A<0, ratio<1-eps_low tokens (Klear README: beta1 = beta2 = 1 for Klear-Reasoner-8B; yaml gppo_loss_beta1 0.25)
    gppo_beta_high: float = 1.0  # GPPO beta2: gradient scale of A>0, ratio>1+eps_high tokens (Klear README, compute_gppo_loss_general_beta)
    beta: float = 0.0  # KL coefficient (TRL default 0.0; DeepSeekMath 0.04)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # DeepSeekMath uses k3; k2 has the reverse-KL gradient
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"  # TRL default (DAPO's); GRPO paper: seq_mean_token_mean; Dr. GRPO: seq_mean_token_sum_norm
    mask_truncated: bool = False  # drop completions without EOS from the loss (DAPO overlong filtering; TRL)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and generate more
    max_gen_batches: int = 4  # DAPO dynamic sampling: rollout batches tried per step before going on
    overlong_buffer_ratio: float = 0.0  # DAPO overlong shaping: last fraction of max_new_tokens penalised (4096/20480)
    overlong_penalty: float = 1.0  # DAPO: penalty at the hard limit
    entropy_coef: float = 0.0  # entropy bonus (verl entropy_coeff default 0)
    # --- runtime (identical in every file) ---
    seed: int = 0  # data order, sampling and initialisation
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weight dtype (fp32 on CPU: bf16 is 2x slower)
    bf16: bool = False  # bf16 autocast on CUDA
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when world size > 1
    gradient_checkpointing: bool = False  # recompute activations in backward
    fast_paths: bool = True  # RMSNorm kernel + padding-free passes, probe-checked (kernels/engine.py); off: the model as loaded
    trust_remote_code: bool = False  # let transformers run a model repository's own code
    output_dir: Optional[str] = None  # metrics.jsonl, config.json, checkpoints (default: runs/<this file's name>)
    eval_every: int = 25  # rollout steps between held-out evaluations (0: only at start and end)
    save_every: int = 100  # rollout steps between checkpoints (0: only the final model)
    keep_last: Optional[int] = 2  # checkpoints to keep
    resume: bool = False  # continue from the latest complete checkpoint in --output-dir
    overwrite: bool = False  # delete a previous run in --output-dir (with --resume: continue it although flags that change its trajectory differ)
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss or grad norm instead of stopping
    dist_timeout: float = 1800.0  # seconds a collective may wait for another rank before the job stops (torch default 30 min)
    report_to: str = "none"  # also log to: comma-separated tensorboard, wandb, trackio (each when installed; W&B offline: WANDB_MODE=offline), or none
    quiet: bool = False  # no progress bar
    dry_run: bool = False  # print the resolved config with sources, the batch and a memory estimate, then exit (no weights loaded)
    # --- CHORD ---
    variant: Literal["phi", "mu"] = "phi"  # CHORD-phi (the full method, its best results) or CHORD-mu; sets the 5 below
    mu_warmup_steps: int = 0  # optimizer steps of linear mu warmup from 0 (both paper variants: 0)
    mu_decay_steps: int = 0  # optimizer steps of cosine decay peak -> valley (CHORD-mu: 200; CHORD-phi: 0, constant)
    mu_peak: float = 0.1  # mu after warmup (CHORD-mu: 0.9; CHORD-phi: 0.1)
    mu_valley: float = 0.1  # mu after the decay (CHORD-mu: 0.05; CHORD-phi: 0.1)
    sft_weighting: Literal["none", "phi", "is"] = "phi"  # expert-token weight 1 (CHORD-mu), sg[p(1-p)] (phi), sg[p]
    expert_dataset: str = "embedded"  # demonstrations (--prompt/--response-column): embedded = the task's "sft" split
    expert_data_ratio: float = 0.2  # expert fraction of each step's samples (Trinity expert_data_ratio 0.20)


PRESETS = {
    "grpo": dict(scale_rewards="group", loss_agg="seq_mean_token_mean", eps_high=0.2, beta=0.04, kl_estimator="k3",
                 source="DeepSeekMath §4.2"),
    "dr_grpo": dict(scale_rewards="none", loss_agg="seq_mean_token_sum_norm", eps_high=0.2, beta=0.0,
                    source="Dr. GRPO §3.2, oat code"),
    "dapo": dict(scale_rewards="group", loss_agg="token_mean", eps_high=0.28, beta=0.0, dynamic_sampling=True,
                 overlong_buffer_ratio=0.2, source="DAPO §3: clip-higher, token-level loss, filtering, 4096 of 20480"),
    "gppo": dict(clip_mode="gppo", eps_low=0.2, eps_high=0.28, dual_clip=10.0, scale_rewards="group",
                 loss_agg="token_mean", beta=0.0, source="Klear-Reasoner (arXiv 2508.07629): clip 0.2/0.28, c 10, no KL"),
}
VARIANTS = {  # Trinity examples/mix_chord/mix_chord.yaml comments; the paper as summarised (spec §2)
    "mu": dict(mu_warmup_steps=0, mu_decay_steps=200, mu_peak=0.9, mu_valley=0.05, sft_weighting="none",
               source="CHORD-mu: mu cosine 0.9 -> 0.05 over 200 steps, plain NLL (mix_chord.yaml comments)"),
    "phi": dict(mu_warmup_steps=0, mu_decay_steps=0, mu_peak=0.1, mu_valley=0.1, sft_weighting="phi",
                source="CHORD-phi: mu fixed at 0.1, phi-weighted SFT (mix_chord.yaml comments)"),
}
_UNIT, _STEPS = (lambda v: 0 <= v <= 1, "in [0, 1]"), (lambda v: v >= 0, ">= 0")
RANGES = {"mu_peak": _UNIT, "mu_valley": _UNIT, "mu_warmup_steps": _STEPS, "mu_decay_steps": _STEPS,  # CHORD flags
          "expert_data_ratio": (lambda v: 0 < v < 1, "in (0, 1) (0 is plain GRPO: use methods/grpo.py)")}
RECIPES = {
    # tiny model after SFT to ~0.5 held-out, 2-core CPU: 40 tokens, 32 prompts x 8, T 0.7 (T 1.0: the sampling tail
    # held the reward down), lr 5e-5 (1e-4 was noisier), 80 steps; 512 held-out problems: 0.05 mean@4 gain > 3 SE
    "embedded": dict(max_prompt_length=64, max_new_tokens=40, lr=5e-5, warmup_steps=10, max_steps=80,
                     prompts_per_step=32, temperature=0.7, eval_every=20, eval_size=512, eval_samples=4,
                     eval_temperature=0.7, mu_decay_steps=80),  # CHORD demo setting: the mu variant decays within the 80-step run (paper 200)
}


def grpo_loss(logp, old_logp, advantages, mask, normalizer, *, ref_logp=None, entropy=None, eps_low=0.2,
              eps_high=0.2, dual_clip=None, log_ratio_clamp=20.0, beta=0.0, kl_estimator="k3", entropy_coef=0.0,
              loss_agg="token_mean", max_len=None, clip_mode="ppo", gppo_beta_low=1.0, gppo_beta_high=1.0):
    """logp, old_logp, ref_logp, entropy, mask: (B, T) per completion token; advantages: (B,) or (B, T).
    normalizer: `normalizer_count(mask, loss_agg)` over the optimizer step, all ranks, / world size (tokens for
    token_mean, sequences otherwise); max_len: the constant L_max of seq_mean_token_sum_norm. Returns (loss, metrics)."""
    per_tok, metrics = ppo_clip_loss(logp, old_logp, advantages, eps_low, eps_high, dual_clip, log_ratio_clamp,
                                     mask=mask, clip_mode=clip_mode, gppo_beta_low=gppo_beta_low,
                                     gppo_beta_high=gppo_beta_high)  # (B, T)
    if beta > 0:  # KL to the reference, added to the loss (not to the reward)
        kl = kl_estimate(logp, ref_logp, kl_estimator)  # (B, T)
        per_tok = per_tok + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    if entropy_coef:  # bonus: maximise entropy (aggregated like the policy term, as verl's agg_loss)
        per_tok = per_tok - entropy_coef * entropy
    loss = aggregate(per_tok, mask, loss_agg, normalizer, max_len)
    return loss, metrics


def chord_loss(logp, old_logp, advantages, mask, normalizer, *, is_expert, expert_normalizer, mu, sft_weighting="phi",
               ref_logp=None, entropy=None, eps_low=0.2, eps_high=0.2, dual_clip=3.0, log_ratio_clamp=None, beta=0.0,
               kl_estimator="k3", entropy_coef=0.0, loss_agg="token_mean", max_len=None,
               clip_mode="ppo", gppo_beta_low=1.0, gppo_beta_high=1.0):
    """(1 - mu) L_GRPO + mu L_SFT (line (a)) on one batch of both kinds of rows: is_expert (B,) marks the expert
    (teacher-forced demonstration) rows, which never reach the PPO branch, as on-policy rows never reach the SFT one.
    logp, old_logp, ref_logp, entropy, mask: (B, T); advantages: (B,). normalizer: grpo_loss's count over the
    on-policy rows of the step; expert_normalizer: expert tokens of the step (all ranks, / world size)."""
    on = mask * (~is_expert)[:, None].float()  # (B, T) on-policy tokens
    ex = mask * is_expert[:, None].float()  # (B, T) expert tokens
    old = torch.where(is_expert[:, None], logp.detach(), old_logp)  # (B, T) expert rows: ratio 1, masked out anyway
    adv = torch.where(is_expert, 0.0, advantages.float())  # (B,)
    l_grpo, metrics = grpo_loss(logp, old, adv, on, normalizer, ref_logp=ref_logp, entropy=entropy, eps_low=eps_low,
                                eps_high=eps_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, beta=beta,
                                kl_estimator=kl_estimator, entropy_coef=entropy_coef, loss_agg=loss_agg,
                                max_len=max_len,
                                clip_mode=clip_mode, gppo_beta_low=gppo_beta_low, gppo_beta_high=gppo_beta_high)
    p = logp.detach().exp()  # (B, T) current probability of the expert token, no gradient through the weight
    w = {"none": torch.ones_like(p), "phi": p * (1 - p), "is": p}[sft_weighting]  # (b) phi(p) = p(1 - p), no gradient
    l_sft = aggregate(-w * logp, ex, "token_mean", expert_normalizer)  # token mean over the expert tokens of the step
    loss = (1 - mu) * l_grpo + mu * l_sft  # (a)
    metrics.update(grpo_loss=l_grpo.detach(), sft_loss=l_sft.detach(),
                   expert_nll=(-logp.detach() * ex).sum() / ex.sum().clamp(min=1),
                   expert_weight=(w * ex).sum() / ex.sum().clamp(min=1))
    return loss, metrics


def mu_schedule(step, warmup, decay, peak, valley):
    """Trinity mu_schedule_function: linear 0 -> peak over `warmup` steps, cosine peak -> valley over `decay`
    steps, then valley. `step` is the 0-based optimizer step. CHORD-mu: 0.9, 0.78, 0.475, 0.17, 0.05 at 0..200."""
    if step < warmup:
        return peak * step / warmup
    if step >= warmup + decay:
        return valley
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay))


def expert_batch_size(ratio, n_onpolicy, world_size=1):
    """Expert samples per step (all ranks). Trinity mix_sample_strategy reads expert = ceil(ratio x read_batch) of a
    read batch that holds both kinds; with n_onpolicy rollouts kept as they are that is ceil(ratio / (1 - ratio) x
    n_onpolicy) (mix_chord.yaml: 64 beside 256), rounded up to a multiple of the world size."""
    n = math.ceil(round(ratio / (1 - ratio) * n_onpolicy, 6))  # round: 0.1 / 0.9 x 63 is 7.000000000000001
    return -(-n // world_size) * world_size


def overlong_penalty(length, max_len, buffer, penalty):
    """DAPO Eq. 13: 0 up to max_len - buffer, then linear down to -penalty at max_len."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_len - buffer)) / buffer * penalty, 0.0)


def main():
    args = common.parse_args(Args, presets={"preset": PRESETS, "variant": VARIANTS, "recipe": RECIPES}, ranges=RANGES)
    if args.dry_run:  # resolved recipe with sources, batch and memory estimate; loads nothing
        return common.dry_run(args, frozen=[args.model] if args.beta > 0 else [], extra_sequences=expert_batch_size(
            args.expert_data_ratio, args.prompts_per_step * args.num_generations))  # CHORD: expert rows per rollout step
    if args.dataset != "embedded" and args.expert_dataset == "embedded":  # arithmetic demonstrations for a real task
        raise common.UserError(f"--dataset {args.dataset} needs --expert-dataset: a dataset of demonstrations for the "
                               "SFT term (it may be the same file, read through --prompt-column/--response-column)")
    # 1. setup: process group, output directory, tokenizer, prompts and reward
    d = common.setup_distributed(args.seed, args.dist_timeout)
    out = common.prepare_output_dir(args, d)
    model_path = data.resolve_model(args.model, d)
    tokenizer = data.load_tokenizer(model_path, args.trust_remote_code, args.chat_template)
    data.check_context(model_path, args.max_prompt_length + args.max_new_tokens,
                         f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}")
    reward_fn = rollout.get_reward_fn(args.reward, args.reward_weights, args.answer_format, args.dataset)
    rows, eval_rows = data.load_train_eval(args, need_response=False, embedded_split="rl")
    train = data.tokenize_examples(tokenizer, rows, args.max_prompt_length, args.system_prompt, False, print)
    evalset = data.tokenize_examples(tokenizer, eval_rows, args.max_prompt_length, args.system_prompt, False, print, heldout=True)
    expert_rows = data.load_examples(args.expert_dataset, args.dataset_split, args.prompt_column,
                                       args.response_column, args.answer_column, True, "sft")  # CHORD
    expert = data.tokenize_examples(tokenizer, expert_rows, args.max_prompt_length + args.max_new_tokens,
                                      args.system_prompt, True, print)  # CHORD: prompt + demonstration + EOS
    G = args.num_generations
    n_local = rollout.rollout_batch(args, d.world_size)  # completions per rank and rollout step (checked)
    e_local = expert_batch_size(args.expert_data_ratio, args.prompts_per_step * G, d.world_size) // d.world_size

    # 2. models: policy (fused log-prob head), frozen reference only when beta > 0, generator
    lm = data.load_model(model_path, args.dtype, args.trust_remote_code, args.gradient_checkpointing, d.device)
    fused = FusedLM(lm, fast=args.fast_paths)  # the one change to model/global state: printed below
    model = common.wrap_model(fused, d, args.fsdp)
    ref = (FusedLM(data.load_model(model_path, args.dtype, args.trust_remote_code, device=d.device),
                   fast=args.fast_paths).eval() if args.beta > 0 else None)
    engine = rollout.make_engine(args.generator, model_path, d, args.max_prompt_length + args.max_new_tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                  weight_decay=args.weight_decay, fused=True)  # fused: one kernel for all tensors
    scheduler = common.lr_schedule(optimizer, args.warmup_steps, args.max_steps * args.steps_per_generation,
                                   "constant")
    start, tokens_seen, ckpt = 0, 0, common.latest_checkpoint(args)
    if ckpt:
        state = common.load_checkpoint(ckpt, model, [optimizer], [scheduler], d)
        start, tokens_seen = state["step"], state["tokens"]
        if engine:
            engine.push(model)
    log = common.MetricsLogger(out, d, args.max_steps, start, args.quiet, args.report_to, args)
    log.print(f"[{log.name}] {len(train)} prompts, {len(expert)} demonstrations ({e_local * d.world_size} per step), "
              f"{len(evalset)} held-out, G={G}, world size {d.world_size}, "
              f"start step {start}" + (f" (resumed from {ckpt.name})" if ckpt else ""))
    log.print(f"[{log.name}] {fused.summary}")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and d.device.type == "cuda")
    recompute_old = args.steps_per_generation > 1 or args.num_iterations > 1 or engine is not None

    def run_eval(step):  # held-out accuracy (and mean@k), logged
        return log.log(step, rollout.eval_metrics(model, tokenizer, evalset, reward_fn, d, args, engine))

    if start == 0:
        run_eval(0)
    for step in range(start + 1, args.max_steps + 1):
        t0 = common.timer()
        # 3. rollout: G completions per prompt (DAPO dynamic sampling keeps only groups with mixed rewards)
        kept, dropped, tries = [], [], 0
        while len(kept) < n_local // G and tries < (args.max_gen_batches if args.dynamic_sampling else 1):
            batch_no = (step - 1) * args.max_gen_batches + tries if args.dynamic_sampling else step - 1
            batch = [train[i] for i in data.batch_indices(len(train), args.prompts_per_step, batch_no, args.seed,
                                                            d.rank, d.world_size)]
            seed = (args.seed * 1_000_003 + step * 101 + tries) * 64 + d.rank
            comps, fin, gen_lp = rollout.generate(model, tokenizer, [e["prompt_ids"] for e in batch], G,
                                                 args.max_new_tokens, args.temperature, args.top_p, seed, engine)
            texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
            for j, e in enumerate(batch):
                group = []
                for i in range(j * G, (j + 1) * G):
                    reward = reward_fn(texts[i], e) + overlong_penalty(
                        len(comps[i]), args.max_new_tokens, args.overlong_buffer_ratio * args.max_new_tokens,
                        args.overlong_penalty)
                    group.append(dict(example=e, completion=comps[i], finished=fin[i],
                                      gen_logp=gen_lp[i] if gen_lp else None, reward=reward))
                equal = len({s["reward"] for s in group}) == 1
                (dropped if args.dynamic_sampling and equal else kept).append(group)
            tries += 1
        # out of tries: fill up with equal-reward groups (advantage 0: no gradient, but counted in the normalizer)
        groups = (kept + dropped)[: n_local // G]
        samples = [s for g in groups for s in g]
        t_gen = common.timer() - t0

        # 4. advantages: group-relative, from the rewards (groups never span ranks; batch std is global)
        rewards = torch.tensor([s["reward"] for s in samples], dtype=torch.float32)
        group_index = torch.arange(len(samples)) // G
        moments = common.all_reduce(reward_moments(rewards))  # --scale-rewards batch: the std of every rank's batch
        adv = group_advantages(rewards, group_index, args.scale_rewards, args.adv_eps, batch_moments=moments)
        experts = [expert[i] for i in data.batch_indices(len(expert), e_local * d.world_size, step - 1,
                                                           args.seed + 1, d.rank, d.world_size)]  # CHORD
        seqs = [(s["example"]["prompt_ids"], s["completion"]) for s in samples]
        seqs += [(e["prompt_ids"], e["response_ids"]) for e in experts]  # CHORD: rows n_local.. are expert rows
        full = data.collate(seqs, tokenizer.pad_token_id, d.device)
        if args.mask_truncated:
            full["loss_mask"] *= torch.tensor([float(s["finished"]) for s in samples] + [1.0] * len(experts),
                                              device=d.device)[:, None]
        full["advantages"] = torch.cat([adv, torch.zeros(len(experts))]).to(d.device)
        full["is_expert"] = torch.arange(len(seqs), device=d.device) >= len(samples)  # CHORD

        # 5. old and reference log-probs (no grad), computed once per rollout batch
        with torch.no_grad(), autocast:
            if recompute_old:
                full["old_logp"] = model(full["input_ids"], full["attention_mask"], full["loss_mask"],
                                         args.temperature)["logp"]
            if ref is not None:
                full["ref_logp"] = ref(full["input_ids"], full["attention_mask"], full["loss_mask"],
                                       args.temperature)["logp"]

        # 6. policy update: --num-iterations passes x --steps-per-generation optimizer steps x --grad-accum micro
        stats, n_opt = {}, 0
        for _ in range(args.num_iterations):
            for mini, mini_e in zip(torch.arange(n_local).chunk(args.steps_per_generation),
                                    torch.arange(n_local, n_local + e_local).tensor_split(args.steps_per_generation)):
                mbs = [{name: v[torch.cat([idx, idx_e])] for name, v in full.items()}
                       for idx, idx_e in zip(mini.chunk(args.grad_accum), mini_e.tensor_split(args.grad_accum))]
                # CHORD: two normalizers, on-policy and expert, each counted over the whole step
                normalizer = common.all_reduce(sum(normalizer_count(b["loss_mask"][~b["is_expert"]], args.loss_agg)
                                                   for b in mbs)) / d.world_size
                expert_normalizer = common.all_reduce(sum(b["loss_mask"][b["is_expert"]].sum() for b in mbs)).clamp(
                    min=1) / d.world_size
                mu = mu_schedule((step - 1) * args.num_iterations * args.steps_per_generation + n_opt,
                                 args.mu_warmup_steps, args.mu_decay_steps, args.mu_peak, args.mu_valley)  # CHORD
                for micro, b in enumerate(mbs):
                    with common.no_sync(model, micro == len(mbs) - 1), autocast:
                        o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], args.temperature, True)
                        old = b["old_logp"] if recompute_old else o["logp"].detach()
                        loss, m = chord_loss(
                            o["logp"], old, b["advantages"], b["loss_mask"], normalizer, ref_logp=b.get("ref_logp"),
                            entropy=o["entropy"], eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                            dual_clip=args.dual_clip, log_ratio_clamp=args.log_ratio_clamp, loss_agg=args.loss_agg,
                            kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef, max_len=args.max_new_tokens,
                            is_expert=b["is_expert"], expert_normalizer=expert_normalizer, mu=mu,  # CHORD
                            sft_weighting=args.sft_weighting,
                            clip_mode=args.clip_mode, gppo_beta_low=args.gppo_beta_low,
                            gppo_beta_high=args.gppo_beta_high)
                        loss.backward()
                    on = b["loss_mask"] * (~b["is_expert"])[:, None]  # CHORD: entropy of the on-policy tokens
                    m["entropy"] = (o["entropy"].detach() * on).sum() / on.sum().clamp(min=1)
                    for key, v in {"loss": loss.detach(), **m}.items():
                        stats[key] = stats.get(key, 0.0) + v.detach() / len(mbs)
                grad_norm, _ = common.optimizer_step(model, optimizer, scheduler, step, loss.detach(),
                                                     args.max_grad_norm, args.skip_nonfinite)  # clip, then step
                stats["grad_norm"] = stats.get("grad_norm", 0.0) + grad_norm
                n_opt += 1
        # 7. push the new weights into the generator
        if engine:
            engine.push(model)

        # 8. log, evaluate, checkpoint
        tokens_seen += int(full["attention_mask"].sum())
        metrics = {f"train/{name}": v / n_opt for name, v in stats.items()}
        metrics.update(rollout.rollout_metrics(samples, rewards, G, full.get("old_logp") if engine else None))
        metrics.update({"perf/gen_time": t_gen, "perf/train_time": common.timer() - t0 - t_gen, **reward_fn.metrics()})
        metrics["train/mu"] = mu  # CHORD
        metrics = common.reduce_metrics(metrics, d.device)
        metrics.update({"perf/tokens": tokens_seen * d.world_size,
                        "perf/peak_memory_mb": common.peak_memory_mb(d.device)})
        log.log(step, metrics, advance=1)
        if step == args.max_steps or args.eval_every and step % args.eval_every == 0:  # what the model writes
            rollout.log_completions(log, step, tokenizer, samples, adv)
        if args.eval_every and step % args.eval_every == 0 and step != args.max_steps:
            run_eval(step)
        if args.save_every and step % args.save_every == 0:
            common.save_checkpoint(out, step, model, tokenizer, [optimizer], [scheduler],
                                   {"tokens": tokens_seen}, d, args.keep_last)

    # 9. final evaluation and model
    acc = run_eval(args.max_steps)
    common.save_checkpoint(out, args.max_steps, model, tokenizer, [optimizer], [scheduler],
                           {"tokens": tokens_seen}, d, name="final")
    log.print(f"[{log.name}] done: {rollout.score_str(acc)}, peak memory {common.peak_memory_mb(d.device):.0f} MB")
    log.close()
    del model, optimizer, engine
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
