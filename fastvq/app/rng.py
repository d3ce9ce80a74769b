"""The random states a training step draws from, recorded in every checkpoint so a resumed run
continues bit-identically: Python's ``random``, numpy's and torch's global generators (CUDA's too,
once initialised) and the seeded streams of fastvq's modules (:class:`fastvq.streams.RandomStreams`,
each module's public ``random_streams``).
"""

from __future__ import annotations

import base64
import random
import sys

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


def set_rng_state(model: torch.nn.Module, state: dict, device=None, source="run.json") -> None:
    """Restore what :func:`rng_state` recorded (the modules' streams included); ``source`` names
    the file it came from in errors, which are :class:`CheckpointError` naming the field.

    A run saved before a quantizer's streams moved to its codebook names the layer (``"vq"``):
    when that module owns no streams but its codebook ``"vq.book"`` does (``"book"`` for the
    root module ``""``), they are loaded there.

    ``device``: where the resumed run computes (``--device`` may change on resume). A module
    stream saved on a device of another type (a GPU run's ``cuda:0`` streams, resumed on the
    CPU) cannot be carried over: a CUDA generator's state (Philox seed and offset) is no CPU
    generator's state (Mersenne Twister), and the resumed layer draws from streams keyed by its
    own device anyway. Such a stream is dropped with a note on stderr; the layer's streams on
    the new device start from their seeds, as on a fresh run. So is the global CUDA state when
    CUDA is unavailable. A device string that names no device is a damaged ``run.json``."""
    if not isinstance(state, dict):
        raise _bad(source, "rng_state", "not an object")
    try:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    except (KeyError, TypeError, ValueError) as e:
        raise _bad(source, "rng_state.python", e) from None
    try:
        keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise _bad(source, "rng_state.numpy", e) from None
    try:
        torch.set_rng_state(_unb64(state["torch"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise _bad(source, "rng_state.torch", e) from None
    if state.get("cuda") and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all([_unb64(t) for t in state["cuda"]])
        except (TypeError, ValueError, RuntimeError) as e:
            raise _bad(source, "rng_state.cuda", e) from None
    target = torch.device(device) if device is not None else None
    modules = dict(model.named_modules())
    layers = state.get("layers", {})
    if not isinstance(layers, dict):
        raise _bad(source, "rng_state.layers", "not an object")
    for name, items in layers.items():
        field = f"rng_state.layers.{name}"
        streams = _streams_named(modules, name)
        if streams is None:
            raise CheckpointError(f"rng_state names layer {name!r}, which the model lacks")
        kept = []
        for i, item in enumerate(items if isinstance(items, list) else [None]):
            try:
                purpose, dev, blob = item
                saved_on = torch.device(dev)
            except (TypeError, ValueError, RuntimeError) as e:
                raise _bad(source, f"{field}[{i}]", e) from None
            if not _usable(saved_on, target):
                print(
                    f"fastvq: note: {source}: {field}[{i}]: the {purpose} stream was saved on "
                    f"{dev}, which this run (device {target or 'cpu'}) does not use; that "
                    "stream starts from its seed here",
                    file=sys.stderr,
                )
                continue
            try:
                kept.append((purpose, dev, _unb64(blob)))
            except (TypeError, ValueError) as e:
                raise _bad(source, f"{field}[{i}]", e) from None
        try:
            streams.load_state(kept)
        except (TypeError, ValueError, RuntimeError) as e:
            raise _bad(source, field, e) from None


def _usable(saved_on: torch.device, target: torch.device | None) -> bool:
    """Whether a stream saved on ``saved_on`` can be restored for a run on ``target``: CPU
    streams always (some streams are CPU-only, whatever the run's device); another device type
    only when the run computes on that type (any, for ``target`` None) and the device exists
    here."""
    if saved_on.type == "cpu":
        return True
    if target is not None and saved_on.type != target.type:
        return False
    if saved_on.type == "cuda":
        return torch.cuda.is_available() and (saved_on.index or 0) < torch.cuda.device_count()
    return True


def _bad(source, field: str, e) -> CheckpointError:
    what = " ".join(str(e).split()) or type(e).__name__
    return CheckpointError(
        f"{source}: field {field}: cannot be restored ({what}); the run is damaged or was edited "
        "by hand"
    )


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
