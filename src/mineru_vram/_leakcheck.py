"""The measuring half of the pytest plugin: probes, a live-tensor census and the verdict.

A :class:`LeakCheck` brackets one test: it settles the device (collect, return the
allocator's cache, re-read until the figures stop moving), reads a probe, lets the
test run, then settles and reads again and turns the difference into a
:class:`Verdict`.

Where the figures come from is a :class:`VramProbe`, so the judging logic runs the
same on a CPU-only machine with a scripted probe as on a GPU:

* :class:`CudaProbe` reads torch's caching allocator (live tensors, exact bytes)
  and NVML's per-process figure. It reads torch only when torch is already
  imported *and* CUDA already initialised in this process, and NVML through
  ``pynvml``: measuring never creates a CUDA context.
* :class:`CpuProbe` has no device figures. Its signal is the census: torch
  tensors, found by the garbage collector, that were created during the test and
  are still alive after it.

Nothing here imports torch: the census looks torch up in ``sys.modules`` and does
nothing when the test process never imported it.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ._probe import MIB

__all__ = [
    "CensusBaseline",
    "CpuProbe",
    "CudaProbe",
    "LeakCheck",
    "NewTensors",
    "Reading",
    "TensorInfo",
    "Verdict",
    "VramProbe",
    "default_probe",
    "fmt_bytes",
    "select_device",
    "take_census_baseline",
    "tensors_created_since",
    "visible_device_count",
    "worker_device",
]


# --- readings and probes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What a probe sees at one moment.

    Attributes:
        device: ``"cpu"`` or ``"cuda:N"``.
        gpu_available: whether device figures exist at all (NVML can read the GPU).
        reason: why they do not, when they do not ("no GPU visible to NVML", ...).
        allocated_bytes: torch's caching allocator, live tensors; 0 where torch or CUDA
            was never started in this process; ``None`` where the probe has no allocator
            (the CPU probe), which makes the census the check.
        reserved_bytes: allocated plus the allocator's cache.
        process_mib: this process on the device by NVML (CUDA context included).
        cuda_initialized: whether this process has a CUDA context.
    """

    device: str
    gpu_available: bool
    reason: str = ""
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    process_mib: float | None = None
    cuda_initialized: bool = False


@runtime_checkable
class VramProbe(Protocol):
    """Where a :class:`LeakCheck` gets its figures. Override the ``mineru_vram_probe`` fixture to swap it."""

    @property
    def device(self) -> str:
        """The device measured, ``"cpu"`` or ``"cuda:N"``."""
        ...

    def describe(self) -> str:
        """One line for the report header and messages."""
        ...

    def settle(self) -> None:
        """Return what is no longer referenced (collect, empty the allocator cache)."""
        ...

    def read(self) -> Reading:
        """The figures now. Must not create a CUDA context."""
        ...

    def start_peak(self) -> None:
        """Start measuring the peak of allocated memory."""
        ...

    def stop_peak(self) -> int | None:
        """Stop, and return the peak allocated bytes since :meth:`start_peak` (``None``: unknown)."""
        ...

    def context_floor(self) -> float | None:
        """What a bare CUDA context (with cuDNN and cuBLAS) costs on the device by NVML, in MiB.

        Asked only when NVML growth would otherwise fail a test; ``None``: unknown.
        """
        ...


def _cuda_torch(device: str) -> Any | None:
    """torch, if it is imported here and has a CUDA context; never imports or initialises it."""
    if not device.startswith("cuda"):
        return None
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch if torch.cuda.is_initialized() else None
    except Exception:
        return None


def _index(device: str) -> int:
    from ._probe import device_index

    return device_index(device)


