"""Docstring sections kept beside a class instead of inside it.

The argument tables of the largest classes sit after the class in the same module, so that the
class body holds code (tests/test_architecture.py bounds class sizes) while ``help()``,
``inspect.getdoc`` and docs/reference.md see one docstring.
"""

from __future__ import annotations

import inspect
import textwrap


def add_args(obj, entries: str) -> None:
    """Append an ``Args:`` section to ``obj``'s docstring (a class or a function).

    Args:
        obj: the class or function whose ``__doc__`` gets the section.
        entries: the section's lines, ``name: description`` with continuation lines indented
            deeper, at any common indentation.
    """
    body = textwrap.indent(textwrap.dedent(entries).strip("\n"), "    ")
    obj.__doc__ = f"{inspect.cleandoc(obj.__doc__ or '')}\n\nArgs:\n{body}\n"
