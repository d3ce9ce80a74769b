"""docs/reference.md is generated from the docstrings (scripts/gen_reference.py): it must match
what the script writes now, so the argument reference cannot drift from the code."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_reference", ROOT / "scripts" / "gen_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_is_current():
    gen = _generator()
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == gen.render(), (
        "docs/reference.md is stale: run `python scripts/gen_reference.py` and commit it"
    )


def test_reference_lists_every_layer_option():
    """Every VectorQuantizer option (a VQConfig field) has its own line with its description."""
    import dataclasses

    from fastvq.layer_config import VQConfig

    text = (ROOT / "docs" / "reference.md").read_text()
    section = text.split("### `fastvq.layer_config.VQConfig`", 1)[1].split("\n### ", 1)[0]
    for field in dataclasses.fields(VQConfig):
        lines = [ln for ln in section.splitlines() if ln.startswith(f"- `{field.name}")]
        assert lines, f"no line for VQConfig.{field.name}"
        assert "`: " in lines[0], f"VQConfig.{field.name} has no description in its docstring"


def test_reference_covers_every_public_name():
    """A name added to ``fastvq.__all__`` gets a section, so the reference cannot fall behind."""
    import fastvq

    text = (ROOT / "docs" / "reference.md").read_text()
    missing = [n for n in fastvq.__all__ if f"### `fastvq.{n}`" not in text]
    assert not missing, f"add {missing} to SECTIONS in scripts/gen_reference.py"


def test_check_mode_reports_stale(tmp_path, monkeypatch):
    gen = _generator()
    monkeypatch.setattr(gen, "OUT", tmp_path / "reference.md")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    (tmp_path / "reference.md").write_text("old\n")
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0


def test_every_public_argument_is_described():
    """Each argument of every object and method on the page has a description in its docstring
    (``python scripts/gen_reference.py --missing`` lists the ones that do not)."""
    gen = _generator()
    gen.MISSING.clear()
    gen.render()
    assert not gen.MISSING, "arguments without a description:\n" + "\n".join(gen.MISSING)
