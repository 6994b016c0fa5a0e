"""ModelSession through real MinerU code on CPU, with random-weight models."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram import _adapter
from mineru_vram._probe import nvml_device_count
from mineru_vram.testing import make_pdf

# Our own suite runs under the VRAM-leak plugin (issue #7): every session test must leave no live
# tensor behind (on CPU the plugin counts live torch tensors; on a GPU also torch/NVML figures).
pytestmark = [pytest.mark.filterwarnings("ignore::ResourceWarning"), pytest.mark.vram_leak_check]


@pytest.fixture
def session(random_models_dir: Path) -> mv.ModelSession:
    return mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir)


def _model_caches() -> dict[str, dict[object, object]]:
    from mineru.model.runtime.hybrid import AtomModelSingleton, HybridLocalModelContextSingleton

    return {"atom": AtomModelSingleton._models, "context": HybridLocalModelContextSingleton._models}


def test_parse_generated_pdf_and_release(session: mv.ModelSession) -> None:
    with session as s:
        assert s.state is mv.SessionState.OPENED
        loaded = _adapter.cache_summary()
        assert loaded["context"], "entering must load MinerU's models"
        result = s.parse(make_pdf(2), name="generated.pdf")
    assert result.document == "generated.pdf"
    assert result.page_count == 2
    assert result.backend == "pipeline"
    assert result.device == "cpu"
    assert isinstance(result.markdown, str)
    assert result.markdown
    assert result.middle_json["pages"]
    assert result.content_list["pages"]
    assert result.seconds > 0
    report = s.release_report
    assert report is not None
    assert report.models_released >= 2  # OCR + layout at least
    assert report.models_alive == []
    assert report.ok
    assert _adapter.cache_summary() == {"atom": [], "context": []}
    assert s.state is mv.SessionState.CLOSED


def test_parse_corpus_test_pdf(session: mv.ModelSession, corpus_dir: Path, tmp_path: Path) -> None:
    with session as s:
        result = s.parse(corpus_dir / "test.pdf")
    assert result.page_count == 1
    assert result.document.endswith("test.pdf")
    out = result.save(tmp_path / "out")
    assert (out / "test.md").read_text(encoding="utf-8") == result.markdown
    assert (out / "test_content_list.json").is_file()
    assert (out / "test_middle.json").is_file()
    for name in result.images:
        assert (out / name).is_file()
    assert s.release_report is not None
    assert s.release_report.models_alive == []


def test_nothing_is_written_to_disk_unless_asked(session: mv.ModelSession, tmp_path: Path) -> None:
    before = set(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with session as s:
            s.parse(make_pdf(1))
    finally:
        os.chdir(cwd)
    assert set(os.listdir(tmp_path)) == before


def test_environment_and_mineru_config_are_restored(session: mv.ModelSession) -> None:
    keys = ("MINERU_HOME", "MINERU_CONFIG", "MINERU_DEVICE_MODE", "MINERU_MODEL_BASE_DIR", "MINERU_MODEL_SOURCE")
    before_env = {k: os.environ.get(k) for k in keys}
    import mineru.config as mconf

    before_cfg = mconf.config.model.model_dump()
    with session as s:
        home = os.environ["MINERU_HOME"]
        assert Path(home).is_dir()
        assert os.environ["MINERU_DEVICE_MODE"] == "cpu"
        assert mconf.config.model.source == "local"
        assert not home.startswith(str(Path.home() / ".mineru"))
        s.parse(make_pdf(1))
    assert {k: os.environ.get(k) for k in keys} == before_env
    assert mconf.config.model.model_dump() == before_cfg
    assert not Path(home).exists(), "the session's MinerU home is removed on exit"


def test_mineru_log_level_is_not_left_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOGURU_LEVEL", raising=False)
    with mv.ModelSession("flash", device="cpu", trust_env=False) as s:
        s.parse(make_pdf(1))
        assert "LOGURU_LEVEL" in os.environ, "MinerU sets it while it parses"
    assert "LOGURU_LEVEL" not in os.environ


_HOLDS_A_HOME = """
import os, sys, time
import mineru_vram as mv
s = mv.ModelSession("flash", device="cpu", trust_env=False).open()
print(os.environ["MINERU_HOME"], flush=True)
time.sleep(120)
"""


def test_a_killed_processs_mineru_home_is_swept_by_the_next_session() -> None:
    holder = subprocess.Popen([sys.executable, "-c", _HOLDS_A_HOME], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        home = Path(holder.stdout.readline().strip())
        assert home.name.startswith("mineru-vram-home-"), home
        assert home.is_dir()
        with mv.ModelSession("flash", device="cpu", trust_env=False):
            pass
        assert home.is_dir(), "a live owner's home is left alone"
        holder.kill()
        holder.wait(30)
        assert home.is_dir(), "SIGKILL leaves it behind"
        with mv.ModelSession("flash", device="cpu", trust_env=False):
            pass
        assert not home.exists(), "the next session removes the home of a dead owner"
    finally:
        holder.kill()
        holder.wait(30)
        assert holder.stdout is not None
        holder.stdout.close()


class _Gate:
    """Stand-in wrapper around MinerU's analysis: holds a parse inside MinerU until the test opens it.

    Records, when the parse goes on, whether the session's MinerU home was still there:
    a release under a running parse would have removed it.
    """

    def __init__(self, real: Callable[..., object]) -> None:
        self.real = real
        self.entered = threading.Event()
        self.go = threading.Event()
        self.home_on_resume: bool | None = None

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.entered.set()
        assert self.go.wait(120), "the test never let the parse go on"
        home = os.environ.get("MINERU_HOME")
        self.home_on_resume = home is not None and Path(home).is_dir()
        return self.real(*args, **kwargs)


def test_close_waits_for_a_parse_in_another_thread_and_refuses_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import mineru.parser.mineru_parser as mineru_parser

    gate = _Gate(mineru_parser.doc_analyze)
    monkeypatch.setattr(mineru_parser, "doc_analyze", gate)
    s = mv.ModelSession("flash", device="cpu", trust_env=False).open()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parsing = pool.submit(s.parse, make_pdf(1), name="slow.pdf")
        try:
            assert gate.entered.wait(120)
            with pytest.raises(mv.SessionStateError, match=r"waited 0\.5s") as info:
                s.close(timeout=0.5)
            assert info.value.timeout == 0.5
            assert s.state is mv.SessionState.CLOSING
            with pytest.raises(mv.SessionStateError, match="closing"):
                s.parse(make_pdf(1))
            closing = pool.submit(s.close)  # waits for the parse, without a bound this time
        finally:
            gate.go.set()
        result = parsing.result(timeout=120)
        report = closing.result(timeout=120)
    assert gate.home_on_resume is True, "the models and MinerU's set-up were released under a running parse"
    assert result.document == "slow.pdf"
    assert report is s.release_report
    assert report is not None
    assert report.ok
    assert s.state is mv.SessionState.CLOSED


def test_too_large_documents_are_refused_before_parsing(random_models_dir: Path) -> None:
    with mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, max_pages=1) as s:
        with pytest.raises(mv.DocumentTooLargeError):
            s.parse(make_pdf(2))
        assert s.parse(make_pdf(1)).page_count == 1


def test_state_machine(session: mv.ModelSession) -> None:
    with pytest.raises(mv.SessionStateError, match="not open"):
        session.parse(make_pdf(1))
    with session as s, pytest.raises(mv.SessionStateError, match="only once"):
        s.open()
    with pytest.raises(mv.SessionStateError, match="closed"):
        s.parse(make_pdf(1))
    with pytest.raises(mv.SessionStateError, match="cannot be reopened"), s:
        pass
    first = s.release_report
    assert s.close() is first, "close() is idempotent"


def test_models_kept_alive_by_user_code_are_reported_and_strict_raises(random_models_dir: Path) -> None:
    s = mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, strict=True)
    s.open()
    held = list(_model_caches()["context"].values())  # user code keeps a model reference
    with pytest.raises(mv.VramLeakError) as info:
        s.close()
    report = info.value.report
    assert report.models_alive, "the surviving model must be named"
    assert not report.ok
    assert s.state is mv.SessionState.CLOSED
    del held
    gc.collect()


@pytest.mark.vram_leak_check(enabled=False)  # keeps a model alive on purpose until the end
def test_strict_exit_raises_the_leak_but_never_hides_the_bodys_own_error(random_models_dir: Path) -> None:
    held: list[object] = []
    with (
        pytest.raises(mv.VramLeakError),
        mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, strict=True),
    ):
        held.extend(_model_caches()["context"].values())
    s = mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, strict=True)

    def body_fails() -> None:
        with s:
            held.extend(_model_caches()["context"].values())
            raise KeyError("the body's own")

    with pytest.raises(KeyError, match="the body's own"):
        body_fails()
    assert s.release_report is not None
    assert not s.release_report.ok
    held.clear()
    gc.collect()


def test_user_entries_in_mineru_caches_are_left_alone(session: mv.ModelSession) -> None:
    caches = _model_caches()
    user_key = ("torch", "cpu", "users-own-model")
    sentinel = object()  # stand-in for a model the user's own code loaded through MinerU
    caches["atom"][user_key] = sentinel
    try:
        with session as s:
            s.parse(make_pdf(1))
        assert caches["atom"].get(user_key) is sentinel
        assert [k for k in caches["atom"] if k != user_key] == []
    finally:
        caches["atom"].pop(user_key, None)


@pytest.mark.parametrize(
    "other",
    [pytest.param({"device": "cuda:0"}, marks=pytest.mark.gpu, id="device"), pytest.param({"small_backend": "onnx"})],
    ids=lambda o: next(iter(o)),
)
def test_second_in_process_session_with_other_settings_is_refused(other: dict[str, str]) -> None:
    with mv.ModelSession("flash", device="cpu", trust_env=False):
        second = mv.ModelSession("flash", trust_env=False, **{"device": "cpu", **other})  # type: ignore[arg-type]
        with pytest.raises(mv.ConfigurationError, match="isolation='process'"):
            second.open()
        assert second.state is mv.SessionState.CLOSED


def test_flash_on_a_scanned_page_without_the_ocr_models_is_models_not_available(
    corpus_dir: Path, tmp_path: Path
) -> None:
    # flash needs no model for a text page, but MinerU quietly needs its OCR models for a scanned one.
    with mv.ModelSession("flash", device="cpu", models_dir=tmp_path, trust_env=False) as s:
        with pytest.raises(mv.ModelsNotAvailableError) as err:
            s.parse(corpus_dir / "small_ocr.pdf", pages=[1])
        assert err.value.missing == ["MinerU-4_models_torch"]
        assert str(err.value.document).endswith("small_ocr.pdf")
        assert "mineru-vram models download" in str(err.value)
        assert s.parse(make_pdf(1)).page_count == 1, "the session stays usable for text pages"


def test_a_cuda_device_that_is_not_there_is_refused_before_any_work() -> None:
    missing = [f"cuda:{nvml_device_count()}"]  # one past the last device NVML sees
    if nvml_device_count() == 0:
        missing += ["cuda", 0]
    for device in missing:
        for isolation in ("none", "process"):
            with pytest.raises(mv.ConfigurationError) as info:
                mv.ModelSession("flash", device=device, isolation=isolation, trust_env=False)  # type: ignore[arg-type]
            text = str(info.value)
            assert "NVML" in text, text
            assert "device='cpu'" in text, "the way out is named"
    assert "torch" not in sys.modules or not sys.modules["torch"].cuda.is_initialized()


def test_two_sessions_on_one_device_share_models_until_the_last_closes(random_models_dir: Path) -> None:
    device_before = os.environ.get("MINERU_DEVICE_MODE")
    a = mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir).open()
    b = mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir).open()
    a.close()
    assert a.release_report is not None
    assert a.release_report.models_released == 0, "b still uses the models"
    assert _adapter.cache_summary()["context"], "models stay for b"
    assert os.environ.get("MINERU_DEVICE_MODE") == "cpu", "closing a must not restore the environment under b"
    b.parse(make_pdf(1))
    b.close()
    assert os.environ.get("MINERU_DEVICE_MODE") == device_before, "the last close restores the environment"
    assert b.release_report is not None
    assert b.release_report.models_released >= 2
    assert _adapter.cache_summary() == {"atom": [], "context": []}


def test_second_in_process_session_with_other_models_is_refused(session: mv.ModelSession, tmp_path: Path) -> None:
    with session:
        other = mv.ModelSession("pipeline", device="cpu", models_dir=tmp_path)
        with pytest.raises(mv.ConfigurationError, match="models_dir"):
            other.open()
        assert other.state is mv.SessionState.CLOSED


def test_async_session(random_models_dir: Path) -> None:
    async def main() -> tuple[mv.ParseResult, mv.BatchResult, mv.ModelSession]:
        async with mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir) as s:
            one = await s.aparse(make_pdf(1), name="a.pdf")
            many = await s.aparse_many([make_pdf(1), b"junk"], progress=False)
        return one, many, s

    one, many, s = asyncio.run(main())
    assert one.document == "a.pdf"
    assert [i.ok for i in many] == [True, False]
    assert s.state is mv.SessionState.CLOSED
    assert s.release_report is not None
    assert s.release_report.models_alive == []


def test_release_report_renders(session: mv.ModelSession) -> None:
    with session as s:
        s.parse(make_pdf(1))
    report = s.release_report
    assert report is not None
    text = str(report)
    assert "models released" in text
    assert "ok" in text
    assert "<table>" in report._repr_html_()
    assert report.to_dict()["ok"] is True


@pytest.mark.slow
@pytest.mark.first
@pytest.mark.timeout(900)
def test_ten_cycles_do_not_grow_live_tensors_or_rss(random_models_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    doc = make_pdf(1)

    def census() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    def rss_mib() -> float:
        snap = mv.vram_snapshot("cpu")
        assert snap.rss_mib is not None
        return snap.rss_mib

    # Two warm-up cycles: first-use imports and allocator pools are not leaks.
    for _ in range(2):
        with mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir) as s:
            s.parse(doc)
    tensors0, rss0 = census(), rss_mib()
    for _ in range(10):
        with mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir) as s:
            s.parse(doc)
        assert s.release_report is not None
        assert s.release_report.models_alive == []
    tensors1, rss1 = census(), rss_mib()
    assert tensors1 - tensors0 <= 0, f"live tensors grew from {tensors0} to {tensors1}"
    # RSS tolerance: glibc keeps freed arenas; 10 loads of ~200 MB of weights must not accumulate.
    assert rss1 - rss0 < 300, f"RSS grew {rss1 - rss0:.0f} MiB over 10 cycles"


def test_gc_freeze_is_off_in_your_process_unless_asked_and_undone_before_release() -> None:
    gc.unfreeze()
    with mv.ModelSession("flash", device="cpu", trust_env=False) as s:
        assert not s.settings.gc_freeze
        assert gc.get_freeze_count() == 0, "the user's process is not frozen by default"
    assert mv.ModelSession("flash", device="cpu", isolation="process", trust_env=False).settings.gc_freeze, (
        "on by default in the worker, the library's own process"
    )
    with mv.ModelSession("flash", device="cpu", gc_freeze=True, trust_env=False) as s:
        frozen = gc.get_freeze_count()
        assert frozen > 10_000, "the loaded stack left the collector's generations"
        assert s.parse(make_pdf(1, paragraphs=("Frozen", "A page parsed while frozen."))).markdown
        assert gc.get_freeze_count() > frozen // 2, "still frozen while the session is open"
    assert gc.get_freeze_count() == 0, "unfrozen before release"
    report = s.release_report
    assert report is not None
    assert report.ok
    assert "gc.unfreeze" in [name for name, _ in report.steps]


@pytest.mark.slow
def test_frozen_models_are_still_released(random_models_dir: Path) -> None:
    # A frozen object is never collected by gc.collect(); the release must unfreeze first, or
    # models held in reference cycles would stay alive (and on the GPU).
    gc.unfreeze()
    with mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, gc_freeze=True, trust_env=False) as s:
        assert gc.get_freeze_count() > 100_000
        s.parse(make_pdf(1, paragraphs=("Frozen models", "They are released all the same.")))
    report = s.release_report
    assert report is not None
    assert report.models_released > 0
    assert report.models_alive == []
    assert report.ok
    assert gc.get_freeze_count() == 0
