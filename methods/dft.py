"""DFT: Dynamic Fine-Tuning (Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with
Reward Rectification", arXiv 2508.05629), with ASFT (Anchored SFT, arXiv 2509.23753) as --kl-weight > 0.

Objective (DFT Eq. 9): every token's cross-entropy is scaled by its own probability, with a stop-gradient:
    L_DFT(theta) = E_(x,y)[ - sum_t sg(pi_theta(y_t | x, y_<t)) log pi_theta(y_t | x, y_<t) ]
so the SFT gradient, which carries an implicit 1/pi weight (the importance weight of an RL reading), is rectified.
ASFT (--kl-weight lambda > 0) anchors the policy to the frozen initial model pi_ref with a forward KL over the whole
vocabulary at every response position (zhuchichi56/ASFT train_v2.py, mode="asft"):
    per token  l_t = -sg(p_t) log p_t + lambda KL(pi_ref(.|s_t) || pi_theta(.|s_t))
Aggregation (--loss-agg, as sft.py): token_mean (default; TRL loss_type="dft" and ASFT's code); the paper's Eq. 9 is
a sequence SUM (seq_sum); the official DFT code averages per-micro-batch token means (micro_token_mean).

Differs from sft.py by:
- dft_loss: per-token -sg(p) log p (+ lambda KL); train/nll stays the plain NLL (it may rise: DFT issues #11, #18);
- asft_head: with --kl-weight > 0 a frozen copy of the initial model gives reference hidden states and the fused
  head computes the full-vocabulary KL chunk by chunk (kernels.logprob.full_vocab_kl; no (B, T, V) logits);
- --kl-weight; the embedded default starts from the SFT warm start (embedded:warm) at lr 2e-4: DFT needs a prior.
Defaults are sft.py's (the DFT paper trains SFT and DFT alike, §4.1.1; lr 5e-5). Checked against yongliang-wu/DFT
fsdp_dft_trainer.py (loss * probs.gather(target).detach()) and zhuchichi56/ASFT train_v2.py (F.kl_div(log_softmax(
logits), softmax(ref_logits)).sum(-1), lambda 0.1). Deviations: the reference is a second full copy (ASFT: the
adapter-disabled LoRA model); the KL is fp32 in the fused kernel (ASFT: in the logits' dtype).

Run:
    python methods/dft.py                                          # embedded tiny model (SFT warm start), CPU
    python methods/dft.py --kl-weight 0.1                          # ASFT
    torchrun --nproc_per_node 8 methods/dft.py --model Qwen/Qwen2.5-Math-1.5B --dataset AI-MO/NuminaMath-CoT \
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
from kernels.engine import FusedLM, response_hidden  # noqa: E402
from kernels.logprob import full_vocab_kl, fused_logprobs  # noqa: E402


@dataclass
class Args:
    # --- model and data (identical in every file of the family) ---
    model: str = "embedded:warm"  # hub name, local directory, or embedded:warm (tiny model after a short SFT: DFT needs a prior)
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
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_sum", "micro_token_mean"] = "token_mean"  # TRL dft: global token mean; DFT Eq. 9: seq_sum; DFT code: micro_token_mean
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
    # --- DFT / ASFT ---
    kl_weight: float = 0.0  # ASFT lambda on KL(pi_ref || pi_theta); 0: plain DFT (ASFT code 0.1, README 0.05)


RECIPES = {
    # sft.py's steps and batch from the SFT warm start: from random init (p ~ 1/83) DFT locks onto the easy tokens
    # and drops the digits (nll 4.5 -> 8 at lr 3e-3, accuracy 0); at lr 1e-3 even the warm start drifts (39% -> 7%)
    # held-out mean@4 at T 0.7 beside greedy, as in the rollout files
    "embedded": dict(max_length=128, batch_size=64, lr=2e-4, max_steps=400, eval_every=100, max_new_tokens=40,
                     eval_size=512, eval_samples=4, eval_temperature=0.7),
}


def dft_loss(logp, mask, normalizer, *, loss_agg="token_mean", kl=None, kl_weight=0.0):
    """logp (B,T): log pi_theta of the target tokens; mask (B,T): 1 on response tokens (EOS included).
    kl (B,T): KL(pi_ref || pi_theta) over the vocabulary at each position (ASFT; used when kl_weight > 0).
    normalizer: `normalizer_count(mask, loss_agg)` summed over the whole optimizer step (all micro-batches, all
    ranks), divided by the world size (DDP averages gradients): tokens (token_mean), sequences (seq_*), micro-batches
    (micro_token_mean). Returns (loss, metrics)."""
    nll = -logp  # (B, T) per-token cross-entropy
    per_tok = logp.detach().exp() * nll  # (B, T) DFT Eq. 9: -sg(p) log p
    if kl_weight > 0:  # ASFT: anchor to the initial model
        per_tok = per_tok + kl_weight * kl  # (B, T)
    loss = aggregate(per_tok, mask, loss_agg, normalizer)
    metrics = {"nll_sum": (nll.detach() * mask).sum(), "tokens": mask.sum()}
    metrics["kl_sum"] = (kl.detach() * mask).sum() if kl_weight > 0 else torch.zeros_like(metrics["tokens"])
    return loss, metrics


def asft_head(ref_lm, batch):
    """FusedLM head for ASFT: log pi_theta(target) and KL(pi_ref || pi_theta) over the full vocabulary, chunk by
    chunk (no (N, V) logits of either model), from the frozen reference's hidden states (computed here, no grad)."""
    with torch.no_grad():
        ref_h = response_hidden(ref_lm, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])  # (N, d)
    ref_emb = ref_lm.get_output_embeddings()

    def head(h, weight, bias, targets):  # h (N, d), weight (V, d), targets (N,)
        logp, _ = fused_logprobs(h, weight, targets, bias)  # (N,)
        kl = full_vocab_kl(h, weight, ref_h, ref_emb.weight, bias, getattr(ref_emb, "bias", None))  # (N,)
        return {"logp": logp, "kl": kl}
    return head


