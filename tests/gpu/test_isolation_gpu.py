"""Process isolation on a real GPU: the worker's exit returns every byte, CUDA context included.

Skipped by the plugin's ``gpu`` marker where NVML sees no device. This process
never creates a CUDA context for the worker, so NVML's device-wide figure before
the session is the level the device must come back to.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram._probe import process_memory_mib
from mineru_vram.testing import make_pdf

pytestmark = pytest.mark.gpu

DEVICE = "cuda:0"


def _device_used() -> float:
    info = mv.vram_snapshot(DEVICE).device_info
    assert info is not None
    return info.used_mib


def _cuda_initialised_here() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def test_exit_returns_the_device_to_its_pre_session_level(random_models_dir: Path) -> None:
    cuda_here = _cuda_initialised_here()
    before = _device_used()
    with mv.ModelSession(
        "pipeline", device=DEVICE, models_dir=random_models_dir, isolation="process", trust_env=False
    ) as s:
        s.parse(make_pdf(1), name="one.pdf")
        pid = s.runner.pid  # type: ignore[union-attr]
        assert pid is not None
        worker_mib = process_memory_mib(DEVICE, pid=pid)
        loaded = _device_used()
    assert loaded - before > 300, "the worker holds a CUDA context and the models"
    assert _cuda_initialised_here() == cuda_here, "the parent never initialises CUDA for the worker"
    report = s.release_report
    assert report is not None
    assert report.worker["back_at_baseline"] is True, report.worker
    assert report.worker["seconds_to_baseline"] < 5
    assert report.worker["device_residual_mib"] <= report.tolerance_mib
    assert report.worker["left"] == []
    assert _device_used() - before <= report.tolerance_mib
    if worker_mib:  # NVML sees our pids (not hidden by a PID namespace)
        assert worker_mib > 300
        assert report.before is not None
        assert report.before.process_mib == pytest.approx(worker_mib, abs=256)
        assert not process_memory_mib(DEVICE, pid=pid)


def test_device_growth_recycles_the_worker(random_models_dir: Path) -> None:
    with mv.ModelSession(
        "pipeline",
        device=DEVICE,
        models_dir=random_models_dir,
        isolation="process",
        recycle_above_mib=256,
        trust_env=False,
    ) as s:
        runner = s.runner
        s.parse(make_pdf(1), name="first.pdf")
        grown = runner.pid  # type: ignore[union-attr]
        runner._debug_allocate_mib(512, on_device=True)  # type: ignore[union-attr]  # test hook: a device leak
        s.parse(make_pdf(1), name="second.pdf")
        assert runner.recycles == 1  # type: ignore[union-attr]
        s.parse(make_pdf(1), name="third.pdf")
        assert runner.pid not in (None, grown)  # type: ignore[union-attr]
    report = s.release_report
    assert report is not None
    (event,) = [e for e in report.events if e.startswith("recycled")]
    assert "device memory grew" in event
    assert report.worker["back_at_baseline"] is True, report.worker


def test_a_crashed_worker_leaves_nothing_on_the_device(random_models_dir: Path) -> None:
    before = _device_used()
    with mv.ModelSession(
        "pipeline", device=DEVICE, models_dir=random_models_dir, isolation="process", trust_env=False
    ) as s:
        s.parse(make_pdf(1))
        pid = s.runner.pid  # type: ignore[union-attr]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _device_used() - before > 32 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _device_used() - before <= 32, "a killed worker's memory returns to the device"
        result = s.parse(make_pdf(1), name="after.pdf")  # a fresh worker
        assert result.document == "after.pdf"
        assert s.runner.restarts == 1  # type: ignore[union-attr]
