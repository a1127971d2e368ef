"""SRFT: Supervised Reinforcement Fine-Tuning (arXiv 2506.19767, ICLR 2026). A diff of grpo.py: one stage; own rollouts
and one demonstration per question in the same group, in one batch; entropy weights the signals.

Objective (the paper's equations as copied by the notes repository Amier2/logseq_note pages/SRFT.md; spec
methods_c.md §2), H = sg(token-mean entropy of the sequence under pi_theta), A over the group G_on U {demo}:
    L = L_SFT^demo + L_RL^demo + L_RL^self - c_H mean_t H_t
    L_SFT^demo = 0.5 exp(-H) (-log pi_theta(y*_t))          on demonstration tokens (w_SFT)
    L_RL^demo  = max(-A p_t, -A clip(p_t, 1-eps, 1+eps)),  p_t = pi_theta(y*_t)   (pi_beta = 1: only the low clip acts)
    L_RL^self  = 0.1 exp(+H) (-log pi_theta(y+_t)) on correct rollouts (w_RL),  +log pi_theta(y-_t) on wrong ones
NO OFFICIAL CODE exists (spec). --variant chooses the form:
    paper    the equations; A = (r - mean) / std (UPGE table); token means over the step (UNKNOWN: ours); no bonus;
    hpt_repo the third-party code behind the HPT paper's SRFT row (TsinghuaC3I/Unify-Post-Training mix_actor.py
             branch srft, mix_core_alg.py compute_token_on_off_policy_srft_loss, exp_scripts/train_srft.sh): demo
             term -A p/(p + 0.1) without clip (LUFFY's shaping), A = r - mean, token sum / 8192, entropy 0.001.
Uncertain in both: the sign of H in w_RL (notes: exp(-H), but a weight that rises with entropy; third party and
here: exp(+H)); the granularity of H (UNKNOWN; per sequence as the third party; --entropy-weights batch: one mean per
micro-batch and kind, which depends on the split); exp(+H) is unbounded (train/w_pos_max).

Differs from grpo.py by:
- (prompt, demonstration, answer) rows: --num-generations own rollouts plus the demonstration per group (third
  party: 7 + 1); the demonstration is cut to --max-new-tokens (count printed) and scored once at start-up;
- srft_loss, each term counted over the whole optimizer step and all ranks (SFT over demonstration tokens, RL by
  --loss-agg over all rows, entropy over all tokens); no importance ratio anywhere (old log-probs only for the vLLM
  gap check): after the first optimizer step of a rollout batch the self term is off-policy, as in the third party.
Deviations from the third-party code: its SFT term is a per-micro-batch token mean; correct = reward > 0; the
demonstration is scored once, not every step (the same value).

Run:
    python methods/srft.py                          # from a weak SFT warm start of the embedded tiny model (CPU)
    python methods/srft.py --variant hpt_repo
    torchrun --nproc_per_node 8 methods/srft.py --recipe paper   # Qwen2.5-Math-7B on OpenR1-46k (recipes/srft.py)
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
    max_new_tokens: int = 8192  # completion length and demonstration limit (train_srft.sh max response 8192)
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
    prompts_per_step: int = 128  # prompts per rollout step, all ranks (train_srft.sh 128; paper: UNKNOWN)
    num_generations: int = 7  # own rollouts per prompt; + the demonstration = a group of 8 (train_srft.sh n 8, 1 demo)
    steps_per_generation: int = 2  # optimizer steps per rollout batch (train_srft.sh: 128 / ppo_mini_batch_size 64)
    num_iterations: int = 1  # passes over each rollout batch, mu (DeepSeekMath, TRL default 1)
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    lr: float = 1e-6  # train_srft.sh, constant (paper: UNKNOWN)
    beta1: float = 0.9  # torch/verl AdamW default
    beta2: float = 0.999  # torch/verl AdamW default
    weight_decay: float = 0.01  # verl actor optim default
    warmup_steps: int = 0  # linear warmup, then constant (verl; DAPO paper uses 20)
    max_grad_norm: float = 1.0  # verl and TRL default
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature (TRL, verl)
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # A / std of the group, of the batch, or no std
    adv_eps: float = 1e-6  # verl (TRL: 1e-4)
    eps_low: float = 0.2  # clip of the demonstration's p = pi_theta, p >= 1 - eps_low (SRFT: PPO's eps)
    eps_high: float = 0.2  # p <= 1 + eps_high: never acts, p <= 1 (kept for the shared presets; refused when given)
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
    # --- SRFT ---
    variant: Literal["paper", "hpt_repo"] = "paper"  # the paper's equations or the third-party code; sets the flags below
    demo_rl: Literal["clip", "shape"] = "clip"  # demo RL term: clipped p (paper) or p / (p + gamma), no clip (third party)
    shaping_gamma: float = 0.1  # gamma of p / (p + gamma) (third party: off_policy_reshape p_div_p_0.1)
    w_sft_scale: float = 0.5  # w_SFT = w_sft_scale exp(-H) on the demonstration (paper, third party: 0.5)
    w_pos_scale: float = 0.1  # w_RL = w_pos_scale exp(+H) on correct rollouts (paper, third party: 0.1)
    entropy_weights: Literal["sequence", "batch"] = "sequence"  # H per sequence (third party) or per micro-batch


VARIANTS = {  # spec methods_c.md §2 (no official code)
    "paper": dict(demo_rl="clip", scale_rewards="group", loss_agg="token_mean", entropy_coef=0.0,
                  source="SRFT paper equations (notes copy): clipped demo term, std A over G_on U G_off"),
    "hpt_repo": dict(demo_rl="shape", scale_rewards="none", loss_agg="seq_mean_token_sum_norm", entropy_coef=0.001,
                     source="HPT repo srft branch, train_srft.sh: p/(p+0.1), no std, sum / 8192, entropy 0.001"),
}
PRESETS = {
    "grpo": dict(scale_rewards="group", loss_agg="seq_mean_token_mean", eps_high=0.2, beta=0.04, kl_estimator="k3",
                 source="DeepSeekMath §4.2"),
    "dr_grpo": dict(scale_rewards="none", loss_agg="seq_mean_token_sum_norm", eps_high=0.2, beta=0.0,
                    source="Dr. GRPO §3.2, oat code"),
    "dapo": dict(scale_rewards="group", loss_agg="token_mean", eps_high=0.28, beta=0.0, dynamic_sampling=True,
                 overlong_buffer_ratio=0.2, source="DAPO §3: clip-higher, token-level loss, filtering, 4096 of 20480"),
}
RECIPES = {
    # tiny model after SFT to ~0.5 held-out, 2-core CPU: 40 tokens, 32 prompts x 8, T 0.7 (T 1.0: the sampling tail
    # held the reward down), lr 5e-5 (1e-4 was noisier), 80 steps; 512 held-out problems: 0.05 mean@4 gain > 3 SE
    "embedded": dict(max_prompt_length=64, max_new_tokens=40, lr=5e-5, warmup_steps=10, max_steps=80,
                     prompts_per_step=32, temperature=0.7, eval_every=20, eval_size=512, eval_samples=4,
                     eval_temperature=0.7),  # SRFT: 7 rollouts + 1 demonstration per group
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


def srft_loss(logp, old_logp, advantages, mask, normalizer, *, is_expert, expert_normalizer, token_normalizer, entropy,
              correct, w_sft_scale=0.5, w_pos_scale=0.1, demo_rl="clip", eps_low=0.2, eps_high=0.2, shaping_gamma=0.1,
              entropy_weights="sequence", ref_logp=None, beta=0.0, kl_estimator="k3", entropy_coef=0.0,
              loss_agg="token_mean", max_len=None):
    """Own rollout rows and demonstration rows (is_expert: (B,) bool); logp, entropy, ref_logp, mask: (B, T); advantages:
    (B,) over each group with its demonstration; correct: (B,) bool, own rows with reward > 0. old_logp is unused (no
    importance ratio: pi_beta = 1 on the demonstration). normalizer: grpo_loss's count over ALL rows of the step, all
    ranks, / world size; expert_normalizer, token_normalizer: demonstration and all tokens, the same way."""
    ex = mask * is_expert[:, None].float()  # (B, T) demonstration tokens; mask - ex: own rollout tokens
    if entropy_weights == "sequence":  # H per sequence: token mean of the row (third party)
        H_ex = H_on = (entropy.detach() * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
    else:  # one H per micro-batch and kind
        H_ex, H_on = ((entropy.detach() * m).sum() / m.sum().clamp(min=1) for m in (ex, mask - ex))
    w_sft = w_sft_scale * torch.exp(-H_ex) * torch.ones_like(advantages)  # (B,) w_SFT = 0.5 sg(exp(-H))
    w_pos = w_pos_scale * torch.exp(H_on) * torch.ones_like(advantages)  # (B,) w_RL = 0.1 sg(exp(+H))
    l_sft = aggregate(-w_sft[:, None] * logp, ex, "token_mean", expert_normalizer)  # L_SFT^demo
    per_self = -torch.where(correct, w_pos, -1.0)[:, None] * logp  # L_RL^self: +w_RL for y+, -1 for y-, no ratio
    if beta > 0:  # KL to the reference on own rollouts (not in SRFT; grpo.py's flag)
        per_self = per_self + beta * kl_estimate(logp, ref_logp, kl_estimator)
    if demo_rl == "clip":  # paper: ratio pi_theta / pi_beta with pi_beta = 1, PPO clip
        l_demo, metrics = grpo_loss(logp, torch.zeros_like(logp), advantages, ex, normalizer, eps_low=eps_low,
                                    eps_high=eps_high, log_ratio_clamp=None, loss_agg=loss_agg, max_len=max_len)
    else:  # third party: LUFFY's shaping p / (p + gamma), no clip
        p = logp.exp()
        l_demo, metrics = aggregate(-advantages[:, None] * p / (p + shaping_gamma), ex, loss_agg, normalizer, max_len), {}
    l_rl = l_demo + aggregate(per_self, mask - ex, loss_agg, normalizer, max_len)
    loss = l_sft + l_rl
    if entropy_coef:  # bonus over every token (third party: verl masked_mean over all rows)
        loss = loss - entropy_coef * aggregate(entropy, mask, "token_mean", token_normalizer)
    metrics.update(sft_loss=l_sft.detach(), rl_loss=l_rl.detach(), w_pos_max=(w_pos * ~is_expert).max(),  # own rows
                   w_pos=(w_pos * ~is_expert).sum() / (~is_expert).sum().clamp(min=1),
                   w_sft=(w_sft * is_expert).sum() / is_expert.sum().clamp(min=1))
    return loss, metrics


def with_demonstrations(tokenizer, examples, max_tokens, log):
    """Add 'response_ids': demonstration + EOS cut to max_tokens (no EOS then, as the third party); drop the rest."""
    ids = [tokenizer(str(e.get("response") or "").strip(), add_special_tokens=False)["input_ids"] for e in examples]
    out = [{**e, "response_ids": (r + [tokenizer.eos_token_id])[:max_tokens]} for e, r in zip(examples, ids) if r]
    log(f"[srft] {sum(len(r) >= max_tokens for r in ids)} demonstrations cut to --max-new-tokens {max_tokens} (no "
        f"EOS), {len(examples) - len(out)} questions without one dropped")
    if not out:
        raise common.UserError("no question has a demonstration: check --response-column")
    return out


def overlong_penalty(length, max_len, buffer, penalty):
    """DAPO Eq. 13: 0 up to max_len - buffer, then linear down to -penalty at max_len."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_len - buffer)) / buffer * penalty, 0.0)


