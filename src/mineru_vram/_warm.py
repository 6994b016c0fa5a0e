"""Warm re-entry: a session's models parked in host memory between sessions.

Releasing a session's models returns the GPU, and the next session pays a full
load again (seconds in process, tens of seconds in a fresh worker). A session
opened with ``keep_warm=True`` releases the GPU exactly as before, but on exit its
models go to host memory instead of away: every tensor they hold is moved off the
device (into pinned memory where that speeds the copy back and the pinned budget
allows), checked, and kept in one process-wide :class:`WarmCache` under the
session's settings. The next session with the same settings takes them back
(``.to(device)``) instead of building them from disk.

What makes this safe to promise:

* Nothing parked is on the GPU: after parking, the objects' graph is searched
  again for tensors on a device; if any is found (a cache the walk cannot move),
  the models are not parked but released as usual, and the receipt says why.
* Different settings never share parked models: the key is everything that made
  them (device, model folder and source, small-model backend).
* The cache has a host-memory budget (``MINERU_VRAM_HOST_CACHE_MIB`` or
  :func:`warm_cache`'s ``set_budget``); the least recently used entries are
  evicted to fit, and an entry larger than the budget is not parked at all.
* :meth:`WarmCache.clear` drops everything; so does interpreter exit (a
  ``weakref.finalize`` that never raises).

The walk knows nothing of MinerU: it moves ``torch.nn.Module`` objects with
``.to()`` and any other tensor it finds in attributes, lists and dicts, which is
what a model wrapper is made of. MinerU's caches are read and written by
``_adapter``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import types
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from ._probe import MIB

__all__ = ["ParkReport", "WarmCache", "WarmEntry", "WarmKey", "warm_cache"]

logger = logging.getLogger("mineru_vram")

# Without a setting: a quarter of the host's memory, at most 8 GiB. Pinned (page-locked) copies,
# which the driver can copy to the device without staging, at most a tenth, at most 4 GiB.
_DEFAULT_SHARE, _DEFAULT_CAP_MIB = 0.25, 8192.0
_PINNED_SHARE, _PINNED_CAP_MIB = 0.10, 4096.0
# The object walk's bounds: model wrappers are shallow; a walk that goes deeper is in a library's guts.
_MAX_DEPTH = 12
_MAX_NODES = 200_000
_SKIP_TYPES = (
    str,
    bytes,
    bytearray,
    int,
    float,
    bool,
    complex,
    type(None),
    type,
    types.ModuleType,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    types.BuiltinMethodType,
)


@dataclasses.dataclass(frozen=True)
class WarmKey:
    """What made a set of models: only a session with the same key may take them."""

    device: str
    models_dir: str | None
    model_source: str | None
    small_backend: str

    def __str__(self) -> str:
        return f"{self.small_backend} models from {self.models_dir or 'MinerU default'} for {self.device}"


@dataclasses.dataclass
class WarmEntry:
    """Parked models of one key.

    Attributes:
        key: the settings they were made with.
        models: MinerU cache entries (name -> model object), as ``_adapter`` took them.
        nbytes: host bytes their tensors hold.
        pinned: whether the tensors are in pinned (page-locked) host memory.
        parked_at / last_used: ``time.time()`` of parking and of the last take.
        labels: the cache entries, for reports.
    """

    key: WarmKey
    models: dict[Any, Any]
    nbytes: int
    pinned: bool
    parked_at: float
    last_used: float
    labels: list[str]
    _moves: list[_Move] = dataclasses.field(default_factory=list, repr=False)

    @property
    def mib(self) -> float:
        return self.nbytes / MIB


@dataclasses.dataclass(frozen=True)
class ParkReport:
    """What parking did, for the release receipt.

    Attributes:
        parked: the cache entries now in host memory (empty when nothing was parked).
        mib: host memory they take.
        where: ``"host memory (pinned)"`` or ``"host memory"``.
        seconds: time spent moving them.
        reason: why nothing was parked (``None`` when they were).
        evicted: keys evicted from the cache to make room.
    """

    parked: tuple[str, ...]
    mib: float
    where: str
    seconds: float
    reason: str | None = None
    evicted: tuple[str, ...] = ()


@dataclasses.dataclass
class _Move:
    """One tensor that is not a module's parameter or buffer, and where it lives."""

    container: Any
    slot: Any  # attribute name, dict key or list index
    kind: str  # "attr", "item"


