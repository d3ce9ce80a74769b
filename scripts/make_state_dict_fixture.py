"""Write tests/fixtures/state_dicts_<commit>.pt: the layers' state_dicts of today, with the outputs
they must keep giving, for tests/test_old_state_dicts.py (checkpoints written before a refactor
must load and behave the same after it).

    python scripts/make_state_dict_fixture.py   # writes tests/fixtures/state_dicts_<HEAD>.pt
    python scripts/make_state_dict_fixture.py --out PATH.pt

Each entry: the class name and constructor kwargs, the ``state_dict`` after ``steps`` training
steps (seeded inputs, backward of ``mean(quantized^2) + loss``, SGD on the parameters), a fixed
input (and mask), and what a freshly built layer that loads that state with ``strict=True`` gives:

* ``eval``: ``(quantized, indices, loss)`` of an eval-mode forward;
* ``train``: ``(quantized, indices, loss)`` of one training forward after
  ``torch.manual_seed(TRAIN_SEED)``, and the ``state_dict`` after it.

Torch backend, one thread. The layer's generators (restart noise, quantize dropout) are not part of
a ``state_dict``, so the expectations come from the fresh layer, as the test computes them.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch

import fastvq

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEED = 1234
DIM = 16


def entries() -> dict:
    """name -> (class name, kwargs, training steps before saving, input shape, with a mask)."""
    vq, rvq, grvq = "VectorQuantizer", "ResidualVQ", "GroupedResidualVQ"
    k = 32
    return {
        "ema": (vq, {"codebook_size": k}, 2, (4, 8), False),
        "ema_restart_counters": (
            vq,
            {"codebook_size": 64, "kmeans_init": False, "dead_code_steps": 3},
            2,
            (16,),
            False,
        ),  # steps_unused == 2 saved: the train forward restarts codes
        "grad": (vq, {"codebook_size": k, "ema": False}, 2, (4, 8), False),
        "cosine_ema": (vq, {"codebook_size": k, "cosine": True}, 2, (4, 8), False),
        "cosine_grad": (vq, {"codebook_size": k, "cosine": True, "ema": False}, 2, (4, 8), False),
        "heads2_own": (vq, {"codebook_size": k, "heads": 2}, 2, (4, 8), False),
        "heads2_shared_mask": (
            vq,
            {"codebook_size": k, "heads": 2, "shared_codebook": True},
            2,
            (4, 8),
            True,
        ),
        "projection": (vq, {"codebook_size": k, "codebook_dim": 8}, 2, (4, 8), False),
        "projection_grad_heads2": (
            vq,
            {"codebook_size": k, "codebook_dim": 4, "heads": 2, "ema": False},
            2,
            (4, 8),
            False,
        ),
        "simvq": (vq, {"codebook_size": k, "simvq": True}, 2, (4, 8), False),
        "kmeans_not_initted": (vq, {"codebook_size": k}, 0, (4, 8), False),
        "rvq": (rvq, {"codebook_size": k, "num_quantizers": 3}, 2, (4, 8), False),
        "rvq_shared_grad": (
            rvq,
            {"codebook_size": k, "num_quantizers": 2, "shared_codebook": True, "ema": False},
            2,
            (4, 8),
            False,
        ),
        "grvq": (grvq, {"codebook_size": k, "num_quantizers": 2, "groups": 2}, 2, (4, 8), False),
    }


def build(cls: str, kwargs: dict):
    torch.manual_seed(0)
    return getattr(fastvq, cls)(DIM, **kwargs, backend="torch")


def draw(shape: tuple, with_mask: bool, seed: int):
    torch.manual_seed(seed)
    x = torch.randn(*shape, DIM)
    if not with_mask:
        return x, None
    mask = torch.rand(shape) > 0.3
    x[~mask] = float("nan")  # padding: masked rows count nowhere, whatever they hold
    return x, mask


def outputs(out) -> dict:
    return {"quantized": out[0].detach().clone(), "indices": out[1].clone(),
            "loss": out[2].detach().clone()}  # fmt: skip


def state(layer) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def expected(cls: str, kwargs: dict, saved: dict, x, mask) -> tuple[dict, dict]:
    """What a fresh layer loading ``saved`` gives: (eval outputs, train outputs and state)."""
    layer = build(cls, kwargs)
    layer.load_state_dict(saved, strict=True)
    with torch.no_grad():
        ev = outputs(layer.eval()(x, mask))
    layer = build(cls, kwargs)
    layer.load_state_dict(saved, strict=True)
    torch.manual_seed(TRAIN_SEED)
    tr = outputs(layer.train()(x, mask))
    tr["state_dict"] = state(layer)
    return ev, tr


def make() -> dict:
    out = {}
    for name, (cls, kwargs, steps, shape, with_mask) in entries().items():
        layer = build(cls, kwargs).train()
        params = list(layer.parameters())
        opt = torch.optim.SGD(params, lr=0.05) if params else None
        for step in range(steps):
            x, mask = draw(shape, with_mask, 10 + step)
            torch.manual_seed(20 + step)
            q, _, loss = layer(x.requires_grad_(True), mask)[:3]
            q = q if mask is None else torch.where(mask[..., None], q, 0.0)
            (q.square().mean() + loss).backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        saved = state(layer)
        x, mask = draw(shape, with_mask, 99)
        ev, tr = expected(cls, kwargs, saved, x, mask)
        with torch.no_grad():  # the state_dict holds everything an eval forward reads
            again = layer.eval()(x, mask)
        assert all(torch.equal(a, b) for a, b in zip(again[:3], ev.values(), strict=True)), name
        out[name] = {"cls": cls, "kwargs": kwargs, "state_dict": saved, "x": x, "mask": mask,
                     "train_seed": TRAIN_SEED, "eval": ev, "train": tr}  # fmt: skip
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    out = a.out or ROOT / "tests" / "fixtures" / f"state_dicts_{commit}.pt"
    torch.set_num_threads(1)
    doc = {"commit": commit, "torch": str(torch.__version__), "entries": make()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(doc, out)
    print(f"wrote {out}: {len(doc['entries'])} entries, {out.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
