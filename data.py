"""What goes into the model, shared by every method file: the embedded default (tiny Qwen2, character tokenizer,
arithmetic task), model and tokenizer loading, datasets in the formats users have (a preset of recipes/, a hub name,
a local file; plain, conversational, messages, prompt-completion), chat-template tokenisation and batches.

Importing this module has no side effects; transformers and datasets are imported inside the functions.
"""
import functools
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import common

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


# How the cached embedded starting points are made: the base is built; the others are runs of methods/sft.py that
# stop at the first held-out evaluation (every 20 steps) reaching a stated greedy accuracy, with a step cap. A target
# and not a step count: the same steps gave 0.164, 0.289 and 0.395 as float summation orders changed between versions.
EMBEDDED_STAGES = {
    "warm": dict(target=0.45, argv=["--model", "embedded", "--max-steps", "1500", "--eval-every", "20",
                                    "--eval-size", "256", "--eval-samples", "0"]),
    "teacher": dict(target=0.75, argv=["--model", "embedded:warm", "--lr", "2e-4", "--max-steps", "1500",
                                       "--eval-every", "20", "--eval-size", "256", "--eval-samples", "0"]),
}


def resolve_model(name, d=None):
    """`embedded`, `embedded:warm` or `embedded:teacher` -> a cached local directory (built on first use, and again
    when its recipe in EMBEDDED_STAGES changed); any other string is returned unchanged (a hub name or a local
    directory). Ranks wait for rank 0's build."""
    if not name.startswith("embedded"):
        return name
    stage = name.split(":", 1)[1] if ":" in name else "base"
    path = common.CACHE / "embedded" / stage
    if (d is None or d.is_main) and not _stage_current(stage, path):
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{stage}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _stage_current(stage, path):
                _build_stage(stage, path)
    if d is not None and d.world_size > 1:
        dist.barrier()
    return str(path)


def stage_info(path):
    """What a cached embedded stage reached when it was built: {stage, target, accuracy, step, cap, reached, argv}."""
    f = Path(path) / "postrain_stage.json"
    return json.loads(f.read_text()) if f.exists() else None


def _stage_current(stage, path):
    if not (path / "config.json").exists():
        return False
    if stage not in EMBEDDED_STAGES:
        return True
    info = stage_info(path)
    if info is None or info["argv"] != EMBEDDED_STAGES[stage]["argv"] or info["target"] != EMBEDDED_STAGES[stage]["target"]:
        print(f"[postrain] the cached embedded '{stage}' was built with another recipe: building it again", flush=True)
        return False
    return True