def main():
    args = common.parse_args(Args, presets={"recipe": RECIPES})
    if args.dry_run:  # resolved recipe with sources, batch and memory estimate; loads nothing
        return common.dry_run(args, frozen=[args.model] if args.kl_weight > 0 else [])  # ASFT: the frozen reference
    if args.kl_weight < 0:  # ASFT
        raise common.UserError(f"--kl-weight {args.kl_weight} is negative; it weights a KL penalty: use 0 (DFT) or "
                               "a positive value (ASFT, e.g. 0.1)")
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
    ref = None  # ASFT: frozen copy of the initial model (reloaded from the same path, also on --resume)
    if args.kl_weight > 0:
        ref = data.load_model(model_path, args.dtype, args.trust_remote_code, device=d.device).eval()
        ref.requires_grad_(False)
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
        stats = {"nll_sum": 0.0, "tokens": 0.0, "loss": 0.0, "kl_sum": 0.0}
        for micro, b in enumerate(mbs):
            with common.no_sync(model, micro == len(mbs) - 1), autocast:
                head = asft_head(ref, b) if ref is not None else None  # ASFT: adds the KL to the fused head
                o = model(b["input_ids"], b["attention_mask"], b["loss_mask"], head=head)  # logp, kl (B, L)
                loss, m = dft_loss(o["logp"], b["loss_mask"], normalizer, loss_agg=args.loss_agg, kl=o.get("kl"),
                                   kl_weight=args.kl_weight)
                loss.backward()
            stats["loss"] += loss.detach()
            stats["nll_sum"] += m["nll_sum"]
            stats["tokens"] += m["tokens"]
            stats["kl_sum"] += m["kl_sum"]

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
        nll = common.all_reduce(torch.stack([stats["nll_sum"], stats["tokens"], stats["kl_sum"]]).double())
        if ref is not None:  # ASFT
            metrics["train/kl"] = (nll[2] / nll[1]).item()
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
    del model, optimizer, ref
    common.cleanup_distributed()


if __name__ == "__main__":
    main()
