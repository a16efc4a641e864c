"""MkDocs hooks: pages that quote the README and the code's design notes, so they stay in step.

A page names what it quotes with a marker on a line of its own, and the build puts the text there:

- ``<!-- readme: ### Benchmark: remote stores -->``: the README section under that heading (its
  body, up to the next heading of the same or a higher level; headings inside fenced code are
  not headings). ``<!-- readme: HEADING | FIRST WORDS -->`` starts at the first paragraph that
  begins with FIRST WORDS, and ``<!-- readme: HEADING | FIRST | STOP -->`` ends before the
  paragraph that begins with STOP.
- ``<!-- design-note: userfaultfd/runtime/_handler.py -->``: that module's docstring, its
  reStructuredText turned into Markdown (roles to code, underlined titles to headings).

A marker whose heading, paragraph or module is not found fails the build (an error, which
``mkdocs build --strict`` and tests/test_docs.py report), so a renamed README section cannot
leave an empty page behind. Links the README makes to ``docs/...`` are rewritten relative to the
page.
"""

from __future__ import annotations

import ast
import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

ROOT = Path(__file__).resolve().parent.parent
_MARKER = re.compile(r"^<!-- (readme|design-note): (.+?) -->$", re.M)
_HEADING = re.compile(r"^(#{1,6}) ")
_ROLE = re.compile(r":(?:func|class|meth|attr|data|mod|exc|obj):`~?\.?([^`]+)`")
_UNDERLINE = re.compile(r"^(.+)\n[-=~]{3,}$", re.M)


def _outside_fences(lines: list[str]) -> list[bool]:
    """For each line, whether it is outside a fenced code block."""
    outside, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            outside.append(False)
            continue
        outside.append(not fenced)
    return outside


def readme_section(readme: str, heading: str) -> str:
    """The body of the README section whose heading line is ``heading``."""
    lines = readme.splitlines()
    outside = _outside_fences(lines)
    starts = [i for i, line in enumerate(lines) if outside[i] and line.strip() == heading.strip()]
    if len(starts) != 1:
        raise PluginError(f"README heading {heading!r} found {len(starts)} times, not once")
    level = len(heading.split(" ", 1)[0])
    body = []
    for i in range(starts[0] + 1, len(lines)):
        found = _HEADING.match(lines[i])
        if outside[i] and found and len(found.group(1)) <= level:
            break
        body.append(lines[i])
    return "\n".join(body).strip("\n")


def _paragraph_index(lines: list[str], first_words: str, after: int = 0) -> int:
    for i in range(after, len(lines)):
        starts_paragraph = i == 0 or not lines[i - 1].strip()
        if starts_paragraph and lines[i].lstrip().startswith(first_words):
            return i
    raise PluginError(f"no README paragraph starts with {first_words!r}")


def _readme(spec: str, page_path: str) -> str:
    heading, *bounds = [part.strip() for part in spec.split(" | ")]
    text = readme_section((ROOT / "README.md").read_text(), heading)
    if bounds:
        lines = text.splitlines()
        start = _paragraph_index(lines, bounds[0])
        stop = _paragraph_index(lines, bounds[1], start + 1) if len(bounds) > 1 else len(lines)
        text = "\n".join(lines[start:stop]).strip("\n")
    # README links are relative to the repository root; docs/X is X in the site.
    depth = posixpath.dirname(page_path)
    return re.sub(
        r"\]\(docs/([^)]+)\)", lambda m: f"]({posixpath.relpath(m.group(1), depth or '.')})", text
    )


def design_note(module_path: str) -> str:
    """A module's docstring as Markdown."""
    path = ROOT / module_path
    if not path.is_file():
        raise PluginError(f"design-note: {module_path} does not exist")
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if not doc:
        raise PluginError(f"design-note: {module_path} has no docstring")
    doc = _ROLE.sub(r"`\1`", doc)
    doc = _UNDERLINE.sub(lambda m: f"#### {m.group(1).strip()}", doc)
    return doc


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Replace every marker of the page with the text it names."""

    def replace(match: re.Match[str]) -> str:
        kind, spec = match.group(1), match.group(2)
        if kind == "readme":
            return _readme(spec, page.file.src_uri)
        return design_note(spec.strip())

    return _MARKER.sub(replace, markdown)
