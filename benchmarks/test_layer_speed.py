"""benchmarks/layer_speed.py (the layer's training step, two checkouts in fresh processes), one tiny
round: it cannot rot."""

from benchmarks._smoke import old_new_smoke


def test_layer_speed_smoke(tmp_path):
    rounds = old_new_smoke(tmp_path, "layer_speed", "step", ["ema", "grad"], "256 × 128 × 16")
    assert all(rnd["peak_bytes"]["new"] > 0 for rnd in rounds)
