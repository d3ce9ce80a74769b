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
    initialised) and the generators that vector-quantizer layers keep for dead-code restart.
    Those live outside ``state_dict`` (a cache filled on first use), so they are read here."""
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
        gens = getattr(module, "_generators", None)
        if isinstance(gens, dict) and gens:
            state["layers"][name] = [
                [gen_name, dev, _b64(g.get_state())] for (gen_name, dev), g in gens.items()
            ]
    return state


def set_rng_state(model: torch.nn.Module, state: dict) -> None:
    """Restore what :func:`rng_state` recorded (the layers' generators into their caches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(t) for t in state["cuda"]])
    modules = dict(model.named_modules())
    for name, gens in state.get("layers", {}).items():
        module = modules.get(name)
        if module is None or not isinstance(getattr(module, "_generators", None), dict):
            raise CheckpointError(f"rng_state names layer {name!r}, which the model lacks")
        for gen_name, dev, blob in gens:
            g = torch.Generator(device=dev)
            g.set_state(_unb64(blob))
            module._generators[(gen_name, dev)] = g
