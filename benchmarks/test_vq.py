"""Every provider of one problem in one group: search, forward, forward+backward, EMA step."""

from benchmarks._harness import run_cell


def test_search(benchmark, cell, mode):
    run_cell(benchmark, cell, mode)


def test_fwd(benchmark, cell, mode):
    run_cell(benchmark, cell, mode)


def test_fwdbwd(benchmark, cell, mode):
    run_cell(benchmark, cell, mode)


def test_ema(benchmark, cell, mode):
    run_cell(benchmark, cell, mode)
