"""Process-wide state: MinerU's model caches, who owns their entries, the shared environment.

MinerU never evicts from its two model caches (``AtomModelSingleton._models`` and
``HybridLocalModelContextSingleton._models``); the runtimes of open sessions record here
which entries they created, so only those are released and user-created entries are
never touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from typing import Any

registry_lock = threading.RLock()
# (cache name, key) -> ids of open runtimes that use the entry
owners: dict[tuple[str, Any], set[int]] = {}


@dataclasses.dataclass
class SharedEnvironment:
    """MinerU's process-wide configuration as applied for the open runtimes."""

    settings: dict[str, Any]
    stack: contextlib.ExitStack
    count: int
    before: dict[str, str | None] = dataclasses.field(default_factory=dict)  # what the variables were


# Applied by the first runtime to activate, restored by the last to deactivate.
shared: SharedEnvironment | None = None

# MinerU's VLM predictors (ModelSingleton keys) that open runtimes loaded -> ids of those runtimes.
vlm_owners: dict[tuple[Any, ...], set[int]] = {}


def caches() -> dict[str, dict[Any, Any]]:
    from mineru.model.runtime.hybrid import AtomModelSingleton, HybridLocalModelContextSingleton

    return {"atom": AtomModelSingleton._models, "context": HybridLocalModelContextSingleton._models}


def all_keys() -> set[tuple[str, Any]]:
    if "mineru.model.runtime.hybrid" not in sys.modules:
        return set()
    return {(name, key) for name, cache in caches().items() for key in list(cache)}


def environment_before_sessions() -> dict[str, str | None]:
    """The variables open in-process sessions set, with their values from before (``None``: unset).

    A process started while a session is open (a resident engine's server) takes these
    values, not the session's: the session's ``MINERU_HOME`` and ``MINERU_CONFIG`` are a
    temporary folder deleted when it closes, and its device and models are its own.
    """
    with registry_lock:
        return {} if shared is None else dict(shared.before)


def cache_summary() -> dict[str, list[str]]:
    """What MinerU's model caches hold now, for probes and tests (no import if MinerU is not loaded)."""
    if "mineru.model.runtime.hybrid" not in sys.modules:
        return {"atom": [], "context": []}
    return {name: [repr(k) for k in cache] for name, cache in caches().items()}


def clear_transformers_caches() -> None:
    """Clear class-level functools caches in transformers' PP-DocLayoutV2.

    They memoise position embeddings and anchors as CUDA tensors, which keeps a
    little device memory allocated after every model is gone. Clearing them only
    costs a recomputation for any other live layout model.
    """
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.pp_doclayout_v2") or module is None:
            continue
        for cls in list(vars(module).values()):
            if not isinstance(cls, type):
                continue
            for attr in list(vars(cls).values()):
                for clear in _cache_clearers(getattr(attr, "__func__", attr)):
                    clear()


def _cache_clearers(func: object) -> list[Any]:
    """``cache_clear`` of ``func`` itself or of a cached function it wraps.

    transformers wraps these caches in a plain function (the lru_cache lives in the
    wrapper's closure), so looking only at the attribute finds nothing to clear.
    """
    found = []
    clear = getattr(func, "cache_clear", None)
    if callable(clear):
        found.append(clear)
    for cell in getattr(func, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        clear = getattr(inner, "cache_clear", None)
        if callable(clear):
            found.append(clear)
    return found
