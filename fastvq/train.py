"""Training loops, checkpoints and evaluation for the models in ``fastvq.models``.

A run directory holds
  * ``model.safetensors``: the weights (``safetensors.torch.save_model``);
  * ``optim.safetensors``: the optimizer's tensors, for ``--resume``;
  * ``run.json``: kind, model config, optimizer hyper-parameters, step, settings and metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from . import metrics as M
from .data import Split, to_float
from .models import (
    AE,
    VAE,
    VQVAE,
    AEConfig,
    Classifier,
    ClassifierConfig,
    PixelCNN,
    PixelCNNConfig,
    VAEConfig,
    VQVAEConfig,
)

MODELS = {
    "ae": (AE, AEConfig),
    "vae": (VAE, VAEConfig),
    "vqvae": (VQVAE, VQVAEConfig),
    "pixelcnn": (PixelCNN, PixelCNNConfig),
    "classifier": (Classifier, ClassifierConfig),
}


def build(kind: str, config: dict) -> torch.nn.Module:
    model_cls, cfg_cls = MODELS[kind]
    return model_cls(cfg_cls(**config))


# ---------------------------------------------------------------- checkpoints


def save_run(run_dir, model, kind: str, meta: dict, optimizer=None) -> None:
    """Write weights, optimizer tensors and ``run.json`` (atomically: tmp file + rename)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(model, str(run_dir / "model.safetensors.tmp"))
    os.replace(run_dir / "model.safetensors.tmp", run_dir / "model.safetensors")
    meta = dict(meta, kind=kind, config=dataclasses.asdict(model.cfg))
    if optimizer is not None:
        sd = optimizer.state_dict()
        tensors = {
            f"{pid}.{name}": t.detach().contiguous()
            for pid, st in sd["state"].items()
            for name, t in st.items()
            if torch.is_tensor(t)
        }
        save_file(tensors, str(run_dir / "optim.safetensors"))
        meta["optimizer"] = {"param_groups": sd["param_groups"]}
    elif (run_dir / "run.json").is_file():  # keep the saved optimizer state usable for --resume
        old = json.loads((run_dir / "run.json").read_text())
        if "optimizer" in old:
            meta["optimizer"] = old["optimizer"]
    (run_dir / "run.json.tmp").write_text(json.dumps(meta, indent=2, default=str))
    os.replace(run_dir / "run.json.tmp", run_dir / "run.json")


def read_meta(run_dir) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no run.json; not a fastvq run directory")
    return json.loads(path.read_text())


