"""tests/gpu_check.py (issue 23) in its CPU smoke mode: the script a GPU machine runs must itself run, check the
fused kernels and FusedLM against the naive path, time them, build a model with a large-vocabulary tokenizer and run
one GRPO step, write its one result file, and exit 0 only when every check passed."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    p = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    text = out.read_text()
    assert "RESULT: all checks passed" in text
    rows = [line for line in text.splitlines() if line.startswith("| fused_logprobs |")]
    assert len(rows) == 2 * (3 + 4), rows  # fp32 and bf16 x (logp: 3 tensors; logp+entropy: 4)
    errors = [float(r.split("|")[6]) for r in rows]
    assert all(e <= 1e-2 for e in errors) and all(r.rstrip(" |").endswith("ok") for r in rows), rows
    assert sum(line.startswith("| FusedLM") for line in text.splitlines()) == 2
    grpo = [line for line in text.splitlines() if line.startswith("| fp32 | 1 |")]  # one GRPO step that ran
    assert grpo and float(grpo[0].split("|")[3]) > 0, text

