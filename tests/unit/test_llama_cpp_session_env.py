"""What MinerU's in-process llama.cpp engine loads with (``_inprocess._llama_cpp_environ``), on CPU.

The GPU branch matches NVML's UUID against the Vulkan loader's list, which needs both; it shares
``vulkan_index`` with the resident engine, whose matching is tested in test_engine_llama_cpp_plan.py.
"""

from __future__ import annotations

import logging

import pytest

import mineru_vram as mv
from mineru_vram import _inprocess


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_inprocess, "_vulkan_visible", None)


def test_cpu_hides_every_vulkan_device_and_drops_the_host_memory_switches(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("GGML_VK_ALLOW_SYSMEM_FALLBACK", "0")  # "0" turns it on too: ggml tests != NULL
    monkeypatch.delenv("GGML_VK_PREFER_HOST_MEMORY", raising=False)
    with caplog.at_level(logging.WARNING, logger="mineru_vram"):
        environ, drop = _inprocess._llama_cpp_environ("cpu")
    assert environ == {"GGML_VK_VISIBLE_DEVICES": ""}, "no visible Vulkan device: llama.cpp's CPU back-end"
    assert set(drop) == {"GGML_VK_ALLOW_SYSMEM_FALLBACK", "GGML_VK_PREFER_HOST_MEMORY"}
    assert "GGML_VK_ALLOW_SYSMEM_FALLBACK" in caplog.text


def test_a_second_device_in_one_process_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """ggml-vulkan sets its devices up once per process: an engine for Vulkan device 0 was loaded here."""
    monkeypatch.setattr(_inprocess, "_vulkan_visible", "0")
    with pytest.raises(mv.ConfigurationError, match="isolation='process'"):
        _inprocess._llama_cpp_environ("cpu")
    monkeypatch.setattr(_inprocess, "_vulkan_visible", "")
    assert _inprocess._llama_cpp_environ("cpu")[0] == {"GGML_VK_VISIBLE_DEVICES": ""}, "the same device again"
