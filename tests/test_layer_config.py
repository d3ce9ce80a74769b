"""VectorQuantizer's options: one dataclass checks and resolves them."""

import pytest

from fastvq import VectorQuantizer
from fastvq.layer_config import VQConfig


def test_unknown_option_names_the_layer_and_the_closest_option():
    with pytest.raises(TypeError, match=r"VectorQuantizer .* 'decai'; did you mean decay\?"):
        VectorQuantizer(8, 16, decai=0.9)
    with pytest.raises(TypeError, match="'zzz'$"):
        VectorQuantizer(8, 16, zzz=1)


def test_defaults_resolve_like_the_layer():
    cfg = VQConfig(64, 512, heads=4)
    assert (cfg.ema, cfg.kmeans_init, cfg.dead_code_steps, cfg.codebook_dim) == (True, True, 20, 16)
    assert (
        cfg.num_codebooks == 4
        and VQConfig(64, 512, heads=4, shared_codebook=True).num_codebooks == 1
    )
    sim = VQConfig(64, 512, simvq=True)
    assert (sim.ema, sim.kmeans_init, sim.dead_code_steps) == (False, False, 0)
    vq = VectorQuantizer(64, 512, heads=4, decay=0.9, seed=3)
    assert (vq.codebook_dim, vq.decay, vq.book.decay, vq.seed) == (16, 0.9, 0.9, 3)


def test_codebook_options_write_through_to_the_codebook():
    vq = VectorQuantizer(8, 16)
    vq.decay = 0.5
    assert vq.book.decay == 0.5 and vq.decay == 0.5
