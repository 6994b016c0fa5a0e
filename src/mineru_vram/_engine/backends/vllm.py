"""vLLM: a ``vllm serve`` process with sleep mode: ``/sleep?level=1`` and ``/wake_up``.

vLLM facts (vLLM 0.33: its ``vllm serve`` entry point, sleep-mode router and API
server): ``vllm serve MODEL`` takes ``--host``, ``--port``, ``--served-model-name``,
``--gpu-memory-utilization`` (a fraction of the card's total for this instance;
0.92 when not given), ``--enable-sleep-mode`` and ``--logits-processors``;
``POST /sleep?level=1&mode=...``, ``POST /wake_up`` and ``GET /is_sleeping`` exist
only with ``VLLM_SERVER_DEV_MODE=1`` and need no key (the key, from
``VLLM_API_KEY``, guards the ``/v1`` paths); ``/metrics`` reports
``vllm:num_requests_running`` and ``vllm:num_requests_waiting``. Level-1 sleep moves
the weights to host memory and drops the KV cache. (MinerU's own ``vllm-engine``
runs vLLM inside the parsing process, whose memory could only be returned by
ending that process.)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import ClassVar

from mineru_vram._engine import http

from .base import BackendContext, EngineTraits, MemoryMove
from .server import ServerBackend, physical_gpu

__all__ = ["MINERU_LOGITS_PROCESSOR", "VLLM_DEFAULT_UTILIZATION", "VLLMBackend", "build_vllm_argv"]

# vLLM's default --gpu-memory-utilization (0.92 in vLLM 0.33): what a vllm engine without a budget takes of the card.
VLLM_DEFAULT_UTILIZATION = 0.92
# MinerU's repetition guard: MinerU's client sends vllm_xargs {"no_repeat_ngram_size": 100}, which vLLM
# applies only through this logits processor (MinerU's own vLLM launcher passes it too).
MINERU_LOGITS_PROCESSOR = "mineru_vl_utils:MinerULogitsProcessor"


def build_vllm_argv(
    *,
    model_path: str,
    port: int,
    mem_fraction: float | None,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
    python: str | None = None,
    host: str = "127.0.0.1",
    logits_processors: Sequence[str] = (MINERU_LOGITS_PROCESSOR,),
) -> list[str]:
    """The ``vllm serve`` command line (``python -m vllm.entrypoints.cli.main serve``).

    ``--logits-processors`` loads MinerU's repetition guard, without which vLLM ignores
    the ``no_repeat_ngram_size`` MinerU asks for (``mineru_vl_utils`` must be importable
    by the server's Python); ``extra_args`` that name their own ``--logits-processors``
    replace it.

    ``--enable-sleep-mode`` makes ``/sleep`` and ``/wake_up`` release and resume the
    weights and KV cache (those endpoints also need ``VLLM_SERVER_DEV_MODE=1`` in the
    server's environment). The API key is not on the command line: the server reads
    it from ``VLLM_API_KEY`` in its environment, which other users cannot read. The
    device is chosen by ``CUDA_VISIBLE_DEVICES``, also in the environment.
    """
    argv = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "serve",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--enable-sleep-mode",
    ]
    if mem_fraction is not None:
        argv += ["--gpu-memory-utilization", f"{mem_fraction:.3f}"]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    given = any(a == "--logits-processors" or a.startswith("--logits-processors=") for a in extra_args)
    if logits_processors and not given:
        argv += ["--logits-processors", *logits_processors]
    argv += list(extra_args)
    return argv


class VLLMBackend(ServerBackend):
    """A vLLM server of ours."""

    traits: ClassVar[EngineTraits] = EngineTraits(
        pool_fraction=True,
        default_fraction=VLLM_DEFAULT_UTILIZATION,
        needs_gpu="vLLM's CPU build is a different package",
    )
    name = "vllm"

    def argv(self, ctx: BackendContext) -> list[str]:
        s = ctx.settings
        assert s.model_path is not None  # the settings require it
        return build_vllm_argv(
            model_path=s.model_path,
            port=self.port,
            mem_fraction=ctx.mem_fraction,
            served_model_name=s.model_name,
            extra_args=s.extra_args,
            python=s.python,
        )

    def server_env(self, ctx: BackendContext) -> dict[str, str]:
        return {
            "VLLM_API_KEY": ctx.api_key,
            "VLLM_SERVER_DEV_MODE": "1",  # vLLM serves /sleep, /wake_up and /is_sleeping only with it
            "CUDA_VISIBLE_DEVICES": physical_gpu(ctx.settings.device),
        }

    def release(self, timeout: float) -> MemoryMove:
        # Level 1: weights to host memory, KV cache dropped; the engine waited for idle already.
        self._post("/sleep?level=1&mode=wait", None, timeout=timeout)
        return MemoryMove()

    def resume(self, timeout: float) -> MemoryMove:
        self._post("/wake_up", None, timeout=timeout)
        return MemoryMove()

    def busy(self, timeout: float) -> bool:
        """Running or waiting requests, from vLLM's Prometheus ``/metrics``."""
        names = ("vllm:num_requests_running", "vllm:num_requests_waiting")
        return http.metrics_busy(self.url, names, api_key=self.api_key, timeout=timeout)
