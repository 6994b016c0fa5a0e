"""ResidentEngine's supervisor against real processes, and sessions parsing through it.

SGLang cannot be installed here, so the "sglang" engine is driven against the
SGLang STAND-IN (``mineru_vram.testing._standin``): a real HTTP server process on
loopback that speaks the SGLang endpoints the engine uses, with faults injected
by environment variables. It is not SGLang; ``tests/gpu/test_sglang_real.py``
runs the real one where it is installed. The transformers engine runs for real
on CPU with a tiny random Qwen2-VL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import mineru_vram as mv
from mineru_vram import testing
from mineru_vram._budget import Ledger, admit, device_key
from mineru_vram._engine import EngineState, ResidentEngine, http
from mineru_vram._probe import DeviceMemory
from mineru_vram.testing._standin import STANDIN_TEXT, StandinLauncher
from support import alive, all_gone, as_nobody, needs_root, wait_for

Factory = Callable[..., ResidentEngine]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """What the stand-in is told to serve (it loads nothing from it)."""
    folder = tmp_path / "MinerU2.5-standin"
    folder.mkdir()
    return folder


@pytest.fixture
def make_engine(model_dir: Path) -> Iterator[Factory]:
    """Builds sglang engines on the stand-in; stops every one at teardown."""
    made: list[ResidentEngine] = []

    def make(launcher: StandinLauncher | None = None, **kwargs: Any) -> ResidentEngine:
        kwargs.setdefault("model_path", model_dir)
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("start_timeout", 30)
        kwargs.setdefault("restart_backoff", 0.05)
        engine = ResidentEngine("sglang", launcher=launcher or StandinLauncher(), **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.stop()
    testing.reset()


def _standin_processes() -> list[psutil.Process]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "mineru_vram.testing._standin" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _stats(engine: ResidentEngine) -> dict[str, Any]:
    status, body = http.request("GET", f"{engine.url}/standin/stats", api_key=engine.vlm_config()["api_key"])
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def _chat(engine: ResidentEngine, prompt: str = "\nText Recognition:", timeout: float = 30) -> int:
    payload = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}
    key = engine.vlm_config()["api_key"]
    return http.request("POST", f"{engine.url}/v1/chat/completions", api_key=key, body=payload, timeout=timeout)[0]


# --- start, status, stop ------------------------------------------------------------------------


def test_start_status_and_stop_leave_no_process(make_engine: Factory, model_dir: Path) -> None:
    launcher = StandinLauncher()
    engine = make_engine(launcher)
    assert engine.start() is engine
    status = engine.status()
    assert status.state is EngineState.READY
    assert status.url == engine.url
    assert status.model == str(model_dir)
    assert status.restarts == 0
    assert status.in_flight == 0
    assert status.memory_mib is None  # no GPU here: NVML cannot tell, and says so
    server = psutil.Process(status.pid)
    keeper = server.parent()
    assert keeper is not None
    assert os.getpgid(server.pid) == keeper.pid != os.getpgid(0), "the server runs in its own process group"
    assert len(launcher.launches) == 1
    log = Path(status.log_path or "")
    assert "fired up and ready" in log.read_text()
    key_file = log.parent / "server-config.yaml"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert engine.vlm_config()["api_key"] not in " ".join(server.cmdline())

    engine.stop()
    assert engine.state is EngineState.STOPPED
    assert all_gone([server.pid, keeper.pid], timeout=2)
    assert not log.parent.exists(), "stop removes the key file and the log folder"
    assert _standin_processes() == []
    assert engine.stop() is engine.last_report  # idempotent
    with pytest.raises(mv.EngineStateError, match="stopped"), engine.lease():
        pass


def test_readiness_timeout_reports_the_log_tail(make_engine: Factory) -> None:
    engine = make_engine(StandinLauncher({"never_ready": True}), start_timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(mv.EngineStartError) as info:
        engine.start()
    assert 1.0 <= time.monotonic() - t0 < 10
    assert "did not become ready within 1 s" in str(info.value)
    assert "stand-in: never ready" in info.value.log_tail  # type: ignore[attr-defined]
    assert engine.state is EngineState.CRASHED
    assert wait_for(lambda: _standin_processes() == [], 5)


def test_a_server_that_exits_at_start_fails_fast_with_its_exit_code(make_engine: Factory) -> None:
    engine = make_engine(StandinLauncher({"exit_at_start": 3}))
    t0 = time.monotonic()
    with pytest.raises(mv.EngineStartError, match="exited with code 3 while starting") as info:
        engine.start()
    assert time.monotonic() - t0 < 10
    assert info.value.exitcode == 3  # type: ignore[attr-defined]
    assert "cannot load" in info.value.log_tail  # type: ignore[attr-defined]


def test_the_key_sglang_logs_never_reaches_our_errors(make_engine: Factory) -> None:
    # SGLang logs server_args, the API key in clear, before it loads the model; the stand-in does too.
    engine = make_engine(StandinLauncher({"exit_at_start": 3}))
    key = engine.vlm_config()["api_key"]
    with pytest.raises(mv.EngineStartError) as info:
        engine.start()
    log = Path(engine.status().log_path or "")
    assert f"'api_key': '{key}'" in log.read_text(), "the server's own log has it (a 0700 folder)"
    tail = info.value.log_tail  # type: ignore[attr-defined]
    assert "'api_key': '<redacted>'" in tail
    for surfaced in (str(info.value), tail, engine.status().last_error or ""):
        assert key not in surfaced


def test_a_log_tail_cut_inside_a_key_shows_none_of_it(model_dir: Path) -> None:
    """The tail is the log's last characters: its first line may begin inside a key."""
    from mineru_vram import _process
    from mineru_vram._engine.backends.server import LOG_TAIL_CHARS

    # One line whose last LOG_TAIL_CHARS characters begin 9 characters before the end of the key.
    child = textwrap.dedent(
        f"""
        import json, sys
        key = json.load(open(sys.argv[1]))["api-key"]
        sys.stdout.write("server_args=" + key + "Z" * ({LOG_TAIL_CHARS} - 10) + "\\n")
        sys.exit(1)
        """
    )

    def launcher(argv: Any, *, env: Any, log_path: Path, cwd: Path) -> Any:
        config = argv[argv.index("--config") + 1]
        return _process.spawn([sys.executable, "-c", child, config], env=env, log_path=log_path, cwd=cwd)

    engine = ResidentEngine("sglang", model_path=model_dir, device="cpu", launcher=launcher)
    key = engine.vlm_config()["api_key"]
    try:
        with pytest.raises(mv.EngineStartError, match="exited with code 1") as info:
            engine.start()
    finally:
        engine.stop()
    assert key[-9:] not in str(info.value)
    assert key[-9:] not in info.value.log_tail  # type: ignore[attr-defined]


