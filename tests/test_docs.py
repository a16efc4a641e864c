"""The documentation site builds, documents every public name, and its tutorials run.

``mkdocs build --strict`` fails on a broken link, a missing page, a README section or design
note a page quotes that is gone, or a snippet file that does not exist. Each tutorial is a script
in docs/tutorials/ that checks its own results with asserts; it runs here in a process of its
own (it touches lazily filled memory there, never in the pytest process), with a timeout.
"""

from __future__ import annotations

import html
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_exports import _public_modules

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "docs" / "tutorials"
#: A tutorial that exits with this status could not run here, and says why (no CRIU).
SKIPPED = 77


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    return out


def test_the_site_builds_strictly_with_every_page(site: Path) -> None:
    pages = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    for page in ("index.html", "getting-started/index.html", "api/runtime/index.html",
                 "tutorials/remote-arrays/index.html", "how-it-works/never-zeros/index.html",
                 "benchmarks/remote/index.html", "model/index.html"):  # fmt: skip
        assert page in pages, f"{page} is missing from the built site"


def test_quoted_text_is_filled_in(site: Path) -> None:
    """No page keeps a marker of the hooks, and the quoted text is there."""
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert "<!-- readme:" not in text and "<!-- design-note:" not in text, page
        assert "--8&lt;--" not in text and "--8<--" not in text, f"{page}: a snippet not included"
    never_zeros = (site / "how-it-works/never-zeros/index.html").read_text()
    assert "is closed only once every page of its ranges is" in never_zeros
    tutorial = (site / "tutorials/remote-arrays/index.html").read_text()
    assert "lazy" in tutorial and "values.npy" in html.unescape(re.sub(r"<[^>]+>", "", tutorial))


def _public_names() -> list[str]:
    """Every public name of every public module, as tests/test_exports.py finds them."""
    names = []
    for module in _public_modules():
        names += [f"{module}.{name}" for name in importlib.import_module(module).__all__]
    return names


def test_every_public_name_has_an_api_entry(site: Path) -> None:
    ids: set[str] = set()
    for page in (site / "api").rglob("*.html"):
        ids |= set(re.findall(r'\bid="([^"]+)"', page.read_text()))
    names = _public_names()
    assert len(names) > 100, names
    missing = [name for name in names if name not in ids]
    assert missing == [], f"public names without an entry in the API reference: {missing}"


def test_docstring_roles_become_links(site: Path) -> None:
    """``:func:`serve``` in a docstring is a link to serve's entry, not the role's text."""
    runtime = (site / "api/runtime/index.html").read_text()
    assert ":func:" not in runtime and ":class:" not in runtime
    assert re.search(r'<a [^>]*href="#userfaultfd\.runtime\.serve"', runtime), "no link to serve"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("script", sorted(p.name for p in TUTORIALS.glob("*.py")))
def test_tutorial_runs(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(TUTORIALS / script)], cwd=TUTORIALS, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    if done.returncode == SKIPPED:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "every check passed" in done.stdout or "every word right" in done.stdout, done.stdout


def test_every_tutorial_has_its_page() -> None:
    pages = "".join(p.read_text() for p in TUTORIALS.glob("*.md"))
    for script in TUTORIALS.glob("*.py"):
        assert f"tutorials/{script.name}:" in pages, f"no page includes {script.name}"


#: The Python files of the docs (ruff would also reformat the Markdown's code blocks, which
#: are snippet markers, not code).
PYTHON = ["docs/_hooks.py", "docs/_griffe_roles.py", "docs/tutorials"]


@pytest.mark.parametrize(
    "command",
    [["mypy", "--strict", *PYTHON], ["ruff", "check", *PYTHON],
     ["ruff", "format", "--check", "--exclude", "*.md", *PYTHON]],
    ids=["mypy", "ruff-check", "ruff-format"],
)  # fmt: skip
def test_tutorials_and_hooks_are_clean(command: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
