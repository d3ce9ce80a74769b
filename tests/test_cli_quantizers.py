"""`fastvq train vqvae --quantizer {vq,fsq,lfq,bsq,ibq,simvq}` (issue 29 item 5, issue 25 item 6,
issue 27 item 5): each
family trains, records its choice in run.json, resumes bit-identically without repeating it,
decodes its indices, carries a PixelCNN prior over its codes, and a bad combination of options
is a one-line error naming the argument."""

import json

import pytest
import torch
from cli_helpers import one_line_error, rc
from safetensors.torch import load_file

from fastvq.app.checkpoint import load_run
from fastvq.app.data import write_synthetic_dataset
from fastvq.app.parser import IBQ_DEFAULTS, LFQ_DEFAULTS, QUANTIZER_OPTIONS
from fastvq.ibq import IBQConfig
from fastvq.lfq import LFQConfig
from fastvq.models import VQVAE, VQVAEConfig

pytestmark = pytest.mark.usefixtures("cli_env")

TINY = ["--hidden", "8", "--dim", "4", "--batch-size", "16", "--eval-limit", "16"]
FAMILIES = {
    "vq": (["--codebook-size", "16", "--dead-code-steps", "2"], 16),
    "fsq": (["--levels", "5,3,3"], 45),
    "lfq": (["--codebook-size", "64"], 64),
    "bsq": (["--codebook-size", "32", "--entropy-weight", "0.2"], 32),
    "ibq": (["--codebook-size", "32", "--codebook-weight", "0.5", "--init-scale", "0.1"], 32),
    "simvq": (["--codebook-size", "16", "--beta", "0.5"], 16),
}
LAYER_CLASS = {"vq": "VectorQuantizer", "fsq": "FSQ", "ibq": "IBQ", "simvq": "VectorQuantizer"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("idx"), n_train=96, n_test=32)


def _train(data_dir, out, quantizer, *extra) -> int:
    argv = ["train", "vqvae", "--data-dir", str(data_dir), "--out", str(out), *TINY]
    return rc([*argv, "--quantizer", quantizer, *FAMILIES[quantizer][0], *extra])


@pytest.fixture(scope="module")
def fsq_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsq") / "run"
    assert _train(data_dir, out, "fsq", "--steps", "3") == 0
    return out