class CudaProbe:
    """torch's allocator and NVML's per-process figure for one CUDA device."""

    def __init__(self, device: str = "cuda:0") -> None:
        from ._probe import resolve_device

        self._device = resolve_device(device)
        if not self._device.startswith("cuda"):
            raise ValueError(f"CudaProbe measures a CUDA device, not {device!r}")
        self._peak_seen = 0
        self._patch: contextlib.ExitStack | None = None

    @property
    def device(self) -> str:
        return self._device

    def describe(self) -> str:
        from ._probe import vram_snapshot

        snap = vram_snapshot(self._device)
        if not snap.gpu_available or snap.device_info is None:
            return f"{self._device}: no GPU ({snap.reason})"
        info = snap.device_info
        return f"{self._device} ({info.name}, {info.total_mib:.0f} MiB)"

    def settle(self) -> None:
        from ._release import return_allocator_memory

        # Collect, synchronise, clear cuBLAS workspaces, empty the caching allocator;
        # imports nothing and does nothing CUDA-side where CUDA never started here.
        return_allocator_memory(self._device)

    def read(self) -> Reading:
        from ._probe import vram_snapshot

        snap = vram_snapshot(self._device)
        allocated = reserved = 0
        torch = _cuda_torch(self._device)
        if torch is not None:
            with contextlib.suppress(Exception):  # a broken CUDA state reads as nothing allocated
                allocated = int(torch.cuda.memory_allocated(_index(self._device)))
                reserved = int(torch.cuda.memory_reserved(_index(self._device)))
        return Reading(
            device=self._device,
            gpu_available=snap.gpu_available,
            reason=snap.reason,
            allocated_bytes=allocated,
            reserved_bytes=reserved,
            process_mib=snap.process_mib,
            cuda_initialized=torch is not None,
        )

    def start_peak(self) -> None:
        self._peak_seen = 0
        torch = _cuda_torch(self._device)
        if torch is not None:
            with contextlib.suppress(Exception):
                torch.cuda.reset_peak_memory_stats(_index(self._device))
        self._patch = self._record_peak_before_resets()

    def stop_peak(self) -> int | None:
        if self._patch is not None:
            self._patch.close()
            self._patch = None
        torch = _cuda_torch(self._device)
        if torch is None:
            return self._peak_seen
        try:
            current = int(torch.cuda.max_memory_allocated(_index(self._device)))
        except Exception:
            return self._peak_seen
        return max(self._peak_seen, current)

    def context_floor(self) -> float | None:
        from ._probe import measure_context_floor

        # Measured once per process in a child (seconds), and only when a verdict needs it.
        return measure_context_floor(self._device)

    def _peak_now(self) -> None:
        # Called just before any reset, of any device: reading this device's peak then
        # is harmless when another device is being reset, and never loses a peak.
        torch = _cuda_torch(self._device)
        if torch is None:
            return
        with contextlib.suppress(Exception):
            self._peak_seen = max(self._peak_seen, int(torch.cuda.max_memory_allocated(_index(self._device))))

    def _record_peak_before_resets(self) -> contextlib.ExitStack:
        """While the test runs, note the peak before anything resets it.

        ``ModelSession.close`` (and any user code) calls ``reset_peak_memory_stats``;
        without this, a test's peak would read as what came after its last reset.
        Only where torch is already imported; restored when the test ends.
        """
        stack = contextlib.ExitStack()
        torch = sys.modules.get("torch")
        if torch is None:
            return stack
        memory = sys.modules.get("torch.cuda.memory")
        for module in (torch.cuda, memory):
            original = getattr(module, "reset_peak_memory_stats", None) if module is not None else None
            if original is None or getattr(original, "_mineru_vram_wrapped", False):
                continue

            def wrapper(device: Any = None, _original: Any = original) -> Any:
                self._peak_now()
                return _original(device)

            wrapper._mineru_vram_wrapped = True  # type: ignore[attr-defined]
            setattr(module, "reset_peak_memory_stats", wrapper)  # noqa: B010 (dynamic module)
            stack.callback(setattr, module, "reset_peak_memory_stats", original)
        return stack


class CpuProbe:
    """No device figures; the census of live CPU tensors is the check."""

    def __init__(self, reason: str = "") -> None:
        self._reason = reason

    @property
    def device(self) -> str:
        return "cpu"

    @property
    def reason(self) -> str:
        if self._reason:
            return self._reason
        from ._probe import _nvml_error, nvml_device_count

        if _nvml_error():
            return str(_nvml_error())
        if nvml_device_count() == 0:
            return "NVML sees no device"
        if visible_device_count() == 0:
            return "CUDA_VISIBLE_DEVICES hides every GPU"
        return "the cpu device was selected"

    def describe(self) -> str:
        return f"no GPU ({self.reason}); checking live CPU tensors"

    def settle(self) -> None:
        gc.collect()

    def read(self) -> Reading:
        return Reading(device="cpu", gpu_available=False, reason=self.reason)

    def start_peak(self) -> None:
        pass

    def stop_peak(self) -> int | None:
        return None

    def context_floor(self) -> float | None:
        return None


