"""The README's code runs as written: its "API in 20 lines" block is executed here."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_api_snippet_runs():
    code = _block("## The API in 20 lines")
    assert len(code.strip().splitlines()) <= 24  # it stays a 20-line overview
    for seed in range(5):  # the assert inside must hold for any data, not one lucky seed
        namespace = {}
        exec(compile(f"import torch; torch.manual_seed({seed})\n" + code, "README", "exec"),
             namespace)  # fmt: skip
        assert namespace["idx"].shape == (8 * 256,)
