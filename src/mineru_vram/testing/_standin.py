"""A STAND-IN for an SGLang or vLLM server, for tests: it is neither, and runs no model.

SGLang cannot be installed on the machines this project is tested on, so the
resident engine's supervisor (start, readiness, health, crash and restart,
sleep and wake, keep-alive, stop) is driven against this process instead. It is
a real HTTP server in a real child process on 127.0.0.1, started as::

    python -m mineru_vram.testing._standin --model-path P --host 127.0.0.1 --port N \\
        --mem-fraction-static 0.1 --enable-memory-saver --config key.yaml

It accepts the flags :class:`ResidentEngine` passes to ``sglang.launch_server``
(others are tolerated and ignored), reads the API key from the ``--config`` file
as SGLang does, enforces it like SGLang (every endpoint but ``/health*``,
``/ready`` and ``/metrics``), logs its ``server_args`` with the key in clear as
SGLang does, and implements the endpoints the engine and MinerU's http-client use:
``/ready`` (at once, no key: 200 once started, also while the memory is released;
503 while starting or after a failed ``/health``), ``/health``,
``/health_generate``, ``/server_info``, ``/model_info``, ``/v1/models``,
``/v1/chat/completions``, ``/v1/loads``, ``/flush_cache``,
``/release_memory_occupation`` and ``/resume_memory_occupation``. Its chat
completions are canned answers in the format MinerU's VLM client parses (a
small layout with a title and a text block, then text for each block), so a
``ModelSession`` parse goes end to end through MinerU's real http-client.

Memory: where torch and a CUDA device are present, it really allocates
``min(mem_fraction_static * total, cap)`` on the GPU at start, frees it on
release (only with ``--enable-memory-saver``, like SGLang, which silently does
nothing without it) and allocates it again on resume, so NVML sees sleep and
wake. On CPU it only reports. Like SGLang, a release without
``--enable-weights-cpu-backup`` loses the weights: after the resume every answer
is garbage (:data:`STANDIN_GARBAGE`).

Fault injection, from the environment (:class:`StandinLauncher` sets these):

================================== ==================================================
``MINERU_VRAM_STANDIN_START_DELAY`` seconds to wait before listening (a slow start)
``MINERU_VRAM_STANDIN_NEVER_READY`` ``1``: listen, but ``/health`` answers 503 forever
``MINERU_VRAM_STANDIN_EXIT_AT_START`` exit at once with this code (a bad model path)
``MINERU_VRAM_STANDIN_CRASH_AFTER`` exit (code 70) on the chat request after N answered
``MINERU_VRAM_STANDIN_HANG_AFTER``  after N chat answers, chat never answers; ``/health``
                                   (SGLang flavour) answers 503 after
                                   ``SGLANG_HEALTH_CHECK_TIMEOUT`` s (20 by default),
                                   as SGLang does when its scheduler does not reply,
                                   and ``/ready`` answers 503 from then on (vLLM
                                   flavour: ``/health`` never answers)
``MINERU_VRAM_STANDIN_HANG_ASLEEP`` ``1``: once its memory is released, nothing answers
``MINERU_VRAM_STANDIN_LATENCY``     seconds each chat completion takes
``MINERU_VRAM_STANDIN_HEALTH_DELAY`` seconds ``/health`` takes (SGLang's runs a generation: 1 s at least)
``MINERU_VRAM_STANDIN_CAP_MIB``     most GPU memory to allocate (default 1024)
================================== ==================================================

vLLM flavour: started as ``python -m mineru_vram.testing._standin serve MODEL --port N
--gpu-memory-utilization 0.1 --enable-sleep-mode`` (the ``vllm serve`` command line
with the module swapped), it reads the key from ``VLLM_API_KEY``, serves vLLM's
``POST /sleep?level=&mode=``, ``POST /wake_up`` and ``GET /is_sleeping`` only when
``VLLM_SERVER_DEV_MODE=1`` (404 otherwise, as vLLM), answers ``/sleep`` with 500
without ``--enable-sleep-mode``, and reports running and waiting requests in a
Prometheus ``/metrics``. Memory: ``min(gpu_memory_utilization * total, cap)``.

``GET /standin/stats`` (stand-in only) reports request counts, the release and
resume calls it saw, the ``/health`` requests that came while its memory was
released (SGLang would run their generation on released memory) and its memory,
for tests to assert on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mineru_vram._loopback import ChatRequest, HttpError, LoopbackServer, Request, Response
from mineru_vram._probe import MIB

if TYPE_CHECKING:
    from mineru_vram._process import ProcessGroup

__all__ = ["STANDIN_ENV", "StandinLauncher", "canned_completion", "main"]

logger = logging.getLogger("mineru_vram.standin")

STANDIN_ENV = {
    "start_delay": "MINERU_VRAM_STANDIN_START_DELAY",
    "never_ready": "MINERU_VRAM_STANDIN_NEVER_READY",
    "exit_at_start": "MINERU_VRAM_STANDIN_EXIT_AT_START",
    "crash_after": "MINERU_VRAM_STANDIN_CRASH_AFTER",
    "hang_after": "MINERU_VRAM_STANDIN_HANG_AFTER",
    "hang_asleep": "MINERU_VRAM_STANDIN_HANG_ASLEEP",
    "latency": "MINERU_VRAM_STANDIN_LATENCY",
    "health_delay": "MINERU_VRAM_STANDIN_HEALTH_DELAY",
    "cap_mib": "MINERU_VRAM_STANDIN_CAP_MIB",
}

CRASH_EXIT_CODE = 70
# sglang/srt/entrypoints/http_server.py: HEALTH_CHECK_TIMEOUT = int(os.getenv("SGLANG_HEALTH_CHECK_TIMEOUT", 20)).
SGLANG_HEALTH_CHECK_TIMEOUT_DEFAULT = 20

# A page with a title and one text block, in MinerU 2.5's layout output format
# (mineru_vl_utils.mineru_client._layout_re): boxes on a 0-1000 grid.
STANDIN_LAYOUT = (
    "<|box_start|>100 060 900 120<|box_end|><|ref_start|>title<|ref_end|><|rotate_up|>\n"
    "<|box_start|>100 160 900 520<|box_end|><|ref_start|>text<|ref_end|><|rotate_up|>"
)
STANDIN_TEXT = "Text read by the SGLang stand-in."
# What the stand-in answers after a wake that lost its weights (SGLang without --enable-weights-cpu-backup).
STANDIN_GARBAGE = "!!!!!!!!!!!!!!!! weights lost on release !!!!!!!!!!!!!!!!"


def canned_completion(prompt: str) -> str:
    """The stand-in's answer to one of MinerU's VLM prompts."""
    if "Layout Detection" in prompt:
        return STANDIN_LAYOUT
    if "Table Recognition" in prompt:
        return "<fcel>stand-in<fcel>table<nl>"  # OTSL, MinerU converts it to HTML
    if "Formula Recognition" in prompt:
        return "x = 1"
    if "Image Analysis" in prompt:
        return "An image described by the SGLang stand-in."
    return STANDIN_TEXT


def _parse_args(argv: Sequence[str], env: Mapping[str, str] | None = None) -> argparse.Namespace:
    argv = list(argv)
    flavor = "vllm" if argv[:1] == ["serve"] else "sglang"
    if flavor == "vllm":  # vllm serve MODEL [flags]: the model is positional
        argv = ["--model-path", argv[1], *argv[2:]] if len(argv) > 1 else argv[1:]
    parser = argparse.ArgumentParser(prog="python -m mineru_vram.testing._standin", allow_abbrev=False)
    parser.add_argument("--model-path", "--model", dest="model_path", required=True)
    parser.add_argument("--gpu-memory-utilization", dest="gpu_memory_utilization", type=float, default=None)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--logits-processors", nargs="+", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--mem-fraction-static", type=float, default=None)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--enable-weights-cpu-backup", action="store_true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--base-gpu-id", type=int, default=0)
    parser.add_argument("--config", default=None)
    args, unknown = parser.parse_known_args(list(argv))
    if args.config:
        # SGLang reads YAML; the engine writes JSON, which is valid YAML, so json suffices here.
        config = json.loads(Path(args.config).read_text(encoding="utf-8") or "{}")
        for key, value in config.items():
            dest = key.replace("-", "_")
            if getattr(args, dest, None) in (None, False):
                setattr(args, dest, value)
    args.unknown = unknown
    args.flavor = flavor
    if flavor == "vllm":
        env = os.environ if env is None else env
        args.mem_fraction_static = args.gpu_memory_utilization
        args.enable_memory_saver = args.enable_sleep_mode
        args.enable_weights_cpu_backup = args.enable_sleep_mode  # level-1 sleep keeps a host copy
        args.api_key = args.api_key or env.get("VLLM_API_KEY") or None
        args.dev_mode = env.get("VLLM_SERVER_DEV_MODE", "") not in ("", "0")
    return args


class _GpuBlock:
    """GPU memory held like SGLang's static pool: allocated at start, freed on release."""

    def __init__(self, device: str | None, gpu_id: int, fraction: float | None, cap_mib: float) -> None:
        self.tensor: Any = None
        self.mib = 0.0
        self.torch: Any = None
        self.index = gpu_id
        if device == "cpu" or not _cuda_driver_present():
            return
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        self.torch = torch
        total = torch.cuda.mem_get_info(gpu_id)[1]
        want = cap_mib if fraction is None else min(fraction * total / MIB, cap_mib)
        self.mib = max(0.0, want)

    def allocate(self) -> None:
        if self.torch is None or self.tensor is not None or self.mib <= 0:
            return
        self.tensor = self.torch.empty(int(self.mib * MIB), dtype=self.torch.uint8, device=f"cuda:{self.index}")
        self.torch.cuda.synchronize(self.index)

    def free(self) -> None:
        if self.torch is None or self.tensor is None:
            return
        self.tensor = None
        self.torch.cuda.synchronize(self.index)
        self.torch.cuda.empty_cache()

    @property
    def allocated_mib(self) -> float:
        return self.mib if self.tensor is not None else 0.0


