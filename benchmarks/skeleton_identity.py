"""Bit-identity record of the layers' behaviour, to check a refactor that promises no change.

    python -m benchmarks.skeleton_identity record OUT.json     # hash every output and state
    python -m benchmarks.skeleton_identity compare OUT.json    # re-run; exit 1 on any difference
    python -m benchmarks.skeleton_identity compare OUT.json --only rvq_beam,sharded_ema

For every case of ``CASES`` and both backends ("torch", and "triton" under Triton's CPU interpreter
where there is no CUDA), on one CPU thread:

1. ``torch.manual_seed(0)``, then build the layer;
2. three training steps: draw a seeded input (and a mask, NaN at masked positions where the case
   has one), seed the global RNG (sampled codes and quantize dropout draw from it), forward,
   backward of ``mean(quantized^2) + loss`` (masked rows left out), an SGD step on the
   parameters, if any;
3. one eval forward on a seeded input (and ``codes_from_indices`` / ``get_codebook`` where the
   layer has them).

Each record item is ``dtype shape sha256`` of a tensor's bytes: every output field (quantized,
indices, loss, stats, loss breakdown, losses), ``x.grad``, every parameter's grad (keyed by its
``state_dict`` key, found by identity in ``state_dict(keep_vars=True)``) and every ``state_dict``
tensor after each step. Only the public API is used (constructors, ``forward`` and its keywords,
``state_dict``, ``update_codebook_from_indices``, ``codes_from_indices``, ``get_codebook``), so
the record of one commit can be compared with a refactored one whose module paths differ.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before fastvq imports triton (it does so lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import fastvq  # noqa: E402

from ._stamp import git_commit

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "triton")
STEPS = 3
LR = 0.05


@dataclass
class Case:
    """One configuration: the layer class, its keyword arguments and how it is driven."""

    kwargs: dict
    cls: str = "VectorQuantizer"  # or ResidualVQ, GroupedResidualVQ, ShardedVectorQuantizer
    shape: tuple = (4, 32, 16)  # the input; (B, dim, H, W) with channel_first
    mask: bool = False  # a bool mask (True = real token), NaN in x where it is False
    fwd: dict = field(default_factory=dict)  # forward's keyword arguments
    manual: bool = False  # forward(ema_update=False), then update_codebook_from_indices

    def build(self, backend: str):
        cls = getattr(fastvq, self.cls, None)
        if cls is None:  # ShardedVectorQuantizer is not exported at the top level
            from fastvq import sharded

            cls = getattr(sharded, self.cls)
        dim = self.shape[1] if self.kwargs.get("channel_first") else self.shape[-1]
        return cls(dim, **self.kwargs, backend=backend)


VQ, RVQ, GRVQ, SVQ = "VectorQuantizer", "ResidualVQ", "GroupedResidualVQ", "ShardedVectorQuantizer"
K = 32
FEW = (16, 16)  # few rows for many codes: codes die, and restarts fire at dead_code_steps=1
CASES: dict[str, Case] = {
    "ema_default": Case({"codebook_size": K}),
    "ema_no_kmeans": Case({"codebook_size": K, "kmeans_init": False}),
    "grad": Case({"codebook_size": K, "ema": False}),
    "grad_no_kmeans": Case({"codebook_size": K, "ema": False, "kmeans_init": False}),
    "restart_ema": Case(
        {"codebook_size": 64, "kmeans_init": False, "dead_code_steps": 1}, shape=FEW
    ),
    "restart_grad": Case(
        {"codebook_size": 64, "ema": False, "kmeans_init": False, "dead_code_steps": 1},
        shape=FEW,
    ),
    "restart_kmeans": Case({"codebook_size": 64, "dead_code_steps": 1}, shape=FEW),
    "cosine_ema": Case({"codebook_size": K, "cosine": True}),
    "cosine_grad": Case({"codebook_size": K, "cosine": True, "ema": False}),
    "heads2": Case({"codebook_size": K, "heads": 2}),
    "heads2_grad": Case({"codebook_size": K, "heads": 2, "ema": False}),
    "heads2_shared": Case({"codebook_size": K, "heads": 2, "shared_codebook": True}),
    "heads2_shared_grad": Case(
        {"codebook_size": K, "heads": 2, "shared_codebook": True, "ema": False}
    ),
    "codebook_dim": Case({"codebook_size": K, "codebook_dim": 8}),
    "codebook_dim_grad": Case({"codebook_size": K, "codebook_dim": 8, "ema": False}),
    "codebook_dim_heads2": Case({"codebook_size": K, "codebook_dim": 4, "heads": 2}),
    "channel_first": Case({"codebook_size": K, "channel_first": True}, shape=(2, 16, 4, 4)),
    "channel_first_grad": Case(
        {"codebook_size": K, "channel_first": True, "ema": False}, shape=(2, 16, 4, 4)
    ),
    "mask_nan": Case({"codebook_size": K}, mask=True),
    "mask_nan_grad": Case({"codebook_size": K, "ema": False}, mask=True),
    "mask_nan_heads2_shared": Case(
        {"codebook_size": K, "heads": 2, "shared_codebook": True, "dead_code_steps": 1}, mask=True
    ),
    "rotation_trick": Case({"codebook_size": K, "rotation_trick": True}),
    "rotation_trick_grad_mask": Case(
        {"codebook_size": K, "rotation_trick": True, "ema": False}, mask=True
    ),
    "simvq": Case({"codebook_size": K, "simvq": True}),
    "simvq_heads2_cosine": Case({"codebook_size": K, "simvq": True, "heads": 2, "cosine": True}),
    "orthogonal": Case({"codebook_size": K, "ema": False, "orthogonal_reg_weight": 0.5}),
    "orthogonal_max_codes": Case(
        {
            "codebook_size": K,
            "ema": False,
            "orthogonal_reg_weight": 0.5,
            "orthogonal_reg_max_codes": 8,
        }
    ),
    "orthogonal_active_heads2": Case(
        {
            "codebook_size": K,
            "ema": False,
            "heads": 2,
            "orthogonal_reg_weight": 0.5,
            "orthogonal_reg_active_codes_only": True,
        }
    ),
    "diversity": Case({"codebook_size": K, "ema": False, "codebook_diversity_loss_weight": 0.1}),
    "diversity_ema_mask": Case(
        {"codebook_size": K, "codebook_diversity_loss_weight": 0.1}, mask=True
    ),
    "ce_commitment": Case({"codebook_size": K, "commitment_use_cross_entropy_loss": True}),
    "ce_commitment_grad_mask": Case(
        {"codebook_size": K, "ema": False, "commitment_use_cross_entropy_loss": True}, mask=True
    ),
    "stochastic": Case(
        {"codebook_size": K, "stochastic_sample_codes": True, "sample_codebook_temp": 0.5}
    ),
    "stochastic_grad": Case({"codebook_size": K, "ema": False, "stochastic_sample_codes": True}),
    "topk3": Case({"codebook_size": K}, fwd={"topk": 3}),
    "topk3_heads2": Case({"codebook_size": K, "heads": 2}, fwd={"topk": 3}),
    "stats_breakdown": Case(
        {"codebook_size": K}, fwd={"return_stats": True, "return_loss_breakdown": True}
    ),
    "stats_breakdown_grad_aux": Case(
        {
            "codebook_size": K,
            "ema": False,
            "orthogonal_reg_weight": 0.5,
            "codebook_diversity_loss_weight": 0.1,
            "heads": 2,
        },
        fwd={"return_stats": True, "return_loss_breakdown": True},
        mask=True,
    ),
    "freeze_ema": Case({"codebook_size": K, "freeze_codebook": True}),
    "freeze_grad": Case({"codebook_size": K, "ema": False, "freeze_codebook": True}),
    "freeze_per_call": Case({"codebook_size": K, "ema": False}, fwd={"freeze_codebook": True}),
    "manual_ema_update": Case({"codebook_size": K, "dead_code_steps": 2}, manual=True),
    "manual_ema_update_heads2_mask": Case(
        {"codebook_size": K, "heads": 2, "dead_code_steps": 1}, manual=True, mask=True
    ),
    "decay1": Case({"codebook_size": K, "decay": 1.0, "dead_code_steps": 1}),
    "rvq_greedy": Case({"codebook_size": K, "num_quantizers": 3}, cls=RVQ),
    "rvq_greedy_grad_losses": Case(
        {"codebook_size": K, "num_quantizers": 3, "ema": False},
        cls=RVQ,
        fwd={"return_losses": True, "return_stats": True},
        mask=True,
    ),
    "rvq_shared": Case({"codebook_size": K, "num_quantizers": 3, "shared_codebook": True}, cls=RVQ),
    "rvq_shared_grad": Case(
        {"codebook_size": K, "num_quantizers": 3, "shared_codebook": True, "ema": False}, cls=RVQ
    ),
    "rvq_beam": Case({"codebook_size": K, "num_quantizers": 3, "beam_size": 3}, cls=RVQ),
    "rvq_beam_grad_losses": Case(
        {"codebook_size": K, "num_quantizers": 3, "beam_size": 4, "ema": False},
        cls=RVQ,
        fwd={"return_losses": True, "return_stats": True},
    ),
    "rvq_dropout": Case(
        {"codebook_size": (K, 16, 8), "quantize_dropout": True, "dead_code_steps": 1}, cls=RVQ
    ),
    "grvq": Case({"codebook_size": K, "num_quantizers": 2, "groups": 2}, cls=GRVQ),
    "grvq_dropout_losses": Case(
        {
            "codebook_size": K,
            "num_quantizers": 3,
            "groups": 2,
            "quantize_dropout": True,
            "ema": False,
        },
        cls=GRVQ,
        fwd={"return_losses": True},
    ),
    "sharded_grad": Case({"codebook_size": K}, cls=SVQ),
    "sharded_ema_restart": Case(
        {"codebook_size": 64, "ema": True, "kmeans_init": True, "dead_code_steps": 1},
        cls=SVQ,
        shape=FEW,
    ),
    "sharded_codebook_dim_cosine": Case(
        {"codebook_size": K, "codebook_dim": 8, "cosine": True, "rotation_trick": True}, cls=SVQ
    ),
}


def digest(t: torch.Tensor) -> str:
    """``dtype shape sha256`` of a tensor's bytes."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)} {h}"


