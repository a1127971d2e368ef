"""OTR: One-Token Rollout (Ming et al., "One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy
Gradient", arXiv 2509.26313). Every next-token prediction of a demonstration is a one-step RL episode.

Objective (paper Eq. 5-8 as quoted by its ICLR-2026 reviews and a third-party implementation; see the spec):
    at each response position t, with s_t = (x, y_<t) and the ground-truth token y_t,
    draw a_1..a_K i.i.d. from the exploration policy  pi'(.|s_t) = softmax(logits / kappa)   (no gradient)
    reward  R(a) = 1 if a == y_t else beta   (beta < 1; stop-gradient, no baseline, no importance correction)
    L_t = -(1/K) sum_j R(a_j) log pi_theta(a_j | s_t)        (log-probs at temperature 1)
    L(theta) = mean over sequences of (1/T_i) sum_t L_t      (seq_mean_token_mean, the paper's 1/T form)
--exact replaces the K draws by their expectation (reviewer 2's closed form, kernels.expected_reward_logprob):
    L_t = -sum_a w(a) log pi_theta(a | s_t),   w(a) = pi'(a) R(a)
with the same expected gradient and no sampling noise. With kappa = 1 the expected gradient is (1 - beta) times
DFT's (methods/dft.py): OTR is then DFT with a scaled learning rate, plus Monte-Carlo noise.

Differs from sft.py by:
- otr_loss: the per-token loss above instead of -log p; train/nll is still the plain NLL of the demonstration, and
  train/frac_draws_gt the fraction of draws equal to it (--exact: its expectation pi'(y_t));
- otr_head: the fused head draws K tokens per position from softmax(logits / kappa) chunk by chunk
  (kernels.sample_tokens, a generator seeded from (seed, step, rank, micro-batch): reproducible and resumable), then
  scores them with fused_logprobs in the same forward (no (B, T, V) logits);
- --loss-agg: seq_mean_token_mean (paper, default) or token_mean (third-party implementation);
- the OTR flags; the embedded default starts from the SFT warm start (embedded:warm) at lr 2e-4, as dft.py.
No official code was found. Paper values: K = 256 (reviewers), kappa = 1.3 (example value); the paper's beta was NOT
found: -0.1 comes from a third-party implementation (an axolotl-style loss patch citing Eq. 8/9, which also uses
K = 8 and kappa = 1.2). The paper trains OTR with the SFT baseline's settings, so the defaults are sft.py's.
Deviation: the ground-truth token is not forced into the draws (reviewer 4: the reward is the fraction of draws that
match; the third-party code does not insert it either).

Run:
    python methods/otr.py                                          # embedded tiny model (SFT warm start), CPU
    python methods/otr.py --exact                                  # closed-form expectation, no sampling
    torchrun --nproc_per_node 8 methods/otr.py --model Qwen/Qwen2.5-Math-1.5B --dataset AI-MO/NuminaMath-CoT \
        --prompt-column problem --response-column solution --answer-column solution --max-length 2048 \
        --batch-size 256 --grad-accum 8 --bf16 --reward math
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
from kernels.advantage import aggregate, normalizer_count  # noqa: E402
from kernels.engine import FusedLM  # noqa: E402
from kernels.logprob import expected_reward_logprob, fused_logprobs, sample_tokens  # noqa: E402


@dataclass
class Args:
    # --- model and data (identical in every file of the family) ---
    model: str = "embedded:warm"  # hub name, local directory, or embedded:warm (tiny model after a short SFT: OTR needs a prior)
    dataset: str = "embedded"  # hub name, local .json/.jsonl/.parquet/.csv, or embedded (arithmetic task)
    dataset_split: str = "train"  # split of a hub dataset
    dataset_config: Optional[str] = None  # configuration (subset) name of a hub dataset (load_dataset's second argument)
    prompt_column: str = "prompt"  # dataset column with the question
    response_column: str = "response"  # dataset column with the demonstration
    answer_column: str = "answer"  # dataset column with the checkable final answer (for evaluation)
    system_prompt: Optional[str] = None  # prepended as a system message through the chat template
    chat_template: Optional[str] = None  # a Jinja chat template (a file, or the template text) set over the tokenizer's
    max_length: int = 2048  # prompt + response tokens; longer examples are skipped and counted (DFT paper)
    num_demos: Optional[int] = None  # use only the first N demonstrations (all by default)
    eval_dataset: Optional[str] = None  # held-out set; default: embedded eval split, or --eval-size rows of --dataset drawn at random (fixed seed)
    eval_size: int = 256  # held-out examples (the first N of --eval-dataset or of the embedded eval split, or N random rows of --dataset, held out from training); 0: no held-out evaluation
    eval_samples: int = 0  # also log mean@k: k samples per held-out prompt at --eval-temperature (DFT avg@16, DAPO avg@32); 0: greedy only
    eval_temperature: float = 1.0  # sampling temperature of the mean@k evaluation (DFT, DAPO: 1.0)
    reward: str = "auto"  # auto (exact on embedded, else math), exact (string match), math (math-verify) or FILE.py:FUNCTION; comma-separated for several
    reward_weights: Optional[str] = None  # comma-separated weights of the --reward entries (TRL reward_weights); default 1 each
    answer_format: Literal["auto", "boxed", "answer_line", "hash", "last_number"] = "auto"  # where a completion's answer is read: last \boxed{}, last 'Answer:' line (DAPO), after '#', last number; auto: the dataset's (embedded: hash, presets: boxed or answer_line), for your own file boxed, else Answer:, else #, else last number
    max_new_tokens: int = 64  # evaluation generation length
    recipe: Optional[str] = "auto"  # embedded (auto with --model embedded*): settings for the tiny CPU demo; the papers': recipes/<this file's name>.py
    # --- optimisation ---
    max_steps: int = 400  # optimizer steps (DFT paper: 1 epoch of 100k at batch 256 = 390 steps)
    stop_at_accuracy: Optional[float] = None  # stop at the first held-out evaluation (every --eval-every steps) whose greedy accuracy reaches this; --max-steps is the cap (how the cached embedded:warm is built)
    batch_size: int = 256  # sequences per optimizer step, all ranks and micro-batches (DFT paper)
    grad_accum: int = 1  # micro-batches per optimizer step and rank
    lr: float = 5e-5  # DFT paper §4.1.1 (2e-5 for LLaMA-3.1-8B)
    beta1: float = 0.9  # DFT code sft_trainer.yaml
    beta2: float = 0.95  # DFT code sft_trainer.yaml
    weight_decay: float = 0.01  # DFT code sft_trainer.yaml
    warmup_ratio: float = 0.1  # DFT code sft_trainer.yaml
    max_grad_norm: float = 1.0  # DFT code sft_trainer.yaml
    loss_agg: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean"  # OTR paper: 1/T per sequence, then mean; third-party code: token_mean
    # --- runtime (identical in every file) ---
    seed: int = 0  # data order, sampling and initialisation
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weight dtype (fp32 on CPU: bf16 is 2x slower)
    bf16: bool = False  # bf16 autocast on CUDA (DFT paper trains in bf16)
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when world size > 1
    gradient_checkpointing: bool = False  # recompute activations in backward
    fast_paths: bool = True  # RMSNorm kernel + padding-free passes, probe-checked (kernels/engine.py); off: the model as loaded
    trust_remote_code: bool = False  # let transformers run a model repository's own code
    output_dir: Optional[str] = None  # metrics.jsonl, config.json, checkpoints (default: runs/<this file's name>)
    eval_every: int = 100  # steps between held-out evaluations (0: only at start and end)
    save_every: int = 200  # steps between checkpoints (0: only the final model)
    keep_last: Optional[int] = 2  # checkpoints to keep
    resume: bool = False  # continue from the latest complete checkpoint in --output-dir
    overwrite: bool = False  # delete a previous run in --output-dir (with --resume: continue it although flags that change its trajectory differ)
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss or grad norm instead of stopping
    dist_timeout: float = 1800.0  # seconds a collective may wait for another rank before the job stops (torch default 30 min)
    report_to: str = "none"  # also log to: comma-separated tensorboard, wandb, trackio (each when installed; W&B offline: WANDB_MODE=offline), or none
    quiet: bool = False  # no progress bar
    dry_run: bool = False  # print the resolved config with sources, the batch and a memory estimate, then exit (no weights loaded)
    # --- OTR ---
    num_samples: int = 256  # K, tokens drawn per position (OTR paper, via its reviews; third-party code 8)
    kappa: float = 1.3  # exploration temperature of the draws (paper example value; third-party code 1.2)
    beta: float = -0.1  # reward of a draw that is not the ground truth (paper value not found; third-party code)
    exact: bool = False  # closed-form expectation over the vocabulary instead of K draws (same mean gradient)


RANGES = {"num_samples": (lambda v: v >= 1, ">= 1 (draws per position; paper 256)"),  # OTR flags
          "kappa": (lambda v: v > 0, "> 0 (the exploration temperature; paper example 1.3)"),
          "beta": (lambda v: v < 1, "below 1, the reward of the ground truth (here the reward of a wrong draw, "
                                    "e.g. -0.1; not a KL coefficient)")}
RECIPES = {
    # sft.py's steps and batch, from the SFT warm start at dft.py's lr: OTR's expected gradient weights the ground
    # truth by pi'(y_t) (at kappa = 1 it is DFT's), so like DFT it needs a prior (see dft.py)
    # held-out mean@4 at T 0.7 beside greedy, as in the rollout files
    "embedded": dict(max_length=128, batch_size=64, lr=2e-4, max_steps=400, eval_every=100, max_new_tokens=40,
                     eval_size=512, eval_samples=4, eval_temperature=0.7),
}


def otr_loss(logp, mask, normalizer, *, rewards, loss_agg="seq_mean_token_mean"):
    """logp (B,T,K): log pi_theta (temperature 1) of the K tokens drawn at each position; mask (B,T): 1 on response
    tokens (EOS included); rewards (B,T,K): 1 where the draw is the ground truth, beta elsewhere (no gradient).
    --exact passes K = 1: logp = sum_a w(a) log pi_theta(a) (the expectation over the draws) and rewards = 1.
    normalizer: `normalizer_count(mask, loss_agg)` summed over the whole optimizer step (all micro-batches, all
    ranks), divided by the world size (DDP averages gradients). Returns (loss, metrics)."""
    per_tok = -(rewards.detach() * logp).mean(-1)  # (B, T) Eq. 8: -(1/K) sum_j sg(R_j) log pi_theta(a_j)
    loss = aggregate(per_tok, mask, loss_agg, normalizer)
    metrics = {"tokens": mask.sum()}
    return loss, metrics


def otr_head(num_samples, kappa, beta, exact, generator):
    """FusedLM head for OTR. Returns per position: "logp" and "rewards" for otr_loss ((N, K), or (N, 1) with exact),
    "target_logp" (log pi_theta of the ground truth, no gradient, for train/nll) and "hit" (the fraction of draws
    equal to the ground truth; exact: its probability under softmax(logits / kappa))."""
    def head(h, weight, bias, targets):  # h (N, d), weight (V, d), targets (N,)
        with torch.no_grad():  # logging only
            target_logp, _ = fused_logprobs(h.detach(), weight.detach(), targets, bias)  # (N,)
        if exact:  # sum_a w(a) log pi_theta(a), w = pi' R: the expectation of the K-draw term
            logp = expected_reward_logprob(h, weight, targets, kappa, beta, bias)[:, None]  # (N, 1)
            rewards = torch.ones_like(logp)
            with torch.no_grad():
                hit = fused_logprobs(h.detach(), weight.detach(), targets, bias, kappa)[0].exp()  # (N,) pi'(y_t)
        else:
            draws = sample_tokens(h.detach(), weight.detach(), num_samples, kappa, bias, generator)  # (N, K) ~ pi'
            logp, _ = fused_logprobs(h, weight, draws, bias)  # (N, K) at temperature 1: no importance correction
            correct = draws == targets[:, None]  # (N, K)
            rewards = torch.where(correct, 1.0, beta)  # R(a) = 1 for the ground truth, beta otherwise
            hit = correct.float().mean(-1)  # (N,)
        return {"logp": logp, "rewards": rewards, "target_logp": target_logp, "hit": hit}
    return head


def main():
    args = common.parse_args(Args, presets={"recipe": RECIPES}, ranges=RANGES)
    if args.dry_run:  # resolved recipe with sources, batch and memory estimate; loads nothing
        return common.dry_run(args)
    # 1. setup: process group, output directory, tokenizer and data
    d = common.setup_distributed(args.seed, args.dist_timeout)
    out = common.prepare_output_dir(args, d)
    model_path = data.resolve_model(args.model, d)
    tokenizer = data.load_tokenizer(model_path, args.trust_remote_code, args.chat_template)
    data.check_context(model_path, args.max_length, f"--max-length {args.max_length}")
    reward_fn = rollout.get_reward_fn(args.reward, args.reward_weights, args.answer_format, args.dataset)
    rows, eval_rows = data.load_train_eval(args, need_response=True, embedded_split="sft", need_answer=False)
    rows = rows[:args.num_demos] if args.num_demos else rows
    train = data.tokenize_examples(tokenizer, rows, args.max_length, args.system_prompt, log=print)
    evalset = data.tokenize_examples(tokenizer, eval_rows, args.max_length, args.system_prompt, False, log=print, heldout=True)

    # 2. model, optimizer, schedule (FusedLM: the log-softmax over the vocabulary is fused and chunked)
    lm = data.load_model(model_path, args.dtype, args.trust_remote_code, args.gradient_checkpointing, d.device)
    fused = FusedLM(lm, fast=args.fast_paths)  # the one change to model/global state: printed below
    model = common.wrap_model(fused, d, args.fsdp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2),
                                  weight_decay=args.weight_decay, fused=True)  # fused: one kernel for all tensors
    scheduler = common.lr_schedule(optimizer, int(args.warmup_ratio * args.max_steps), args.max_steps, "cosine")
    start, tokens_seen, ckpt = 0, 0, common.latest_checkpoint(args)
    if ckpt:
        state = common.load_checkpoint(ckpt, model, [optimizer], [scheduler], d)
        start, tokens_seen = state["step"], state["tokens"]
    log = common.MetricsLogger(out, d, args.max_steps, start, args.quiet, args.report_to, args)
    log.print(f"[{log.name}] {len(train)} demonstrations, {len(evalset)} held-out, world size {d.world_size}, "
              f"start step {start}" + (f" (resumed from {ckpt.name})" if ckpt else ""))
    log.print(f"[{log.name}] {fused.summary}")
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and d.device.type == "cuda")

    def run_eval(step):  # held-out accuracy (and mean@k), logged with sample completions
        return log.log(step, rollout.eval_metrics(model, tokenizer, evalset, reward_fn, d, args, log=log,
                                                  step=step))

    if start == 0:
        run_eval(0)
    acc, step = None, start  # acc: the evaluation that met --stop-at-accuracy
    for step in range(start + 1, args.max_steps + 1):
        t0 = common.timer()
        # 3. batch: this rank's share of the step, split into micro-batches
        idx = data.batch_indices(len(train), args.batch_size, step - 1, args.seed, d.rank, d.world_size)
        micro = data.split_micro(idx, args.grad_accum)
        mbs = [data.collate([(train[i]["prompt_ids"], train[i]["response_ids"]) for i in mb],
                              tokenizer.pad_token_id, d.device) for mb in micro]
        tokens_seen += sum(len(train[i]["prompt_ids"]) + len(train[i]["response_ids"]) for i in idx)  # host-side count
        # the normalizer counts the whole step (all micro-batches, all ranks) / world size (DDP averages)
        normalizer = common.all_reduce(sum(normalizer_count(b["loss_mask"], args.loss_agg) for b in mbs)) / d.world_size

        # 4. loss and backward, one micro-batch at a time
        stats = {"nll_sum": 0.0, "tokens": 0.0, "loss": 0.0, "hit_sum": 0.0}
        for micro, b in enumerate(mbs):
            with common.no_sync(model, micro == len(mbs) - 1), autocast:
                # OTR: the draws depend only on (seed, step, rank, micro-batch): reproducible, and --resume redraws them
                gen = torch.Generator(d.device).manual_seed(((args.seed * 1_000_003 + step) * 1024 + d.rank) * 64 + micro)
                head = otr_head(args.num_samples, args.kappa, args.beta, args.exact, gen)
                o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], head=head)  # logp, rewards (B, L, K)
                loss, m = otr_loss(o["logp"], b["loss_mask"], normalizer, rewards=o["rewards"], loss_agg=args.loss_agg)
                loss.backward()
            stats["loss"] += loss.detach()
            stats["nll_sum"] += -(o["target_logp"] * b["loss_mask"]).sum()  # plain NLL of the demonstration
            stats["tokens"] += m["tokens"]
            stats["hit_sum"] += (o["hit"] * b["loss_mask"]).sum()

        # 5. optimizer step (a NaN/inf loss or grad norm stops the run or skips the step)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        metrics = common.reduce_metrics({"train/loss": stats["loss"], "train/grad_norm": grad_norm}, d.device)
        if common.nonfinite(step, {"loss": metrics["train/loss"], "grad_norm": metrics["train/grad_norm"]},
                            args.skip_nonfinite):
            optimizer.zero_grad(set_to_none=True)
            log.log(step, {"train/skipped_nonfinite": 1.0}, advance=1)
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 6. log, evaluate, checkpoint
        nll = common.all_reduce(torch.stack([stats["nll_sum"], stats["tokens"], stats["hit_sum"]]).double())
        metrics["train/frac_draws_gt"] = (nll[2] / nll[1]).item()  # OTR
        metrics.update({"train/nll": (nll[0] / nll[1]).item(), "train/lr": scheduler.get_last_lr()[0],
                        "perf/step_time": common.timer() - t0, "perf/tokens": tokens_seen * d.world_size,
                        "perf/peak_memory_mb": common.peak_memory_mb(d.device)})
        log.log(step, metrics, advance=1)
        if args.eval_every and step % args.eval_every == 0 and step != args.max_steps:
            acc = run_eval(step)
            if rollout.reached(acc, args.stop_at_accuracy, log):
                break
            acc = None
        if args.save_every and step % args.save_every == 0:
            common.save_checkpoint(out, step, model, tokenizer, [optimizer], [scheduler],
                                   {"tokens": tokens_seen}, d, args.keep_last)

    # 7. final evaluation (unless the run stopped at one) and model
    acc = acc or run_eval(step)
    common.save_checkpoint(out, step, model, tokenizer, [optimizer], [scheduler],
                           {"tokens": tokens_seen}, d, name="final")
    log.print(f"[{log.name}] done: {rollout.score_str(acc)}, peak memory {common.peak_memory_mb(d.device):.0f} MB")
    log.close()
    del model, optimizer
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
