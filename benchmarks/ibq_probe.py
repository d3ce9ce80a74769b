"""Why IBQ collapses in the demo's VQ-VAE (issue 27): one instrumented short training run.

Trains the demo's VQ-VAE (``model_config("vqvae", ...)``, quantizer ``"ibq"``) with the loop of
``fastvq.app.loop.fit`` (Adam, lr 1e-3, same batches) on one thread and records per step: the
codes used in the batch and so far, ``|z|`` against the code norms (all codes, and the codes
used), the mean largest probability of the estimator's softmax (temperature 1) and of the
entropy term's (0.01), the loss terms, and every ``--grad-every`` steps the norm of each term's
gradient to the encoder output and to the codebook (each term on its own, by autograd).

    python -m benchmarks.ibq_probe --codebook-size 1024 --steps 60 --out /tmp/ibq-probe.json
    python -m benchmarks.ibq_probe --codebook-size 1024 --steps 60 --vq-kwargs '{"init_scale": 0.1}'
    python -m benchmarks.ibq_probe --init-only --codebook-size 16384   # step 0 only
    python -m benchmarks.ibq_probe --summarize /tmp/ibq-probe.json     # markdown tables

``--vq-kwargs`` (JSON) passes IBQ options, so a probe of one change is one flag.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.nn.functional as F

ROW_SAMPLE = 512  # rows of each batch for the literal N x K softmax statistics


def _softmax_stats(z, codes, temperature):
    """Mean over rows of the largest probability and of the entropy of softmax(z C^T / T)."""
    logp = (z @ codes.T / temperature).log_softmax(1)
    p = logp.exp()
    return float(p.max(1).values.mean()), float(-(p * logp).sum(1).mean())


def _picked(rows, codes) -> int:
    """How many distinct codes the dot-product argmax gives ``rows``."""
    return int((rows @ codes.T).argmax(1).unique().numel())


def init_geometry(args) -> list[dict]:
    """At initialisation (no step taken): the demo encoder's rows on the first batch, their
    mean pairwise cosine, and the distinct codes their dot-product argmax picks against N(0, 1)
    codes, against the same rows centred and against isotropic N(0, 1) rows."""
    from fastvq.app import recipes as R
    from fastvq.app.checkpoint import build
    from fastvq.app.data import load_dataset, to_float
    from fastvq.app.rng import seed_everything

    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist", args.data_dir)
    x = to_float(ds.train.images[: args.batch_size])
    rows = []
    for dim in args.dims:
        seed_everything(args.seed)
        cfg = R.model_config("vqvae", ds, quantizer="ibq", codebook_size=args.codebook_size,
                             dim=dim)  # fmt: skip
        model = build("vqvae", cfg)
        with torch.no_grad():
            z = model.encoder(x).movedim(1, -1).reshape(-1, dim)
            codes = model.vq.codes()
            u = F.normalize(z, dim=1)
            row = {"dim": dim, "rows": z.shape[0], "z_norm": float(z.norm(dim=1).mean()),
                   "mean_z_norm": float(z.mean(0).norm()), "mean_cos": float((u @ u.T).mean()),
                   "codes_picked": _picked(z, codes),
                   "codes_picked_centred": _picked(z - z.mean(0), codes),
                   "codes_picked_isotropic": _picked(torch.randn_like(z), codes)}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def probe(args) -> dict:
    """Train and record; the run's JSON (settings and one record per step)."""
    from fastvq.app import recipes as R
    from fastvq.app.checkpoint import build
    from fastvq.app.data import load_dataset, to_float
    from fastvq.app.loop import epoch_batches
    from fastvq.app.rng import seed_everything
    from fastvq.ibq import ibq_loss, ibq_quantize_rows

    torch.set_num_threads(1)
    ds = load_dataset("fashion-mnist", args.data_dir)
    cfg = R.model_config("vqvae", ds, quantizer="ibq", codebook_size=args.codebook_size,
                         vq_kwargs=json.loads(args.vq_kwargs))  # fmt: skip
    seed_everything(args.seed)
    model = build("vqvae", cfg)
    q_layer = model.vq
    c = q_layer.config
    if args.norm_out:  # probe only: a GroupNorm before the encoder's last ReLU and 1x1 conv,
        # as SEED-Voken's encoder ends (norm_out, swish, conv_out, quant_conv)
        layers = list(model.encoder)
        layers.insert(len(layers) - 2, torch.nn.GroupNorm(8, layers[-1].in_channels))
        model.encoder = torch.nn.Sequential(*layers)
    if args.code_scale != 1.0:  # probe only: the initial codes times a factor
        with torch.no_grad():
            q_layer.book.codebook.mul_(args.code_scale)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=tuple(args.betas))
    stream = epoch_batches(ds.train.images, ds.train.labels, args.batch_size, args.seed, 0)
    seed_everything(args.seed)
    seen = torch.zeros(args.codebook_size, dtype=torch.bool)
    records = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        x = to_float(next(stream)[0])
        z_e = model.encoder(x)  # (B, D, h, w)
        z = z_e.movedim(1, -1).reshape(-1, c.dim)
        codes = q_layer.codes()
        q, idx, hard = ibq_quantize_rows(z, codes, c.temperature, c.backend)
        loss_q, parts = ibq_loss(z, codes, None, q, hard, c)
        qm = q.reshape(*z_e.shape[:1], *z_e.shape[2:], c.dim).movedim(-1, 1)
        recon = F.mse_loss(model.decode(qm), x) / model.cfg.data_variance
        loss = recon + loss_q
        rec = {"step": step, "loss": float(loss), "recon_mse": float(recon) * cfg["data_variance"]}
        rec.update({k: float(v) for k, v in parts._asdict().items()})
        with torch.no_grad():
            used = torch.unique(idx)
            seen[used] = True
            norms = codes.norm(dim=1)
            sub = z[:ROW_SAMPLE].detach()
            rec.update(
                batch_codes=int(used.numel()), seen_codes=int(seen.sum()),
                z_norm=float(z.norm(dim=1).mean()), code_norm_mean=float(norms.mean()),
                code_norm_max=float(norms.max()), used_code_norm=float(norms[used].mean()),
                code_norm_rank_of_used=float(
                    (norms[None, :] > norms[used][:, None]).float().mean()),
                pmax_t1=_softmax_stats(sub, codes.detach(), c.temperature)[0],
                pmax_ent=_softmax_stats(sub, codes.detach(), c.entropy_temperature)[0],
            )  # fmt: skip
        if args.grad_every and step % args.grad_every == 0:
            ent = c.entropy_loss_weight * (
                c.sample_entropy_weight * parts.sample_entropy
                - c.codebook_entropy_weight * parts.codebook_entropy
            )
            terms = {"recon": recon, "double_quant": c.double_quant_weight * parts.double_quant,
                     "commitment": c.commitment_weight * parts.commitment,
                     "codebook": c.codebook_weight * parts.codebook, "entropy": ent}  # fmt: skip
            for name, t in terms.items():
                if not t.requires_grad:  # a term of weight 0
                    continue
                gz, gc = torch.autograd.grad(t, (z_e, q_layer.book.codebook), retain_graph=True,
                                             allow_unused=True)  # fmt: skip
                rec[f"gz_{name}"] = 0.0 if gz is None else float(gz.norm())
                rec[f"gc_{name}"] = 0.0 if gc is None else float(gc.norm())
                if gc is not None:  # how many codes this term moves (rows with any gradient)
                    rec[f"gc_rows_{name}"] = int((gc.abs().sum(1) > 0).sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        rec["seconds"] = time.perf_counter() - t0
        records.append(rec)
        if step % args.print_every == 0 or step == args.steps - 1:
            print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v)
                              for k, v in rec.items()}), flush=True)  # fmt: skip
    return {
        "command": "python -m benchmarks.ibq_probe " + " ".join(args.argv),
        "machine": "2-core CPU machine, shared",
        "date": time.strftime("%Y-%m-%d"),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "records": records,
    }


