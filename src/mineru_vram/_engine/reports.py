"""What the resident engine reports: its states, a status snapshot, and what NVML saw around a change."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

__all__ = ["EngineState", "EngineStatus", "MemoryReport"]


class EngineState(enum.Enum):
    """Lifecycle of a :class:`ResidentEngine`."""

    NEW = "new"  # constructed; nothing started, no memory held
    STARTING = "starting"  # launching (or restarting after a crash) and waiting for readiness
    READY = "ready"  # serving; sessions parse through it
    SLEEPING = "sleeping"  # process alive, device memory released; the next request wakes it
    UNLOADED = "unloaded"  # stopped by keep_alive (action "stop"); the next request starts it again
    CRASHED = "crashed"  # died and could not be restarted (or failed to start); start() tries again
    STOPPED = "stopped"  # stop() was called; final, nothing held


@dataclass(frozen=True)
class MemoryReport:
    """What NVML saw around a sleep, wake, unload or stop.

    Attributes:
        action: ``"sleep"``, ``"wake"``, ``"unload"`` or ``"stop"``.
        seconds: from the call until NVML showed the change (or gave up).
        before_mib: the engine's processes on its device before (``None``: NVML cannot tell).
        after_mib: the same after.
        device_free_before_mib: the device's free memory before.
        device_free_after_mib: the same after.
        confirmed: whether NVML saw the memory move the expected way (``None`` without NVML).
        note: anything worth knowing (for instance a release that did nothing).
    """

    action: str
    seconds: float
    before_mib: float | None
    after_mib: float | None
    device_free_before_mib: float | None = None
    device_free_after_mib: float | None = None
    confirmed: bool | None = None
    note: str = ""

    @property
    def freed_mib(self) -> float | None:
        if self.before_mib is None or self.after_mib is None:
            return None
        return self.before_mib - self.after_mib

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "freed_mib": self.freed_mib}

    def __str__(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.0f} MiB"

        verdict = {True: "confirmed by NVML", False: "NOT confirmed by NVML", None: "NVML cannot tell"}[self.confirmed]
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.action}: {fmt(self.before_mib)} -> {fmt(self.after_mib)} in {self.seconds * 1000:.0f} ms "
            f"({verdict}){note}"
        )


@dataclass(frozen=True)
class EngineStatus:
    """A snapshot of :meth:`ResidentEngine.status`.

    Attributes:
        engine: ``sglang``, ``transformers`` or ``attach``.
        state: the :class:`EngineState`.
        url: the server's base URL.
        pid: the server process (this process for ``transformers``; ``None`` for ``attach``).
        restarts: restarts after crashes so far.
        memory_mib: the engine's processes on its device by NVML (``None``: NVML cannot tell).
        device: the engine's device.
        device_free_mib: the device's free memory by NVML.
        device_total_mib: the device's total memory by NVML.
        idle_seconds: since the last request ended (or the engine became ready).
        in_flight: parses running through the engine now.
        model: the served model name.
        mem_fraction_static: what SGLang was started with.
        keep_alive: seconds of idleness before ``keep_alive_action``; ``None`` never.
        last_error: the last crash or start failure, with the log's tail.
        log_path: the server's log file while it runs.
    """

    engine: str
    state: EngineState
    url: str
    pid: int | None
    restarts: int
    memory_mib: float | None
    device: str
    device_free_mib: float | None
    device_total_mib: float | None
    idle_seconds: float
    in_flight: int
    model: str
    mem_fraction_static: float | None
    keep_alive: float | None
    last_error: str | None
    log_path: str | None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data
