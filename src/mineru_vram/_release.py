"""Returning device memory and writing the receipt that proves it.

Release is two steps with a measurement around them: end ownership (the adapter
drops every model this session created from MinerU's caches), then return what
the allocator and CUDA libraries still hold (collect, clear cuBLAS workspaces,
empty the caching allocator). The :class:`ReleaseReport` records NVML's view of
this process and the torch allocator's before and after, the pre-session
baseline, how long it took and which model objects outlived their release.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

from ._probe import VramSnapshot, _fmt, _html_table, device_index, vram_snapshot

__all__ = ["AliveTracker", "ReleaseReport", "malloc_trim", "return_allocator_memory"]

logger = logging.getLogger("mineru_vram")


class AliveTracker:
    """Weak references to the model objects a session created, to count survivors."""

    def __init__(self) -> None:
        self._refs: list[tuple[str, weakref.ref[Any]]] = []

    def track(self, label: str, obj: object) -> None:
        try:
            self._refs.append((label, weakref.ref(obj)))
        except TypeError:  # objects without __weakref__ cannot be tracked; say nothing false
            pass

    def __len__(self) -> int:
        return len(self._refs)

    def alive(self) -> list[str]:
        return [label for label, ref in self._refs if ref() is not None]


def malloc_trim() -> bool:
    """Return freed heap pages to the OS (glibc); MinerU users see RSS creep without it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim = getattr(libc, "malloc_trim", None)
        if trim is None:
            return False
        return bool(trim(0))
    except Exception:
        return False


def return_allocator_memory(device: str) -> list[tuple[str, float]]:
    """Give back what torch and CUDA libraries hold for objects that are gone.

    Does nothing (and imports nothing) where torch was never imported or CUDA
    never initialised in this process.

    Returns:
        ``(step, seconds)`` for each step taken.
    """
    steps: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    gc.collect()
    steps.append(("gc.collect", time.perf_counter() - t0))
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda"):
        return steps
    try:
        if not torch.cuda.is_initialized():
            return steps
    except Exception:
        return steps
    index = device_index(device)
    with torch.cuda.device(index):
        t0 = time.perf_counter()
        torch.cuda.synchronize()
        steps.append(("cuda.synchronize", time.perf_counter() - t0))
        t0 = time.perf_counter()
        # cuBLAS keeps a 32 MiB workspace per stream/handle for the process lifetime
        # unless cleared; it shows up as "allocated" and blocks a clean receipt.
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        steps.append(("clear cuBLAS workspaces", time.perf_counter() - t0))
        t0 = time.perf_counter()
        torch.cuda.empty_cache()
        steps.append(("cuda.empty_cache", time.perf_counter() - t0))
        try:
            torch.cuda.reset_peak_memory_stats(index)
        except Exception:
            pass
    return steps


