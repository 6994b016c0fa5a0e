"""The notebook guide as a real notebook, in a real Jupyter kernel (nbclient + ipykernel).

``examples/notebook.ipynb`` is written from docs/guides/notebook.md by ``examples/make_notebook.py``
(its prose as Markdown cells, each Python block a code cell), so the notebook and the guide cannot
drift: the first test checks that the committed file is the one the guide gives. Then the notebook
runs cell by cell in an ipykernel started as Jupyter starts it, in a folder with a ``paper.pdf``,
and the outputs are what a user would see: the HTML tables of the snapshot, the result and the
receipt, the timeline's picture. Then what a notebook user does to a kernel: interrupt a running
parse (the kernel gets SIGINT, as from the stop button) and shut the kernel down, or kill it,
with a worker and an engine running.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from mineru_vram._process import child_sys_path
from mineru_vram.testing import make_pdf
from support import HAS_GPU, all_gone

pytest.importorskip("nbclient", reason="pip install --group test (nbclient, ipykernel, nbformat)")
pytest.importorskip("ipykernel", reason="pip install --group test (nbclient, ipykernel, nbformat)")
import nbformat
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
CELL_TIMEOUT = 600  # seconds: the guide's last cell loads the pipeline models in a worker on 2 CPU cores


def _make_notebook() -> Any:
    spec = importlib.util.spec_from_file_location("make_notebook", EXAMPLES / "make_notebook.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "paper.pdf").write_bytes(make_pdf(2))
    (tmp_path / "long.pdf").write_bytes(make_pdf(120))  # a parse that lasts seconds, to interrupt
    return tmp_path


@pytest.fixture
def kernel_env(random_models_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINERU_VRAM_")}
    env["MINERU_VRAM_MODELS_DIR"] = str(random_models_dir)
    if os.environ.get("MINERU_VRAM_RUNTIME_DIR"):
        env["MINERU_VRAM_RUNTIME_DIR"] = os.environ["MINERU_VRAM_RUNTIME_DIR"]
    if not HAS_GPU:
        env["MINERU_VRAM_DEVICE"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(child_sys_path())  # the kernel imports the package under test
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


class Kernel:
    """An ipykernel started as Jupyter starts it, that runs cells one at a time and keeps them."""

    def __init__(self, client: NotebookClient) -> None:
        self.client = client
        self.nb = client.nb

    async def run(self, source: str) -> Any:
        """Run ``source`` as a new cell; returns the cell with its outputs (errors included)."""
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        return await self.client.async_execute_cell(cell, len(self.nb.cells) - 1)

    async def value(self, source: str) -> Any:
        """The cell's result, read back as JSON from its ``text/plain`` output."""
        cell = await self.run(f"import json as _json\nprint(_json.dumps({source}))")
        _no_error(cell)
        return json.loads(_stream(cell))


@asynccontextmanager
async def kernel(folder: Path, env: dict[str, str], nb: Any = None) -> AsyncIterator[Kernel]:
    client = NotebookClient(
        nb or nbformat.v4.new_notebook(),
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(folder)}},
    )
    async with client.async_setup_kernel(env=env):
        yield Kernel(client)


def _errors(cell: Any) -> list[Any]:
    return [o for o in cell.get("outputs", []) if o["output_type"] == "error"]


def _no_error(cell: Any) -> None:
    errors = _errors(cell)
    assert not errors, f"{cell.source!r} raised {errors[0]['ename']}: {errors[0]['evalue']}\n" + "\n".join(
        errors[0]["traceback"]
    )


def _stream(cell: Any) -> str:
    return "".join(o["text"] for o in cell.get("outputs", []) if o["output_type"] == "stream" and o["name"] == "stdout")


def _mimes(cell: Any) -> dict[str, Any]:
    """Everything the cell displayed or returned, by MIME type."""
    out: dict[str, Any] = {}
    for o in cell.get("outputs", []):
        if o["output_type"] in ("execute_result", "display_data"):
            out.update(o["data"])
    return out


def _tree(pid: int, *, sessions_only: bool = False) -> list[int]:
    """The descendants of ``pid``; ``sessions_only`` leaves out Python's multiprocessing resource tracker.

    MinerU renders pages in a multiprocessing pool, whose first use starts the interpreter's
    resource tracker: one per process, holding no model and no device memory, ending with the
    process. The pool's workers themselves end with the session.
    """
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    out = []
    for proc in procs:
        try:
            if sessions_only and "multiprocessing.resource_tracker" in " ".join(proc.cmdline()):
                continue
        except psutil.Error:
            continue
        out.append(proc.pid)
    return out


# --- the guide, as a notebook ------------------------------------------------------------------------


def test_the_committed_notebook_is_the_guides() -> None:
    make = _make_notebook()
    assert (EXAMPLES / "notebook.ipynb").read_text(encoding="utf-8") == make.render(), (
        "examples/notebook.ipynb is not docs/guides/notebook.md's: run python examples/make_notebook.py"
    )
    nb = make.build()
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6
    assert not any("<!--" in c.source for c in nb.cells), "the guide's test markers are not part of the notebook"


