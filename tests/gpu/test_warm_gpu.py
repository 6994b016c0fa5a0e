"""Warm re-entry on a real GPU: parked models hold no device memory, restored ones parse alike.

In process, the models go to (pinned) host memory at exit: torch's allocator holds nothing and the
process keeps only its CUDA context. Isolated, a spare built on the CPU is taken by the next session
and moved to the GPU (fp16 OCR, as MinerU does on a GPU); exit still returns the device to its baseline.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import mineru_vram as mv
from mineru_vram._worker.spare import spare_pool
from mineru_vram.testing import make_pdf

pytestmark = pytest.mark.gpu

DEVICE = "cuda:0"
PDF = make_pdf(1)


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    mv.warm_cache().clear()
    spare_pool().discard_all()
    yield
    mv.warm_cache().clear()
    spare_pool().discard_all()


def test_parked_models_leave_the_device_and_come_back_alike(random_models_dir: Path) -> None:
    with mv.ModelSession("pipeline", device=DEVICE, models_dir=random_models_dir, trust_env=False) as cold:
        expected = cold.parse(PDF, name="a.pdf")
    with mv.ModelSession(
        "pipeline", device=DEVICE, models_dir=random_models_dir, keep_warm=True, trust_env=False
    ) as first:
        first.parse(PDF, name="a.pdf")
    report = first.release_report
    assert report is not None
    assert report.ok, report.problems()
    assert report.parked["models"], report.parked
    assert report.parked["where"] in ("host memory (pinned)", "host memory")
    torch = sys.modules["torch"]
    assert torch.cuda.memory_allocated(0) == 0, "a parked model kept device memory"
    entry = mv.warm_cache().entries()[0]
    for model in entry.models.values():
        for value in vars(model).values():
            if isinstance(value, torch.nn.Module):
                assert all(p.device.type == "cpu" for p in value.parameters())
    with mv.ModelSession(
        "pipeline", device=DEVICE, models_dir=random_models_dir, keep_warm=True, trust_env=False
    ) as again:
        result = again.parse(PDF, name="a.pdf")
    assert again.release_report is not None
    assert again.release_report.restored["models"] > 0
    assert result.markdown == expected.markdown
    assert result.content_list == expected.content_list


def test_a_spare_built_on_the_cpu_serves_the_gpu_session_alike(random_models_dir: Path) -> None:
    kw = {"device": DEVICE, "models_dir": random_models_dir, "isolation": "process", "trust_env": False}
    with mv.ModelSession("pipeline", **kw) as cold:  # type: ignore[arg-type]
        expected = cold.parse(PDF, name="a.pdf")
    with mv.ModelSession("pipeline", keep_warm=True, **kw):  # type: ignore[arg-type]
        pass
    assert spare_pool().wait_ready(600)
    with mv.ModelSession("pipeline", keep_warm=True, **kw) as warm:  # type: ignore[arg-type]
        result = warm.parse(PDF, name="a.pdf")
    report = warm.release_report
    assert report is not None
    assert report.ok, report.problems()
    assert report.worker["spare"], "the session did not take the spare"
    assert report.worker["back_at_baseline"] is True
    assert result.markdown == expected.markdown
