"""Providers: for one benchmark cell, build fixed inputs and a zero-argument step to time.

Runs inside the worker process (``_worker.py``), never in the pytest process. ``build(cell, info)``
returns ``step``: ``step()`` runs the op once (no host sync: the worker syncs CUDA around it). It
fills ``info`` with extra metadata (peer versions and configs, layer options, precision, notes);
the worker then adds ``info["state_bytes"]``, the RSS growth of the build (CPU; None on CUDA).

Ops (see docs/benchmarks.md for the exact definitions):

- ``search``: nearest-code search only, no autograd (fastvq's search also gathers z_q and err).
- ``fwd``: training-mode forward with autograd on (search + gather + loss, graph kept); except
  ``vqp-eval``, which is vector-quantize-pytorch in eval mode under ``no_grad`` (inference).
- ``fwdbwd``: ``fwd`` then backward of ``(quantized, loss)`` with a fixed upstream gradient.
- ``ema``: one EMA training step: forward (codebook EMA update), backward to the input.
- ``model``: one VQ-VAE training step (Adam) on random 28x28 images, with fastvq's layer or
  vector-quantize-pytorch's inside; N is the batch size in images.

Raise ``Skip(reason)`` when a provider cannot run a cell (missing peer, wrong device).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._grid import DTYPES, Cell

BETA = 0.25
EMA_DECAY = 0.99
EMA_EPS = 1e-5
SEED = 0


class Skip(Exception):
    """This provider cannot run this cell; the message is the reason."""


TRITON_CPU_SKIP = "fastvq triton backend is CUDA-only in benchmarks (CPU needs TRITON_INTERPRET=1)"


# ---------------------------------------------------------------------------------------------
# The naive textbook reference: cdist + argmin + one-hot matmul.
# ---------------------------------------------------------------------------------------------


def naive_search(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(dim=1)  # [N, K] distances materialized


def naive_vq(z: torch.Tensor, codebook: torch.Tensor, beta: float = BETA):
    """VQ-VAE forward as textbooks write it: (quantized, indices, loss)."""
    idx = torch.cdist(z, codebook).argmin(dim=1)
    onehot = F.one_hot(idx, codebook.shape[0]).to(z.dtype)  # [N, K]
    z_q = onehot @ codebook  # [N, D]
    loss = F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z, z_q.detach())
    return z + (z_q - z).detach(), idx, loss


class NaiveEMA:
    """Textbook EMA codebook (van den Oord et al. 2017): one-hot sums, Laplace smoothing."""

    def __init__(self, codebook: torch.Tensor, decay: float = EMA_DECAY, beta: float = BETA):
        self.codebook = codebook.detach().clone()
        self.cluster_size = torch.zeros(codebook.shape[0], device=codebook.device)
        self.embed_sum = codebook.detach().float().clone()
        self.decay, self.beta = decay, beta

    def __call__(self, z: torch.Tensor):
        k = self.codebook.shape[0]
        with torch.no_grad():
            idx = torch.cdist(z, self.codebook).argmin(dim=1)
            onehot = F.one_hot(idx, k).to(z.dtype)  # [N, K]
            z_q = onehot @ self.codebook  # [N, D], quantized with the pre-update codebook
            counts = onehot.sum(0).float()
            sums = (onehot.t() @ z).float()  # [K, D]
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            size = (self.cluster_size + EMA_EPS) / (n + k * EMA_EPS) * n
            self.codebook.copy_(self.embed_sum / size[:, None])
        loss = self.beta * F.mse_loss(z, z_q)
        return z + (z_q - z).detach(), idx, loss


# ---------------------------------------------------------------------------------------------
# Building one cell.
# ---------------------------------------------------------------------------------------------


def _inputs(cell: Cell, grad: bool):
    dtype = getattr(torch, DTYPES[cell.dtype])
    g = torch.Generator().manual_seed(SEED)
    z = torch.randn(cell.N, cell.D, generator=g).to(cell.device, dtype)
    codebook = torch.randn(cell.K, cell.D, generator=g).to(cell.device, dtype)
    upstream = torch.randn(cell.N, cell.D, generator=g).to(cell.device, dtype)
    z.requires_grad_(grad)
    codebook.requires_grad_(grad)
    return z, codebook, upstream


def _train_step(forward, upstream, leaves):
    """forward() -> (quantized, indices, loss); backward of both outputs into ``leaves``."""

    def step():
        for t in leaves:
            t.grad = None
        q, _, loss = forward()
        outs = [(q, upstream.view_as(q))]
        if loss.requires_grad:
            outs.append((loss, None))
        torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])

    return step


def _fastvq(cell: Cell, info: dict):
    backend = cell.provider.removeprefix("fastvq-")
    if backend == "triton" and cell.device != "cuda":
        raise Skip(TRITON_CPU_SKIP)
    import fastvq

    info["fastvq_version"] = getattr(fastvq, "__version__", "?")
    if backend == "triton" and cell.dtype == "fp32":  # tl.dot precision of fp32 searches
        info["fp32_precision"] = os.environ.get("FASTVQ_FP32_PRECISION", "default (tf32x3)")
    if backend == "triton" and not fastvq.triton_available():
        raise Skip("Triton kernels do not import on this machine")
    if cell.op == "search":
        z, cb, _ = _inputs(cell, grad=False)
        return lambda: fastvq.ops.search(z, cb, backend=backend)
    if cell.op in ("fwd", "fwdbwd"):
        z, cb, up = _inputs(cell, grad=True)
        fwd = lambda: fastvq.vector_quantize(z, cb, beta=BETA, backend=backend)
        return (lambda: fwd()) if cell.op == "fwd" else _train_step(fwd, up, [z, cb])
    # ema: the layer as plain EMA, like vector-quantize-pytorch's defaults: no k-means init and
    # no dead-code restarts.
    kwargs = dict(
        ema=True, beta=BETA, decay=EMA_DECAY, kmeans_init=False, dead_code_steps=0, backend=backend
    )
    layer = fastvq.VectorQuantizer(cell.D, cell.K, **kwargs).to(cell.device).train()
    info["layer_kwargs"] = {k: str(v) for k, v in kwargs.items()}
    z, _, up = _inputs(cell, grad=True)
    return _train_step(lambda: tuple(layer(z[None]))[:3], up[None], [z])


def _naive(cell: Cell, info: dict):
    compiled = cell.provider == "naive-compile"
    if cell.op == "search":
        fn = naive_search
        z, cb, _ = _inputs(cell, grad=False)
    elif cell.op in ("fwd", "fwdbwd"):
        fn = naive_vq
        z, cb, up = _inputs(cell, grad=True)
    else:
        if compiled:
            raise Skip("naive-compile has no EMA step")
        z, cb, up = _inputs(cell, grad=True)
        ema = NaiveEMA(cb)
        return _train_step(lambda: ema(z), up, [z])
    if compiled:
        fn = torch.compile(fn, dynamic=False)
        info["compile"] = "torch.compile(dynamic=False), default mode"
    if cell.op == "search":
        return lambda: fn(z, cb)
    fwd = lambda: fn(z, cb)
    return fwd if cell.op == "fwd" else _train_step(fwd, up, [z, cb])


def _vqp(cell: Cell, info: dict):
    try:
        import vector_quantize_pytorch as vqp
    except ImportError as exc:
        raise Skip(f"vector-quantize-pytorch not installed ({exc})") from None
    from importlib.metadata import version

    info["peer_version"] = f"vector-quantize-pytorch {version('vector-quantize-pytorch')}"
    info["peer_config"] = f"VectorQuantize(decay={EMA_DECAY}, commitment_weight={BETA}), defaults"
    vq = vqp.VectorQuantize(
        dim=cell.D, codebook_size=cell.K, decay=EMA_DECAY, commitment_weight=BETA
    ).to(cell.device)
    if cell.provider == "vqp-eval":
        vq.eval()
        z, _, _ = _inputs(cell, grad=False)

        def step():
            with torch.no_grad():
                vq(z[None])

        return step
    vq.train()
    z, _, up = _inputs(cell, grad=True)
    fwd = lambda: tuple(vq(z[None]))[:3]
    return fwd if cell.op == "fwd" else _train_step(fwd, up[None], [z])


def _faiss(cell: Cell, info: dict):
    if cell.device != "cpu":
        raise Skip("faiss-cpu only (no faiss GPU build in this environment)")
    if cell.dtype != "fp32":
        raise Skip("faiss IndexFlatL2 is fp32 only")
    try:
        import faiss
    except ImportError as exc:
        raise Skip(f"faiss not installed ({exc})") from None
    info["peer_version"] = f"faiss {faiss.__version__}"
    z, cb, _ = _inputs(cell, grad=False)
    index = faiss.IndexFlatL2(cell.D)
    index.add(cb.numpy())
    zn = z.numpy()
    return lambda: index.search(zn, 1)


def _matmul(cell: Cell, info: dict):
    """Yardstick: the N x K x D matmul alone, in row chunks into a reused output buffer."""
    z, cb, _ = _inputs(cell, grad=False)
    if cell.device == "cuda" and cell.dtype == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = True
        info["precision"] = "tf32"
    cbt = cb.t()
    budget = (2 << 30) if cell.device == "cuda" else (256 << 20)
    chunk = max(1, min(cell.N, budget // (cell.K * z.element_size())))
    buf = torch.empty(chunk, cell.K, device=z.device, dtype=z.dtype)
    info["matmul_chunk_rows"] = chunk

    def step():
        for i in range(0, cell.N, chunk):
            rows = z[i : i + chunk]
            torch.matmul(rows, cbt, out=buf[: rows.shape[0]])

    return step


def _model(cell: Cell, info: dict):
    """One VQ-VAE training step (Adam) on random 28x28 images: fastvq's layer or vqp's inside."""
    from fastvq.models.vqvae import VQVAE, VQVAEConfig

    backend = cell.provider.removeprefix("fastvq-") if cell.provider.startswith("fastvq") else ""
    if backend == "triton" and cell.device != "cuda":
        raise Skip(TRITON_CPU_SKIP)
    vq_kwargs = {"backend": backend or "torch", "kmeans_init": False, "dead_code_steps": 0}
    cfg = VQVAEConfig(dim=cell.D, codebook_size=cell.K, beta=BETA, vq_kwargs=vq_kwargs)
    torch.manual_seed(SEED)
    model = VQVAE(cfg)
    if cell.provider == "vqp-train":
        try:
            import vector_quantize_pytorch as vqp
        except ImportError as exc:
            raise Skip(f"vector-quantize-pytorch not installed ({exc})") from None
        model.vq = vqp.VectorQuantize(
            dim=cell.D, codebook_size=cell.K, decay=EMA_DECAY, commitment_weight=BETA,
            accept_image_fmap=True,
        )  # fmt: skip
        info["peer_config"] = "fastvq VQVAE with model.vq = vqp.VectorQuantize(decay, beta)"
    else:
        info["layer_kwargs"] = {k: str(v) for k, v in vq_kwargs.items()}
    model = model.to(cell.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    x = torch.rand(cell.N, 1, 28, 28, generator=torch.Generator().manual_seed(SEED))
    x = x.to(cell.device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(x)
        loss.backward()
        opt.step()

    return step


_BUILDERS = {
    "fastvq-triton": _fastvq,
    "fastvq-torch": _fastvq,
    "naive": _naive,
    "naive-compile": _naive,
    "vqp-train": _vqp,
    "vqp-eval": _vqp,
    "faiss": _faiss,
    "matmul": _matmul,
}


def build(cell: Cell, info: dict):
    """Return the step callable for ``cell``; fills ``info`` with provider metadata."""
    if cell.op == "model":
        return _model(cell, info)
    return _BUILDERS[cell.provider](cell, info)
