"""The documentation: its runnable examples run, and the site builds.

A ```python block preceded by ``<!-- test -->`` in README.md or docs/**.md is run here, on the CPU.
The blocks of one page run in order in one namespace (a later block may use what an earlier one
made, as in a notebook), in a temporary folder holding:

* ``paper.pdf``: a generated two-page text PDF;
* ``papers/``: ``a.pdf`` (one page), ``b.pdf`` (two pages) and ``notes.txt`` (not a PDF).

``<!-- test: gpu -->`` marks a block that needs a GPU: it runs only where NVML sees one.
Runnable examples use the ``flash`` backend (MinerU's model-free tier) so they take seconds.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mineru_vram._probe import nvml_device_count
from mineru_vram.testing import make_pdf

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
MARKER = re.compile(r"^<!--\s*test(?::\s*(?P<option>[\w-]+))?\s*-->[ \t]*$", re.M)  # alone on its line
BLOCK = re.compile(
    r"^<!--\s*test(?::\s*(?P<option>[\w-]+))?\s*-->[ \t]*\n```python[ \t]*\n(?P<code>.*?)^```",
    re.S | re.M,
)
OPTIONS = {None, "gpu"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    option: str | None


def blocks_of(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = [
        Block(page, text.count("\n", 0, m.start("code")) + 1, m.group("code"), m.group("option"))
        for m in BLOCK.finditer(text)
    ]
    # A marker that is not directly followed by a python block would silently test nothing.
    markers = len(MARKER.findall(text))
    assert markers == len(found), f"{page}: {markers} <!-- test --> markers but {len(found)} python blocks after them"
    for block in found:
        assert block.option in OPTIONS, f"{page}:{block.line}: unknown test option {block.option!r}"
    return found


RUNNABLE = [page for page in PAGES if blocks_of(page)]


def test_the_docs_have_runnable_examples() -> None:
    total = sum(len(blocks_of(p)) for p in PAGES)
    assert total >= 12, f"only {total} runnable examples: was the <!-- test --> marker renamed?"
    names = {p.relative_to(REPO_ROOT).as_posix() for p in RUNNABLE}
    for page in ("docs/index.md", "docs/guides/notebook.md", "docs/guides/web-app.md", "docs/guides/batch.md"):
        assert page in names


@pytest.fixture
def example_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "paper.pdf").write_bytes(make_pdf(2))
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "a.pdf").write_bytes(make_pdf(1))
    (papers / "b.pdf").write_bytes(make_pdf(2))
    (papers / "notes.txt").write_bytes(b"Meeting notes, not a PDF\n")
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("MINERU_VRAM_"):
            monkeypatch.delenv(key)
    return tmp_path


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_examples_run(page: Path, example_folder: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__docs_example__"}
    has_gpu = nvml_device_count() > 0
    ran = 0
    for block in blocks_of(page):
        if block.option == "gpu" and not has_gpu:
            continue
        code = compile(block.code, f"{page.relative_to(REPO_ROOT)}:{block.line}", "exec")
        exec(code, namespace)
        ran += 1
    if ran == 0:
        pytest.skip(f"every example in {page.name} needs a GPU and NVML sees none")


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install 'mkdocs>=1.6'): the site build is not checked")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO_ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in ("index.html", "guides/notebook/index.html", "configuration/index.html", "timeline/index.html"):
        assert (site / page).is_file(), f"{page} missing from the built site"
    # Every page under docs/ is part of the site (mkdocs warns, and --strict fails, on omitted ones).
    built = {p.relative_to(site).as_posix() for p in site.rglob("index.html")}
    for page in (REPO_ROOT / "docs").rglob("*.md"):
        rel = page.relative_to(REPO_ROOT / "docs").with_suffix("")
        expected = "index.html" if rel.as_posix() == "index" else f"{rel.as_posix()}/index.html"
        assert expected in built, f"docs/{page.relative_to(REPO_ROOT / 'docs')} was not built"