@dataclass(repr=False)
class ReleaseReport:
    """The receipt of a session's release.

    Attributes:
        device: the device released.
        isolation: ``"none"`` (in-process) or ``"process"`` (worker exited).
        baseline: this process before the session loaded anything.
        before: just before release (models loaded).
        after: after release.
        seconds: time from the start of release to the final measurement.
        models_released: model objects dropped from MinerU's caches.
        models_alive: labels of those still alive after release (kept by user code?).
        steps: ``(step, seconds)`` of the release.
        context_created: this process had no CUDA context before the session and has one
            now; in-process release cannot return it (isolation can).
        context_floor_mib: a bare CUDA context on this device, when measured.
        tolerance_mib: allowed residual for ``ok``.
        events: notes such as worker recycles or restarts.
        worker: figures for an isolated worker (pid, exit code, seconds until NVML
            showed the device back at baseline).
        parked: warm re-entry (``keep_warm=True``): ``models`` (the cache entries now in
            host memory), ``mib``, ``where`` (``"host memory (pinned)"``...) and ``seconds``;
            or ``reason`` when the models could not be parked and were released instead.
        restored: how the session's models came: ``{"models": n, "seconds": s}`` when
            they were taken from host memory instead of loaded.
    """

    device: str
    isolation: str
    baseline: VramSnapshot | None
    before: VramSnapshot | None
    after: VramSnapshot | None
    seconds: float
    models_released: int = 0
    models_alive: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)
    context_created: bool = False
    context_floor_mib: float | None = None
    tolerance_mib: float = 32.0
    events: list[str] = field(default_factory=list)
    worker: dict[str, Any] = field(default_factory=dict)
    parked: dict[str, Any] = field(default_factory=dict)
    restored: dict[str, Any] = field(default_factory=dict)

    @property
    def freed_mib(self) -> float | None:
        """NVML: what this process held before release minus what it holds after."""
        b = None if self.before is None else self.before.process_mib
        a = None if self.after is None else self.after.process_mib
        return None if a is None or b is None else b - a

    @property
    def residual_mib(self) -> float | None:
        """NVML: what this process holds after release above its pre-session baseline."""
        base = None if self.baseline is None else self.baseline.process_mib
        a = None if self.after is None else self.after.process_mib
        return None if a is None or base is None else a - base

    @property
    def leaked_mib(self) -> float | None:
        """Residual not explained by a CUDA context the session had to create.

        With a measured ``context_floor_mib`` and a context created by the session,
        that floor is subtracted; otherwise this is the residual itself.
        """
        residual = self.residual_mib
        if residual is None:
            return None
        if self.context_created and self.context_floor_mib is not None:
            return residual - self.context_floor_mib
        return residual

    @property
    def torch_allocated_after_mib(self) -> float | None:
        return None if self.after is None else self.after.torch_allocated_mib

    @property
    def ok(self) -> bool:
        """No live tensor, no surviving model object, and no NVML residual over tolerance."""
        if self.models_alive:
            return False
        if self.worker.get("back_at_baseline") is False:
            return False
        allocated = self.torch_allocated_after_mib
        if allocated:
            return False
        leaked = self.leaked_mib
        if leaked is None:
            return True
        if self.context_created and self.context_floor_mib is None:
            return True  # cannot separate context from leak without a floor; torch says clean
        return leaked <= self.tolerance_mib

    def problems(self) -> list[str]:
        out = []
        if self.models_alive:
            out.append(f"{len(self.models_alive)} model object(s) still alive: {', '.join(self.models_alive)}")
        if self.worker.get("back_at_baseline") is False:
            left = self.worker.get("left") or "memory still held"
            out.append(f"device not back at its pre-session level after the worker exited: {left}")
        if self.torch_allocated_after_mib:
            out.append(f"torch still has {self.torch_allocated_after_mib:.1f} MiB allocated")
        leaked = self.leaked_mib
        if (
            leaked is not None
            and leaked > self.tolerance_mib
            and not (self.context_created and self.context_floor_mib is None)
        ):
            out.append(f"{leaked:.1f} MiB above baseline exceeds tolerance {self.tolerance_mib:.0f} MiB")
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            freed_mib=self.freed_mib,
            residual_mib=self.residual_mib,
            leaked_mib=self.leaked_mib,
            ok=self.ok,
        )
        return data

    def __str__(self) -> str:
        if self.after is not None and not self.after.gpu_available:
            head = f"release {self.device} ({self.isolation}): no GPU ({self.after.reason})"
        else:
            head = (
                f"release {self.device} ({self.isolation}): process {_fmt(_pm(self.before))} -> "
                f"{_fmt(_pm(self.after))} (baseline {_fmt(_pm(self.baseline))}, residual {_fmt(self.residual_mib)}"
                + (", CUDA context created by the session" if self.context_created else "")
                + f"); torch allocated {_fmt(_ta(self.after))}, reserved {_fmt(_tr(self.after))}"
            )
        if self.worker.get("seconds_to_baseline") is not None:
            head += f"; worker gone, device at baseline after {self.worker['seconds_to_baseline'] * 1000:.0f} ms"
        if self.parked.get("models"):
            head += (
                f"; {len(self.parked['models'])} models parked in {self.parked['where']} "
                f"({self.parked['mib']:.0f} MiB) for the next session"
            )
        tail = (
            f"; {self.models_released} models released, {len(self.models_alive)} alive; "
            f"{self.seconds * 1000:.0f} ms; {'ok' if self.ok else 'NOT OK: ' + '; '.join(self.problems())}"
        )
        return head + tail

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        rows = [
            ("device", f"{self.device} ({self.isolation})"),
            ("process (NVML) baseline", _fmt(_pm(self.baseline))),
            ("process (NVML) before release", _fmt(_pm(self.before))),
            ("process (NVML) after release", _fmt(_pm(self.after))),
            ("residual above baseline", _fmt(self.residual_mib)),
            ("CUDA context created by session", str(self.context_created)),
            ("bare context floor", _fmt(self.context_floor_mib)),
            ("torch allocated after", _fmt(_ta(self.after))),
            ("torch reserved after", _fmt(_tr(self.after))),
            ("models released / alive", f"{self.models_released} / {len(self.models_alive)}"),
            ("models parked", _parked_text(self.parked)),
            ("release time", f"{self.seconds * 1000:.0f} ms"),
            ("verdict", "ok" if self.ok else "; ".join(self.problems())),
        ]
        rows += [(f"event {i + 1}", e) for i, e in enumerate(self.events)]
        return _html_table("Release report", rows)


def _parked_text(parked: dict[str, Any]) -> str:
    if parked.get("models"):
        return f"{len(parked['models'])} in {parked['where']}, {parked['mib']:.0f} MiB"
    return f"none ({parked['reason']})" if parked.get("reason") else "none"


def _pm(s: VramSnapshot | None) -> float | None:
    return None if s is None else s.process_mib


def _ta(s: VramSnapshot | None) -> float | None:
    return None if s is None else s.torch_allocated_mib


def _tr(s: VramSnapshot | None) -> float | None:
    return None if s is None else s.torch_reserved_mib


def settle(device: str, *, reads: int = 3, interval: float = 0.02) -> VramSnapshot:
    """Read a snapshot until two consecutive NVML readings agree (or ``reads`` run out).

    NVML's per-process figure can lag a free by a few milliseconds.
    """
    snap = vram_snapshot(device)
    for _ in range(max(0, reads - 1)):
        time.sleep(interval)
        nxt = vram_snapshot(device)
        if nxt.process_mib == snap.process_mib:
            return nxt
        snap = nxt
    return snap


def log_report(report: ReleaseReport) -> None:
    logger.info("%s", report)
