"""Write docs/reference.md, the argument reference, from the public objects' docstrings.

    python scripts/gen_reference.py           # rewrite docs/reference.md
    python scripts/gen_reference.py --check   # exit 1 if the committed file is stale
    python scripts/gen_reference.py --missing # list the arguments without a description

The page is generated so it cannot drift from the code: tests/test_reference_doc.py fails when
the committed file differs from what this script writes. Each object gets its signature, its
docstring's prose, and one line per argument: the name, the default from the signature (or
the dataclass field) and the description from the docstring's ``Args:`` section.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference.md"

# (module, names): the public surface a user imports, in the order a reader meets it.
# A module's __all__ where it is the public list; the configs hold the layers' options.
SECTIONS = (
    ("The op", "fastvq", ["vector_quantize", "search", "scatter_rows", "code_counts",
                          "triton_available", "VQOutput", "soft_assign", "SoftAssignment"]),
    ("Layers", "fastvq", ["VectorQuantizer", "QuantizeOutput", "CodebookStats", "ResidualVQ",
                          "GroupedResidualVQ", "FSQ", "ResidualFSQ", "GroupedResidualFSQ",
                          "LFQ", "ResidualLFQ", "GroupedResidualLFQ", "IBQ"]),
    ("Layer options", "fastvq.layer_config", ["VQConfig"]),
    ("Layer options", "fastvq.fsq", ["FSQConfig"]),
    ("Layer options", "fastvq.lfq", ["LFQConfig"]),
    ("Layer options", "fastvq.ibq", ["IBQConfig"]),
    ("Sharded codebook", "fastvq.sharded", ["ShardedVectorQuantizer", "ddp_ignore_shards"]),
    ("Usage, sampling and auxiliary losses", "fastvq", [
        "UsageMeter", "codebook_usage", "sample_codes", "topk_codes", "ce_commitment_loss",
        "diversity_loss", "orthogonal_loss"]),
    ("Models", "fastvq.models", ["AE", "AEConfig", "VAE", "VAEConfig", "VQVAE", "VQVAEConfig",
                                 "PixelCNN", "PixelCNNConfig"]),
    ("Front ends: vector-quantize-pytorch", "fastvq.compat.vqp", None),
    ("Front ends: taming-transformers", "fastvq.compat.taming", ["VectorQuantizer2",
                                                                 "swap_quantizer"]),
    ("Front ends: diffusers", "fastvq.compat.diffusers", ["VectorQuantizer", "swap_quantizer"]),
    ("Front ends: pretrained codebooks", "fastvq.compat", ["from_pretrained_codebook"]),
)  # fmt: skip

# "object: argument (file)" for every argument ``render`` found no description for (``--missing``).
MISSING: list[str] = []

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Example|Examples):\s*$")
_ARG = re.compile(r"^(\*{0,2}\w+)(?:\s*\([^)]*\))?:\s*(.*)$")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
# ForwardRef's repr differs between Python versions: keep only the referenced name.
_FORWARD_REF = re.compile(r"ForwardRef\(('[^']*')[^)]*\)")


def _split_doc(doc: str) -> tuple[list[str], dict[str, str], list[tuple[str, list[str]]]]:
    """Prose lines, ``{arg: description}`` from ``Args:``, and the other sections' lines."""
    prose: list[str] = []
    args: dict[str, str] = {}
    others: list[tuple[str, list[str]]] = []
    section, current = None, None
    for line in doc.splitlines():
        m = _SECTION.match(line)
        if m:
            section, current = m.group(1), None
            if section not in ("Args", "Arguments", "Parameters"):
                others.append((section, []))
            continue
        if section is None:
            prose.append(line)
        elif section in ("Args", "Arguments", "Parameters"):
            if line and not line.startswith(" "):  # dedent: the section ended
                section = None
                prose.append(line)
                continue
            body = line.strip()
            arg = _ARG.match(body) if line.startswith("    ") and line[4:5] != " " else None
            if arg:
                current = arg.group(1).lstrip("*")
                # A second entry for one name (a note on its default) adds to the first.
                args[current] = (
                    (args[current] + " " + arg.group(2)).strip()
                    if current in args
                    else arg.group(2)
                )
            elif current is not None and body:
                args[current] += " " + body
        else:
            others[-1][1].append(line[4:] if line.startswith("    ") else line)
    return prose, args, others


_FIELD = re.compile(r"^\s+(\w+)\s*:[^#=]*(?:=[^#]*)?#\s*(.*)$")