@pytest.mark.slow
def test_every_cell_of_the_guide_runs_in_a_kernel_and_renders(folder: Path, kernel_env: dict[str, str]) -> None:
    nb = _make_notebook().build()

    async def main() -> list[Any]:
        async with kernel(folder, kernel_env, nb) as k:
            for index, cell in enumerate(nb.cells):
                if cell.cell_type == "code":
                    await k.client.async_execute_cell(cell, index)
        return [c for c in nb.cells if c.cell_type == "code"]

    cells = asyncio.run(main())
    for cell in cells:
        _no_error(cell)
        assert cell.execution_count is not None

    def cell_with(text: str) -> Any:
        return next(c for c in cells if text in c.source)

    snapshot = _mimes(cell_with("snap = vram_snapshot()"))
    assert "<caption>VRAM snapshot</caption>" in snapshot["text/html"]
    result = _mimes(cell_with('result = s.parse("paper.pdf", pages="1")'))
    assert "<caption>Parse result</caption>" in result["text/html"]
    assert "This page was written by" in result["text/html"], "the start of the page's text"
    receipt = _mimes(cell_with("s.release_report            #"))
    assert "<caption>Release report</caption>" in receipt["text/html"]
    assert "<td>ok</td>" in receipt["text/html"]
    timeline = cell_with("with Timeline() as tl:")
    assert "image/png" in _mimes(timeline), "the timeline's picture under the cell"
    assert _stream(timeline).startswith("Timeline(")
    worker = _mimes(cell_with('isolation="process"'))
    assert "'pid':" in worker["text/plain"]


# --- what a notebook user does to a kernel -----------------------------------------------------------


async def _interrupt_a_parse(k: Kernel, isolation: str) -> dict[str, Any]:
    opened = await k.run(
        f"from mineru_vram import ModelSession\ns = ModelSession('flash', isolation={isolation!r}).open()"
    )
    _no_error(opened)
    started = Path(k.client.resources["metadata"]["path"]) / "started"
    parsing = asyncio.create_task(k.run("import pathlib\npathlib.Path('started').touch()\ns.parse('long.pdf')"))
    for _ in range(1200):
        if started.exists() or parsing.done():
            break
        await asyncio.sleep(0.05)
    assert started.exists(), "the parse cell did not start"
    await asyncio.sleep(1.0)  # well inside a parse of 120 pages
    await k.client.km.interrupt_kernel()  # SIGINT to the kernel, as Jupyter's stop button sends it
    cell = await asyncio.wait_for(parsing, CELL_TIMEOUT)
    errors = _errors(cell)
    assert [e["ename"] for e in errors] == ["KeyboardInterrupt"], cell.outputs
    assert any("parse" in line for line in errors[0]["traceback"]), "interrupted inside the parse"
    # The session is usable after: the next cell parses, and closing gives a clean receipt.
    after = await k.value("[s.parse('paper.pdf').page_count, s.state.value]")
    report = await k.value("[s.close().ok, s.state.value]")
    return {"after": after, "report": report}


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_interrupting_a_parse_leaves_the_session_usable(
    folder: Path, kernel_env: dict[str, str], isolation: str
) -> None:
    async def main() -> tuple[dict[str, Any], list[int], list[int]]:
        async with kernel(folder, kernel_env) as k:
            kernel_pid = await k.value("__import__('os').getpid()")
            before = _tree(kernel_pid)
            seen = await _interrupt_a_parse(k, isolation)
            return seen, before, _tree(kernel_pid, sessions_only=True)

    seen, before, after = asyncio.run(main())
    assert seen == {"after": [2, "opened"], "report": [True, "closed"]}
    assert set(after) <= set(before), "no process of the session is left in the kernel"


@pytest.mark.parametrize("how", ["shutdown", "kill"])
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_a_kernel_that_ends_leaves_no_worker_or_engine_behind(
    folder: Path, kernel_env: dict[str, str], how: str
) -> None:
    (folder / "standin-model").mkdir()
    setup = (
        "from mineru_vram import ModelSession, ResidentEngine\n"
        "from mineru_vram.testing import StandinLauncher\n"
        "s = ModelSession('flash', isolation='process').open()\n"
        "s.parse('paper.pdf')\n"
        "engine = ResidentEngine('sglang', model_path='standin-model', launcher=StandinLauncher()).start()\n"
        "engine.state.value"
    )

    async def main() -> list[int]:
        async with kernel(folder, kernel_env) as k:
            kernel_pid = await k.value("__import__('os').getpid()")
            _no_error(await k.run(setup))
            pids = _tree(kernel_pid)
            assert len(pids) >= 3, "the session's worker, the engine's keeper and its server"
            # "Shut down kernel" asks the kernel to exit; a kernel that is killed gets SIGKILL.
            await k.client.km.shutdown_kernel(now=how == "kill")
            return [kernel_pid, *pids]

    pids = asyncio.run(main())
    assert all_gone(pids, timeout=15), f"left behind: {[p for p in pids if psutil.pid_exists(p)]}"


@pytest.fixture(autouse=True)
def _no_kernel_left() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert all_gone([p.pid for p in left], timeout=15), f"the test left {left}"
