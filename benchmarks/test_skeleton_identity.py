"""benchmarks/skeleton_identity.py records and compares (torch backend, two cases): it cannot rot,
and a changed hash fails the comparison."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMD = [sys.executable, "-m", "benchmarks.skeleton_identity"]
ARGS = ["--only", "ema_default,rvq_beam", "--backends", "torch"]


def _run(*args):
    return subprocess.run([*CMD, *args, *ARGS], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_skeleton_identity_record_compare(tmp_path):
    path = tmp_path / "id.json"
    assert _run("record", str(path)).returncode == 0
    same = _run("compare", str(path))
    assert same.returncode == 0 and "all identical" in same.stdout, same.stdout + same.stderr
    doc = json.loads(path.read_text())
    rec = doc["results"]["torch"]["rvq_beam"]
    assert "step2/x.grad" in rec and "eval/out.indices" in rec
    rec["step1/out.loss"] = rec["step1/out.loss"][:-1] + "x"
    path.write_text(json.dumps(doc))
    diff = _run("compare", str(path))
    assert diff.returncode == 1 and "first step1/out.loss" in diff.stdout