# --- crash, hang, restart -----------------------------------------------------------------------


def test_a_crashed_server_is_restarted_on_the_same_url(make_engine: Factory) -> None:
    launcher = StandinLauncher([{"crash_after": 0}, {}])
    engine = make_engine(launcher, health_interval=0.2)
    engine.start()
    first_pid = engine.status().pid
    url = engine.url
    first_key = engine.vlm_config()["api_key"]
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        _chat(engine)  # the stand-in exits on purpose while answering
    assert wait_for(lambda: engine.restarts == 1 and engine.state is EngineState.READY, 15)
    status = engine.status()
    assert status.pid != first_pid
    assert engine.url == url
    assert len(launcher.launches) == 2
    assert "exited with code 70" in (status.last_error or "")
    assert "crashing on purpose" in (status.last_error or "")
    assert "'api_key': '<redacted>'" in (status.last_error or ""), "the first server logged its key, as SGLang does"
    assert first_key not in (status.last_error or "")
    assert _chat(engine) == 200
    # Each launch has its own key: one that leaked from the first server opens nothing on the second.
    assert engine.vlm_config()["api_key"] != first_key
    assert http.request("GET", f"{engine.url}/v1/models", api_key=first_key)[0] == 401


def test_callers_get_a_typed_error_not_a_hang(make_engine: Factory) -> None:
    launcher = StandinLauncher({"crash_after": 0})
    engine = make_engine(launcher, max_restarts=0)
    engine.start()

    def parse_through(lease_of: ResidentEngine) -> None:
        with lease_of.lease():
            try:
                _chat(lease_of)
            except OSError as exc:  # what MinerU's adapter does with any failure inside MinerU
                raise mv.ParseError("doc.pdf: MinerU failed", document="doc.pdf") from exc

    with pytest.raises(mv.EngineCrashedError, match="crashed during the parse") as info:
        parse_through(engine)
    assert isinstance(info.value.__cause__, mv.ParseError)
    assert wait_for(lambda: engine.state is EngineState.CRASHED, 10)
    t0 = time.monotonic()
    with pytest.raises(mv.EngineCrashedError, match="is down"), engine.lease():
        pass
    assert time.monotonic() - t0 < 1
    engine.start()  # an explicit start tries again
    assert engine.state is EngineState.READY
    assert len(launcher.launches) == 2


