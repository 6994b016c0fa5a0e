"""The parent's side of process isolation: :class:`WorkerRunner`.

In-process release cannot return the CUDA context nor what libraries below MinerU
keep in their own pools; the exit of a process returns all of it. With
``ModelSession(isolation="process")`` the session's runner is a
:class:`WorkerRunner`: it starts a worker (a fresh interpreter, never a fork),
which builds an :class:`~mineru_vram._inprocess.InProcessRunner` of its own and
parses with it, so both modes share one code path for parsing.

The parent never imports torch or MinerU for the worker and never creates a
CUDA context. It supervises:

* **Death with the parent, process groups.** Each worker runs under the keeper of
  :func:`mineru_vram._process.spawn`, in its own process group, which is killed
  when this process dies (even by ``SIGKILL``) and when the worker is stopped, so
  nothing it started survives it.
* **Crashes.** A worker that dies during a parse raises :class:`WorkerCrashedError`
  naming the document, with the exit code and the tail of the worker's log; the
  next parse starts a new worker and the event is recorded.
* **Timeouts.** ``parse(..., timeout=s)`` kills a worker that does not answer in
  time and raises :class:`ParseTimeoutError`.
* **Recycling.** After each document the worker reports its host RSS and its
  device memory; the parent replaces it between documents after
  ``recycle_after`` documents or when it grew by more than ``recycle_above_mib``
  since its first document.
* **Release.** Closing asks the worker to exit, kills its group after a grace
  period, then polls NVML until the worker is gone from the device and the device
  is back at its pre-session level; the receipt says how long that took.

The runner's files (worker logs, payload files, the workers' temporary files) live
in a private folder that holds its owner's lock: close removes it, and the next
runner removes the folders of owners that died without closing.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import logging
import os
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mineru_vram import _files, _process
from mineru_vram._documents import Document
from mineru_vram._exceptions import (
    ParseTimeoutError,
    SessionStateError,
    WorkerCrashedError,
    WorkerStartError,
    add_note,
)
from mineru_vram._inprocess import check_parse_timeout
from mineru_vram._probe import MIB, VramSnapshot
from mineru_vram._release import ReleaseReport, settle

from . import protocol
from .device import wait_device_back, wait_gone_from_device
from .handle import WorkerDied, WorkerHandle, WorkerOverMemory, WorkerTimedOut, last_lines

if TYPE_CHECKING:
    from mineru_vram._inprocess import ParseOptions, SessionSettings
    from mineru_vram._result import ParseResult

__all__ = ["RunnerState", "WorkerRunner"]

logger = logging.getLogger("mineru_vram")

# Payloads larger than this go through a file in the runner's folder instead of the pipe.
# Kept under a socket buffer, so sending a document to a hung worker cannot block past
# the parse timeout.
INLINE_LIMIT = 64 * 1024
# A worker's log is cut back to its tail once it grows past this (a long-lived worker
# parsing thousands of documents must not fill the disk with MinerU's progress lines).
LOG_LIMIT = 8 * MIB
LOG_KEEP_CHARS = 64_000
# Longest wait for a worker that was asked to exit before its group is killed.
STOP_GRACE_SECONDS = 5.0
# The default bound on one parse (timeout="auto"): far more than a slow CPU parse of real
# pages needs, lazy model loads on a worker's first document included, so that only a
# worker that hangs reaches it.
PARSE_TIMEOUT_BASE_SECONDS = 600.0
# worker_memory_mib="auto": the worker's process tree may take at most this share of the host's memory
# during a parse (a small file can make MinerU render and hold far more than the host has).
WORKER_MEMORY_SHARE = 0.5
PARSE_TIMEOUT_PER_PAGE_SECONDS = 120.0
# Longest wait in close() for the runner's lock (held by a parse in another thread).
CLOSE_WAIT_SECONDS = 600.0
# Longest wait for a test hook's answer.
DEBUG_TIMEOUT = 60.0
# Per-document memory samples kept on the runner (a deque: a long session stays bounded).
MAX_SAMPLES = 10_000
# Events (starts, crashes, recycles...) and per-worker histories kept likewise.
MAX_EVENTS = 1000
# Runner folders carry the parent's pid in their name (for people reading /tmp) and an
# owner lock, so a later runner can remove the folder of a parent killed before it cleaned up.
FOLDER_PREFIX = "mineru-vram-worker-"


def _pages_in(page_range: str) -> int:
    """How many pages a MinerU page range (``"1-5,7"``, 1-based) names."""
    total = 0
    for part in page_range.split(","):
        first, _, last = part.strip().partition("-")
        total += (int(last) - int(first) + 1) if last else 1
    return max(1, total)


def parse_bound(doc: Document, options: ParseOptions) -> tuple[float | None, str]:
    """How long a parse may take in the worker (``None``: for ever), and how to name that bound in an error."""
    timeout = options.timeout
    if timeout is None:
        return None, "timeout=None"
    if timeout != "auto":
        return float(timeout), f"timeout={timeout:g}"
    pages = _pages_in(options.page_range) if options.page_range else (doc.page_count or 1)
    bound = PARSE_TIMEOUT_BASE_SECONDS + PARSE_TIMEOUT_PER_PAGE_SECONDS * max(1, pages)
    return bound, (
        f"the default bound for {pages} page(s): {PARSE_TIMEOUT_BASE_SECONDS:g}s + "
        f"{PARSE_TIMEOUT_PER_PAGE_SECONDS:g}s a page; pass parse(timeout=...) for another bound, "
        "or timeout=None for none"
    )


class RunnerState(enum.Enum):
    """Lifecycle of a :class:`WorkerRunner`."""

    UNOPENED = "unopened"  # constructed; no folder, no process
    OPENED = "opened"  # a worker is running (or will be started by the next parse)
    CLOSED = "closed"  # every worker stopped, the folder removed; the receipt is written


class WorkerRunner:
    """A :class:`~mineru_vram._inprocess.Runner` whose models live in a worker process.

    Args:
        settings: the session's resolved settings (they travel to the worker).

    Attributes:
        baseline: this process's snapshot (with the device's figures) before the
            first worker started; the device must come back to it on close.
        events: what happened to workers (starts, crashes, timeouts, recycles), in order.
        samples: memory after each document: worker pid, RSS, device MiB.
    """

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.baseline: VramSnapshot | None = None
        # Bounded, like the samples: a session recycling after every document for weeks
        # must not grow without limit. Counters below stay exact.
        self.events: collections.deque[str] = collections.deque(maxlen=MAX_EVENTS)
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_SAMPLES)
        self.restarts = 0
        self.recycles = 0
        self.timeouts = 0
        self.crashes = 0
        self.documents = 0
        self._state = RunnerState.UNOPENED
        self._lock = threading.RLock()
        self._folder: Path | None = None
        self._folder_lock: _files.OwnerLock | None = None
        self._adopted: list[tuple[Path, _files.OwnerLock]] = []  # folders of spares this runner took
        self.spare: dict[str, Any] = {}  # the spare worker this runner started from, if any
        self._worker: WorkerHandle | None = None
        self._retired: list[WorkerHandle] = []  # asked to exit between documents, not yet reaped
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self._started = 0
        self._restart_reason: str | None = None  # set when the next start replaces a failed worker
        self._last_snapshot: VramSnapshot | None = None
        self._report: ReleaseReport | None = None

    # -- introspection -------------------------------------------------------------------------

    @property
    def state(self) -> RunnerState:
        return self._state

    @property
    def pid(self) -> int | None:
        """The current worker's pid, or ``None`` between a failure and the next parse."""
        worker = self._worker
        return None if worker is None else worker.pid

    @property
    def folder(self) -> Path | None:
        """The runner's private folder (worker logs, payload files)."""
        return self._folder

    def _event(self, text: str, *, level: int = logging.INFO) -> None:
        self.events.append(text)
        logger.log(level, "%s", text)

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Take the baseline and start the first worker (it loads the models).

        Raises:
            WorkerStartError: the worker could not start or load its models.
            SessionStateError: the runner was opened before.
            InsecurePathError: the runtime folder is not this user's alone.
        """
        with self._lock:
            if self._state is not RunnerState.UNOPENED:
                raise SessionStateError(f"this worker runner is {self._state.value}; it opens once")
            self.baseline = settle(self.settings.device)
            base = self.settings.runtime_dir
            if base is not None:
                _files.private_dir(base)
            _files.sweep_dead_owners(base, FOLDER_PREFIX)
            self._folder, self._folder_lock = _files.owned_temp_dir(f"{FOLDER_PREFIX}{os.getpid()}-", base)
            self._state = RunnerState.OPENED
            try:
                self._start_worker()
                if self.settings.keep_warm:
                    # For the next session with these settings: prepared while this one works.
                    from .spare import spare_pool

                    spare_pool().prepare(self.settings)
            except BaseException:
                self._shutdown_all()
                self._remove_folder()
                self._state = RunnerState.CLOSED
                raise

    def _start_worker(self) -> WorkerHandle:
        assert self._folder is not None
        self._reap_retired()
        self._started += 1
        t0 = time.perf_counter()
        worker = self._take_spare() if self._started == 1 and self.settings.keep_warm else None
        if worker is None:
            worker = WorkerHandle.spawn(self._folder, self._started)
        self._worker = worker
        self._load(worker)
        seconds = time.perf_counter() - t0
        if self.spare:
            self.spare["enter_seconds"] = round(seconds, 4)
        if self._restart_reason is not None:
            self.restarts += 1
            self._event(f"restarted the worker: pid {worker.pid} in {seconds:.1f}s ({self._restart_reason})")
            self._restart_reason = None
        else:
            self._event(f"started worker pid {worker.pid} in {seconds:.1f}s")
        return worker

    def _take_spare(self) -> WorkerHandle | None:
        """A spare worker prepared by an earlier session with these settings, adopted by this runner."""
        from .spare import spare_pool

        spare = spare_pool().take(self.settings, timeout=self.settings.worker_start_timeout)
        if spare is None:
            return None
        self._adopted.append((spare.folder, spare.lock))
        self.spare = {
            "pid": spare.worker.pid,
            "models": spare.prepared.models,
            "mib": round(spare.prepared.mib, 1),
            "prepare_seconds": round(spare.seconds, 3),
        }
        self._event(f"took spare worker pid {spare.worker.pid} ({spare.prepared.models} models built on the CPU)")
        return spare.worker

    def _load(self, worker: WorkerHandle) -> None:
        """Hand a started worker its settings and wait until it has loaded the models."""
        assert self._folder is not None
        child_settings = dataclasses.replace(
            self.settings, isolation="none", recycle_after=None, recycle_above_mib=None
        )
        timeout = self.settings.worker_start_timeout
        init = protocol.Init(settings=child_settings, folder=str(self._folder), inline_limit=INLINE_LIMIT)
        try:
            reply = worker.request(init, timeout=timeout)
        except WorkerDied:
            code = self._drop(worker, "died while starting (exit code {code})")
            tail = worker.log_tail()
            raise WorkerStartError(
                f"the worker (pid {worker.pid}) died while loading the models (exit code {code}, "
                f"{_process.signal_name(code) or 'no signal'}); last lines of its log:\n{last_lines(tail)}",
                exitcode=code,
                pid=worker.pid,
                log_tail=tail,
            ) from None
        except WorkerTimedOut:
            self._drop(worker, "start timed out")
            tail = worker.log_tail()
            raise WorkerStartError(
                f"the worker (pid {worker.pid}) did not load the models within worker_start_timeout={timeout}s; "
                f"last lines of its log:\n{last_lines(tail)}",
                pid=worker.pid,
                timeout=timeout,
                log_tail=tail,
            ) from None
        except BaseException:
            worker.kill()  # Ctrl-C while loading: leave no half-started worker behind
            self._worker = None
            raise
        if isinstance(reply, protocol.Error):
            err = reply.error
            self._drop(worker, "failed to load: " + type(err).__name__)
            add_note(err, f"raised in the mineru-vram worker (pid {worker.pid}) while loading:\n{reply.traceback}")
            if not isinstance(err, WorkerStartError):
                raise err  # a typed error (a bad setting...) is the same error as in-process
            raise WorkerStartError(
                f"the worker (pid {worker.pid}) could not load the models: {err}",
                pid=worker.pid,
                log_tail=worker.log_tail(),
            ) from err
        if not isinstance(reply, protocol.Ready):  # pragma: no cover - a protocol bug
            self._drop(worker, "answered " + type(reply).__name__ + " to Init")
            raise WorkerStartError(f"the worker (pid {worker.pid}) answered {type(reply).__name__} to Init")
        worker.ready = reply
        self._last_snapshot = reply.stats.snapshot

    def _drop(self, worker: WorkerHandle, end: str) -> int | None:
        """Kill a worker that failed to start and record why (``end``, with ``{code}``). Returns its exit code."""
        code = worker.kill()
        if self._worker is worker:
            self._worker = None
        worker.end = end.format(code=code)
        self._history.append(worker.summary())
        return code

    def _ensure_worker(self) -> WorkerHandle:
        worker = self._worker
        if worker is not None and worker.idle_and_alive():
            return worker
        if worker is not None:  # died while idle (killed from outside, OOM killer...)
            self.crashes += 1
            code = self._discard(worker, "exited while idle", f"pid {worker.pid} had exited while idle")
            self._event(
                f"worker pid {worker.pid} exited while idle (exit code {code}, "
                f"{_process.signal_name(code) or 'no signal'})",
                level=logging.WARNING,
            )
        return self._start_worker()

    def _retire(self, worker: WorkerHandle, reason: str) -> None:
        """Ask a worker to exit between documents; it is reaped before the next starts."""
        self.recycles += 1
        worker.end = f"recycled: {reason}"
        self._event(f"recycled worker pid {worker.pid} after {worker.documents} document(s): {reason}")
        with contextlib.suppress(WorkerDied):
            worker.send(protocol.Exit())
        self._retired.append(worker)
        self._worker = None

    def _reap_retired(self) -> None:
        """Wait for retired workers to be gone, from the process table and from the device.

        A new worker must not load its models while the old one still holds its own:
        two copies on the device is the OOM recycling exists to avoid.
        """
        while self._retired:
            worker = self._retired.pop(0)
            worker.stop(self._grace())
            self._history.append(worker.summary())
            wait_gone_from_device(self.settings.device, [worker.pid], timeout=self.settings.release_timeout)

    def _grace(self) -> float:
        return max(0.5, min(STOP_GRACE_SECONDS, float(self.settings.release_timeout)))

    # -- parsing -------------------------------------------------------------------------------

    def parse(self, doc: Document, options: ParseOptions) -> ParseResult:
        """Parse ``doc`` in the worker; start one first if none is running.

        Raises:
            ParseError, OutOfMemoryError: as in-process (raised in the worker, same type).
            ParseTimeoutError: no result within ``options.timeout``; the worker was killed.
            WorkerCrashedError: the worker died during the parse.
            WorkerStartError: a replacement worker could not start.
        """
        check_parse_timeout(options.timeout)
        bound, how = parse_bound(doc, options)
        if not self._lock.acquire(timeout=-1 if bound is None else bound):
            raise ParseTimeoutError(
                f"{doc.name}: waited {bound:g}s ({how}) for the worker, busy with a document from another thread",
                document=doc.name,
                timeout=bound,
            )
        try:
            if self._state is not RunnerState.OPENED:
                raise SessionStateError(f"cannot parse: the worker runner is {self._state.value}")
            worker = self._ensure_worker()
            assert self._folder is not None
            ref = protocol.document_ref(doc, self._folder, protocol.next_stem("doc"), INLINE_LIMIT)
            message = protocol.Parse(document=ref, options=dataclasses.replace(options, timeout=None))
            limit = self._memory_limit_mib()
            try:
                reply = worker.request(message, timeout=bound, memory_limit_mib=limit)
            except WorkerDied:
                raise self._crashed(worker, doc.name) from None
            except WorkerOverMemory as over:
                assert limit is not None
                raise self._over_memory(worker, doc.name, over.mib, limit) from None
            except WorkerTimedOut:
                assert bound is not None
                raise self._timed_out(worker, doc.name, bound, how) from None
            except BaseException:
                # Interrupted while the worker works: its answer would arrive out of step
                # with the next request, so this worker cannot be used again.
                self._discard(
                    worker,
                    "killed: the parent was interrupted during a parse",
                    f"pid {worker.pid} was killed when a parse was interrupted",
                )
                raise
            finally:
                ref.discard()
            if isinstance(reply, protocol.Result):
                try:
                    result: ParseResult = protocol.unpack(reply.payload)
                finally:
                    self._after_document(worker, doc.name, reply.stats, ok=True)
                return result
            if isinstance(reply, protocol.Error):
                exc = reply.error
                self._after_document(worker, doc.name, reply.stats, ok=False)
                add_note(exc, f"raised in the mineru-vram worker (pid {worker.pid}):\n{reply.traceback}")
                raise exc
            raise WorkerCrashedError(  # pragma: no cover - a protocol bug, not a user error
                f"{doc.name}: unexpected message {type(reply).__name__} from the worker",
                document=doc.name,
                pid=worker.pid,
            )
        finally:
            self._lock.release()

    def _discard(self, worker: WorkerHandle, end: str, restart_reason: str) -> int | None:
        """Kill a worker that failed, wait until the device has its memory back, and say why.

        Returns:
            Its exit code.
        """
        code = worker.kill()
        worker.end = f"{end} (exit code {code})"
        self._history.append(worker.summary())
        if self._worker is worker:
            self._worker = None
        self._restart_reason = restart_reason
        # The next worker must not load beside the remains of this one.
        wait_gone_from_device(self.settings.device, [worker.pid], timeout=self.settings.release_timeout)
        return code

    def _memory_limit_mib(self) -> float | None:
        """The host-memory bound of the worker's process tree during a parse (``None``: none)."""
        limit = self.settings.worker_memory_mib
        if limit == "auto":
            import psutil

            return float(psutil.virtual_memory().total) / MIB * WORKER_MEMORY_SHARE
        return None if limit is None else float(limit)

    def _over_memory(self, worker: WorkerHandle, document: str, held: float, limit: float) -> WorkerCrashedError:
        self.crashes += 1
        code = self._discard(
            worker, f"killed: {document} took {held:.0f} MiB", f"pid {worker.pid} went over its memory bound"
        )
        self._event(
            f"worker pid {worker.pid} killed: {document} took {held:.0f} MiB of host memory, over "
            f"worker_memory_mib={limit:.0f}; a new worker starts on the next parse",
            level=logging.WARNING,
        )
        return WorkerCrashedError(
            f"{document}: the worker (pid {worker.pid}) and its processes took {held:.0f} MiB of host memory while "
            f"parsing it, over worker_memory_mib={limit:.0f} MiB; it was killed and a new worker starts on the next "
            "parse. Pass a larger worker_memory_mib (or None) to ModelSession for documents that need it.",
            document=document,
            exitcode=code,
            pid=worker.pid,
            reason="memory",
            memory_mib=held,
            limit_mib=limit,
        )

    def _crashed(self, worker: WorkerHandle, document: str) -> WorkerCrashedError:
        self.crashes += 1
        code = self._discard(worker, f"crashed on {document}", f"pid {worker.pid} crashed on {document}")
        tail = worker.log_tail()
        sig = _process.signal_name(code)
        self._event(
            f"worker pid {worker.pid} crashed while parsing {document} (exit code {code}, {sig or 'no signal'}); "
            "a new worker starts on the next parse",
            level=logging.WARNING,
        )
        how = f"was killed by {sig}" if sig else f"exited with code {code}"
        return WorkerCrashedError(
            f"{document}: the worker (pid {worker.pid}) {how} while parsing it; a new worker starts on the "
            f"next parse. Last lines of its log:\n{last_lines(tail)}",
            document=document,
            exitcode=code,
            signal=sig,
            pid=worker.pid,
            log_tail=tail,
        )

    def _timed_out(self, worker: WorkerHandle, document: str, timeout: float, how: str) -> ParseTimeoutError:
        self.timeouts += 1
        code = self._discard(
            worker,
            f"killed: {document} exceeded its timeout, {timeout:g}s",
            f"pid {worker.pid} was killed after {document} exceeded its timeout",
        )
        self._event(
            f"worker pid {worker.pid} killed: {document} had no result after its timeout, {timeout:g}s ({how}); "
            "a new worker starts on the next parse",
            level=logging.WARNING,
        )
        return ParseTimeoutError(
            f"{document}: no result after {timeout:g}s ({how}); the worker (pid {worker.pid}) was killed and a "
            "new one starts on the next parse",
            document=document,
            timeout=timeout,
            pid=worker.pid,
            exitcode=code,
        )

    def _after_document(self, worker: WorkerHandle, document: str, stats: protocol.Stats, *, ok: bool) -> None:
        worker.documents += 1
        self.documents += 1
        sample = {
            "document": document,
            "index": self.documents,
            "pid": worker.pid,
            "worker_document": worker.documents,
            "ok": ok,
            "rss_mib": stats.rss_mib,
            "device_mib": stats.device_mib,
            "torch_reserved_mib": stats.torch_reserved_mib,
            "seconds": stats.seconds,
        }
        self.samples.append(sample)
        if stats.snapshot is not None:
            self._last_snapshot = stats.snapshot
        if worker.first is None:
            worker.first = sample
        if worker.log_path is not None:
            _process.trim_log(worker.log_path, LOG_LIMIT, LOG_KEEP_CHARS)
        reason = self._recycle_reason(worker, sample)
        if reason is not None:
            self._retire(worker, reason)

    def _recycle_reason(self, worker: WorkerHandle, sample: Mapping[str, Any]) -> str | None:
        limit = self.settings.recycle_after
        if limit is not None and worker.documents >= limit:
            return f"recycle_after={limit} documents reached"
        above = self.settings.recycle_above_mib
        first = worker.first
        if above is None or first is None or first is sample:
            return None
        for key, what in (("device_mib", "device memory"), ("rss_mib", "host RSS")):
            now, then = sample.get(key), first.get(key)
            if now is None or then is None:
                continue
            grown = float(now) - float(then)
            if grown > above:
                return (
                    f"{what} grew {grown:.0f} MiB since its first document ({then:.0f} -> {now:.0f} MiB), "
                    f"over recycle_above_mib={above:g}"
                )
        return None

    # -- release -------------------------------------------------------------------------------

    def close(self) -> ReleaseReport:
        """Stop every worker and wait until the device is back at the baseline.

        Idempotent: a second call returns the first receipt.

        Raises:
            SessionStateError: a parse from another thread still held the worker after
                ``CLOSE_WAIT_SECONDS``; nothing was stopped, and close can be called again.
        """
        if not self._lock.acquire(timeout=CLOSE_WAIT_SECONDS):
            raise SessionStateError(
                f"close waited {CLOSE_WAIT_SECONDS:g}s (CLOSE_WAIT_SECONDS) for a parse in another thread to end; "
                "the worker is still running. Call close() again once the parse has ended.",
                timeout=CLOSE_WAIT_SECONDS,
            )
        try:
            return self._close()
        finally:
            self._lock.release()

    def _close(self) -> ReleaseReport:
        """close() under the runner's lock."""
        if self._report is not None:
            return self._report
        if self._state is RunnerState.UNOPENED:
            raise SessionStateError("cannot close a worker runner that was never opened")
        t0 = time.perf_counter()
        device = self.settings.device
        before = self._last_snapshot
        models = 0
        worker = self._worker
        exitcode: int | None = None
        pids = [w.pid for w in self._retired]
        steps: list[tuple[str, float]] = []
        if worker is not None:
            pids.append(worker.pid)
            if worker.alive():
                try:
                    bye = worker.request(protocol.Exit(), timeout=self._grace())
                    if isinstance(bye, protocol.Bye):
                        before = bye.stats.snapshot or before
                        models = bye.models
                except (WorkerDied, WorkerTimedOut):
                    pass
            exitcode = worker.stop(self._grace())
            worker.end = worker.end or "session closed"
            self._history.append(worker.summary())
            self._worker = None
        self._reap_retired()
        stop_seconds = time.perf_counter() - t0
        steps.append(("stop worker", stop_seconds))
        base = None if self.baseline is None else self.baseline.device_info
        back, left, t_back, used_after = wait_device_back(
            device,
            base,
            pids,
            tolerance_mib=float(self.settings.leak_tolerance_mib),
            timeout=float(self.settings.release_timeout),
        )
        steps.append(("wait for NVML", time.perf_counter() - t0 - stop_seconds))
        after = settle(device)
        seconds = time.perf_counter() - t0
        if left:
            self._event("after release: " + "; ".join(left), level=logging.WARNING)
        base_used = None if base is None else base.used_mib
        last = self._history[-1] if self._history else {}
        worker_info: dict[str, Any] = {
            # The last worker: the one closed here, or the one that failed last.
            "pid": worker.pid if worker is not None else last.get("pid"),
            "exitcode": exitcode if worker is not None else last.get("exitcode"),
            "stop_seconds": round(stop_seconds, 4),
            # From the start of close until NVML showed the device back (None: cannot tell).
            "seconds_to_baseline": None if t_back is None or back is None else round(stop_seconds + t_back, 4),
            "nvml_wait_seconds": None if t_back is None or back is None else round(t_back, 4),
            "back_at_baseline": back,
            "device_used_baseline_mib": base_used,
            "device_used_after_mib": used_after,
            "device_residual_mib": None if used_after is None or base_used is None else used_after - base_used,
            "left": left,
            "workers_started": self._started,
            "restarts": self.restarts,
            "recycles": self.recycles,
            "crashes": self.crashes,
            "timeouts": self.timeouts,
            "documents": self.documents,
            "history": list(self._history),
            "spare": dict(self.spare),
        }
        self._remove_folder()
        self._state = RunnerState.CLOSED
        self._report = ReleaseReport(
            device=device,
            isolation="process",
            baseline=self.baseline,
            before=before,
            after=after,
            seconds=seconds,
            models_released=models,
            models_alive=[],
            steps=steps,
            context_created=False,  # the parent never initialises CUDA for the worker
            context_floor_mib=self.settings.context_floor_mib,
            tolerance_mib=self.settings.leak_tolerance_mib,
            events=list(self.events),
            worker=worker_info,
        )
        return self._report

    def _shutdown_all(self) -> None:
        for worker in [*self._retired, *([self._worker] if self._worker is not None else [])]:
            with contextlib.suppress(Exception):
                worker.kill()
        self._retired.clear()
        self._worker = None

    def _remove_folder(self) -> None:
        for folder, lock in self._adopted:
            shutil.rmtree(folder, ignore_errors=True)
            lock.release()
        self._adopted.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        if self._folder_lock is not None:
            self._folder_lock.release()
            self._folder_lock = None

    def abandon(self) -> None:
        """Finalizer path: kill every worker's process group and remove the folder. Never raises."""
        try:
            # No lock: a finalizer may run while another thread holds it mid-parse.
            for worker in [*self._retired, self._worker]:
                if worker is not None:
                    with contextlib.suppress(Exception):
                        worker.kill(wait=1.0)
            self._state = RunnerState.CLOSED
            self._remove_folder()
        except Exception:
            pass

    # -- test hooks ----------------------------------------------------------------------------

    def _debug(self, command: str, *args: Any) -> Any:
        """Test hook: run a debug command in the current worker and return its answer."""
        with self._lock:
            if self._state is not RunnerState.OPENED:
                raise SessionStateError(f"the worker runner is {self._state.value}")
            worker = self._ensure_worker()
            try:
                reply = worker.request(protocol.Debug(command=command, args=args), timeout=DEBUG_TIMEOUT)
            except WorkerDied:
                raise self._crashed(worker, f"<debug {command}>") from None
            except WorkerTimedOut:
                raise self._timed_out(worker, f"<debug {command}>", DEBUG_TIMEOUT, "DEBUG_TIMEOUT") from None
            if isinstance(reply, protocol.Error):
                add_note(reply.error, f"raised in the mineru-vram worker (pid {worker.pid}):\n{reply.traceback}")
                raise reply.error
            assert isinstance(reply, protocol.DebugReply)
            return reply.value

    def _debug_allocate_mib(self, mib: float, *, on_device: bool = False) -> protocol.Stats:
        """Test hook: make the worker hold ``mib`` more host (or device) memory, as a leak would."""
        return self._debug("allocate_mib", float(mib), on_device)  # type: ignore[no-any-return]

    def _debug_raise(self, exc: BaseException) -> None:
        """Test hook: the worker raises ``exc`` and sends it back the way a parse error travels."""
        self._debug("raise", exc)
