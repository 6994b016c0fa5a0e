"""MinerU's transformers VLM engine, served from a child process of ours (``mineru_vram._vlm_serve``).

This is MinerU's in-process engine (``ModelSingleton().get_model("transformers", ...)``),
run in a child that serves it on a loopback OpenAI-compatible endpoint. MinerU's
``parse()`` configuration cannot select this engine at all; served this way,
MinerU's http-client is the one parse path for every engine, and the VLM's weights
and CUDA context are not counted in the release receipts of the sessions in this
process.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from mineru_vram import _process
from mineru_vram._engine.settings import EngineSettings

from .base import BackendContext, EngineTraits
from .server import ServerBackend, gpu_flags

__all__ = ["TransformersBackend"]

SERVER_MODULE = "mineru_vram._vlm_serve"


class TransformersBackend(ServerBackend):
    """MinerU's transformers VLM in a child process of ours."""

    traits: ClassVar[EngineTraits] = EngineTraits(model="local")
    name = "transformers"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        assert settings.model_path is not None  # the settings require it
        self.model_id = settings.model_name or Path(settings.model_path).name or "mineru-vlm"

    def argv(self, ctx: BackendContext) -> list[str]:
        s = ctx.settings
        assert s.model_path is not None
        args = [
            "--model-path",
            s.model_path,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--config",
            str(ctx.config_path),
            "--served-model-name",
            self.model_id,
            *gpu_flags(s.device),
        ]
        if s.max_new_tokens is not None:
            args += ["--max-new-tokens", str(s.max_new_tokens)]
        args += list(s.extra_args)
        if s.python is None:
            return _process.python_command(SERVER_MODULE, *args)
        return [s.python, "-m", SERVER_MODULE, *args]  # another interpreter: its own path, our private cwd

    def server_env(self, ctx: BackendContext) -> dict[str, str]:
        if ctx.virtual_vram_gb is None:
            return {}
        return {"MINERU_VIRTUAL_VRAM_SIZE": str(ctx.virtual_vram_gb)}  # MinerU sizes its batches by it