def default_probe(device: str) -> VramProbe:
    """The probe for ``device`` (``"cpu"`` or ``"cuda:N"``)."""
    if device == "cpu":
        return CpuProbe()
    return CudaProbe(device)


# --- device selection ---------------------------------------------------------------------------


def visible_device_count() -> int:
    """GPUs this process may use: NVML's count, narrowed by ``CUDA_VISIBLE_DEVICES``."""
    from ._probe import _visible_devices, nvml_device_count

    count = nvml_device_count()
    visible = _visible_devices()
    return count if visible is None else min(count, len(visible))


def worker_device(worker: str | None, device_count: int) -> str | None:
    """The device for a pytest-xdist worker: ``gw0`` -> ``cuda:0``, ``gw1`` -> ``cuda:1``, modulo the count.

    Returns:
        ``None`` outside xdist (or for an unrecognised worker name), ``"cpu"`` without GPUs.
    """
    if not worker or not worker.startswith("gw") or not worker[2:].isdigit():
        return None
    if device_count <= 0:
        return "cpu"
    return f"cuda:{int(worker[2:]) % device_count}"


def select_device(option: str | None, *, per_worker: bool, worker: str | None) -> str:
    """The device the plugin measures and hands to fixtures.

    Precedence: the xdist worker's own device (with ``per_worker``), then the
    ``--vram-device`` option, then the first GPU, else ``cpu``.
    """
    from ._probe import resolve_device

    if per_worker:
        chosen = worker_device(worker, visible_device_count())
        if chosen is not None:
            return chosen
    if option:
        return resolve_device(option)
    return "cuda:0" if visible_device_count() > 0 else "cpu"


# --- the live-tensor census ---------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """One tensor found alive, described without keeping it alive."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    device: str

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.dtype}[{dims}] {fmt_bytes(self.nbytes)}"


@dataclass(frozen=True)
class NewTensors:
    """Tensors on a device that were not alive before the test (counted by storage)."""

    count: int = 0
    total_bytes: int = 0
    largest: tuple[TensorInfo, ...] = ()
    searched: bool = True

    def summary(self, device: str) -> str:
        if not self.searched:
            return "live tensors: not searched (torch is not imported in this process)"
        if not self.count:
            return f"live tensors on {device} created by the test: none found by the garbage collector"
        shapes = ", ".join(str(t) for t in self.largest)
        return (
            f"live tensors on {device} created by the test: {self.count}, {fmt_bytes(self.total_bytes)} in total; "
            f"largest: {shapes}"
        )


@dataclass
class CensusBaseline:
    """What was alive on a device before the test: tensor objects and their storages."""

    device: str
    objects: dict[int, weakref.ref[Any]] = field(default_factory=dict)
    storages: dict[tuple[str, int], list[weakref.ref[Any]]] = field(default_factory=dict)


def _tensor_type() -> type | None:
    torch = sys.modules.get("torch")
    return None if torch is None else getattr(torch, "Tensor", None)


def _live_tensors(device: str) -> Iterator[Any]:
    """Tensors on ``device`` that the garbage collector tracks.

    ``type(obj)`` rather than ``isinstance``: some objects (torch's own deprecated
    aliases among them) warn or run code when asked for ``__class__``.
    """
    tensor = _tensor_type()
    if tensor is None:
        return
    want_type, _, want_index = device.partition(":")
    for obj in gc.get_objects():
        if not issubclass(type(obj), tensor):
            continue
        try:
            dev = obj.device
        except Exception:
            continue
        if dev.type != want_type:
            continue
        if want_type == "cuda" and (dev.index or 0) != int(want_index or 0):
            continue
        yield obj


