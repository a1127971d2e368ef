"""HPT: Hybrid Post-Training, from "Towards a Unified View of Large Language Model Post-Training" (arXiv 2509.04419).
A diff of grpo.py: a question solved at most gamma times out of G is trained on its demonstration (NLL), one solved
more often with GRPO on its rollouts (the paper's UPGE reads both as one estimator, 1_stable (1/pi_ref) A grad pi).

Objective (Algorithm 1 with the released hard switch), question q, rollouts o_1..o_G, k = #{r_i > 0}, demo y* + EOS:
    L = sum_q [ 1[k > gamma] L_RL(q) + 1[k <= gamma] sft_coef L_SFT(q) ] - c_H mean_t H_t
    L_RL  = agg_{i,t} -A_i r_it,  r_it = pi_theta / pi_old (no clip; --clip: PPO clip), A_i = r_i - mean_G r,
            agg = token sum / L_max (loss_remove_token_mean=True)
    L_SFT = token mean over the demonstration tokens of -log pi_theta(y*_t | q, y*_<t)

Differs from grpo.py by:
- (prompt, demonstration, answer) rows; a demonstration is cut to --max-new-tokens, losing its EOS, as the code
  does (the count is printed); hpt_gate (k <= --gate; switch_gate 0 for Qwen2.5-Math, 2 for LLaMA-3.1-8B): a gated
  question's rollouts leave the loss (paid for, as in the code), its demonstration row (is_expert) enters it, in the
  same mini-batches and AdamW; hpt_loss: RL over rollout rows, SFT over demonstration rows, entropy over all tokens;
- --sft-agg token_mean (ours): every term counted over the whole optimizer step and all ranks (RL by --loss-agg over
  RL rows, SFT over demonstration tokens, entropy over all tokens), so accumulation and DDP give one batch's gradient.
  per_microbatch (official, mix_actor.py update_policy, dynamic batches: micro-batch losses summed): RL token sum /
  L_max, demonstration and entropy token means per micro-batch: a demonstration token weighs by how many share its
  micro-batch, and the RL term is larger by the RL rows per micro-batch;
- the official grad-norm skip (--skip-grad-norm 80, _optimizer_step); defaults of exp_scripts/train.sh.
Official code (TsinghuaC3I/Unify-Post-Training, as the spec methods_c.md §1 read and ran it): hpt/verl/verl/mix_src/
{mix_trainer.py select_on_off_ada_balance, mix_actor.py update_policy, _optimizer_step, mix_core_alg.py
compute_sft_pure_loss}, verl/trainer/ppo/core_algos.py compute_policy_loss. Deviations: correct = reward > 0 (code:
== 1); optimizer steps per rollout batch are fixed (the code's vary, a gated question has 1 row instead of 8): each
question keeps G rollout rows and a demonstration row, unused ones without loss tokens, so every rank runs the same
micro-batches; a non-finite loss or norm stops the run unless --skip-nonfinite (the code skips the step); the "soft"
strategy is dead code in the release and is left out.

Run:
    python methods/hpt.py                           # from a weak SFT warm start of the embedded tiny model (CPU)
    python methods/hpt.py --clip --sft-agg per_microbatch
    torchrun --nproc_per_node 8 methods/hpt.py --recipe paper   # Qwen2.5-Math-7B on OpenR1-46k (recipes/hpt.py)
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
    max_new_tokens: int = 8192  # completion length, L_max of the RL term, demonstration limit (HPT train.sh)
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
    prompts_per_step: int = 128  # prompts per rollout step, all ranks (HPT train.sh train_batch_size)
    num_generations: int = 8  # G, completions per prompt (TRL default; Dr. GRPO, LUFFY)
    steps_per_generation: int = 2  # optimizer steps per rollout batch (HPT: 128 / ppo_mini_batch_size 64)
    num_iterations: int = 1  # passes over each rollout batch, mu (DeepSeekMath, TRL default 1)
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    lr: float = 5e-6  # HPT train.sh, constant (its LUFFY and SRFT baselines: 1e-6)
    beta1: float = 0.9  # torch/verl AdamW default
    beta2: float = 0.999  # torch/verl AdamW default
    weight_decay: float = 0.01  # verl actor optim default
    warmup_steps: int = 0  # linear warmup, then constant (verl; DAPO paper uses 20)
    max_grad_norm: float = 1.0  # verl and TRL default
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature (TRL, verl)
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    scale_rewards: Literal["group", "batch", "none"] = "none"  # HPT grpo_use_std=False (Algorithm 1: "normalized")
    clip: bool = False  # PPO clipping of the RL ratio (HPT loss_remove_clip=True; the paper's UPGE table: clip)
    adv_eps: float = 1e-6  # verl (TRL: 1e-4)
    eps_low: float = 0.2  # PPO clip, ratio >= 1 - eps_low (DeepSeekMath, TRL, verl)
    eps_high: float = 0.2  # PPO clip, ratio <= 1 + eps_high (DAPO clip-higher: 0.28)
    dual_clip: Optional[float] = None  # cap -A*c on the loss where A<0 (off in TRL; verl clip_ratio_c 3.0)
    log_ratio_clamp: Optional[float] = None  # |log pi/pi_old| cap before exp (HPT compute_policy_loss: none; verl 20)
    clip_mode: Literal["ppo", "gppo"] = "ppo"  # gppo: clipped tokens keep a bounded gradient (Klear-Reasoner GPPO, KlearReasoner core_algos.py compute_gppo_loss)
    gppo_beta_low: float = 1.0  # GPPO beta1: gradient scale of A<0, ratio<1-eps_low tokens (Klear README: beta1 = beta2 = 1 for Klear-Reasoner-8B; yaml gppo_loss_beta1 0.25)
    gppo_beta_high: float = 1.0  # GPPO beta2: gradient scale of A>0, ratio>1+eps_high tokens (Klear README, compute_gppo_loss_general_beta)
    beta: float = 0.0  # KL coefficient (TRL default 0.0; DeepSeekMath 0.04)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # DeepSeekMath uses k3; k2 has the reverse-KL gradient
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_sum_norm"  # HPT loss_remove_token_mean: token sum / L_max
    mask_truncated: bool = False  # drop completions without EOS from the loss (DAPO overlong filtering; TRL)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and generate more (HPT: gated ones kept)
    max_gen_batches: int = 4  # DAPO dynamic sampling: rollout batches tried per step before going on
    overlong_buffer_ratio: float = 0.0  # DAPO overlong shaping: last fraction of max_new_tokens penalised (4096/20480)
    overlong_penalty: float = 1.0  # DAPO: penalty at the hard limit
    entropy_coef: float = 0.001  # entropy bonus, a token mean over all rows (HPT train.sh entropy_coeff)
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
    # --- HPT ---
    gate: int = 0  # gamma: SFT on the demonstration when <= gate of G rollouts are correct (switch_gate; LLaMA: 2)
    sft_coef: float = 1.0  # weight of the SFT term (sft_loss_coef: 1.0 for 7B, 0.3 for Qwen2.5-Math-1.5B)
    sft_agg: Literal["token_mean", "per_microbatch"] = "token_mean"  # ours: means over the step; official: per micro-batch
    skip_grad_norm: Optional[float] = 80.0  # no update when the pre-clip grad norm exceeds it (HPT train.sh max_grad_norm 80)


PRESETS = {
    "grpo": dict(scale_rewards="group", loss_agg="seq_mean_token_mean", eps_high=0.2, beta=0.04, kl_estimator="k3",
                 source="DeepSeekMath §4.2"),
    "dr_grpo": dict(scale_rewards="none", loss_agg="seq_mean_token_sum_norm", eps_high=0.2, beta=0.0,
                    source="Dr. GRPO §3.2, oat code"),
    "dapo": dict(scale_rewards="group", loss_agg="token_mean", eps_high=0.28, beta=0.0, dynamic_sampling=True,
                 overlong_buffer_ratio=0.2, source="DAPO §3: clip-higher, token-level loss, filtering, 4096 of 20480"),
    "gppo": dict(clip_mode="gppo", clip=True, eps_low=0.2, eps_high=0.28, dual_clip=10.0, scale_rewards="group",
                 loss_agg="token_mean", beta=0.0, source="Klear-Reasoner (arXiv 2508.07629): clip 0.2/0.28, c 10, no KL"),
}
RECIPES = {
    # tiny model after SFT to ~0.5 held-out, 2-core CPU: 40 tokens, 32 prompts x 8, T 0.7 (T 1.0: the sampling tail
    # held the reward down), lr 5e-5 (1e-4 was noisier), 80 steps; 512 held-out problems: 0.05 mean@4 gain > 3 SE
    "embedded": dict(max_prompt_length=64, max_new_tokens=40, lr=5e-5, warmup_steps=10, max_steps=80,
                     prompts_per_step=32, temperature=0.7, eval_every=20, eval_size=512, eval_samples=4,
                     eval_temperature=0.7, steps_per_generation=1, sft_coef=0.3, scale_rewards="group"),  # HPT demo (the 1.5B script's coef)
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


def hpt_loss(logp, old_logp, advantages, mask, normalizer, *, is_expert, expert_normalizer, token_normalizer,
             sft_coef=1.0, sft_agg="token_mean", entropy=None, entropy_coef=0.001, clip=False, eps_low=0.2,
             eps_high=0.2, dual_clip=None, log_ratio_clamp=None, ref_logp=None, beta=0.0, kl_estimator="k3",
             loss_agg="seq_mean_token_sum_norm", max_len=None,
             clip_mode="ppo", gppo_beta_low=1.0, gppo_beta_high=1.0):
    """Rollout rows (RL) and demonstration rows (is_expert: (B,) bool) in one batch; logp, old_logp, ref_logp, entropy,
    mask: (B, T); advantages: (B,). normalizer: grpo_loss's count over the RL rows of the optimizer step, all ranks, /
    world size; expert_normalizer, token_normalizer: the demonstration tokens and all tokens, the same way.
    sft_agg="per_microbatch" (official, with loss_agg seq_mean_token_sum_norm): the normalizers are this
    micro-batch's own (1, its demonstration tokens: 0 without any, the code's NaN skipped; its tokens), micro-batches
    are summed. Returns (loss, metrics)."""
    on = mask * (~is_expert)[:, None].float()  # (B, T) rollout tokens of questions above the gate
    ex = mask * is_expert[:, None].float()  # (B, T) demonstration tokens of gated questions
    old = torch.where(is_expert[:, None], logp.detach(), old_logp)  # (B, T) demonstration rows: ratio 1, masked out
    adv = torch.where(is_expert, 0.0, advantages.float())  # (B,)
    if sft_agg == "per_microbatch":  # mix_actor.py: sum / L_max, masked_mean over demo rows, masked_mean entropy
        normalizer, expert_normalizer, token_normalizer = 1.0, ex.sum().clamp(min=1), mask.sum().clamp(min=1)
    if not clip:  # an infinite clip range leaves the ratio as it is (compute_policy_loss, loss_remove_clip=True)
        eps_low, eps_high, dual_clip = math.inf, math.inf, None
    l_rl, metrics = grpo_loss(logp, old, adv, on, normalizer, ref_logp=ref_logp, eps_low=eps_low, eps_high=eps_high,
                              dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, beta=beta,
                              kl_estimator=kl_estimator, loss_agg=loss_agg, max_len=max_len,
                              clip_mode=clip_mode, gppo_beta_low=gppo_beta_low, gppo_beta_high=gppo_beta_high)
    l_sft = aggregate(-logp, ex, "token_mean", expert_normalizer)  # 0 without demonstration tokens
    loss = l_rl + sft_coef * l_sft
    if entropy_coef:  # bonus over every token (verl: masked_mean(entropy, response_mask) of all rows)
        loss = loss - entropy_coef * aggregate(entropy, mask, "token_mean", token_normalizer)
    metrics.update(rl_loss=l_rl.detach(), sft_loss=l_sft.detach())
    return loss, metrics


def hpt_gate(rewards, gate):
    """rewards (Q, G): True where <= gate rollouts are correct, reward > 0 (mix_trainer.py on_solve_num <= gate)."""
    return (rewards > 0).sum(1) <= gate


def with_demonstrations(tokenizer, examples, max_tokens, log):
    """Add 'response_ids': demonstration + EOS cut to max_tokens, as mix_vllm_rollout.py generate_off_sequences (a
    cut one loses its EOS: the count is printed, filter such data first); questions without one are dropped."""
    ids = [tokenizer(str(e.get("response") or "").strip(), add_special_tokens=False)["input_ids"] for e in examples]
    out = [{**e, "response_ids": (r + [tokenizer.eos_token_id])[:max_tokens]} for e, r in zip(examples, ids) if r]
    log(f"[hpt] {sum(len(r) >= max_tokens for r in ids)} demonstrations cut to --max-new-tokens {max_tokens} (no "
        f"EOS, as the code), {len(examples) - len(out)} questions without one dropped")
    if not out:
        raise common.UserError("no question has a demonstration: check --response-column")
    return out


def overlong_penalty(length, max_len, buffer, penalty):
    """DAPO Eq. 13: 0 up to max_len - buffer, then linear down to -penalty at max_len."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_len - buffer)) / buffer * penalty, 0.0)


