"""A griffe extension for the docs build: ``#:`` comments and Sphinx roles.

The package documents a constant with a ``#:`` comment above its assignment (Sphinx's
convention, which tests/test_exports.py checks); griffe reads only a string after it, so the
comment becomes the attribute's docstring here.

The docstrings cross-reference in reStructuredText (``:func:`serve```, ``:class:`~x.Store```);
mkdocstrings renders them as Markdown, where a role would show as text. Each role becomes an
*optional* autorefs link: a link where the name has an API entry, plain code where it has none
(a private helper), never a broken reference.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):`(?P<tilde>~?)(?P<name>[^`]+)`")


def _identifier(obj: griffe.Object, name: str) -> str:
    """The full dotted path ``name`` most likely means, seen from ``obj``'s docstring."""
    name = name.lstrip(".")
    if name.startswith("userfaultfd"):
        return name
    head, _, rest = name.partition(".")
    scopes = [obj] + ([obj.parent] if obj.parent is not None else [])
    for scope in scopes:
        try:
            resolved = scope.resolve(head)
        except (griffe.NameResolutionError, AttributeError):
            continue
        return f"{resolved}.{rest}" if rest else resolved
    return f"{obj.module.path}.{name}"


def _link(obj: griffe.Object, match: re.Match[str]) -> str:
    name = match["name"]
    title = name.rpartition(".")[2] if match["tilde"] else name.lstrip(".")
    identifier = _identifier(obj, name)
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def _comment_above(attr: griffe.Attribute) -> str | None:
    """The ``#:`` lines right above ``attr``'s assignment, without their markers."""
    if attr.lineno is None or not isinstance(attr.filepath, Path):
        return None
    if attr.filepath not in attr.lines_collection:
        return None
    lines = attr.lines_collection[attr.filepath]
    if not lines:
        return None
    found: list[str] = []
    index = attr.lineno - 2
    while index >= 0 and lines[index].strip().startswith("#:"):
        found.insert(0, lines[index].strip()[2:].strip())
        index -= 1
    return " ".join(found) or None


class SphinxRoles(griffe.Extension):
    """Gives constants their ``#:`` comment, and rewrites every role of every docstring."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs: Any) -> None:
        if attr.docstring is None and (text := _comment_above(attr)):
            text = _ROLE.sub(lambda m: _link(attr, m), text)
            attr.docstring = griffe.Docstring(text, parent=attr)

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = _ROLE.sub(lambda m: _link(obj, m), obj.docstring.value)