def _cuda_driver_present() -> bool:
    # Importing torch costs seconds; skip it where no NVIDIA driver exists at all.
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


class _Standin:
    def __init__(self, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        self.args = args
        self.crash_after = _int(env.get(STANDIN_ENV["crash_after"]))
        self.hang_after = _int(env.get(STANDIN_ENV["hang_after"]))
        self.latency = float(env.get(STANDIN_ENV["latency"]) or 0)
        self.health_delay = float(env.get(STANDIN_ENV["health_delay"]) or 0)
        self.never_ready = env.get(STANDIN_ENV["never_ready"], "") not in ("", "0")
        self.hang_asleep = env.get(STANDIN_ENV["hang_asleep"], "") not in ("", "0")
        self.health_check_timeout = int(env.get("SGLANG_HEALTH_CHECK_TIMEOUT") or SGLANG_HEALTH_CHECK_TIMEOUT_DEFAULT)
        self.unhealthy = False  # SGLang's ServerStatus.UnHealthy: a /health found no reply
        self.health_while_released = 0
        self.answered = 0
        self.hanging = False
        self.released = False
        self.weights_lost = False  # released without a host copy: answers are garbage from then on
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        cap = float(env.get(STANDIN_ENV["cap_mib"]) or 1024)
        self.gpu = _GpuBlock(args.device, args.base_gpu_id, args.mem_fraction_static, cap)
        model_id = args.served_model_name or args.model_path
        self.server = LoopbackServer(
            self,
            model_id=model_id,
            api_key=args.api_key,
            host=args.host,
            port=args.port,
            info={
                "model_path": args.model_path,
                "served_model_name": model_id,
                "mem_fraction_static": args.mem_fraction_static,
                "enable_memory_saver": bool(args.enable_memory_saver),
                "device": args.device,
                "base_gpu_id": args.base_gpu_id,
                "version": "0.5.23 (mineru-vram stand-in, not SGLang)"
                if args.flavor == "sglang"
                else "vLLM (mineru-vram stand-in, not vLLM)",
                "launch_command": " ".join([sys.executable, "-m", "mineru_vram.testing._standin", *sys.argv[1:]]),
            },
        )
        self.server.ready = not self.never_ready
        self.server.before = self._before
        if args.flavor == "sglang":
            self.server.routes[("GET", "/ready")] = self._ready
            for method in ("GET", "POST"):
                self.server.routes[(method, "/release_memory_occupation")] = self._release
                self.server.routes[(method, "/resume_memory_occupation")] = self._resume
                self.server.routes[(method, "/flush_cache")] = self._flush
        else:
            self.server.routes[("GET", "/metrics")] = self._metrics
            if args.dev_mode:  # vLLM mounts its sleep router only in dev mode
                self.server.routes[("POST", "/sleep")] = self._vllm_sleep
                self.server.routes[("POST", "/wake_up")] = self._vllm_wake
                self.server.routes[("GET", "/is_sleeping")] = self._is_sleeping
        self.server.routes[("GET", "/standin/stats")] = self._stats

    # -- faults ----------------------------------------------------------------------------------

    def _before(self, request: Request) -> Response | None:
        if self.hang_asleep and self.released and request.path != "/standin/stats":
            print(f"stand-in: hanging on purpose while asleep ({request.path})", flush=True)
            while True:  # a server that hangs while asleep: only a health check can find it
                time.sleep(3600)
        if self.released and request.path.startswith("/health"):
            with self.lock:
                self.health_while_released += 1
            print("stand-in: /health while the memory is released (SGLang would run a generation)", flush=True)
        if self.health_delay and request.path.startswith("/health"):
            time.sleep(self.health_delay)
        if self.hanging and self.args.flavor == "sglang" and request.path.startswith("/health"):
            return self._health_without_reply()
        if self.hanging and (request.path.startswith("/health") or request.path == "/v1/chat/completions"):
            while True:  # a hung server: the engine's health check must notice and kill us
                time.sleep(3600)
        if request.path != "/v1/chat/completions":
            return None
        with self.lock:
            if self.crash_after is not None and self.answered >= self.crash_after:
                print(f"stand-in: crashing on purpose after {self.answered} chat completions", flush=True)
                os._exit(CRASH_EXIT_CODE)
            if self.hang_after is not None and self.answered >= self.hang_after:
                print(f"stand-in: hanging on purpose after {self.answered} chat completions", flush=True)
                self.hanging = True
        if self.hanging:
            return self._before(request)
        return None

    def _health_without_reply(self) -> Response:
        """SGLang's ``/health`` when its scheduler does not answer the generation: 503 after its limit."""
        time.sleep(self.health_check_timeout)
        print(
            "stand-in: Health check failed. Server couldn't get a response from detokenizer for last "
            f"{self.health_check_timeout} seconds.",
            flush=True,
        )
        self.unhealthy = True
        return Response(503, "")

    def _ready(self, request: Request) -> Response:
        # sglang/srt/managers/tokenizer_manager.py is_ready(): started, not paused, not UnHealthy.
        return Response(200 if self.server.ready and not self.unhealthy else 503, "")

    # -- Completer ---------------------------------------------------------------------------------

    def complete(self, request: ChatRequest) -> str:
        if self.released:
            raise HttpError(400, "memory is released: call /resume_memory_occupation first")
        if self.weights_lost:
            return STANDIN_GARBAGE
        if self.latency:
            time.sleep(self.latency)
        with self.lock:
            self.answered += 1
        return canned_completion(request.prompt)

    # -- memory endpoints --------------------------------------------------------------------------

    def _tags(self, request: Request) -> list[str] | None:
        body = request.json()
        tags = body.get("tags") if isinstance(body, dict) else None
        return list(tags) if tags else None

    def _release(self, request: Request) -> Response:
        tags = self._tags(request)
        self.calls.append({"call": "release", "tags": tags, "running": self.server.running})
        if self.server.running:
            # SGLang asserts this in the scheduler and answers 400 with the message.
            raise HttpError(400, "release_memory_occupation should be called only when server is idle.")
        if not self.args.enable_memory_saver:
            print("stand-in: release_memory_occupation without --enable-memory-saver does nothing", flush=True)
            return Response(body=None)
        self.gpu.free()
        self.released = True
        return Response(body=None)

    def _resume(self, request: Request) -> Response:
        tags = self._tags(request)
        self.calls.append({"call": "resume", "tags": tags})
        if self.args.enable_memory_saver:
            self.gpu.allocate()
            self.released = False
            # As SGLang: the weights' memory was freed without a host copy, and comes back uninitialised.
            self.weights_lost = self.weights_lost or not self.args.enable_weights_cpu_backup
        return Response(body=None)

    # -- vLLM's sleep mode ---------------------------------------------------------------------

    def _vllm_sleep(self, request: Request) -> Response:
        level, mode = int(request.query.get("level", "1")), request.query.get("mode", "abort")
        self.calls.append({"call": "sleep", "level": level, "mode": mode, "running": self.server.running})
        if not self.args.enable_memory_saver:
            raise HttpError(500, "Sleep mode is not enabled in the model config")
        self.gpu.free()
        self.released = True
        return Response(body="")

    def _vllm_wake(self, request: Request) -> Response:
        self.calls.append({"call": "wake_up", "tags": request.query.get("tags")})
        self.gpu.allocate()
        self.released = False
        return Response(body="")

    def _is_sleeping(self, request: Request) -> Response:
        return Response(body={"is_sleeping": self.released})

    def _metrics(self, request: Request) -> Response:
        labels = f'{{engine="0",model_name="{self.server.model_id}"}}'
        return Response(
            body=(
                "# TYPE vllm:num_requests_running gauge\n"
                f"vllm:num_requests_running{labels} {float(self.server.running)}\n"
                "# TYPE vllm:num_requests_waiting gauge\n"
                f"vllm:num_requests_waiting{labels} 0.0\n"
            )
        )

    def _flush(self, request: Request) -> Response:
        return Response(body="Cache flushed.\n")

    def _stats(self, request: Request) -> Response:
        return Response(
            body={
                "pid": os.getpid(),
                "counts": dict(self.server.counts),
                "answered": self.answered,
                "released": self.released,
                "calls": self.calls,
                "allocated_mib": self.gpu.allocated_mib,
                "planned_mib": self.gpu.mib,
                "memory_saver": bool(self.args.enable_memory_saver),
                "weights_cpu_backup": bool(self.args.enable_weights_cpu_backup),
                "weights_lost": self.weights_lost,
                "health_while_released": self.health_while_released,
                "health_check_timeout": self.health_check_timeout,
                "logits_processors": self.args.logits_processors,
                "flavor": self.args.flavor,
                "unknown_flags": self.args.unknown,
                "api_key_required": self.server.api_key is not None,
            }
        )


def _int(raw: str | None) -> int | None:
    return None if raw in (None, "") else int(raw)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the stand-in until SIGTERM/SIGINT. Returns the exit code."""
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ
    if args.flavor == "sglang":
        # As SGLang (sglang/srt/entrypoints/engine.py), before the model loads: every field, the key in clear.
        logged = {k: v for k, v in vars(args).items() if k not in ("unknown", "flavor")}
        print(f"server_args={logged}", flush=True)
    exit_code = env.get(STANDIN_ENV["exit_at_start"])
    if exit_code:
        print(f"stand-in: failing at start on purpose (exit {exit_code}): cannot load {args.model_path}", flush=True)
        return int(exit_code)
    delay = float(env.get(STANDIN_ENV["start_delay"]) or 0)
    what = "sglang.launch_server" if args.flavor == "sglang" else "vllm serve"
    print(f"stand-in for {what}: {args.model_path}, port {args.port}, pid {os.getpid()}", flush=True)
    if args.unknown:
        print(f"stand-in: ignoring flags {args.unknown}", flush=True)
    if delay:
        time.sleep(delay)
    standin = _Standin(args, env)
    standin.gpu.allocate()
    if standin.gpu.allocated_mib:
        print(f"stand-in: holding {standin.gpu.allocated_mib:.0f} MiB on cuda:{standin.gpu.index}", flush=True)

    def _stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    print("The server is fired up and ready to roll!" if standin.server.ready else "stand-in: never ready", flush=True)
    try:
        standin.server.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        standin.gpu.free()
    return 0


class StandinLauncher:
    """A ``launcher=`` for :class:`ResidentEngine` that runs the stand-in where SGLang or vLLM would run.

    The engine builds its real ``sglang.launch_server`` (or ``vllm serve``) command line; this
    launcher swaps the module for ``mineru_vram.testing._standin`` and adds fault
    variables, then starts it through the library's real process layer
    (:func:`mineru_vram._process.spawn`: process group, keeper, log file), so
    everything but SGLang itself is exercised.

    Args:
        faults: fault variables by the keys of :data:`STANDIN_ENV` (``crash_after=2``),
            or a sequence of such mappings, one per launch (the last repeats), to
            let a restarted server behave differently from the first.
        cap_mib: most GPU memory the stand-in allocates where it has a GPU.
    """

    def __init__(
        self,
        faults: Mapping[str, Any] | Sequence[Mapping[str, Any]] = (),
        *,
        cap_mib: float | None = None,
    ) -> None:
        if isinstance(faults, Mapping):
            self._faults: list[Mapping[str, Any]] = [faults]
        else:
            self._faults = list(faults) or [{}]
        for entry in self._faults:
            unknown = set(entry) - set(STANDIN_ENV)
            if unknown:
                raise ValueError(f"unknown stand-in faults {sorted(unknown)}; known: {sorted(STANDIN_ENV)}")
        self.cap_mib = cap_mib
        self.launches: list[list[str]] = []  # each argv as the engine built it (before the swap)

    def __call__(
        self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path | None = None
    ) -> ProcessGroup:
        from mineru_vram._process import python_command, spawn

        argv = list(argv)
        self.launches.append(argv)
        faults = self._faults[min(len(self.launches) - 1, len(self._faults) - 1)]
        at = next((i for i, a in enumerate(argv) if a in ("sglang.launch_server", "vllm.entrypoints.cli.main")), None)
        if at is None:
            raise ValueError(f"not an sglang.launch_server or vllm serve command line: {argv}")
        # Our own interpreter, isolated from the working folder, whatever python= the engine was given.
        command = python_command("mineru_vram.testing._standin", *argv[at + 1 :])
        child_env = {k: v for k, v in env.items() if not k.startswith("MINERU_VRAM_STANDIN_")}
        for key, value in faults.items():
            child_env[STANDIN_ENV[key]] = "1" if value is True else str(value)
        if self.cap_mib is not None:
            child_env[STANDIN_ENV["cap_mib"]] = str(self.cap_mib)
        return spawn(command, env=child_env, log_path=log_path, cwd=cwd)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
