"""GPU memory budgets, admission and the cross-process reservation ledger.

MinerU sizes its work from ``MINERU_VIRTUAL_VRAM_SIZE`` (a *hint*, in GB: VLM batch
sizes and vLLM's ``gpu_memory_utilization`` are derived from it) and nothing caps
what it takes. Two processes that both see 40 GiB free and both load a 30 GiB
model will both start, and one of them will die of an OOM. This module makes the
budget a reservation:

* :class:`VramBudget` says how much device memory a session, engine or queue
  worker needs (MiB, or a fraction of the card) and turns it into the settings
  MinerU and engines understand (``MINERU_VIRTUAL_VRAM_SIZE``, a memory fraction).
* :func:`admit` waits, before anything loads, until the device has that much
  memory free *as NVML measures it* (what other processes hold counts), minus
  what other mineru-vram processes on this machine have reserved but not yet
  allocated; then it records a reservation. A timeout ends the wait with
  :class:`~mineru_vram.AdmissionTimeoutError`, which says who holds the memory.
* The ledger is a folder of small files under the runtime folder
  (``MINERU_VRAM_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/mineru-vram``, else
  ``<tmp>/mineru-vram-<uid>``), one per reservation, each ``flock``-ed by its
  holder for as long as it lives; admission runs under an exclusive lock on the
  device's ``ledger.lock``, so two processes never both decide the same free
  memory is theirs. A holder that dies releases its ``flock`` with its last file
  descriptor, which is how stale reservations are recognised (across PID
  namespaces too, where pids would lie), the way the worker runner's folders are.

A reservation counts against others only for the part its holder has not yet
allocated: its processes' growth (by NVML) since it was made is subtracted, so a
session that loaded its models is not counted twice (once by NVML, once by the
ledger). Where NVML cannot see per-process figures (a PID namespace), the whole
reservation counts, which errs on the safe side.

The probe is injectable (:class:`MemoryProbe`): tests stand in for NVML there
and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ._exceptions import AdmissionTimeoutError, ConfigurationError
from ._files import OwnerLock, exclusive, owner_alive, private_dir, private_file
from ._probe import DeviceMemory

__all__ = [
    "Ledger",
    "MemoryProbe",
    "Reservation",
    "VramBudget",
    "admit",
    "default_runtime_dir",
    "nvml_probe",
    "parse_budget",
    "resolve_budget",
]

logger = logging.getLogger("mineru_vram")

_DEFAULT_TIMEOUT = 600.0
_DEFAULT_POLL = 0.5


class MemoryProbe(Protocol):
    """Reads one device's memory: NVML in production, a stand-in in tests.

    Returns ``None`` where the device cannot be read (no driver, CPU).
    """

    def __call__(self, device: str) -> DeviceMemory | None: ...


def nvml_probe(device: str) -> DeviceMemory | None:
    """The default probe: NVML's device figures, per-process list included (no CUDA context)."""
    if not device.startswith("cuda"):
        return None
    from ._probe import vram_snapshot

    return vram_snapshot(device).device_info