def _field_comments(cls) -> dict[str, str]:
    """A dataclass's or NamedTuple's ``name: type = default  # comment`` lines: the comment
    is the field's description where the docstring has no ``Args:`` entry."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        m = _FIELD.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _default(value) -> str:
    if value is inspect.Parameter.empty or value is dataclasses.MISSING:
        return ""
    return _ADDRESS.sub("", repr(value))


def _parameters(obj) -> list[tuple[str, str]]:
    """``(name, default)`` per argument: a dataclass's fields, else the call signature's."""
    if dataclasses.is_dataclass(obj) and isinstance(obj, type):
        out = []
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            out.append((f.name, _default(default)))
        return out
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    out = []
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        out.append((prefix + p.name, _default(p.default)))
    return out


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    return name + _FORWARD_REF.sub(r"\1", _ADDRESS.sub("", sig))


def _paragraphs(lines: list[str]) -> list[str]:
    # Docstring indentation would read as a markdown code block: keep the text, drop the indent,
    # except in literal blocks (after a line ending in "::"), which stay code.
    out, literal = [], False
    for line in lines:
        if literal and line and not line.startswith(" "):
            out.append("```")
            literal = False
        if literal:
            out.append(line[4:] if line.startswith("    ") else line)
            continue
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1])
            out.append("")
            out.append("```")
            literal = True
            continue
        out.append(line.strip())
    if literal:
        while out and out[-1] == "":
            out.pop()
        out.append("```")
    return out


def _source(obj) -> str:
    """The file that defines ``obj`` (decorators unwrapped), relative to the checkout."""
    try:
        path = Path(inspect.getsourcefile(inspect.unwrap(obj)) or "?")
    except TypeError:
        return "?"
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _entry(title: str, obj, level: str = "###") -> list[str]:
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj) and doc.startswith(obj.__name__ + "("):
        doc = ""  # the dataclass's generated docstring: the signature again
    prose, args, others = _split_doc(doc)
    lines = [f"{level} `{title}`", "", "```text", _signature(title.rsplit(".", 1)[-1], obj),
             "```", ""]  # fmt: skip
    text = _paragraphs(prose)
    while text and text[-1] == "":
        text.pop()
    lines += text + [""] if text else []
    params = [p for p in _parameters(obj) if p[0] not in ("*args", "**kwargs")]
    if inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or hasattr(obj, "_fields")):
        args = {**_field_comments(obj), **args}
    if params:
        lines.append("Arguments:")
        lines.append("")
        for name, default in params:
            desc = args.get(name.lstrip("*"), "").strip()
            shown = f"`{name}={default}`" if default else f"`{name}`"
            lines.append(f"- {shown}: {desc}" if desc else f"- {shown}")
            if not desc:
                MISSING.append(f"{title}: {name} ({_source(obj)})")
        lines.append("")
    for section, body in others:
        while body and not body[-1].strip():
            body.pop()
        if not body:
            continue
        if section.startswith("Example"):
            lines += [f"{section}:", "", "```python", *body, "```", ""]
        else:
            lines += [f"{section}:", "", *_paragraphs(body), ""]
    return lines


def _methods(cls) -> list[tuple[str, object]]:
    """Public methods and properties the class defines itself (not nn.Module's)."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in ("extra_repr",):
            continue
        if isinstance(value, property) or inspect.isfunction(value):
            out.append((name, value))
    return out


def render() -> str:
    """The whole page, as this script writes it (deterministic: no addresses, no dates)."""
    lines = [
        "# Reference: every public argument",
        "",
        "<!-- Generated by `python scripts/gen_reference.py` from the docstrings; do not edit.",
        "     tests/test_reference_doc.py fails when this file is stale. -->",
        "",
        "How to use these: [guide.md](guide.md). Migration from other libraries:",
        "[migration.md](migration.md). Each object below shows its signature, its docstring and",
        "one line per argument (default from the signature, description from the docstring).",
        "",
    ]
    current = None
    for section, module_name, names in SECTIONS:
        module = importlib.import_module(module_name)
        if names is None:
            names = list(module.__all__)
        if section != current:
            lines += [f"## {section}", ""]
            current = section
        for name in names:
            obj = getattr(module, name)
            lines += _entry(f"{module_name}.{name}", obj)
            if inspect.isclass(obj) and not dataclasses.is_dataclass(obj):
                for mname, method in _methods(obj):
                    if isinstance(method, property):
                        doc = (inspect.getdoc(method) or "").split("\n\n")[0].replace("\n", " ")
                        lines += [f"- property `{mname}`: {doc}".rstrip(": "), ""]
                    elif (inspect.getdoc(method) or "").strip():
                        lines += _entry(f"{name}.{mname}", method, level="####")
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is stale")
    ap.add_argument("--missing", action="store_true",
                    help="list arguments without a description; exit 1 if any")  # fmt: skip
    opts = ap.parse_args(argv)
    MISSING.clear()
    text = render()
    if opts.missing:
        print("\n".join(MISSING))
        print(f"{len(MISSING)} arguments without a description", file=sys.stderr)
        return 1 if MISSING else 0
    if opts.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run python scripts/gen_reference.py")
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's fastvq, not another installed copy
    sys.exit(main())
