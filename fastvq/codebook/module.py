"""``Codebook``: the module that owns a quantizer's codes and every piece of their state.

It holds the parametrisation (an EMA buffer, a plain ``nn.Parameter``, or SimVQ's frozen basis
times a learned map), the EMA statistics, the usage and dead-code counters, the k-means flag, the
random streams and the last batch's statistics, and it is the only writer of all of them: k-means
init, the EMA step, dead-code restart and loading go through its methods (the rules themselves
are in :mod:`fastvq.codebook.rules`). Layers compose it; they search its :meth:`codes` and hand
back each training step's counts and rows.

State names (also its ``state_dict`` keys)::

    codebook      (G, S, D)  the codes: a buffer (EMA) or a parameter (gradient); absent (SimVQ)
    cluster_size  (G, S)     EMA counts                 embed_avg  (G, S, D)  EMA sums
    steps_unused  (G, S)     dead-code counters         usage_counts (G, S)   rows per code
    initted       ()         k-means init done
    simvq_basis   (G, S, D)  SimVQ's frozen basis       simvq_map  (G, D, D)  its learned map

Policies, chosen at construction: the EMA step (``ema_rule``), the dead-code restart
(``restart_rule``) and the k-means init (``kmeans_rule``) are fastvq's (:mod:`.rules`) or
vector-quantize-pytorch's (:mod:`.vqp_rules`).

``G`` codebooks (heads with their own codebooks, else 1) of ``S`` codes (a shard's slice of the
``K`` codes, ``S = K`` unsharded). ``grouped=False`` stores them without the ``G`` dim (G = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _dist
from ..streams import RandomStreams, fresh_generator
from . import rules, vqp_rules
from .stats import perplexity

LEARNING = ("ema", "grad", "simvq")
RULES = {"ema_rule": ("fastvq", "vqp"), "restart_rule": ("steps", "vqp"),
         "kmeans_rule": ("fastvq", "vqp")}  # fmt: skip


class Codebook(nn.Module):
    """The codes of ``num_codebooks`` codebooks of ``codebook_size`` codes of size ``dim``.

    Args:
        num_codebooks: G.
        codebook_size: K, the global number of codes.
        dim: D, the code size.
        learning: ``"ema"`` (EMA buffers, Laplace smoothing), ``"grad"`` (an ``nn.Parameter``
            trained by the loss) or ``"simvq"`` (a frozen random basis times a learned map).
        init: the initial codes (G, S, D) (or (S, D) with ``grouped=False``); None draws them
            with kaiming-uniform from torch's global RNG, as ``nn.Linear`` does. SimVQ: the
            frozen basis (None draws it from ``seed``).
        shard: ``(start, end)``: this module holds codes ``[start, end)`` of K (default all).
        decay, eps: EMA decay and Laplace smoothing (``learning="ema"``).
        cosine: codes are l2-normalised.
        kmeans_init: register the k-means flag, not yet initialised; ``kmeans_iters`` its
            Lloyd iterations.
        kmeans_flag: register the flag even without ``kmeans_init`` (then initialised).
        dead_code_steps, restart_noise: dead-code restart (0 = never).
        counters: register ``steps_unused`` and ``usage_counts``.
        seed: seed of every random stream (:mod:`fastvq.streams`).
        backend: search and scatter backend of k-means and the statistics.
        sync_distributed, process_group: all-reduce statistics over the group when
            torch.distributed runs more than one rank in it.
        grouped: store the ``G`` dim (False: G must be 1, tensors are (S, D)).
        simvq_map: SimVQ's map as any module from (..., D) to (..., D') (vqp's
            ``codebook_transform``); default a (G, D, D) parameter applied as a bias-free
            ``nn.Linear``.
        ema_rule: ``"fastvq"`` (:func:`.rules.update_`) or ``"vqp"`` (:func:`.vqp_rules.update_`:
            vqp's weighted, accumulable lerp; with ``smooth_each_step=False`` the codes follow
            the statistics only when :meth:`smooth_` is called, vqp's ``manual_ema_update``).
        restart_rule: ``"steps"`` (unused for ``dead_code_steps`` steps,
            :func:`.rules.restart_dead_`) or ``"vqp"`` (EMA count below ``dead_code_threshold``,
            :func:`.vqp_rules.expire_`; the count becomes ``reset_cluster_size``, default the
            threshold).
        kmeans_rule: ``"fastvq"`` (:func:`.rules.kmeans_init_`) or ``"vqp"`` (vqp's sampled
            rows, then the same Lloyd steps: :func:`.vqp_rules.kmeans_init_`).
        parameter: an EMA codebook's codes are an ``nn.Parameter`` (the EMA still writes them;
            vqp's ``learnable_codebook``, whose EMA statistics are kept too).
    """

    def __init__(
        self, num_codebooks: int, codebook_size: int, dim: int, *, learning: str = "ema",
        init: torch.Tensor | None = None, shard: tuple[int, int] | None = None,
        decay: float = 0.99, eps: float = 1e-5, cosine: bool = False, kmeans_init: bool = False,
        kmeans_iters: int = 10, kmeans_flag: bool = True, dead_code_steps: int = 0,
        restart_noise: float = 0.01, counters: bool = True, seed: int = 0, backend: str = "auto",
        sync_distributed: bool = True, process_group=None, grouped: bool = True,
        simvq_map: nn.Module | None = None, ema_rule: str = "fastvq", restart_rule: str = "steps",
        kmeans_rule: str = "fastvq", dead_code_threshold: float = 0.0,
        reset_cluster_size: float | None = None, smooth_each_step: bool = True,
        parameter: bool = False,
    ):  # fmt: skip
        super().__init__()
        if learning not in LEARNING:
            raise ValueError(f"learning must be one of {LEARNING}, got {learning!r}")
        for name, value in (("ema_rule", ema_rule), ("restart_rule", restart_rule),
                            ("kmeans_rule", kmeans_rule)):  # fmt: skip
            if value not in RULES[name]:
                raise ValueError(f"{name} must be one of {RULES[name]}, got {value!r}")
        if ema_rule == "vqp" and (learning != "ema" or dead_code_steps > 0):
            raise ValueError("ema_rule='vqp' needs learning='ema' and restart_rule='vqp'")
        self.ema_rule, self.restart_rule, self.kmeans_rule = ema_rule, restart_rule, kmeans_rule
        self.dead_code_threshold = dead_code_threshold if restart_rule == "vqp" else 0.0
        self.reset_cluster_size = (
            dead_code_threshold if reset_cluster_size is None else reset_cluster_size
        )
        self.smooth_each_step = smooth_each_step
        self.num_codebooks, self.codebook_size, self.dim = num_codebooks, codebook_size, dim
        self.start, self.end = (0, codebook_size) if shard is None else shard
        self.learning, self.ema = learning, learning == "ema"
        self.decay, self.eps, self.cosine = decay, eps, cosine
        self.kmeans_iters, self.dead_code_steps = kmeans_iters, dead_code_steps
        self.restart_noise, self.seed, self.backend = restart_noise, seed, backend
        self.sync_distributed, self.process_group = sync_distributed, process_group
        self.grouped = grouped
        self.random_streams = RandomStreams(seed)
        shape = (num_codebooks, self.end - self.start, dim)
        simvq_init = init if learning == "simvq" else None
        if init is None:  # SimVQ too: its draw keeps the global RNG stream of earlier releases
            init = torch.empty(shape)
            for i in range(num_codebooks):
                nn.init.kaiming_uniform_(init[i])
            init = F.normalize(init, dim=-1) if cosine else init
        g = (lambda t: t) if grouped else (lambda t: t[0])
        init = init if grouped or init.dim() == 2 else init[0]
        lead = init.shape[:-1]
        if learning == "ema":
            if parameter:
                self.codebook = nn.Parameter(init)
            else:
                self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(lead))
            self.register_buffer("embed_avg", init.clone())
        elif learning == "grad":
            self.codebook = nn.Parameter(init)
        if counters:
            self.register_buffer("steps_unused", torch.zeros(lead, dtype=torch.int64))
            self.register_buffer("usage_counts", torch.zeros(lead))  # training batches
        self.initialised = not kmeans_init  # host mirror of ``initted``: no sync per forward
        if kmeans_init or kmeans_flag:
            self.register_buffer("initted", torch.tensor(self.initialised))
        if learning == "simvq":
            # vqp's SimVQ: basis randn * D^-0.5, map nn.Linear(D, D, bias=False). The basis is
            # drawn from ``seed`` (not the global RNG), so every rank holds the same one.
            if simvq_init is None:
                gen = fresh_generator(seed, "simvq-basis")
                simvq_init = g(torch.randn(shape, generator=gen) * dim**-0.5)
            elif tuple(simvq_init.shape) != (shape if grouped else shape[1:]):
                want = shape if grouped else shape[1:]
                raise ValueError(
                    f"init (the SimVQ basis) must have shape {want}, got {tuple(simvq_init.shape)}"
                )
            self.register_buffer("simvq_basis", simvq_init)
            if simvq_map is None:
                w = torch.empty(num_codebooks, dim, dim)
                for i in range(num_codebooks):
                    nn.init.kaiming_uniform_(w[i], a=math.sqrt(5))  # nn.Linear's weight init
                self.simvq_map = nn.Parameter(g(w))
            else:
                self.simvq_transform = simvq_map
        self.register_buffer("last_perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("last_used_fraction", torch.zeros(()), persistent=False)
        self.register_load_state_dict_post_hook(_after_load)

    def _apply(self, fn, recurse=True):
        # A converted codebook (.half(), .bfloat16(), .to(dtype)) keeps its statistics in fp32:
        # the rules accumulate fp32 counts and sums into them, and an EMA of counts in 8 mantissa
        # bits would stall. The codes themselves take the new dtype.
        super()._apply(fn, recurse)
        for name in ("cluster_size", "embed_avg", "usage_counts"):
            t = getattr(self, name, None)
            if t is not None and t.dtype != torch.float32:
                setattr(self, name, t.float())
        return self

    def extra_repr(self) -> str:
        whole = (self.start, self.end) == (0, self.codebook_size)
        shard = "" if whole else f"[{self.start}, {self.end}) of "
        return (
            f"num_codebooks={self.num_codebooks}, codes={shard}{self.codebook_size}, "
            f"dim={self.dim}, learning={self.learning}, cosine={self.cosine}"
        )

    # --- reading ----------------------------------------------------------------------------------

    @property
    def anchor(self) -> torch.Tensor:
        """The state tensor that fixes the codebook's device (SimVQ: the basis)."""
        return self.simvq_basis if self.learning == "simvq" else self.codebook

    def _grouped(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or self.grouped else t[None]

    def codes(self) -> torch.Tensor:
        """(G, S, D) the codes searched, differentiable for a gradient codebook (SimVQ: the
        basis times the map, through which the map gets its gradient); l2-normalised when
        ``cosine`` (an EMA codebook stores them normalised)."""
        if self.learning == "simvq":
            basis = self._grouped(self.simvq_basis)
            if hasattr(self, "simvq_map"):
                cb = basis @ self._grouped(self.simvq_map).mT
            else:
                cb = self.simvq_transform(basis)
        else:
            cb = self._grouped(self.codebook)
        return F.normalize(cb, dim=-1) if self.cosine and not self.ema else cb

    def state(self) -> rules.CodebookState:
        """The state as the rules' (G, S, ...) views. SimVQ has no EMA, restart or k-means: the
        rules only keep its usage counters, and the basis stands in for the codes (never
        written)."""
        get = lambda name: self._grouped(getattr(self, name, None))  # noqa: E731
        return rules.CodebookState(
            self._grouped(self.anchor.data), get("cluster_size"), get("embed_avg"),
            get("steps_unused"), get("usage_counts"), getattr(self, "initted", None),
        )  # fmt: skip

    def lookup(self, indices: torch.Tensor, heads: int = 1) -> torch.Tensor:
        """Decode int64 ``indices`` (...) (or (..., heads)): the codes ``(..., heads * D)``."""
        return rules.lookup(self.codes(), indices, heads)

    # --- distributed ------------------------------------------------------------------------------

    def dist_policy(self) -> dict:
        """``{"group", "distributed"}``: synchronise over ``process_group`` when
        ``sync_distributed`` and torch.distributed runs more than one rank in it."""
        group = self.process_group if self.sync_distributed else None
        return {
            "group": group,
            "distributed": self.sync_distributed and _dist.is_distributed(group),
        }

    def check_ranks(self, what: str, fields: dict) -> None:
        """ValueError on every rank when ranks disagree on ``fields`` (name -> value; the
        caller includes ``"kmeans initialised": self.initialised`` where it wants it): one small
        all-gather and a host sync."""
        _dist.check_same_across_ranks(what, fields, self.anchor.device, self.dist_policy()["group"])

    # --- writing ----------------------------------------------------------------------------------

    # k-means (host syncs, data-dependent shapes, a generator) cannot trace: under torch.compile
    # it runs eagerly. Callers test ``initialised`` (a host bool) first, so it is one graph break
    # on the first training forward only.
    @torch.compiler.disable
    def kmeans_init_(self, rows: list, keep: list) -> bool:
        """k-means on this batch's kept, finite rows (gathered from every rank) unless done;
        ``rows`` per codebook (M, D), ``keep`` per codebook a bool (M,) or None. Returns whether
        the codebook is initialised (False: no rank had a row yet)."""
        if self.initialised:
            return True
        if self.kmeans_rule == "vqp":
            self.initialised = vqp_rules.kmeans_init_(self, self.state(), rows, keep)
        else:
            self.initialised = rules.kmeans_init_(
                self, self.state(), rows, keep, start=self.start, **self.dist_policy()
            )
        return self.initialised

    def step_(
        self, counts: torch.Tensor, sums: torch.Tensor | None, rows: list, weights: list, *,
        ema_step: bool = True, sharded: bool = False, ema_weight=None, accumulate: bool = False,
    ) -> torch.Tensor:  # fmt: skip
        """One training step: EMA, usage, dead-code counters and restart
        (:func:`fastvq.codebook.rules.update_`, or the ``"vqp"`` rules); returns the counts over
        every rank (``ema_rule="vqp"``: this rank's).

        Args:
            counts: fp32 (G, S) this rank's rows per code; ``sums`` fp32 (G, S, D) their sums.
            rows, weights: per codebook this rank's rows (M, D) and fp32 (M,) 0/1 validity.
            ema_step: False skips the EMA step (counters and restart still run).
            sharded: the statistics are already the shard owner's, over every rank's rows.
            ema_weight, accumulate: ``ema_rule="vqp"`` only (:func:`.vqp_rules.update_`).
        """
        st, policy = self.state(), self.dist_policy()
        if self.ema_rule == "fastvq":
            counts = rules.update_(
                self, st, counts, sums, rows, weights, ema_step=ema_step, sharded=sharded,
                start=self.start, **policy,
            )  # fmt: skip
        elif not vqp_rules.update_(
            self, st, counts, sums, ema_step=ema_step, weight=ema_weight, accumulate=accumulate,
            **policy,
        ):  # fmt: skip
            return counts
        if self.restart_rule == "vqp":
            self.expire_(rows, [None if w is None else w > 0 for w in weights])
        return counts

    @torch.no_grad()
    def smooth_(self) -> None:
        """The codes from the EMA statistics now (vqp's ``update_ema``, for
        ``smooth_each_step=False``)."""
        vqp_rules.smooth_(self, self.state())

    @torch.no_grad()
    def expire_(self, rows, keep=None) -> None:
        """``restart_rule="vqp"``'s replacement of the codes whose EMA count is below
        ``dead_code_threshold`` by ``rows`` (per codebook (M, D), ``keep`` per codebook a bool
        (M,) or None); training mode only, as vqp."""
        if self.dead_code_threshold > 0 and self.training:
            vqp_rules.expire_(self, self.state(), rows, keep)

    def record_batch_(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep this batch's perplexity and used fraction of ``counts`` (G, K); returns both."""
        # detached rather than under no_grad(): an exported graph would hold an empty no_grad
        # region, which torch 2.13 cannot reload (the outputs are unused in inference)
        counts = counts.detach()
        ppl, used = perplexity(counts), (counts > 0).float().mean()
        # An exported (inference) graph keeps no bookkeeping state: the buffer writes would
        # become extra outputs of the program.
        if not torch.compiler.is_exporting():
            self.last_perplexity.copy_(ppl)
            self.last_used_fraction.copy_(used)
        return ppl, used

    @torch.no_grad()
    def load_(self, weight) -> None:
        """Set the codes from ``weight`` (S, D) or (G, S, D): reset the EMA statistics to
        match, mark the codebook initialised and clear the dead-code counters. SimVQ: the basis
        becomes ``weight`` and the map the identity, so :meth:`codes` returns ``weight``."""
        st = self.state()
        weight = torch.as_tensor(weight)
        if weight.dim() == 2:
            weight = weight.unsqueeze(0).expand(st.codebook.shape[0], -1, -1)
        if tuple(weight.shape) != tuple(st.codebook.shape):
            raise ValueError(
                f"weight must have shape {tuple(st.codebook.shape[1:])} or "
                f"{tuple(st.codebook.shape)}, got {tuple(weight.shape)}"
            )
        weight = weight.to(st.codebook)
        rules.set_codes_(st, F.normalize(weight, dim=-1) if self.cosine and self.ema else weight)
        if self.learning == "simvq":
            if not hasattr(self, "simvq_map"):
                raise ValueError("load_codebook cannot invert a custom SimVQ map module")
            eye = torch.eye(self.dim, dtype=self.simvq_map.dtype)
            self.simvq_map.copy_(eye.expand_as(self.simvq_map))
        self.initialised = True


def _after_load(module: Codebook, incompatible_keys) -> None:
    if hasattr(module, "initted"):
        module.initialised = bool(module.initted)