def record_outputs(rec: dict, prefix: str, obj) -> None:
    """Every tensor of a (nested) forward output, named by its fields."""
    if isinstance(obj, torch.Tensor):
        rec[prefix] = digest(obj)
    elif obj is None:
        rec[prefix] = "None"
    elif hasattr(obj, "_fields"):  # NamedTuple: the public field names
        for name in obj._fields:
            record_outputs(rec, f"{prefix}.{name}", getattr(obj, name))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            record_outputs(rec, f"{prefix}[{i}]", v)
    else:
        rec[prefix] = repr(obj)


def record_state(rec: dict, prefix: str, layer) -> None:
    for key, v in sorted(layer.state_dict().items()):
        rec[f"{prefix}/state/{key}"] = digest(v) if isinstance(v, torch.Tensor) else repr(v)


def record_param_grads(rec: dict, prefix: str, layer) -> None:
    """Each parameter's grad under every ``state_dict`` key that holds it (found by identity)."""
    keys: dict[int, list[str]] = {}
    for key, v in layer.state_dict(keep_vars=True).items():
        keys.setdefault(id(v), []).append(key)
    for p in layer.parameters():
        for key in keys[id(p)]:  # a parameter missing from state_dict is a KeyError: a change
            rec[f"{prefix}/grad/{key}"] = "None" if p.grad is None else digest(p.grad)