def test_a_hung_server_is_killed_and_restarted(make_engine: Factory) -> None:
    engine = make_engine(
        StandinLauncher([{"hang_after": 0}, {}]), health_interval=0.2, health_timeout=3, health_failures=2
    )
    engine.start()
    outcome: list[BaseException | int] = []

    def request() -> None:
        try:
            outcome.append(_chat(engine, timeout=60))
        except OSError as exc:
            outcome.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=request)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "a request to a hung server must end when the supervisor kills it"
    assert time.monotonic() - t0 < 20
    assert isinstance(outcome[0], OSError)
    assert wait_for(lambda: engine.restarts == 1 and engine.state is EngineState.READY, 15)
    assert "health checks in a row (hung)" in (engine.status().last_error or "")
    # The hung server's checks ended in SGLang's own 503, within the limit the engine gave it (3 s -> 1 s).
    log = Path(engine.status().log_path or "").read_text()
    assert "Health check failed. Server couldn't get a response from detokenizer for last 1 seconds" in log
    assert _chat(engine) == 200


def test_a_server_killed_while_asleep_comes_back_asleep(make_engine: Factory) -> None:
    launcher = StandinLauncher()
    engine = make_engine(launcher, health_interval=0.2)
    engine.start()
    engine.sleep()
    victim = engine.status().pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)  # a real crash: the OOM killer, a driver fault
    assert wait_for(lambda: engine.restarts == 1 and engine.state is EngineState.SLEEPING, 15)
    assert engine.status().pid != victim
    assert len(launcher.launches) == 2
    assert [c["call"] for c in _stats(engine)["calls"]] == ["release"], "the new server was put back to sleep"
    assert "exited with code" in (engine.status().last_error or "")


# --- another user on the same machine -------------------------------------------------------------

# A squatter: listens on the port it is given, answers every request as a healthy OpenAI server
# would, and prints what it received.
_SQUATTER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("up", flush=True)
answer = b'{"data": [{"id": "squatted"}]}'
while True:
    conn, _ = s.accept()
    conn.settimeout(2)
    try:
        print(repr(conn.recv(65536)), flush=True)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\nConnection: close\\r\\n"
                     b"Content-Length: %d\\r\\n\\r\\n%s" % (len(answer), answer))
    except OSError:
        pass
    conn.close()
