"""Worker for tests/test_common.py: each rank holds rank+1 tokens; the all-reduced count must be 1+2+...+W."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

d = common.setup_distributed(0)
count = torch.tensor(float(d.rank + 1))
common.all_reduce(count)
m = common.reduce_metrics({"x": float(d.rank)}, d.device)
expected = d.world_size * (d.world_size + 1) / 2
assert count.item() == expected, (count.item(), expected)
assert abs(m["x"] - (d.world_size - 1) / 2) < 1e-12, m
if d.is_main:
    Path(sys.argv[1]).write_text(f"{count.item()} {m['x']}")
common.cleanup_distributed()
