"""The run's plumbing, shared by every method file: arguments, distributed set-up, checkpoints, output directory and
resume, metrics, loop helpers. Nothing here reads a method's hyperparameters or changes a gradient. data.py: what goes
into the model; rollout.py: what comes out (generation, rewards, evaluation); recipes/: the papers' settings.
Importing this module has no side effects; heavy imports happen inside the functions that need them."""
import argparse
import contextlib
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
    another table's entry (a recipe its preset) and build on one of its own (base="paper"). A value is given as
    `field=value` (its source: the entry's `source=`) or `field=(value, "source")`. Returns (values, sources:
    {field: "recipe paper: DeepSeekMath §4.2"})."""
    values, sources = dict(values), {}

    def entry(key, table, choice):  # [(field, value, source)]; `base="other"` puts entry `other` underneath
        e = table[choice] if choice is not None else {}
        own = [(k, *(v if isinstance(v, tuple) else (v, e.get("source"))))
               for k, v in e.items() if k not in ("base", "source")]
        return [*(entry(key, table, e["base"]) if "base" in e else []),
                *((k, v, f"{key} {choice}" + (f": {s}" if s else "")) for k, v, s in own)]
    for key, table in tables.items():
        if values.get(key) == "auto":  # --recipe auto: the embedded recipe for an embedded model, else none
            embedded = str(values.get("model", "")).startswith("embedded") and "embedded" in table
            values[key] = table["auto"](values) if "auto" in table else "embedded" if embedded else None
        for other, v, src in entry(key, table, values.get(key)):
            if other in tables and other not in explicit:  # an entry may choose another table's (a recipe, its preset)
                values[other], sources[other] = v, src
    for key, table in tables.items():
        for name, v, src in entry(key, table, values.get(key)):
            if name not in explicit:
                values[name], sources[name] = v, src
    return values, sources


def _paper_recipes(cls, presets, name):
    """The tables with recipes/<method>.py's paper recipes added when --recipe names one (read only then)."""
    if not presets or "recipe" not in presets or name in (None, "auto", *presets["recipe"]):
        return presets
    import importlib
    method = Path(inspect.getfile(cls)).stem
    try:
        table = importlib.import_module(f"recipes.{method}").RECIPES
    except ModuleNotFoundError:
        table = {}
    if name not in table:
        raise UserError(f"--recipe {name}: {method}.py has no such recipe; choose one of "
                        f"{', '.join(c for c in [*presets['recipe'], *table] if c != 'auto')} (recipes/{method}.py)")
    return {**presets, "recipe": {**presets["recipe"], **table}}


def dry_run(args, frozen=(), extra_sequences=0):
    """--dry-run (recipes/dry_run.py): every value with its source, the batch and a memory estimate; loads nothing."""
    from recipes.dry_run import dry_run
    return dry_run(args, frozen, extra_sequences)


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
        if presets and f.name in presets and "choices" not in kw and f.name != "recipe":  # paper recipes: recipes/
            kw["choices"] = [c for c in presets[f.name] if c != "auto"] + (["auto"] if "auto" in presets[f.name] else [])
        note = (f" [a run without flags uses {plain[f.name]!r}: {plain_src[f.name].split(':')[0]}]"
                if f.name in plain_src and plain[f.name] != f.default else "")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                            help=(comments.get(f.name, " ") + note).replace("%", "%%"), **kw)
    ns = parser.parse_args(argv)
    explicit = {a.dest for a in parser._actions if a.option_strings and any(
        o in (argv if argv is not None else sys.argv[1:]) or any(x.startswith(o + "=") for x in (argv or sys.argv[1:]))
        for o in a.option_strings)}
    presets = _paper_recipes(cls, presets, getattr(ns, "recipe", None))
    values, sources = _resolve_tables(vars(ns), explicit, presets or {})
    args = cls(**values)
    args._explicit = sorted(explicit)  # recorded in config.json
    args._sources = sources  # which table set which value (recorded in config.json, printed by --dry-run)
    if getattr(args, "output_dir", "") is None:  # default: runs/<method file name>
        args.output_dir = f"runs/{Path(inspect.getfile(cls)).stem}"
    check_ranges(args, ranges)
    for name in sorted(explicit & ACTS_ONLY_WITH.keys()):
        if not ACTS_ONLY_WITH[name][0](args):
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} acts only with {ACTS_ONLY_WITH[name][1]}; "
                            "give that too")
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
    "dist_timeout": _POS, "seed": _NONNEG, "log_ratio_clamp": _POS, "stop_at_accuracy": _UNIT,
    "gppo_beta_low": _NONNEG, "gppo_beta_high": _NONNEG,
    "beta": (lambda v: v >= 0, ">= 0 (a KL or distillation coefficient)"),  # otr.py: the reward of a wrong draw
}


