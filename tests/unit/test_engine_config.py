"""ResidentEngine's settings: keep_alive, validation, SGLang's command line, budget and pre-flight.

Nothing here starts a process: the launcher used is a stand-in that records the
command line and refuses to run anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import mineru_vram as mv
from mineru_vram._budget import Ledger, admit, device_key
from mineru_vram._engine import (
    EngineSettings,
    EngineState,
    MemoryReport,
    ResidentEngine,
    build_sglang_argv,
    build_vllm_argv,
    parse_keep_alive,
)
from mineru_vram._engine.settings import SETTING_NAMES
from mineru_vram._probe import DeviceMemory, ProcessMemory


@pytest.mark.parametrize(
    ("spec", "seconds"),
    [
        ("10m", 600.0),
        ("30s", 30.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("2d", 172800.0),
        ("1.5m", 90.0),
        (" 45S ", 45.0),
        ("90", 90.0),
        (12, 12.0),
        (0, 0.0),
        (0.5, 0.5),
        (timedelta(minutes=2), 120.0),
        (None, None),
        (-1, None),
        ("-1", None),
        ("never", None),
        (float("inf"), None),
    ],
)
def test_keep_alive_specs(spec: Any, seconds: float | None) -> None:
    assert parse_keep_alive(spec) == seconds


@pytest.mark.parametrize("spec", ["10 minutes", "m10", "10x", "1h 30m", "s", "10m5", True, float("nan")])
def test_bad_keep_alive_specs_are_refused(spec: Any) -> None:
    with pytest.raises(mv.ConfigurationError, match="keep_alive"):
        parse_keep_alive(spec)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "MinerU2.5-tiny"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\0" * (3 * 1024 * 1024))  # 3 MiB of "weights"
    return folder


class RefusingLauncher:
    """Stand-in launcher: records what the engine would run and runs nothing."""

    def __init__(self) -> None:
        self.argv: list[list[str]] = []

    def __call__(self, argv: Any, *, env: Any, log_path: Path, cwd: Path) -> Any:
        self.argv.append(list(argv))
        raise AssertionError("this test must not launch a server")


def card(*, total_gib: float = 80.0, free_gib: float = 80.0, holders: tuple[ProcessMemory, ...] = ()) -> Any:
    """A stand-in NVML probe that reports one card of this size."""
    info = DeviceMemory(
        index=0,
        name="Stand-in H100",
        total_mib=total_gib * 1024,
        used_mib=(total_gib - free_gib) * 1024,
        free_mib=free_gib * 1024,
        processes=holders,
    )
    return lambda device: info


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"engine": "sglang"}, "needs model_path"),
        ({"engine": "transformers", "model_path": "/no/such/dir"}, "does not exist"),
        ({"engine": "attach"}, "needs url"),
        ({"engine": "attach", "url": "localhost:30000"}, "http"),
        ({"engine": "nope", "model_path": "x"}, "expected one of"),
        ({"engine": "sglang", "model_path": "x", "url": "http://a:1"}, "url= is for engine='attach'"),
        ({"engine": "sglang", "model_path": "x", "vram_budget_gib": 8, "mem_fraction": 0.5}, "not both"),
        ({"engine": "sglang", "model_path": "x", "vram_budget_gib": 0}, "must be positive"),
        ({"engine": "sglang", "model_path": "x", "mem_fraction": 1.2}, "between 0 and 1"),
        ({"engine": "sglang", "model_path": "x", "keep_alive": "soon"}, "keep_alive"),
        ({"engine": "sglang", "model_path": "x", "keep_alive_action": "nap"}, "keep_alive_action"),
        ({"engine": "sglang", "model_path": "x", "device": "tpu"}, "unsupported device"),
        ({"engine": "sglang", "model_path": "x", "start_timeout": 0}, "start_timeout"),
    ],
)
def test_invalid_settings_raise_configuration_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(mv.ConfigurationError, match=match):
        ResidentEngine(**kwargs)


def test_minerus_in_process_vllm_engine_is_refused_with_the_alternative() -> None:
    with pytest.raises(mv.BackendNotAvailableError, match="engine='vllm', a supervised vLLM server"):
        ResidentEngine("vllm-engine", model_path="x")


def test_vllm_needs_a_gpu() -> None:
    with pytest.raises(mv.ConfigurationError, match="the vllm engine needs a GPU"):
        ResidentEngine("vllm", model_path="x", device="cpu")


def test_vllm_command_line_matches_vllm_serve(tmp_path: Path) -> None:
    argv = build_vllm_argv(
        model_path=str(tmp_path), port=30123, mem_fraction=0.1234, served_model_name="mineru-vlm", python="/py"
    )
    assert argv[:5] == ["/py", "-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path)]
    # The flags of vllm serve (EngineArgs / the frontend's args), parsed back the way vLLM spells them.
    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--served-model-name")
    parser.add_argument("--logits-processors", nargs="+")
    args = parser.parse_args(argv[5:])
    assert (args.host, args.port, args.gpu_memory_utilization) == ("127.0.0.1", 30123, 0.123)  # rounded down
    assert args.enable_sleep_mode
    assert args.served_model_name == "mineru-vlm"
    # MinerU's repetition guard: vLLM applies no_repeat_ngram_size only through MinerU's logits processor.
    assert args.logits_processors == ["mineru_vl_utils:MinerULogitsProcessor"]
    assert not any("key" in a for a in argv)  # the key travels in VLLM_API_KEY, not on the process list
    own = build_vllm_argv(model_path="m", port=1, mem_fraction=None, extra_args=["--logits-processors", "x:Y"])
    assert own.count("--logits-processors") == 1
    assert own[own.index("--logits-processors") + 1] == "x:Y"


def test_vllm_server_environment_carries_key_dev_mode_and_the_physical_gpu(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    launcher = EnvRecordingLauncher()
    engine = ResidentEngine("vllm", model_path=model_dir, device="cuda:1", probe=card(), launcher=launcher)
    with pytest.raises(OSError, match="launches nothing"):
        engine.start()
    env = launcher.env  # what the server process would have been given
    assert env["CUDA_VISIBLE_DEVICES"] == "5"  # this process's cuda:1 is the machine's GPU 5
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["VLLM_API_KEY"] == engine.vlm_config()["api_key"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    again = ResidentEngine("vllm", model_path=model_dir, device="cuda:1", probe=card(), launcher=launcher)
    with pytest.raises(mv.ConfigurationError, match="not among CUDA_VISIBLE_DEVICES=3"):
        again.start()


def test_a_vllm_budget_becomes_gpu_memory_utilization_and_no_budget_admits_vllms_default(
    model_dir: Path, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "runtime")
    engine = ResidentEngine(
        "vllm", model_path=model_dir, device="cuda:0", budget="20GiB", probe=card(total_gib=80), ledger=ledger
    )
    engine._preflight()
    engine._release_reservation()
    argv = engine._backend.argv(engine._context())  # type: ignore[attr-defined]
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.250"
    plain = ResidentEngine("vllm", model_path=model_dir, device="cuda:0", probe=card(total_gib=80), ledger=ledger)
    plain._preflight()
    assert _ledger_needs(ledger) == [pytest.approx(0.92 * 80 * 1024)]  # vLLM 0.33 takes 92 % when not told
    plain._release_reservation()
    assert "--gpu-memory-utilization" not in plain._backend.argv(plain._context())  # type: ignore[attr-defined]


def test_constructing_starts_nothing(model_dir: Path) -> None:
    launcher = RefusingLauncher()
    engine = ResidentEngine("sglang", model_path=model_dir, device="cpu", launcher=launcher)
    assert engine.state is EngineState.NEW
    assert launcher.argv == []
    config = engine.vlm_config()
    assert config["server_url"].startswith("http://127.0.0.1:")
    assert config["server_url"].endswith("/")
    assert len(config["api_key"]) >= 24
    assert engine.stop() is None
    assert engine.state is EngineState.STOPPED
    with pytest.raises(mv.EngineStateError, match="stopped"):
        engine.start()


def test_two_engines_get_distinct_ports_and_keys(model_dir: Path) -> None:
    a = ResidentEngine("sglang", model_path=model_dir, device="cpu")
    b = ResidentEngine("sglang", model_path=model_dir, device="cpu")
    assert a.vlm_config()["server_url"] != b.vlm_config()["server_url"]
    assert a.vlm_config()["api_key"] != b.vlm_config()["api_key"]


def _sglang_parser() -> argparse.ArgumentParser:
    """The flags of sglang 0.5.23's ServerArgs that the engine passes, with their argparse actions.

    Read off sglang/srt/arg_groups/fields/*.py: model_path (alias --model), host, port,
    mem_fraction_static (Optional[float]), enable_memory_saver (bool, so store_true),
    device (Optional[str]), base_gpu_id (int), served_model_name, and --config (server_args.py).
    SGLang's parser rejects unknown flags, so each flag here must be one of its own.
    """
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model-path", "--model", dest="model_path", required=True)
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--enable-weights-cpu-backup", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--base-gpu-id", type=int)
    parser.add_argument("--served-model-name")
    parser.add_argument("--config")
    return parser


def test_sglang_command_line_matches_sglang_server_args(tmp_path: Path) -> None:
    argv = build_sglang_argv(
        model_path="/models/MinerU2.5",
        port=31234,
        config_path=tmp_path / "k.yaml",
        device="cuda:1",
        mem_fraction=0.1,
        served_model_name="mineru",
        extra_args=["--log-level", "warning"],
        python="/opt/sglang/bin/python",
    )
    assert argv[:3] == ["/opt/sglang/bin/python", "-m", "sglang.launch_server"]
    args, rest = _sglang_parser().parse_known_args(argv[3:])
    assert rest == ["--log-level", "warning"]
    assert args.model_path == "/models/MinerU2.5"
    assert args.host == "127.0.0.1"
    assert args.port == 31234
    assert args.mem_fraction_static == pytest.approx(0.1)
    assert args.enable_memory_saver is True
    assert args.enable_weights_cpu_backup is True, "without it SGLang's wake brings back garbage weights"
    assert (args.device, args.base_gpu_id) == ("cuda", 1)
    assert args.served_model_name == "mineru"
    assert args.config == str(tmp_path / "k.yaml")
    assert "--api-key" not in argv, "the key travels in the 0600 --config file, not on the command line"


def test_cpu_command_line_has_no_gpu_flags(tmp_path: Path) -> None:
    argv = build_sglang_argv(model_path="m", port=1, config_path=tmp_path / "k.yaml", device="cpu", mem_fraction=None)
    args = _sglang_parser().parse_args(argv[3:])
    assert args.device == "cpu"
    assert args.base_gpu_id is None
    assert args.mem_fraction_static is None


@pytest.mark.parametrize(
    ("budget_gib", "total_gib", "fraction"),
    [(8, 80, 0.1), (8, 79.6, 0.1), (10, 94.0, 0.106), (1, 24, 0.041)],
)
def test_budget_becomes_a_fraction_of_the_total_rounded_down(
    model_dir: Path, budget_gib: float, total_gib: float, fraction: float
) -> None:
    engine = ResidentEngine(
        "sglang",
        model_path=model_dir,
        device="cuda:0",
        vram_budget_gib=budget_gib,
        probe=card(total_gib=total_gib),
        launcher=RefusingLauncher(),
    )
    engine._preflight()
    engine._release_reservation()  # the preflight reserved the budget in the ledger; nothing runs
    assert engine.mem_fraction_static == pytest.approx(fraction)
    assert engine.mem_fraction_static * total_gib <= budget_gib
    argv = engine._backend.argv(engine._context())  # type: ignore[attr-defined]
    assert argv[argv.index("--mem-fraction-static") + 1] == f"{fraction:.3f}"


def test_budget_above_the_card_is_a_configuration_error(model_dir: Path) -> None:
    engine = ResidentEngine(
        "sglang", model_path=model_dir, device="cuda:0", vram_budget_gib=96, probe=card(total_gib=80)
    )
    with pytest.raises(mv.ConfigurationError, match=r"98304 MiB is not below the device's total 81920 MiB"):
        engine._preflight()


def test_budget_on_cpu_is_a_configuration_error(model_dir: Path) -> None:
    with pytest.raises(mv.ConfigurationError, match="needs a GPU"):
        ResidentEngine("sglang", model_path=model_dir, device="cpu", vram_budget_gib=8)


def test_preflight_says_what_is_missing_and_launches_nothing(model_dir: Path) -> None:
    holders = (ProcessMemory(pid=4242, used_mib=70 * 1024, name="python"),)
    launcher = RefusingLauncher()
    engine = ResidentEngine(
        "sglang",
        model_path=model_dir,
        device="cuda:0",
        vram_budget_gib=8,
        headroom_gib=1,
        probe=card(total_gib=80, free_gib=5.5, holders=holders),
        launcher=launcher,
    )
    with pytest.raises(mv.EngineStartError) as info:
        engine.start()
    message = str(info.value)
    assert "needs 8.0 GiB plus 1 GiB headroom = 9.0 GiB" in message
    assert "5.5 GiB free of 80.0 GiB" in message
    assert "pid 4242 (python) 70.0 GiB" in message
    assert info.value.free_mib == pytest.approx(5.5 * 1024)  # type: ignore[attr-defined]
    assert launcher.argv == []
    assert engine.state is EngineState.CRASHED
    assert "needs 8.0 GiB" in (engine.status().last_error or "")


def test_preflight_refuses_weights_larger_than_the_budget(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as fh:
        fh.truncate(3 * 1024 * 1024 * 1024)  # a sparse 3 GiB file
    engine = ResidentEngine(
        "sglang", model_path=big, device="cuda:0", vram_budget_gib=2, probe=card(), launcher=RefusingLauncher()
    )
    with pytest.raises(mv.EngineStartError, match=r"weights \(3.0 GiB on disk\) do not fit"):
        engine.start()


# --- budget= and admission through the ledger (issue #6) ----------------------------------------


def _ledger_needs(ledger: Ledger) -> list[float]:
    return sorted(e.need_mib for e in ledger.snapshot(device_key("cuda:0")))


def test_a_budget_sizes_sglang_and_is_reserved_in_the_ledger(model_dir: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "runtime")
    engine = ResidentEngine(
        "sglang",
        model_path=model_dir,
        device="cuda:0",
        budget=mv.VramBudget(fraction=0.25),
        probe=card(total_gib=80),
        ledger=ledger,
        launcher=RefusingLauncher(),
    )
    engine._preflight()
    assert engine.mem_fraction_static == pytest.approx(0.25)
    assert _ledger_needs(ledger) == [pytest.approx(20 * 1024)]
    engine._preflight()  # a restart keeps the reservation it holds: no second entry
    assert len(_ledger_needs(ledger)) == 1
    engine._release_reservation()
    assert _ledger_needs(ledger) == []


def test_admission_counts_other_processes_reservations_and_times_out_typed(model_dir: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "runtime")
    probe = card(total_gib=80, free_gib=75)
    rival = admit(mv.VramBudget(mib=70 * 1024, probe=probe, timeout=0), "cuda:0", ledger=ledger, what="rival")
    launcher = RefusingLauncher()
    engine = ResidentEngine(
        "sglang",
        model_path=model_dir,
        device="cuda:0",
        budget=mv.VramBudget(mib=8 * 1024, timeout=0.3, poll_interval=0.05),
        headroom_gib=1,
        probe=probe,
        ledger=ledger,
        launcher=launcher,
    )
    t0 = time.monotonic()
    with pytest.raises(mv.EngineAdmissionError) as info:
        engine.start()
    rival.release()
    assert time.monotonic() - t0 >= 0.3  # it waited for its timeout before giving up
    assert isinstance(info.value, mv.AdmissionTimeoutError)
    assert isinstance(info.value, mv.EngineStartError)
    message = str(info.value)
    assert "within 0.3 s" in message
    assert "75.0 GiB free of 80.0 GiB, of which other mineru-vram processes reserved 70.0 GiB" in message
    assert info.value.reserved_mib == pytest.approx(70 * 1024)  # type: ignore[attr-defined]
    assert launcher.argv == []
    assert _ledger_needs(ledger) == []
    assert engine.state is EngineState.CRASHED


def test_admission_waits_until_a_rival_releases(model_dir: Path, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "runtime")
    probe = card(total_gib=80, free_gib=75)
    rival = admit(mv.VramBudget(mib=70 * 1024, probe=probe, timeout=0), "cuda:0", ledger=ledger, what="rival")
    engine = ResidentEngine(
        "sglang",
        model_path=model_dir,
        device="cuda:0",
        budget=mv.VramBudget(mib=8 * 1024, timeout=10, poll_interval=0.05),
        probe=probe,
        ledger=ledger,
        launcher=RefusingLauncher(),
    )
    timer = threading.Timer(0.4, rival.release)
    timer.start()
    t0 = time.monotonic()
    try:
        engine._preflight()
    finally:
        timer.join()
    assert 0.35 <= time.monotonic() - t0 < 5
    assert _ledger_needs(ledger) == [pytest.approx(8 * 1024)]
    engine._release_reservation()


class EnvRecordingLauncher:
    """Stand-in launcher: keeps the environment the server would get, then refuses to run it."""

    def __init__(self) -> None:
        self.env: dict[str, str] = {}

    def __call__(self, argv: Any, *, env: Any, log_path: Path, cwd: Path) -> Any:
        self.env = dict(env)
        raise OSError("this test launches nothing")


def test_a_transformers_budget_reaches_minerus_sizing_hint_and_is_released_on_failure(
    model_dir: Path, tmp_path: Path
) -> None:
    ledger = Ledger(tmp_path / "runtime")
    launcher = EnvRecordingLauncher()
    engine = ResidentEngine(
        "transformers",
        model_path=model_dir,
        device="cuda:0",
        budget="6GiB",
        probe=card(total_gib=80),
        ledger=ledger,
        launcher=launcher,
    )
    with pytest.raises(OSError, match="launches nothing"):
        engine.start()
    assert launcher.env["MINERU_VIRTUAL_VRAM_SIZE"] == "6"
    assert _ledger_needs(ledger) == []  # a failed start gives its reservation back
    assert engine.state is EngineState.CRASHED


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"engine": "sglang", "budget": 8192, "vram_budget_gib": 8}, "one of them"),
        ({"engine": "sglang", "budget": 8192, "mem_fraction": 0.1}, "one of them"),
        ({"engine": "sglang", "budget": "lots"}, "budget 'lots'"),
        ({"engine": "sglang", "budget": 8192, "device": "cpu"}, "needs a GPU"),
        ({"engine": "transformers", "vram_budget_gib": 8}, r"budget= is"),
    ],
)
def test_bad_engine_budgets_are_configuration_errors(model_dir: Path, kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("device", "cuda:0")
    with pytest.raises(mv.ConfigurationError, match=match):
        ResidentEngine(model_path=model_dir, **kwargs)


def test_an_attached_server_takes_no_budget() -> None:
    with pytest.raises(mv.ConfigurationError, match="attached server is not started here"):
        ResidentEngine("attach", url="http://127.0.0.1:9", budget=8192)


def test_get_compares_budgets(model_dir: Path) -> None:
    engine = ResidentEngine("sglang", model_path=model_dir, device="cuda:0", budget=mv.VramBudget(mib=8192))
    assert engine._differences({"budget": 8192}) == []
    (difference,) = engine._differences({"budget": "25%"})
    assert difference.startswith("budget: running VramBudget(mib=8192")


def test_a_move_below_nvml_resolution_is_not_waited_for(model_dir: Path) -> None:
    holders = (ProcessMemory(pid=4242, used_mib=688.0, name="python"),)
    engine = ResidentEngine("sglang", model_path=model_dir, device="cuda:0", probe=card(holders=holders))
    engine._backend.pids = lambda: [4242]  # type: ignore[method-assign]
    t0 = time.monotonic()
    after, _, confirmed = engine._settle(688.0, direction=+1, timeout=5.0, expect_mib=0.7)
    assert (after, confirmed) == (688.0, None)  # NVML cannot tell, and it is not asked to
    assert time.monotonic() - t0 < 1.0
    # A move the server says is large, which NVML does not show, is waited for and reported unconfirmed.
    after, _, confirmed = engine._settle(688.0, direction=+1, timeout=0.3, expect_mib=54.0)
    assert (after, confirmed) == (688.0, False)


def test_memory_report_arithmetic_and_text() -> None:
    report = MemoryReport("sleep", 0.25, 6000.0, 500.0, 10.0, 5510.0, True)
    assert report.freed_mib == 5500.0
    assert report.to_dict()["freed_mib"] == 5500.0
    assert "6000 MiB -> 500 MiB in 250 ms (confirmed by NVML)" in str(report)
    assert MemoryReport("wake", 0.0, None, None).freed_mib is None
    assert "NVML cannot tell" in str(MemoryReport("wake", 0.0, None, None))


@pytest.mark.parametrize("state", list(EngineState))
def test_each_state_decides_what_the_engine_allows(model_dir: Path, state: EngineState) -> None:
    engine = ResidentEngine("sglang", model_path=model_dir, device="cpu", launcher=RefusingLauncher())
    engine._state = state  # what the lifecycle would have led to; nothing runs
    running = state in (EngineState.READY, EngineState.SLEEPING)
    assert engine.is_running() is running
    if state is EngineState.SLEEPING:
        assert engine.sleep().note == "already sleeping"
    elif state is not EngineState.READY:
        with pytest.raises(mv.EngineStateError, match=f"cannot sleep: the engine is {state.value}$"):
            engine.sleep()
    if state is EngineState.READY:
        assert engine.wake().note == "already awake"
    elif state is not EngineState.SLEEPING:
        with pytest.raises(mv.EngineStateError, match=f"cannot wake: the engine is {state.value}$"):
            engine.wake()
    if running:
        assert engine.start() is engine  # idempotent while it runs: launches nothing
    status = engine.status().to_dict()
    assert status["state"] == state.value
    assert json.loads(json.dumps(status))["state"] == state.value  # a status is plain JSON
    engine._state = EngineState.NEW
    engine.stop()


def test_a_stopped_engine_refuses_every_use(model_dir: Path) -> None:
    engine = ResidentEngine("sglang", model_path=model_dir, device="cpu", launcher=RefusingLauncher())
    engine.stop()
    for use in (engine.start, engine.sleep, engine.wake):
        with pytest.raises(mv.EngineStateError):
            use()
    with pytest.raises(mv.EngineStateError, match="stopped"), engine.lease():
        pass


# --- the one list of settings ---------------------------------------------------------------------


def test_the_public_signature_takes_every_setting_with_the_settings_default() -> None:
    params = inspect.signature(ResidentEngine.__init__).parameters
    collaborators = {"self", "api_key", "launcher", "probe", "ledger"}
    assert set(params) - collaborators == set(SETTING_NAMES)
    for field in dataclasses.fields(EngineSettings):
        assert params[field.name].default == field.default, field.name


def test_settings_resolve_to_a_fixed_point_and_refuse_unknown_names(model_dir: Path) -> None:
    settings = EngineSettings.resolve(
        engine="SGLang", model_path=model_dir, device=0, keep_alive="10m", budget="8GiB", start_timeout=5
    )
    assert (settings.engine, settings.device, settings.keep_alive) == ("sglang", "cuda:0", 600.0)
    assert settings.budget == mv.VramBudget(mib=8192)
    assert isinstance(settings.start_timeout, float)
    assert EngineSettings.resolve(settings) == settings
    assert EngineSettings.resolve(settings, keep_alive=None).keep_alive is None
    with pytest.raises(TypeError, match="unexpected engine setting"):
        EngineSettings.resolve(settings, keepalive=1)


def test_sglang_is_given_a_health_timeout_its_health_check_fits_in(model_dir: Path) -> None:
    # SGLang's /health answers after a second at least, and its own limit (one second at least)
    # must end, with a second to spare for its once-a-second poll and one for the reply, before ours.
    for short in (0.5, 2.5):
        with pytest.raises(mv.ConfigurationError, match=rf"health_timeout={short}: .* at least 3 s"):
            ResidentEngine("sglang", model_path=model_dir, device="cpu", health_timeout=short)
    assert ResidentEngine("sglang", model_path=model_dir, device="cpu", health_timeout=3)
    assert ResidentEngine("transformers", model_path=model_dir, device="cpu", health_timeout=0.5)


@pytest.mark.parametrize("health_timeout", [3, 3.9, 20, 61.5])
def test_sglangs_own_health_limit_ends_inside_our_health_timeout(model_dir: Path, health_timeout: float) -> None:
    """SGLang answers /health 503 after SGLANG_HEALTH_CHECK_TIMEOUT (20 s unless told); our wait must be longer.

    Its handler checks for the generation's reply once a second, so its 503 can come up to a
    second after its limit; with our wait equal to its limit (20 s each, by default) the two race.
    """
    launcher = EnvRecordingLauncher()
    engine = ResidentEngine(
        "sglang", model_path=model_dir, device="cpu", health_timeout=health_timeout, launcher=launcher
    )
    with pytest.raises(OSError, match="launches nothing"):
        engine.start()
    limit = launcher.env["SGLANG_HEALTH_CHECK_TIMEOUT"]
    assert limit.isdigit(), "SGLang reads it with int()"
    assert int(limit) >= 1, "SGLang's check needs a second at least"
    assert int(limit) + 1 < health_timeout, "SGLang's answer must come before our wait ends"
    assert int(limit) >= health_timeout - 3, "SGLang's own check gets all the time we can give it"


def test_sglang_says_at_start_that_it_drops_minerus_repetition_guard(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = ResidentEngine("sglang", model_path=model_dir, device="cpu", launcher=EnvRecordingLauncher())
    with caplog.at_level("WARNING", logger="mineru_vram"):
        for _ in range(2):
            with pytest.raises(OSError, match="launches nothing"):
                engine.start()
    warned = [r for r in caplog.records if "no_repeat_ngram_size" in r.getMessage()]
    assert len(warned) == 1, "said once per engine, at its first start"
    assert "engine='vllm' applies it" in warned[0].getMessage()
    caplog.clear()
    vllm = ResidentEngine("vllm", model_path=model_dir, device="cuda:0", probe=card(), launcher=EnvRecordingLauncher())
    with caplog.at_level("WARNING", logger="mineru_vram"), pytest.raises(OSError, match="launches nothing"):
        vllm.start()
    assert not [r for r in caplog.records if "no_repeat_ngram_size" in r.getMessage()]