def draw_input(case: Case, seed: int):
    torch.manual_seed(seed)
    x = torch.randn(case.shape)
    mask = None
    if case.mask:
        lead = x.movedim(1, -1).shape[:-1] if case.kwargs.get("channel_first") else x.shape[:-1]
        mask = torch.rand(lead) > 0.3
        x[~mask] = float("nan")  # padding: whatever a masked row holds must not matter
    return x, mask


def objective(out, mask, channel_first: bool) -> torch.Tensor:
    q = out[0].float()
    if channel_first:
        q = q.movedim(1, -1)
    if mask is not None:
        q = torch.where(mask[..., None], q, 0.0)
    return q.square().mean() + out[2]


def run_case(case: Case, backend: str) -> dict:
    """Every hash of one case on one backend, in a fixed order."""
    rec: dict[str, str] = {}
    torch.manual_seed(0)
    layer = case.build(backend).train()
    record_state(rec, "init", layer)
    params = list(layer.parameters())
    opt = torch.optim.SGD(params, lr=LR) if params else None
    cf = bool(case.kwargs.get("channel_first"))
    for step in range(STEPS):
        pre = f"step{step}"
        x, mask = draw_input(case, 100 + step)
        x.requires_grad_(True)
        kw = {} if mask is None else {"mask": mask}
        torch.manual_seed(200 + step)  # sampled codes, quantize dropout, orthogonal subsets
        if case.manual:
            out = layer(x, **kw, **case.fwd, ema_update=False)
            layer.update_codebook_from_indices(x.detach(), out.indices, **kw)
        else:
            out = layer(x, **kw, **case.fwd)
        record_outputs(rec, f"{pre}/out", out)
        objective(out, mask, cf).backward()
        rec[f"{pre}/x.grad"] = "None" if x.grad is None else digest(x.grad)
        record_param_grads(rec, pre, layer)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        record_state(rec, pre, layer)
    layer.eval()
    x, mask = draw_input(case, 300)
    torch.manual_seed(400)
    with torch.no_grad():
        out = layer(x, **({} if mask is None else {"mask": mask}), **case.fwd)
        record_outputs(rec, "eval/out", out)
        if hasattr(layer, "codes_from_indices") and "topk" not in case.fwd:
            rec["eval/codes_from_indices"] = digest(layer.codes_from_indices(out.indices))
        if hasattr(layer, "get_codebook"):
            rec["eval/get_codebook"] = digest(layer.get_codebook())
    record_state(rec, "eval", layer)
    return rec