class WarmCache:
    """Parked models of this process, by :class:`WarmKey`, least recently used first out.

    Args:
        budget_mib: host memory the cache may hold (``None``: the default share of RAM).
    """

    def __init__(self, budget_mib: float | None = None) -> None:
        self._lock = threading.RLock()
        self._entries: OrderedDict[WarmKey, WarmEntry] = OrderedDict()
        self._budget_mib = budget_mib

    # -- introspection ---------------------------------------------------------------------------

    @property
    def budget_mib(self) -> float:
        if self._budget_mib is not None:
            return self._budget_mib
        from ._config import env_settings

        configured = env_settings().get("host_cache_mib")
        if configured is not None:
            return float(configured)
        return min(_DEFAULT_CAP_MIB, _host_total_mib() * _DEFAULT_SHARE)

    def set_budget(self, mib: float | None) -> None:
        """Change the budget (``None``: back to the default); evicts what no longer fits."""
        with self._lock:
            self._budget_mib = mib
            self._evict_to(self.budget_mib)

    @property
    def size_mib(self) -> float:
        with self._lock:
            return sum(e.mib for e in self._entries.values())

    def entries(self) -> list[WarmEntry]:
        """The parked entries, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        with self._lock:
            parts = ", ".join(f"{e.key.device}: {e.mib:.0f} MiB" for e in self._entries.values())
        return f"WarmCache({len(self)} entries, {self.size_mib:.0f} of {self.budget_mib:.0f} MiB; {parts or 'empty'})"

    # -- park and take ---------------------------------------------------------------------------

    def park(self, key: WarmKey, models: dict[Any, Any], *, labels: list[str], pin: bool = True) -> ParkReport:
        """Move ``models`` to host memory and keep them under ``key``.

        On success the caller no longer owns ``models``. When they cannot be parked
        (too large for the budget, a tensor left on the device), they are moved back
        as they were, nothing is kept, and the report's ``reason`` says why: the
        caller releases them as usual.
        """
        t0 = time.perf_counter()
        torch = _torch()
        moves: list[_Move] = []
        pinned = False
        if torch is not None and key.device.startswith("cuda"):
            nbytes = _tensor_bytes(models.values())
            pinned = pin and self._pinned_mib() + nbytes / MIB <= _pinned_limit_mib()
            moves = _move_all(models.values(), "cpu", pin=pinned)
            left = _device_tensors(models.values())
            if left:
                _move_all(models.values(), key.device, pin=False, moves=moves)
                return ParkReport((), 0.0, "", time.perf_counter() - t0, reason=f"tensors stayed on the device: {left}")
        nbytes = _tensor_bytes(models.values())
        mib = nbytes / MIB
        with self._lock:
            budget = self.budget_mib
            if mib > budget:
                if moves:
                    _move_all(models.values(), key.device, pin=False, moves=moves)
                return ParkReport(
                    (),
                    0.0,
                    "",
                    time.perf_counter() - t0,
                    reason=f"{mib:.0f} MiB exceed the host cache's {budget:.0f} MiB",
                )
            old = self._entries.pop(key, None)
            evicted = self._evict_to(budget - mib)
            now = time.time()
            self._entries[key] = WarmEntry(key, dict(models), nbytes, pinned, now, now, list(labels), moves)
        if old is not None:
            logger.info("replaced parked models for %s", key)
        where = "host memory (pinned)" if pinned else "host memory"
        seconds = time.perf_counter() - t0
        logger.info("parked %d models for %s in %s: %.0f MiB in %.2fs", len(models), key, where, mib, seconds)
        return ParkReport(tuple(labels), mib, where, seconds, evicted=tuple(str(k) for k in evicted))

    def take(self, key: WarmKey) -> tuple[dict[Any, Any], float] | None:
        """Remove the entry for ``key`` and move its models back to the key's device.

        Returns:
            ``(models, seconds)``, or ``None`` when nothing is parked for ``key``.
        """
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return None
        t0 = time.perf_counter()
        if key.device.startswith("cuda") and _torch() is not None:
            _move_all(entry.models.values(), key.device, pin=False, moves=entry._moves)
            _torch().cuda.synchronize(key.device)
        return entry.models, time.perf_counter() - t0

    def discard(self, key: WarmKey) -> bool:
        """Drop the entry for ``key`` (its models are freed once nothing else holds them)."""
        with self._lock:
            return self._entries.pop(key, None) is not None

    def clear(self) -> float:
        """Drop every parked model. Returns the MiB given back."""
        with self._lock:
            freed = self.size_mib
            self._entries.clear()
        return freed

    def _evict_to(self, limit_mib: float) -> list[WarmKey]:
        evicted: list[WarmKey] = []
        while self._entries and self.size_mib > max(0.0, limit_mib):
            key, entry = self._entries.popitem(last=False)
            evicted.append(key)
            logger.info("evicted parked models for %s (%.0f MiB, least recently used)", key, entry.mib)
        return evicted

    def _pinned_mib(self) -> float:
        return sum(e.mib for e in self._entries.values() if e.pinned)


_cache: WarmCache | None = None
_cache_lock = threading.Lock()


def warm_cache() -> WarmCache:
    """The process-wide cache of parked models (created on first use, cleared at interpreter exit)."""
    global _cache
    with _cache_lock:
        if _cache is None:
            _cache = WarmCache()
            weakref.finalize(_cache, _clear_quietly, _cache)  # atexit=True: runs at interpreter exit
        return _cache


def _clear_quietly(cache: WarmCache) -> None:
    try:
        cache._entries.clear()
    except Exception:
        pass


# --- moving tensors ---------------------------------------------------------------------------------


def _torch() -> Any:
    import sys

    return sys.modules.get("torch")


def _host_total_mib() -> float:
    try:
        import psutil

        return float(psutil.virtual_memory().total) / MIB
    except Exception:
        return 16 * 1024.0


def _pinned_limit_mib() -> float:
    return min(_PINNED_CAP_MIB, _host_total_mib() * _PINNED_SHARE)


def _walk(roots: Any) -> Iterator[tuple[Any, Any, Any, str]]:
    """Every ``(value, container, slot, kind)`` reachable from ``roots`` through attributes, lists and dicts.

    Modules are yielded and their own attributes walked (a tensor kept as a plain
    attribute is not moved by ``.to()``), but not their parameters and buffers,
    which ``.to()`` moves.
    """
    torch = _torch()
    module_type = torch.nn.Module if torch is not None else ()
    seen: set[int] = set()
    stack: list[tuple[Any, Any, Any, str, int]] = [(r, None, None, "root", 0) for r in roots]
    nodes = 0
    while stack:
        value, container, slot, kind, depth = stack.pop()
        if isinstance(value, _SKIP_TYPES):
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        nodes += 1
        if nodes > _MAX_NODES or depth > _MAX_DEPTH:
            continue
        yield value, container, slot, kind
        if torch is not None and isinstance(value, torch.Tensor):
            continue
        children: list[tuple[Any, Any, str]] = []
        if isinstance(value, dict):
            children = [(v, k, "item") for k, v in value.items()]
        elif isinstance(value, list):
            children = [(v, i, "item") for i, v in enumerate(value)]
        elif isinstance(value, (tuple, set, frozenset)):
            children = [(v, None, "frozen") for v in value]
        else:
            attrs = getattr(value, "__dict__", None)
            if isinstance(attrs, dict):
                skip = ("_parameters", "_buffers") if isinstance(value, module_type) else ()
                children = [(v, k, "attr") for k, v in attrs.items() if k not in skip]
        for child, child_slot, child_kind in children:
            stack.append((child, value, child_slot, child_kind, depth + 1))


def _move_all(roots: Any, device: str, *, pin: bool, moves: list[_Move] | None = None) -> list[_Move]:
    """Move every module and loose tensor under ``roots`` to ``device``; returns the loose tensors' places."""
    torch = _torch()
    found: list[_Move] = []
    modules = []
    for value, container, slot, kind in _walk(roots):
        if isinstance(value, torch.nn.Module):
            modules.append(value)
        elif isinstance(value, torch.Tensor) and kind in ("attr", "item"):
            found.append(_Move(container, slot, kind))
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    for module in (m for m in modules if id(m) not in inner):  # .to() moves a module's submodules too
        if pin and device == "cpu":
            module._apply(lambda t: t.to("cpu").pin_memory())
        else:
            module.to(device, non_blocking=device != "cpu")
    for move in moves if moves is not None else found:
        current = getattr(move.container, move.slot) if move.kind == "attr" else move.container[move.slot]
        if isinstance(current, torch.Tensor):
            moved = current.to(device)
            if pin and device == "cpu":
                moved = moved.pin_memory()
            if move.kind == "attr":
                setattr(move.container, move.slot, moved)
            else:
                move.container[move.slot] = moved
    return found if moves is None else moves


