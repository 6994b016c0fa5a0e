"""The documentation: every Python example runs as a script file, and the site builds.

Each ```python block in README.md and docs/**.md is an example, run as a user runs it: saved as a
file and started with ``python example.py`` (not ``exec`` inside pytest, which would hide what a
script does differently: ``__main__``, spawned children re-importing it, interpreter exit). The
examples run on the CPU (or the first GPU where NVML sees one), in a temporary folder holding:

* ``paper.pdf``: a generated two-page text PDF;
* ``papers/``: ``a.pdf`` (one page), ``b.pdf`` (two pages) and ``notes.txt`` (not a PDF);

with ``MINERU_VRAM_MODELS_DIR`` pointing at a random-weight MinerU model tree, so
``ModelSession(backend="pipeline")`` loads real architectures offline.

A comment on the line before a block changes how it runs:

* ``<!-- test: continues -->``: the block continues the page's previous example (one script, as
  the cells of a notebook);
* ``<!-- test: gpu -->``: runs only where NVML sees a GPU;
* ``<!-- test: pytest -->``: the block is a test module; it runs under ``python -m pytest``;
  ``<!-- test: pytest fails=NAME,... -->`` when the page shows those tests failing on purpose;
* ``<!-- no-test: REASON -->``: not run, and the reason says why (a fragment, a server that cannot
  be installed here);
* ``<!-- file: examples/NAME.py -->``: the block is that file of the repository, verbatim (checked
  here); the file runs where its own test says (a web app runs under uvicorn in
  tests/integration/test_web_app.py), so the page and the file cannot drift.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mineru_vram._process import child_sys_path
from mineru_vram.testing import make_pdf
from support import HAS_GPU

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(?P<code>.*?)^```", re.S | re.M)
MARKER = re.compile(r"^<!--\s*(?P<kind>test|no-test|file)(?::\s*(?P<option>[^>]*?))?\s*-->[ \t]*$")
OPTIONS = {"continues", "gpu", "pytest"}
FAILS = re.compile(r"^pytest\s+fails=(?P<names>[\w,]+)$")
SCRIPT_TIMEOUT = 600  # seconds: a pipeline example loads MinerU's models on 2 CPU cores


@dataclass
class Example:
    page: Path
    line: int
    code: str
    gpu: bool = False
    pytest: bool = False
    fails: tuple[str, ...] = ()  # tests the page shows failing on purpose
    skip: str | None = None  # the no-test reason
    file: str | None = None  # the repository file the block shows verbatim
    parts: list[int] = field(default_factory=list)  # lines of the blocks it was built from

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT).as_posix()}:{self.line}"


def examples_of(page: Path) -> list[Example]:
    text = page.read_text(encoding="utf-8")
    out: list[Example] = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.match(before)
        kind = option = None
        if marker:
            kind, option = marker.group("kind"), (marker.group("option") or "").strip() or None
        if kind == "no-test":
            assert option, f"{page}:{line}: <!-- no-test --> needs a reason"
            out.append(Example(page, line, match.group("code"), skip=option, parts=[line]))
            continue
        if kind == "file":
            assert option, f"{page}:{line}: <!-- file --> needs the file's path"
            reason = f"{option}, shown verbatim; it runs under its own test"
            out.append(Example(page, line, match.group("code"), skip=reason, file=option, parts=[line]))
            continue
        fails: tuple[str, ...] = ()
        if option and FAILS.match(option):
            fails = tuple(FAILS.match(option).group("names").split(","))  # type: ignore[union-attr]
            option = "pytest"
        assert kind is None or option in OPTIONS, f"{page}:{line}: unknown test option {option!r}"
        if option == "continues":
            assert out, f"{page}:{line}: 'continues' needs an example before it"
            assert out[-1].skip is None, f"{page}:{line}: 'continues' follows an example that is not run"
            out[-1].code += "\n" + match.group("code")
            out[-1].parts.append(line)
            continue
        out.append(
            Example(
                page,
                line,
                match.group("code"),
                gpu=option == "gpu",
                pytest=option == "pytest",
                fails=fails,
                parts=[line],
            )
        )
    return out


EXAMPLES = [example for page in PAGES for example in examples_of(page)]


def test_the_docs_have_runnable_examples() -> None:
    runnable = [e for e in EXAMPLES if e.skip is None]
    assert len(runnable) >= 12, f"only {len(runnable)} runnable examples"
    pages = {e.page.relative_to(REPO_ROOT).as_posix() for e in runnable}
    for page in ("README.md", "docs/index.md", "docs/guides/notebook.md", "docs/guides/batch.md"):
        assert page in pages
    readme = [e for e in EXAMPLES if e.page.name == "README.md"]
    assert readme
    assert all(e.skip is None for e in readme), "every README example runs"


SHOWN = [e for e in EXAMPLES if e.file is not None]


@pytest.mark.parametrize("example", SHOWN, ids=lambda e: f"{e.id}={e.file}")
def test_a_block_that_shows_a_file_is_that_file(example: Example) -> None:
    assert example.file is not None
    path = REPO_ROOT / example.file
    assert path.is_file(), f"{example.id}: {example.file} does not exist"
    assert example.code == path.read_text(encoding="utf-8"), (
        f"{example.id} differs from {example.file}: copy the file into the page (or the page into the file)"
    )


def test_every_web_app_example_is_shown_in_the_guide() -> None:
    shown = {e.file for e in SHOWN if e.page.name == "web-app.md"}
    on_disk = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "examples").glob("web_app*.py")}
    assert on_disk, "examples/web_app*.py are missing"
    assert shown == on_disk


@pytest.fixture(scope="module")
def example_env(random_models_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERU_VRAM_")}
    env["MINERU_VRAM_MODELS_DIR"] = str(random_models_dir)
    env["MINERU_VRAM_RUNTIME_DIR"] = os.environ.get("MINERU_VRAM_RUNTIME_DIR", "")
    if not HAS_GPU:
        env["MINERU_VRAM_DEVICE"] = "cpu"
    # The examples import the package under test the way an installed one is found.
    env["PYTHONPATH"] = os.pathsep.join(child_sys_path())
    env["PYTHONUNBUFFERED"] = "1"
    return {k: v for k, v in env.items() if v != ""}


def _folder(tmp_path: Path) -> Path:
    (tmp_path / "paper.pdf").write_bytes(make_pdf(2))
    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "a.pdf").write_bytes(make_pdf(1))
    (papers / "b.pdf").write_bytes(make_pdf(2))
    (papers / "notes.txt").write_bytes(b"Meeting notes, not a PDF\n")
    return tmp_path


@pytest.mark.slow
@pytest.mark.timeout(SCRIPT_TIMEOUT + 60)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_example_runs_as_a_script(example: Example, tmp_path: Path, example_env: dict[str, str]) -> None:
    if example.skip is not None:
        pytest.skip(f"not runnable here: {example.skip}")
    if example.gpu and not HAS_GPU:
        pytest.skip("needs a GPU and NVML sees none")
    folder = _folder(tmp_path)
    if example.pytest:
        script = folder / "test_example.py"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
    else:
        script = folder / "example.py"
        command = [sys.executable, str(script)]
    script.write_text(example.code, encoding="utf-8")
    run = subprocess.run(
        command,
        cwd=folder,
        env=example_env,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        check=False,
    )
    output = f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    if example.fails:
        # The page shows these tests failing: they must fail, and nothing else may.
        assert run.returncode == 1, f"{example.id}: expected failing tests {example.fails}:\n{output}"
        summary = [ln for ln in run.stdout.splitlines() if ln.startswith(("FAILED ", "ERROR "))]
        failed = {ln.split("::", 1)[1].split(" ", 1)[0] for ln in summary if "::" in ln}
        assert failed == set(example.fails), f"{example.id}: failed {sorted(failed)}:\n{output}"
        return
    assert run.returncode == 0, f"{example.id} (blocks at lines {example.parts}) failed as a script:\n{output}"


@pytest.mark.timeout(SCRIPT_TIMEOUT)
def test_readme_example_without_models_or_network_fails_fast_and_typed(tmp_path: Path) -> None:
    """The first thing a user types, on a machine with no models and no route to the model hub."""
    example = next(e for e in EXAMPLES if e.page.name == "README.md")
    folder = _folder(tmp_path)
    (folder / "example.py").write_text(example.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINERU_VRAM_", "MINERU_"))}
    env.update(
        HOME=str(tmp_path / "home"),  # no ~/.mineru: MinerU's default model folder is empty
        HTTPS_PROXY="http://127.0.0.1:9",  # the discard port: nothing listens, so no hub answers
        MINERU_VRAM_DEVICE="cpu",
        PYTHONPATH=os.pathsep.join(child_sys_path()),
    )
    run = subprocess.run(
        [sys.executable, "example.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("mineru_vram._exceptions.ModelsNotAvailableError:"), run.stderr[-3000:]
    for hint in ("models_dir=", "mineru-vram models download", "about 0.9 GB"):
        assert hint in last
    assert "Traceback" in run.stderr
    assert run.stderr.count("\n") < 60, "one short traceback, not MinerU's retries"


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


def test_the_readme_first_screen_is_honest_about_install_and_models() -> None:
    from mineru_vram._adapter import tier_model_status

    head = "\n".join((REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:30])
    assert "not on PyPI yet" in head, "the package is not published: the first screen says so"
    assert "git+" in head
    assert "pip install -e ." in head
    assert "pip install mineru-vram\n" not in head
    assert "~/.mineru/models" in head
    assert "mineru-vram models download" in head
    stated = re.search(r"about ([\d.]+) GB, into", head)
    assert stated, "the download's size is stated"
    [repo] = tier_model_status("basic", models_dir=None, small_backend="torch")
    assert float(stated.group(1)) == pytest.approx(repo["download_gb"], abs=0.05), "README's size is the code's"


def test_dev_without_a_command_says_what_it_does() -> None:
    run = subprocess.run(["bash", str(REPO_ROOT / "dev"), "help"], capture_output=True, text=True, check=False)
    assert run.returncode == 2
    for word in ("./dev demo", "./dev test", "./dev lint", "./dev ci", "MINERU_VRAM_TORCH=cpu"):
        assert word in run.stdout
