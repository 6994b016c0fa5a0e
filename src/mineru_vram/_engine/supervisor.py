"""The engine's monitor thread: crash and hang detection, restart with backoff, keep-alive.

One daemon thread per running engine. It holds the engine only weakly between
rounds, so an engine nobody references can still be collected, and it exits when
the engine stops or gives up. Each round (every quarter of ``health_interval``,
at most 0.25 s) it:

* notices a server that exited, and restarts it (the crash streak doubles the
  delay each time, up to 30 s; after ``max_restarts`` in a row the engine is
  ``CRASHED`` and callers get :class:`~mineru_vram.EngineCrashedError`);
* every ``health_interval`` asks the server's health, awake or asleep, and after
  ``health_failures`` failures in a row kills it as hung and restarts it;
* puts an engine idle for ``keep_alive`` to sleep, or unloads it.

A server that was asleep when it died is restarted and put back to sleep: a
restart must not quietly take the memory back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING

from mineru_vram._exceptions import MineruVramError

from .reports import EngineState

if TYPE_CHECKING:
    from .engine import ResidentEngine

__all__ = ["Supervisor"]

logger = logging.getLogger("mineru_vram")

# The longest pause between restarts, however long the crash streak.
MAX_BACKOFF_SECONDS = 30.0


class Supervisor:
    """Watches one engine from a daemon thread.

    Args:
        engine: the engine; held weakly.
    """

    def __init__(self, engine: ResidentEngine) -> None:
        self._engine = weakref.ref(engine)
        self._stop = engine._stop_event
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._next_check = 0.0

    def start(self) -> None:
        """Start the thread if it is not running. Called each time the engine becomes ready."""
        if self._thread is not None and self._thread.is_alive():
            return
        engine = self._engine()
        if engine is None:
            return
        self._next_check = time.monotonic() + engine.settings.health_interval
        tick = min(0.25, max(0.02, engine.settings.health_interval / 4))
        self._thread = threading.Thread(target=self._main, args=(tick,), name="mineru-vram-engine-monitor", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the thread to end (not from the thread itself)."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=timeout)

    def _main(self, tick: float) -> None:
        while not self._stop.wait(tick):
            engine = self._engine()
            if engine is None:
                return
            try:
                if not self.tick(engine):
                    return
            except Exception:  # the monitor must survive anything a backend throws
                logger.exception("resident engine monitor")
            del engine

    # -- one round ---------------------------------------------------------------------------------

    def tick(self, engine: ResidentEngine) -> bool:
        """One round of supervision. Returns False when the monitor should exit."""
        state = engine._state
        if state in (EngineState.STOPPED, EngineState.CRASHED) or self._stop.is_set():
            return False
        if state not in (EngineState.READY, EngineState.SLEEPING):
            return True
        code = engine._backend.exitcode()
        if code is not None:
            self.on_crash(engine, f"exited with code {code}", exited=True)
            return True
        now = time.monotonic()
        if now >= self._next_check:
            # Asleep too: a server that hangs while asleep must not wait for the next parse to be
            # found (the backend asks a sleeping server something that needs no device memory).
            s = engine.settings
            self._next_check = now + s.health_interval
            # Never during a sleep, wake or stop (they hold the lock); parses do not take it.
            if not engine._health_lock.acquire(blocking=False):
                return True
            try:
                current = engine._state
                ok = current not in (EngineState.READY, EngineState.SLEEPING) or engine._backend.healthy(
                    s.health_timeout, asleep=current is EngineState.SLEEPING
                )
            finally:
                engine._health_lock.release()
            if ok:
                self._failures = 0
            else:
                self._failures += 1
                if self._failures >= s.health_failures:
                    self._failures = 0
                    self.on_crash(engine, f"did not answer {s.health_failures} health checks in a row (hung)")
                    return True
        if state is EngineState.READY:
            self.expire_if_idle(engine)
        return True

    # -- crash and restart -------------------------------------------------------------------------

    def on_crash(self, engine: ResidentEngine, reason: str, *, exited: bool = False) -> None:
        """Record a crash (or hang), kill what is left of the server, and restart it.

        Args:
            engine: the engine.
            reason: what happened, for the error the callers get.
            exited: the crash is an exit code seen without the lock: a sleep, wake or
                restart that held the lock meanwhile may have ended or replaced that
                process on purpose, so the exit is looked at again under the lock.
        """
        with engine._lifecycle:
            if engine._state not in (EngineState.READY, EngineState.SLEEPING) or self._stop.is_set():
                return
            if exited and engine._backend.exitcode() is None:
                return
            was_sleeping = engine._state is EngineState.SLEEPING
            engine._generation += 1
            engine._crash_streak += 1
            tail = engine._backend.log_tail()
            engine._last_error = f"the {engine.settings.engine} server {reason}" + (
                f". Log tail:\n{tail}" if tail else ""
            )
            logger.error("resident engine: %s", engine._last_error)
            with engine._cond:
                engine._state = EngineState.STARTING
            with contextlib.suppress(Exception):
                engine._backend.shutdown(grace=min(5.0, engine.settings.stop_timeout))
            if not engine._traits.launched:
                engine._state = EngineState.CRASHED
                engine._failed_at = time.monotonic()
                return
            self.restart(engine)
            if was_sleeping and engine._state is EngineState.READY:
                with contextlib.suppress(MineruVramError):
                    engine._sleep_locked()

    def restart(self, engine: ResidentEngine) -> None:
        """Start the server again, backing off; give up (``CRASHED``) after ``max_restarts`` in a row."""
        s = engine.settings
        while True:
            if engine._crash_streak > s.max_restarts:
                engine._release_reservation()
                with engine._cond:
                    engine._state = EngineState.CRASHED
                    engine._failed_at = time.monotonic()
                    engine._cond.notify_all()
                logger.error("resident engine: giving up after %d restarts in a row", s.max_restarts)
                return
            delay = min(s.restart_backoff * 2 ** max(0, engine._crash_streak - 1), MAX_BACKOFF_SECONDS)
            if self._stop.wait(delay):
                return
            engine._restarts += 1
            logger.warning("resident engine: restart %d (after %.1f s)", engine._restarts, delay)
            try:
                engine._preflight()
                engine._launch_and_wait()
            except MineruVramError as exc:
                engine._crash_streak += 1
                engine._last_error = f"restart {engine._restarts} failed: {exc}"
                logger.error("resident engine: %s", engine._last_error)
                continue
            engine._became_ready()
            return

    # -- keep-alive --------------------------------------------------------------------------------

    def expire_if_idle(self, engine: ResidentEngine) -> None:
        """Sleep or unload an engine idle for ``keep_alive`` (never while anything holds the lifecycle)."""
        keep = engine.settings.keep_alive
        if keep is None or not engine._lifecycle.acquire(blocking=False):
            return
        try:
            with engine._cond:
                idle = time.monotonic() - engine._last_activity
                if engine._state is not EngineState.READY or engine._in_flight or idle < keep:
                    return
            action = engine.settings.keep_alive_action
            logger.info("resident engine idle for %.1f s (keep_alive %.1f s): %s", idle, keep, action)
            if action == "sleep":
                engine._sleep_locked()
            else:
                engine._unload_locked()
        except MineruVramError as exc:
            logger.warning("keep_alive could not %s the engine: %s", engine.settings.keep_alive_action, exc)
        finally:
            engine._lifecycle.release()