def _storage_key(t: Any) -> tuple[tuple[str, int], int] | None:
    """((device, data pointer), storage bytes), or ``None`` for tensors that hold no memory."""
    try:
        storage = t.untyped_storage()
        nbytes = int(storage.nbytes())
        ptr = int(storage.data_ptr())
    except Exception:  # sparse, nested, meta or wrapper tensors
        try:
            nbytes = int(t.nelement()) * int(t.element_size())
            ptr = int(t.data_ptr())
        except Exception:
            return None
    if nbytes <= 0 or ptr == 0:
        return None
    return (str(t.device), ptr), nbytes


def _info(t: Any) -> TensorInfo | None:
    try:
        return TensorInfo(
            dtype=str(t.dtype).removeprefix("torch."),
            shape=tuple(int(d) for d in t.shape),
            nbytes=int(t.nelement()) * int(t.element_size()),
            device=str(t.device),
        )
    except Exception:
        return None


def take_census_baseline(device: str) -> CensusBaseline:
    """Remember (by weak reference) every tensor alive on ``device`` now. Empty without torch."""
    base = CensusBaseline(device=device)
    for t in _live_tensors(device):
        try:
            ref = weakref.ref(t)
        except TypeError:
            continue
        base.objects[id(t)] = ref
        key = _storage_key(t)
        if key is not None:
            base.storages.setdefault(key[0], []).append(ref)
    return base


def _storage_alive(base: CensusBaseline, key: tuple[str, int]) -> bool:
    # A storage counts as old only while a tensor from before still views that very
    # memory; an address freed during the test and reused by a new tensor is new.
    for ref in base.storages.get(key, ()):
        t = ref()
        if t is None:
            continue
        found = _storage_key(t)
        if found is not None and found[0] == key:
            return True
    return False


def tensors_created_since(base: CensusBaseline | None, device: str, *, top: int = 5) -> NewTensors:
    """Tensors alive on ``device`` now whose memory was not held before ``base``.

    Views of memory that existed before do not count; each new storage is counted
    once, described by the largest tensor that views it.
    """
    if _tensor_type() is None:
        return NewTensors(searched=False)
    new: dict[tuple[str, int], tuple[int, TensorInfo | None]] = {}
    for t in _live_tensors(device):
        if base is not None:
            ref = base.objects.get(id(t))
            if ref is not None and ref() is t:
                continue
        key = _storage_key(t)
        if key is None:
            continue
        storage, nbytes = key
        if base is not None and _storage_alive(base, storage):
            continue
        info = _info(t)
        old = new.get(storage)
        if old is None or (info is not None and (old[1] is None or info.nbytes > old[1].nbytes)):
            new[storage] = (nbytes, info)
    total = sum(n for n, _ in new.values())
    ranked = sorted(new.values(), key=lambda item: item[0], reverse=True)
    largest = tuple(info for _, info in ranked[:top] if info is not None)
    return NewTensors(count=len(new), total_bytes=total, largest=largest)


# --- the check ----------------------------------------------------------------------------------


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    if abs(n) >= MIB:
        return f"{n / MIB:.1f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def _fmt_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


