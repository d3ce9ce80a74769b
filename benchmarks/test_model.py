"""VQ-VAE training-step throughput: fastvq's layer vs vector-quantize-pytorch's, same model."""

from benchmarks._harness import run_cell


def test_model(benchmark, cell, mode):
    run_cell(benchmark, cell, mode)
