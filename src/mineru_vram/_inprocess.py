"""Runners: where a session's models live, and the one that keeps them in this process.

A :class:`~mineru_vram.ModelSession` owns validation, state and the receipt; the
work is done by a *runner* (the :class:`Runner` protocol). :class:`InProcessRunner`
loads MinerU's models into this process and releases them on close. The worker
runner (``_worker/runner.py``) keeps them in a child process, which runs an
``InProcessRunner`` of its own (``_worker/child.py``), so both modes share one code
path for parsing and release. This module imports neither the session nor the
worker, so both can import it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ._config import BackendSpec
from ._documents import Document
from ._exceptions import ConfigurationError, MineruVramError, OutOfMemoryError, add_note
from ._probe import VramSnapshot, vram_snapshot
from ._release import AliveTracker, ReleaseReport, return_allocator_memory, settle
from ._result import ParseResult

__all__ = ["InProcessRunner", "ParseOptions", "Runner", "SessionSettings", "check_parse_timeout"]

logger = logging.getLogger("mineru_vram")


@dataclass(frozen=True)
class SessionSettings:
    """Everything a runner needs, resolved and picklable (it travels to the worker).

    Attributes mirror :class:`~mineru_vram.ModelSession`'s arguments after defaults
    and environment variables were applied.
    """

    backend: BackendSpec
    device: str
    models_dir: Path | None = None
    model_source: str | None = None
    small_backend: str = "torch"
    preload: str = "core"
    strict: bool = False
    leak_tolerance_mib: float = 32.0
    context_floor_mib: float | None = None
    keep_model_output: bool = False
    vlm_config: dict[str, Any] | None = None
    isolation: str = "none"
    recycle_after: int | None = None
    recycle_above_mib: float | None = None
    worker_start_timeout: float = 300.0
    release_timeout: float = 10.0
    runtime_dir: str | None = None
    # MINERU_VIRTUAL_VRAM_SIZE from the admitted budget (set inside the session only).
    virtual_vram_gb: int | None = None
    # One retry on smaller batches after a CUDA out-of-memory error.
    oom_retry: bool = True
    # Let MinerU download missing models (else ModelsNotAvailableError at once).
    allow_download: bool = True
    # Park the models in host memory on close, for the next session with the same settings.
    keep_warm: bool = False


def check_parse_timeout(timeout: object) -> None:
    """Accept a parse's ``timeout``: positive seconds, ``"auto"`` (the default bound) or ``None`` (none).

    Raises:
        ConfigurationError: anything else.
    """
    if timeout is None or timeout == "auto":
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigurationError(
            f"timeout={timeout!r}: must be a positive number of seconds, 'auto' (the default bound) or None (no bound)",
            timeout=timeout,
        )


@dataclass(frozen=True)
class ParseOptions:
    """Per-call options that travel with a document to its runner.

    ``timeout`` bounds a parse in a worker process: seconds, ``"auto"`` (a default
    bound that grows with the pages parsed) or ``None`` (no bound). A parse in this
    process cannot be interrupted, so there only ``"auto"`` and ``None`` are accepted,
    and neither bounds it.
    """

    page_range: str = ""
    ocr_mode: str = "auto"
    timeout: float | str | None = "auto"
    # The resident engine's current VlmConfig fields, taken per parse from its lease (the
    # engine may have restarted or moved port since the session opened).
    vlm_config: dict[str, Any] | None = None


class Runner(Protocol):
    """Where a session's models live. ``open`` loads, ``close`` releases and measures."""

    baseline: VramSnapshot | None

    def open(self) -> None: ...

    def parse(self, doc: Document, options: ParseOptions) -> ParseResult: ...

    def close(self) -> ReleaseReport: ...

    def abandon(self) -> None:
        """Best-effort cleanup from a finalizer: no measuring, no raising."""
        ...


