"""Shared fixtures. Runs Triton kernels under the CPU interpreter where there is no CUDA.

TRITON_INTERPRET must be set before triton is imported; fastvq imports triton lazily, so setting
it here (before any test module imports fastvq.kernels) is early enough.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastvq  # noqa: E402

# Under pytest-xdist (`-n auto`, README's test command) each worker gets its share of the cores:
# torch's default of one thread per core in every worker would oversubscribe them.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, _CORES // _WORKERS))

# The longest tests go first, so that under xdist none starts last and leaves one worker running
# alone at the end (each takes 20 s to 5 min on the 2-core CI machine).
_LONG_FIRST = (
    "test_gpu_static.py::test_default_binaries_pass_the_gate",
    "test_gpu_check.py::test_dry_run",
    "test_codebook_losses_tiled.py::test_aux_losses_memory_stays_far_below_nxk",
    "test_vqp_examples.py::test_example_agrees_across_impls[vqp_autoencoder.py]",
    "test_vqp_examples.py::test_example_agrees_across_impls[vqp_autoencoder_sim_vq.py]",
    "test_ddp.py::test_uneven_empty_and_masked_batches_do_not_hang",
    "test_ddp.py::test_ddp_equals_single_process_and_ranks_agree",
)


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each worker holds torch, about 1 GB)."""
    return max(1, min(4, _CORES))


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Every op test runs on both backends (Triton interpreted on CPU)."""
    if request.param == "triton" and not fastvq.triton_available():
        pytest.skip("Triton is not importable here")
    return request.param


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: intra-op threads add only wake-up latency (up to 30 ms per
    matmul measured on a loaded 2-core machine, against 0.01 ms on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli_env(monkeypatch):
    """For the command-line tests: tiny tensors on one thread (faster on a busy box; their
    ``--threads 1`` keeps main() there), and no fault injection left over from the environment."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.delenv("FASTVQ_INTERRUPT_AT_STEP", raising=False)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    _long_first(items)
    _skip_other_vqp(items)


def _long_first(items):
    items.sort(key=lambda it: not it.nodeid.endswith(_LONG_FIRST))  # stable: order kept otherwise


def _skip_other_vqp(items):
    """Tests that compare with vector-quantize-pytorch (marked ``extras``, in a module that uses
    it) skip, saying why, when the installed release is not the one fastvq.compat.vqp follows
    (``pip install -e ".[bench]"`` installs that one)."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    from fastvq.compat.vqp import MIRRORED_VERSION

    try:
        installed = version("vector-quantize-pytorch")
    except PackageNotFoundError:
        return  # the tests skip on the import itself
    if installed == MIRRORED_VERSION:
        return
    reason = (f"fastvq.compat.vqp follows vector-quantize-pytorch {MIRRORED_VERSION}; "
              f"{installed} is installed")  # fmt: skip
    texts: dict = {}
    for item in items:
        if item.get_closest_marker("extras") is None:
            continue
        path = Path(str(item.fspath))
        if path not in texts:
            texts[path] = "vector_quantize_pytorch" in path.read_text()
        if texts[path]:
            item.add_marker(pytest.mark.skip(reason=reason))
