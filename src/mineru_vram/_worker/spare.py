"""A spare worker, prepared ahead for the next isolated session with ``keep_warm=True``.

An isolated session's exit kills its worker, so the device goes back to its baseline,
CUDA context included. The next session then pays the whole start again: a new
interpreter, MinerU's imports, the models built from disk. With ``keep_warm=True`` the
runner asks this module for a spare as the session opens: a worker that has already
started, imported MinerU and built the session's models on the CPU (no CUDA
context; :class:`~mineru_vram._worker.protocol.Prepare`). The next session with the
same settings takes it; its :class:`~mineru_vram._worker.protocol.Init` moves the
models to the device instead of loading them, and a new spare is prepared for the
session after.

A spare is a child of this process like any worker (under the keeper: it dies with
this process), in a folder of its own that the session taking it adopts. It takes
host memory, so it is prepared only while the warm cache's host budget has room
for the last spare's size; ``MINERU_VRAM_WARM_SPARE=0`` turns spares off. A watcher
replaces a spare that dies (a bounded number of times in a row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

from mineru_vram import _files
from mineru_vram._config import env_settings
from mineru_vram._inprocess import SessionSettings

from . import protocol
from .handle import WorkerHandle

__all__ = ["Spare", "SparePool", "spare_pool"]

logger = logging.getLogger("mineru_vram")

SPARE_PREFIX = "mineru-vram-spare-"
# How often the watcher looks at the spares, and how many failed preparations in a row stop it.
WATCH_SECONDS = 2.0
MAX_FAILURES = 3
# What a spare is assumed to take in host memory before one was measured.
DEFAULT_SPARE_MIB = 2048.0


def spare_key(settings: SessionSettings) -> tuple[object, ...]:
    """What a spare must match: everything that made its models."""
    return (
        settings.device,
        None if settings.models_dir is None else str(settings.models_dir),
        settings.model_source,
        settings.small_backend,
        settings.backend.tier,
        settings.preload,
        settings.runtime_dir,
    )


@dataclasses.dataclass
class Spare:
    """A prepared worker, its folder and what it holds."""

    key: tuple[object, ...]
    worker: WorkerHandle
    folder: Path
    lock: _files.OwnerLock
    prepared: protocol.Prepared
    seconds: float  # how long preparing took

    def discard(self) -> None:
        """Stop the spare and remove its folder. Never raises."""
        with contextlib.suppress(Exception):
            self.worker.kill(wait=2.0)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.lock.release()


class SparePool:
    """At most one spare per settings key, prepared in the background."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spares: dict[tuple[object, ...], Spare] = {}
        self._preparing: dict[tuple[object, ...], threading.Thread] = {}
        self._settings: dict[tuple[object, ...], SessionSettings] = {}
        self._failures: dict[tuple[object, ...], int] = {}
        self._last_mib: float | None = None
        self._watcher: threading.Thread | None = None
        self._pid = os.getpid()
        self.events: list[str] = []

    # -- for runners -------------------------------------------------------------------------------

    def take(self, settings: SessionSettings, timeout: float) -> Spare | None:
        """The spare for ``settings``, waiting up to ``timeout`` for one being prepared; ``None`` without one."""
        key = spare_key(settings)
        with self._lock:
            thread = self._preparing.get(key)
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            spare = self._spares.pop(key, None)
        if spare is None:
            return None
        if not spare.worker.idle_and_alive():
            self._event(f"spare worker pid {spare.worker.pid} had died; starting a worker from scratch")
            spare.discard()
            return None
        return spare

    def prepare(self, settings: SessionSettings) -> None:
        """Start preparing a spare for ``settings`` in the background (no-op when one exists or is coming)."""
        if not env_settings().get("warm_spare", True):
            return
        key = spare_key(settings)
        with self._lock:
            if os.getpid() != self._pid:  # a forked child: spares are its parent's
                return
            if key in self._spares or key in self._preparing or self._failures.get(key, 0) >= MAX_FAILURES:
                return
            room = self._room_mib()
            need = self._last_mib or DEFAULT_SPARE_MIB
            if room < need:
                self._event(f"no spare worker: it needs about {need:.0f} MiB of host memory, the budget has {room:.0f}")
                return
            self._settings[key] = settings
            thread = threading.Thread(target=self._prepare, args=(key, settings), name="mineru-vram-spare", daemon=True)
            self._preparing[key] = thread
            thread.start()
            self._ensure_watcher()

    def discard_all(self) -> int:
        """Stop every spare (and forget the settings they were kept for). Returns how many were stopped."""
        with self._lock:
            spares = list(self._spares.values())
            self._spares.clear()
            self._settings.clear()
        for spare in spares:
            spare.discard()
        return len(spares)

    def spares(self) -> list[Spare]:
        with self._lock:
            return list(self._spares.values())

    def wait_ready(self, timeout: float) -> bool:
        """Wait until no spare is being prepared (for benchmarks and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._preparing.values())
            if not threads:
                return True
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if time.monotonic() >= deadline:
                return False

    # -- inside ------------------------------------------------------------------------------------

    def _event(self, text: str) -> None:
        self.events.append(text)
        del self.events[:-100]
        logger.info("%s", text)

    def _room_mib(self) -> float:
        from mineru_vram._warm import warm_cache

        cache = warm_cache()
        held = sum(s.prepared.stats.rss_mib or DEFAULT_SPARE_MIB for s in self._spares.values())
        return cache.budget_mib - cache.size_mib - held

    def _prepare(self, key: tuple[object, ...], settings: SessionSettings) -> None:
        t0 = time.perf_counter()
        spare: Spare | None = None
        try:
            base = settings.runtime_dir
            _files.sweep_dead_owners(base, SPARE_PREFIX)
            folder, lock = _files.owned_temp_dir(f"{SPARE_PREFIX}{os.getpid()}-", base)
            try:
                worker = WorkerHandle.spawn(folder, 0)
                child = dataclasses.replace(settings, isolation="none", recycle_after=None, recycle_above_mib=None)
                reply = worker.request(protocol.Prepare(settings=child), timeout=settings.worker_start_timeout)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                lock.release()
                raise
            if not isinstance(reply, protocol.Prepared):
                worker.kill()
                shutil.rmtree(folder, ignore_errors=True)
                lock.release()
                detail = f": {reply.error}" if isinstance(reply, protocol.Error) else ""
                raise RuntimeError(f"the spare answered {type(reply).__name__}{detail}")
            spare = Spare(key, worker, folder, lock, reply, time.perf_counter() - t0)
            self._last_mib = reply.stats.rss_mib
            self._event(
                f"spare worker pid {worker.pid} ready in {spare.seconds:.1f}s: {reply.models} models on the CPU, "
                f"{reply.mib:.0f} MiB of tensors, RSS {reply.stats.rss_mib or 0:.0f} MiB"
            )
        except Exception as exc:  # WorkerDied, WorkerTimedOut, OSError...: no spare this time, said so
            with self._lock:
                self._failures[key] = self._failures.get(key, 0) + 1
            self._event(f"preparing a spare worker failed ({type(exc).__name__}: {exc})")
        finally:
            with self._lock:
                self._preparing.pop(key, None)
                if spare is not None:
                    if key in self._settings:
                        self._spares[key] = spare
                        self._failures.pop(key, None)
                    else:  # discard_all() ran meanwhile
                        spare.discard()

    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, name="mineru-vram-spare-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        """Replace spares that died (killed from outside, the OOM killer) while no session used them."""
        while True:
            time.sleep(WATCH_SECONDS)
            with self._lock:
                dead = [s for s in self._spares.values() if not s.worker.alive()]
                for spare in dead:
                    del self._spares[spare.key]
                wanted = [(s.key, self._settings.get(s.key)) for s in dead]
            for spare in dead:
                self._event(
                    f"spare worker pid {spare.worker.pid} died (exit code {spare.worker.exitcode()}); replacing it"
                )
                spare.discard()
            for _key, settings in wanted:
                if settings is not None:
                    self.prepare(settings)


_pool: SparePool | None = None
_pool_lock = threading.Lock()


def spare_pool() -> SparePool:
    """The process-wide pool of spare workers (stopped at interpreter exit)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._pid != os.getpid():
            _pool = SparePool()
            # At exit the keeper would kill the spares anyway; this also removes their folders.
            weakref.finalize(_pool, _discard_quietly, _pool._spares)
        return _pool


def _discard_quietly(spares: dict[tuple[object, ...], Spare]) -> None:
    for spare in list(spares.values()):
        spare.discard()
    spares.clear()