COLUMNS = (("step", "step", "{}"), ("batch_codes", "codes in batch", "{}"),
           ("seen_codes", "codes so far", "{}"), ("z_norm", "mean norm z", "{:.2f}"),
           ("code_norm_mean", "mean norm c", "{:.2f}"),
           ("used_code_norm", "norm c, used", "{:.2f}"),
           ("pmax_t1", "max p (T 1)", "{:.3f}"), ("pmax_ent", "max p (T 0.01)", "{:.3f}"),
           ("recon_mse", "batch MSE", "{:.4f}"),
           ("gc_rows_entropy", "codes with entropy grad", "{}"),
           ("gc_entropy", "entropy grad to C", "{:.3g}"),
           ("gc_double_quant", "dq grad to C", "{:.3g}"))  # fmt: skip


def summarize(paths, every: int = 50) -> str:
    """Markdown: per probe JSON its command, machine, date and peak RSS, and a table of every
    ``every``-th step and the last (gradient columns where that step measured them)."""
    out = []
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        recs = doc["records"]
        keep = [r for r in recs if r["step"] % every == 0 or r is recs[-1]]
        out += [f"Command: `{doc['command']}`; {doc['machine']}; {doc['date']}; peak RSS "
                f"{doc['peak_rss_mib']:.0f} MiB.", "",
                "| " + " | ".join(c[1] for c in COLUMNS) + " |",
                "|" + "---:|" * len(COLUMNS)]  # fmt: skip
        for r in keep:
            cells = [fmt.format(r[k]) if k in r else "" for k, _, fmt in COLUMNS]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codebook-size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.999],
                    help="Adam's (the demo's default; SEED-Voken: 0.5 0.9)")  # fmt: skip
    ap.add_argument("--code-scale", type=float, default=1.0, help="initial codes times this")
    ap.add_argument(
        "--norm-out",
        action="store_true",
        help="a GroupNorm(8) before the encoder's last ReLU (SEED-Voken's ending)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--print-every", type=int, default=10)
    ap.add_argument("--grad-every", type=int, default=10, help="0: no per-term gradients")
    ap.add_argument("--vq-kwargs", default="{}", help="IBQ options, JSON")
    ap.add_argument(
        "--init-only",
        action="store_true",
        help="only the encoder's rows at initialisation, for each of --dims",
    )
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--summarize", nargs="+", default=None,
                    help="markdown tables of these probe JSONs (every 50th step)")  # fmt: skip
    ap.add_argument("--every", type=int, default=50, help="with --summarize: rows every N steps")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.summarize:
        print(summarize(args.summarize, args.every), end="")
        return 0
    if args.init_only:
        init_geometry(args)
        return 0
    doc = probe(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
