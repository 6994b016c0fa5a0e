"""The spare worker of isolated sessions with keep_warm: taken, replaced, gone with its parent, optional."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram._process import child_sys_path
from mineru_vram._worker.spare import spare_pool
from mineru_vram.testing import make_pdf
from support import alive, wait_for

PDF = make_pdf(1)
PREPARE_TIMEOUT = 300.0


@pytest.fixture(autouse=True)
def _no_spares() -> Iterator[None]:
    spare_pool().discard_all()
    yield
    spare_pool().discard_all()


def _session(models: Path, **kw: object) -> mv.ModelSession:
    return mv.ModelSession(
        "pipeline", device="cpu", models_dir=models, isolation="process", keep_warm=True, trust_env=False, **kw
    )  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_next_isolated_session_takes_the_spare_and_parses_as_a_cold_one(random_models_dir: Path) -> None:
    with _session(random_models_dir) as cold:
        expected = cold.parse(PDF, name="a.pdf")
    assert cold.release_report is not None
    assert cold.release_report.worker["spare"] == {}, "the first session had no spare to take"
    assert spare_pool().wait_ready(PREPARE_TIMEOUT)
    [spare] = spare_pool().spares()
    assert spare.prepared.models > 0
    assert spare.folder.is_dir()
    assert alive(spare.worker.pid)

    with _session(random_models_dir) as warm:
        result = warm.parse(PDF, name="a.pdf")
    report = warm.release_report
    assert report is not None
    assert report.ok, report.problems()
    assert report.worker["spare"]["pid"] == spare.worker.pid
    assert report.worker["pid"] == spare.worker.pid
    assert not alive(spare.worker.pid), "exit still kills the worker"
    assert not spare.folder.exists(), "the session adopted the spare's folder and removed it"
    assert result.markdown == expected.markdown
    assert result.content_list == expected.content_list
    assert spare_pool().wait_ready(PREPARE_TIMEOUT)
    assert len(spare_pool().spares()) == 1, "a new spare for the session after"


@pytest.mark.slow
def test_a_spare_that_dies_is_replaced(random_models_dir: Path) -> None:
    with _session(random_models_dir):
        pass
    assert spare_pool().wait_ready(PREPARE_TIMEOUT)
    [first] = spare_pool().spares()
    os.kill(first.worker.pid, signal.SIGKILL)
    assert wait_for(lambda: any(s.worker.pid != first.worker.pid for s in spare_pool().spares()), PREPARE_TIMEOUT)
    assert "died" in " ".join(spare_pool().events)


def test_spares_can_be_turned_off(random_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINERU_VRAM_WARM_SPARE", "0")
    with _session(random_models_dir):
        pass
    assert spare_pool().wait_ready(5)
    assert spare_pool().spares() == []


PARENT = textwrap.dedent(
    """
    import sys, time
    import mineru_vram as mv
    from mineru_vram._worker.spare import spare_pool
    with mv.ModelSession("pipeline", device="cpu", models_dir=sys.argv[1], isolation="process",
                         keep_warm=True, trust_env=False):
        pass
    assert spare_pool().wait_ready(300)
    print(spare_pool().spares()[0].worker.pid, flush=True)
    time.sleep(300)
    """
)


def test_the_spare_dies_with_its_parent(random_models_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(child_sys_path())}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(random_models_dir)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        assert alive(pid)
        parent.kill()
        parent.wait(30)
        assert wait_for(lambda: not alive(pid), 10), "the spare outlived its parent"
    finally:
        parent.kill()
        parent.wait(30)
        if parent.stdout is not None:
            parent.stdout.close()