"""


class SquattingLauncher(StandinLauncher):
    """Lets the user nobody bind the engine's port just before a launch: the race a free port leaves.

    Args:
        times: how many launches, from the first, find their port taken.
    """

    def __init__(self, times: int = 1) -> None:
        super().__init__()
        self.times = times
        self.squatters: list[Any] = []
        self.ports: list[int] = []

    def __call__(self, argv: Any, *, env: Any, log_path: Path, cwd: Path | None = None) -> Any:
        if len(self.squatters) < self.times:
            port = int(argv[argv.index("--port") + 1])
            squatter = as_nobody([sys.executable, "-I", "-c", _SQUATTER, str(port)], wait=False)
            self.squatters.append(squatter)
            self.ports.append(port)
            assert squatter.stdout.readline().strip() == "up"
        return super().__call__(argv, env=env, log_path=log_path, cwd=cwd)

    def heard(self) -> str:
        """Stop the squatters; everything they received."""
        out = []
        for squatter in self.squatters:
            squatter.kill()
            out.append(squatter.stdout.read())
            squatter.wait(10)
            squatter.stdout.close()
        return "".join(out)


@needs_root
def test_a_port_another_user_holds_is_never_sent_the_key(make_engine: Factory) -> None:
    launcher = SquattingLauncher()
    engine = make_engine(launcher)
    try:
        engine.start()
        key = engine.vlm_config()["api_key"]
        assert engine.state is EngineState.READY
        assert engine.url != f"http://127.0.0.1:{launcher.ports[0]}", "the engine moved to a port of its own"
        assert len(launcher.launches) == 2
        assert _chat(engine) == 200
        assert _stats(engine)["pid"] == engine.status().pid, "the server answering is ours"
    finally:
        heard = launcher.heard()
    assert key not in heard
    assert heard == "", f"requests were sent to another user's port: {heard}"


@needs_root
def test_a_start_whose_every_port_is_taken_fails_typed_and_sends_nothing(make_engine: Factory) -> None:
    launcher = SquattingLauncher(times=3)
    engine = make_engine(launcher)
    try:
        with pytest.raises(mv.EngineStartError, match="held by a process that is not ours") as info:
            engine.start()
    finally:
        heard = launcher.heard()
    assert info.value.ports == launcher.ports  # type: ignore[attr-defined]
    assert heard == ""
    assert engine.state is EngineState.CRASHED
    assert wait_for(lambda: _standin_processes() == [], 5)


def test_a_server_that_hangs_while_asleep_is_found_and_replaced_asleep(make_engine: Factory) -> None:
    launcher = StandinLauncher([{"hang_asleep": True}, {}])
    engine = make_engine(launcher, health_interval=0.2, health_timeout=3, health_failures=2)
    engine.start()
    engine.sleep()
    hung = engine.status().pid
    assert wait_for(lambda: engine.restarts == 1 and engine.state is EngineState.SLEEPING, 15)
    assert engine.status().pid != hung
    assert "health checks in a row (hung)" in (engine.status().last_error or "")
    assert [c["call"] for c in _stats(engine)["calls"]] == ["release"], "the new server was put back to sleep"
    with engine.lease():  # the next parse wakes the new server, and does not wait on the hung one
        assert _chat(engine) == 200


# --- sleep, wake, keep-alive --------------------------------------------------------------------


def test_sleep_and_wake_use_sglangs_memory_endpoints(make_engine: Factory) -> None:
    engine = make_engine()
    engine.start()
    report = engine.sleep()
    assert engine.state is EngineState.SLEEPING
    assert report.action == "sleep"
    assert report.confirmed is None  # no NVML on this machine: nothing to confirm, and it says so
    stats = _stats(engine)
    assert stats["released"] is True
    assert stats["calls"] == [{"call": "release", "tags": None, "running": 0}]
    assert engine.sleep().note == "already sleeping"
    assert engine.wake().action == "wake"
    assert engine.state is EngineState.READY
    assert [c["call"] for c in _stats(engine)["calls"]] == ["release", "resume"]
    assert engine.wake().note == "already awake"

    engine.sleep()
    with engine.lease() as config:  # the next request wakes it
        assert engine.state is EngineState.READY
        assert config == engine.vlm_config()
        assert _chat(engine) == 200
    assert [c["call"] for c in _stats(engine)["calls"]] == ["release", "resume", "release", "resume"]


def test_an_sglang_health_check_that_takes_seconds_is_not_a_hang(make_engine: Factory) -> None:
    # SGLang's /health runs a generation and answers after a second at least; this one takes 2.5 s.
    engine = make_engine(StandinLauncher({"health_delay": 2.5}), health_timeout=5, health_interval=0.2)
    engine.start()
    # Three supervision checks, each longer than the readiness probe used to wait.
    assert wait_for(lambda: _stats(engine)["counts"].get("/health", 0) >= 3, 30)
    assert engine.restarts == 0
    assert engine.state is EngineState.READY


def test_sglang_readiness_is_ready_not_a_health_generation(make_engine: Factory) -> None:
    # SGLang's /health can take up to its own limit (20 s by default); /ready answers at once once warm.
    engine = make_engine(StandinLauncher({"health_delay": 8}), health_timeout=3, health_interval=600)
    engine.start()
    assert engine.state is EngineState.READY
    counts = _stats(engine)["counts"]
    assert counts.get("/ready", 0) >= 1
    assert counts.get("/health", 0) == 0, "readiness ran no generation"


def test_a_sleeping_sglang_is_asked_ready_never_health(make_engine: Factory) -> None:
    engine = make_engine(health_interval=0.1)
    engine.start()
    engine.sleep()
    asked = _stats(engine)["counts"].get("/ready", 0)
    # Health checks go on while asleep (a server that hangs asleep is found), on /ready: SGLang answers it
    # at once with its memory released, where /health would run a generation on that memory.
    assert wait_for(lambda: _stats(engine)["counts"].get("/ready", 0) >= asked + 3, 15)
    stats = _stats(engine)
    assert stats["released"] is True
    assert stats["health_while_released"] == 0
    assert engine.state is EngineState.SLEEPING


def test_a_wake_answers_as_the_engine_did_before_its_sleep(make_engine: Factory) -> None:
    engine = make_engine()
    engine.start()
    before = _answer(engine)
    engine.sleep()
    engine.wake()
    assert _answer(engine) == before, "the weights must come back as they were"
    assert _stats(engine)["weights_cpu_backup"] is True


def _answer(engine: ResidentEngine) -> str:
    payload = {"model": "m", "messages": [{"role": "user", "content": "\nText Recognition:"}]}
    status, body = http.request(
        "POST", f"{engine.url}/v1/chat/completions", api_key=engine.vlm_config()["api_key"], body=payload
    )
    assert status == 200, body
    return str(body["choices"][0]["message"]["content"])


def test_a_budgeted_engine_holds_its_reservation_only_while_awake(make_engine: Factory, tmp_path: Path) -> None:
    # The stand-in on "cuda:0" with NVML stood in for (this machine has no GPU): what is
    # tested is the ledger, which is real files and locks shared with other processes.
    def probe(device: str) -> DeviceMemory:
        return DeviceMemory(index=0, name="stand-in card", total_mib=81920.0, used_mib=5120.0, free_mib=76800.0)

    ledger = Ledger(tmp_path / "runtime")
    engine = make_engine(
        device="cuda:0",
        budget=mv.VramBudget(mib=8192, timeout=0.3, poll_interval=0.05),
        probe=probe,
        ledger=ledger,
        headroom_gib=0,
    )
    engine.start()
    (entry,) = ledger.snapshot(device_key("cuda:0"))
    assert entry.need_mib == 8192
    assert set(entry.pids) == set(engine._backend.pids()) != set()  # the server's growth spends it
    assert "--mem-fraction-static 0.100" in _standin_cmdlines()  # 8192 MiB of an 81920 MiB card

    engine.sleep()
    assert ledger.snapshot(device_key("cuda:0")) == []  # asleep: others may be admitted

    rival = admit(mv.VramBudget(mib=70000, probe=probe, timeout=0), "cuda:0", ledger=ledger, what="rival")
    with pytest.raises(mv.EngineAdmissionError, match=r"reserved 68\.4 GiB"):
        engine.wake()
    assert engine.state is EngineState.SLEEPING  # still asleep, still serving nothing, not broken
    assert [c["call"] for c in _stats(engine)["calls"]] == ["release"]  # resume was never asked for
    rival.release()

    engine.wake()
    assert engine.state is EngineState.READY
    assert [e.need_mib for e in ledger.snapshot(device_key("cuda:0"))] == [8192]
    engine.stop()
    assert ledger.snapshot(device_key("cuda:0")) == []


def test_a_vllm_engine_sleeps_and_wakes_through_vllms_endpoints(model_dir: Path) -> None:
    # The vLLM-flavoured STAND-IN (not vLLM): the real `vllm serve` command line and
    # environment, the sleep-mode endpoints vLLM serves in dev mode, /metrics for load.
    def probe(device: str) -> DeviceMemory:
        return DeviceMemory(index=0, name="stand-in card", total_mib=81920.0, used_mib=5120.0, free_mib=76800.0)

    engine = ResidentEngine(
        "vllm",
        model_path=model_dir,
        device="cuda:0",
        mem_fraction=0.2,
        probe=probe,
        launcher=StandinLauncher({"latency": 0.6}),
        start_timeout=30,
        headroom_gib=0,
    )
    try:
        engine.start()
        stats = _stats(engine)
        assert stats["flavor"] == "vllm"
        assert stats["logits_processors"] == ["mineru_vl_utils:MinerULogitsProcessor"]
        assert stats["api_key_required"] is True  # from VLLM_API_KEY: never on the command line
        assert stats["memory_saver"] is True  # --enable-sleep-mode
        cmdlines = _standin_cmdlines()
        assert "serve" in cmdlines
        assert "--gpu-memory-utilization 0.200" in cmdlines
        assert engine.vlm_config()["api_key"] not in cmdlines

        before = _answer(engine)
        results: list[int] = []
        thread = threading.Thread(target=lambda: results.append(_chat(engine)))
        thread.start()
        assert wait_for(lambda: engine._backend.busy(2.0), timeout=5)  # vllm:num_requests_running > 0
        thread.join(10)
        assert results == [200]
        assert not engine._backend.busy(2.0)

        engine.sleep()
        assert engine.state is EngineState.SLEEPING
        key = engine.vlm_config()["api_key"]
        assert http.request("GET", f"{engine.url}/is_sleeping", api_key=key)[1] == {"is_sleeping": True}
        engine.wake()
        assert engine.state is EngineState.READY
        calls = _stats(engine)["calls"]
        assert calls == [
            {"call": "sleep", "level": 1, "mode": "wait", "running": 0},
            {"call": "wake_up", "tags": None},
        ]
        assert _answer(engine) == before, "level-1 sleep keeps the weights: the same answer after the wake"
    finally:
        engine.stop()
    assert _standin_processes() == []


def _standin_cmdlines() -> str:
    return "\n".join(" ".join(proc.cmdline()) for proc in _standin_processes())


def test_sleep_waits_for_running_requests(make_engine: Factory) -> None:
    engine = make_engine(StandinLauncher({"latency": 0.8}))
    engine.start()
    in_lease = threading.Event()

    def parse() -> None:
        with engine.lease():
            in_lease.set()
            _chat(engine)

    thread = threading.Thread(target=parse)
    thread.start()
    assert in_lease.wait(5)
    t0 = time.monotonic()
    engine.sleep()
    assert time.monotonic() - t0 >= 0.5, "sleep must wait for the running request"
    thread.join(5)
    release = _stats(engine)["calls"][0]
    assert release == {"call": "release", "tags": None, "running": 0}


def test_keep_alive_puts_an_idle_engine_to_sleep_and_a_request_wakes_it(make_engine: Factory) -> None:
    engine = make_engine(keep_alive="300ms", health_interval=0.1)
    engine.start()
    t0 = time.monotonic()
    assert wait_for(lambda: engine.state is EngineState.SLEEPING, 10)
    assert time.monotonic() - t0 >= 0.25
    assert engine.status().idle_seconds >= 0.3
    assert engine.last_report is not None
    assert engine.last_report.action == "sleep"
    with engine.lease():
        assert engine.state is EngineState.READY
    assert [c["call"] for c in _stats(engine)["calls"]][:2] == ["release", "resume"]


def test_keep_alive_stop_unloads_and_the_next_request_starts_it_again(make_engine: Factory) -> None:
    launcher = StandinLauncher()
    engine = make_engine(launcher, keep_alive=0.3, keep_alive_action="stop", health_interval=0.1)
    engine.start()
    first = engine.status().pid
    url = engine.url
    assert wait_for(lambda: engine.state is EngineState.UNLOADED, 10)
    assert first is not None
    assert all_gone([first], 5)
    assert engine.status().pid is None
    with engine.lease():
        assert engine.state is EngineState.READY
        assert _chat(engine) == 200
    assert len(launcher.launches) == 2
    assert engine.url == url, "a restarted engine keeps its URL when the port is free"


# --- process lifetime -----------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import atexit, json, sys, time
    from mineru_vram._engine import ResidentEngine
    from mineru_vram.testing._standin import StandinLauncher

    holder = {}
    atexit.register(lambda: print("state at exit:", holder["engine"].state.value, flush=True))
    engine = holder["engine"] = ResidentEngine("sglang", model_path=sys.argv[1], device="cpu",
                                               launcher=StandinLauncher())
    engine.start()
    print(json.dumps(engine._backend.pids()), flush=True)
    if sys.argv[2] == "sleep":
        time.sleep(120)
    """
)


