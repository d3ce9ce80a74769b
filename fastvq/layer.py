"""``VectorQuantizer``: the drop-in VQ layer, built on the fused op (no N x K tensor anywhere).

It composes four pieces, each owning one job::

    layout     x (..., dim) or (B, dim, ...) -> rows (N, dim) -> project_in -> heads -> cosine
    Codebook   self.book: the codes and all their state (fastvq.codebook)
    the op     quantize_rows: search, gather, straight-through (or rotation trick) and loss
    objective  the extra loss terms (fastvq.objective)

A training forward then hands each codebook's counts and rows to ``self.book.step_`` (EMA, usage,
dead-code restart), once per forward and never inside autograd's backward, so activation
checkpointing's recomputation does not update twice. Options: :class:`~fastvq.layer_config.
VQConfig`; the methods: docs/layer.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _dist
from . import objective as obj
from ._checks import check_same_device
from ._docs import add_args
from .codebook import Codebook, batch_statistics, in_backward
from .functional import quantize_rows
from .layer_config import (
    VQConfig,
    check_call_options,
    check_indices,
    check_input,
    check_mask,
    resolve_simvq,
)
from .ops import resolve_backend
from .outputs import (
    CodebookStats,
    LossBreakdown,
    QuantizeOutput,
    QuantizeOutputFull,
    QuantizeOutputWithBreakdown,
    QuantizeOutputWithStats,
    quantize_output,
)
from .sampling import sample_codes, topk_codes
from .streams import per_call_generator
from .usage import UsageMeter, codebook_usage

__all__ = [
    "CodebookStats", "LossBreakdown", "QuantizeOutput", "QuantizeOutputFull",
    "QuantizeOutputWithBreakdown", "QuantizeOutputWithStats", "UsageMeter", "VQConfig",
    "VectorQuantizer", "check_indices", "check_input", "check_mask", "codebook_usage",
    "flat_state_hooks", "resolve_simvq",
]  # fmt: skip

# Options the Codebook owns: the layer reads and writes them through to ``self.book``.
_BOOK_OPTIONS = (
    "decay", "eps", "kmeans_iters", "dead_code_steps", "restart_noise", "seed", "backend",
    "sync_distributed", "process_group",
)  # fmt: skip
_BOOK_STATE = (
    "codebook", "cluster_size", "embed_avg", "steps_unused", "usage_counts", "initted",
    "simvq_basis", "simvq_map", "last_perplexity", "last_used_fraction",
)  # fmt: skip
# What every rank must agree on: the shape and sequence of the layer's collectives (K, dims,
# heads, EMA, restart, k-means state, this call's ema_update) and their result (decay, eps, seed,
# noise). A frozen call (freeze_codebook), like eval, issues no collective and is not checked.
_RANK_FIELDS = (
    "dim", "codebook_size", "codebook_dim", "heads", "num_codebooks", "ema", "cosine",
    "channel_first", "kmeans initialised", "kmeans_iters", "dead_code_steps", "decay", "eps",
    "restart_noise", "seed", "debug", "simvq", "_call_ema_step",
)  # fmt: skip


def flat_state_hooks(book: str = "book") -> tuple:
    """``(save, load)`` hooks that keep a module's ``state_dict`` keys flat (``codebook``,
    ``cluster_size``, ...) while its Codebook child ``book`` owns them: the keys every fastvq
    checkpoint has used. Register them with ``_register_state_dict_hook(save)`` and
    ``_register_load_state_dict_pre_hook(load, with_module=True)``."""

    def save(mod, state_dict, prefix, local_metadata):
        head = f"{prefix}{book}."
        for key in [k for k in state_dict if k.startswith(head)]:
            state_dict[prefix + key[len(head) :]] = state_dict.pop(key)

    def load(mod, state_dict, prefix, *args):
        for name in getattr(mod, book).state_dict(keep_vars=True):
            if prefix + name in state_dict:
                state_dict[f"{prefix}{book}.{name}"] = state_dict.pop(prefix + name)

    return save, load


class VectorQuantizer(nn.Module):
    """Vector quantization layer with EMA or gradient codebooks, k-means init and dead-code restart.

    ``VectorQuantizer(dim, codebook_size, **options)``: every option is a field of
    :class:`~fastvq.layer_config.VQConfig` (documented there), checked when the layer is built.
    The codes and their state live in ``self.book`` (a :class:`~fastvq.codebook.Codebook`); its
    tensors (``codebook``, ``cluster_size``, ``usage_counts``, ...) read as the layer's too.
    """

    def __init__(self, dim: int, codebook_size: int, **options):
        super().__init__()
        cfg = VQConfig.from_options("VectorQuantizer", dim, codebook_size, options)
        for name, value in cfg.items():
            if name not in _BOOK_OPTIONS:
                setattr(self, name, value)
        self.num_codebooks = cfg.num_codebooks
        self._call_ema_step = True  # this call's ema_update, for the cross-rank check
        self._ranks_checked = False  # the cross-rank check has run (host flag: no sync)
        inner = cfg.heads * cfg.codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self.book = Codebook(
            cfg.num_codebooks, codebook_size, cfg.codebook_dim,
            learning="simvq" if cfg.simvq else "ema" if cfg.ema else "grad",
            **{name: getattr(cfg, name) for name in _BOOK_OPTIONS}, cosine=cfg.cosine,
            kmeans_init=cfg.kmeans_init, kmeans_flag=True,
        )  # fmt: skip
        save, load = flat_state_hooks()
        self._register_state_dict_hook(save)
        self._register_load_state_dict_pre_hook(load, with_module=True)

    def extra_repr(self) -> str:
        names = ("dim", "codebook_size", "codebook_dim", "heads", "ema", "beta", "kmeans_init")
        names += ("dead_code_steps", "cosine", "rotation_trick", "channel_first")
        flags = [f"{n}=True" for n in ("simvq", "freeze_codebook") if getattr(self, n)]
        return ", ".join([f"{n}={getattr(self, n)}" for n in names] + flags)

    def __getattr__(self, name: str):
        if name in _BOOK_OPTIONS or name in _BOOK_STATE:
            book = super().__getattr__("book")
            if name == "codebook" and book.learning == "simvq":
                raise AttributeError(
                    "with simvq=True the codes are computed (simvq_basis @ simvq_map.T): read "
                    "them with get_codebook(); the learned map is simvq_map, the frozen basis "
                    "simvq_basis"
                )
            return getattr(book, name)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in _BOOK_OPTIONS and "book" in self._modules:
            setattr(self.book, name, value)
        else:
            super().__setattr__(name, value)

    def get_codebook(self) -> torch.Tensor:
        """The codes searched, ``(K, codebook_dim)`` (or ``(heads, K, codebook_dim)`` when each
        head has its own codebook); l2-normalised when ``cosine``."""
        cb = self.book.codes()
        return cb[0] if self.num_codebooks == 1 else cb

    def load_codebook(self, weight: torch.Tensor) -> None:
        """Set the codes from ``weight`` (K, codebook_dim) or (num_codebooks, K, codebook_dim)
        (:meth:`fastvq.codebook.Codebook.load_`: EMA statistics reset to match, no k-means,
        dead-code counters cleared; SimVQ: basis = ``weight``, map = identity)."""
        self.book.load_(weight)

    # A host sync: under torch.compile it runs eagerly (a graph break on the calls that check).
    @torch.compiler.disable
    def check_ranks(self) -> None:
        """ValueError on every rank when ranks disagree on anything that fixes the shape or the
        sequence of this layer's collectives or its result (see ``_RANK_FIELDS``)."""
        fields = {
            n: self.book.initialised if n == "kmeans initialised" else getattr(self, n)
            for n in _RANK_FIELDS
        }
        self.book.check_ranks("VectorQuantizer", fields)
        self._ranks_checked = True

    def check_ranks_if_due(self) -> None:
        """Before a training step under torch.distributed: :meth:`check_ranks` on the first
        call, and on every call with ``debug``."""
        if self.book.dist_policy()["distributed"] and (self.debug or not self._ranks_checked):
            self.check_ranks()

    def rows(self, x: torch.Tensor, mask: torch.Tensor | None):
        """Check ``x`` and ``mask`` and cut ``x`` into rows: ``(backend, lead, n, groups)`` with
        ``lead`` x's shape without the channel dim, ``n = prod(lead)`` and per codebook
        ``(rows (M, codebook_dim), mask (M,) or None)`` (projected, not yet normalised; a shared
        codebook folds the heads into the rows)."""
        check_input(x, self.dim, self.channel_first)
        check_same_device("x", x, "codebook", self.book.anchor)
        if mask is not None:
            check_mask(mask, x.movedim(1, -1).shape[:-1] if self.channel_first else x.shape[:-1])
        backend = resolve_backend(self.backend, x.device)  # once: the rows below go 2-D
        if self.channel_first:
            x = x.movedim(1, -1)  # (B, ..., dim)
        lead = x.shape[:-1]
        n = math.prod(lead)
        valid = None if mask is None else mask.reshape(n)  # bool (N,), True = real token
        x2, w = x.reshape(n, self.dim), getattr(self.project_in, "weight", None)
        if w is not None and x2.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x2 = x2.to(w.dtype)  # as autocast would: the projection runs in its weights' dtype
        zh = self.project_in(x2).reshape(n, self.heads, self.codebook_dim)
        if self.num_codebooks == 1:
            keep = None if valid is None else valid.repeat_interleave(self.heads)
            return backend, lead, n, [(zh.reshape(-1, self.codebook_dim), keep)]
        return backend, lead, n, [(zh[:, g], valid) for g in range(self.num_codebooks)]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, return_stats: bool = False,
        freeze_codebook: bool | None = None, ema_update: bool | None = None,
        topk: int | None = None, sample_codebook_temp: float | None = None,
        return_loss_breakdown: bool = False,
    ):  # fmt: skip
        """Quantize ``x`` (``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``).

        Returns ``(quantized, indices, loss)`` (:func:`fastvq.outputs.quantize_output`):
        ``quantized`` like ``x`` (forward value the codes, gradient straight through to ``x``),
        ``indices`` int64 with ``x``'s shape without the channel dim (plus ``heads``, then
        ``topk`` dims), ``loss`` an fp32 scalar; ``return_stats`` adds :class:`CodebookStats`,
        ``return_loss_breakdown`` a :class:`LossBreakdown`, in that order. ``mask`` (True = real
        token), ``freeze_codebook``, ``ema_update``, ``topk`` and ``sample_codebook_temp``: see
        docs/layer.md.
        """
        freeze, self._call_ema_step, temp = check_call_options(
            self, freeze_codebook, ema_update, topk, sample_codebook_temp
        )
        backend, lead, n, groups = self.rows(x, mask)
        update = self.training and not freeze and topk is None and not in_backward()
        ema_step = update and self.ema and self._call_ema_step and self.decay < 1.0
        sample = self.training and self.stochastic_sample_codes and topk is None and temp > 0
        if update:
            self.check_ranks_if_due()
            if not self.book.initialised:
                self.book.kmeans_init_([zg for zg, _ in groups], [m for _, m in groups])
        k, codes = self.codebook_size, self.book.codes()
        if freeze:  # no gradient to the codes (SimVQ: nor to its map), no codebook term
            codes, w_cb = codes.detach(), 0.0
        else:
            w_cb = 0.0 if self.ema else self.codebook_loss_weight
        if update and self.ema:  # the backward reads the codes this forward used, not the update
            codes = codes.clone()
        beta_mse = 0.0 if self.commitment_use_cross_entropy_loss else self.beta  # CE replaces it
        if sample:
            gen = per_call_generator("sample-codes", "cpu", _dist.rank(self.process_group))
        out = []  # per codebook: (q, idx, loss, counts, sums, rows, weights, terms, topk)
        for g, (zg, mg) in enumerate(groups):
            if self.cosine:
                zg = F.normalize(zg, dim=-1)
            cg = codes[g]
            pick = None  # sampled: that code replaces the nearest (loss, output, statistics)
            if sample:
                pick = sample_codes(zg, cg, temperature=temp, generator=gen, cosine=self.cosine)
            q, idx, loss, err = quantize_rows(
                zg, cg, beta=beta_mse, backend=backend, keep=mg, codebook_weight=w_cb,
                rotation_trick=self.rotation_trick, indices=pick,
            )  # fmt: skip
            # err is non-finite exactly for rows holding NaN/Inf: they count in no statistic
            ok = torch.isfinite(err) if mg is None else torch.isfinite(err) & mg
            counts, sums = batch_statistics(idx, ok, zg if ema_step else None, k, backend)
            ce_term, div_term = obj.aux_terms(self, zg, cg, idx, mg)
            terms = None
            if return_loss_breakdown:
                terms = obj.breakdown_terms(
                    err, zg.shape[1], mg, ce_term, div_term, self.beta, w_cb
                )
            for extra in (ce_term, div_term):
                if extra is not None:
                    loss = loss + extra
            near = None if topk is None else topk_codes(zg, cg, topk)[1]
            out.append((q, idx, loss, counts, sums, zg.detach(), ok.to(torch.float32), terms, near))
        q, idx, losses, counts, sums, rows, weights, terms, near = zip(*out, strict=True)
        counts = torch.stack(counts)  # (G, K)
        if update and self._call_ema_step:  # ema_update=False: no state step at all (vqp)
            sums = torch.stack(sums) if ema_step else None
            counts = self.book.step_(counts, sums, rows, weights, ema_step=ema_step)
        ppl, used = self.book.record_batch_(counts)
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        orth = obj.orthogonal_term(self, codes, counts)
        if orth is not None:
            loss = loss + orth
        if len(q) > 1:  # one codebook per head: (N, heads, cd)
            q, idx = (torch.stack(q, dim=1),), (torch.stack(idx, dim=1),)
        quantized = self.project_out(q[0].reshape(n, self.heads * self.codebook_dim))
        quantized = quantized.reshape(*lead, self.dim)
        head = (self.heads,) if self.heads > 1 else ()
        if topk is not None:  # (N [* heads], k) per codebook -> (..., [heads,] k)
            top = near[0] if len(near) == 1 else torch.stack(near, dim=1)
            indices = top.reshape(*lead, *head, topk)
        else:
            indices = idx[0].reshape(*lead, *head)
        if quantized.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            quantized = quantized.to(x.dtype)  # like the op: quantized in x's dtype
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        stats = CodebookStats(ppl, used, counts) if return_stats else None
        breakdown = obj.loss_breakdown(terms, orth) if return_loss_breakdown else None
        return quantize_output(quantized, indices, loss, stats, breakdown)

    @torch.no_grad()
    def update_codebook_from_indices(
        self, x: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None, *,
        check: bool = True,
    ) -> None:  # fmt: skip
        """One EMA step from given assignments instead of the search's (vqp's ``update_indices``;
        docs/layer.md): ``x`` in the layer's input layout, int ``indices`` in its indices layout,
        ``mask`` (True = counts). Runs whatever the mode; every rank must call it under
        torch.distributed. ``check``: ValueError on indices outside ``[0, codebook_size)``."""
        if not self.ema:
            raise ValueError(
                "update_codebook_from_indices updates an EMA codebook (ema=True); this layer's "
                "codebook learns from the loss"
            )
        backend, lead, n, groups = self.rows(x, mask)
        check_indices(indices, self.heads, self.codebook_size, check, lead=lead)
        idx = indices.reshape(n, self.heads).to(torch.int64)
        # a shared codebook folds the heads into the rows, row-major like rows()
        idx_groups = [idx.reshape(-1)] if self.num_codebooks == 1 else idx.unbind(1)
        k, ema_step = self.codebook_size, self.decay < 1.0
        out = []  # per codebook: (counts, sums, rows, weights)
        for (zg, mg), ig in zip(groups, idx_groups, strict=True):
            zg = F.normalize(zg, dim=-1) if self.cosine else zg
            ok = torch.isfinite(zg).all(-1)
            ok = ok if mg is None else ok & mg
            c, s_ = batch_statistics(ig, ok, zg if ema_step else None, k, backend)
            out.append((c, s_, zg, ok.to(torch.float32)))
        counts, sums, rows, weights = zip(*out, strict=True)
        sums = torch.stack(sums) if ema_step else None
        self.book.step_(torch.stack(counts), sums, rows, weights, ema_step=ema_step)

    def codes_from_indices(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Decode int indices in the layer's layout (``(...)``, or ``(..., heads)``) to what
        the layer outputs for them (eval mode: bit-identical): ``(..., dim)``, or
        ``(B, dim, ...)`` with ``channel_first``. ``check``: ValueError on indices outside
        ``[0, codebook_size)`` (a host sync)."""
        check_indices(indices, self.heads, self.codebook_size, check)
        q = self.project_out(self.book.lookup(indices.to(torch.int64), self.heads))
        return q.movedim(-1, 1) if self.channel_first else q

    def get_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Indices of ``x`` (the layer's input layout) as in eval mode, without updating state."""
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                return self(x).indices
        finally:
            self.train(was)


# VectorQuantizer's argument tables: beside the class, so that its body holds code (the skeleton's
# size limits, tests/test_architecture.py); help() and docs/reference.md see one docstring.
add_args(
    VectorQuantizer,
    """
        dim: channels of the input (its last dim, or dim 1 with ``channel_first``).
        codebook_size: K, codes per codebook.
        **options: the other :class:`~fastvq.layer_config.VQConfig` fields by keyword (``beta``,
            ``ema``, ``heads``, ``cosine``, ...); an unknown or invalid one raises when built.
""",
)
add_args(
    VectorQuantizer.load_codebook,
    """
            weight: float tensor of codes, ``(K, codebook_dim)`` or
                ``(num_codebooks, K, codebook_dim)``.
""",
)
add_args(
    VectorQuantizer.rows,
    """
            x: float32/16/bf16 input, ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
            mask: bool tensor of ``x``'s shape without the channel dim (True = real token), or
                None (every row counts).
""",
)
add_args(
    VectorQuantizer.forward,
    """
            x: float32/16/bf16 input, ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
            mask: bool tensor of ``x``'s shape without the channel dim; False rows count in no
                loss or codebook statistic. None: every row counts.
            return_stats: also return this batch's :class:`CodebookStats`.
            freeze_codebook: overrides the layer's ``freeze_codebook`` for this call (None: the
                layer's); True: no codebook update and no gradient to the codes.
            ema_update: False makes no state step in this call (no EMA, usage or dead-code
                counters; k-means init still runs); EMA codebooks only. None/True: normal step.
            topk: also return the ``topk`` nearest codes (int in ``[1, codebook_size]``) as a
                trailing indices dim; the call then samples nothing and updates no codebook.
            sample_codebook_temp: this call's sampling temperature (None: the layer's); only
                used in training with ``stochastic_sample_codes``. 0 = the nearest code.
            return_loss_breakdown: also return a :class:`LossBreakdown` of the loss's terms.
""",
)
add_args(
    VectorQuantizer.update_codebook_from_indices,
    """
            x: float input in the layer's layout, ``(..., dim)`` or ``(B, dim, ...)`` with
                ``channel_first``.
            indices: int tensor of ``x``'s shape without the channel dim (plus ``heads`` when
                ``heads > 1``), values in ``[0, codebook_size)``.
            mask: bool tensor of ``x``'s shape without the channel dim (True = the row counts),
                or None (every row).
            check: check the indices' range (a host sync); False skips it.
""",
)
add_args(
    VectorQuantizer.codes_from_indices,
    """
            indices: int tensor ``(...)``, or ``(..., heads)`` when ``heads > 1``, values in
                ``[0, codebook_size)``.
            check: check the indices' range (a host sync); False skips it.
""",
)
add_args(
    VectorQuantizer.get_indices,
    """
            x: float input, ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
""",
)
