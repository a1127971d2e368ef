"""The flag matrix (issue 17): for every method file, every choice of every Literal flag, every preset, variant and
recipe, and every boolean switch runs two optimizer steps on the embedded default, or is refused before training
with one `error: ...` line, never a traceback. The cases come from the Args dataclasses and the tables
(tests/_flag_matrix_worker.py `cases`), so a new flag is covered without editing this test."""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

# refusals that are right on this machine: the choice needs something a CPU test machine does not have
EXPECTED_REFUSALS = {"generator=vllm": "needs vLLM"}
SHARDS = 2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dft", "otr", "grpo", "chord", "prefix_rft", "relift", "kdrl", "luffy", "hpt",
                                    "srft", "uft"])
def test_every_documented_choice_trains_or_is_refused_in_one_line(tmp_path, method):
    # two shards in parallel, one thread each (the cases are tiny: two processes finish in about half the time)
    outs = [tmp_path / f"matrix{k}.json" for k in range(SHARDS)]
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "_flag_matrix_worker.py"), method, str(out),
                               "--shard", f"{k}/{SHARDS}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for k, out in enumerate(outs)]
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all(o.exists() for o in outs), "\n".join(x[-3000:] for x in logs)
    results = {k: v for out in outs for k, v in json.loads(out.read_text()).items()}
    crashed = {k: v["detail"] for k, v in results.items() if v["status"] == "crashed"}
    assert not crashed, "\n\n".join(f"{k} ({' '.join(results[k]['flags'])}):\n{d}" for k, d in crashed.items())
    refused = {k: v["detail"] for k, v in results.items() if v["status"] == "refused"}
    unexpected = {k: d for k, d in refused.items() if EXPECTED_REFUSALS.get(k, "\0") not in d}
    assert not unexpected, unexpected
    assert results["default"]["status"] == "ok" and len(results) >= 15
