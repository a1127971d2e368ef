"""UFT: Unifying Supervised and Reinforcement Fine-Tuning (arXiv 2505.16984). A diff of grpo.py: rollouts start
from the prompt plus a revealed prefix (hint) of the demonstration, and a small NLL term trains the hint tokens.

Demonstration steps s_1..s_n in m = min(5, n) chunks ending at sep_i = round(i n / m); at rollout step t (1-based):
    k ~ Binomial(m, p_t),  p_t = p_low + (p_high - p_low) (1 + cos(pi t / T_hint)) / 2 for t <= T_hint, no hint after
    h_t = s_1..s_{sep_k} (tokenised alone, appended to the prompt ids, shared by the G rollouts o_i ~ pi_old(.|q,h_t))
    L = L_GRPO(o | q (+) h_t) + beta_h mean_{hint tokens}(-log pi(h_j | q, h_<j)) + beta KL_k3(pi || pi_ref) - 0.001 H
with p_low 0.05, p_high 0.95, T_hint 300 of 500 steps, beta_h 0.001, beta 0.001 (verl low_var_kl = k3), G = 4.
Differs from grpo.py by:
- rollout: each prompt's hint (`sample_hint`: its own RNG keyed by (seed, step, sample), so --resume draws the same
  hints) joins its prompt ids; the loss mask covers the completion, `hint_mask` the hint tokens (prompt side), whose
  log-probs and gradient come from the same fused pass (FusedLM prompt_mask, kernels/engine.py; no (B, T, V) logits).
- uft_loss: grpo's loss + hint_coef x the hint tokens' NLL / the hint tokens of the optimizer step (0 without any).
- official defaults: --beta 0.001 k3, --entropy-coef 0.001, --log-ratio-clamp none; the official baselines as
  --hint-schedule stage / uniform (R3: with --hint-coef 0, ignores T_hint). Demonstrations load for the RL prompts.
Official code checked against: liumy2010/UFT @ ad3c8ec (verl/utils/dataset/rl_dataset.py, torch_functional.py
tokenize_and_postprocess_data, workers/actor/dp_actor.py update_policy, core_algos.py, run.py, scripts/train.sh).
Deviations: the official data holds each hint as a list of steps; here the --response-column text is cut after each
--hint-split match (default: every official list of data/{math,countdown,kk_logic}); embedded: after ',', the hint
stops before '#' (--hint-end: the official hints stop before </think><answer>). The hint NLL (logits / temperature as
the official, no clamp to +-100) and the PPO term are token means over the optimizer step (verl-0.2: per micro-batch).
Run:
    python methods/uft.py                           # from a weak SFT warm start of the embedded tiny model (CPU)
    torchrun --nproc_per_node 8 methods/uft.py --recipe paper
"""
import math  # UFT
import os
import re  # UFT
import sys
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np  # UFT
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
    max_new_tokens: int = 1024  # completion length (DeepSeekMath: 1024)
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
    prompts_per_step: int = 16  # prompts per rollout step, all ranks (Dr. GRPO: 16 x 8 = 128 rollouts)
    num_generations: int = 8  # G, completions per prompt (TRL default; Dr. GRPO, LUFFY)
    steps_per_generation: int = 1  # optimizer steps per rollout batch (verl: train_batch / ppo_mini_batch)
    num_iterations: int = 1  # passes over each rollout batch, mu (DeepSeekMath, TRL default 1)
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    lr: float = 1e-6  # DeepSeekMath §4.2, TRL GRPOConfig, Dr. GRPO, DAPO
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
    dual_clip: Optional[float] = None  # cap -A*c on the loss where A<0 (off in TRL; verl clip_ratio_c 3.0)
    log_ratio_clamp: Optional[float] = None  # |log pi/pi_old| cap before exp (UFT verl-0.2 compute_policy_loss: none)
    clip_mode: Literal["ppo", "gppo"] = "ppo"  # gppo: clipped tokens keep a bounded gradient (Klear-Reasoner GPPO, KlearReasoner core_algos.py compute_gppo_loss)
    gppo_beta_low: float = 1.0  # GPPO beta1: gradient scale of A<0, ratio<1-eps_low tokens (Klear README: beta1 = beta2 = 1 for Klear-Reasoner-8B; yaml gppo_loss_beta1 0.25)
    gppo_beta_high: float = 1.0  # GPPO beta2: gradient scale of A>0, ratio>1+eps_high tokens (Klear README, compute_gppo_loss_general_beta)
    beta: float = 0.001  # KL loss coefficient (UFT run.py USE_KL_LOSS, kl_loss_coef 0.001, low_var_kl = k3)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # DeepSeekMath uses k3; k2 has the reverse-KL gradient
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"  # TRL default (DAPO's); GRPO paper: seq_mean_token_mean; Dr. GRPO: seq_mean_token_sum_norm
    mask_truncated: bool = False  # drop completions without EOS from the loss (DAPO overlong filtering; TRL)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and generate more
    max_gen_batches: int = 4  # DAPO dynamic sampling: rollout batches tried per step before going on
    overlong_buffer_ratio: float = 0.0  # DAPO overlong shaping: last fraction of max_new_tokens penalised (4096/20480)
    overlong_penalty: float = 1.0  # DAPO: penalty at the hard limit
    entropy_coef: float = 0.001  # entropy bonus (UFT ppo_trainer.yaml entropy_coeff 0.001)
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
    # --- UFT ---
    hint_coef: float = 0.001  # beta_h, NLL coefficient of the hint tokens (run.py sft_loss_coef 0.001; R3: 0)
    hint_schedule: Literal["cosine", "stage", "uniform"] = "cosine"  # chunks revealed: Binomial(m, p_t) (uft), official stage, or uniform (r3)
    hint_low: float = 0.05  # p_t at T_hint (run.py LOWER_PROB 0.05)
    hint_high: float = 0.95  # p_t at step 0 (run.py UPPER_PROB 0.95)
    hint_decay_steps: int = 300  # T_hint: rollout steps with a hint, none after (run.py T_hint 300 of T 500)
    hint_chunks: int = 5  # the demonstration's steps are cut into min(this, #steps) chunks (rl_dataset.py min(5, len(hint)))
    hint_split: str = "auto"  # regex: a step ends after each match; auto: after '. ', '.\t' and newlines (every official hint list), embedded: after ','
    hint_end: Optional[str] = "auto"  # regex: the hint stops before its first match (the answer the policy still writes); auto: '#' on the embedded task, else none


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
RECIPES = {
    # tiny model after SFT to ~0.5 held-out, 2-core CPU: 40 tokens, 32 prompts x 8, T 0.7 (T 1.0: the sampling tail
    # held the reward down), lr 5e-5 (1e-4 was noisier), 80 steps; 512 held-out problems: 0.05 mean@4 gain > 3 SE
    "embedded": dict(max_prompt_length=64, max_new_tokens=40, lr=5e-5, warmup_steps=10, max_steps=80,
                     prompts_per_step=32, temperature=0.7, eval_every=20, eval_size=512, eval_samples=4,
                     eval_temperature=0.7, hint_decay_steps=48),  # UFT: the official T_hint / T = 300 / 500 of the demo's 80 steps
}
OFFICIAL_SPLIT = r"(?<=\.[ \t])|(?<=\n)"  # UFT: every official hint list (data/{math,countdown,kk_logic}) from its text


