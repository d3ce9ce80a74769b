"""benchmarks/loss_speed.py (the CE-commitment and diversity losses, two checkouts in fresh
processes), one tiny round: it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loss_speed_smoke(tmp_path):
    out = tmp_path / "speed.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.loss_speed", "--smoke", "--threads", "1",
         "--ref", str(ROOT), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| ce | 64 × 300 × 8 |" in run.stdout and "| diversity | 64 × 300 × 8 |" in run.stdout
    doc = json.loads(out.read_text())
    assert [r["loss"] for r in doc["rows"]] == ["ce", "diversity"]
    for row in doc["rows"]:
        (rnd,) = row["rounds"]
        assert rnd["new"] > 0 and rnd["old"] > 0 and rnd["peak_bytes"]["new"] >= 0
    assert out.with_suffix(".md").is_file()
