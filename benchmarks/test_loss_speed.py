"""benchmarks/loss_speed.py (the CE-commitment and diversity losses, two checkouts in fresh
processes), one tiny round: it cannot rot."""

from benchmarks._smoke import old_new_smoke


def test_loss_speed_smoke(tmp_path):
    rounds = old_new_smoke(tmp_path, "loss_speed", "loss", ["ce", "diversity"], "64 × 300 × 8")
    assert all(rnd["peak_bytes"]["new"] >= 0 for rnd in rounds)
