"""fastvq.streams: the seeds of every named stream, and saving and restoring them."""

import pytest
import torch

from fastvq.streams import RandomStreams, fresh_generator, per_call_generator, stream_seed


def test_seeds_are_the_ones_fastvq_has_always_used():
    s = 5 * 1000003
    assert stream_seed(5, "restart-shared") == s
    assert stream_seed(5, "restart-local", 3) == s + 1 + 3
    assert stream_seed(5, "quantize-dropout") == s
    assert stream_seed(5, "simvq-basis") == s + 7
    assert stream_seed(5, "codes-init", 4) == s + 4
    assert stream_seed(5, "kmeans") == 5
    assert stream_seed(5, "restart-shared", 9) == s  # not a per-rank stream


def test_unknown_stream_is_named():
    with pytest.raises(ValueError, match="'restart'"):
        stream_seed(0, "restart")
    with pytest.raises(ValueError, match="'nope'"):
        RandomStreams(0).load_state([("nope", "cpu", torch.Generator().get_state())])


def test_state_round_trip_continues_the_same_draws():
    a = RandomStreams(7)
    torch.rand(3, generator=a.get("restart-local", "cpu", rank=1))
    b = RandomStreams(7)
    b.load_state(a.state())
    want = torch.rand(4, generator=a.get("restart-local", "cpu"))
    assert torch.equal(torch.rand(4, generator=b.get("restart-local", "cpu")), want)
    assert len(b) == 1


def test_a_stream_is_created_once_per_purpose_and_device():
    s = RandomStreams(1)
    assert s.get("restart-shared", "cpu") is s.get("restart-shared", torch.device("cpu"))
    first = torch.rand(2, generator=fresh_generator(1, "restart-shared"))
    assert torch.equal(torch.rand(2, generator=s.get("restart-shared", "cpu")), first)


def test_per_call_generators_replay_from_the_global_rng():
    torch.manual_seed(0)
    a = torch.rand(3, generator=per_call_generator("sample-codes", "cpu", rank=2))
    torch.manual_seed(0)
    b = torch.rand(3, generator=per_call_generator("sample-codes", "cpu", rank=2))
    c = torch.rand(3, generator=per_call_generator("sample-codes", "cpu", rank=2))
    assert torch.equal(a, b) and not torch.equal(b, c)
