"""What NVML sees of an engine: its processes' memory, and waiting for a release or a load to show."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from mineru_vram._probe import DeviceMemory

__all__ = ["NVML_RESOLUTION_MIB", "below_resolution", "processes_mib", "settle"]

# Moves smaller than this are not waited for: NVML's per-process figure may not change at all
# when a few MiB come and go (the driver serves them from memory it already holds).
NVML_RESOLUTION_MIB = 4.0

Reading = tuple[float | None, float | None]  # (the engine's MiB, the device's free MiB)


def processes_mib(info: DeviceMemory | None, pids: Collection[int]) -> float | None:
    """What ``pids`` hold on the device in one NVML reading (``None``: NVML cannot tell)."""
    if info is None or not pids:
        return None
    if not info.processes and info.used_mib > 0:
        return None  # NVML lists no processes here (a PID namespace hides them)
    return sum(p.used_mib for p in info.processes if p.pid in pids)


def below_resolution(moved: float | None) -> str:
    """A note when the server moved less memory than NVML can show ("" otherwise)."""
    if moved is None or moved >= NVML_RESOLUTION_MIB:
        return ""
    return f"the server moved {moved:.1f} MiB, below what NVML's per-process figure resolves"


def settle(
    read: Callable[[], Reading],
    *,
    before: float | None,
    direction: int,
    gone: bool = False,
    expect_mib: float | None = None,
    timeout: float = 10.0,
    interval: float = 0.05,
) -> tuple[float | None, float | None, bool | None]:
    """Poll ``read`` until the memory moved ``direction`` (or, ``gone``, is all returned) and two readings agree.

    SGLang's release can return before the memory is back; this is the
    confirmation. ``expect_mib`` is how far the server says it moved; a move NVML
    cannot resolve is not waited for (confirmed ``None``).

    Returns:
        ``(after, device free after, confirmed)``; confirmed is ``None`` where NVML
        cannot tell and ``False`` when ``timeout`` passed first.
    """
    if before is None or (expect_mib is not None and expect_mib < NVML_RESOLUTION_MIB):
        after, free = read()
        return after, free, None
    deadline = time.monotonic() + timeout
    prev: float | None = None
    while True:
        cur, free = read()
        if cur is None:
            return None, free, None
        if gone:
            moved = cur <= 0.5
        else:
            moved = cur < before - 1.0 if direction < 0 else cur > before + 1.0
        if moved and prev is not None and abs(cur - prev) < 1.0:
            return cur, free, True
        if time.monotonic() >= deadline:
            return cur, free, False
        prev = cur
        time.sleep(interval)
