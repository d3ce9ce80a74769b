"""benchmarks/quantizer_compare.py at tiny size (synthetic data, a narrow model, 2 steps), one
configuration per family: it cannot rot. Then the table and plot from its JSON, into a doc."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.quantizer_compare import write_doc

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["vq-1024", "fsq-1000", "bsq-16384"]


def test_quantizer_compare_quick(tmp_path):
    out = tmp_path / "q.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.quantizer_compare", "--quick", "--out", str(out),
         "--configs", *CONFIGS],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["machine"] and doc["date"] and doc["settings"]["steps"] == 2
    assert [r["config"] for r in doc["runs"]] == CONFIGS
    for r in doc["runs"]:
        assert r["test_images"] == 16 and r["test_mse"] > 0 and r["seconds_per_step"] > 0
        assert 1 <= r["codes_used"] <= r["codebook_size"] and r["perplexity"] >= 1
    assert {r["codebook_size"] for r in doc["runs"]} == {1024, 1000, 16384}
    for name in CONFIGS:
        assert f"| {name} |" in run.stdout
    page = tmp_path / "page.md"
    start, end = "<!-- quantizer-table:start -->", "<!-- quantizer-table:end -->"
    page.write_text(f"# title\n\n{start}\nold\n{end}\n\nafter\n")
    write_doc([doc], page)
    text = page.read_text()
    assert "old" not in text and "| fsq-1000 | 1000 |" in text and text.endswith("after\n")
    assert page.with_suffix(".png").stat().st_size > 0
