"""ReLIFT: "Learning What Reinforcement Learning Can't: Interleaved Online Fine-Tuning for Hardest Questions"
(arXiv 2506.07527, ICLR 2026). A diff of grpo.py: GRPO as released, plus a buffer of the hardest questions (every
rollout failed) with their demonstrations; whenever it holds M, one fine-tuning step on the newest M.

Objective (ReLIFT's trainer.py, actor.py, core_algos.py; the paper via summaries), A_i = R_i - mean_G R (no std):
    RL step, as released:   L_RL = sum_{i,t} -A_i r_it / (T_max x sequences) - c_H mean_t H_t   (no clip)
    hardest questions:      B <- [(q, y*_q) for q with sum_{i<=G} R_i(q) = 0] + B        (newest first)
    fine-tuning, |B| >= M:  L_FT = -(1/|S|) sum_{s in S} log pi_theta(s) - alpha (1/|S|) sum_{s in S} H(pi_theta(.|s<))
                            on the newest M demonstrations' tokens S (+ EOS), one step of a SEPARATE AdamW

Differs from grpo.py by:
- RL defaults of the ReLIFT scripts (examples/math-7b/train.sh, relift_trainer.yaml), each a flag: --scale-rewards
  none (paper: std), --no-clip (paper and train_rl.sh clip: --clip), --loss-agg seq_mean_token_sum_norm with T_max
  = --max-new-tokens 8192, --entropy-coef 0.001 (token mean), --max-grad-norm 0.7, 128 prompts x 8, two optimizer
  steps per rollout batch, lr 1e-6 constant; --preset relift_paper gives the paper's clipped, std-normalised form;
- relift_rl_loss (grpo_loss without clip + a token-mean entropy bonus), relift_sft_loss, HardestBuffer;
- step 6b: the buffer and the fine-tuning step, after the RL update (trainer.py fit). Every rank holds the same
  buffer (indices gathered by one all-reduce), so all fire together, each on its share of the M examples; the buffer
  and both optimizers are checkpointed and restored by --resume.

Checked against TheRoadQaQ/ReLIFT @ eb95454. Deviations: the PG sum / (T_max x sequences of the step) (verl: / T_max
per micro-batch, then averaged); the fine-tuning loss is a token mean over the step and all ranks (the code's is
1/dp of that under DDP); "all failed" is max reward <= 0 (code: = 0). alpha: the code's 1e-3 (paper: 1e-4 best).

Run:
    python methods/relift.py                        # from a weak SFT warm start of the embedded tiny model (CPU)
    python methods/relift.py --preset relift_paper  # clipped, std-normalised GRPO as the paper writes it
    torchrun --nproc_per_node 8 methods/relift.py --recipe paper
"""
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
    max_new_tokens: int = 8192  # completion length and T_max of the PG normaliser (ReLIFT scripts)
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
    prompts_per_step: int = 128  # prompts per rollout step, all ranks (ReLIFT train.sh train_batch_size)
    num_generations: int = 8  # G, completions per prompt (TRL default; Dr. GRPO, LUFFY)
    steps_per_generation: int = 2  # optimizer steps per rollout batch (ReLIFT: 128 / ppo_mini_batch_size 64)
    num_iterations: int = 1  # passes over each rollout batch, mu (DeepSeekMath, TRL default 1)
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    lr: float = 1e-6  # ReLIFT train.sh, constant
    beta1: float = 0.9  # torch/verl AdamW default
    beta2: float = 0.999  # torch/verl AdamW default
    weight_decay: float = 0.01  # verl actor optim default
    warmup_steps: int = 0  # linear warmup, then constant (verl; DAPO paper uses 20)
    max_grad_norm: float = 0.7  # RL steps (ReLIFT train.sh; its RL baseline train_rl.sh: 1.0)
    temperature: float = 1.0  # sampling temperature; log-probs use logits / temperature (TRL, verl)
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    scale_rewards: Literal["group", "batch", "none"] = "none"  # ReLIFT grpo_use_std=False (paper: group std)
    adv_eps: float = 1e-6  # verl (TRL: 1e-4)
    clip: bool = False  # PPO clipping of the ratio (ReLIFT loss_remove_clip=True; paper and train_rl.sh: --clip)
    eps_low: float = 0.2  # PPO clip, ratio >= 1 - eps_low (DeepSeekMath, TRL, verl)
    eps_high: float = 0.2  # PPO clip, ratio <= 1 + eps_high (DAPO clip-higher: 0.28)
    dual_clip: Optional[float] = None  # cap -A*c on the loss where A<0 (off in TRL; verl clip_ratio_c 3.0)
    log_ratio_clamp: Optional[float] = None  # |log pi/pi_old| cap before exp (ReLIFT core_algos: none; verl 20)
    clip_mode: Literal["ppo", "gppo"] = "ppo"  # gppo: clipped tokens keep a bounded gradient (Klear-Reasoner GPPO, KlearReasoner core_algos.py compute_gppo_loss)
    gppo_beta_low: float = 1.0  # GPPO beta1: gradient scale of A<0, ratio<1-eps_low tokens (Klear README: beta1 = beta2 = 1 for Klear-Reasoner-8B; yaml gppo_loss_beta1 0.25)
    gppo_beta_high: float = 1.0  # GPPO beta2: gradient scale of A>0, ratio>1+eps_high tokens (Klear README, compute_gppo_loss_general_beta)
    beta: float = 0.0  # KL coefficient (TRL default 0.0; DeepSeekMath 0.04)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # DeepSeekMath uses k3; k2 has the reverse-KL gradient
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_sum_norm"  # ReLIFT loss_remove_token_mean: sum / L_max
    mask_truncated: bool = False  # drop completions without EOS from the loss (DAPO overlong filtering; TRL)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal and generate more
    max_gen_batches: int = 4  # DAPO dynamic sampling: rollout batches tried per step before going on
    overlong_buffer_ratio: float = 0.0  # DAPO overlong shaping: last fraction of max_new_tokens penalised (4096/20480)
    overlong_penalty: float = 1.0  # DAPO: penalty at the hard limit
    entropy_coef: float = 0.001  # entropy bonus, a token mean (ReLIFT train.sh entropy_coeff)
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
    # --- ReLIFT fine-tuning on the hardest questions ---
    sft_buffer_size: int = 128  # M: fine-tune once the buffer holds M hardest questions (sft_data_size; -1: plain RL)
    sft_entropy_coef: float = 1e-3  # alpha, entropy bonus of the fine-tuning loss (code 1e-3; paper's best 1e-4)
    sft_lr: Optional[float] = None  # lr of the separate fine-tuning AdamW (None: --lr; code: both 1e-6)
    sft_max_grad_norm: float = 1.0  # grad clip of the fine-tuning step (relift_trainer.yaml sft_grad_clip)
    sft_micro_batch_size: int = 4  # demonstrations per micro-batch and rank (Math-7B train.sh; 2 for the others)