def test_killing_the_parent_leaves_no_orphan(model_dir: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(model_dir), "sleep"], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            pids = json.loads(child.stdout.readline())
            assert len(pids) == 2  # keeper and stand-in
            assert all(alive(p) for p in pids)
            child.send_signal(signal.SIGKILL)
            child.wait(10)
            assert all_gone(pids, timeout=5), f"orphans left after the parent was killed: {pids}"
        finally:
            child.kill()


def test_exiting_without_stop_runs_the_engines_atexit_hook(model_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model_dir), "exit"], capture_output=True, text=True, timeout=60, check=True
    )
    lines = out.stdout.splitlines()
    pids = json.loads(lines[0])
    assert lines[-1] == "state at exit: stopped"
    assert all_gone(pids, timeout=5)


_ABANDON = textwrap.dedent(
    """
    import sys, time
    from mineru_vram._engine import ResidentEngine
    from mineru_vram.testing._standin import StandinLauncher

    engine = ResidentEngine("sglang", model_path=sys.argv[1], device="cpu", runtime_dir=sys.argv[2],
                            launcher=StandinLauncher())
    engine.start()
    print(engine.status().log_path, flush=True)
    time.sleep(120)
    """
)


def test_runtime_folders_of_dead_owners_are_swept_at_the_next_start(
    make_engine: Factory, model_dir: Path, tmp_path: Path
) -> None:
    runtime = tmp_path / "runtime"
    with subprocess.Popen(
        [sys.executable, "-c", _ABANDON, str(model_dir), str(runtime)], stdout=subprocess.PIPE, text=True
    ) as child:
        try:
            assert child.stdout is not None
            abandoned = Path(child.stdout.readline().strip()).parent
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            child.kill()
    assert (abandoned / "server-config.yaml").is_file(), "SIGKILL left the folder, key file and all"
    engine = make_engine(runtime_dir=runtime)
    engine.start()
    own = Path(engine.status().log_path or "").parent
    assert not abandoned.exists(), "the folder of a dead owner is removed at the next start"
    assert oct(own.stat().st_mode & 0o777) == "0o700"
    make_engine(runtime_dir=runtime).start()
    assert own.is_dir(), "the folder of a live owner is kept"


