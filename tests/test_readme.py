"""The README's and the guide's code run as written: the README's example, its "coming from"
imports, and the guide's "API in 20 lines" block are executed here."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT / "docs" / "guide.md"


def _block(path: Path, heading: str) -> str:
    section = path.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run(code: str, seed: int) -> dict:
    namespace = {}
    exec(compile(f"import torch; torch.manual_seed({seed})\n" + code, "README", "exec"), namespace)
    return namespace


def test_readme_example_runs():
    code = _block(README, "## Example")
    assert len(code.strip().splitlines()) <= 10  # the front page's 10-line example
    for seed in range(5):  # the assert inside must hold for any data, not one lucky seed
        namespace = _run(code, seed)
        assert namespace["fmap"].grad is not None  # the straight-through gradient arrived
        assert namespace["indices"].shape == (4, 7, 7)


def test_readme_front_end_imports_run():
    """The "coming from" lines import without the other libraries installed."""
    namespace = _run(_block(README, "## Coming from vqp / diffusers / taming"), 0)
    assert callable(namespace["swap_quantizer"])
    assert callable(namespace["from_pretrained_codebook"])


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) <= 200


def test_guide_api_snippet_runs():
    code = _block(GUIDE, "## The API in 20 lines")
    assert len(code.strip().splitlines()) <= 24  # it stays a 20-line overview
    for seed in range(5):
        namespace = _run(code, seed)
        assert namespace["idx"].shape == (8 * 256,)


def test_ci_runs_the_readme_install_and_test_lines():
    """.ci/run's phase 1 is the README's install lines (pip's -q added) then its test command."""
    install = README.read_text().split("## Install", 1)[1]
    block = re.search(r"```bash\n(.*?)```", install, re.S).group(1)
    pips = [ln.split("#")[0].strip() for ln in block.splitlines() if ln.startswith("pip install")]
    assert pips, "the README's install block has no pip line"
    ci = (ROOT / ".ci" / "run").read_text()
    phase1 = ci.split("== phase 1", 1)[1].split("== phase 2", 1)[0]
    at = 0
    for line in pips:
        quiet = line.replace("pip install ", "pip install -q ", 1)
        at = phase1.index(quiet, at)  # ValueError: the README line is not in phase 1, in order
    commands = re.search(
        r"```bash\n(.*?)```", README.read_text().split("## The two commands")[1], re.S
    )
    test_line = [ln for ln in commands.group(1).splitlines() if ln.startswith("python -m pytest")]
    assert len(test_line) == 1, commands.group(1)
    assert f"\n{test_line[0]}\n" in phase1[at:]
