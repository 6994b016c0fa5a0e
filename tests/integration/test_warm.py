"""Warm re-entry in process: models parked in host memory between sessions, restored, and equal to cold ones."""

from __future__ import annotations

from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram.testing import make_pdf

PDF = make_pdf(1)


@pytest.fixture(autouse=True)
def _empty_warm_cache() -> object:
    mv.warm_cache().clear()
    yield
    mv.warm_cache().clear()


def _session(models: Path, **kw: object) -> mv.ModelSession:
    return mv.ModelSession("pipeline", device="cpu", models_dir=models, trust_env=False, **kw)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_parked_session_is_restored_and_parses_as_a_cold_one(random_models_dir: Path) -> None:
    with _session(random_models_dir) as cold:
        expected = cold.parse(PDF, name="a.pdf")
    assert cold.release_report is not None
    assert cold.release_report.parked == {}, "no keep_warm: nothing parked"
    assert len(mv.warm_cache()) == 0

    with _session(random_models_dir, keep_warm=True) as first:
        first_result = first.parse(PDF, name="a.pdf")
    report = first.release_report
    assert report is not None
    assert report.ok, report.problems()
    assert report.parked["models"], report.parked
    assert report.parked["where"] == "host memory"  # CPU: already there, nothing to pin
    assert report.models_released == 0, "everything went to the warm cache"
    assert "parked in host memory" in str(report)
    entry = mv.warm_cache().entries()[0]
    assert entry.key.device == "cpu"
    assert entry.key.models_dir == str(random_models_dir.resolve())
    assert entry.mib > 50

    with _session(random_models_dir, keep_warm=True) as again:
        assert again.runner is not None
        assert again.runner.restored["models"] == len(report.parked["models"])  # type: ignore[attr-defined]
        assert len(mv.warm_cache()) == 0, "taken out while the session holds them"
        restored = again.parse(PDF, name="a.pdf")
    assert again.release_report is not None
    assert again.release_report.restored["models"] > 0
    for result in (first_result, restored):
        assert result.markdown == expected.markdown
        assert result.content_list == expected.content_list

    # A session without keep_warm takes the parked models too, and releases them at its end.
    with _session(random_models_dir) as last:
        assert last.runner.restored  # type: ignore[union-attr]
    assert last.release_report is not None
    assert last.release_report.models_released > 0
    assert len(mv.warm_cache()) == 0


def test_models_larger_than_the_host_budget_are_released_not_parked(random_models_dir: Path) -> None:
    mv.warm_cache().set_budget(1)  # MiB
    try:
        with _session(random_models_dir, keep_warm=True) as s:
            pass
    finally:
        mv.warm_cache().set_budget(None)
    report = s.release_report
    assert report is not None
    assert "exceed the host cache" in report.parked["reason"]
    assert report.models_released > 0
    assert report.models_alive == []
    assert report.ok
    assert len(mv.warm_cache()) == 0


def test_clearing_the_cache_makes_the_next_session_load_from_disk(random_models_dir: Path) -> None:
    with _session(random_models_dir, keep_warm=True):
        pass
    assert len(mv.warm_cache()) == 1
    assert mv.warm_cache().clear() > 0
    with _session(random_models_dir) as s:
        assert s.runner is not None
        assert s.runner.restored == {}  # type: ignore[attr-defined]