@pytest.mark.parametrize("quantizer", sorted(FAMILIES))
def test_each_family_trains_records_and_resumes_bit_identically(quantizer, data_dir, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train(data_dir, ref, quantizer, "--steps", "4") == 0
    monkeypatch.setenv("FASTVQ_INTERRUPT_AT_STEP", "2")
    assert _train(data_dir, run, quantizer, "--steps", "4") == 130
    monkeypatch.delenv("FASTVQ_INTERRUPT_AT_STEP")
    # the resume repeats no option: the family and its options come from run.json
    assert rc(["train", "vqvae", "--out", str(run), "--resume"]) == 0
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    meta = json.loads((run / "run.json").read_text())
    size = FAMILIES[quantizer][1]
    assert meta["step"] == 4 and meta["config"]["quantizer"] == quantizer
    assert meta["args"]["quantizer"] == quantizer and meta["config"]["codebook_size"] == size
    if quantizer == "fsq":
        assert meta["args"]["levels"] == [5, 3, 3] and meta["args"]["beta"] is None
    if quantizer == "bsq":
        assert meta["args"]["entropy_weight"] == 0.2 and meta["args"]["ema"] is None
        assert meta["args"]["beta"] == 0.25
    model, _ = load_run(run)
    if quantizer == "ibq":
        assert meta["args"]["codebook_weight"] == 0.5 and meta["args"]["beta"] is None
        assert meta["args"]["entropy_weight"] == IBQ_DEFAULTS["entropy_weight"]
        assert model.vq.config.codebook_weight == 0.5
        assert meta["args"]["init_scale"] == 0.1 and model.vq.config.init_scale == 0.1
    if quantizer == "simvq":
        assert meta["args"]["beta"] == 0.5 and meta["args"]["ema"] is None
        assert model.vq.simvq and model.vq.beta == 0.5
    assert type(model.vq).__name__ == LAYER_CLASS.get(quantizer, "LFQ")
    assert 1 <= meta["metrics"]["codes_used"] <= size


@pytest.mark.parametrize("quantizer", sorted(FAMILIES))
def test_decode_indices_equals_the_eval_forward(quantizer):
    """The model decodes any family's index maps (``codes_from_indices``) as its forward does."""
    extra = {"vq": {"codebook_size": 16}, "fsq": {"vq_kwargs": {"levels": [5, 3, 3]}},
             "lfq": {"codebook_size": 64}, "bsq": {"codebook_size": 32},
             "ibq": {"codebook_size": 32}, "simvq": {"codebook_size": 16}}[quantizer]  # fmt: skip
    torch.manual_seed(0)
    cfg = VQVAEConfig(hidden=8, res_hidden=4, n_res=1, dim=4, quantizer=quantizer, **extra)
    model = VQVAE(cfg).eval()
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        quantized, indices, loss = model.encode(x)
        assert indices.shape == (3, 7, 7) and indices.dtype == torch.int64
        assert 0 <= int(indices.min()) and int(indices.max()) < cfg.codebook_size
        assert torch.equal(model.decode_indices(indices), model.decode(quantized))
        assert torch.isfinite(loss)


def test_prior_trains_on_an_fsq_runs_indices_and_samples(fsq_run, data_dir, tmp_path, capsys):
    prior = tmp_path / "prior"
    argv = ["train", "pixelcnn", "--vqvae", str(fsq_run), "--data-dir", str(data_dir)]
    argv += ["--out", str(prior), "--steps", "2", "--batch-size", "16", "--eval-limit", "16"]
    assert rc([*argv, "--channels", "8", "--layers", "2"]) == 0
    meta = json.loads((prior / "run.json").read_text())
    assert meta["config"]["num_codes"] == 45  # prod(levels): one class per FSQ code
    assert meta["metrics"]["nll_bits_per_code"] > 0
    png = tmp_path / "s.png"
    assert rc(["sample", str(prior), "-n", "2", "--out", str(png)]) == 0
    assert png.is_file()


BAD = [
    (["--quantizer", "fsq", "--codebook-size", "64"], ["--codebook-size", "--levels"]),
    (["--quantizer", "lfq", "--codebook-size", "48"], ["--codebook-size", "power of 2"]),
    (["--quantizer", "bsq", "--codebook-size", "1"], ["--codebook-size", "power of 2"]),
    (["--quantizer", "fsq", "--levels", "2,3"], ["--levels", "preserve_symmetry"]),
    (["--levels", "5,3"], ["--levels", "--quantizer vq"]),
    (["--quantizer", "lfq", "--levels", "5,3"], ["--levels", "--quantizer lfq"]),
    (["--quantizer", "fsq", "--entropy-weight", "0.1"], ["--entropy-weight", "fsq"]),
    (["--quantizer", "fsq", "--no-ema"], ["--ema", "--quantizer fsq"]),
    (["--quantizer", "fsq", "--beta", "0.5"], ["--beta", "--quantizer fsq"]),
    (["--quantizer", "lfq", "--dead-code-steps", "3"], ["--dead-code-steps"]),
    (["--quantizer", "fsq", "--levels", "5,x"], ["--levels", "8,5,5,5"]),
    (["--quantizer", "rvq"], ["--quantizer", "invalid choice"]),
    (["--quantizer", "ibq", "--beta", "0.5"], ["--beta", "--quantizer ibq"]),
    (["--quantizer", "ibq", "--no-ema"], ["--ema", "--quantizer ibq"]),
    (["--quantizer", "ibq", "--levels", "5,3"], ["--levels", "--quantizer ibq"]),
    (["--quantizer", "lfq", "--codebook-weight", "1"], ["--codebook-weight", "--quantizer lfq"]),
    (["--codebook-weight", "1"], ["--codebook-weight", "--quantizer vq"]),
    (["--quantizer", "ibq", "--commitment-weight", "-1"], ["--commitment-weight", ">= 0"]),
    (["--quantizer", "ibq", "--init-scale", "0"], ["--init-scale", "> 0"]),
    (["--init-scale", "0.1"], ["--init-scale", "--quantizer vq"]),
    (["--quantizer", "simvq", "--entropy-weight", "1"], ["--entropy-weight", "simvq"]),
    (["--quantizer", "simvq", "--cosine"], ["--cosine", "--quantizer simvq"]),
]


@pytest.mark.parametrize("extra, words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_combinations_are_one_line_errors(extra, words, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "vqvae", "--data-dir", str(data_dir), "--out", str(out), "--steps", "1"]
    assert rc([*argv, *extra]) == 2
    one_line_error(capsys, *words)
    assert not (out / "run.json").exists()


def test_quantizer_options_are_only_vqvaes(data_dir, tmp_path, capsys):
    argv = ["train", "ae", "--data-dir", str(data_dir), "--out", str(tmp_path / "r")]
    assert rc([*argv, "--quantizer", "fsq"]) == 2
    one_line_error(capsys, "--quantizer", "train ae")


def test_resume_refuses_another_family(fsq_run, tmp_path, capsys):
    assert rc(["train", "vqvae", "--out", str(fsq_run), "--resume", "--quantizer", "lfq"]) == 2
    one_line_error(capsys, "--quantizer", "lfq", "fsq")
    assert rc(["train", "vqvae", "--out", str(fsq_run), "--resume", "--levels", "8,5"]) == 2
    one_line_error(capsys, "--levels", "[8, 5]", "[5, 3, 3]")


def test_config_checks_and_old_configs():
    old = {"in_channels": 1, "hidden": 8, "dim": 4, "codebook_size": 16, "vq_kwargs": {}}
    assert VQVAEConfig(**old).quantizer == "vq"  # a config saved before the choice
    assert VQVAEConfig().codebook_size == 256
    assert VQVAEConfig(quantizer="fsq", vq_kwargs={"levels": [8, 5, 5, 5]}).codebook_size == 1000
    with pytest.raises(ValueError, match="codebook_size"):
        VQVAEConfig(quantizer="fsq", codebook_size=64, vq_kwargs={"levels": [8, 5, 5, 5]})
    with pytest.raises(ValueError, match="levels"):
        VQVAEConfig(quantizer="fsq")
    with pytest.raises(ValueError, match="quantizer"):
        VQVAEConfig(quantizer="rvq")
    # beta is LFQ/BSQ's commitment weight too: without one the encoder's output diverges
    bsq = VQVAE(VQVAEConfig(hidden=8, dim=4, quantizer="bsq", codebook_size=16, beta=0.5))
    assert bsq.vq.commitment_loss_weight == 0.5 and bsq.vq.spherical


def test_help_defaults_are_the_layers():
    import dataclasses

    lfq = {f.name: f.default for f in dataclasses.fields(LFQConfig)}
    assert LFQ_DEFAULTS == {"entropy_weight": lfq["entropy_loss_weight"]}
    ibq = {f.name: f.default for f in dataclasses.fields(IBQConfig)}
    assert IBQ_DEFAULTS == {opt: ibq[arg] for opt, arg in QUANTIZER_OPTIONS["ibq"].items()}