def main():
    args = common.parse_args(Args, presets={"preset": PRESETS, "variant": VARIANTS, "recipe": RECIPES}, ranges={  # SRFT
        "w_sft_scale": (lambda v: 0 <= v < math.inf, ">= 0"), "w_pos_scale": (lambda v: 0 <= v < math.inf, ">= 0")})
    if args.dry_run:  # resolved recipe with sources, batch and memory estimate; loads nothing
        return common.dry_run(args, frozen=[args.model] if args.beta > 0 else [], extra_sequences=args.prompts_per_step)
    if "eps_high" in args._explicit or "eps_low" in args._explicit and args.demo_rl != "clip":  # SRFT
        raise common.UserError("--eps-low acts only with --demo-rl clip; --eps-high never acts (p = pi_theta <= 1)")
    if "shaping_gamma" in args._explicit and args.demo_rl != "shape" or not args.shaping_gamma > 0:  # SRFT
        raise common.UserError("--shaping-gamma (> 0) acts only with --demo-rl shape")
    # 1. setup: process group, output directory, tokenizer, prompts and reward
    d = common.setup_distributed(args.seed, args.dist_timeout)
    out = common.prepare_output_dir(args, d)
    model_path = data.resolve_model(args.model, d)
    tokenizer = data.load_tokenizer(model_path, args.trust_remote_code, args.chat_template)
    data.check_context(model_path, args.max_prompt_length + args.max_new_tokens,
                         f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}")
    reward_fn = rollout.get_reward_fn(args.reward, args.reward_weights, args.answer_format, args.dataset)
    rows, eval_rows = data.load_train_eval(args, need_response=True, embedded_split="rl")  # SRFT: demonstrations
    train = data.tokenize_examples(tokenizer, rows, args.max_prompt_length, args.system_prompt, False, print)
    train = with_demonstrations(tokenizer, train, args.max_new_tokens, print)  # SRFT: scored once, as a rollout is
    for e in train:
        e["demo_reward"] = reward_fn(tokenizer.decode(e["response_ids"], skip_special_tokens=True), e)
    print(f"[srft] mean reward of the demonstrations: {reward_fn.metrics()}")  # (and the reward sums reset)
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
    recompute_old = engine is not None  # SRFT: no ratio uses pi_old; only the vLLM gap check needs it

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
        demo_r = torch.tensor([g[0]["example"]["demo_reward"] for g in groups], dtype=torch.float32)  # SRFT
        moments = common.all_reduce(reward_moments(torch.cat([rewards, demo_r])))  # --scale-rewards batch: all ranks
        adv = group_advantages(torch.cat([rewards, demo_r]), torch.cat([group_index, torch.arange(len(groups))]),
                               args.scale_rewards, args.adv_eps, batch_moments=moments)  # SRFT: over G_on U G_off
        seqs = [(s["example"]["prompt_ids"], s["completion"]) for s in samples]
        seqs += [(g[0]["example"]["prompt_ids"], g[0]["example"]["response_ids"]) for g in groups]  # SRFT: demo rows
        full = data.collate(seqs, tokenizer.pad_token_id, d.device)
        if args.mask_truncated:
            full["loss_mask"] *= torch.tensor([float(s["finished"]) for s in samples] + [1.0] * len(groups),
                                              device=d.device)[:, None]
        full["advantages"] = adv.to(d.device)
        full["is_expert"] = torch.arange(len(seqs), device=d.device) >= len(samples)  # SRFT
        full["correct"] = torch.cat([rewards > 0, torch.zeros(len(groups), dtype=torch.bool)]).to(d.device)  # SRFT

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
                normalizer = common.all_reduce(
                    sum(normalizer_count(b["loss_mask"], args.loss_agg) for b in mbs)) / d.world_size
                expert_normalizer, token_normalizer = (common.all_reduce(sum(b["loss_mask"][k(b)].sum() for b in mbs))
                                                       .clamp(min=1) / d.world_size for k in (lambda b: b["is_expert"],
                                                                                              lambda b: slice(None)))
                for micro, b in enumerate(mbs):
                    with common.no_sync(model, micro == len(mbs) - 1), autocast:
                        o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], args.temperature, True)
                        old = b["old_logp"] if recompute_old else o["logp"].detach()
                        loss, m = srft_loss(
                            o["logp"], old, b["advantages"], b["loss_mask"], normalizer, ref_logp=b.get("ref_logp"),
                            entropy=o["entropy"], eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                            loss_agg=args.loss_agg, kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef,  # SRFT: no ratio
                            max_len=args.max_new_tokens, is_expert=b["is_expert"], expert_normalizer=expert_normalizer,  # SRFT
                            token_normalizer=token_normalizer, correct=b["correct"], w_sft_scale=args.w_sft_scale,
                            w_pos_scale=args.w_pos_scale, demo_rl=args.demo_rl, shaping_gamma=args.shaping_gamma,
                            entropy_weights=args.entropy_weights)
                        loss.backward()
                    m["entropy"] = (o["entropy"].detach() * b["loss_mask"]).sum() / b["loss_mask"].sum().clamp(min=1)
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
        metrics.update({"train/demo_reward": demo_r.mean(),  # SRFT: the group holds the demonstration
                        "train/frac_zero_std_groups": (torch.cat([rewards.view(-1, G), demo_r[:, None]], 1).std(1)
                                                       == 0).float().mean()})
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
