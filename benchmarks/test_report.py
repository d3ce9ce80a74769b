"""The report renderer on a synthetic pytest-benchmark JSON (no measurement involved)."""

import json

from benchmarks._grid import Cell
from benchmarks.report import main


def _entry(cell: Cell, median: float, peak: int) -> dict:
    info = dict(cell.to_dict(), device_name="test cpu", search_flops=cell.search_flops)
    info["peak_mem_bytes"] = peak
    return {"group": cell.group, "name": cell.id, "stats": {"median": median, "rounds": 3},
            "extra_info": info}  # fmt: skip


def test_report_tables_plots_and_outcomes(tmp_path):
    cells = {
        (p, k): Cell("fwdbwd", p, 1024, k, 32, "fp32", "cpu")
        for p in ("fastvq-torch", "vqp-train")
        for k in (64, 512)
    }
    oom = cells.pop(("vqp-train", 512))
    data = {
        "datetime": "2026-01-01T00:00:00",
        "machine_info": {"cpu": {"brand_raw": "test cpu"}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "benchmarks": [
            _entry(cells[("fastvq-torch", 64)], 0.010, 1 << 20),
            _entry(cells[("vqp-train", 64)], 0.040, 8 << 20),
            _entry(cells[("fastvq-torch", 512)], 0.020, 2 << 20),
        ],
        "fastvq_outcomes": [
            {
                "group": oom.group,
                "name": oom.id,
                "status": "oom",
                "reason": "out of memory at 16 GiB (RLIMIT_AS)",
                "extra_info": dict(oom.to_dict(), device_name="test cpu"),
            }
        ],
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    main([str(path), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "r.md").read_text()
    assert "| 64 | vqp-train | 40 ms | 4× | 8 MiB | 8× |" in md
    assert "**oom**: out of memory at 16 GiB" in md
    assert "`fastvq-torch` is 4× faster than `vqp-train`" in md
    assert (tmp_path / "out" / "r-fwdbwd-cpu-N1024-D32-fp32.png").stat().st_size > 1000
