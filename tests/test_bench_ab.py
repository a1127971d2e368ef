"""The model-level A/B of tests/bench_trl.py (--only ab): it runs, and its table describes the batches it timed.
No speed is asserted here (speed belongs to the benchmark's output, not to a test)."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_model_ab_runs_and_counts_tokens(tmp_path):
    sys.path.insert(0, str(REPO / "tests"))
    import bench_trl
    import data
    tok = data.load_tokenizer(data.resolve_model("embedded"))
    expected = []
    for name, seqs, _ in bench_trl.ab_batches("embedded", tok):
        b = data.collate(seqs, tok.pad_token_id)
        expected.append((name, int(b["attention_mask"].sum()), b["input_ids"].numel()))
    assert expected[0][1] == sum(len(p) + len(c) for p, c in bench_trl.ab_batches("embedded", tok)[0][1])
    p = subprocess.run([sys.executable, str(REPO / "tests" / "bench_trl.py"), "--only", "ab", "--sizes", "embedded",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [line for line in (tmp_path / "ab.md").read_text().splitlines() if line.startswith("| SFT")
            or line.startswith("| GRPO")]
    assert len(rows) == 3
    for row, (name, real, padded) in zip(rows, expected):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == name and cells[1].startswith(f"{real} / {padded} ")
        ours, plain, ratio = float(cells[2]), float(cells[3]), float(cells[4])
        assert ours > 0 and plain > 0 and abs(ratio - plain / ours) < 0.01 + 0.01 * ratio
        assert re.fullmatch(r"[\d.]+ \(\d+\)", cells[5]) and re.fullmatch(r"[\d.]+ \(\d+\)", cells[6])
        saved_ours, saved_plain = map(float, cells[7].split(" / "))
        assert 0 < saved_ours < saved_plain  # padding-free: autograd keeps fewer bytes (deterministic, not a timing)
    assert "ab.md" in (tmp_path / "summary.md").read_text()
