"""benchmarks/residual_defaults.py (ResidualVQ's defaults study), one tiny run of both setups and
its table: it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_residual_defaults_quick(tmp_path):
    pytest.importorskip("vector_quantize_pytorch")  # the reference column
    from fastvq.app.data import DataNotFoundError, find_dataset

    try:
        find_dataset("fashion-mnist")
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST is not on this machine")
    out = tmp_path / "rd.json"
    cmd = [sys.executable, "-m", "benchmarks.residual_defaults"]
    run = subprocess.run([*cmd, "--quick", "--out", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [(r["setup"], r["name"]) for r in doc["results"]] == [
        ("images", "fastvq defaults"), ("images", "vqp defaults"),
        ("flat", "fastvq defaults"), ("flat", "vqp defaults"),
    ]  # fmt: skip
    for r in doc["results"]:
        assert r["steps"] == 5 and len(r["usage_per_depth"]) == 4
        assert 0 < r["test_mse"] < 1 and all(0 < u <= 1 for u in r["usage_per_depth"])
        assert r["step_s_median"] > 0
    table = subprocess.run([*cmd, "--table", str(out)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert table.returncode == 0, table.stderr[-3000:]
    assert "| fastvq defaults |" in table.stdout and "| +0.0% |" in table.stdout
    assert "5 steps)" in table.stdout


def test_residual_defaults_rejects_unknown_setup(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.residual_defaults", "--setups", "audio",
         "--out", str(tmp_path / "x.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode != 0 and "--setups: unknown setup 'audio'" in run.stderr


def test_residual_defaults_timing_fresh_processes(tmp_path):
    from fastvq.app.data import DataNotFoundError, find_dataset

    try:
        find_dataset("fashion-mnist")
    except DataNotFoundError:
        pytest.skip("Fashion-MNIST is not on this machine")
    out = tmp_path / "t.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.residual_defaults", "--timing", "rotation trick",
         "--setups", "flat", "--rounds", "2", "--steps", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (res,) = json.loads(out.read_text())["results"]
    assert res["setup"] == "flat" and len(res["rounds"]) == 2
    assert (
        res["median_ratio"]["fastvq defaults"] == 1.0 and res["median_ratio"]["rotation trick"] > 0
    )
    for rnd in res["rounds"]:
        assert set(rnd) == {"fastvq defaults", "rotation trick"}
        assert all(m["step_s_median"] > 0 for m in rnd.values())