def load_run(run_dir, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from ``run.json`` and load its weights -> (model in eval mode, meta)."""
    meta = read_meta(run_dir)
    model = build(meta["kind"], meta["config"])
    load_model(model, str(Path(run_dir) / "model.safetensors"), device=str(device))
    return model.to(device).eval(), meta


def load_optimizer_state(optimizer, run_dir, meta) -> None:
    tensors = load_file(str(Path(run_dir) / "optim.safetensors"))
    state: dict = {}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    groups = meta["optimizer"]["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---------------------------------------------------------------- training loop


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def epoch_batches(
    data: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of shuffled mini-batches; the order depends only on (seed, step), so a
    resumed run sees the same batches as an uninterrupted one."""
    n = data.shape[0]
    per_epoch = max(1, n // batch_size)  # drop the last partial batch
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(n, generator=g)
        for b in range(offset, per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield data[idx], labels[idx]
        epoch, offset = epoch + 1, 0


def fit(
    model: torch.nn.Module,
    kind: str,
    data: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device="cpu",
    prepare: Callable[[torch.Tensor], torch.Tensor] = to_float,
    conditional: bool = False,
    evaluate: Callable[[torch.nn.Module], dict] | None = None,
    eval_every: int = 0,
    run_dir=None,
    meta: dict | None = None,
    resume: bool = False,
    desc: str | None = None,
    position: int | None = None,
) -> dict:
    """Train ``model`` for ``steps`` optimizer steps with Adam; returns the final meta dict.

    ``data``/``labels`` are whole training tensors (uint8 images, or int64 code maps with
    ``prepare=identity``); ``evaluate(model) -> dict`` runs every ``eval_every`` steps and at the
    end; with ``run_dir`` the run is checkpointed at each evaluation and at the end.
    """
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    meta = dict(meta or {})
    start = 0
    if resume and run_dir is not None and (Path(run_dir) / "run.json").is_file():
        old = read_meta(run_dir)
        load_model(model, str(Path(run_dir) / "model.safetensors"), device=str(device))
        if (Path(run_dir) / "optim.safetensors").is_file():
            load_optimizer_state(opt, run_dir, old)
        start = int(old.get("step", 0))
        meta = {**old, **meta, "history": old.get("history", [])}
    meta.setdefault("history", [])
    meta.update(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    torch.manual_seed(seed + start)
    stream = epoch_batches(data, labels, batch_size, seed, start)
    t0 = time.time()
    elapsed0 = float(meta.get("train_seconds", 0.0))
    bar = tqdm(
        total=steps,
        initial=start,
        desc=desc or f"train {kind}",
        position=position,
        dynamic_ncols=True,
        mininterval=0.5,
        leave=True,
    )
    logs: dict = {}
    step = start

    def checkpoint(final: bool) -> None:
        model.eval()
        if evaluate is not None:
            ev = evaluate(model)
            meta["metrics"] = ev
            meta["history"].append({"step": step, **{k: v for k, v in ev.items() if _scalar(v)}})
            bar.set_postfix({k: f"{v:.4g}" for k, v in ev.items() if _scalar(v)}, refresh=True)
        model.train()
        meta["step"] = step
        meta["train_seconds"] = elapsed0 + time.time() - t0
        if run_dir is not None:
            save_run(run_dir, model, kind, meta, opt)

    model.train()
    while step < steps:
        x, y = next(stream)
        x = prepare(x).to(device)
        y = y.to(device)
        loss, logs = model.training_loss(x, y if conditional or kind == "classifier" else None)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{kind}: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()}, refresh=False)
        if eval_every and step % eval_every == 0 and step < steps:
            checkpoint(final=False)
    checkpoint(final=True)
    bar.close()
    model.eval()
    meta["last_train_logs"] = logs
    return meta


def _scalar(v) -> bool:
    return isinstance(v, (int, float))


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def eval_recon(
    model,
    split: Split,
    device="cpu",
    classifier=None,
    limit: int | None = None,
    batch_size: int = 500,
) -> dict:
    """Reconstruction MSE / PSNR over the split (and classifier accuracy on reconstructions)."""
    n = len(split) if limit is None else min(limit, len(split))
    mse, psnr, correct = [], [], 0
    for i in range(0, n, batch_size):
        x = to_float(split.images[i : min(i + batch_size, n)]).to(device)
        x_hat = model.reconstruct(x)
        a, b = M.mse_psnr(x, x_hat)
        mse.append(a.cpu())
        psnr.append(b.cpu())
        if classifier is not None:
            y = split.labels[i : min(i + batch_size, n)].to(device)
            correct += int((classifier(x_hat).argmax(1) == y).sum())
    out = {"mse": float(torch.cat(mse).mean()), "psnr": float(torch.cat(psnr).mean())}
    if classifier is not None:
        out["classifier_acc_on_recon"] = correct / n
    return out


@torch.no_grad()
def eval_vae(
    model: VAE,
    split: Split,
    device="cpu",
    limit: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Test negative ELBO in bits/dim (one z sample per image, fixed seed) plus recon metrics."""
    n = len(split) if limit is None else min(limit, len(split))
    g = torch.get_rng_state()
    torch.manual_seed(seed)
    bpd, kl = [], []
    for i in range(0, n, batch_size):
        x = to_float(split.images[i : min(i + batch_size, n)]).to(device)
        b, parts = model.neg_elbo_bits_per_dim(x)
        bpd.append(b.cpu())
        kl.append(parts["kl_bpd"].cpu())
    torch.set_rng_state(g)
    out = {"neg_elbo_bpd": float(torch.cat(bpd).mean()), "kl_bpd": float(torch.cat(kl).mean())}
    out.update(eval_recon(model, split, device, limit=limit))
    return out


@torch.no_grad()
def encode_codes(
    vqvae: VQVAE,
    images_u8: torch.Tensor,
    device="cpu",
    batch_size: int = 500,
    desc: str | None = None,
) -> torch.Tensor:
    """uint8 images (N, H, W) -> code maps (N, h, w) int64 on the CPU."""
    vqvae.eval()
    out = []
    it = range(0, images_u8.shape[0], batch_size)
    for i in tqdm(it, desc=desc, leave=False, disable=desc is None):
        out.append(vqvae.encode(to_float(images_u8[i : i + batch_size]).to(device))[1].cpu())
    return torch.cat(out)


@torch.no_grad()
def eval_vqvae(model: VQVAE, split: Split, device="cpu", limit: int | None = None) -> dict:
    n = len(split) if limit is None else min(limit, len(split))
    codes = encode_codes(model, split.images[:n], device)
    usage = M.code_usage(codes, model.cfg.codebook_size)
    out = eval_recon(model, split, device, limit=limit)
    out.update(codes_used=usage["used"], perplexity=usage["perplexity"])
    return out


@torch.no_grad()
def eval_prior(
    prior: PixelCNN,
    codes: torch.Tensor,
    labels: torch.Tensor | None,
    device="cpu",
    batch_size: int = 500,
) -> dict:
    nll = []
    for i in range(0, codes.shape[0], batch_size):
        c = codes[i : i + batch_size].to(device)
        y = labels[i : i + batch_size].to(device) if labels is not None else None
        nll.append(prior.nll_bits(c, y).cpu())
    return {"nll_bits_per_code": float(torch.cat(nll).mean())}


# ---------------------------------------------------------------- the feature classifier


def cache_dir() -> Path:
    return Path(os.environ.get("FASTVQ_CACHE", Path.home() / ".cache" / "fastvq"))


def get_classifier(
    dataset,
    device="cpu",
    steps: int = 600,
    seed: int = 0,
    cache: Path | None = None,
    position: int | None = None,
) -> tuple[Classifier, dict]:
    """The small feature classifier for ``dataset``, trained once with a fixed seed and cached
    on disk, keyed by dataset name, data size and training settings."""
    cfg = ClassifierConfig(
        in_channels=dataset.image_shape[0],
        image_size=dataset.image_shape[1],
        num_classes=dataset.num_classes,
    )
    key = f"classifier-{dataset.name}-n{len(dataset.train)}-s{steps}-seed{seed}"
    run_dir = (cache or cache_dir()) / key
    if (run_dir / "run.json").is_file():
        try:
            model, meta = load_run(run_dir, device)
            return model, meta["metrics"]
        except Exception:  # a stale or broken cache entry: retrain
            pass
    model = Classifier(cfg)
    torch.manual_seed(seed)

    def evaluate(m):
        with torch.no_grad():
            x = to_float(dataset.test.images).to(device)
            pred = M.batched(m, x).argmax(1).cpu()
        return {"test_acc": float((pred == dataset.test.labels).float().mean())}

    meta = fit(
        model,
        "classifier",
        dataset.train.images,
        dataset.train.labels,
        steps=steps,
        seed=seed,
        device=device,
        evaluate=evaluate,
        run_dir=run_dir,
        desc="feature classifier",
        position=position,
    )
    return model.eval(), meta["metrics"]


@torch.no_grad()
def features(classifier: Classifier, images: torch.Tensor, device="cpu") -> torch.Tensor:
    """float images (N, C, H, W) in [0, 1] -> (N, feature_dim) penultimate features."""
    return M.batched(lambda b: classifier.features(b.to(device)).cpu(), images)