@dataclass
class Verdict:
    """The outcome of one :class:`LeakCheck`.

    Attributes:
        nodeid: the test.
        device: the device measured.
        before, after: settled readings around the test.
        peak_bytes: peak allocated during the test (``None``: unknown, e.g. no GPU).
        new_tensors: the census of tensors the test left alive (searched on a leak, or on CPU).
        leaks: why the leak check failed (empty: no leak).
        budget: why the budget check failed (empty: within budget or none set).
        notes: what was not judged and why (no GPU, context created, ...).
        checked_leaks: whether leaks were judged at all.
        budget_mib: the test's ``vram_budget``, if any.
        tolerance_mib: NVML tolerance applied.
    """

    nodeid: str
    device: str
    before: Reading
    after: Reading
    peak_bytes: int | None = None
    new_tensors: NewTensors | None = None
    leaks: list[str] = field(default_factory=list)
    budget: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_leaks: bool = True
    budget_mib: float | None = None
    tolerance_mib: float = 32.0

    @property
    def ok(self) -> bool:
        return not self.leaks and not self.budget

    @property
    def peak_above_start_mib(self) -> float | None:
        """The test's own peak: allocated at its peak minus allocated when it started."""
        if self.peak_bytes is None:
            return None
        start = self.before.allocated_bytes or 0
        return max(0, self.peak_bytes - start) / MIB

    def figures(self) -> list[str]:
        b, a = self.before, self.after
        lines = []
        if a.allocated_bytes is not None:
            lines.append(
                f"torch allocated on {self.device}: {fmt_bytes(b.allocated_bytes or 0)} -> "
                f"{fmt_bytes(a.allocated_bytes)} (reserved {fmt_bytes(a.reserved_bytes)})"
            )
        if a.gpu_available and a.process_mib is not None:
            grew = a.process_mib - (b.process_mib or 0.0)
            lines.append(
                f"NVML this process: {_fmt_mib(b.process_mib)} -> {_fmt_mib(a.process_mib)} "
                f"({grew:+.1f} MiB, tolerance {self.tolerance_mib:g} MiB)"
            )
        elif not a.gpu_available:
            lines.append(f"NVML: no GPU ({a.reason})")
        if self.peak_bytes is not None:
            lines.append(
                f"peak torch allocated: {fmt_bytes(self.peak_bytes)} "
                f"({self.peak_above_start_mib:.1f} MiB above the start)"
            )
        if self.new_tensors is not None:
            lines.append(self.new_tensors.summary(self.device))
        return lines

    def message(self) -> str:
        heads = []
        if self.leaks:
            heads.append(f"VRAM leak in {self.nodeid} on {self.device}: " + "; ".join(self.leaks))
        if self.budget:
            heads.append(f"VRAM budget exceeded in {self.nodeid} on {self.device}: " + "; ".join(self.budget))
        if not heads:
            heads.append(f"no VRAM leak in {self.nodeid} on {self.device}")
        body = [*heads, *("  " + line for line in self.figures()), *("  note: " + n for n in self.notes)]
        return "\n".join(body)


