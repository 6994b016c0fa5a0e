"""Sleep, wake and stop measured by NVML on a real GPU, without SGLang.

The SGLang STAND-IN (not SGLang) really allocates ``min(fraction * total, cap)``
on the GPU and frees it on release, so the engine's NVML confirmation is tested
for real; the transformers engine moves its weights off and back on the device.
Skipped where NVML sees no GPU.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

import mineru_vram as mv
from mineru_vram import testing
from mineru_vram._engine import EngineState, ResidentEngine
from mineru_vram.testing._standin import StandinLauncher

pytestmark = pytest.mark.gpu

CAP_MIB = 2048


@pytest.mark.parametrize("kind", ["sglang", "vllm"])
def test_standin_sleep_wake_stop_are_confirmed_by_nvml(kind: str, tmp_path: Path) -> None:
    # vllm: the stand-in's vLLM flavour, on the card CUDA_VISIBLE_DEVICES gives it, sleeping by /sleep.
    engine = ResidentEngine(
        kind,
        model_path=tmp_path,
        device="cuda:0",
        vram_budget_gib=CAP_MIB / 1024 + 0.5,
        launcher=StandinLauncher(cap_mib=CAP_MIB),
        start_timeout=120,
    )
    try:
        engine.start()
        held = engine.status().memory_mib
        assert held is not None
        assert held >= CAP_MIB * 0.95, f"the stand-in holds its pool plus a context, NVML says {held} MiB"
        asleep = engine.sleep()
        assert asleep.confirmed is True, asleep
        assert asleep.freed_mib is not None
        assert asleep.freed_mib >= CAP_MIB * 0.95, asleep
        awake = engine.wake()
        assert awake.confirmed is True, awake
        assert awake.after_mib is not None
        assert awake.after_mib >= held - 64
        pids = engine._backend.pids()
    finally:
        stopped = engine.stop()
    assert stopped is not None
    assert stopped.confirmed is True, stopped
    assert stopped.after_mib == 0
    assert not [p for p in pids if psutil.pid_exists(p)]


def test_preflight_refuses_a_budget_the_card_cannot_give(tmp_path: Path) -> None:
    info = mv.vram_snapshot("cuda:0").device_info
    assert info is not None
    budget = (info.free_mib + 1024) / 1024
    if budget * 1024 >= info.total_mib:
        pytest.skip("the card is nearly empty: no budget is both below the total and above the free memory")
    launcher = StandinLauncher()
    engine = ResidentEngine("sglang", model_path=tmp_path, device="cuda:0", vram_budget_gib=budget, launcher=launcher)
    with pytest.raises(mv.EngineStartError, match="not enough free memory"):
        engine.start()
    assert launcher.launches == []


def test_transformers_engine_sleeps_by_moving_weights_off_the_device(random_models_dir: Path, tmp_path: Path) -> None:
    vlm = testing.write_random_vlm(tmp_path / "tiny-qwen2-vl")
    engine = ResidentEngine("transformers", model_path=vlm, device="cuda:0", max_new_tokens=16)
    try:
        engine.start()
        with mv.ModelSession("hybrid", engine=engine, models_dir=random_models_dir) as session:
            before = session.parse(testing.make_pdf(1))
        assert before.page_count == 1
        asleep = engine.sleep()
        assert engine.state is EngineState.SLEEPING
        assert asleep.confirmed is True, asleep
        awake = engine.wake()
        # The tiny random VLM's weights are under 1 MiB: moving them back is below what
        # NVML's per-process figure resolves. The server says how much it moved, so the
        # engine does not wait for NVML to confirm it, and says why; use is the proof.
        assert engine.state is EngineState.READY, awake
        assert awake.confirmed is True or "below what NVML" in awake.note, awake
        assert awake.after_mib is not None
        assert asleep.after_mib is not None
        assert awake.after_mib >= asleep.after_mib, awake
        with mv.ModelSession("hybrid", engine=engine, models_dir=random_models_dir) as session:
            after = session.parse(testing.make_pdf(1))
        assert after.markdown == before.markdown, "the weights came back as they were (greedy decoding)"
    finally:
        engine.stop()


def test_two_budgeted_engines_share_a_card_through_admission(tmp_path: Path) -> None:
    """Two SGLang STAND-INs (real CUDA memory, not SGLang) that each want 55 % of the card.

    Only one fits at a time: the second waits and fails typed; when the first sleeps it gives
    its memory and its reservation back, the second is admitted, and the first cannot wake
    until the second stops. Real NVML, the real ledger.
    """

    def make() -> ResidentEngine:
        return ResidentEngine(
            "sglang",
            model_path=tmp_path,
            device="cuda:0",
            budget=mv.VramBudget(fraction=0.55, timeout=2.0, poll_interval=0.1),
            launcher=StandinLauncher(cap_mib=10**6),
            start_timeout=120,
        )

    first, second = make(), make()
    try:
        first.start()
        held = first.status().memory_mib
        total = mv.vram_snapshot("cuda:0").device_info.total_mib  # type: ignore[union-attr]
        assert held is not None
        assert held >= 0.55 * total * 0.95, held
        with pytest.raises(mv.EngineAdmissionError) as info:
            second.start()
        assert isinstance(info.value, mv.AdmissionTimeoutError)
        assert second.state is EngineState.CRASHED

        asleep = first.sleep()
        assert asleep.confirmed is True, asleep
        second.start()  # admitted into what the first gave back
        assert second.state is EngineState.READY

        with pytest.raises(mv.EngineAdmissionError):
            first.wake()
        assert first.state is EngineState.SLEEPING

        second.stop()
        awake = first.wake()
        assert awake.confirmed is True, awake
        assert first.state is EngineState.READY
    finally:
        second.stop()
        first.stop()
