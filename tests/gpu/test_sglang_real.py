"""The resident engine with REAL SGLang on a real GPU.

Skipped unless ``sglang`` is importable and NVML sees a GPU: SGLang cannot be
installed on the machines this project is developed on, so these tests have not
been run there (see docs/engine.md for what was and was not run). The model is
``MINERU_VRAM_SGLANG_MODEL`` (a MinerU 2.5 directory) when set, else the tiny
random Qwen2-VL from :func:`mineru_vram.testing.write_random_vlm`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import mineru_vram as mv
from mineru_vram import testing
from mineru_vram._engine import EngineState, ResidentEngine

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang is not installed"),
    pytest.mark.gpu,
]

BUDGET_GIB = 4.0


@pytest.fixture(scope="module")
def sglang_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("MINERU_VRAM_SGLANG_MODEL")
    if configured:
        return Path(configured)
    return testing.write_random_vlm(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def engine(sglang_model: Path) -> Iterator[ResidentEngine]:
    eng = ResidentEngine("sglang", model_path=sglang_model, device="cuda:0", vram_budget_gib=BUDGET_GIB)
    eng.start()
    yield eng
    eng.stop()


def test_budget_becomes_the_fraction_sglang_reports(engine: ResidentEngine) -> None:
    status = engine.status()
    assert status.state is EngineState.READY
    assert status.device_total_mib is not None
    assert engine.mem_fraction_static is not None
    assert engine.mem_fraction_static * status.device_total_mib <= BUDGET_GIB * 1024
    served = engine._backend.info
    assert served, "/server_info answered"
    from mineru_vram._engine.http import find_key as _find_key

    assert float(_find_key(served, "mem_fraction_static")) == pytest.approx(engine.mem_fraction_static)
    assert _find_key(served, "enable_memory_saver") is True
    assert status.memory_mib is not None
    assert status.memory_mib > 0


def test_vlm_session_parses_through_real_sglang(engine: ResidentEngine, random_models_dir: Path) -> None:
    with mv.ModelSession("vlm", engine=engine, models_dir=random_models_dir) as session:
        result = session.parse(testing.make_pdf(1))
    assert result.page_count == 1
    assert engine.state is EngineState.READY


def test_sleep_and_wake_move_memory_by_nvml(engine: ResidentEngine) -> None:
    asleep = engine.sleep()
    assert asleep.confirmed is True, asleep
    assert asleep.freed_mib is not None
    assert asleep.freed_mib > 0.25 * BUDGET_GIB * 1024, asleep  # weights and KV cache: the static pool
    awake = engine.wake()
    assert awake.confirmed is True, awake
    assert awake.after_mib is not None
    assert asleep.after_mib is not None
    assert awake.after_mib > asleep.after_mib


def test_stop_returns_the_memory_and_leaves_no_process(sglang_model: Path) -> None:
    eng = ResidentEngine("sglang", model_path=sglang_model, device="cuda:0", vram_budget_gib=2)
    eng.start()
    pids = eng._backend.pids()
    report = eng.stop()
    assert report is not None
    assert report.confirmed is True, report
    assert not [p for p in pids if psutil.pid_exists(p)]
