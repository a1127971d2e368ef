"""The flag matrix of one method file: every documented choice runs two optimizer steps or is refused with one line.

Usage: _flag_matrix_worker.py METHOD OUT.json [--shard K/N] [CASE_ID ...]  (--shard: every N-th case from the K-th)
The cases are derived from the file itself (see `cases`): every choice of every Literal flag, every entry of the
preset/variant/recipe tables, every boolean switch flipped, and "none" for every Optional flag that is on by
default. Each case runs the method's main() in this process on the embedded default with tiny sizes. Results:
    ok       main() returned and metrics.jsonl holds training rows for steps 1 and 2
    refused  main() raised SystemExit whose message starts with "error:" (one line, before training)
    crashed  anything else (a traceback, a wrong exit, missing steps), with the tail of the error
"""
import contextlib
import dataclasses
import importlib
import io
import json
import sys
import tempfile
import traceback
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from tests_util import load_method  # noqa: E402

TABLES = {"PRESETS": "preset", "VARIANTS": "variant", "RECIPES": "recipe"}  # module table -> the flag choosing it
SKIP = {"dry_run", "quiet", "overwrite"}  # dry_run is checked by test_recipes; quiet/overwrite are set by the runner
TINY = {  # explicit flags win over every table, so these keep each run small whatever a case selects
    "max_steps": 2, "batch_size": 4, "prompts_per_step": 2, "num_generations": 2, "max_new_tokens": 6,
    "eval_size": 2, "eval_every": 0, "save_every": 0, "eval_samples": 0, "grad_accum": 1,
    "steps_per_generation": 1, "max_gen_batches": 2, "num_samples": 4, "sft_micro_batch_size": 2,
    "max_prompt_length": 64, "max_length": 128,
}
WITH = {  # a choice that acts only together with another flag of the same file: (that flag's field, its argv)
    "kl_estimator": ("beta", ["--beta", "0.04"]),  # the KL estimator needs beta > 0 (kdrl: the KD coefficient, > 0)
    "dual_clip": ("clip", ["--clip"]),  # relift.py, luffy.py, hpt.py: the released loss has no clip at all
    "clip_mode": ("clip", ["--clip"]),
}
VALUES = {"dual_clip": "3.0", "log_ratio_clamp": "20.0"}  # the value that switches on an Optional flag that is off
HARDWARE = ("model", "teacher", "dataset", "expert_dataset", "eval_dataset", "system_prompt", "generator")  # a paper recipe's GPU-cluster
# values, reset to the file's defaults so that the recipe's algorithmic settings run on the embedded default


def flag(name):
    return "--" + name.replace("_", "-")


def cases(mod):
    """[(case_id, [flags])]: derived from Args and the tables, so a new flag or entry is covered automatically."""
    hints = typing.get_type_hints(mod.Args)
    fields = {f.name: f for f in dataclasses.fields(mod.Args)}
    needs = lambda name: WITH[name][1] if name in WITH and WITH[name][0] in fields else []  # noqa: E731
    out = [("default", [])]
    tables = {t: getattr(mod, t, {}) for t in TABLES}
    tables["RECIPES"] = {**tables["RECIPES"], **importlib.import_module(f"recipes.{Path(mod.__file__).stem}").RECIPES}
    for table, field in TABLES.items():
        for choice in tables[table]:
            if choice == "auto" or (choice == "embedded" and "auto" in tables[table]):  # = the default run
                continue
            extra = [] if choice == "embedded" else [x for n in HARDWARE if n in fields
                                                     for x in (flag(n), str(fields[n].default))]
            out.append((f"{field}={choice}", [flag(field), choice, *extra]))
    for name, f in fields.items():
        if name in SKIP or name in TABLES.values():
            continue
        tp = hints[name]
        optional = typing.get_origin(tp) is typing.Union
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is typing.Literal:
            out += [(f"{name}={c}", [flag(name), str(c), *needs(name)]) for c in typing.get_args(tp) if c != f.default]
        elif tp is bool:
            out.append((f"{name}={not f.default}", [flag(name) if not f.default else "--no-" + flag(name)[2:]]))
        elif optional and f.default is not None:
            out.append((f"{name}=none", [flag(name), "none"]))
        elif optional and name in VALUES:
            out.append((f"{name}={VALUES[name]}", [flag(name), VALUES[name], *needs(name)]))
    return out


def run_case(mod, flags, out_dir):
    fields = {f.name for f in dataclasses.fields(mod.Args)}
    base = [x for k, v in TINY.items() if k in fields for x in (flag(k), str(v))]
    argv = [f"{mod.__name__}.py", *base, *flags, "--output-dir", str(out_dir), "--quiet", "--overwrite"]
    sys.argv = argv
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            mod.main()
    except SystemExit as e:
        msg = str(e.code) if e.code is not None else ""
        if msg.startswith("error:") and "\n" not in msg.strip():
            return "refused", msg
        if e.code in (0, None):
            pass
        else:
            return "crashed", f"SystemExit({e.code!r}) {buf.getvalue()[-1500:]}"
    except BaseException:  # noqa: BLE001 - a crash of any kind is what this matrix looks for
        return "crashed", traceback.format_exc()[-3000:]
    log = Path(out_dir) / "metrics.jsonl"
    steps = sorted({r["step"] for r in map(json.loads, log.read_text().splitlines())
                    if any(k.startswith("train/") for k in r)}) if log.exists() else []
    if steps[:2] != [1, 2]:
        return "crashed", f"trained steps {steps}, expected [1, 2]: {buf.getvalue()[-1500:]}"
    return "ok", ""


def main():
    method, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    shard, n_shards = 0, 1
    if rest[:1] == ["--shard"]:
        shard, n_shards = map(int, rest[1].split("/"))
        rest = rest[2:]
    only = set(rest)
    mod = load_method(method)
    mod.__name__ = method
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (cid, flags) in enumerate(cases(mod)):
            if (only and cid not in only) or i % n_shards != shard:
                continue
            status, detail = run_case(mod, flags, Path(tmp) / f"c{i}")
            results[cid] = {"status": status, "flags": flags, "detail": detail}
            sys.__stdout__.write(f"{method} {cid}: {status} {detail.strip().splitlines()[-1] if detail else ''}\n")
            sys.__stdout__.flush()
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
