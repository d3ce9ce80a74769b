"""``ResidualVQ`` and ``GroupedResidualVQ``: stacks of :class:`~fastvq.VectorQuantizer` layers,
each quantizing the residual the previous ones left.

    r_0 = project_in(x);  (q_i, idx_i) = VQ_i(r_i);  r_{i+1} = r_i - sg(q_i)
    quantized = project_out(sum_i q_i)   (forward value the sum of codes, gradient straight to x)
    loss = sum_i loss_i                  (each layer's commitment trains the encoder through r_i)

Every search is the fused op or a memory-bounded top-k (beam search), so no N x K tensor exists
at any depth. Options (docs/layer.md, "ResidualVQ options"):

* ``codebook_size`` per depth (a sequence of Q sizes);
* ``shared_codebook``: one codebook for every depth; one EMA / restart / usage step per training
  forward from the statistics of all depths pooled;
* ``quantize_dropout`` (SoundStream): in training, each forward uses only the first ``n`` depths,
  ``n`` drawn by a generator the module owns (seeded, identical on every rank; activation
  checkpointing replays each call's own draw); depths left out give index ``-1`` and contribute
  nothing;
* ``beam_size``: beam search over the stack instead of the greedy choice per depth;
* ``return_losses``: each depth's loss besides their sum;
* ``rotation_trick`` / ``quant_grad_frac`` (vector-quantize-pytorch's per-depth gradients): the
  output is the sum of every depth's attached output, ``quantized = project_out(sum_i q_i)``, each
  ``q_i`` carrying its depth's straight-through or rotation-trick gradient to ``r_i``, and
  ``r_{i+1} = r_i - (frac q_i + (1 - frac) sg(q_i))`` (``frac = quant_grad_frac``). With both off
  (the default) the arithmetic above is unchanged.

Layers not run by a forward (dropped depths) change no state: no EMA, usage or dead-code step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_nonneg_real, check_same_device, is_int
from .codebook import batch_statistics, in_backward, perplexity
from .functional import attach_codes
from .layer import (
    CodebookStats,
    VectorQuantizer,
    check_indices,
    check_input,
    check_mask,
)
from .ops import resolve_backend, search
from .sampling import topk_codes
from .stack import (
    check_active,
    check_dropout,
    draw_active,
    frac_gradient,
    merge_groups,
    replayable_draw,
    run_depths,
    stack_output,
    sum_depths,
)
from .streams import RandomStreams

# Codes per tile of the top-k search behind beam search (rows are blocked by topk_codes's own
# tile budget); a running top-k carries across code blocks, so no N x K tensor exists.
TOPK_CODE_BLOCK = 1024


# --- argument checks ------------------------------------------------------------------------------


def _codebook_sizes(codebook_size, num_quantizers) -> tuple[int, ...]:
    """The Q sizes from ``codebook_size`` (an int, or one int per depth) and ``num_quantizers``."""
    if num_quantizers is not None and (not is_int(num_quantizers) or num_quantizers < 1):
        raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
    if isinstance(codebook_size, Sequence) and not isinstance(codebook_size, str):
        sizes = tuple(codebook_size)
        if len(sizes) == 0:
            raise ValueError("codebook_size must be a positive int or a non-empty sequence of them")
        if num_quantizers is not None and len(sizes) != num_quantizers:
            raise ValueError(
                f"codebook_size has {len(sizes)} sizes but num_quantizers={num_quantizers}; "
                "give one size per depth"
            )
    elif num_quantizers is None:
        raise ValueError("num_quantizers is required when codebook_size is a single int")
    else:
        sizes = (codebook_size,) * num_quantizers
    for i, k in enumerate(sizes):
        if not is_int(k) or k < 1:
            raise ValueError(f"codebook_size must hold positive ints, got {k!r} at depth {i}")
    return sizes


def _check_beam(name: str, beam) -> None:
    if beam is not None and (not is_int(beam) or beam < 1):
        raise ValueError(f"{name} must be None or a positive int, got {beam!r}")


def _rank_fields(rvq, num_active: int, beam: int) -> dict:
    """What every rank must agree on before a training forward of the stack ``rvq``: the options
    that fix which layers run and how (so the sequence of collectives), and this call's depths
    and beams. Each layer checks its own options (K, EMA, ...) on its own first call."""
    names = ("dim", "codebook_dim", "num_quantizers", "shared_codebook", "quantize_dropout")
    names += ("quantize_dropout_cutoff_index", "quantize_dropout_multiple_of", "seed")
    fields = {n: getattr(rvq, n) for n in names}
    fields.update(beam_size=rvq.beam_size or 1, eval_beam_size=rvq.eval_beam_size or 1)
    fields.update(rotation_trick=rvq.rotation_trick, quant_grad_frac=rvq.quant_grad_frac)
    return dict(fields, call_num_active=num_active, call_beam_size=beam)


def _check_ranks_if_due(module, what: str, layer, fields: dict) -> None:
    """Before a training forward's first collective under torch.distributed: ValueError on every
    rank when the ranks disagree on ``fields`` (the stack's options that fix which layers run
    and so the sequence of collectives, and this call's choices), through ``layer``'s Codebook;
    on the first call, and on every call when ``layer`` has ``debug``. Each layer checks its own
    options on its own first call."""
    if not module.training or in_backward() or not layer.book.dist_policy()["distributed"]:
        return
    if layer.debug or not module.ranks_checked:
        layer.book.check_ranks(what, fields)
        module.ranks_checked = True


def _check_grad_options(rotation_trick, quant_grad_frac) -> float:
    if not isinstance(rotation_trick, bool):
        raise TypeError(f"rotation_trick must be a bool, got {rotation_trick!r}")
    check_nonneg_real("quant_grad_frac", quant_grad_frac)
    if quant_grad_frac > 1:
        raise ValueError(f"quant_grad_frac must lie in [0, 1], got {quant_grad_frac}")
    return float(quant_grad_frac)


# --- top-k and beam search ------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward ``q + 0.0`` (the codes: ``q + (z - sg(z))``'s value for a finite row, ``-0.0``
    included), gradient straight to ``z``. A row of ``z`` holding NaN/Inf (masked padding) still
    outputs its codes, as the layer's does, where ``z - sg(z)`` would make it NaN."""

    @staticmethod
    def forward(ctx, z, q):
        return q + 0.0

    @staticmethod
    def backward(ctx, g):
        return g, None


# Layer options that the pooled routes (shared codebook, beam search) do not apply: they search,
# update and compute the loss themselves from the layers' codes, beta and EMA settings only.
_POOLED_UNSUPPORTED = (
    "freeze_codebook", "stochastic_sample_codes", "orthogonal_reg_weight",
    "codebook_diversity_loss_weight", "commitment_use_cross_entropy_loss",
)  # fmt: skip


def _reject_pooled(names) -> None:
    raise ValueError(
        f"{', '.join(names)} not supported with shared_codebook=True or beam search "
        "(beam_size > 1) in ResidualVQ: those routes do not apply the option; use the plain "
        "greedy stack"
    )


def nearest_codes_topk(
    rows: torch.Tensor, codes: torch.Tensor, k: int, *, code_block: int = TOPK_CODE_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codes of every row by squared L2, ties to the lowest index: the search
    behind beam search, :func:`fastvq.sampling.topk_codes` tiled over ``code_block`` codes.

    Args:
        rows: (M, D) float; codes: (K, D) float; k: 1 <= k <= K.

    Returns:
        ``(dist, idx)``: fp32 (M, k) squared distances, ascending, and int64 (M, k) the codes.
    """
    return topk_codes(rows, codes, k, chunk=code_block)


@torch.no_grad()
def residual_beam_search(
    rows: torch.Tensor,
    codebooks: Sequence[torch.Tensor],
    beam_size: int,
    *,
    score_weights: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search over a residual stack: keep the ``beam_size`` best partial code sequences.

    At depth ``l`` every kept sequence (beam) is extended by its ``min(beam_size, K_l)`` nearest
    codes (:func:`nearest_codes_topk`); every candidate's residual ``r - c`` and its exact squared
    error ``||r - c||^2`` are computed from the gathered code (no cancellation); the
    ``beam_size`` best candidates by score survive (at the last depth, the best one). Ties go to
    the earlier beam, then the nearer code, so ``beam_size=1`` is the greedy choice and a beam
    of ``prod K_l`` keeps every sequence (the exact optimum).

    Score: by default the candidate's current squared error ``||x - sum_{j<=l} c_j||^2``, so the
    last depth ranks by the reconstruction error itself. With ``score_weights`` (one per depth),
    vector-quantize-pytorch's rule: the running sum ``sum_{j<=l} w_j ||r_{j+1}||^2`` of every
    depth's error, which need not minimise the final error.

    Memory: the candidates' residuals, ``N x beam x min(beam, K) x D`` fp32, plus the top-k tile.

    Args:
        rows: (N, D) float; codebooks: Q codebooks (K_l, D); beam_size >= 1.

    Returns:
        ``(indices, err)``: int64 (N, Q) the best sequence and fp32 (N,) its squared error.
    """
    if not is_int(beam_size) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
    if score_weights is not None and len(score_weights) < len(codebooks):
        raise ValueError(
            f"score_weights must hold one weight per depth ({len(codebooks)}), "
            f"got {len(score_weights)}"
        )
    n, d = rows.shape
    res = rows.to(torch.float32).unsqueeze(1)  # (N, b, D), b beams
    score = torch.zeros(n, 1, dtype=torch.float32, device=rows.device)
    paths = torch.zeros(n, 1, 0, dtype=torch.int64, device=rows.device)
    err = torch.zeros(n, 1, dtype=torch.float32, device=rows.device)
    q = len(codebooks)
    for depth, codes in enumerate(codebooks):
        codes = codes.to(torch.float32)
        b, kk = res.shape[1], min(beam_size, codes.shape[0])
        _, cand = nearest_codes_topk(res.reshape(n * b, d), codes, kk)
        cand = cand.view(n, b * kk)
        new_res = (res.unsqueeze(2) - codes[cand].view(n, b, kk, d)).view(n, b * kk, d)
        new_err = new_res.square().sum(-1)  # (N, b * kk), from the gathered codes
        if score_weights is None:
            new_score = new_err
        else:
            w = float(score_weights[depth])
            new_score = (score.unsqueeze(2) + w * new_err.view(n, b, kk)).view(n, b * kk)
        keep = beam_size if depth < q - 1 else 1
        # stable: equal scores keep the earlier beam, then the nearer code; NaN rows sort last
        sel = new_score.sort(dim=1, stable=True).indices[:, :keep]
        res = new_res.gather(1, sel.unsqueeze(-1).expand(-1, -1, d))
        score, err = new_score.gather(1, sel), new_err.gather(1, sel)
        parent = paths.gather(1, (sel // kk).unsqueeze(-1).expand(-1, -1, depth))
        paths = torch.cat([parent, cand.gather(1, sel).unsqueeze(-1)], dim=-1)
    return paths[:, 0], err[:, 0]


# --- the loss of given codes ----------------------------------------------------------------------


def _loss_of_codes(rows, codes, idx, keep, beta: float, w_cb: float):
    """The layer's loss for rows assigned to ``idx`` by a search that ran elsewhere (beam search,
    or the shared codebook's per-depth search), by plain autograd over O(N D) tensors:
    ``w_cb * mse(sg(rows), C[idx]) + beta * mse(rows, sg(C[idx]))`` over the kept rows.

    Args:
        rows: (N, D); codes: (K, D) (a parameter: the codebook term reaches it); idx int64 (N,);
            keep: optional bool (N,).

    Returns:
        ``(q (N, D) the codes in codes' dtype, loss fp32 0-dim, err fp32 (N,) squared errors)``.
    """
    n, d = rows.shape
    q = codes.index_select(0, idx)
    rf, qf = rows.to(torch.float32), q.to(torch.float32)
    err = (rf.detach() - qf.detach()).square().sum(-1)
    if keep is None:
        denom, kept = max(n * d, 1), lambda t: t
    else:  # zeroed before squaring: a masked NaN row gets a 0 gradient, not NaN * 0
        denom, kept = keep.sum().clamp_min(1) * d, lambda t: torch.where(keep[:, None], t, 0.0)
    loss = kept(rf - qf.detach()).square().sum() * (beta / denom)
    if w_cb:
        loss = loss + kept(rf.detach() - qf).square().sum() * (w_cb / denom)
    return q, loss, err


# --- the modules ----------------------------------------------------------------------------------


class ResidualVQ(nn.Module):
    """Residual vector quantization (SoundStream / EnCodec style).

    Args:
        dim: channels of the input.
        codebook_size: K of every depth, or a sequence of Q sizes, one per depth.
        num_quantizers: number of depths Q (may be left out when ``codebook_size`` is a
            sequence).
        codebook_dim: dimension of the codes, with one linear projection in and out shared by
            all depths when it differs from ``dim``.
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        shared_codebook: one :class:`VectorQuantizer` (``layers`` holds it alone) searched at
            every depth. Each training forward searches every depth with the codes as they were
            before the forward, then takes one EMA / usage / dead-code step from all depths'
            rows pooled (EMA: ``n_k = sum_l n_k^l``, ``s_k = sum_l s_k^l``, decayed once); a
            gradient codebook receives the sum of every depth's codebook gradient. k-means init
            runs on depth 0's rows. Requires one codebook size.
        quantize_dropout: in training, each forward quantizes with the first ``n`` depths only,
            ``n`` drawn per forward (the rest give index -1); eval uses every depth.
        quantize_dropout_cutoff_index: the last kept depth is drawn uniformly from
            ``[cutoff, Q)``, so at least ``cutoff + 1`` depths are always kept.
        quantize_dropout_multiple_of: round the number of kept depths up to a multiple of this
            (EnCodec's structured dropout), capped at Q.
        beam_size: beam search with this many beams in training (None or 1: greedy).
        eval_beam_size: the same in eval mode (default ``beam_size``).
        beam_score_weights: None (default): beams are ranked by their current reconstruction
            error, so the last depth picks the sequence with the smallest error. A sequence of Q
            floats: vector-quantize-pytorch's score, the weighted sum of every depth's error
            (see :func:`residual_beam_search`).
        rotation_trick: every depth's layer quantizes with the rotation trick, and the output
            is the sum of every depth's attached output (each depth's gradient reaches ``x``
            through its rotation from that depth's residual), as vector-quantize-pytorch. Every
            route (greedy, shared codebook, beam search, quantize dropout).
        quant_grad_frac: in ``[0, 1]``; the residual passed to the next depth is
            ``r - (frac q + (1 - frac) sg(q))`` (vector-quantize-pytorch's ``quant_grad_frac``).
            Non-zero (or ``rotation_trick``) switches to the per-depth output above; a depth's
            output then passes its gradient straight through when the rotation is off.
        **layer_kwargs: passed to every :class:`VectorQuantizer` (``ema``, ``beta``,
            ``kmeans_init``, ``dead_code_steps``, ``cosine``, ``backend``, ...). ``seed`` is
            offset per depth so that depths restart codes independently; ``seed`` also seeds the
            quantize-dropout generator (identical on every rank).

    Indices are ``x``'s shape without the channel dim plus a trailing ``Q`` dim; a depth left out
    by quantize dropout (or ``num_active``) gives ``-1`` there, and :meth:`codes_from_indices`
    decodes ``-1`` to no code.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int | Sequence[int],
        num_quantizers: int | None = None,
        *,
        codebook_dim: int | None = None,
        channel_first: bool = False,
        shared_codebook: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        beam_size: int | None = None,
        eval_beam_size: int | None = None,
        beam_score_weights: Sequence[float] | None = None,
        rotation_trick: bool = False,
        quant_grad_frac: float = 0.0,
        **layer_kwargs,
    ):
        super().__init__()
        sizes = _codebook_sizes(codebook_size, num_quantizers)
        q = len(sizes)
        if layer_kwargs.get("heads", 1) != 1:
            raise ValueError("ResidualVQ does not support heads > 1")
        quant_grad_frac = _check_grad_options(rotation_trick, quant_grad_frac)
        self.rotation_trick, self.quant_grad_frac = rotation_trick, quant_grad_frac
        # per-depth outputs attached (vqp's gradients) instead of one straight-through
        self._attach = rotation_trick or quant_grad_frac > 0
        self._pooled_unsupported = [n for n in _POOLED_UNSUPPORTED if layer_kwargs.get(n)]
        beams = max(beam_size or 1, eval_beam_size or 1)
        if self._pooled_unsupported and (shared_codebook or beams > 1):
            _reject_pooled(self._pooled_unsupported)
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(
                f"shared_codebook=True needs one codebook_size for every depth, got {sizes}"
            )
        check_dropout(q, quantize_dropout_cutoff_index, quantize_dropout_multiple_of)
        _check_beam("beam_size", beam_size)
        _check_beam("eval_beam_size", eval_beam_size)
        eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        if layer_kwargs.get("cosine", False) and max(beam_size or 1, eval_beam_size or 1) > 1:
            raise ValueError("beam_size > 1 is not supported with cosine=True")
        if beam_score_weights is not None:
            weights = tuple(float(w) for w in beam_score_weights)
            if len(weights) != q or not all(math.isfinite(w) for w in weights):
                raise ValueError(
                    f"beam_score_weights must hold {q} finite floats (one per depth), "
                    f"got {beam_score_weights!r}"
                )
            beam_score_weights = weights
        self.dim, self.num_quantizers, self.codebook_sizes = dim, q, sizes
        self.codebook_size = sizes[0] if len(set(sizes)) == 1 else sizes
        self.channel_first, self.shared_codebook = channel_first, shared_codebook
        self.quantize_dropout = bool(quantize_dropout) and q > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.beam_size, self.eval_beam_size = beam_size, eval_beam_size
        self.beam_score_weights = beam_score_weights
        inner = codebook_dim or dim
        self.codebook_dim = inner
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self.seed = layer_kwargs.pop("seed", 0)
        self.random_streams = RandomStreams(self.seed)  # quantize dropout (saved by fastvq.app.rng)
        self.last_num_active = None  # the last forward's draw
        self.dropout_draws = OrderedDict()  # per-call draws, replayed by recomputations
        self.ranks_checked = False  # the cross-rank check has run (host flag: no sync)
        self.layers = nn.ModuleList(
            VectorQuantizer(
                inner, k, seed=self.seed + i, rotation_trick=rotation_trick, **layer_kwargs
            )
            for i, k in enumerate(sizes[:1] if shared_codebook else sizes)
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, "
            f"num_quantizers={self.num_quantizers}, shared_codebook={self.shared_codebook}, "
            f"quantize_dropout={self.quantize_dropout}, beam_size={self.beam_size}, "
            f"eval_beam_size={self.eval_beam_size}"
        ) + (
            f", rotation_trick={self.rotation_trick}, quant_grad_frac={self.quant_grad_frac}"
            if self._attach
            else ""
        )

    def depth_layer(self, depth: int) -> VectorQuantizer:
        """The :class:`VectorQuantizer` searched at ``depth`` (the one layer when shared).

        Args:
            depth: the depth, an int in ``[0, num_quantizers)``.
        """
        return self.layers[0 if self.shared_codebook else depth]

    def draw_num_active(self) -> int:
        """Draw the number of depths for one training forward under quantize dropout, from the
        module's generator (CPU, seeded from ``seed``: every rank draws the same; no sync)."""
        if not self.quantize_dropout:
            return self.num_quantizers
        return draw_active(
            self, self.num_quantizers, self.quantize_dropout_cutoff_index,
            self.quantize_dropout_multiple_of,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        return_stats: bool = False,
        return_losses: bool = False,
        beam_size: int | None = None,
        num_active: int | None = None,
    ):
        """Quantize ``x`` with every depth (or the first ``num_active``).

        Args:
            x: ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
            mask: optional bool, ``x``'s shape without the channel dim (True = real token), as
                for :class:`VectorQuantizer`.
            return_stats: also return each depth's :class:`~fastvq.CodebookStats` (a list of Q,
                None for a depth left out). With a shared codebook or beam search the counts are
                this rank's rows (the update itself still uses every rank's).
            return_losses: also return ``losses``, fp32 (Q,) each depth's loss (0 for a depth
                left out); ``loss`` is their sum.
            beam_size: beam search with this many beams for this call (default: the module's
                ``beam_size`` in training, ``eval_beam_size`` in eval; None or 1 is greedy).
            num_active: quantize with the first ``num_active`` depths only (for example a lower
                bitrate at inference); in training with ``quantize_dropout`` it is drawn when
                None (as :meth:`draw_num_active`; activation checkpointing's recomputation
                replays the call's own draw).

        Returns:
            ``QuantizeOutput(quantized, indices, loss)``: ``quantized`` like ``x`` (forward
            value the sum of the codes, gradient straight through to ``x``; with
            ``rotation_trick`` or ``quant_grad_frac`` through every depth), ``indices`` int64
            ``x``'s shape without the channel dim plus ``(Q,)`` (``-1`` for depths left out),
            ``loss`` the fp32 sum of the depths' losses. ``return_losses`` adds ``losses`` after
            ``loss``; ``return_stats`` adds ``stats`` last.
        """
        check_input(x, self.dim, self.channel_first)
        lead = x.movedim(1, -1).shape[:-1] if self.channel_first else x.shape[:-1]
        if mask is not None:
            check_mask(mask, lead)
        check_active(num_active, self.num_quantizers)
        _check_beam("beam_size", beam_size)
        if beam_size is None:
            beam_size = self.beam_size if self.training else self.eval_beam_size
        beam = beam_size or 1
        if beam > 1 and self.layers[0].cosine:
            raise ValueError("beam_size > 1 is not supported with cosine=True")
        if beam > 1 and self._pooled_unsupported:
            _reject_pooled(self._pooled_unsupported)
        if num_active is None and self.training and self.quantize_dropout:
            num_active = replayable_draw(
                self, self.num_quantizers, self.quantize_dropout_cutoff_index,
                self.quantize_dropout_multiple_of,
            )  # fmt: skip
        num_active = self.num_quantizers if num_active is None else num_active
        fields = _rank_fields(self, num_active, beam)
        _check_ranks_if_due(self, "ResidualVQ", self.layers[0], fields)
        if self.channel_first:
            x = x.movedim(1, -1)
        z = self.project_in(x)
        if beam > 1 or self.shared_codebook:
            n = math.prod(lead)
            valid = None if mask is None else mask.reshape(n)
            qs, idx, losses, stats = self._forward_pooled(
                z.reshape(n, self.codebook_dim), valid, num_active, beam
            )
            qs = [q.reshape(z.shape) for q in qs]
            idx = [i.reshape(lead) for i in idx]
        else:
            qs, idx, losses, stats, _ = run_depths(
                self.layers[:num_active], z, mask, detach=not self._attach,
                quant_grad_frac=self.quant_grad_frac, return_stats=True,
            )  # fmt: skip
        total = sum_depths(qs)
        if self._attach:  # the gradient reaches z through every depth's output
            quantized = self.project_out(total)
        else:
            quantized = self.project_out(_StraightThrough.apply(z, total))  # codes; grad to z
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        dropped = self.num_quantizers - num_active
        idx = idx + [torch.full_like(idx[0], -1)] * dropped
        indices = torch.stack(idx, dim=-1)
        losses = torch.stack(losses)
        loss = losses.sum()
        losses = F.pad(losses, (0, dropped))
        stats = stats + [None] * dropped
        return stack_output(quantized, indices, loss, losses, stats, return_losses, return_stats)

    def _forward_pooled(self, z2, valid, num_active: int, beam: int):
        """The route for a shared codebook or beam search: every depth's search first (greedy
        with the fused search, or :func:`residual_beam_search`), each depth's loss from its codes
        (:func:`_loss_of_codes`), then one state update per layer from its depths' rows pooled.

        Args:
            z2: (N, codebook_dim) rows; valid: optional bool (N,); num_active: depths to run.

        Returns:
            Per depth: codes (N, codebook_dim), indices (N,), loss (fp32 0-dim), stats.
        """
        update = self.training and not in_backward()
        layers = [self.depth_layer(i) for i in range(num_active)]
        distinct = list(dict.fromkeys(layers))
        for layer in distinct:
            check_same_device("x", z2, "codebook", layer.book.anchor)
        backend = {layer: resolve_backend(layer.backend, z2.device) for layer in distinct}
        if update:
            for layer in distinct:
                layer.check_ranks_if_due()
            if not all(layer.book.initialised for layer in distinct):
                self._kmeans_init_greedy_(z2, valid, layers, backend)
        if beam > 1:
            codebooks = [layer.book.codes()[0].detach() for layer in layers]
            beam_idx, _ = residual_beam_search(
                z2.detach(), codebooks, beam, score_weights=self.beam_score_weights
            )
        residual = z2
        qs, idx, losses, rows, oks = [], [], [], [], []
        for depth, layer in enumerate(layers):
            codes = layer.book.codes()[0]
            zr = F.normalize(residual, dim=-1) if layer.cosine else residual
            if beam > 1:
                i = beam_idx[:, depth]
            else:
                i = search(zr.detach(), codes.detach(), backend=backend[layer])[0]
            w_cb = 0.0 if layer.ema else layer.codebook_loss_weight
            q, loss, err = _loss_of_codes(zr, codes, i, valid, layer.beta, w_cb)
            q = q.detach().to(residual.dtype)
            if self._attach:  # as the layer's op: the code, its gradient to zr (rotated or not)
                q = attach_codes(zr, q, rotation=self.rotation_trick, keep=valid)
                residual = residual - frac_gradient(q, self.quant_grad_frac)
            else:
                residual = residual - q
            ok = torch.isfinite(err) if valid is None else torch.isfinite(err) & valid
            qs.append(q)
            idx.append(i)
            losses.append(loss)
            rows.append(zr.detach())
            oks.append(ok)
        stats = []
        for i, ok, layer in zip(idx, oks, layers, strict=True):
            counts = batch_statistics(i, ok, None, layer.codebook_size, "torch")[0]
            ppl, used = perplexity(counts[None]), (counts > 0).float().mean()
            stats.append(CodebookStats(ppl, used, counts[None]))
        for layer in distinct:
            mine = [d for d in range(num_active) if layers[d] is layer]
            self._update_layer_(
                layer, torch.cat([idx[d] for d in mine]), torch.cat([oks[d] for d in mine]),
                torch.cat([rows[d] for d in mine]), backend[layer], update,
            )  # fmt: skip
        return qs, idx, losses, stats

    @staticmethod
    def _update_layer_(layer, idx, ok, rows, backend: str, update: bool) -> None:
        """One training step of ``layer`` from its depths' rows pooled (M = depths x N rows);
        in eval only the layer's last-batch statistics."""
        k = layer.codebook_size
        counts, sums = batch_statistics(idx, ok, rows if update and layer.ema else None, k, backend)
        counts = counts[None]
        if update:
            sums = sums[None] if layer.ema else None
            counts = layer.book.step_(counts, sums, [rows], [ok.to(torch.float32)])
        layer.book.record_batch_(counts)

    @torch.no_grad()
    def _kmeans_init_greedy_(self, z2, valid, layers, backend) -> None:
        """k-means init of the layers not yet initialised, each on the rows it would search on
        this batch's greedy path (depth 0's rows for a shared codebook)."""
        residual = z2.detach()
        for depth, layer in enumerate(layers):
            if not layer.book.initialised:
                layer.book.kmeans_init_([residual], [valid])
            if all(lay.book.initialised for lay in layers[depth + 1 :]):
                return
            codes = layer.book.codes()[0].detach()
            zr = F.normalize(residual, dim=-1) if layer.cosine else residual
            i = search(zr, codes, backend=backend[layer])[0]
            residual = residual - codes.index_select(0, i).to(residual.dtype)

    def _check_indices(self, indices, check: bool) -> None:
        check_indices(indices, 1, 0, check=False)  # tensor and integer dtype; range below
        if indices.dim() < 1 or indices.shape[-1] != self.num_quantizers:
            raise ValueError(
                f"indices must have a trailing dim of size num_quantizers={self.num_quantizers}, "
                f"got shape {tuple(indices.shape)}"
            )
        if check and indices.numel() > 0:
            per_depth = indices.reshape(-1, self.num_quantizers)
            lo, hi = per_depth.amin(0).tolist(), per_depth.amax(0).tolist()
            for depth, (a, b) in enumerate(zip(lo, hi, strict=True)):
                k = self.codebook_sizes[depth]
                if a < -1 or b >= k:
                    raise ValueError(
                        f"indices must lie in [0, {k}) (or be -1, no code) at depth {depth}, "
                        f"got values in [{a}, {b}]"
                    )

    def depth_codes(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Each depth's code for ``indices`` (vector-quantize-pytorch's ``get_codes_from_indices``,
        in fastvq's trailing layout), before ``project_out``.

        Args:
            indices: int ``(..., Q)``; ``-1`` is no code (a depth left out).
            check: raise ValueError on indices outside ``[-1, K_l)`` (a host sync).

        Returns:
            ``(..., Q, codebook_dim)``, zero where the index is -1.
        """
        self._check_indices(indices, check)
        return torch.stack(self._decode(indices.to(torch.int64)), dim=-2)

    def _decode(self, indices: torch.Tensor) -> list:
        out = []
        for depth in range(self.num_quantizers):
            i = indices[..., depth]
            codes = self.depth_layer(depth).book.codes()[0]
            q = F.embedding(i.clamp_min(0), codes)
            out.append(torch.where((i >= 0).unsqueeze(-1), q, 0.0))
        return out

    def codes_from_indices(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Decode ``(..., Q)`` indices to the module's output (eval: bit-identical to forward).

        Args:
            indices: int ``(..., Q)``; ``-1`` is no code (a depth left out by quantize dropout or
                ``num_active``; pad coarser indices with -1 up to Q).
            check: raise ValueError on indices outside ``[-1, K_l)`` (a host sync).

        Returns:
            ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.
        """
        self._check_indices(indices, check)
        qs = self._decode(indices.to(torch.int64))
        total = qs[0]
        for q in qs[1:]:  # in depth order, as the forward sums them
            total = total + q
        out = self.project_out(total)
        if self.channel_first:
            out = out.movedim(-1, 1)
        return out


class GroupedResidualVQ(nn.Module):
    """``groups`` independent :class:`ResidualVQ` stacks over equal slices of the channel dim.

    ``x``'s channels are split into ``groups`` contiguous slices of ``dim // groups``; slice ``g``
    is quantized by ``rvqs[g]``. Under quantize dropout one number of depths is drawn per forward
    for all groups (the module's own generator, seeded from ``seed``).

    Args:
        dim: channels of the input (divisible by ``groups``).
        codebook_size: K of every depth, or a sequence of Q sizes, one per depth (as
            :class:`ResidualVQ`), the same for every group.
        num_quantizers: number of depths Q of every group (may be left out when
            ``codebook_size`` is a sequence).
        groups: number of groups.
        channel_first: ``x`` is ``(B, dim, ...)`` instead of ``(..., dim)``.
        **kwargs: every other :class:`ResidualVQ` argument (``shared_codebook`` shares a
            codebook across the depths of one group, not across groups). ``seed`` is offset by
            ``g * Q`` for group ``g``, so every layer of every group has its own seed.

    Indices are ``x``'s shape without the channel dim plus ``(groups, Q)`` (vector-quantize-
    pytorch puts the group dim first: ``indices.movedim(-2, 0)``). ``loss`` is the mean of the
    groups' losses (as heads in :class:`VectorQuantizer`: its scale does not depend on
    ``groups``); ``losses`` is ``(groups, Q)``.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int | Sequence[int],
        num_quantizers: int | None = None,
        *,
        groups: int,
        channel_first: bool = False,
        **kwargs,
    ):
        super().__init__()
        if not is_int(groups) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if not is_int(dim) or dim < 1 or dim % groups != 0:
            raise ValueError(f"dim ({dim!r}) must be a positive int divisible by groups ({groups})")
        self.dim, self.groups, self.channel_first = dim, groups, channel_first
        self.seed = kwargs.pop("seed", 0)
        q = len(_codebook_sizes(codebook_size, num_quantizers))
        self.num_quantizers = q
        self.random_streams = RandomStreams(self.seed)  # as ResidualVQ's quantize dropout
        self.last_num_active = None
        self.dropout_draws = OrderedDict()  # per-call draws, replayed by recomputations
        self.ranks_checked = False
        self.rvqs = nn.ModuleList(
            ResidualVQ(
                dim // groups, codebook_size, num_quantizers, seed=self.seed + g * q, **kwargs
            )
            for g in range(groups)
        )

    def extra_repr(self) -> str:
        return f"dim={self.dim}, groups={self.groups}, channel_first={self.channel_first}"

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        return_stats: bool = False,
        return_losses: bool = False,
        beam_size: int | None = None,
        num_active: int | None = None,
    ):
        """Quantize every group (arguments as :meth:`ResidualVQ.forward`).

        Args:
            x: ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``; its channels are
                split into ``groups`` contiguous slices.
            mask: optional bool, ``x``'s shape without the channel dim (True = real token),
                applied to every group.
            return_stats: also return ``stats``: per group, the list of Q
                :class:`~fastvq.CodebookStats` (None for a depth left out).
            return_losses: also return ``losses``, fp32 ``(groups, Q)`` each group's per-depth
                losses (0 for a depth left out).
            beam_size: beam search with this many beams in every group for this call (default:
                the groups' ``beam_size`` in training, ``eval_beam_size`` in eval; 1 is greedy).
            num_active: quantize every group with its first ``num_active`` depths only (int in
                ``[1, Q]``); in training with ``quantize_dropout`` one draw for all groups when
                None.

        Returns:
            ``QuantizeOutput(quantized, indices, loss)``: ``quantized`` like ``x``, ``indices``
            int64 ``x``'s shape without the channel dim plus ``(groups, Q)``, ``loss`` the mean
            over groups of each group's summed loss. ``return_losses`` adds ``losses`` fp32
            ``(groups, Q)``; ``return_stats`` adds ``stats``, per group the list of Q.
        """
        check_input(x, self.dim, self.channel_first)
        check_active(num_active, self.num_quantizers)
        if self.channel_first:
            x = x.movedim(1, -1)
        first = self.rvqs[0]
        if num_active is None and self.training and first.quantize_dropout:
            num_active = replayable_draw(
                self, self.num_quantizers, first.quantize_dropout_cutoff_index,
                first.quantize_dropout_multiple_of,
            )  # fmt: skip
        fields = {"dim": self.dim, "groups": self.groups, "seed": self.seed}
        fields.update(_rank_fields(first, num_active or self.num_quantizers, 0))
        _check_ranks_if_due(self, "GroupedResidualVQ", first.layers[0], fields)
        outs = [
            rvq(
                chunk,
                mask,
                return_stats=True,
                return_losses=True,
                beam_size=beam_size,
                num_active=num_active,
            )  # fmt: skip
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=-1), strict=True)
        ]
        return merge_groups(outs, self.channel_first, return_losses, return_stats)

    def codes_from_indices(self, indices: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Decode ``(..., groups, Q)`` indices (``-1``: no code) to the module's output (eval:
        bit-identical to forward); ``(..., dim)``, or ``(B, dim, ...)`` with ``channel_first``.

        Args:
            indices: int ``(..., groups, Q)``; ``-1`` is no code (a depth left out).
            check: raise ValueError on indices outside ``[-1, K_l)`` (a host sync).
        """
        check_indices(indices, 1, 0, check=False)  # tensor and integer dtype
        if indices.dim() < 2 or indices.shape[-2:] != (self.groups, self.num_quantizers):
            raise ValueError(
                f"indices must end with (groups, num_quantizers) = "
                f"({self.groups}, {self.num_quantizers}), got shape {tuple(indices.shape)}"
            )
        out = torch.cat(
            [
                rvq.codes_from_indices(indices[..., g, :], check=check)
                for g, rvq in enumerate(self.rvqs)
            ],
            dim=-1,
        )
        return out.movedim(-1, 1) if self.channel_first else out
