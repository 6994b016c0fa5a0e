"""A server someone else runs: used over HTTP, never started, restarted or stopped here."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

from mineru_vram._engine.settings import EngineSettings
from mineru_vram._exceptions import EngineStartError, EngineStateError

from .base import BackendContext, EngineTraits, MemoryMove
from .server import HttpBackend

__all__ = ["AttachBackend"]


class AttachBackend(HttpBackend):
    """An OpenAI-compatible server at ``settings.url``."""

    traits: ClassVar[EngineTraits] = EngineTraits(model="none", needs_url=True, launched=False)
    name = "attach"

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        assert settings.url is not None  # the settings require it
        url = settings.url.rstrip("/")
        self.url = url[:-3] if url.endswith("/v1") else url

    def launch(self, ctx: BackendContext) -> None:
        self.api_key = ctx.api_key

    def wait_ready(self, deadline: float, stop: threading.Event) -> None:
        while not self._check_ready():
            if stop.is_set():
                raise EngineStateError("the engine was stopped while attaching")
            if time.monotonic() >= deadline:
                raise EngineStartError(
                    f"no OpenAI-compatible VLM server answered at {self.url} within "
                    f"{self.settings.start_timeout:g} s (start_timeout)",
                    url=self.url,
                )
            stop.wait(0.2)

    def release(self, timeout: float) -> MemoryMove:
        self._post("/release_memory_occupation", {}, timeout=timeout)
        return MemoryMove()

    def resume(self, timeout: float) -> MemoryMove:
        self._post("/resume_memory_occupation", {}, timeout=timeout)
        return MemoryMove()