def main():
    args = common.parse_args(Args, presets={"preset": PRESETS, "recipe": RECIPES},  # HPT: its own ranges
                             ranges={"skip_grad_norm": (lambda v: v > 0, "> 0 (none: never skip)")})
    if args.dry_run:  # resolved recipe with sources, batch and memory estimate; loads nothing
        return common.dry_run(args, frozen=[args.model] if args.beta > 0 else [], extra_sequences=args.prompts_per_step)
    if args.gate < 0 or args.gate >= args.num_generations or not 0 <= args.sft_coef < math.inf:  # HPT
        raise common.UserError(f"--gate {args.gate} must be in [0, --num-generations) and --sft-coef >= 0 (gate 0: "
                               "SFT only for questions with no correct rollout)")
    if args.sft_agg == "per_microbatch" and args.loss_agg != "seq_mean_token_sum_norm":  # HPT
        raise common.UserError("--sft-agg per_microbatch (official) acts only with --loss-agg seq_mean_token_sum_norm")
    # 1. setup: process group, output directory, tokenizer, prompts and reward
    d = common.setup_distributed(args.seed, args.dist_timeout)
    out = common.prepare_output_dir(args, d)
    model_path = data.resolve_model(args.model, d)
    tokenizer = data.load_tokenizer(model_path, args.trust_remote_code, args.chat_template)
    data.check_context(model_path, args.max_prompt_length + args.max_new_tokens,
                         f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}")
    reward_fn = rollout.get_reward_fn(args.reward, args.reward_weights, args.answer_format, args.dataset)
    rows, eval_rows = data.load_train_eval(args, need_response=True, embedded_split="rl")  # HPT: demonstrations
    train = data.tokenize_examples(tokenizer, rows, args.max_prompt_length, args.system_prompt, False, print)
    train = with_demonstrations(tokenizer, train, args.max_new_tokens, print)  # HPT
    evalset = data.tokenize_examples(tokenizer, eval_rows, args.max_prompt_length, args.system_prompt, False, print, heldout=True)
    G = args.num_generations
    n_local = rollout.rollout_batch(args, d.world_size)  # completions per rank and rollout step (checked)

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
    log.print(f"[{log.name}] {len(train)} prompts, {len(evalset)} held-out, G={G}, world size {d.world_size}, "
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
                no_signal = len({s["reward"] for s in group}) == 1 and not hpt_gate(  # HPT: a gated group trains
                    torch.tensor([[s["reward"] for s in group]]), args.gate)[0]  # on its demonstration: kept
                (dropped if args.dynamic_sampling and no_signal else kept).append(group)
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
        gated = hpt_gate(rewards.view(-1, G), args.gate)  # HPT: gated rollouts leave the loss (emptied rows) ...
        for s in [x for i, x in enumerate(samples) if gated[i // G]]:
            s["gen_logp"] = s["gen_logp"] and []  # ... and the vLLM gap check; the demonstration row enters
        seqs = [(s["example"]["prompt_ids"], [] if gated[i // G] else s["completion"]) for i, s in enumerate(samples)]
        seqs += [(g[0]["example"]["prompt_ids"], g[0]["example"]["response_ids"] if gated[j] else [])
                 for j, g in enumerate(groups)]  # HPT: rows n_local.. are demonstration rows
        full = data.collate(seqs, tokenizer.pad_token_id, d.device)
        if args.mask_truncated:
            full["loss_mask"] *= torch.tensor([float(s["finished"]) for s in samples] + [1.0] * len(groups),
                                              device=d.device)[:, None]
        full["advantages"] = torch.cat([adv, torch.zeros(len(groups))]).to(d.device)
        full["is_expert"] = torch.arange(len(seqs), device=d.device) >= len(samples)  # HPT

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
            for mini, mini_e in zip(torch.arange(n_local).tensor_split(args.steps_per_generation),
                                    torch.arange(n_local, n_local + len(groups)).tensor_split(args.steps_per_generation)):
                mbs = [{name: v[torch.cat([idx, idx_e])] for name, v in full.items()}
                       for idx, idx_e in zip(mini.tensor_split(args.grad_accum), mini_e.tensor_split(args.grad_accum))]
                normalizer = common.all_reduce(sum(normalizer_count(b["loss_mask"][~b["is_expert"]], args.loss_agg)
                                                   for b in mbs)) / d.world_size  # HPT: RL rows; demo, all tokens:
                expert_normalizer, token_normalizer = (common.all_reduce(sum(b["loss_mask"][k(b)].sum() for b in mbs))
                                                       .clamp(min=1) / d.world_size for k in (lambda b: b["is_expert"],
                                                                                              lambda b: slice(None)))
                for micro, b in enumerate(mbs):
                    with common.no_sync(model, micro == len(mbs) - 1), autocast:
                        o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], args.temperature, True)
                        old = b["old_logp"] if recompute_old else o["logp"].detach()
                        loss, m = hpt_loss(
                            o["logp"], old, b["advantages"], b["loss_mask"], normalizer, ref_logp=b.get("ref_logp"),
                            entropy=o["entropy"], eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                            dual_clip=args.dual_clip, log_ratio_clamp=args.log_ratio_clamp, loss_agg=args.loss_agg,
                            kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef, max_len=args.max_new_tokens,
                            is_expert=b["is_expert"], expert_normalizer=expert_normalizer, token_normalizer=token_normalizer,
                            sft_coef=args.sft_coef, sft_agg=args.sft_agg, clip=args.clip,  # HPT
                            clip_mode=args.clip_mode, gppo_beta_low=args.gppo_beta_low,
                            gppo_beta_high=args.gppo_beta_high)
                        loss.backward()
                    m["entropy"] = (o["entropy"].detach() * b["loss_mask"]).sum() / b["loss_mask"].sum().clamp(min=1)
                    for key, v in {"loss": loss.detach(), **m}.items():
                        stats[key] = stats.get(key, 0.0) + v.detach() / len(mbs)
                grad_norm, stepped = common.optimizer_step(model, optimizer, scheduler, step, loss.detach(),
                                                           args.max_grad_norm, args.skip_nonfinite,
                                                           args.skip_grad_norm)  # HPT: no step above this norm
                stats["grad_norm"] = stats.get("grad_norm", 0.0) + grad_norm
                stats["skipped"] = stats.get("skipped", 0.0) + float(not stepped)  # HPT

                n_opt += 1
        # 7. push the new weights into the generator
        if engine:
            engine.push(model)

        # 8. log, evaluate, checkpoint
        tokens_seen += int(full["attention_mask"].sum())
        metrics = {f"train/{name}": v / n_opt for name, v in stats.items()}
        metrics.update(rollout.rollout_metrics(samples, rewards, G, full.get("old_logp") if engine else None))
        metrics.update({"perf/gen_time": t_gen, "perf/train_time": common.timer() - t0 - t_gen, **reward_fn.metrics()})
        metrics.update({"train/frac_gated": gated.float().mean(),  # HPT: questions trained on the demonstration
                        "train/frac_zero_std_groups": ((rewards.view(-1, G).std(1) == 0) & ~gated).float().mean()})
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