def _build_stage(stage, path):
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if stage == "base":
        tok = build_embedded_tokenizer()
        build_embedded_model(tok).save_pretrained(tmp)
        tok.save_pretrained(tmp)
    elif stage in EMBEDDED_STAGES:
        spec = EMBEDDED_STAGES[stage]
        print(f"[postrain] building the cached embedded '{stage}' with methods/sft.py (once): until greedy held-out "
              f"accuracy >= {spec['target']} ...", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                                   "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
        # one thread: the float summation order, hence the checkpoint, does not depend on the machine's core count
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        run_dir = tmp.with_name(tmp.name + "-run")
        cmd = [sys.executable, str(common.REPO / "methods" / "sft.py"), *spec["argv"], "--stop-at-accuracy",
               str(spec["target"]), "--output-dir", str(run_dir), "--overwrite", "--save-every", "0", "--quiet"]
        subprocess.run(cmd, check=True, env=env)
        evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "eval/accuracy" in r]
        cap = int(spec["argv"][spec["argv"].index("--max-steps") + 1])
        info = dict(stage=stage, target=spec["target"], accuracy=evals[-1]["eval/accuracy"], step=evals[-1]["step"],
                    cap=cap, reached=evals[-1]["eval/accuracy"] >= spec["target"], argv=spec["argv"])
        shutil.move(str(run_dir / "final"), str(tmp))
        shutil.rmtree(run_dir, ignore_errors=True)
        (tmp / "postrain_stage.json").write_text(json.dumps(info, indent=1))
        if info["reached"]:
            print(f"[postrain] embedded '{stage}': held-out greedy accuracy {info['accuracy']:.3f} at step "
                  f"{info['step']} (target {spec['target']})", flush=True)
        else:
            print(f"[postrain] warning: embedded '{stage}' hit its cap of {cap} steps at held-out greedy accuracy "
                  f"{info['accuracy']:.3f}, below its target {spec['target']}; it is cached as it is (raise the cap "
                  "in data.EMBEDDED_STAGES)", flush=True)
    else:
        raise common.UserError(f"unknown embedded model '{stage}'; use embedded, embedded:warm or embedded:teacher")
    shutil.rmtree(path, ignore_errors=True)
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
    sizes = {"sft": 4000, "rl": 4000, "eval": 1024}  # the first N of a split do not depend on its size
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
# Model and tokenizer loading (any Hugging Face causal LM: hub name or local directory)
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
            raise common.UserError(f"--chat-template '{chat_template}' is neither a file nor a Jinja template (no '{{'); pass "
                                   "a .jinja file or the template text")
        tok.chat_template = Path(os.path.expanduser(chat_template)).read_text() if is_file else chat_template
    if not tok.chat_template:
        raise common.UserError(f"the tokenizer of '{path}' has no chat template; use an instruct model's tokenizer, or pass "
                               "--chat-template FILE.jinja (or the template text)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise common.UserError(f"the tokenizer of '{path}' has no EOS token; set eos_token in its tokenizer_config.json")
    tok.padding_side = "left"  # generation pads on the left; training batches are padded by collate()
    try:
        vocab = json.loads((Path(os.path.expanduser(path)) / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):  # a hub name, or a config the model loader will judge
        vocab = None
    for name in ("pad_token_id", "eos_token_id"):  # an id past the embedding table fails deep inside the model
        if isinstance(vocab, int) and not 0 <= getattr(tok, name) < vocab:
            raise common.UserError(f"the tokenizer of '{path}' has {name} {getattr(tok, name)}, outside the model's "
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
    return common.UserError(f"cannot load the {what} of '{path}' ({type(e).__name__}: {first}); {fix}")


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
        raise common.UserError(f"{what} = {length} tokens exceed the context of '{model_path}' (max_position_embeddings "
                               f"{ctx}); lower them so they fit")


def _check_model_path(path):
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/") and path.count("/") != 1
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise common.UserError(f"model path '{path}' does not exist; pass a local directory that holds config.json, a "
                               "hub name such as Qwen/Qwen2.5-Math-1.5B, or 'embedded' for the built-in tiny model")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise common.UserError(f"'{path}' is a directory without config.json; point --model at a save_pretrained directory")


# ----------------------------------------------------------------------------------------------------------------
# Data: rows {prompt, response, answer}, tokenised with the chat template (prompt masked, EOS a target)
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
    if _preset(dataset):  # a paper's dataset (recipes/): hub name, split, fields and system prompt preset
        if (prompt_column, response_column, answer_column) != ("prompt", "response", "answer"):
            raise common.UserError(f"dataset preset '{dataset}' fixes its own fields; drop --prompt-column/--response-column/"
                                   "--answer-column, or pass the hub name or file instead of the preset to map columns")
        return load_preset(dataset, need_response, limit)
    if dataset == "embedded":
        rows = [{**r, "answer_format": "hash"} for r in embedded_task(embedded_split)]
        return rows[:limit] if limit is not None else rows
    import datasets
    ext = Path(dataset).suffix.lstrip(".")
    if ext in ("json", "jsonl", "parquet", "csv"):
        if not os.path.isfile(dataset):
            raise common.UserError(f"dataset file '{dataset}' does not exist")
        if os.path.getsize(dataset) == 0:  # datasets raises StopIteration on it
            raise common.UserError(f"dataset file '{dataset}' is empty (0 bytes); check the file")
        try:
            ds = datasets.load_dataset("json" if ext == "jsonl" else ext, data_files=dataset, split="train")
        except Exception as e:  # noqa: BLE001 (datasets/pyarrow: decoding, parsing, empty file)
            if "corresponds to no data" in str(e):  # a table with no rows
                raise common.UserError(f"dataset file '{dataset}' is empty (no rows); check the file") from None
            cause = next((c for c in _causes(e) if isinstance(c, UnicodeDecodeError)), e)
            hint = ("it is not UTF-8 text; re-encode it as UTF-8" if isinstance(cause, UnicodeDecodeError) else
                    f"a {ext} file is expected: " + {"jsonl": "one JSON object per line",
                                                     "json": "a JSON list of objects or JSON lines",
                                                     "csv": "a header line, then rows",
                                                     "parquet": "an Apache Parquet table"}[ext])
            raise common.UserError(f"cannot read dataset file '{dataset}' ({type(cause).__name__}: {str(cause)[:160]}); "
                                   f"{hint}") from None
    else:
        try:
            ds = datasets.load_dataset(dataset, config, split=split)
        except Exception as e:  # network, unknown name, unknown config or split
            raise common.UserError(f"could not load dataset '{dataset}'" + (f" config '{config}'" if config else "") +
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
        raise common.UserError(f"dataset '{dataset}' has no column {', '.join(missing)}; its columns are "
                               f"{ds.column_names}; map yours with --prompt-column/--response-column/--answer-column")
    if len(ds) == 0:
        raise common.UserError(f"dataset '{dataset}' (split {split}) is empty")
    try:
        data = {k: list(ds[c]) for k, c in cols.items()}
    except UnicodeDecodeError as e:  # pyarrow reads JSON bytes as they are and decodes strings only here
        raise common.UserError(f"cannot read dataset file '{dataset}' (UnicodeDecodeError: {str(e)[:160]}); it is not UTF-8 "
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
                raise common.UserError(f"dataset '{dataset}': a 'messages' row has no assistant turn to learn from "
                                       f"({r['prompt'][:2]}); every conversation needs one")
            r["prompt"], r["response"] = r["prompt"][:last], r["prompt"][last]["content"]
        elif isinstance(r["response"], list):  # a conversational completion: its assistant content
            r["response"] = "".join(m.get("content", "") for m in r["response"] if m.get("role") == "assistant")
        if isinstance(r["prompt"], list) and not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in r["prompt"]):
            raise common.UserError(f"dataset '{dataset}': column '{prompt_column}' holds a list that is not a conversation of "
                                   f"{{role, content}} messages ({str(r['prompt'])[:80]}); pass text or such messages")
        rows.append(r)
        if limit and len(rows) >= limit:
            break
    if rows and (blank["prompt"] or blank["answer"]):
        common.warn(f"dataset '{dataset}': skipped {blank['prompt']} rows with a null or empty prompt (--prompt-column "
                    f"{prompt_column}) and {blank['answer']} with a null or empty answer (--answer-column {answer_column});"
                    f" {len(rows)} remain")
    if not rows:
        raise common.UserError(f"dataset '{dataset}' has no row with a prompt{'' if need_response else ' and an answer'} "
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
        raise common.UserError(f"--eval-size {args.eval_size} must be >= 0 (0: no held-out evaluation)")
    if args.eval_size == 0:
        return rows, []
    if args.eval_dataset or args.dataset == "embedded":
        name = args.eval_dataset or "embedded"
        held = load_examples(name, args.dataset_split, args.prompt_column, args.response_column, args.answer_column,
                             False, "eval", args.eval_size, args.dataset_config if name == args.dataset else None,
                             need_answer)
        if len(held) < args.eval_size and int(os.environ.get("RANK", "0")) == 0:
            print(f"[data] note: --eval-size {args.eval_size}, but {name} has {len(held)} held-out rows: all are used")
        return rows, held
    if len(rows) <= args.eval_size:
        raise common.UserError(f"no training examples are left: without --eval-dataset, --eval-size {args.eval_size} rows of "
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
        raise common.UserError("no training examples are left: without --eval-dataset, --eval-size rows of --dataset are held "
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
        flag = "--max-length" if "max_length" in common.FLAGS or not common.FLAGS else \
            "--max-prompt-length + --max-new-tokens" if with_response else "--max-prompt-length"
        raise common.UserError(f"every one of the {len(rows)} examples was filtered out ({too_long} longer than {max_length} "
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
        raise common.UserError(f"the embedded character tokenizer cannot encode {shown}{' ...' if len(bad) > 12 else ''} "
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
        raise common.UserError(f"batch size {batch_size} is not divisible by the world size {world_size}")
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
        raise common.UserError(f"{len(items)} samples per rank cannot be split into {n_micro} micro-batches; make the "
                               "batch size divisible by world size x gradient accumulation steps")
    k = len(items) // n_micro
    return [items[i * k:(i + 1) * k] for i in range(n_micro)]


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


def _preset(name):
    """The recipes/ dataset preset called `name` (or NAME:FILE), else None. recipes/ is imported only for a name
    that can be one (no '/' of a hub name, no file extension)."""
    key = name.partition(":")[0]
    if key == "embedded" or "/" in key or "." in key:
        return None
    import recipes
    return recipes.dataset_presets().get(key)


def load_preset(name, need_response=True, limit=None):
    """Rows {prompt, response, answer, system} of a DATASETS preset, from the hub or from `NAME:FILE`. Rows without a
    prompt, or without an answer when no demonstration is asked for (RL prompts, benchmarks), are skipped."""
    import datasets
    key, _, path = name.partition(":")
    p = _preset(name)
    where = path or p["hub"]
    if path and not os.path.exists(path):
        raise common.UserError(f"local copy '{path}' of dataset preset '{key}' does not exist; pass NAME:FILE with an "
                               f"existing .jsonl/.parquet file, or just '{key}' to read {p['hub']} from the hub")
    try:
        ds = (datasets.load_dataset("parquet" if path.endswith(".parquet") else "json", data_files=path, split="train")
              if path else datasets.load_dataset(p["hub"], p.get("config"), split=p["split"]))
    except Exception as e:  # network, unreadable file
        raise common.UserError(f"could not load dataset preset '{key}' from {where} ({type(e).__name__}: {e}); check the "
                               f"network, or pass a local copy as {key}:FILE") from None
    fields = [p.get(k) for k in ("prompt", "response", "answer", "system_field")]
    needed = {f.removeprefix("boxed:").split(".")[0] for f in fields if isinstance(f, str)} | set(p.get("needs", ()))
    if needed - set(ds.column_names):
        raise common.UserError(f"dataset preset '{key}' reads columns {sorted(needed)} but {where} has no "
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
        raise common.UserError(f"dataset preset '{key}' ({where}) has no usable row (a prompt and an answer)")
    return rows