def uft_loss(logp, old_logp, advantages, mask, normalizer, *, hint_logp=None, hint_mask=None, hint_normalizer=None,
             hint_coef=0.001, ref_logp=None, entropy=None, eps_low=0.2, eps_high=0.2, dual_clip=None,
             log_ratio_clamp=None, beta=0.001, kl_estimator="k3", entropy_coef=0.001, loss_agg="token_mean",
             max_len=None, clip_mode="ppo", gppo_beta_low=1.0, gppo_beta_high=1.0):
    """logp, old_logp, ref_logp, entropy, mask: (B, T) per completion token; advantages: (B,) or (B, T).
    normalizer: `normalizer_count(mask, loss_agg)` over the optimizer step, all ranks, / world size (tokens for
    token_mean, sequences otherwise); max_len: the constant L_max of seq_mean_token_sum_norm. UFT: hint_logp, hint_mask
    (B, T) on the hint tokens; hint_normalizer: the step's hint tokens, all ranks, / world size. Returns (loss, metrics)."""
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
    if hint_coef and hint_mask is not None:  # UFT: NLL of the hint tokens, a token mean over the step's hint tokens
        nll = -(hint_logp * hint_mask).sum()
        loss = loss + hint_coef * nll / torch.as_tensor(hint_normalizer, dtype=nll.dtype).clamp(min=1e-6)
        metrics["hint_nll"] = nll.detach() / hint_mask.sum().clamp(min=1)
    return loss, metrics


