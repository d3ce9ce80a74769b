"""Load a codebook trained by taming-transformers or diffusers into a :class:`VectorQuantizer`.

Both libraries keep the codebook in ``quantize.embedding.weight`` (an ``nn.Embedding`` of shape
``(n_e, e_dim)``), take channel-first feature maps, pick ``argmin_k ||z - e_k||^2`` (ties to the
lowest index, as here) and compute

    legacy=True  (their default):  mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)
    legacy=False:                  beta * mean((sg(z_q) - z)^2) + mean((z_q - sg(z))^2)

i.e. with ``legacy=True`` their ``beta`` weighs the *codebook* term and the commitment has weight
1 (the VQ-VAE paper puts beta on the commitment, as fastvq and ``legacy=False`` do). The layer
built here reproduces their indices, outputs and loss: ``beta=1, codebook_loss_weight=beta`` for
``legacy=True``, ``beta=beta`` for ``legacy=False``; gradient codebook (they have no EMA), no
k-means init (the codes are trained) and no dead-code restart unless you ask for them.

Not supported: taming's ``remap`` (a used-codes subset file); decode with ``remap`` off.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..layer import VectorQuantizer

CODEBOOK_KEYS = ("quantize.embedding.weight", "embedding.weight", "quantize.embed.weight")


def codebook_from_state_dict(state_dict: Mapping[str, torch.Tensor], key: str | None = None):
    """The ``(K, D)`` codebook tensor of a taming/diffusers VQ model's ``state_dict``.

    Looks for ``key`` or, by default, the first of ``CODEBOOK_KEYS`` present (also under any
    prefix, e.g. ``first_stage_model.quantize.embedding.weight`` in latent-diffusion checkpoints).
    """
    if key is not None:
        return state_dict[key]
    for k in CODEBOOK_KEYS:
        if k in state_dict:
            return state_dict[k]
    for k in CODEBOOK_KEYS[:1]:
        hits = [name for name in state_dict if name.endswith("." + k)]
        if len(hits) == 1:
            return state_dict[hits[0]]
    raise KeyError(f"no codebook found: looked for {CODEBOOK_KEYS} (or a prefixed one); pass key=")


def from_pretrained_codebook(
    weight_or_state_dict,
    *,
    beta: float = 0.25,
    legacy: bool = True,
    channel_first: bool = True,
    key: str | None = None,
    **layer_kwargs,
) -> VectorQuantizer:
    """A :class:`VectorQuantizer` holding a taming-transformers / diffusers codebook.

    Args:
        weight_or_state_dict: the ``(K, D)`` ``quantize.embedding.weight`` tensor, or a whole
            ``state_dict`` to take it from.
        beta: their ``beta`` (taming's configs and diffusers default to 0.25).
        legacy: their ``legacy`` flag (default True in both), which decides where beta goes.
        channel_first: inputs are ``(B, D, H, W)`` feature maps, as theirs are.
        key: the state_dict key of the codebook, if not a standard one.
        **layer_kwargs: other :class:`VectorQuantizer` options (e.g. ``backend``).

    Returns:
        The layer (gradient codebook, initialised, no dead-code restart by default); its
        ``indices`` equal theirs with ``sane_index_shape=True`` (``(B, H, W)``; without it they
        return the flattened ``(B*H*W,)``), its ``quantized`` and ``loss`` equal theirs.
    """
    if isinstance(weight_or_state_dict, Mapping):
        weight = codebook_from_state_dict(weight_or_state_dict, key)
    else:
        weight = torch.as_tensor(weight_or_state_dict)
    if weight.dim() != 2:
        raise ValueError(f"codebook must have shape (K, D), got {tuple(weight.shape)}")
    k, d = weight.shape
    if legacy:  # theirs: commitment weight 1, beta on the codebook term
        kw = dict(beta=1.0, codebook_loss_weight=beta)
    else:
        kw = dict(beta=beta)
    kw.update(ema=False, kmeans_init=False, dead_code_steps=0, channel_first=channel_first)
    kw.update(layer_kwargs)
    vq = VectorQuantizer(d, k, **kw)
    vq.load_codebook(weight.detach().float())
    return vq
