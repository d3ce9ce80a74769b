"""fastvq benchmarks (pytest-benchmark): ``pytest benchmarks/``; see docs/benchmarks.md."""
