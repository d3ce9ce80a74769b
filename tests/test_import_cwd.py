"""From the folder that holds the clone, Python's path search finds the clone's root folder
`fastvq/` (no __init__.py) and imports it as an empty namespace package ahead of an editable
install's import hook (docs/guide.md, "Imports from any folder"). The documented remedy on
Python >= 3.11, leaving the current folder off sys.path, gives the real package."""

import os
import subprocess
import sys

import pytest

CODE = "import fastvq; print(fastvq.__file__); fastvq.vector_quantize"


@pytest.fixture
def parent_of_clone(tmp_path):
    """A folder holding a folder named like the clone: its root has no __init__.py."""
    clone = tmp_path / "fastvq"
    (clone / "fastvq").mkdir(parents=True)
    (clone / "README.md").write_text("a clone's root\n")
    return tmp_path


@pytest.mark.skipif(sys.version_info < (3, 11), reason="-P / PYTHONSAFEPATH need Python 3.11")
@pytest.mark.parametrize("how", ["-P", "PYTHONSAFEPATH"])
def test_safe_path_imports_the_package(parent_of_clone, how):
    env = dict(os.environ)
    args = [sys.executable, "-c", CODE]
    if how == "-P":
        args.insert(1, "-P")
    else:
        env["PYTHONSAFEPATH"] = "1"
    done = subprocess.run(
        args, cwd=parent_of_clone, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    assert path.endswith("__init__.py") and not path.startswith(str(parent_of_clone)), path
