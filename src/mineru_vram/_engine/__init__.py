"""The resident VLM engine: one process-wide engine, shared, sleepable, supervised.

* :mod:`.engine`: :class:`ResidentEngine` (states, ``get``/``attach``, leases, sleep and
  wake, stop) and the process-wide instance.
* :mod:`.supervisor`: the monitor thread (crashes, hangs, restarts, keep-alive).
* :mod:`.settings`: :class:`EngineSettings`, the one list of settings.
* :mod:`.admission`: sizing from a budget and admission through the ledger.
* :mod:`.memory`: what NVML sees of the engine.
* :mod:`.reports`: :class:`EngineState`, :class:`EngineStatus`, :class:`MemoryReport`.
* :mod:`.http`: one HTTP request to a loopback server.
* :mod:`.backends`: one module per way of running a server (``sglang``, ``vllm``,
  ``transformers``, ``attach``), behind a small protocol.
"""

from __future__ import annotations

from .backends import BackendContext, Launcher, build_sglang_argv, build_vllm_argv
from .engine import ResidentEngine, _reset_for_tests
from .reports import EngineState, EngineStatus, MemoryReport
from .settings import EngineSettings, parse_keep_alive

__all__ = [
    "BackendContext",
    "EngineSettings",
    "EngineState",
    "EngineStatus",
    "Launcher",
    "MemoryReport",
    "ResidentEngine",
    "_reset_for_tests",
    "build_sglang_argv",
    "build_vllm_argv",
    "parse_keep_alive",
]
