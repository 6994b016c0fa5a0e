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
import gc
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
from ._release import AliveTracker, ReleaseReport, malloc_trim, return_allocator_memory, settle
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
    # False: MINERU_VRAM_* variables are not read, also where the session reads them late
    # (the ledger's folder, the timeline's events file).
    trust_env: bool = True
    # MINERU_VIRTUAL_VRAM_SIZE from the admitted budget (set inside the session only).
    virtual_vram_gb: int | None = None
    # One retry on smaller batches after a CUDA out-of-memory error.
    oom_retry: bool = True
    # Let MinerU download missing models (else ModelsNotAvailableError at once).
    allow_download: bool = True
    # Park the models in host memory on close, for the next session with the same settings.
    keep_warm: bool = False
    # Host memory the isolated worker's process tree may hold during a parse: MiB, "auto" or None.
    worker_memory_mib: float | str | None = "auto"
    # gc.freeze() once the models are loaded (gc.unfreeze() before they are released).
    gc_freeze: bool = False


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
        self.local_vlm: dict[str, Any] = {}  # MinerU's in-process VLM engine, once loaded
        self._frozen = False  # gc.freeze() done after loading (settings.gc_freeze)

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
            local = self.settings.backend.local_engine
            self.runtime.load(tier=self.settings.backend.tier, preload=self.settings.preload, local_vlm=local)
            if local is not None:
                self._load_local_vlm(local)
        except BaseException:
            self._release(AliveTracker())
            raise
        if self.settings.gc_freeze:
            # The loaded stack (MinerU's modules and models: some 600,000 objects) leaves the
            # collector's generations, so the full collection a parse triggers does not walk
            # it again (about 0.3 s a page on a small CPU). Undone before release.
            gc.collect()
            gc.freeze()
            self._frozen = True

    def _load_local_vlm(self, engine: str) -> None:
        """Load MinerU's own VLM engine (``llama-cpp``) into this process, where its parses find it."""
        global _vulkan_visible
        environ, drop = _llama_cpp_environ(self.settings.device)
        t0 = time.perf_counter()
        backend = self.runtime.load_local_vlm(self._vlm_config, environ=environ, drop=drop)
        with _vulkan_lock:
            _vulkan_visible = environ["GGML_VK_VISIBLE_DEVICES"]
        self.local_vlm = {"engine": engine, "backend": backend, "load_seconds": time.perf_counter() - t0}
        logger.info("loaded MinerU's %s engine (%s) in %.2fs", engine, backend, self.local_vlm["load_seconds"])

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
    ) -> tuple[int, list[tuple[str, float]], dict[str, Any], list[str]]:
        events: list[str] = []
        steps: list[tuple[str, float]] = []
        t0 = time.perf_counter()
        if self._frozen:
            # The models must be collectable again; this also undoes any other gc.freeze() of this process.
            gc.unfreeze()
            self._frozen = False
            steps.append(("gc.unfreeze", time.perf_counter() - t0))
            t0 = time.perf_counter()
        rss0 = vram_snapshot("cpu").rss_mib
        closed = self.runtime.release_local_vlm(tracker)
        if closed:
            steps.append((f"close MinerU's {self.settings.backend.local_engine} engine", time.perf_counter() - t0))
            # llama.cpp's buffers were malloc'd (on the heap once glibc's mmap threshold has grown,
            # as it has after torch): give the freed pages back, so RSS shows the engine gone.
            t0 = time.perf_counter()
            malloc_trim()
            steps.append(("malloc_trim", time.perf_counter() - t0))
            rss1 = vram_snapshot("cpu").rss_mib
            if rss0 is not None and rss1 is not None:
                events.append(
                    f"closed MinerU's {self.settings.backend.local_engine} engine ({self.local_vlm.get('backend')}) "
                    f"and returned freed heap pages (malloc_trim): process RSS {rss0:.0f} -> {rss1:.0f} MiB"
                )
        t0 = time.perf_counter()
        parked: dict[str, Any] = self._park() if park else {}
        if park and self.settings.backend.local_engine is not None:
            reason = _NOT_PARKED.format(engine=self.settings.backend.local_engine)
            parked["reason"] = f"{parked['reason']}; {reason}" if parked.get("reason") else reason
        released = self.runtime.release_models(tracker)  # what was not parked
        steps.append(("drop MinerU cache entries", time.perf_counter() - t0))
        if parked.get("models"):
            steps.insert(len(steps) - 1, ("park models in host memory", parked["seconds"]))
        self.runtime.deactivate()
        steps += return_allocator_memory(self.settings.device)
        return released + closed, steps, parked, events

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
        released, steps, parked, events = self._release(tracker, park=self.settings.keep_warm)
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
            events=events,
        )

    def abandon(self) -> None:
        try:
            self.runtime.release_local_vlm(AliveTracker())
            self.runtime.release_models(AliveTracker())
            self.runtime.deactivate()
        except Exception:
            pass


