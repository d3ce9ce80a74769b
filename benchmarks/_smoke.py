"""The side-by-side benchmarks' smoke tests' one helper: a ``--smoke`` run in a fresh process,
the way CI runs it, with its JSON and Markdown read back (so the scripts cannot rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def smoke_run(tmp_path: Path, module: str, *args: str) -> tuple[str, dict]:
    """``python -m benchmarks.<module> --smoke --out <tmp_path>/<module>.json *args``: its stdout
    (the Markdown table) and the JSON it wrote, after checking it exited 0 and wrote the Markdown
    beside the JSON."""
    out = tmp_path / f"{module}.json"
    run = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--smoke", *args, "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.with_suffix(".md").is_file()
    return run.stdout, json.loads(out.read_text())


def old_new_smoke(tmp_path: Path, module: str, field: str, cases, shape: str) -> list[dict]:
    """:func:`smoke_run` of an ``_ab.OldNew`` script with this checkout on both sides, one thread:
    a table line and a row per case at ``shape`` (``"N × K × D"``), in order, both sides' times
    positive. Returns each row's one round."""
    stdout, doc = smoke_run(tmp_path, module, "--threads", "1", "--ref", str(ROOT))
    for case in cases:
        assert f"| {case} | {shape} |" in stdout, stdout
    assert [r[field] for r in doc["rows"]] == list(cases)
    rounds = [rnd for row in doc["rows"] for rnd in row["rounds"]]
    assert len(rounds) == len(cases)
    assert all(rnd["new"] > 0 and rnd["old"] > 0 for rnd in rounds)
    return rounds
