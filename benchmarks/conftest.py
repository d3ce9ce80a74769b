"""Benchmark session setup: grid parametrization, and skip/OOM outcomes written into the JSON.

The benchmarks are not part of the default ``pytest`` run (pyproject's testpaths is ``tests``).
``pytest benchmarks/ --benchmark-disable`` (or ``FASTVQ_BENCH_SMOKE=1``) runs every cell once at
tiny sizes; otherwise the grid follows ``FASTVQ_BENCH_GRID`` (see ``_grid.py``).
"""

from __future__ import annotations

import shlex
import sys

import pytest
import torch

from benchmarks._grid import cells_for, mode_from_env
from benchmarks._harness import OUTCOMES


def _mode(config) -> str:
    disabled = bool(config.getoption("benchmark_disable", default=False))
    return mode_from_env(disabled, torch.cuda.is_available())


def pytest_report_header(config):
    return f"fastvq benchmarks: grid={_mode(config)}"


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        op = metafunc.function.__name__.removeprefix("test_")
        cells = cells_for(_mode(metafunc.config), torch.cuda.is_available())
        cells = [c for c in cells if c.op == op]
        metafunc.parametrize("cell", cells, ids=[c.id for c in cells])


@pytest.fixture
def mode(request) -> str:
    return _mode(request.config)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Rows without timings (skipped, out of memory, peer errors) are results too."""
    output_json["fastvq_outcomes"] = list(OUTCOMES)
    output_json["fastvq_grid"] = _mode(config)
    output_json["fastvq_command"] = shlex.join(["pytest", *sys.argv[1:]])