def hint_steps(text, split=OFFICIAL_SPLIT, end=None):
    """`text` cut before the first match of `end`, then into steps after every match of `split` (joined: the hint)."""
    m = re.search(end, text) if end else None
    text = text[:m.start()] if m else text
    cuts = sorted({m.end() for m in re.finditer(split, text)} - {0, len(text)})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])] if text else []


def sample_hint(n_steps, t, key, schedule="cosine", low=0.05, high=0.95, horizon=300, max_chunks=5):
    """sep_k, the steps of an n_steps demonstration revealed at rollout step t (official RLHFDataset.__getitem__):
    cosine k ~ Binomial(m, p_t), stage k = m - t // (horizon // (m + 1)), uniform (R3) k uniform in 0..m, ignoring
    `horizon`. Its own RNG seeded by `key` (seed, step, sample): a resumed run draws the same hints."""
    if n_steps == 0 or (t > horizon and schedule != "uniform"):  # no hint after T_hint (R3: always one)
        return 0
    m = min(max_chunks, n_steps)
    sep = [round(i / m * n_steps) for i in range(m)] + [n_steps]
    if schedule == "uniform":
        return int(np.random.default_rng(key).choice(sep))
    if schedule == "stage":  # max(.., 1): the official code divides by 0 when T_hint < m + 1
        return sep[int(np.clip(m - t // max(horizon // (m + 1), 1), 0, m))]
    p = low + 0.5 * (high - low) * (1 + math.cos(math.pi * t / horizon))  # p_t, t = the official dataset.timestep
    return sep[int((np.random.default_rng(key).random(m) < p).sum())]


def check_hint_args(a):
    """UFT's flags, checked before any work: a common.UserError naming the problem and the fix."""
    if min(a.hint_coef, a.hint_low, a.hint_high) < 0 or max(a.hint_low, a.hint_high) > 1 or min(
            a.hint_decay_steps, a.hint_chunks) < 1:
        raise common.UserError("need --hint-coef >= 0, --hint-low and --hint-high in [0, 1], --hint-decay-steps and "
                               "--hint-chunks >= 1; change the offending flag")
    for name in {"stage": ["hint_low", "hint_high"], "uniform": ["hint_low", "hint_high", "hint_decay_steps"]}.get(
            a.hint_schedule, []):
        if name in a._explicit:  # inert: the schedule does not read it
            raise common.UserError(f"--{name.replace('_', '-')} acts only with --hint-schedule cosine (or stage)")
    for name in ("hint_split", "hint_end"):
        try:
            re.compile(getattr(a, name) or "")
        except re.error as e:  # one line, not a traceback from the data loading
            raise common.UserError(f"--{name.replace('_', '-')}: {e}; give a Python regular expression") from None


def overlong_penalty(length, max_len, buffer, penalty):
    """DAPO Eq. 13: 0 up to max_len - buffer, then linear down to -penalty at max_len."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_len - buffer)) / buffer * penalty, 0.0)


def main():
    args = common.parse_args(Args, presets={"preset": PRESETS, "recipe": RECIPES})
    check_hint_args(args)  # UFT
    if args.dry_run:  # resolved recipe with sources, batch and memory estimate; loads nothing
        return common.dry_run(args, frozen=[args.model] if args.beta > 0 else [])  # the reference model
    # 1. setup: process group, output directory, tokenizer, prompts and reward
    d = common.setup_distributed(args.seed, args.dist_timeout)
    out = common.prepare_output_dir(args, d)
    model_path = data.resolve_model(args.model, d)
    tokenizer = data.load_tokenizer(model_path, args.trust_remote_code, args.chat_template)
    data.check_context(model_path, args.max_prompt_length + args.max_new_tokens,
                         f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}")
    reward_fn = rollout.get_reward_fn(args.reward, args.reward_weights, args.answer_format, args.dataset)
    rows, eval_rows = data.load_train_eval(args, need_response=True, embedded_split="rl")  # UFT: demonstrations
    emb = args.dataset == "embedded"  # UFT: the demonstration's steps, the hint's text at full reveal
    split, end = [(auto if v == "auto" else v) for v, auto in ((args.hint_split, r"(?<=,)" if emb else OFFICIAL_SPLIT),
                                                               (args.hint_end, "#" if emb else None))]
    train = [dict(e, hint_steps=hint_steps(e["response"], split, end)) for e in data.tokenize_examples(
        tokenizer, rows, args.max_prompt_length + args.max_new_tokens, args.system_prompt, True, print)]  # UFT
    fits = [e for e in train if len(e["prompt_ids"]) + len(tokenizer("".join(e["hint_steps"]), add_special_tokens=False)[
        "input_ids"]) <= args.max_prompt_length]  # UFT: --max-prompt-length bounds prompt + hint (official)
    if len(fits) < len(train):
        print(f"[uft] dropped {len(train) - len(fits)} of {len(train)} prompts: prompt + full hint > --max-prompt-length")
    if not fits:
        raise common.UserError(f"no prompt + full hint fits --max-prompt-length {args.max_prompt_length}; raise it")
    train = fits  # UFT
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
    log.print(f"[{log.name}] {len(train)} prompts with demonstrations, {len(evalset)} held-out, G={G}, world size "
              f"{d.world_size}, start step {start}" + (f" (resumed from {ckpt.name})" if ckpt else ""))
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
            # UFT: each prompt's hint (its first k demonstration steps, tokenised alone as the official code) joins
            # its prompt ids, for its G rollouts
            k = [sample_hint(len(e["hint_steps"]), step, (args.seed, step, tries, d.rank, j), args.hint_schedule,
                             args.hint_low, args.hint_high, args.hint_decay_steps, args.hint_chunks)
                 for j, e in enumerate(batch)]
            batch = [dict(e, prompt_ids=e["prompt_ids"] + h, hint_len=len(h), hint_frac=n / max(len(e["hint_steps"]), 1))
                     for e, n in zip(batch, k) for h in [tokenizer("".join(e["hint_steps"][:n]),
                                                                   add_special_tokens=False)["input_ids"] if n else []]]
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
        seqs = [(s["example"]["prompt_ids"], s["completion"]) for s in samples]
        full = data.collate(seqs, tokenizer.pad_token_id, d.device)
        if args.mask_truncated:
            full["loss_mask"] *= torch.tensor([float(s["finished"]) for s in samples], device=d.device)[:, None]
        full["advantages"] = adv.to(d.device)
        ends = torch.tensor([[len(s["example"]["prompt_ids"]), s["example"]["hint_len"]] for s in samples]).T[..., None]
        ar = torch.arange(full["loss_mask"].shape[1])  # UFT: hint_mask, the hint tokens at the end of each prompt
        full["hint_mask"] = ((ar >= ends[0] - ends[1]) & (ar < ends[0])).float().to(d.device)

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
            for mini in torch.arange(n_local).chunk(args.steps_per_generation):
                mbs = [{name: v[idx] for name, v in full.items()} for idx in mini.chunk(args.grad_accum)]
                normalizer = common.all_reduce(
                    sum(normalizer_count(b["loss_mask"], args.loss_agg) for b in mbs)) / d.world_size
                hint_normalizer = common.all_reduce(sum(b["hint_mask"].sum() for b in mbs)) / d.world_size  # UFT
                for micro, b in enumerate(mbs):
                    with common.no_sync(model, micro == len(mbs) - 1), autocast:
                        o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], args.temperature, True,
                                  prompt_mask=b["hint_mask"] if args.hint_coef else None)  # UFT: hint log-probs too
                        old = b["old_logp"] if recompute_old else o["logp"].detach()
                        loss, m = uft_loss(
                            o["logp"], old, b["advantages"], b["loss_mask"], normalizer, ref_logp=b.get("ref_logp"),
                            entropy=o["entropy"], eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                            dual_clip=args.dual_clip, log_ratio_clamp=args.log_ratio_clamp, loss_agg=args.loss_agg,
                            kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef, max_len=args.max_new_tokens,
                            hint_logp=o.get("prompt_logp"), hint_mask=b["hint_mask"], hint_normalizer=hint_normalizer,  # UFT
                            hint_coef=args.hint_coef,
                            clip_mode=args.clip_mode, gppo_beta_low=args.gppo_beta_low,
                            gppo_beta_high=args.gppo_beta_high)
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
        metrics["train/hint_frac"] = sum(s["example"]["hint_frac"] for s in samples) / len(samples)  # UFT
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
