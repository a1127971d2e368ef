"""Under torchrun: each rank owns its own in-process vLLM engine; gloo collectives keep working beside it."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import data  # noqa: E402
import rollout  # noqa: E402

d = common.setup_distributed(0)
path = sys.argv[1]
tok = data.load_tokenizer(path)
engine = rollout.make_engine("vllm", path, d, 128)
prompts = [data.encode_prompt(tok, f"{10 + d.rank}+{20 + d.rank}=")]
comps, fin, lps = rollout.generate(None, tok, prompts, n=2, max_new_tokens=6, temperature=1.0, seed=d.rank,
                                  engine=engine)
assert len(comps) == 2 and all(len(lp) == len(c) for lp, c in zip(lps, comps))
n = common.all_reduce(torch.tensor(float(sum(len(c) for c in comps))))
if d.is_main:
    Path(sys.argv[2]).write_text(str(int(n.item())))
del engine
common.cleanup_distributed()