def run_all(names, backends) -> tuple[dict, dict]:
    results, seconds = {b: {} for b in backends}, {}
    for backend in backends:
        t0 = time.perf_counter()
        for name in names:
            results[backend][name] = run_case(CASES[name], backend)
        seconds[backend] = round(time.perf_counter() - t0, 1)
        print(f"{backend}: {len(names)} cases in {seconds[backend]} s", file=sys.stderr)
    return results, seconds


def header(seconds: dict) -> dict:
    import triton

    return {
        "commit": git_commit(ROOT),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": triton.__version__,
        "machine": f"{platform.node()} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(), "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "fastvq": fastvq.__file__, "seconds": seconds,
    }  # fmt: skip


def first_difference(want: dict, got: dict) -> str | None:
    """The first item (in record order) whose hash differs, or that one side lacks."""
    for key, w in want.items():
        g = got.get(key, "<missing>")
        if g != w:
            return f"{key}: recorded {w}, now {g}"
    extra = [k for k in got if k not in want]
    return f"{extra[0]}: not recorded, now {got[extra[0]]}" if extra else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=("record", "compare"))
    ap.add_argument("path", type=Path)
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: CPU reductions split alike on any machine
    names = a.only.split(",") if a.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    backends = a.backends.split(",")
    if "triton" in backends and not fastvq.triton_available():
        ap.error("Triton is not importable here: pass --backends torch")
    results, seconds = run_all(names, backends)
    if a.action == "record":
        doc = {"header": header(seconds), "results": results}
        a.path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {a.path}: {len(names)} cases x {len(backends)} backends", file=sys.stderr)
        return 0
    doc = json.loads(a.path.read_text())
    print(f"recorded: {doc['header']['commit']} ({doc['header']['date']}); now: {git_commit(ROOT)}")
    bad = 0
    for backend in backends:
        for name in names:
            want = doc["results"].get(backend, {}).get(name)
            if want is None:
                print(f"  {backend:6} {name}: not in the record")
                bad += 1
                continue
            diff = first_difference(want, results[backend][name])
            n = sum(want.get(k) != v for k, v in results[backend][name].items())
            print(f"  {backend:6} {name}: " + ("identical" if diff is None else f"{n} differ; "
                  f"first {diff}"))  # fmt: skip
            bad += diff is not None
    print(f"{bad} of {len(names) * len(backends)} differ" if bad else "all identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
