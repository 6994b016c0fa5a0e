"""OOM recovery: a CUDA out-of-memory error inside a document is released and retried once on smaller batches.

There is no GPU here, so the OOM is a stand-in: ``torch.cuda.OutOfMemoryError``
raised from inside MinerU's own call (the ``flash`` tier's analysis entry point, or
the pipeline layout model's ``forward``) on the first attempt only, by monkeypatching
that one function. Everything around it is real: MinerU's code, the session's
release, the halved batch settings MinerU reads on the retry.

The fault keeps a tensor alive the way a real OOM does: the failing frame holds the
document's tensors, and the frame is reachable from the exception's traceback
through a reference cycle, so only the session's release (cleared frames, then the
collector) frees it before the next document.
"""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mineru_vram as mv
from mineru_vram._inprocess import InProcessRunner
from mineru_vram._leakcheck import take_census_baseline, tensors_created_since
from mineru_vram.testing import make_pdf

torch = pytest.importorskip("torch")

BATCH_MODULES = (
    "mineru.backend.analysis.pdf.window",
    "mineru.backend.analysis.pdf.ocr",
    "mineru.backend.analysis.pdf.tables",
)


def _batch_ratios() -> dict[str, int]:
    import importlib

    return {name: importlib.import_module(name).BATCH_RATIO for name in BATCH_MODULES}