PRESETS = {
    "grpo": dict(scale_rewards="group", loss_agg="seq_mean_token_mean", eps_high=0.2, beta=0.04, kl_estimator="k3",
                 source="DeepSeekMath §4.2"),
    "dr_grpo": dict(scale_rewards="none", loss_agg="seq_mean_token_sum_norm", eps_high=0.2, beta=0.0,
                    source="Dr. GRPO §3.2, oat code"),
    "dapo": dict(scale_rewards="group", loss_agg="token_mean", eps_high=0.28, beta=0.0, dynamic_sampling=True,
                 overlong_buffer_ratio=0.2, source="DAPO §3: clip-higher, token-level loss, filtering, 4096 of 20480"),
    "relift_paper": dict(clip=True, scale_rewards="group", source="the ReLIFT paper writes clipped GRPO, std A"),
    "gppo": dict(clip_mode="gppo", clip=True, eps_low=0.2, eps_high=0.28, dual_clip=10.0, scale_rewards="group",
                 loss_agg="token_mean", beta=0.0, source="Klear-Reasoner (arXiv 2508.07629): clip 0.2/0.28, c 10, no KL"),
}
RECIPES = {
    # tiny model after SFT to ~0.5 held-out, 2-core CPU: 40 tokens, 32 prompts x 8, T 0.7 (T 1.0: the sampling tail
    # held the reward down), lr 5e-5 (1e-4 was noisier), 80 steps; 512 held-out problems: 0.05 mean@4 gain > 3 SE
    "embedded": dict(max_prompt_length=64, max_new_tokens=40, lr=5e-5, warmup_steps=10, max_steps=80,
                     prompts_per_step=32, temperature=0.7, eval_every=20, eval_size=512, eval_samples=4,
                     eval_temperature=0.7, sft_buffer_size=16, steps_per_generation=1),  # ReLIFT demo: M = 16 fills every 1-2 steps
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


def relift_rl_loss(logp, old_logp, advantages, mask, normalizer, *, entropy, token_normalizer, clip=False,
                   eps_low=0.2, eps_high=0.2, dual_clip=None, log_ratio_clamp=None, ref_logp=None, beta=0.0,
                   kl_estimator="k3", entropy_coef=1e-3, loss_agg="seq_mean_token_sum_norm", max_len=None,
                   clip_mode="ppo", gppo_beta_low=1.0, gppo_beta_high=1.0):
    """The RL step as released: clip=False gives -A r per token (loss_remove_clip=True). logp, old_logp, entropy, mask:
    (B, T); advantages: (B,). token_normalizer: the step's tokens / world size (the entropy bonus is a token mean)."""
    if not clip:  # an infinite clip range leaves the ratio as it is
        eps_low, eps_high, dual_clip = float("inf"), float("inf"), None
    pg, metrics = grpo_loss(logp, old_logp, advantages, mask, normalizer, ref_logp=ref_logp, eps_low=eps_low,
                            eps_high=eps_high, dual_clip=dual_clip, log_ratio_clamp=log_ratio_clamp, beta=beta,
                            kl_estimator=kl_estimator, loss_agg=loss_agg, max_len=max_len,
                            clip_mode=clip_mode, gppo_beta_low=gppo_beta_low, gppo_beta_high=gppo_beta_high)
    ent = aggregate(entropy, mask, "token_mean", token_normalizer)  # mean entropy of the step's tokens
    return pg - entropy_coef * ent, metrics


def relift_sft_loss(logp, mask, normalizer, *, entropy, entropy_coef=1e-3):
    """The fine-tuning step (actor.py compute_sft_loss): NLL - alpha x entropy, token means over the demonstration
    tokens S of the step (normalizer: |S| over all ranks / world size). logp, entropy (with its gradient), mask: (B, T)."""
    nll = aggregate(-logp, mask, "token_mean", normalizer)  # (1/|S|) sum -log pi_theta(s)
    ent = aggregate(entropy, mask, "token_mean", normalizer)  # (1/|S|) sum H(pi_theta(. | s<))
    return nll - entropy_coef * ent, {"sft_nll": nll.detach(), "sft_entropy": ent.detach()}


class HardestBuffer:
    """ReLIFT's buffer of hardest questions (trainer.py fit), newest first: `take` returns the newest `size` entries
    once it holds `size` and keeps the rest, else None; size <= 0 never fires (sft_data_size=-1: plain RL)."""

    def __init__(self, size, entries=()):
        self.size, self.entries = size, list(entries)

    def add(self, new):
        self.entries = list(new) + self.entries

    def take(self):
        if self.size <= 0 or len(self.entries) < self.size:
            return None
        batch, self.entries = self.entries[:self.size], self.entries[self.size:]
        return batch


def demonstration(tokenizer, text, max_tokens):
    """Response ids of a fine-tuning example: the dataset's demonstration cut to max_tokens, then EOS (trainer.py
    replace_response_in_batch; the scripts cut at the 8192-token response length)."""
    return tokenizer(str(text), add_special_tokens=False)["input_ids"][:max_tokens] + [tokenizer.eos_token_id]


def overlong_penalty(length, max_len, buffer, penalty):
    """DAPO Eq. 13: 0 up to max_len - buffer, then linear down to -penalty at max_len."""
    if buffer <= 0:
        return 0.0
    return min(-(length - (max_len - buffer)) / buffer * penalty, 0.0)


def main():
    args = common.parse_args(Args, presets={"preset": PRESETS, "recipe": RECIPES})
    if args.dry_run:  # resolved recipe with sources, batch and memory estimate; loads nothing
        return common.dry_run(args, frozen=[args.model] if args.beta > 0 else [])  # the reference model
    # 1. setup: process group, output directory, tokenizer, prompts and reward
    d = common.setup_distributed(args.seed, args.dist_timeout)
    if args.sft_buffer_size != -1 and (args.sft_buffer_size < 1 or args.sft_buffer_size % d.world_size):  # ReLIFT
        raise common.UserError(f"--sft-buffer-size {args.sft_buffer_size} must be -1 (plain RL) or a positive "
                               f"multiple of the world size {d.world_size} (every rank fine-tunes on an equal share)")
    out = common.prepare_output_dir(args, d)
    model_path = data.resolve_model(args.model, d)
    tokenizer = data.load_tokenizer(model_path, args.trust_remote_code, args.chat_template)
    data.check_context(model_path, args.max_prompt_length + args.max_new_tokens,
                         f"--max-prompt-length {args.max_prompt_length} + --max-new-tokens {args.max_new_tokens}")
    reward_fn = rollout.get_reward_fn(args.reward, args.reward_weights, args.answer_format, args.dataset)
    rows, eval_rows = data.load_train_eval(args, need_response=True, embedded_split="rl")  # ReLIFT: demos
    train = data.tokenize_examples(tokenizer, rows, args.max_prompt_length, args.system_prompt, False, print)
    for i, e in enumerate(train):
        e["index"] = i  # ReLIFT: the buffer holds dataset indices (json-able, the same on every rank)
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
    # ReLIFT: a separate AdamW with its own moments for the fine-tuning steps (fsdp_worker.py actor_sft_optimizer)
    sft_optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr if args.sft_lr is None else args.sft_lr,
                                      betas=(args.beta1, args.beta2), weight_decay=args.weight_decay, fused=True)
    buffer, n_sft = HardestBuffer(args.sft_buffer_size), 0
    start, tokens_seen, ckpt = 0, 0, common.latest_checkpoint(args)
    if ckpt:
        state = common.load_checkpoint(ckpt, model, [optimizer, sft_optimizer], [scheduler], d)
        start, tokens_seen = state["step"], state["tokens"]
        buffer.entries, n_sft = state["buffer"], state["sft_steps"]  # ReLIFT: restore the buffer
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
                token_normalizer = common.all_reduce(sum(b["loss_mask"].sum() for b in mbs)) / d.world_size  # ReLIFT
                for micro, b in enumerate(mbs):
                    with common.no_sync(model, micro == len(mbs) - 1), autocast:
                        o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], args.temperature, True)
                        old = b["old_logp"] if recompute_old else o["logp"].detach()
                        loss, m = relift_rl_loss(
                            o["logp"], old, b["advantages"], b["loss_mask"], normalizer, ref_logp=b.get("ref_logp"),
                            entropy=o["entropy"], eps_low=args.eps_low, eps_high=args.eps_high, beta=args.beta,
                            dual_clip=args.dual_clip, log_ratio_clamp=args.log_ratio_clamp, loss_agg=args.loss_agg,
                            kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef, max_len=args.max_new_tokens,
                            clip=args.clip, token_normalizer=token_normalizer,  # ReLIFT
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
        # 6b. ReLIFT: all-failed prompts join the buffer; once it holds M, one fine-tuning step on the newest M
        failed = [max(s["reward"] for s in g) <= 0 for g in groups]
        hard = torch.zeros(d.world_size, len(groups), dtype=torch.long, device=d.device)  # dataset index + 1
        for j, g in enumerate(groups):
            if failed[j] and g[0]["example"].get("response"):
                hard[d.rank, j] = g[0]["example"]["index"] + 1
        hard = common.all_reduce(hard).t().flatten()  # every rank, global prompt order (rank r has prompts r, r+W, ..)
        buffer.add([int(i) - 1 for i in hard.tolist() if i > 0])
        sft_batch, sft_metrics = buffer.take(), {}
        if sft_batch is not None:
            mine = sft_batch[d.rank::d.world_size]  # this rank's share of the newest M
            demos = [(train[i]["prompt_ids"], demonstration(tokenizer, train[i]["response"], args.max_new_tokens))
                     for i in mine]
            sft_mbs = [data.collate(demos[i:i + args.sft_micro_batch_size], tokenizer.pad_token_id, d.device)
                       for i in range(0, len(demos), args.sft_micro_batch_size)]
            sft_normalizer = common.all_reduce(sum(b["loss_mask"].sum() for b in sft_mbs)) / d.world_size
            for micro, b in enumerate(sft_mbs):
                with common.no_sync(model, micro == len(sft_mbs) - 1), autocast:
                    o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], 1.0, True)  # temperature 1 (code)
                    sft_loss, sm = relift_sft_loss(o["logp"], b["loss_mask"], sft_normalizer, entropy=o["entropy"],
                                                   entropy_coef=args.sft_entropy_coef)
                    sft_loss.backward()
                for key, v in {"sft_loss": sft_loss.detach(), **sm}.items():
                    sft_metrics[f"train/{key}"] = sft_metrics.get(f"train/{key}", 0.0) + v
            norm, stepped = common.optimizer_step(model, sft_optimizer, None, step, sft_metrics["train/sft_loss"],
                                                  args.sft_max_grad_norm, args.skip_nonfinite)
            sft_metrics["train/sft_grad_norm"], n_sft = norm, n_sft + stepped

        # 7. push the new weights into the generator
        if engine:
            engine.push(model)

        # 8. log, evaluate, checkpoint
        tokens_seen += int(full["attention_mask"].sum())
        metrics = {f"train/{name}": v / n_opt for name, v in stats.items()}
        metrics.update(rollout.rollout_metrics(samples, rewards, G, full.get("old_logp") if engine else None))
        metrics.update({"perf/gen_time": t_gen, "perf/train_time": common.timer() - t0 - t_gen, **reward_fn.metrics()})
        metrics.update({"train/buffer_size": len(buffer.entries), "train/sft_steps": n_sft,
                        "train/frac_hardest": sum(failed) / len(groups), **sft_metrics})  # ReLIFT
        metrics = common.reduce_metrics(metrics, d.device)
        metrics.update({"perf/tokens": tokens_seen * d.world_size,
                        "perf/peak_memory_mb": common.peak_memory_mb(d.device)})
        log.log(step, metrics, advance=1)
        if step == args.max_steps or args.eval_every and step % args.eval_every == 0:  # what the model writes
            rollout.log_completions(log, step, tokenizer, samples, adv)
        if args.eval_every and step % args.eval_every == 0 and step != args.max_steps:
            run_eval(step)
        if args.save_every and step % args.save_every == 0:
            common.save_checkpoint(out, step, model, tokenizer, [optimizer, sft_optimizer], [scheduler],
                                   {"tokens": tokens_seen, "buffer": buffer.entries, "sft_steps": n_sft}, d,
                                   args.keep_last)  # ReLIFT: the buffer and both optimizers

    # 9. final evaluation and model
    acc = run_eval(args.max_steps)
    common.save_checkpoint(out, args.max_steps, model, tokenizer, [optimizer, sft_optimizer], [scheduler],
                           {"tokens": tokens_seen, "buffer": buffer.entries, "sft_steps": n_sft}, d, name="final")
    log.print(f"[{log.name}] done: {rollout.score_str(acc)}, peak memory {common.peak_memory_mb(d.device):.0f} MB")
    log.close()
    del model, optimizer, sft_optimizer, engine
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
