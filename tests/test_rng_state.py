"""fastvq.app.rng: the modules' random streams in run.json, and runs saved before a quantizer's
streams moved from the layer (``vq``) to its codebook (``vq.book``)."""

import base64
import json

import pytest
import torch
from torch import nn

from fastvq.app.checkpoint import CheckpointError
from fastvq.app.rng import rng_state, set_rng_state
from fastvq.streams import RandomStreams


class Book(nn.Module):  # the new contract: a codebook module owning the layer's streams
    def __init__(self, seed=3):
        super().__init__()
        self.random_streams = RandomStreams(seed)


class Layer(nn.Module):
    def __init__(self, seed=3):
        super().__init__()
        self.book = Book(seed)


class Model(nn.Module):
    def __init__(self, seed=3):
        super().__init__()
        self.vq = Layer(seed)
        self.head = nn.Linear(2, 2)


def _advanced(seed=3, n=5) -> torch.Generator:
    """A restart-shared stream of a layer seeded ``seed`` after ``n`` draws."""
    g = RandomStreams(seed).get("restart-shared", "cpu")
    torch.rand(n, generator=g)
    return g


def _old_format(name: str, g: torch.Generator) -> dict:
    """run.json's rng_state as fastvq wrote it when the layer itself held its generators."""
    state = rng_state(nn.Linear(1, 1))  # the global generators, and no module streams
    blob = base64.b64encode(g.get_state().numpy().tobytes()).decode()
    state["layers"] = {name: [["restart-shared", "cpu", blob]]}
    return json.loads(json.dumps(state))  # as read back from disk


def test_streams_round_trip_under_their_module_name():
    a, b = Model(seed=3), Model(seed=3)
    torch.rand(4, generator=a.vq.book.random_streams.get("restart-shared", "cpu"))
    state = json.loads(json.dumps(rng_state(a)))
    assert list(state["layers"]) == ["vq.book"]
    assert [p for p, _, _ in state["layers"]["vq.book"]] == ["restart-shared"]
    set_rng_state(b, state)
    ga = a.vq.book.random_streams.get("restart-shared", "cpu")
    gb = b.vq.book.random_streams.get("restart-shared", "cpu")
    assert torch.equal(torch.rand(8, generator=ga), torch.rand(8, generator=gb))


@pytest.mark.parametrize("root", [False, True], ids=["named-vq", "root"])
def test_old_run_layer_name_loads_into_its_codebook(root):
    model = Layer() if root else Model()
    book = model.book if root else model.vq.book
    set_rng_state(model, _old_format("" if root else "vq", _advanced(n=5)))
    got = torch.rand(8, generator=book.random_streams.get("restart-shared", "cpu"))
    assert torch.equal(got, torch.rand(8, generator=_advanced(n=5)))
    assert not torch.equal(got, torch.rand(8, generator=_advanced(n=0)))  # not a fresh stream


def test_unknown_module_name_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="'encoder'"):
        set_rng_state(Model(), _old_format("encoder", _advanced()))