class OomOnce:
    """Stand-in for a real CUDA OOM: wraps ``real`` and raises on the first ``fail`` calls.

    Each failing call allocates ``held_mib`` in a tensor and keeps it in its frame, with
    the exception in the same frame (a cycle, as MinerU's frames make when an error is
    logged), then raises ``torch.cuda.OutOfMemoryError``. Every call records the batch
    settings MinerU would read at that moment.
    """

    def __init__(self, real: Callable[..., Any] | None, *, fail: int = 1, held_mib: int = 16) -> None:
        self.real = real
        self.fail = fail
        self.held_mib = held_mib
        self.calls = 0
        self.seen: list[dict[str, Any]] = []
        self.held: list[weakref.ref[Any]] = []
        self.census: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.seen.append(
            {
                "batch_ratio": _batch_ratios(),
                "window": os.environ.get("MINERU_PROCESSING_WINDOW_SIZE"),
                "virtual_vram": os.environ.get("MINERU_VIRTUAL_VRAM_SIZE"),
                # Was what the failed attempts held released before this attempt started?
                "held_alive": [ref() is not None for ref in self.held],
            }
        )
        if self.calls <= self.fail:
            if self.census is None:
                self.census = take_census_baseline("cpu")
            held = torch.ones(self.held_mib * 1024 * 1024 // 4)
            self.held.append(weakref.ref(held))
            try:
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {self.held_mib} MiB (stand-in raised by the test)"
                )
            except torch.cuda.OutOfMemoryError as exc:
                error = exc  # the frame now refers to the exception: frame -> exc -> traceback -> frame
                raise error from None
        assert self.real is not None
        return self.real(*args, **kwargs)


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    """Only explicit collections: the cycle a failed attempt leaves is freed by the release or not at all."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def oom_in_analysis(monkeypatch: pytest.MonkeyPatch) -> Callable[..., OomOnce]:
    import mineru.parser.mineru_parser as mineru_parser

    def install(**kwargs: Any) -> OomOnce:
        fault = OomOnce(mineru_parser.doc_analyze, **kwargs)
        monkeypatch.setattr(mineru_parser, "doc_analyze", fault)
        return fault

    return install


@pytest.mark.usefixtures("no_automatic_gc")
def test_oom_in_a_document_is_released_and_retried_on_smaller_batches(oom_in_analysis: Any) -> None:
    before_ratios = _batch_ratios()
    pdf = make_pdf(1)
    with mv.ModelSession("flash", device="cpu", trust_env=False, budget=4096) as s:
        s.parse(pdf, name="warm.pdf")  # MinerU's first-use state is not the document's
        gc.collect()
        fault = oom_in_analysis(fail=1)
        result = s.parse(pdf, name="oom.pdf")
        # Checked at once, before any collection the test does: the session's release freed it.
        assert [ref() for ref in fault.held] == [None], "the failed attempt's tensor outlived the retry"
        new = tensors_created_since(fault.census, "cpu")
        runner = s.runner
        assert isinstance(runner, InProcessRunner)
        assert runner.oom_retries == 1
    assert result.document == "oom.pdf"
    assert result.markdown.startswith("# mineru-vram demo document")
    assert result.timings["oom_retries"] == 1.0
    assert fault.calls == 2
    first, retry = fault.seen
    assert first == {"batch_ratio": before_ratios, "window": None, "virtual_vram": "4", "held_alive": []}
    assert retry["held_alive"] == [False], "the retry started while the failed attempt's tensor was alive"
    assert retry["batch_ratio"] == {name: max(1, r // 2) for name, r in before_ratios.items()}
    assert retry["batch_ratio"] != before_ratios
    assert retry["window"] == "32"  # MinerU's default 64, halved
    assert retry["virtual_vram"] == "2"  # the budget's 4 GB, halved
    assert new.count == 0, new.summary("cpu")
    # Restored after the retry and after the session.
    assert _batch_ratios() == before_ratios
    assert "MINERU_PROCESSING_WINDOW_SIZE" not in os.environ
    assert "MINERU_VIRTUAL_VRAM_SIZE" not in os.environ


@pytest.mark.usefixtures("no_automatic_gc")
def test_oom_twice_raises_out_of_memory_error_and_the_session_goes_on(oom_in_analysis: Any) -> None:
    pdf = make_pdf(1)
    with mv.ModelSession("flash", device="cpu", trust_env=False) as s:
        fault = oom_in_analysis(fail=2)
        with pytest.raises(mv.OutOfMemoryError) as info:
            s.parse(pdf, name="hopeless.pdf")
        assert info.value.document == "hopeless.pdf"
        assert any("retried once on smaller batches" in note for note in info.value.__notes__)
        del info
        assert [ref() for ref in fault.held] == [None, None]
        assert fault.calls == 2
        assert fault.seen[1]["held_alive"] == [False]
        # The next document is parsed at full batch size again.
        assert s.parse(pdf, name="next.pdf").page_count == 1
        assert fault.seen[-1]["window"] is None


def test_oom_retry_can_be_turned_off(oom_in_analysis: Any) -> None:
    with mv.ModelSession("flash", device="cpu", trust_env=False, oom_retry=False) as s:
        fault = oom_in_analysis(fail=1)
        with pytest.raises(mv.OutOfMemoryError):
            s.parse(make_pdf(1))
        assert fault.calls == 1


@pytest.mark.usefixtures("no_automatic_gc")
def test_pipeline_oom_in_the_layout_models_forward_is_recovered_without_growth(random_models_dir: Path) -> None:
    """The one test here with models: a real model call fails, and the retry runs every model."""
    from mineru_vram._adapter.state import clear_transformers_caches

    with mv.ModelSession("pipeline", device="cpu", models_dir=random_models_dir, preload="all", trust_env=False) as s:
        from mineru.model.runtime.hybrid import HybridLocalModelContextSingleton

        layout = HybridLocalModelContextSingleton().get_model().layout_model.model  # a torch nn.Module
        fault = OomOnce(layout.forward, fail=1, held_mib=64)
        layout.forward = fault  # an instance attribute: nn.Module.__call__ finds it first
        try:
            result = s.parse(make_pdf(1), name="oom.pdf", ocr_mode="txt")
        finally:
            del layout.forward
            fault.real = None  # the bound method would keep the model alive past the session
            del layout
        assert [ref() for ref in fault.held] == [None]
        # Layout caches (position embeddings keyed by shape) are filled by the first real forward;
        # they belong to the model, not the document, and the release clears them anyway.
        clear_transformers_caches()
        gc.collect()  # only garbage goes: what is still reachable is what the document left behind
        new = tensors_created_since(fault.census, "cpu")
    assert fault.calls >= 2
    assert fault.seen[1]["held_alive"] == [False]
    assert fault.seen[1]["batch_ratio"]["mineru.backend.analysis.pdf.window"] == 1
    assert result.timings["oom_retries"] == 1.0
    assert result.page_count == 1
    assert new.count == 0, new.summary("cpu")
    assert s.release_report is not None
    assert s.release_report.models_alive == []
