"""Whether the device got a worker's memory back, by NVML.

A worker's exit returns everything it held, the CUDA context included, but NVML
shows it a little later. The runner waits (bounded) until the workers it stopped
are gone from NVML's process list and device use is back at its pre-session level,
allowing for what other processes grew meanwhile.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

from mineru_vram._probe import DeviceMemory, poll_until, vram_snapshot

__all__ = ["DeviceCheck", "device_back", "wait_device_back", "wait_gone_from_device"]


@dataclasses.dataclass(frozen=True)
class DeviceCheck:
    """One comparison of the device with its baseline."""

    back: bool
    used_mib: float
    excess_mib: float  # device use above the baseline not explained by other processes' growth
    others_grew_mib: float
    workers: dict[int, float]  # workers NVML still lists, with their MiB


def device_back(
    base: DeviceMemory, now: DeviceMemory, workers: Sequence[int], parent_pid: int, tolerance_mib: float
) -> DeviceCheck:
    """Whether the device is back at ``base`` now that ``workers`` exited.

    Other processes may have grown meanwhile (this process, or one that already held
    memory at the baseline): their growth is allowed for, or one busy neighbour would
    make every close wait for its timeout. A process that appeared after the baseline
    is not allowed for unless it is this one: under a PID namespace NVML lists the
    worker under a pid we cannot recognise, and it must not be excused.
    """
    before = {p.pid: p.used_mib for p in base.processes}
    listed = {p.pid: p.used_mib for p in now.processes}
    still = {pid: listed[pid] for pid in workers if listed.get(pid)}
    known = (set(before) | {parent_pid}) - set(workers)
    grew = sum(max(0.0, listed.get(pid, 0.0) - before.get(pid, 0.0)) for pid in known)
    excess = now.used_mib - base.used_mib - grew
    return DeviceCheck(
        back=not still and excess <= tolerance_mib,
        used_mib=now.used_mib,
        excess_mib=excess,
        others_grew_mib=grew,
        workers=still,
    )


def wait_gone_from_device(device: str, pids: Sequence[int], *, timeout: float) -> tuple[bool | None, float]:
    """Wait until NVML lists none of ``pids`` on ``device``.

    Returns:
        ``(gone, seconds)``; ``gone`` is ``None`` off CUDA devices (nothing to wait for).
    """
    if not device.startswith("cuda"):
        return None, 0.0
    from mineru_vram._probe import process_memory_mib

    def gone() -> bool:
        return all(not process_memory_mib(device, pid=pid) for pid in pids)

    return poll_until(gone, timeout=timeout, interval=0.02)


def wait_device_back(
    device: str, base: DeviceMemory | None, pids: Sequence[int], *, tolerance_mib: float, timeout: float
) -> tuple[bool | None, list[str], float | None, float | None]:
    """Poll NVML until ``pids`` are gone and device use is back at ``base``.

    Returns:
        ``(back, left, seconds, device_used_after)``: ``back`` is ``None`` where NVML
        cannot tell (CPU, no driver); ``left`` says what remains when not back.
    """
    if not device.startswith("cuda") or base is None:
        return None, [], 0.0, None
    checks: list[DeviceCheck] = []  # the latest only

    def back() -> bool:
        info = vram_snapshot(device).device_info
        if info is None:
            return False
        checks[:] = [device_back(base, info, pids, os.getpid(), tolerance_mib)]
        return checks[0].back

    t0 = time.perf_counter()
    met, _ = poll_until(back, timeout=timeout, interval=0.02)
    seconds = time.perf_counter() - t0
    if not checks:
        return False, ["NVML could not read the device after the worker exited"], None, None
    check = checks[-1]
    left: list[str] = []
    if not met:
        left += [f"worker pid {pid} still listed by NVML with {mib:.0f} MiB" for pid, mib in check.workers.items()]
        if check.excess_mib > tolerance_mib:
            left.append(
                f"device use {check.used_mib:.0f} MiB is {check.excess_mib:.0f} MiB above its pre-session "
                f"{base.used_mib:.0f} MiB (after allowing {check.others_grew_mib:.0f} MiB that other known "
                f"processes grew) after {timeout}s"
            )
    return met, left, (seconds if met else None), check.used_mib