class InProcessRunner:
    """Loads MinerU's models into this process and releases them on close."""

    def __init__(self, settings: SessionSettings) -> None:
        from ._adapter import MineruRuntime

        self.settings = settings
        self.baseline: VramSnapshot | None = None
        self.runtime = MineruRuntime(
            device=settings.device,
            models_dir=settings.models_dir,
            model_source=settings.model_source,
            small_backend=settings.small_backend,
            virtual_vram_gb=settings.virtual_vram_gb,
            allow_download=settings.allow_download,
        )
        self._vlm_config: Any = None
        self.restored: dict[str, Any] = {}  # models taken from the warm cache on open
        # Set in a spare worker that built the models on the CPU for whoever takes it.
        self.retarget_from_cpu = False
        self._lock = threading.Lock()
        self.oom_retries = 0  # documents that ran out of memory and were retried on smaller batches

    def open(self) -> None:
        from ._adapter import vlm_config

        device = self.settings.device
        if device.startswith("cuda"):
            import torch  # MinerU imports it for any CUDA device; before loading, say plainly if it cannot work

            if torch.version.cuda is None:
                raise ConfigurationError(
                    f"device={device!r} cannot be used: the installed torch {torch.__version__} is built without "
                    "CUDA. Install a CUDA build of torch, or use device='cpu'.",
                    device=device,
                )
        self.baseline = settle(device)
        self.runtime.activate()
        try:
            self._vlm_config = vlm_config(self.settings.vlm_config)
            self._restore_parked()
            self.runtime.load(tier=self.settings.backend.tier, preload=self.settings.preload)
        except BaseException:
            self._release(AliveTracker())
            raise

    def _restore_parked(self) -> None:
        """Take this session's models from host memory when an earlier session parked them."""
        import dataclasses as dc

        from ._warm import warm_cache

        key = self.runtime.warm_key()
        back = warm_cache().take(key)
        moved_from_cpu = False
        if back is None and self.retarget_from_cpu and key.device != "cpu":
            back = warm_cache().take(dc.replace(key, device="cpu"))
            moved_from_cpu = back is not None
        if back is None:
            return
        models, seconds = back
        if moved_from_cpu:
            t0 = time.perf_counter()
            retargeted = self.runtime.retarget_models(models, key.device)
            seconds += time.perf_counter() - t0
            if retargeted is None:
                logger.warning("models built on the CPU could not all move to %s; loading them instead", key.device)
                models.clear()
                return
            models = retargeted
        given = self.runtime.give_models(models)
        self.restored = {"models": given, "seconds": seconds, "from": "cpu" if moved_from_cpu else "host memory"}
        logger.info("restored %d parked models to %s in %.2fs", given, self.settings.device, seconds)

    def parse(self, doc: Document, options: ParseOptions) -> ParseResult:
        from ._adapter import vlm_config as build_vlm_config

        check_parse_timeout(options.timeout)
        if options.timeout not in (None, "auto"):
            raise ConfigurationError(
                "parse(timeout=...) needs isolation='process': a parse running in this process "
                "cannot be interrupted safely",
                timeout=options.timeout,
            )
        vlm_config = self._vlm_config
        if options.vlm_config is not None:
            vlm_config = build_vlm_config(options.vlm_config)
        with self._lock:  # MinerU's models are not safe to call from two threads at once
            oom_message = None
            try:
                return self._parse_once(doc, options, vlm_config)
            except OutOfMemoryError as exc:
                if not self.settings.oom_retry:
                    raise
                oom_message = str(exc)
            # Outside the except block, so the first error's traceback (cleared by _parse_once)
            # is no longer being handled: release what the document held (its frames are
            # cleared; the allocator's cached blocks go back to the driver; an exceptional path,
            # not a per-document ritual), then retry once on halved batches.
            self.oom_retries += 1
            return_allocator_memory(self.settings.device)
            logger.warning("%s; retrying once on smaller batches", oom_message)
            with self.runtime.smaller_batches() as knobs:
                try:
                    result = self._parse_once(doc, options, vlm_config)
                except OutOfMemoryError as exc:
                    return_allocator_memory(self.settings.device)
                    add_note(exc, f"retried once on smaller batches ({knobs}) after: {oom_message}")
                    raise
            return dataclasses.replace(result, timings={**result.timings, "oom_retries": 1.0})

    def _parse_once(self, doc: Document, options: ParseOptions, vlm_config: Any) -> ParseResult:
        try:
            return self.runtime.parse(
                doc,
                tier=self.settings.backend.tier,
                ocr_mode=options.ocr_mode,
                page_range=options.page_range,
                backend=self.settings.backend.name,
                keep_model_output=self.settings.keep_model_output,
                vlm_config=vlm_config,
            )
        except MineruVramError as exc:
            # The traceback's frames hold the document's tensors; drop their locals so
            # the error object the caller keeps does not keep device memory alive.
            _clear_frames(exc)
            raise

    def _release(
        self, tracker: AliveTracker, *, park: bool = False
    ) -> tuple[int, list[tuple[str, float]], dict[str, Any]]:
        t0 = time.perf_counter()
        parked: dict[str, Any] = self._park() if park else {}
        released = self.runtime.release_models(tracker)  # what was not parked
        steps = [("drop MinerU cache entries", time.perf_counter() - t0)]
        if parked.get("models"):
            steps.insert(0, ("park models in host memory", parked["seconds"]))
        self.runtime.deactivate()
        steps += return_allocator_memory(self.settings.device)
        return released, steps, parked

    def _park(self) -> dict[str, Any]:
        """Move this session's models to host memory for the next session (``keep_warm``)."""
        from ._warm import warm_cache

        models = self.runtime.take_models()
        if not models:
            return {}
        labels = [f"{cache}:{key!r}" for cache, key in models]
        report = warm_cache().park(self.runtime.warm_key(), models, labels=labels)
        if not report.parked:
            # Not parked (too large, or a tensor would have stayed on the device): released as usual.
            logger.warning("models not parked, released instead: %s", report.reason)
            self.runtime.give_models(models)
            return {"reason": report.reason}
        return {
            "models": list(report.parked),
            "mib": report.mib,
            "where": report.where,
            "seconds": report.seconds,
            "evicted": list(report.evicted),
        }

    def close(self) -> ReleaseReport:
        device = self.settings.device
        before = vram_snapshot(device)
        t0 = time.perf_counter()
        tracker = AliveTracker()
        released, steps, parked = self._release(tracker, park=self.settings.keep_warm)
        after = settle(device)
        seconds = time.perf_counter() - t0
        context_created = bool(
            after.cuda_initialized and self.baseline is not None and not self.baseline.cuda_initialized
        )
        return ReleaseReport(
            device=device,
            isolation="none",
            baseline=self.baseline,
            before=before,
            after=after,
            seconds=seconds,
            models_released=released,
            models_alive=tracker.alive(),
            steps=steps,
            context_created=context_created,
            context_floor_mib=self.settings.context_floor_mib,
            tolerance_mib=self.settings.leak_tolerance_mib,
            parked=parked,
            restored=dict(self.restored),
        )

    def abandon(self) -> None:
        try:
            self.runtime.release_models(AliveTracker())
            self.runtime.deactivate()
        except Exception:
            pass


def _clear_frames(exc: BaseException) -> None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if cur.__traceback__ is not None:
            traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__