# keep_warm with MinerU's in-process engine: what the receipt's parked["reason"] says.
_NOT_PARKED = (
    "MinerU's {engine} engine cannot be parked: mineru_llama_cpp.Engine has no call that moves its weights "
    "and KV cache (on a GPU: Vulkan memory) to host memory and back, so it was closed as in any release; "
    "the next session loads it again from the GGUF files, which the OS page cache usually still holds"
)

# ggml's Vulkan back-end reads GGML_VK_VISIBLE_DEVICES when it first sets up its devices, once per
# process: the value the first in-process llama.cpp engine loaded with, which later ones must match.
_vulkan_visible: str | None = None
_vulkan_lock = threading.Lock()


def _llama_cpp_environ(device: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """The variables MinerU's in-process llama.cpp engine loads with, and those it must not see.

    Vulkan ignores ``CUDA_VISIBLE_DEVICES``. ``cuda:N`` is matched to its Vulkan device by
    NVML's UUID (else PCI address), as the resident engine does, and that index is made the
    only visible one; ``cpu`` makes no Vulkan device visible, so llama.cpp runs on its CPU
    back-end. ggml-vulkan places buffers in host memory (not counted by NVML, many times
    slower) when ``GGML_VK_ALLOW_SYSMEM_FALLBACK`` or ``GGML_VK_PREFER_HOST_MEMORY`` is set to
    anything: both are unset while the engine loads and sets its device up.

    Raises:
        BackendNotAvailableError: the Vulkan device of ``cuda:N`` cannot be found.
        ConfigurationError: an engine loaded in this process earlier was set up for another
            device, which ggml-vulkan will not change within a process.
    """
    from ._config import child_environ, getenv
    from ._engine.backends.llama_cpp_vulkan import HOST_MEMORY_VARIABLES, vulkan_index
    from ._exceptions import BackendNotAvailableError, EngineStartError

    if device == "cpu":
        visible = ""
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mineru-vram-vulkan-") as folder:
            try:
                visible = str(vulkan_index(device, child_environ(), Path(folder)))
            except EngineStartError as exc:
                raise BackendNotAvailableError(
                    f"MinerU's llama.cpp engine cannot run on {device}: {exc}", device=device
                ) from exc
    with _vulkan_lock:
        if _vulkan_visible is not None and _vulkan_visible != visible:
            raise ConfigurationError(
                f"MinerU's llama.cpp engine was loaded in this process for another device (Vulkan devices "
                f"{_vulkan_visible!r}, asked: {visible!r} for {device}), and ggml-vulkan sets its devices up once "
                "per process; use isolation='process' for sessions on other devices",
                device=device,
            )
    dropped = [name for name in HOST_MEMORY_VARIABLES if getenv(name) is not None]
    if dropped:
        logger.warning(
            "unsetting %s while MinerU's llama.cpp engine loads: ggml-vulkan would place its buffers in host "
            "memory (set to any value, 0 included) instead of failing when the device is full",
            ", ".join(dropped),
        )
    return {"GGML_VK_VISIBLE_DEVICES": visible}, tuple(HOST_MEMORY_VARIABLES)


def _clear_frames(exc: BaseException) -> None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if cur.__traceback__ is not None:
            traceback.clear_frames(cur.__traceback__)
        cur = cur.__cause__ or cur.__context__
