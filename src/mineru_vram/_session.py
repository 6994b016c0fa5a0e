"""``ModelSession``: MinerU's models for the length of a ``with`` block.

The session owns validation, state and the receipt; the work itself is done by a
*runner* (``_inprocess.py``): :class:`~mineru_vram._inprocess.InProcessRunner`
loads MinerU's models into this process, and the worker runner
(``_worker/runner.py``) loads them into a child process that runs an
``InProcessRunner`` of its own, so both modes share one code path for parsing and
release.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from ._budget import Ledger, Reservation, VramBudget, admit, resolve_budget
from ._config import env_settings, resolve_backend
from ._documents import Document, Source, load_document, parse_pages
from ._events import emit as _emit_phase  # timeline phase events
from ._exceptions import ConfigurationError, MineruVramError, SessionStateError, VramLeakError
from ._inprocess import InProcessRunner, ParseOptions, Runner, SessionSettings
from ._probe import VramSnapshot, cuda_device_problem, resolve_device, vram_snapshot
from ._release import ReleaseReport, log_report
from ._result import BatchItem, BatchResult, ParseResult

__all__ = ["ModelSession", "SessionState"]

logger = logging.getLogger("mineru_vram")

Isolation = Literal["none", "process"]

# How long close() waits by default for parses running in other threads before it gives up
# (it releases nothing under a running parse).
CLOSE_TIMEOUT_SECONDS = 600.0


class SessionState(enum.Enum):
    """Lifecycle of a :class:`ModelSession`."""

    UNOPENED = "unopened"  # constructed; nothing loaded, nothing touched
    OPENING = "opening"  # loading models (or starting the worker)
    OPENED = "opened"  # models resident; parse() allowed
    CLOSING = "closing"  # releasing and measuring
    CLOSED = "closed"  # released; the session cannot be reopened


def _make_runner(settings: SessionSettings) -> Runner:
    if settings.isolation == "process":
        from ._worker.runner import WorkerRunner

        return WorkerRunner(settings)
    return InProcessRunner(settings)


def _abandon(runner: Runner, pid: int) -> None:
    # weakref.finalize safety net for a session that was never closed: only in the
    # process that created it (a forked child must not release its parent's models).
    if os.getpid() != pid:
        return
    try:
        runner.abandon()
    except Exception:
        pass


# Pages a document may have unless the session says otherwise: past a long book, and far from what a
# small file with one page referenced thousands of times makes MinerU render and hold.
DEFAULT_MAX_PAGES = 2000


class ModelSession:
    """MinerU's models, loaded on enter and released on exit, with a receipt.

    Example::

        with ModelSession(backend="pipeline") as s:
            result = s.parse("paper.pdf")
        print(s.release_report)

    Args:
        backend: ``"pipeline"`` (MinerU's basic tier: layout, OCR, formula and table
            models), ``"flash"`` (no models for text PDFs), or ``"vlm"`` / ``"hybrid"``
            with an ``engine``. MinerU 2.x names (``vlm-transformers``,
            ``vlm-sglang-engine``, ``vlm-sglang-client``) are accepted.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``N``; default the first GPU, else CPU.
        models_dir: a MinerU model tree (``base_dir``), e.g. one written by
            :func:`mineru_vram.testing.write_random_models` or by MinerU's downloader.
            ``None`` uses MinerU's own configured location and source.
        isolation: ``"none"`` loads models into this process; ``"process"`` into a
            worker whose exit returns everything, the CUDA context included.
        engine: for the VLM backends: a :class:`ResidentEngine`, or ``"llama-cpp"`` (also
            MinerU's names ``"llama-cpp-engine"`` and ``"vlm-llama-cpp-engine"``) for MinerU's
            own in-process llama.cpp engine (``mineru_llama_cpp.Engine``), loaded on enter from
            ``<models_dir>/MinerU2.5-Pro-2605-1.2B-GGUF`` (MinerU's registry layout), closed on
            exit and counted in the receipt. With ``isolation="process"`` it lives in the worker.
        strict: raise :class:`VramLeakError` from ``close`` when the receipt is not clean.
        leak_tolerance_mib: NVML residual allowed by ``strict`` (default 32).
        preload: ``"core"`` loads what MinerU loads up front (OCR, layout);
            ``"all"`` also the formula and table models MinerU loads lazily.
        ocr_mode: default for ``parse``: ``"auto"``, ``"txt"`` or ``"ocr"``.
        max_document_bytes: inputs larger than this are rejected before parsing.
        max_pages: PDFs with more pages are rejected before parsing (default 2,000: a
            229 KiB file can name one page 20,000 times and grow a parse past 9 GiB;
            ``None`` for no limit).
        keep_model_output: keep MinerU's raw model output on each result.
        context_floor_mib: the bare CUDA-context cost, for ``strict`` to tell a
            context from a leak; measured once in a child process when ``strict``
            needs it and it is not given.
        recycle_after: (process isolation) replace the worker after N documents.
        recycle_above_mib: (process isolation) replace the worker once its memory grew
            by more than this since its first document.
        budget: a :class:`VramBudget` (or MiB as ``int``, a fraction as ``float`` <= 1):
            ``open`` waits until the device has it free (NVML, other processes
            counted) and reserves it in the cross-process ledger; MinerU's
            ``MINERU_VIRTUAL_VRAM_SIZE`` is derived from it inside the session.
        oom_retry: on a CUDA out-of-memory error, release what the document held and
            retry it once on halved batches before raising :class:`OutOfMemoryError`.
        keep_warm: on exit, release the GPU as always but park the models in host memory
            (:func:`mineru_vram.warm_cache`), so the next session with the same settings
            restores them instead of loading from disk. With ``isolation="process"``, a
            spare worker is kept ready (models imported and built on the CPU, no CUDA
            context) for the next isolated session.
        allow_download: let MinerU download missing models on first use (default); with
            ``False`` missing models raise :class:`ModelsNotAvailableError` at once.
        worker_memory_mib: (process isolation) host memory the worker and the processes it
            starts may hold during a parse; over it the worker is killed and the parse raises
            :class:`WorkerCrashedError` (``reason="memory"``). ``"auto"``: half the host's memory;
            ``None``: no bound.
        gc_freeze: once the models are loaded, move every object of the process out of
            Python's garbage-collector generations (``gc.freeze()``), so the full collection
            that a parse triggers does not walk the loaded stack again (MinerU's modules and
            models are about 600,000 objects: 0.3 s a page on a 2-core CPU). Undone
            (``gc.unfreeze()``) before the models are released. Default: on in the worker
            of ``isolation="process"``, which is the library's own process; off in yours,
            since the freeze is process-wide and undoing it undoes any ``gc.freeze()`` of
            your own.
        trust_env: read ``MINERU_VRAM_*`` variables for unset arguments.
    """

    def __init__(
        self,
        backend: str = "pipeline",
        *,
        device: str | int | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        isolation: Isolation | None = None,
        engine: Any = None,
        strict: bool | None = None,
        leak_tolerance_mib: float | None = None,
        preload: Literal["core", "all"] = "core",
        ocr_mode: Literal["auto", "txt", "ocr"] = "auto",
        max_document_bytes: int | None = 512 * 1024 * 1024,
        max_pages: int | None = DEFAULT_MAX_PAGES,
        keep_model_output: bool = False,
        small_backend: Literal["torch", "onnx", "auto"] = "torch",
        context_floor_mib: float | None = None,
        recycle_after: int | None = None,
        recycle_above_mib: float | None = None,
        worker_start_timeout: float = 300.0,
        budget: VramBudget | int | float | str | None = None,
        oom_retry: bool = True,
        keep_warm: bool | None = None,
        allow_download: bool | None = None,
        worker_memory_mib: float | Literal["auto"] | None = "auto",
        gc_freeze: bool | None = None,
        trust_env: bool = True,
    ) -> None:
        env = env_settings() if trust_env else {}
        spec = resolve_backend(backend, engine=engine)
        if device is None and "device" in env:
            device = env["device"]
        if models_dir is None and "models_dir" in env:
            models_dir = env["models_dir"]
        if isolation is None:
            isolation = env.get("isolation", "none")
        if isolation not in ("none", "process"):
            raise ConfigurationError(f"isolation={isolation!r}: expected 'none' or 'process'", isolation=isolation)
        if strict is None:
            strict = bool(env.get("strict", False))
        if keep_warm is None:
            keep_warm = bool(env.get("keep_warm", False))
        if allow_download is None:
            allow_download = bool(env.get("allow_download", True))
        if leak_tolerance_mib is None:
            leak_tolerance_mib = float(env.get("leak_tolerance_mib", 32.0))
        if preload not in ("core", "all"):
            raise ConfigurationError(f"preload={preload!r}: expected 'core' or 'all'", preload=preload)
        if ocr_mode not in ("auto", "txt", "ocr"):
            raise ConfigurationError(f"ocr_mode={ocr_mode!r}: expected 'auto', 'txt' or 'ocr'", ocr_mode=ocr_mode)
        for name, value in (("recycle_after", recycle_after), ("max_pages", max_pages)):
            if value is not None and value < 1:
                raise ConfigurationError(f"{name}={value!r}: must be at least 1", **{name: value})
        if (recycle_after is not None or recycle_above_mib is not None) and isolation != "process":
            raise ConfigurationError(
                "recycle_after / recycle_above_mib replace a worker process: they need isolation='process'"
            )
        models_path = None if models_dir is None else Path(models_dir).expanduser().resolve()
        if models_path is not None and not models_path.is_dir():
            raise ConfigurationError(f"models_dir={str(models_dir)!r} is not a directory", models_dir=str(models_dir))
        vlm_config = None
        if spec.local_engine is not None:
            # MinerU's own engine, in the runner's process: MinerU builds it from this config
            # (and its model tree) when the runner opens.
            engine = None
            vlm_config = {"engine": spec.local_engine}
        elif engine is not None:
            vlm_config = engine.vlm_config()
        self._engine = engine
        self.settings = SessionSettings(
            backend=spec,
            device=resolve_device(device),
            models_dir=models_path,
            small_backend=small_backend,
            preload=preload,
            strict=strict,
            leak_tolerance_mib=leak_tolerance_mib,
            context_floor_mib=context_floor_mib,
            keep_model_output=keep_model_output,
            vlm_config=vlm_config,
            isolation=isolation,
            recycle_after=recycle_after,
            recycle_above_mib=recycle_above_mib,
            worker_start_timeout=worker_start_timeout,
            runtime_dir=env.get("runtime_dir"),
            trust_env=trust_env,
            oom_retry=oom_retry,
            keep_warm=keep_warm,
            allow_download=allow_download,
            worker_memory_mib=worker_memory_mib,
            gc_freeze=isolation == "process" if gc_freeze is None else bool(gc_freeze),
        )
        self.budget = resolve_budget(budget)
        _check_device(self.settings.device, self.budget)
        self.reservation: Reservation | None = None
        self.ocr_mode = ocr_mode
        self.max_document_bytes = max_document_bytes
        self.max_pages = max_pages
        self._state = SessionState.UNOPENED
        self._state_lock = threading.RLock()
        # Parses running now (from any thread); close() waits for them, and notify_all says one ended.
        self._parsing = 0
        self._parse_ended = threading.Condition(self._state_lock)
        self._releasing = False  # close() got past the wait and is releasing
        self._runner: Runner | None = None
        self._finalizer: weakref.finalize[..., Any] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.release_report: ReleaseReport | None = None
        self.documents_parsed = 0

    # -- state ---------------------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def backend(self) -> str:
        return self.settings.backend.name

    @property
    def device(self) -> str:
        return self.settings.device

    @property
    def baseline(self) -> VramSnapshot | None:
        """This process's memory before the session loaded anything."""
        return None if self._runner is None else self._runner.baseline

    @property
    def runner(self) -> Runner | None:
        """The runner that holds the models (for diagnostics and tests)."""
        return self._runner

    def __repr__(self) -> str:
        return (
            f"ModelSession(backend={self.backend!r}, device={self.device!r}, "
            f"isolation={self.settings.isolation!r}, state={self._state.value})"
        )

    def _emit(self, event: str, **info: Any) -> None:
        """A timeline phase event (to the events file only where this session trusts the environment)."""
        _emit_phase(event, trust_env=self.settings.trust_env, **info)

    def _phase_info(self) -> dict[str, Any]:
        # What each timeline phase event carries; ``session`` pairs starts with ends.
        return {
            "session": f"{id(self):x}",
            "backend": self.backend,
            "device": self.device,
            "isolation": self.settings.isolation,
        }

    def _require_open(self, what: str) -> Runner:
        state = self._state
        if state is SessionState.OPENED and self._runner is not None:
            return self._runner
        if state is SessionState.UNOPENED:
            raise SessionStateError(
                f"cannot {what}: the session is not open; use `with ModelSession(...) as s:` or call open() first"
            )
        if state is SessionState.CLOSING:
            raise SessionStateError(f"cannot {what}: the session is closing (close() was called); create a new one")
        if state is SessionState.CLOSED:
            raise SessionStateError(f"cannot {what}: the session is closed; create a new ModelSession")
        raise SessionStateError(f"cannot {what}: the session is {state.value}")

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> ModelSession:
        """Load the models. Called by ``with``; a session opens once.

        Raises:
            SessionStateError: the session was opened before.
        """
        with self._state_lock:
            if self._state is not SessionState.UNOPENED:
                if self._state is SessionState.CLOSED:
                    raise SessionStateError("this ModelSession is closed; a session cannot be reopened")
                raise SessionStateError(
                    f"this ModelSession is already {self._state.value}; a session can be entered only once"
                )
            self._state = SessionState.OPENING
        try:
            if self.budget is not None:
                # Admission: wait until the device has the budget free and reserve
                # it in the cross-process ledger before anything loads.
                self.reservation = admit(
                    self.budget,
                    self.settings.device,
                    what=f"ModelSession({self.backend})",
                    ledger=Ledger(self.settings.runtime_dir, trust_env=self.settings.trust_env),
                )
                if self.reservation.virtual_vram_gb is not None:
                    self.settings = dataclasses.replace(self.settings, virtual_vram_gb=self.reservation.virtual_vram_gb)
            self._emit("load.start", **self._phase_info())
            runner = _make_runner(self.settings)
            runner.open()
            worker_pid = getattr(runner, "pid", None)
            if self.reservation is not None and worker_pid is not None:
                self.reservation.set_pids([os.getpid(), worker_pid])  # the worker spends the reservation
        except BaseException as exc:
            self._emit("load.end", ok=False, error=_error_text(exc), **self._phase_info())
            self._state = SessionState.CLOSED
            if self.reservation is not None:
                self.reservation.release()
            raise
        self._emit("load.end", ok=True, **self._phase_info())
        self._runner = runner
        self._finalizer = weakref.finalize(self, _abandon, runner, os.getpid())
        self._state = SessionState.OPENED
        return self

    def close(self, *, timeout: float | None = CLOSE_TIMEOUT_SECONDS) -> ReleaseReport | None:
        """Release the models and measure. Idempotent; returns the receipt.

        Parses running in other threads are waited for first: nothing is released under
        them. From the moment close is called, new parses raise :class:`SessionStateError`.

        Args:
            timeout: how long to wait for running parses (``None``: as long as they take).

        Raises:
            SessionStateError: parses were still running after ``timeout``. Nothing was
                released; the session stays closing, and close can be called again.
            VramLeakError: with ``strict=True``, when the receipt is not clean.
        """
        with self._state_lock:
            if self._state in (SessionState.CLOSED, SessionState.UNOPENED) or self._releasing:
                if self._state is SessionState.UNOPENED:
                    self._state = SessionState.CLOSED
                return self.release_report
            self._state = SessionState.CLOSING
            if not self._parse_ended.wait_for(lambda: self._parsing == 0, timeout=timeout):
                raise SessionStateError(
                    f"close() waited {timeout:g}s for {self._parsing} parse(s) running in other threads to end "
                    f"(close(timeout=...), default {CLOSE_TIMEOUT_SECONDS:g}s); nothing was released and new parses "
                    "are refused. Call close() again once they end.",
                    timeout=timeout,
                    running=self._parsing,
                )
            if self._releasing:  # another thread's close got here first
                return self.release_report
            self._releasing = True
        runner = self._runner
        assert runner is not None  # OPENED implies a runner
        self._emit("release.start", **self._phase_info())
        try:
            report = runner.close()
        finally:
            self._emit("release.end", **self._phase_info())
            if self._finalizer is not None:
                self._finalizer.detach()
            if self.reservation is not None:
                self.reservation.release()  # after the release, so others are admitted into freed memory
            self._state = SessionState.CLOSED
            if self._executor is not None:
                self._executor.shutdown(wait=False)
        if self.settings.strict and self.settings.context_floor_mib is None and report.context_created:
            from ._probe import measure_context_floor

            report.context_floor_mib = measure_context_floor(self.settings.device)
        self.release_report = report
        log_report(report)
        if self.settings.strict and not report.ok:
            raise VramLeakError(f"VRAM not fully released: {'; '.join(report.problems())}", report=report)
        return report

    def __enter__(self) -> ModelSession:
        return self.open()

    def _leak_on_exit(self, leak: VramLeakError, exc: BaseException | None) -> None:
        """Raise a strict leak from ``__exit__``, unless the body is already raising.

        Never hide the body's own exception behind a leak report; log the leak instead.
        """
        if exc is None:
            raise leak
        logger.error("VRAM leak while handling %s: %s", type(exc).__name__, self.release_report)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except VramLeakError as leak:
            self._leak_on_exit(leak, exc)

    # -- parsing -------------------------------------------------------------------------------

    def load(self, source: Source, *, name: str | None = None) -> Document:
        """Validate a document the way ``parse`` does, without parsing it."""
        return load_document(source, name=name, max_bytes=self.max_document_bytes, max_pages=self.max_pages)

    def parse(
        self,
        source: Source,
        *,
        pages: str | int | Sequence[int] | range | None = None,
        ocr_mode: Literal["auto", "txt", "ocr"] | None = None,
        name: str | None = None,
        timeout: float | Literal["auto"] | None = "auto",
    ) -> ParseResult:
        """Parse one PDF.

        Args:
            source: a path, the PDF's bytes, or a binary file object.
            pages: 1-based pages to parse (``"1-3,7"``, ``5``, ``range(1, 4)``); default all.
            ocr_mode: ``"auto"``, ``"txt"`` or ``"ocr"``; default the session's.
            name: the document's name in results and errors (default its path).
            timeout: (process isolation) seconds before a parse that has not answered is
                stopped by killing its worker. ``"auto"``: a default bound, 600 s plus
                120 s for each page parsed, which only a worker that hangs reaches;
                ``None``: no bound. In-process parses cannot be interrupted: there a
                number is refused and ``"auto"`` bounds nothing.

        Raises:
            InvalidDocumentError: (and subclasses) the input is not a parseable PDF;
                raised before any model runs.
            ParseError: MinerU failed on the document.
            OutOfMemoryError: the device ran out of memory.
            ParseTimeoutError: (process isolation) no result within ``timeout``; the
                message names the bound.
            WorkerCrashedError: (process isolation) the worker died.
            SessionStateError: the session is not open.
        """
        with self._state_lock:
            runner = self._require_open("parse")
            self._parsing += 1  # close() waits until this parse has ended
        try:
            return self._parse(runner, source, pages=pages, ocr_mode=ocr_mode, name=name, timeout=timeout)
        finally:
            with self._state_lock:
                self._parsing -= 1
                self._parse_ended.notify_all()

    def _parse(
        self,
        runner: Runner,
        source: Source,
        *,
        pages: str | int | Sequence[int] | range | None,
        ocr_mode: str | None,
        name: str | None,
        timeout: float | str | None,
    ) -> ParseResult:
        t0 = time.perf_counter()
        # Timeline phases: parse.start / parse.end around the whole call.
        phase = {**self._phase_info(), "document": name or _display_name(source)}
        self._emit("parse.start", **phase)
        try:
            doc = self.load(source, name=name)
            mode = ocr_mode or self.ocr_mode
            if mode not in ("auto", "txt", "ocr"):
                raise ConfigurationError(f"ocr_mode={mode!r}: expected 'auto', 'txt' or 'ocr'", ocr_mode=mode)
            options = ParseOptions(page_range=parse_pages(pages, doc.page_count), ocr_mode=mode, timeout=timeout)
            if self._engine is not None:
                # The engine's lease wakes or (re)starts it, counts the request for keep_alive and
                # sleep, and turns a parse that failed because the engine died into EngineCrashedError.
                with self._engine.lease() as vlm_config:
                    result = runner.parse(doc, dataclasses.replace(options, vlm_config=vlm_config))
            else:
                result = runner.parse(doc, options)
        except BaseException as exc:
            self._emit("parse.end", ok=False, error=_error_text(exc), **phase)
            raise
        self._emit("parse.end", ok=True, pages=result.page_count, **phase)
        self.documents_parsed += 1
        return dataclasses.replace(result, seconds=time.perf_counter() - t0)

    def parse_many(
        self,
        sources: Iterable[Source],
        *,
        progress: bool = True,
        pages: str | int | Sequence[int] | range | None = None,
        ocr_mode: Literal["auto", "txt", "ocr"] | None = None,
        timeout: float | Literal["auto"] | None = "auto",
    ) -> BatchResult:
        """Parse documents one after another; a bad one does not stop the batch.

        Each document's error is kept with its name in the result (see
        :attr:`BatchResult.failures`). Errors that are not about a document
        (a closed session, Ctrl-C) still propagate.
        """
        self._require_open("parse_many")
        items = list(sources)
        bar = _progress_bar(len(items), enabled=progress)
        out: list[BatchItem] = []
        t0 = time.perf_counter()
        try:
            for source in items:
                doc_name = _display_name(source)
                try:
                    result = self.parse(source, pages=pages, ocr_mode=ocr_mode, timeout=timeout)
                except SessionStateError:
                    raise
                except MineruVramError as exc:
                    logger.warning("%s failed: %s", doc_name, exc)
                    out.append(BatchItem(document=getattr(exc, "document", doc_name), error=exc))
                else:
                    out.append(BatchItem(document=result.document, result=result))
                if bar is not None:
                    bar.set_postfix_str(Path(doc_name).name[:30], refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return BatchResult(items=tuple(out), seconds=time.perf_counter() - t0)

    def snapshot(self) -> VramSnapshot:
        """A :func:`vram_snapshot` of this session's device (this process's view)."""
        return vram_snapshot(self.settings.device)

    # -- async ---------------------------------------------------------------------------------

    def _executor_for_async(self) -> concurrent.futures.ThreadPoolExecutor:
        # One thread, owned by the session: MinerU's models are used from one thread at a
        # time, and the event loop never blocks on GPU work.
        with self._state_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="mineru-vram-session"
                )
            return self._executor

    async def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor_for_async(), lambda: fn(*args, **kwargs))

    async def aopen(self) -> ModelSession:
        """``open`` on the session's executor."""
        await self._run(self.open)
        return self

    async def aparse(self, source: Source, **kwargs: Any) -> ParseResult:
        """``parse`` on the session's executor; takes the same arguments."""
        return await self._run(self.parse, source, **kwargs)  # type: ignore[no-any-return]

    async def aparse_many(self, sources: Iterable[Source], **kwargs: Any) -> BatchResult:
        """``parse_many`` on the session's executor; takes the same arguments."""
        return await self._run(self.parse_many, list(sources), **kwargs)  # type: ignore[no-any-return]

    async def aclose(self, *, timeout: float | None = CLOSE_TIMEOUT_SECONDS) -> ReleaseReport | None:
        """``close`` on the session's executor; takes the same arguments."""
        if self._state is SessionState.UNOPENED or self._executor is None:
            return self.close(timeout=timeout)
        executor = self._executor
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, lambda: self.close(timeout=timeout))

    async def __aenter__(self) -> ModelSession:
        return await self.aopen()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        except VramLeakError as leak:
            self._leak_on_exit(leak, exc)


def _check_device(device: str, budget: VramBudget | None) -> None:
    """Refuse a CUDA device this process cannot use, before any work.

    Without the check, MinerU's flash tier reports ``cuda:0`` and runs on the CPU, and
    the pipeline fails inside torch. A budget's probe stands in for NVML where one is
    given (tests of admission on machines without a GPU).

    Raises:
        ConfigurationError: naming what NVML (or the budget's probe, or torch) found.
    """
    if not device.startswith("cuda"):
        return
    if budget is not None and budget.probe is not None:
        problem = None if budget.probe(device) is not None else f"the budget's probe does not see {device}"
    else:
        problem = cuda_device_problem(device)
    if problem is not None:
        raise ConfigurationError(
            f"device={device!r} cannot be used: {problem}. Use device='cpu', or leave device unset to "
            "take the first GPU where there is one.",
            device=device,
        )


def _error_text(exc: BaseException) -> str:
    # For timeline phase events: the error's type and the start of its message.
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _display_name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def _progress_bar(total: int, *, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a MinerU dependency, but the session must not need it
        return None
    return tqdm(total=total, unit="doc", desc="mineru-vram")