# --- the budget -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VramBudget:
    """How much device memory some work may use, and how long to wait for it.

    Example::

        ModelSession("pipeline", budget=VramBudget(6 * 1024))       # 6 GiB
        ModelSession("pipeline", budget=VramBudget(fraction=0.25))  # a quarter of the card
        ModelSession("pipeline", budget=6144)                        # int: MiB; float <= 1: fraction

    Args:
        mib: the budget in MiB.
        fraction: the budget as a fraction of the device's total memory (0 < f <= 1).
        timeout: seconds admission waits for the memory before
            :class:`~mineru_vram.AdmissionTimeoutError`.
        headroom_mib: free memory required beyond the budget at admission (a CUDA
            context, activations); not reserved.
        poll_interval: seconds between NVML readings while waiting.
        probe: reads the device (default NVML); a stand-in only in tests.
    """

    mib: float | None = None
    fraction: float | None = None
    timeout: float = _DEFAULT_TIMEOUT
    headroom_mib: float = 0.0
    poll_interval: float = _DEFAULT_POLL
    probe: MemoryProbe | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if (self.mib is None) == (self.fraction is None):
            raise ConfigurationError("VramBudget takes mib= or fraction=, exactly one of them")
        if self.mib is not None and (isinstance(self.mib, bool) or not self.mib > 0 or not math.isfinite(self.mib)):
            raise ConfigurationError(f"VramBudget(mib={self.mib!r}): must be a positive number of MiB", mib=self.mib)
        if self.fraction is not None and (isinstance(self.fraction, bool) or not 0 < self.fraction <= 1):
            raise ConfigurationError(
                f"VramBudget(fraction={self.fraction!r}): must be above 0 and at most 1", fraction=self.fraction
            )
        if not self.timeout >= 0:
            raise ConfigurationError(f"VramBudget(timeout={self.timeout!r}): must be 0 or more seconds")
        if not self.headroom_mib >= 0:
            raise ConfigurationError(f"VramBudget(headroom_mib={self.headroom_mib!r}): must be 0 or more")
        if not self.poll_interval > 0:
            raise ConfigurationError(f"VramBudget(poll_interval={self.poll_interval!r}): must be positive")

    def need_mib(self, total_mib: float | None) -> float | None:
        """The budget in MiB on a device of ``total_mib`` (``None`` if a fraction meets an unknown total)."""
        if self.mib is not None:
            return float(self.mib)
        if total_mib is None:
            return None
        assert self.fraction is not None
        return self.fraction * total_mib

    def virtual_vram_gb(self, total_mib: float | None) -> int | None:
        """``MINERU_VIRTUAL_VRAM_SIZE`` for this budget: whole GB, rounded down, at least 1.

        MinerU parses the variable as an integer number of GB and derives VLM batch
        sizes and vLLM's memory utilisation from it; rounding down never sizes work
        for more than the budget.
        """
        need = self.need_mib(total_mib)
        if need is None:
            return None
        return max(1, int(need // 1024))

    def engine_fraction(self, total_mib: float) -> float:
        """A memory fraction for engines (SGLang ``--mem-fraction-static``, vLLM utilisation).

        Rounded down to 3 decimals, so the fraction never asks for more than the budget.

        Raises:
            ConfigurationError: the budget is not below the device's total, or under 0.1% of it.
        """
        need = self.need_mib(total_mib)
        assert need is not None
        if self.mib is not None and need >= total_mib:
            raise ConfigurationError(
                f"a budget of {need:.0f} MiB is not below the device's total {total_mib:.0f} MiB", mib=self.mib
            )
        fraction = math.floor(need / total_mib * 1000) / 1000
        if fraction <= 0:
            raise ConfigurationError(f"a budget of {need:.0f} MiB is under 0.1% of the device", mib=self.mib)
        return fraction

    def env(self, total_mib: float | None) -> dict[str, str]:
        """The environment MinerU reads for this budget (set only inside a session)."""
        gb = self.virtual_vram_gb(total_mib)
        return {} if gb is None else {"MINERU_VIRTUAL_VRAM_SIZE": str(gb)}

    def to_json(self) -> dict[str, Any]:
        """Plain data for storage (the queue file); the probe is not stored."""
        return {
            "mib": self.mib,
            "fraction": self.fraction,
            "timeout": self.timeout,
            "headroom_mib": self.headroom_mib,
            "poll_interval": self.poll_interval,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VramBudget:
        return cls(**{k: data[k] for k in ("mib", "fraction", "timeout", "headroom_mib", "poll_interval") if k in data})

    def __str__(self) -> str:
        return f"{self.mib:.0f} MiB" if self.mib is not None else f"{self.fraction:.0%} of the device"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|mib|mb|m|gib|gb|g)?\s*$", re.IGNORECASE)


def parse_budget(text: str) -> VramBudget:
    """Read a budget from text (command line, environment, queue file).

    ``"6144"`` and ``"6144MiB"`` are MiB, ``"6GiB"`` / ``"6G"`` GiB, ``"0.25"`` and
    ``"25%"`` a fraction of the device (a plain number at most 1 is a fraction).

    Raises:
        ConfigurationError: text that is none of these.
    """
    m = _SIZE.match(text)
    if m is None:
        raise ConfigurationError(
            f"budget {text!r}: expected MiB ('6144', '6144MiB'), GiB ('6GiB'), or a fraction ('0.25', '25%')",
            budget=text,
        )
    value, unit = float(m.group(1)), (m.group(2) or "").lower()
    if unit == "%":
        return VramBudget(fraction=value / 100)
    if unit in ("gib", "gb", "g"):
        return VramBudget(mib=value * 1024)
    if unit or value > 1:
        return VramBudget(mib=value)
    return VramBudget(fraction=value)


def resolve_budget(value: VramBudget | int | float | str | None) -> VramBudget | None:
    """Coerce a ``budget=`` argument: ``int`` is MiB, a ``float`` at most 1 a fraction, text as :func:`parse_budget`.

    Raises:
        ConfigurationError: anything else.
    """
    if value is None or isinstance(value, VramBudget):
        return value
    if isinstance(value, bool):
        raise ConfigurationError(f"budget={value!r}: expected MiB, a fraction or a VramBudget", budget=value)
    if isinstance(value, int):
        return VramBudget(mib=value)
    if isinstance(value, float):
        return VramBudget(fraction=value) if value <= 1 else VramBudget(mib=value)
    if isinstance(value, str):
        return parse_budget(value)
    raise ConfigurationError(f"budget={value!r}: expected MiB, a fraction or a VramBudget", budget=repr(value))


def holders_text(info: DeviceMemory | None, *, gib: bool = False, most: int = 5) -> str:
    """The processes holding the most memory on a device, for error messages ("" if none is listed)."""
    if info is None:
        return ""
    holders = sorted(info.processes, key=lambda p: -p.used_mib)[:most]
    if gib:
        return ", ".join(f"pid {p.pid} ({p.name or '?'}) {p.used_mib / 1024:.1f} GiB" for p in holders)
    return ", ".join(f"pid {p.pid} ({p.name or '?'}) {p.used_mib:.0f} MiB" for p in holders)


# --- the runtime folder ---------------------------------------------------------------------


def default_runtime_dir(configured: str | os.PathLike[str] | None = None, *, trust_env: bool = True) -> Path:
    """Where the ledger lives: argument > ``MINERU_VRAM_RUNTIME_DIR`` > ``$XDG_RUNTIME_DIR/mineru-vram`` > tmp.

    ``trust_env=False`` skips ``MINERU_VRAM_RUNTIME_DIR`` (as a session with that setting does).

    Every process of a user that should see the others' reservations must resolve
    the same folder; the default does, for processes of one user on one machine.
    The name in the temporary folder is predictable, so it is used only through
    :func:`~mineru_vram._files.private_dir`, which refuses a folder another user
    created or can write to.
    """
    from ._config import getenv

    if configured is not None:
        return Path(configured)
    env = getenv("MINERU_VRAM_RUNTIME_DIR") if trust_env else None
    if env:
        return Path(env)
    xdg = getenv("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return Path(xdg) / "mineru-vram"
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"mineru-vram-{uid}"


def device_key(device: str) -> str:
    """A name for the physical device that every process agrees on.

    NVML's UUID where NVML sees the device (``CUDA_VISIBLE_DEVICES`` renumbers
    devices per process, the UUID does not); else the device string.
    """
    if device.startswith("cuda"):
        from ._probe import _nvml, _nvml_handle, device_index

        handle = _nvml_handle(device_index(device))
        nvml = _nvml()
        if handle is not None and nvml is not None:
            try:
                uuid_ = nvml.nvmlDeviceGetUUID(handle)
                text = uuid_.decode() if isinstance(uuid_, bytes) else str(uuid_)
                return re.sub(r"[^A-Za-z0-9_.-]", "_", text)
            except Exception:
                pass
    return re.sub(r"[^A-Za-z0-9_.-]", "_", device)


# --- the ledger -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEntry:
    """One reservation as stored: who, how much, and their NVML figure when it was made."""

    id: str
    need_mib: float
    pids: tuple[int, ...]
    base_mib: float  # what ``pids`` held on the device (NVML) when the reservation was made
    what: str
    host: str
    created: float


class Ledger:
    """The reservations of every mineru-vram process on this machine, for one runtime folder.

    Each reservation is a file held by an :class:`~mineru_vram._files.OwnerLock` for
    its holder's life; the ledger's folders are private (``0700``, ours, refused otherwise).

    Args:
        root: the runtime folder (default :func:`default_runtime_dir`).
        trust_env: read ``MINERU_VRAM_RUNTIME_DIR`` where ``root`` is not given.
    """

    # How long admission waits for another process's brief hold on a device's ledger.
    LOCK_TIMEOUT = 60.0

    def __init__(self, root: str | os.PathLike[str] | None = None, *, trust_env: bool = True) -> None:
        self.runtime_dir = default_runtime_dir(root, trust_env=trust_env)
        self.root = self.runtime_dir / "ledger"

    def _folder(self, key: str) -> Path:
        return private_dir(self.root / key, within=self.runtime_dir)

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[Path]:
        """Hold the device's ledger lock (exclusive, across processes and threads) for the body.

        Raises:
            InsecurePathError: the ledger folder is not private to this user.
            TimeoutError: another process held the lock for :attr:`LOCK_TIMEOUT` seconds.
        """
        folder = self._folder(key)
        with exclusive(folder / "ledger.lock", timeout=self.LOCK_TIMEOUT):
            yield folder

    def entries(self, folder: Path) -> list[LedgerEntry]:
        """Live reservations in ``folder``; stale ones (holder gone) are removed. Call under :meth:`locked`."""
        out: list[LedgerEntry] = []
        for path in sorted(folder.glob("res-*.json")):
            alive = owner_alive(path, remove_if_dead=True)
            if alive is False:
                logger.info("removed a stale VRAM reservation %s (its process is gone)", path.name)
                continue
            if alive is None:
                continue  # released meanwhile
            try:
                with private_file(path, "rb") as fh:
                    data = json.loads(fh.read().decode("utf-8") or "{}")
                out.append(
                    LedgerEntry(
                        id=str(data["id"]),
                        need_mib=float(data["need_mib"]),
                        pids=tuple(int(p) for p in data.get("pids", ())),
                        base_mib=float(data.get("base_mib", 0.0)),
                        what=str(data.get("what", "")),
                        host=str(data.get("host", "")),
                        created=float(data.get("created", 0.0)),
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue  # half-written, unreadable or not ours: not a reservation we can count
        return out

    def write(self, folder: Path, entry: LedgerEntry) -> OwnerLock:
        """Create a reservation file, locked before it becomes visible. Returns the held lock."""
        return OwnerLock(folder / f"res-{entry.id}.json").acquire(json.dumps(entry.__dict__).encode("utf-8"))

    def rewrite(self, entry: LedgerEntry, lock: OwnerLock) -> None:
        """Replace a held reservation's content in place (the lock stays on the same file)."""
        lock.rewrite(json.dumps(entry.__dict__).encode("utf-8"))

    def snapshot(self, key: str) -> list[LedgerEntry]:
        """The live reservations on a device (for diagnostics and tests)."""
        with self.locked(key) as folder:
            return self.entries(folder)


def outstanding_mib(entries: Sequence[LedgerEntry], info: DeviceMemory | None) -> float:
    """Memory reserved by ``entries`` and not yet allocated by their processes.

    Growth is grouped per pid: several reservations of one process share its growth.
    Without per-process figures (none listed) every reservation counts in full.
    """
    listed = {} if info is None else {p.pid: p.used_mib for p in info.processes}
    groups: dict[tuple[int, ...], list[LedgerEntry]] = {}
    for e in entries:
        groups.setdefault(e.pids, []).append(e)
    total = 0.0
    for pids, group in groups.items():
        need = sum(e.need_mib for e in group)
        if not listed:
            total += need
            continue
        now = sum(listed.get(pid, 0.0) for pid in pids)
        base = min(e.base_mib for e in group)
        total += max(0.0, need - max(0.0, now - base))
    return total


# --- admission ------------------------------------------------------------------------------


class Reservation:
    """Memory admitted for some work, recorded in the ledger until :meth:`release`.

    Attributes:
        device: the device admitted on.
        need_mib: the budget in MiB (``None`` on CPU or where NVML cannot read the device).
        total_mib: the device's total, when known.
        virtual_vram_gb: ``MINERU_VIRTUAL_VRAM_SIZE`` for the work.
        waited: seconds admission waited.
    """

    def __init__(
        self,
        *,
        device: str,
        budget: VramBudget,
        need_mib: float | None,
        total_mib: float | None,
        waited: float = 0.0,
        ledger: Ledger | None = None,
        folder: Path | None = None,
        entry: LedgerEntry | None = None,
        handle: OwnerLock | None = None,
    ) -> None:
        self.device = device
        self.budget = budget
        self.need_mib = need_mib
        self.total_mib = total_mib
        self.waited = waited
        self.virtual_vram_gb = budget.virtual_vram_gb(total_mib)
        self._ledger = ledger
        self._folder = folder
        self._entry = entry
        self._handle = handle
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether the reservation is still in the ledger."""
        return self._handle is not None

    @property
    def id(self) -> str | None:
        return None if self._entry is None else self._entry.id

    def set_pids(self, pids: Sequence[int]) -> None:
        """Count the growth of these processes against the reservation (a worker that started).

        Processes added after the reservation was made held nothing on the device
        before it, so all they hold now is spent from it; the base recorded at
        admission (for the processes named then) stays.
        """
        with self._lock:
            if self._handle is None or self._entry is None or self._ledger is None or self._folder is None:
                return
            entry = LedgerEntry(**{**self._entry.__dict__, "pids": tuple(pids)})
            with self._ledger.locked(self._folder.name):
                self._ledger.rewrite(entry, self._handle)
            self._entry = entry

    def release(self) -> None:
        """Remove the reservation from the ledger. Idempotent."""
        with self._lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                handle.release()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        need = "n/a" if self.need_mib is None else f"{self.need_mib:.0f} MiB"
        return f"Reservation({self.device}, {need}, held={self.held}, waited={self.waited:.2f}s)"


def admit(
    budget: VramBudget,
    device: str,
    *,
    what: str = "work",
    ledger: Ledger | None = None,
    pids: Sequence[int] | None = None,
    timeout: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Reservation:
    """Wait until ``device`` has ``budget`` free, then reserve it in the ledger.

    Free means NVML's free memory (what every process holds counts) minus what
    other mineru-vram processes reserved and have not allocated yet, minus the
    budget's ``headroom_mib``. On CPU nothing is measured or reserved.

    Args:
        budget: how much, how long to wait, and the probe.
        device: ``"cpu"`` or ``"cuda:N"``.
        what: names the work in messages and in the ledger.
        ledger: the ledger (default: the runtime folder's).
        pids: processes whose growth spends the reservation (default this one).
        timeout: overrides ``budget.timeout``.

    Raises:
        AdmissionTimeoutError: the memory was not free within the timeout.
        ConfigurationError: the budget can never fit the device, or a fraction was
            given where NVML cannot read the device.
    """
    probe = budget.probe or nvml_probe
    wait_s = budget.timeout if timeout is None else timeout
    if not device.startswith("cuda"):
        return Reservation(device=device, budget=budget, need_mib=budget.need_mib(None), total_mib=None)
    info = probe(device)
    if info is None:
        if budget.mib is None:
            raise ConfigurationError(
                f"budget {budget} needs the device's total memory, and NVML cannot read {device}; "
                "give the budget in MiB instead",
                device=device,
            )
        logger.warning("NVML cannot read %s: admitting %s without checking free memory", device, budget)
        return Reservation(device=device, budget=budget, need_mib=budget.need_mib(None), total_mib=None)
    need = budget.need_mib(info.total_mib)
    assert need is not None
    if need + budget.headroom_mib > info.total_mib:
        raise ConfigurationError(
            f"{what}: a budget of {need:.0f} MiB (+{budget.headroom_mib:.0f} MiB headroom) can never fit "
            f"{device} ({info.name}, {info.total_mib:.0f} MiB in all)",
            device=device,
            need_mib=need,
            total_mib=info.total_mib,
        )
    ledger = ledger or Ledger()
    key = device_key(device)
    owner_pids = tuple(pids) if pids is not None else (os.getpid(),)
    start = clock()
    last: tuple[DeviceMemory, float] | None = None
    while True:
        with ledger.locked(key) as folder:
            info = probe(device) or info
            reserved = outstanding_mib(ledger.entries(folder), info)
            available = info.free_mib - reserved - budget.headroom_mib
            last = (info, reserved)
            if need <= available:
                listed = {p.pid: p.used_mib for p in info.processes}
                entry = LedgerEntry(
                    id=f"{os.getpid()}-{uuid.uuid4().hex[:12]}",
                    need_mib=need,
                    pids=owner_pids,
                    base_mib=sum(listed.get(p, 0.0) for p in owner_pids),
                    what=what,
                    host=socket.gethostname(),
                    created=time.time(),
                )
                handle = ledger.write(folder, entry)
                waited = clock() - start
                if waited > budget.poll_interval:
                    logger.info("%s admitted on %s after waiting %.1fs for %.0f MiB", what, device, waited, need)
                return Reservation(
                    device=device,
                    budget=budget,
                    need_mib=need,
                    total_mib=info.total_mib,
                    waited=waited,
                    ledger=ledger,
                    folder=folder,
                    entry=entry,
                    handle=handle,
                )
        waited = clock() - start
        if waited >= wait_s:
            raise _timeout_error(
                what=what, device=device, need=need, budget=budget, last=last, waited=waited, timeout=wait_s
            )
        sleep(min(budget.poll_interval, max(0.0, wait_s - waited)) or budget.poll_interval)


def _timeout_error(
    *,
    what: str,
    device: str,
    need: float,
    budget: VramBudget,
    last: tuple[DeviceMemory, float] | None,
    waited: float,
    timeout: float,
) -> AdmissionTimeoutError:
    assert last is not None
    info, reserved = last
    held = holders_text(info)
    headroom = f" plus {budget.headroom_mib:.0f} MiB headroom" if budget.headroom_mib else ""
    return AdmissionTimeoutError(
        f"{what}: {device} ({info.name}) did not have {need:.0f} MiB{headroom} free within {timeout:g}s: "
        f"NVML reports {info.free_mib:.0f} MiB free of {info.total_mib:.0f} MiB, and other mineru-vram processes "
        f"have reserved {reserved:.0f} MiB they have not allocated yet."
        + (f" Holding memory: {held}." if held else "")
        + " Lower the budget, raise its timeout, or free the device.",
        device=device,
        need_mib=need,
        free_mib=info.free_mib,
        reserved_mib=reserved,
        total_mib=info.total_mib,
        waited=waited,
        device_info=info,
    )
