"""The pytest plugin on a real GPU: a planted CUDA leak is caught, a ModelSession test passes.

Skipped by the plugin's ``gpu`` marker where NVML sees no device. Each case runs an
inner pytest in a subprocess (``pytester``), so the CUDA context it judges is
created and measured in a fresh process, as in a user's run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.gpu


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    return pytester


def test_plugin_catches_a_planted_64_mib_cuda_leak(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import torch

        KEEP = []

        def test_clean_first_cuda_use():
            # Creates the CUDA context and initialises cuBLAS and cuDNN: NVML grows by
            # hundreds of MiB, which is the context, not a leak.
            x = torch.randn(1, 3, 64, 64, device="cuda")
            w = torch.randn(8, 3, 3, 3, device="cuda")
            torch.nn.functional.conv2d(x, w).sum().item()
            a = torch.randn(512, 512, device="cuda")
            (a @ a).sum().item()

        def test_planted_leak():
            KEEP.append(torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda"))

        def test_clean_after():
            y = torch.ones(1024, 1024, device="cuda")
            del y
        """
    )
    result = inner.runpytest_subprocess(
        "--vram-leak-check", "--vram-device", "cuda:0", "-p", "no:randomly", timeout=600
    )
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "mineru-vram: cuda:0 (*MiB); leak check on for every test*",
            "*ERROR at teardown of test_planted_leak*",
            "VRAM leak in *::test_planted_leak on cuda:0: torch allocated grew by 64.0 MiB (0 B -> 64.0 MiB)*",
            "  torch allocated on cuda:0: 0 B -> 64.0 MiB*",
            "  NVML this process: * MiB -> * MiB (+* MiB, tolerance 32 MiB)",
            "  live tensors on cuda:0 created by the test: 1, 64.0 MiB in total; largest: uint8[[]67108864[]] 64.0 MiB",
        ]
    )
    out = result.stdout.str()
    assert "test_clean_first_cuda_use on cuda:0" not in out
    assert "test_clean_after on cuda:0" not in out


def test_vram_budget_sees_a_peak_that_the_test_reset(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
        import pytest
        import torch

        @pytest.mark.vram_budget(100)
        def test_peak_then_reset():
            big = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
            del big
            torch.cuda.reset_peak_memory_stats()   # as ModelSession.close does

        @pytest.mark.vram_budget(100)
        def test_within():
            small = torch.empty(16 * 1024 * 1024, dtype=torch.uint8, device="cuda")
            del small
        """
    )
    result = inner.runpytest_subprocess("--vram-device", "cuda:0", "-p", "no:randomly", timeout=600)
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "VRAM budget exceeded in *::test_peak_then_reset on cuda:0: peak 256.0 MiB above the start*",
            "*heaviest tests by peak VRAM*",
            "     256.0 MiB  *::test_peak_then_reset",
            "      16.0 MiB  *::test_within",
        ]
    )


def test_a_model_session_test_passes_the_leak_check(inner: pytest.Pytester, mineru_vram_models: Path) -> None:
    inner.makeconftest(
        f"""
        import pytest
        from pathlib import Path

        @pytest.fixture(scope="session")
        def mineru_vram_models():
            return Path({str(mineru_vram_models)!r})
        """
    )
    inner.makepyfile(
        """
        from mineru_vram.testing import make_pdf

        def test_parse_on_gpu(mineru_vram_session):
            assert mineru_vram_session.device == "cuda:0"
            result = mineru_vram_session.parse(make_pdf(2), name="generated.pdf")
            assert result.page_count == 2
        """
    )
    result = inner.runpytest_subprocess("--vram-leak-check", "--vram-device", "cuda:0", "-s", timeout=600)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*heaviest tests by peak VRAM*", "* MiB  *::test_parse_on_gpu"])
