"""The static model's per-class calibration (benchmarks/gpu_model.py) against the committed H200
runs: factors from the data, and what they do to the predictions of the measured defaults."""

import pytest

from benchmarks import gpu_model as gm


@pytest.fixture(scope="module")
def cal():
    return gm.calibration(gm.load_static(), gm.MEASURED_H200)


def test_every_measured_class_gets_the_median_of_its_ratios(cal):
    rows = gm.compare(gm.load_static(), gm.MEASURED_H200)
    assert set(cal["factors"]) == {r["case"] for r in rows}
    for case, f in cal["factors"].items():
        seen, ratios = set(), []
        for r in rows:
            key = (r["d"], r["k"], tuple(r["config"]))
            if r["case"] == case and key not in seen:
                seen.add(key)
                ratios.append(r["measured_ms"] / r["predicted_ms"])
        ratios.sort()
        mid = (ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2
        assert f == pytest.approx(mid) and cal["counts"][case] == len(ratios)


def test_calibrated_defaults_land_near_their_measurement(cal):
    """Out of sample (leave-one-out): the raw model predicted 0.25-0.92 of these measurements."""
    defaults = [x["calibrated_over_measured"] for x in cal["loo"] if x["default"]]
    assert len(defaults) >= 8
    assert all(0.7 <= r <= 1.4 for r in defaults), defaults


def test_table_carries_calibrated_ms_on_sm90_only():
    rows = gm.table(gm.load_static(), ("H200", "A100"))
    h200 = [r for r in rows if r["device"] == "H200" and r["case"] == "fp32 tf32x3"]
    factor = gm.calibration(gm.load_static(), gm.MEASURED_H200)["factors"]["fp32 tf32x3"]
    assert h200 and all(r["calibrated_ms"] == pytest.approx(r["fused_ms"] * factor) for r in h200)
    assert all(r["calibrated_ms"] is None for r in rows if r["device"] == "A100")


def test_the_gluon_search_has_its_own_rows_on_sm90():
    """The sm_90 default for bf16 (the Gluon kernel) is modelled with its own schedule: a pair of
    tiles takes T + max(T, E) + E (the first epilogue under the second tile's MMAs), or its L2
    time; uncalibrated (no GPU run of it yet), and absent on sm_80."""
    static = gm.load_static()
    rows = gm.table(static, ("H100", "A100"))
    gluon = [r for r in rows if r["case"] == "bf16 Gluon"]
    assert gluon and all(r["device"] == "H100" and r["calibrated_ms"] is None for r in gluon)
    for r in gluon:
        t, e, m = r["tile_tensor"], r["tile_epilogue"], r["tile_l2"]
        assert r["tile_tile"] == pytest.approx(max((t + max(t, e) + e) / 2, m))
        assert r["config"][1] == 128 and r["tile_blocks_per_sm"] == 1
    assert "| bf16 Gluon |" in gm.markdown(gluon)
