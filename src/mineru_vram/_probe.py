"""Reading GPU memory without changing it.

Two sources, each with its own blind spot:

* NVML sees what the driver sees: the device total and free memory and, per
  process, everything a process holds (CUDA context, cuBLAS workspaces, other
  libraries' pools). It cannot tell tensors from cache.
* The torch caching allocator sees only its own blocks (``allocated`` are live
  tensors, ``reserved`` adds the cache), but in detail.

A snapshot reads both. Reading must never *create* what it measures: torch
counters are read only when torch is already imported and CUDA already
initialised in this process; NVML is queried through ``pynvml``, which opens no
CUDA context.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "DeviceMemory",
    "MIB",
    "ProcessMemory",
    "VramSnapshot",
    "cuda_device_problem",
    "device_identity",
    "device_index",
    "measure_context_floor",
    "nvml_device_count",
    "poll_until",
    "process_memory_mib",
    "resolve_device",
    "vram_snapshot",
]

MIB = 1024 * 1024

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"initialised": False, "error": None, "pid": None}


def _nvml() -> Any | None:
    """Return the initialised ``pynvml`` module, or ``None`` where NVML is unusable.

    The outcome is remembered per process: NVML does not appear or vanish while a
    process runs, and a failed ``nvmlInit`` is slow on machines without a driver.
    """
    with _nvml_lock:
        if _nvml_state["pid"] == os.getpid():
            return sys.modules["pynvml"] if _nvml_state["initialised"] else None
        _nvml_state["pid"] = os.getpid()
        _nvml_state["initialised"] = False
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, driver errors
            _nvml_state["error"] = f"{type(exc).__name__}: {exc}"
            return None
        _nvml_state["initialised"] = True
        _nvml_state["error"] = None
        return pynvml


def _nvml_error() -> str | None:
    return _nvml_state["error"]  # type: ignore[no-any-return]


def nvml_device_count() -> int:
    """Number of GPUs NVML sees (0 where there is no driver or no ``pynvml``)."""
    nvml = _nvml()
    if nvml is None:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def _visible_devices() -> list[str] | None:
    from ._config import visible_devices

    return visible_devices()


def device_index(device: str) -> int:
    """The CUDA ordinal of a resolved device string: ``"cuda:3"`` -> 3, ``"cuda"`` -> 0.

    Raises:
        ValueError: ``device`` is not ``cuda`` or ``cuda:N``.
    """
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"not a CUDA device: {device!r}")
    return int(index or 0)


def _nvml_handle(cuda_index: int) -> Any | None:
    """Map a CUDA ordinal of this process to an NVML handle, honouring CUDA_VISIBLE_DEVICES."""
    nvml = _nvml()
    if nvml is None:
        return None
    visible = _visible_devices()
    try:
        if visible is None:
            return nvml.nvmlDeviceGetHandleByIndex(cuda_index)
        if cuda_index >= len(visible):
            return None
        entry = visible[cuda_index]
        if entry.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(entry))
        return nvml.nvmlDeviceGetHandleByUUID(entry if entry.startswith(("GPU-", "MIG-")) else f"GPU-{entry}")
    except Exception:
        return None


def cuda_device_problem(device: str) -> str | None:
    """Why the resolved ``device`` cannot be used in this process, or ``None`` when it can.

    Asks NVML (honouring ``CUDA_VISIBLE_DEVICES``) and, where torch is already imported,
    whether that torch was built with CUDA. Creates no CUDA context and imports no torch.
    ``"cpu"`` is always usable.
    """
    if not device.startswith("cuda"):
        return None
    index = device_index(device)
    if _nvml() is None:
        return f"NVML cannot be used here ({_nvml_error() or 'pynvml is missing'}), so no GPU is visible"
    if _nvml_handle(index) is None:
        seen = f"NVML sees {nvml_device_count()} GPU(s)"
        visible = _visible_devices()
        if visible is not None:
            seen += f", CUDA_VISIBLE_DEVICES={','.join(visible)!r} leaves {len(visible)}"
        return f"{seen}, so there is no CUDA device {index}"
    torch = sys.modules.get("torch")
    if torch is not None and getattr(getattr(torch, "version", None), "cuda", "") is None:
        return f"the torch in this process ({getattr(torch, '__version__', '?')}) is built without CUDA"
    return None


def device_identity(device: str) -> tuple[str | None, str | None] | None:
    """The UUID (``GPU-...``) and PCI address (``domain:bus:device.function``) of ``cuda:N``, by NVML.

    What other APIs name the same card by (Vulkan's ``deviceUUID`` and PCI bus info).
    ``None`` where NVML cannot see the device.
    """
    handle = _nvml_handle(device_index(device))
    nvml = _nvml()
    if handle is None or nvml is None:
        return None
    uuid: str | None = None
    pci: str | None = None
    with contextlib.suppress(Exception):
        raw = nvml.nvmlDeviceGetUUID(handle)
        uuid = raw.decode() if isinstance(raw, bytes) else str(raw)
    with contextlib.suppress(Exception):
        bus = nvml.nvmlDeviceGetPciInfo(handle).busId
        pci = bus.decode() if isinstance(bus, bytes) else str(bus)
    if uuid is None and pci is None:
        return None
    return uuid, pci


def resolve_device(device: str | int | None) -> str:
    """Normalise a device spec to ``"cpu"`` or ``"cuda:N"``.

    ``None`` picks ``cuda:0`` where NVML sees a GPU and ``cpu`` elsewhere; no CUDA
    context is created to decide.

    Raises:
        ConfigurationError: for specs that are not ``cpu``, ``cuda``, ``cuda:N`` or ``N``.
    """
    from ._exceptions import ConfigurationError

    if device is None:
        return "cuda:0" if nvml_device_count() > 0 else "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        spec = f"cuda:{device}"
    else:
        spec = str(device).strip().lower()
    if spec == "cpu":
        return "cpu"
    if spec == "cuda":
        return "cuda:0"
    if spec.startswith("cuda:") and spec[5:].isdigit():
        return spec
    raise ConfigurationError(
        f"unsupported device {device!r}: use 'cpu', 'cuda', 'cuda:N' or an integer N",
        device=device,
    )


@dataclass(frozen=True)
class ProcessMemory:
    """One process's memory on a device, as NVML reports it."""

    pid: int
    used_mib: float
    name: str = ""


@dataclass(frozen=True)
class DeviceMemory:
    """Device-wide figures from NVML."""

    index: int
    name: str
    total_mib: float
    used_mib: float
    free_mib: float
    driver: str = ""
    processes: tuple[ProcessMemory, ...] = ()


def _device_memory(handle: Any, index: int) -> DeviceMemory | None:
    nvml = _nvml()
    if nvml is None or handle is None:
        return None
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            driver = nvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        except Exception:
            driver = ""
        procs = []
        for proc in _running_processes(handle):
            used = getattr(proc, "usedGpuMemory", None)
            procs.append(ProcessMemory(pid=int(proc.pid), used_mib=(used or 0) / MIB, name=_process_name(proc.pid)))
        return DeviceMemory(
            index=index,
            name=name,
            total_mib=info.total / MIB,
            used_mib=info.used / MIB,
            free_mib=info.free / MIB,
            driver=driver,
            processes=tuple(procs),
        )
    except Exception:
        return None


def _running_processes(handle: Any) -> Sequence[Any]:
    nvml = _nvml()
    if nvml is None:
        return ()
    # A Vulkan process (llama.cpp) may be listed only as a graphics process; one that also has a CUDA
    # context (MinerU's torch models beside an in-process llama.cpp engine) is in both lists: the
    # entry with the larger figure is kept, so neither list's share is lost and none is counted twice.
    seen: dict[int, Any] = {}
    for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        try:
            for proc in getattr(nvml, getter)(handle):
                pid = int(proc.pid)
                if pid not in seen or (getattr(proc, "usedGpuMemory", None) or 0) > (
                    getattr(seen[pid], "usedGpuMemory", None) or 0
                ):
                    seen[pid] = proc
        except Exception:
            continue
    return list(seen.values())


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def card_memory(nvml_index: int) -> DeviceMemory | None:
    """One card by its NVML index (physical numbering: ``CUDA_VISIBLE_DEVICES`` does not apply).

    For readers that watch whole cards from outside the processes that use them (a Ray
    node's probe, a benchmark's driver); ``None`` where NVML cannot tell.
    """
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(nvml_index)
    except Exception:
        return None
    return _device_memory(handle, nvml_index)


def holders(info: DeviceMemory, width: int = 200) -> list[tuple[int, float, str]]:
    """The processes NVML lists on a card, as (pid, MiB, command line or name): who holds its memory."""
    import psutil

    out = []
    for proc in info.processes:
        try:
            command = " ".join(psutil.Process(proc.pid).cmdline())[:width]
        except psutil.Error:
            command = ""
        out.append((proc.pid, round(proc.used_mib, 1), command or proc.name))
    return out


def process_memory_mib(device: str = "cuda:0", pid: int | None = None) -> float | None:
    """NVML's figure for one process on one device, in MiB.

    Returns 0.0 when NVML works but the process holds nothing on the device, and
    ``None`` when NVML cannot tell (no GPU, no driver, or a PID namespace that hides
    the process from the driver).
    """
    if not device.startswith("cuda"):
        return None
    handle = _nvml_handle(device_index(device))
    if handle is None:
        return None
    target = os.getpid() if pid is None else pid
    for proc in _running_processes(handle):
        if int(proc.pid) == target:
            used = getattr(proc, "usedGpuMemory", None)
            return None if used is None else used / MIB
    return 0.0


def _torch_counters(device: str) -> tuple[float | None, float | None, float | None, bool]:
    """(allocated, reserved, peak allocated) MiB and whether CUDA is initialised.

    Reads nothing unless torch is already imported and CUDA already initialised here:
    importing torch or touching ``torch.cuda`` counters would create what we measure.
    """
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda"):
        return None, None, None, False
    try:
        if not torch.cuda.is_initialized():
            return 0.0, 0.0, 0.0, False
        index = device_index(device)
        return (
            torch.cuda.memory_allocated(index) / MIB,
            torch.cuda.memory_reserved(index) / MIB,
            torch.cuda.max_memory_allocated(index) / MIB,
            True,
        )
    except Exception:
        return None, None, None, False


def _rss_mib() -> float | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except (OSError, ValueError, IndexError):
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except Exception:
            return None


@dataclass(frozen=True, repr=False)
class VramSnapshot:
    """GPU memory at one moment, from NVML and the torch allocator.

    Attributes:
        device: ``"cpu"`` or ``"cuda:N"`` as this process numbers it.
        time: ``time.time()`` of the reading.
        gpu_available: whether NVML could read the device at all.
        reason: why figures are missing, when they are (no GPU, no driver...).
        process_mib: this process's memory on the device by NVML (context included).
        torch_allocated_mib: live tensors in torch's caching allocator.
        torch_reserved_mib: allocated plus the allocator's cache.
        torch_peak_mib: peak allocated since the last reset.
        cuda_initialized: whether this process has a CUDA context (as torch knows it).
        device_info: device-wide figures (total, used, free, per-process list).
        rss_mib: resident host memory of this process.
    """

    device: str
    time: float
    gpu_available: bool
    reason: str = ""
    process_mib: float | None = None
    torch_allocated_mib: float | None = None
    torch_reserved_mib: float | None = None
    torch_peak_mib: float | None = None
    cuda_initialized: bool = False
    device_info: DeviceMemory | None = None
    rss_mib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def free_mib(self) -> float | None:
        return None if self.device_info is None else self.device_info.free_mib

    @property
    def total_mib(self) -> float | None:
        return None if self.device_info is None else self.device_info.total_mib

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        if not self.gpu_available:
            rss = f", rss {self.rss_mib:.0f} MiB" if self.rss_mib is not None else ""
            return f"VramSnapshot({self.device}: no GPU ({self.reason}){rss})"
        parts = [f"{self.device}"]
        if self.device_info is not None:
            d = self.device_info
            parts.append(f"{d.name}: {d.used_mib:.0f}/{d.total_mib:.0f} MiB used, {d.free_mib:.0f} free")
        parts.append(f"this process {_fmt(self.process_mib)}")
        parts.append(f"torch allocated {_fmt(self.torch_allocated_mib)} reserved {_fmt(self.torch_reserved_mib)}")
        return "VramSnapshot(" + "; ".join(parts) + ")"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        rows = [
            ("device", self.device),
            ("GPU", self.device_info.name if self.device_info else (self.reason or "none")),
            ("device used / total", _pair(self.device_info)),
            ("this process (NVML)", _fmt(self.process_mib)),
            ("torch allocated", _fmt(self.torch_allocated_mib)),
            ("torch reserved", _fmt(self.torch_reserved_mib)),
            ("CUDA initialised here", str(self.cuda_initialized)),
            ("host RSS", _fmt(self.rss_mib)),
        ]
        return _html_table("VRAM snapshot", rows)


def _pair(info: DeviceMemory | None) -> str:
    return "n/a" if info is None else f"{info.used_mib:.0f} / {info.total_mib:.0f} MiB"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


def _html_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    from html import escape

    body = "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table><caption>{escape(title)}</caption>{body}</table>"


def vram_snapshot(device: str | int | None = None) -> VramSnapshot:
    """Read the GPU memory figures for ``device`` now.

    Never creates a CUDA context and never fails for want of a GPU: on a machine
    without one, the snapshot says so in ``gpu_available`` and ``reason``.

    Args:
        device: ``None`` (the first GPU, or ``cpu``), ``"cuda:N"``, ``N`` or ``"cpu"``.
    """
    dev = resolve_device(device)
    now = time.time()
    rss = _rss_mib()
    if dev == "cpu":
        reason = _nvml_error() or ("no GPU visible to NVML" if nvml_device_count() == 0 else "cpu device selected")
        return VramSnapshot(device=dev, time=now, gpu_available=False, reason=reason, rss_mib=rss)
    index = device_index(dev)
    handle = _nvml_handle(index)
    allocated, reserved, peak, initialised = _torch_counters(dev)
    if handle is None:
        reason = _nvml_error() or f"NVML has no device for {dev}"
        return VramSnapshot(
            device=dev,
            time=now,
            gpu_available=False,
            reason=reason,
            torch_allocated_mib=allocated,
            torch_reserved_mib=reserved,
            torch_peak_mib=peak,
            cuda_initialized=initialised,
            rss_mib=rss,
        )
    info = _device_memory(handle, index)
    own = None
    if info is not None:
        own = next((p.used_mib for p in info.processes if p.pid == os.getpid()), 0.0)
    return VramSnapshot(
        device=dev,
        time=now,
        gpu_available=info is not None,
        reason="" if info is not None else "NVML could not read the device",
        process_mib=own,
        torch_allocated_mib=allocated,
        torch_reserved_mib=reserved,
        torch_peak_mib=peak,
        cuda_initialized=initialised,
        device_info=info,
        rss_mib=rss,
    )


def poll_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.02) -> tuple[bool, float]:
    """Call ``predicate`` until it is true or ``timeout`` seconds pass.

    Returns:
        ``(met, seconds_waited)``.
    """
    start = time.monotonic()
    while True:
        if predicate():
            return True, time.monotonic() - start
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            return False, elapsed
        time.sleep(interval)


