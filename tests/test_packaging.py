"""The built wheel ships the Triton kernels as fastvq.kernels (no torch reinstall)."""

import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_wheel_contains_kernels_and_imports(tmp_path):
    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(wheel_dir), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    (wheel,) = wheel_dir.glob("fastvq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in (
        "fastvq/kernels/__init__.py",
        "fastvq/kernels/vq_search.py",
        "fastvq/ops.py",
        "fastvq/app/cli.py",
        "fastvq/py.typed",
    ):
        assert f in names, f"{f} missing from {wheel.name}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE not shipped"
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package leaked"

    # A fresh venv that installs only the wheel itself (--no-deps) and sees torch, triton and the
    # rest through the running interpreter's own site-packages: a .pth file lists them, which
    # works whether pytest runs in a venv or in the system Python (system_site_packages would
    # see the base interpreter, not an outer venv). Directories named in a .pth are not site
    # dirs, so an editable fastvq there stays invisible.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    nested_site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    outer = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p).is_dir()]
    (Path(nested_site) / "outer_env.pth").write_text("\n".join(outer) + "\n")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=240)  # fmt: skip
    code = (
        "import fastvq, fastvq.kernels, sys; "
        f"assert fastvq.__file__.startswith({str(env_dir)!r}), fastvq.__file__; "
        "print(fastvq.kernels.vq_search_fwd_kernel.fn.__module__)"
    )
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [py, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "fastvq.kernels.vq_search"


def test_triton_only_in_the_dev_extra():
    """Triton is not a base dependency (CUDA torch brings its own; on CPU only the interpreter
    tests use it): `pip install -e .` stays 1 GB lighter (docs/guide.md, Install)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["dev"])
