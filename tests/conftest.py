"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Under pytest-xdist each worker gets its share of the cores for torch's and OpenMP's threads
# (MinerU reads OMP_NUM_THREADS; the workers, scripts and servers the tests start inherit it).
# Two workers with a full set of threads each oversubscribe a small machine: measured on two
# cores, the slow step took 14 minutes that way. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``first`` go first (the order is kept otherwise).

    pytest-xdist hands tests out in this order: the longest test of a step starting first lets
    the two workers end together, instead of one waiting alone for it at the end.
    """
    items.sort(key=lambda item: item.get_closest_marker("first") is None)


CORPUS_DIR = REPO_ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session", autouse=True)
def _private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Budgets' reservation ledger in a folder of the test run, never the machine's real one.

    Set in the environment, so the workers and servers the tests start share it.
    """
    if os.environ.get("MINERU_VRAM_RUNTIME_DIR"):
        yield
        return
    os.environ["MINERU_VRAM_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
    try:
        yield
    finally:
        os.environ.pop("MINERU_VRAM_RUNTIME_DIR", None)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The real-PDF corpus beside the checkout (../shared/corpus); skip where absent."""
    if not (CORPUS_DIR / "test.pdf").is_file():
        pytest.skip(f"corpus folder {CORPUS_DIR} is absent (it ships beside the project's checkout, not in it)")
    return CORPUS_DIR


@pytest.fixture(scope="session")
def random_models_dir(mineru_vram_models: Path) -> Path:
    """A MinerU-4 model tree with the true architectures and random weights (seed 0).

    The pytest plugin's ``mineru_vram_models``, under the suite's own name: one cache
    for the suite, the plugin and ``mineru-vram demo``
    (``$XDG_CACHE_HOME/mineru-vram/random-models``, or ``--vram-models-dir DIR``),
    built once and reused by later runs and by parallel workers.
    Use it as MinerU's ``model.base_dir`` with ``source: local``, ``small_backend: torch``.
    """
    return mineru_vram_models


def _encrypt_pdf(data: bytes, user_password: str = "pw") -> bytes:
    pypdf = pytest.importorskip("pypdf")
    import io

    reader = pypdf.PdfReader(io.BytesIO(data))
    writer = pypdf.PdfWriter()
    for page in reader.pages:
        writer.add_page(page)
    writer.encrypt(user_password=user_password, owner_password="owner")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


@pytest.fixture
def encrypt_pdf() -> Callable[..., bytes]:
    """A function that returns the given PDF bytes encrypted with a user password (pypdf)."""
    return _encrypt_pdf