# A flag that acts only together with another: given without it, it would change nothing, so the run is refused
ACTS_ONLY_WITH = {  # flag: (test on the args, what to give with it)
    "kl_estimator": (lambda a: a.beta > 0, "--beta > 0 (the KL term; DeepSeekMath: 0.04)"),
    "stop_at_accuracy": (lambda a: a.eval_every > 0 and a.eval_size > 0, "--eval-every > 0 and --eval-size > 0"),
    **{name: (lambda a: getattr(a, "clip", True), "--clip (the released loss of this method has no clip)")
       for name in ("eps_low", "eps_high", "dual_clip", "clip_mode")},
    **{name: (lambda a: a.clip_mode == "gppo", "--clip-mode gppo (GPPO's gradient scales outside the clip range)")
       for name in ("gppo_beta_low", "gppo_beta_high")},
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
# Distributed: torchrun env -> process group (gloo on CPU, NCCL on CUDA); DDP or FSDP2
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
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
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary directory, marked COMPLETE with every file's size, then renamed
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


def warn(msg):  # one line `warning: ...` on stderr, from rank 0 only
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


def _row_kind(rec):  # a metrics row's kind: 'eval' (held-out metrics) or 'train'; rows are keyed by (step, kind)
    return "eval" if any(k.startswith("eval/") for k in rec) else "train"


REPORT_TO = ("tensorboard", "wandb", "trackio")
ZERO_SIGNAL_STEPS = 5  # consecutive steps without a learning signal before the warning


class MetricsLogger:
    """Rank 0 appends a JSON line per logged step to metrics.jsonl, shows a tqdm bar and, with --report-to, sends the
    same metrics to TensorBoard (out/tb), W&B or trackio; rollout.log_completions writes completions.jsonl. ZERO_SIGNAL_STEPS
    steps in a row without learning signal (all rewards of every group equal, or every completion truncated) are
    warned about and counted in train/zero_signal_steps. On resume the files stay exact: lines after the resumed step
    are dropped, and a row whose (step, kind) is already there (an evaluation logged before the kill) is not repeated."""

    def __init__(self, out_dir, d, total, start=0, quiet=False, report_to="none", args=None):
        self.d, self.path, self.tb, self.wandb, self.trackio, self.bar = d, Path(out_dir) / "metrics.jsonl", *[None] * 4
        self.samples_path, self.quiet, self.streak = Path(out_dir) / "completions.jsonl", quiet, {}
        self.outcomes_path = Path(out_dir) / "eval_outcomes.jsonl"  # per-problem held-out scores (rollout.eval_metrics)
        self.logged, self.name = set(), _method_name(args) if args is not None else "run"  # [name] on printed lines
        _nonfinite.update(steps=0, skipped=0, in_a_row=0)  # a new run (several can run in one process, e.g. tests)
        targets = [t.strip() for t in str(report_to or "none").split(",") if t.strip() not in ("", "none")]
        bad = [t for t in targets if t not in REPORT_TO]
        if bad:
            raise UserError(f"--report-to {report_to}: unknown {', '.join(bad)}; choose from none, "
                            f"{', '.join(REPORT_TO)} (comma-separated)")
        if not d.is_main:
            return
        for path in (self.path, self.samples_path, self.outcomes_path):
            if path.exists():
                keep = []
                for ln in path.read_text().splitlines():
                    try:  # a run killed mid-write leaves a partial last line
                        rec = json.loads(ln)
                    except json.JSONDecodeError:
                        continue
                    key = (rec.get("step", 0), _row_kind(rec))
                    if rec.get("step", 0) <= start and (path != self.path or key not in self.logged):
                        keep.append(ln)
                        self.logged.update([key] if path == self.path else [])
                path.write_text("".join(ln + "\n" for ln in keep))
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, dynamic_ncols=True, file=sys.stdout)
        config = {k: v for k, v in vars(args or {}).items() if not k.startswith("_")} if args is not None else {}
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

    def log(self, step, metrics, advance=0):  # returns the metrics it was given
        if not self.d.is_main or not metrics:
            return metrics
        given, metrics = metrics, dict(metrics)
        self._zero_signal(step, metrics)
        rec = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        if (step, _row_kind(rec)) in self.logged:  # already in the file from before a resume: write nothing twice
            if self.bar:
                self.bar.update(advance)
            return given
        self.logged.add((step, _row_kind(rec)))
        per_problem = rec.pop("eval/per_problem", None)  # rollout.eval_metrics: each problem's held-out scores
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if per_problem:
            with open(self.outcomes_path, "a") as f:
                f.write(json.dumps({"step": step, **per_problem}) + "\n")
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
        return given

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

    def print(self, msg):
        if self.d.is_main:
            (self.bar.write if self.bar else print)(msg)

    def close(self):
        if self.bar:
            self.bar.close()
        if _nonfinite["skipped"]:
            self.print(f"[summary] {_nonfinite['skipped']} of {_nonfinite['steps']} optimizer steps were skipped as "
                       "non-finite (--skip-nonfinite): those steps did not train")
        for finish in (self.tb and self.tb.close, self.wandb and self.wandb.finish, self.trackio and self.trackio.finish):
            if finish:
                finish()


def optimizer_step(model, optimizer, scheduler, step, loss, max_grad_norm, skip_nonfinite, skip_above=None):
    """Clip the gradient norm, step the optimizer and the schedule unless the loss or the norm is not finite (then
    `nonfinite` stops the run, or skips the step with --skip-nonfinite) or the norm before clipping exceeds
    skip_above (HPT's skip); zero the gradients. Returns (norm, stepped)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    skipped = nonfinite(step, {"loss": float(loss), "grad_norm": float(grad_norm)}, skip_nonfinite)
    skipped = skipped or (skip_above is not None and float(grad_norm) > skip_above)
    if not skipped:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, not skipped


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


timer = time.perf_counter  # seconds, for the perf/ metrics