_floor_cache: dict[str, float] = {}

_FLOOR_CODE = r"""
import os, sys, time
import torch
dev = torch.device(sys.argv[1])
x = torch.randn(1, 3, 64, 64, device=dev)
w = torch.randn(8, 3, 3, 3, device=dev)
torch.nn.functional.conv2d(x, w).sum().item()
a = torch.randn(256, 256, device=dev)
(a @ a).sum().item()
del x, w, a
torch._C._cuda_clearCublasWorkspaces()
torch.cuda.empty_cache()
torch.cuda.synchronize()
from mineru_vram._probe import _nvml_handle, _running_processes
h = _nvml_handle(dev.index or 0)  # honours CUDA_VISIBLE_DEVICES, indices or UUIDs
time.sleep(0.05)
for p in _running_processes(h):
    if p.pid == os.getpid():
        print(p.usedGpuMemory / 1048576)
        break
else:
    print("nan")
"""


def measure_context_floor(device: str = "cuda:0", *, timeout: float = 120.0, refresh: bool = False) -> float | None:
    """Measure what a bare CUDA context costs on ``device``, in MiB, by NVML.

    A child process creates a context, runs one convolution and one matmul (so
    cuDNN and cuBLAS are initialised, as in any real model), returns their caches
    and reports its own NVML figure. That is the floor an in-process release
    cannot go under. Cached per device for this process.

    Returns:
        The floor in MiB, or ``None`` without a GPU or when the child fails.
    """
    import subprocess

    from ._process import python_command

    dev = resolve_device(device)
    if not dev.startswith("cuda") or nvml_device_count() == 0:
        return None
    if not refresh and dev in _floor_cache:
        return _floor_cache[dev]
    try:
        out = (
            subprocess.run(
                python_command("-c", _FLOOR_CODE, dev),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=True,
            )
            .stdout.strip()
            .splitlines()
        )
        value = float(out[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None
    if math.isnan(value):  # the driver hid the child's pid (PID namespace)
        return None
    _floor_cache[dev] = value
    return value