def _device_tensors(roots: Any) -> list[str]:
    """Descriptions of tensors under ``roots`` that are on a GPU (parameters and buffers included)."""
    torch = _torch()
    left: list[str] = []
    for value, _container, slot, _kind in _walk(roots):
        tensors: list[tuple[str, Any]] = []
        if isinstance(value, torch.nn.Module):
            tensors = [(f"{type(value).__name__}.{n}", t) for n, t in value.named_parameters(recurse=False)]
            tensors += [(f"{type(value).__name__}.{n}", t) for n, t in value.named_buffers(recurse=False)]
        elif isinstance(value, torch.Tensor):
            tensors = [(str(slot), value)]
        for name, tensor in tensors:
            if tensor is not None and tensor.device.type != "cpu":
                left.append(f"{name} on {tensor.device}")
                if len(left) >= 5:
                    return left
    return left


def _tensor_bytes(roots: Any) -> int:
    """Bytes of the distinct tensor storages under ``roots``."""
    torch = _torch()
    if torch is None:
        return 0
    seen: set[tuple[str, int]] = set()
    total = 0

    def count(tensor: Any) -> None:
        nonlocal total
        if tensor is None:
            return
        storage = tensor.untyped_storage()
        ident = (str(tensor.device), storage.data_ptr())
        if ident not in seen:
            seen.add(ident)
            total += storage.nbytes()

    for value, _container, _slot, _kind in _walk(roots):
        if isinstance(value, torch.nn.Module):
            for t in value.parameters(recurse=False):
                count(t)
            for t in value.buffers(recurse=False):
                count(t)
        elif isinstance(value, torch.Tensor):
            count(value)
    return total
