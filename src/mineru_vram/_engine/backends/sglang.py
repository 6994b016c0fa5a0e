"""SGLang: a ``sglang.launch_server`` process with the memory saver, so sleep really returns memory.

SGLang facts this relies on (sglang 0.5.23, ``sglang/srt/server_args.py`` and
``sglang/srt/entrypoints/http_server.py``): the flags ``--model-path``, ``--host``,
``--port``, ``--mem-fraction-static``, ``--enable-memory-saver``,
``--enable-weights-cpu-backup``, ``--device``, ``--base-gpu-id``,
``--served-model-name`` and ``--config`` (a YAML file whose keys become flags; JSON
is valid YAML); ``/health``, ``/ready`` and ``/metrics`` need no key, every other
endpoint needs the key; ``GET /ready`` answers at once, 200 once warm-up is done
(and while the memory is released: a release does not pause the server), 503 while
starting or after a failed ``/health``; ``GET /health`` submits a one-token
generation, checks for its answer once a second (the first time after a second),
and gives up with 503 after ``SGLANG_HEALTH_CHECK_TIMEOUT`` seconds (20 by default,
read from the server's environment);
``/release_memory_occupation`` asserts the server is idle, does nothing without
``--enable-memory-saver``, and frees the weights without a host copy unless
``--enable-weights-cpu-backup`` is given (after the resume the model then answers
garbage); ``/v1/loads`` reports ``num_running_reqs`` and ``num_waiting_reqs``;
its log has ``server_args`` with the API key in clear (log tails are redacted).
SGLang sizes its static pool as ``mem_fraction_static`` times the memory it finds
free before loading weights, so on a card shared with others the pool is smaller
than the budget, never larger.
MinerU 4 dropped its SGLang engine, but its http-client speaks the OpenAI API,
which SGLang serves.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from mineru_vram._engine import http
from mineru_vram._engine.settings import EngineSettings

from .base import BackendContext, EngineTraits
from .server import ServerBackend, gpu_flags

__all__ = ["MIN_HEALTH_TIMEOUT", "SGLangBackend", "build_sglang_argv", "sglang_health_check_timeout"]

logger = logging.getLogger("mineru_vram")

# SGLang's /health looks for its generation's answer once a second, so it answers 503 up to a
# second after its own limit (SGLANG_HEALTH_CHECK_TIMEOUT).
SGLANG_HEALTH_POLL_SECONDS = 1.0
# Room left between SGLang's latest answer and the end of our wait for it (a busy event loop).
HEALTH_ANSWER_MARGIN_SECONDS = 1.0
# The shortest health_timeout that leaves SGLang a limit of one second.
MIN_HEALTH_TIMEOUT = 1 + SGLANG_HEALTH_POLL_SECONDS + HEALTH_ANSWER_MARGIN_SECONDS
# /ready needs no generation: it answers at once.
READY_TIMEOUT_SECONDS = 5.0


def sglang_health_check_timeout(health_timeout: float) -> int:
    """The ``SGLANG_HEALTH_CHECK_TIMEOUT`` (whole seconds) for a server we give ``health_timeout``.

    SGLang's own limit ends, and its 503 arrives, before our wait ends: a slow check is
    SGLang's answer ("no reply from the scheduler"), never our timeout cutting it off.
    """
    return max(1, math.floor(health_timeout - SGLANG_HEALTH_POLL_SECONDS - HEALTH_ANSWER_MARGIN_SECONDS))


def build_sglang_argv(
    *,
    model_path: str,
    port: int,
    config_path: Path,
    device: str,
    mem_fraction: float | None,
    served_model_name: str | None = None,
    extra_args: Sequence[str] = (),
    python: str | None = None,
    host: str = "127.0.0.1",
) -> list[str]:
    """The ``sglang.launch_server`` command line for sglang 0.5.23's ``server_args``.

    The API key is not on it: it is in ``config_path`` (SGLang's ``--config`` YAML),
    so other users of the machine cannot read it from the process list.
    """
    argv = [
        python or sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--config",
        str(config_path),
        "--enable-memory-saver",
        # Without a host copy, the release frees the weights and the resume brings back garbage.
        "--enable-weights-cpu-backup",
    ]
    if mem_fraction is not None:
        argv += ["--mem-fraction-static", f"{mem_fraction:.3f}"]
    argv += gpu_flags(device)
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    argv += list(extra_args)
    return argv


class SGLangBackend(ServerBackend):
    """An SGLang server of ours."""

    # /health runs a one-token generation and polls for it every second: it never answers under 1 s.
    traits: ClassVar[EngineTraits] = EngineTraits(pool_fraction=True, min_health_timeout=MIN_HEALTH_TIMEOUT)
    name = "sglang"
    # Readiness: /ready (warm-up done), not /health (a generation, a second at least, up to SGLang's limit).
    ready_path: ClassVar[str] = "/ready"
    ready_timeout: ClassVar[float | None] = READY_TIMEOUT_SECONDS

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self._warned = False

    def launch(self, ctx: BackendContext) -> None:
        if not self._warned:
            self._warned = True
            logger.warning(
                "the sglang engine drops MinerU's repetition guard: MinerU asks for no_repeat_ngram_size=100 "
                "(in vllm_xargs), which SGLang ignores, so a page can repeat text up to the token limit. "
                "engine='vllm' applies it (MinerU's logits processor)."
            )
        super().launch(ctx)

    def healthy(self, timeout: float, *, asleep: bool = False) -> bool:
        """``/health`` while awake (a generation: the scheduler answers); asleep, ``/ready``.

        SGLang's ``/health`` would run its generation on released memory; ``/ready`` needs
        no device memory and still answers 200 while the memory is released.
        """
        if not asleep:
            return super().healthy(timeout)
        try:
            status, _ = http.request("GET", f"{self.url}/ready", timeout=timeout)
        except OSError:
            return False
        return status == 200

    def server_env(self, ctx: BackendContext) -> dict[str, str]:
        return {"SGLANG_HEALTH_CHECK_TIMEOUT": str(sglang_health_check_timeout(ctx.settings.health_timeout))}

    def argv(self, ctx: BackendContext) -> list[str]:
        s = ctx.settings
        assert s.model_path is not None  # the settings require it
        return build_sglang_argv(
            model_path=s.model_path,
            port=self.port,
            config_path=ctx.config_path,
            device=s.device,
            mem_fraction=ctx.mem_fraction,
            served_model_name=s.model_name,
            extra_args=s.extra_args,
            python=s.python,
        )
