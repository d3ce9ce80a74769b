"""Checkpoints written by older code keep loading and behaving the same, bit for bit.

The fixture (``scripts/make_state_dict_fixture.py``) holds, for every option group, the layer's
constructor kwargs, its ``state_dict`` after a few training steps (or none: k-means pending), an
input, and the eval and training outputs a freshly built layer gave after loading it. Torch
backend, one thread (as the fixture was made).
"""

from pathlib import Path

import pytest
import torch

import fastvq

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("state_dicts_*.pt"))
CASES = [
    (path, name)
    for path in FIXTURES
    for name in torch.load(path, weights_only=True)["entries"]
]  # fmt: skip


def _assert_equal(got: dict, want: dict, what: str) -> None:
    for key, w in want.items():
        g = got[key]
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what} {key}: {g.dtype} {g.shape}"
        assert torch.equal(g, w), f"{what} {key}: {(g != w).sum().item()} elements differ"


def _outputs(out) -> dict:
    return {"quantized": out[0].detach(), "indices": out[1], "loss": out[2].detach()}


def _fresh(entry: dict):
    torch.manual_seed(0)
    layer = getattr(fastvq, entry["cls"])(16, **entry["kwargs"], backend="torch")
    layer.load_state_dict(entry["state_dict"], strict=True)
    return layer


@pytest.mark.parametrize(
    ("path", "name"), CASES, ids=[f"{p.stem.removeprefix('state_dicts_')}-{n}" for p, n in CASES]
)
def test_old_state_dict_loads_and_gives_the_same_outputs(path, name, one_thread):
    entry = torch.load(path, weights_only=True)["entries"][name]
    x, mask = entry["x"], entry["mask"]
    layer = _fresh(entry)
    _assert_equal(layer.state_dict(), entry["state_dict"], "loaded state_dict")
    with torch.no_grad():
        _assert_equal(_outputs(layer.eval()(x, mask)), entry["eval"], "eval")
    layer = _fresh(entry).train()
    torch.manual_seed(entry["train_seed"])
    out = _outputs(layer(x, mask))
    want = dict(entry["train"])
    _assert_equal(layer.state_dict(), want.pop("state_dict"), "state_dict after a train forward")
    _assert_equal(out, want, "train")


def test_fixture_covers_the_option_groups():
    assert FIXTURES, "no tests/fixtures/state_dicts_*.pt"
    names = {n for _, n in CASES}
    for want in ("ema", "grad", "cosine_ema", "heads2_own", "heads2_shared_mask", "projection",
                 "simvq", "kmeans_not_initted", "ema_restart_counters", "rvq", "grvq"):  # fmt: skip
        assert want in names