class LeakCheck:
    """Measure one test: :meth:`start` before it, :meth:`finish` after its fixtures are gone.

    Args:
        probe: where the figures come from.
        nodeid: the test, for messages.
        check_leaks: judge leaks (off: only the peak and the budget are measured).
        tolerance_mib: NVML growth allowed (torch-allocated growth is allowed none).
        budget_mib: fail when the test's peak above its start exceeds this.
        settle_reads: readings taken until two in a row agree.
        settle_interval: seconds between them.
    """

    def __init__(
        self,
        probe: VramProbe,
        *,
        nodeid: str = "",
        check_leaks: bool = True,
        tolerance_mib: float = 32.0,
        budget_mib: float | None = None,
        settle_reads: int = 5,
        settle_interval: float = 0.02,
    ) -> None:
        if tolerance_mib < 0:
            raise ValueError(f"tolerance_mib={tolerance_mib!r}: must be 0 or more")
        if budget_mib is not None and budget_mib < 0:
            raise ValueError(f"budget_mib={budget_mib!r}: must be 0 or more")
        self.probe = probe
        self.nodeid = nodeid
        self.check_leaks = check_leaks
        self.tolerance_mib = tolerance_mib
        self.budget_mib = budget_mib
        self.settle_reads = max(1, settle_reads)
        self.settle_interval = settle_interval
        self.before: Reading | None = None
        self._census: CensusBaseline | None = None
        self.verdict: Verdict | None = None

    @property
    def device(self) -> str:
        return self.probe.device

    def current(self) -> Reading:
        """The probe's figures now, unsettled (for tests that want to look)."""
        return self.probe.read()

    def _settled(self) -> Reading:
        self.probe.settle()
        reading = self.probe.read()
        for _ in range(self.settle_reads - 1):
            time.sleep(self.settle_interval)
            nxt = self.probe.read()
            if nxt.process_mib == reading.process_mib and nxt.allocated_bytes == reading.allocated_bytes:
                return nxt
            reading = nxt
        return reading

    def start(self) -> Reading:
        self.before = self._settled()
        # The census costs a walk over every object; take it only when it can matter:
        # on CPU it is the check; on a GPU only if tensors are already allocated there
        # (otherwise every tensor found later is new).
        if self.check_leaks and (self.before.allocated_bytes is None or self.before.allocated_bytes > 0):
            self._census = take_census_baseline(self.device)
        self.probe.start_peak()
        return self.before

    def finish(self, *, judge: bool = True, skip_reason: str = "") -> Verdict:
        """Settle, read and judge.

        Args:
            judge: ``False`` (the test itself failed: its traceback keeps its locals
                alive) measures and notes, but finds no leak.
            skip_reason: the note recorded when ``judge`` is false.
        """
        if self.before is None:
            raise RuntimeError("LeakCheck.finish() before start()")
        peak = self.probe.stop_peak()
        after = self._settled()
        verdict = Verdict(
            nodeid=self.nodeid,
            device=self.device,
            before=self.before,
            after=after,
            peak_bytes=peak,
            checked_leaks=self.check_leaks and judge,
            budget_mib=self.budget_mib,
            tolerance_mib=self.tolerance_mib,
        )
        if self.check_leaks and not judge:
            verdict.notes.append(skip_reason or "leaks not judged")
        elif self.check_leaks:
            self._judge_leaks(verdict)
        self._judge_budget(verdict)
        self._census = None
        self.verdict = verdict
        return verdict

    def _judge_leaks(self, v: Verdict) -> None:
        before, after = v.before, v.after
        if after.allocated_bytes is None:
            # No allocator figures (CPU): the census is the check.
            v.new_tensors = tensors_created_since(self._census, self.device)
            if v.new_tensors.count:
                v.leaks.append(
                    f"{v.new_tensors.count} tensor(s) created by the test are still alive "
                    f"({fmt_bytes(v.new_tensors.total_bytes)})"
                )
        else:
            grew = after.allocated_bytes - (before.allocated_bytes or 0)
            if grew > 0:
                v.leaks.append(
                    f"torch allocated grew by {fmt_bytes(grew)} "
                    f"({fmt_bytes(before.allocated_bytes or 0)} -> {fmt_bytes(after.allocated_bytes)})"
                )
        if not after.gpu_available:
            if after.device != "cpu":
                v.notes.append(f"NVML not checked: no GPU ({after.reason})")
        elif after.process_mib is not None and before.process_mib is not None:
            self._judge_nvml(v)
        if v.leaks and v.new_tensors is None:
            v.new_tensors = tensors_created_since(self._census, self.device)

    def _judge_nvml(self, v: Verdict) -> None:
        before, after = v.before.process_mib, v.after.process_mib
        assert before is not None  # checked by the caller
        assert after is not None
        grew = after - before
        if grew <= self.tolerance_mib:
            return
        # Growth up to what a bare CUDA context with cuDNN and cuBLAS costs is the
        # context (or its libraries' lazily loaded kernels), not the test's memory.
        floor = self.probe.context_floor()
        created = v.after.cuda_initialized and not v.before.cuda_initialized
        if floor is None:
            if created:
                v.notes.append(
                    f"NVML grew by {grew:.1f} MiB, including the CUDA context this test created; "
                    "no bare-context floor could be measured, so NVML was not judged"
                )
                return
            excess = grew
        else:
            excess = after - max(before, floor)
            if excess <= self.tolerance_mib:
                v.notes.append(
                    f"NVML grew by {grew:.1f} MiB, within a bare CUDA context's {floor:.0f} MiB "
                    "(context, cuDNN, cuBLAS) plus tolerance"
                )
                return
        what = (
            f"{excess:.1f} MiB above the start"
            if floor is None
            else (f"{excess:.1f} MiB above max(start, bare context {floor:.0f} MiB)")
        )
        v.leaks.append(
            f"NVML process memory grew by {grew:.1f} MiB ({before:.1f} -> {after:.1f} MiB), {what}, "
            f"over the tolerance of {self.tolerance_mib:g} MiB"
        )

    def _judge_budget(self, v: Verdict) -> None:
        if self.budget_mib is None:
            return
        peak = v.peak_above_start_mib
        if peak is None:
            reason = v.after.reason or "the probe has no peak figure"
            v.notes.append(f"vram_budget({self.budget_mib:g}) not checked: no GPU ({reason})")
            return
        if peak > self.budget_mib:
            v.budget.append(
                f"peak {peak:.1f} MiB above the start (torch allocated) exceeds vram_budget({self.budget_mib:g} MiB)"
            )
