"""The random states a training step draws from, recorded in every checkpoint so a resumed run
continues bit-identically: Python's ``random``, numpy's and torch's global generators (CUDA's too,
once initialised) and the seeded streams of fastvq's modules (:class:`fastvq.streams.RandomStreams`,
each module's public ``random_streams``).
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch

from ..streams import RandomStreams
from .checkpoint import CheckpointError


def seed_everything(seed: int) -> None:
    """Seed the global RNGs a run may draw from: torch's (CPU and every CUDA device), numpy's
    and Python's ``random``. Called where a run starts and before a model is built."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds only
    torch.manual_seed(seed)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(model: torch.nn.Module) -> dict:
    """The random states a training step of ``model`` draws from, as JSON (``run.json``'s
    ``rng_state``): Python's ``random``, numpy's and torch's global generators (CUDA's too, once
    initialised) and, under ``"layers"``, the streams of every submodule that owns some (its
    ``random_streams``), keyed by module name: ``{name: [[purpose, device, base64 state]]}``.
    Those streams live outside ``state_dict`` (filled on first use), so they are read here."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
        "layers": {},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(t) for t in torch.cuda.get_rng_state_all()]
    for name, module in model.named_modules():
        streams = _streams(module)
        items = streams.state() if streams is not None else []
        if items:
            state["layers"][name] = [[purpose, dev, _b64(t)] for purpose, dev, t in items]
    return state


def set_rng_state(model: torch.nn.Module, state: dict) -> None:
    """Restore what :func:`rng_state` recorded (the modules' streams included).

    A run saved before a quantizer's streams moved to its codebook names the layer (``"vq"``):
    when that module owns no streams but its codebook ``"vq.book"`` does (``"book"`` for the
    root module ``""``), they are loaded there."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(t) for t in state["cuda"]])
    modules = dict(model.named_modules())
    for name, items in state.get("layers", {}).items():
        streams = _streams_named(modules, name)
        if streams is None:
            raise CheckpointError(f"rng_state names layer {name!r}, which the model lacks")
        streams.load_state([(purpose, dev, _unb64(blob)) for purpose, dev, blob in items])


def _streams(module: torch.nn.Module):
    """``module.random_streams`` when it is a :class:`RandomStreams`, else None."""
    streams = getattr(module, "random_streams", None)
    if isinstance(streams, RandomStreams):
        return streams
    return None


def _streams_named(modules: dict, name: str):
    """The streams saved under ``name``: the module's own, or (runs saved before the streams
    moved to the codebook) its ``book`` child's."""
    book = f"{name}.book" if name else "book"
    for candidate in (name, book):
        module = modules.get(candidate)
        if module is not None and _streams(module) is not None:
            return _streams(module)
    return None