def test_an_engine_started_inside_a_session_does_not_inherit_its_temporary_home(
    make_engine: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mineru_vram._adapter import MineruRuntime

    users_home = str(tmp_path / "users-mineru-home")
    monkeypatch.setenv("MINERU_HOME", users_home)
    monkeypatch.delenv("MINERU_CONFIG", raising=False)
    monkeypatch.delenv("MINERU_DEVICE_MODE", raising=False)
    runtime = MineruRuntime(device="cpu", models_dir=tmp_path)
    runtime.activate()  # what an open in-process session does to the environment
    try:
        session_home = os.environ["MINERU_HOME"]
        assert session_home != users_home
        engine = make_engine()
        engine.start()
        pid = engine.status().pid
        assert pid is not None
        seen = psutil.Process(pid).environ()
    finally:
        runtime.deactivate()
    assert not Path(session_home).exists(), "the session's home is gone once it closes"
    assert seen["MINERU_HOME"] == users_home
    assert "MINERU_CONFIG" not in seen
    assert "MINERU_DEVICE_MODE" not in seen


# --- the process-wide engine ----------------------------------------------------------------------


def test_32_threads_asking_at_once_start_exactly_one_engine(model_dir: Path) -> None:
    launcher = StandinLauncher({"start_delay": 0.5})
    barrier = threading.Barrier(32)
    got: list[ResidentEngine] = []
    errors: list[BaseException] = []

    def ask() -> None:
        barrier.wait()
        try:
            got.append(ResidentEngine.get(engine="sglang", model_path=model_dir, device="cpu", launcher=launcher))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(32)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        assert len(got) == 32
        assert len({id(e) for e in got}) == 1
        assert len(launcher.launches) == 1
        engine = got[0]
        assert engine.state is EngineState.READY
        assert ResidentEngine.current() is engine
        pid = engine.status().pid
    finally:
        testing.reset()
    assert ResidentEngine.current() is None
    assert engine.state is EngineState.STOPPED
    assert pid is not None
    assert all_gone([pid])


def test_asking_with_other_settings_names_each_difference(model_dir: Path, tmp_path: Path) -> None:
    launcher = StandinLauncher()
    try:
        engine = ResidentEngine.get(engine="sglang", model_path=model_dir, device="cpu", launcher=launcher)
        assert ResidentEngine.get() is engine
        assert ResidentEngine.get(model_path=str(model_dir), keep_alive=None) is engine
        with pytest.raises(ValueError, match="process-wide engine is running with other settings") as info:
            ResidentEngine.get(engine="sglang", model_path=tmp_path, keep_alive="10m", device="cpu")
        message = str(info.value)
        assert f"model_path: running '{model_dir}', asked '{tmp_path}'" in message
        assert "keep_alive: running None, asked 600.0" in message
        assert "device" not in message
        assert isinstance(info.value, mv.ConfigurationError)
        assert len(launcher.launches) == 1
        engine.stop()
        again = ResidentEngine.get(engine="sglang", model_path=tmp_path, device="cpu", launcher=launcher)
        assert again is not engine, "after stop(), get() creates a new engine"
    finally:
        testing.reset()


def test_get_after_a_failed_start_tries_a_new_engine(model_dir: Path) -> None:
    launcher = StandinLauncher([{"exit_at_start": 5}, {}])
    try:
        with pytest.raises(mv.EngineStartError, match="exited with code 5"):
            ResidentEngine.get(engine="sglang", model_path=model_dir, device="cpu", launcher=launcher)
        failed = ResidentEngine.current()
        assert failed is not None
        assert failed.state is EngineState.CRASHED
        engine = ResidentEngine.get(engine="sglang", model_path=model_dir, device="cpu", launcher=launcher)
        assert engine is not failed
        assert engine.state is EngineState.READY
        assert failed.state is EngineState.STOPPED
        assert len(launcher.launches) == 2
    finally:
        testing.reset()


def test_attach_uses_a_server_it_does_not_own(make_engine: Factory) -> None:
    owner = make_engine()
    owner.start()
    key = owner.vlm_config()["api_key"]
    attached = ResidentEngine.attach(owner.url + "/v1", api_key=key)
    assert attached.state is EngineState.READY
    assert attached.vlm_config()["server_url"] == owner.url + "/"
    assert attached.status().pid is None
    attached.sleep()  # an explicit sleep is allowed on a server someone else runs
    attached.wake()
    attached.stop()
    assert owner.state is EngineState.READY
    assert http.request("GET", f"{owner.url}/health")[0] == 200, "stopping an attached engine leaves the server running"
    with pytest.raises(mv.EngineStartError, match="refused the API key"):
        ResidentEngine.attach(owner.url, api_key="wrong-key", start_timeout=2)
    owner.stop()
    with pytest.raises(mv.EngineStartError, match="no OpenAI-compatible VLM server answered"):
        ResidentEngine.attach(owner.url, api_key=key, start_timeout=0.5)


# --- sessions on an engine ------------------------------------------------------------------------

_EXPECTED_STANDIN_MARKDOWN = f"## {STANDIN_TEXT}\n\n{STANDIN_TEXT}"


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # MinerU's http client and render workers
def test_vlm_session_parses_through_minerus_http_client(make_engine: Factory, random_models_dir: Path) -> None:
    owner = make_engine()
    owner.start()
    engine = ResidentEngine.attach(owner.url, api_key=owner.vlm_config()["api_key"])
    with mv.ModelSession("vlm", engine=engine, device="cpu", models_dir=random_models_dir) as session:
        result = session.parse(testing.make_pdf(1, table=False), ocr_mode="ocr")
        assert engine.status().in_flight == 0
    # The stand-in's layout (a title and a text block) and its text, through MinerU's VLM client.
    assert result.markdown.strip() == _EXPECTED_STANDIN_MARKDOWN
    assert result.backend == "vlm"
    assert _stats(owner)["counts"]["/v1/chat/completions"] >= 3  # layout, then each block
    assert session.release_report is not None
    assert session.release_report.models_alive == []
    assert engine.state is EngineState.READY, "closing a session never stops the shared engine"
    assert owner.state is EngineState.READY
    assert http.request("GET", f"{owner.url}/health")[0] == 200
    assert engine.status().idle_seconds < 60
    engine.stop()
    from mineru.model.vlm.runtime import ModelSingleton

    assert not [k for k in ModelSingleton._models if str(k[2]).startswith(owner.url)], (
        "stopping the engine drops MinerU's cached http client for it"
    )


@pytest.fixture(scope="module")
def random_vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.write_random_vlm(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl")


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # MinerU's http client and render workers
def test_transformers_engine_for_real_on_cpu(random_models_dir: Path, random_vlm_dir: Path) -> None:
    engine = ResidentEngine("transformers", model_path=random_vlm_dir, device="cpu", max_new_tokens=16)
    try:
        engine.start()
        status = engine.status()
        assert status.state is EngineState.READY
        assert status.model == random_vlm_dir.name
        assert status.pid is not None
        assert status.pid != os.getpid(), "MinerU's transformers engine runs in a child process of its own"
        server = psutil.Process(status.pid)
        assert "mineru_vram._vlm_serve" in " ".join(server.cmdline())
        seen = http.request("GET", f"{engine.url}/server_info", api_key=engine.vlm_config()["api_key"])[1]
        assert seen["max_new_tokens"] == 16
        with mv.ModelSession("hybrid", engine=engine, device="cpu", models_dir=random_models_dir) as session:
            result = session.parse(testing.make_pdf(1, table=False))
        assert result.page_count == 1
        assert result.backend == "hybrid"
        assert session.release_report is not None
        assert session.release_report.ok
        served = http.request("GET", f"{engine.url}/server_info", api_key=engine.vlm_config()["api_key"])[1]
        assert served["requests"].get("/v1/chat/completions", 0) >= 1, "MinerU's client reached the engine"
        assert engine.state is EngineState.READY, "closing the session leaves the engine loaded"
        assert server.is_running()
        assert engine.sleep().note.startswith("the transformers engine runs on CPU")
        assert engine.wake().action == "wake"
        _openai_client_against(engine)
        pids = engine._backend.pids()
    finally:
        engine.stop()
    assert engine.state is EngineState.STOPPED
    assert all_gone(pids)


def _openai_client_against(engine: ResidentEngine) -> None:
    """The real openai client against the real model: token counts, the limit, streaming, n."""
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
    key = engine.vlm_config()["api_key"]
    with openai.OpenAI(base_url=f"{engine.url}/v1", api_key=key, max_retries=0, timeout=120) as client:
        ask = {"model": engine.status().model, "messages": [{"role": "user", "content": "Text Recognition:"}]}
        cut = client.chat.completions.create(**ask, max_tokens=3, temperature=0)
        # Random weights rarely say the end token within three tokens; where they do, it is "stop".
        assert cut.usage.completion_tokens <= 3
        assert cut.choices[0].finish_reason == ("length" if cut.usage.completion_tokens == 3 else "stop")
        assert cut.usage.prompt_tokens > len(ask["messages"][0]["content"].split()), "the chat template's tokens"
        assert cut.usage.total_tokens == cut.usage.prompt_tokens + cut.usage.completion_tokens
        streamed = client.chat.completions.create(**ask, max_tokens=3, temperature=0, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        assert text == cut.choices[0].message.content, "greedy decoding: the same text either way"
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(**ask, n=2)
