"""Settings: backends, environment variables and scoped environment changes.

Precedence is always argument > ``MINERU_VRAM_*`` environment variable > default,
and environment variables are read late, in :func:`env_settings`, never at import.
``trust_env=False`` ignores them (as httpx's ``trust_env``).

Variables (see docs/configuration.md):

=============================== ==================================================
``MINERU_VRAM_DEVICE``          default device (``cpu``, ``cuda``, ``cuda:N``)
``MINERU_VRAM_MODELS_DIR``      default ``models_dir``
``MINERU_VRAM_ISOLATION``       default isolation (``none`` or ``process``)
``MINERU_VRAM_STRICT``          ``1`` makes release raise on leaks
``MINERU_VRAM_LEAK_TOLERANCE_MIB`` residual allowed by ``strict`` (default 32)
``MINERU_VRAM_RUNTIME_DIR``     folder for the cross-process ledger and worker files
``MINERU_VRAM_API_KEY``         the CLI's key for ``--server-url`` (read with :func:`getenv`;
                                never part of :func:`env_settings`, which ``probe`` prints)
=============================== ==================================================
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ._exceptions import BackendNotAvailableError, ConfigurationError

__all__ = [
    "BACKENDS",
    "LOCAL_ENGINES",
    "BackendSpec",
    "child_environ",
    "env_settings",
    "getenv",
    "patched_environ",
    "resolve_backend",
    "visible_devices",
]

ENV_PREFIX = "MINERU_VRAM_"


@dataclass(frozen=True)
class BackendSpec:
    """What a backend name means.

    Attributes:
        name: the canonical name (``pipeline``, ``flash``, ``vlm``, ``hybrid``).
        tier: the MinerU 4 tier that runs it.
        engine: the VLM engine an alias implies (``sglang``, ``vllm``, ``transformers``, ``llama-cpp``), if any.
        needs_engine: whether parsing needs a VLM engine.
        local_engine: MinerU's own in-process VLM engine the session loads on open and closes on
            exit (``llama-cpp``: ``mineru_llama_cpp.Engine``), when ``engine=`` named one;
            ``None`` when a resident engine serves the VLM, or for backends without one.
    """

    name: str
    tier: str
    engine: str | None = None
    needs_engine: bool = False
    local_engine: str | None = None


BACKENDS: Mapping[str, BackendSpec] = {
    "pipeline": BackendSpec("pipeline", "basic"),
    "basic": BackendSpec("pipeline", "basic"),
    "flash": BackendSpec("flash", "flash"),
    # MinerU 4's standard tier is layout + VLM; advanced is the VLM two-step with image analysis.
    "hybrid": BackendSpec("hybrid", "standard", needs_engine=True),
    "standard": BackendSpec("hybrid", "standard", needs_engine=True),
    "vlm": BackendSpec("vlm", "advanced", needs_engine=True),
    "advanced": BackendSpec("vlm", "advanced", needs_engine=True),
    # MinerU 2.x names from older guides.
    "vlm-transformers": BackendSpec("vlm", "advanced", engine="transformers", needs_engine=True),
    "vlm-sglang-engine": BackendSpec("vlm", "advanced", engine="sglang", needs_engine=True),
    "vlm-sglang-client": BackendSpec("vlm", "advanced", engine="sglang", needs_engine=True),
    "vlm-vllm-engine": BackendSpec("vlm", "advanced", engine="vllm", needs_engine=True),
    "vlm-vllm-async-engine": BackendSpec("vlm", "advanced", engine="vllm", needs_engine=True),
    "vlm-http-client": BackendSpec("vlm", "advanced", engine="attach", needs_engine=True),
    # MinerU 4's default engine in the 2.x naming scheme (MinerU 2.x itself had no llama.cpp).
    "vlm-llama-cpp-engine": BackendSpec("vlm", "advanced", engine="llama-cpp", needs_engine=True),
    "hybrid-llama-cpp-engine": BackendSpec("hybrid", "standard", engine="llama-cpp", needs_engine=True),
}


# ``engine=`` strings that name MinerU's own in-process VLM engine, run inside the session (MinerU 4's
# config name, its backend name, and the 2.x-style name), mapped to the engine.
LOCAL_ENGINES: Mapping[str, str] = {
    "llama-cpp": "llama-cpp",
    "llama-cpp-engine": "llama-cpp",
    "vlm-llama-cpp-engine": "llama-cpp",
}


def resolve_backend(name: str, *, engine: Any = None) -> BackendSpec:
    """Map a user's backend name (current or MinerU 2.x) to a :class:`BackendSpec`.

    Args:
        name: the backend name.
        engine: a resident engine (any object: the session asks it for a ``VlmConfig``), or
            a string naming MinerU's in-process engine (:data:`LOCAL_ENGINES`), which sets
            :attr:`BackendSpec.local_engine`.

    Raises:
        ConfigurationError: an unknown name, or an engine string that names no in-process
            engine, or one given to a backend without a VLM, or one that contradicts the
            engine the backend name implies.
        BackendNotAvailableError: a VLM backend without an ``engine=``.
    """
    key = str(name).strip().lower()
    spec = BACKENDS.get(key)
    if spec is None:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigurationError(f"unknown backend {name!r}; known backends: {known}", backend=name)
    if isinstance(engine, str):
        return _with_local_engine(spec, name, engine)
    if spec.needs_engine and engine is None:
        hint = f" (the {spec.engine} engine)" if spec.engine else ""
        local = ""
        if spec.engine in (None, "llama-cpp"):
            local = " or engine='llama-cpp' (MinerU's llama.cpp engine, in this process)"
        raise BackendNotAvailableError(
            f"backend {name!r} parses through a VLM engine{hint}: pass engine=ResidentEngine.get(...){local} "
            "to ModelSession",
            backend=name,
        )
    return spec


def _with_local_engine(spec: BackendSpec, name: str, engine: str) -> BackendSpec:
    """``spec`` run by MinerU's own in-process engine named ``engine`` (a string)."""
    local = LOCAL_ENGINES.get(engine.strip().lower())
    if local is None:
        raise ConfigurationError(
            f"engine={engine!r}: as a string, engine= names MinerU's own in-process engine, and only "
            f"{', '.join(repr(k) for k in LOCAL_ENGINES)} (MinerU's llama.cpp engine) runs in the session's process; "
            "for SGLang, vLLM or MinerU's transformers engine pass engine=ResidentEngine.get(engine=...)",
            engine=engine,
        )
    if not spec.needs_engine:
        raise ConfigurationError(
            f"engine={engine!r} is for the VLM backends ('vlm', 'hybrid'); backend {name!r} runs no VLM",
            backend=name,
            engine=engine,
        )
    if spec.engine is not None and spec.engine != local:
        raise ConfigurationError(
            f"backend {name!r} names the {spec.engine} engine, not engine={engine!r}", backend=name, engine=engine
        )
    return dataclasses.replace(spec, engine=local, local_engine=local)


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ConfigurationError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off", variable=name)


def _parse_float(name: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r}: expected a number", variable=name) from None


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read the ``MINERU_VRAM_*`` variables that are set, parsed and checked.

    Raises:
        ConfigurationError: a variable with a value that cannot be used.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key, field, parse in (
        ("DEVICE", "device", None),
        ("MODELS_DIR", "models_dir", None),
        ("ISOLATION", "isolation", None),
        ("STRICT", "strict", _parse_bool),
        ("LEAK_TOLERANCE_MIB", "leak_tolerance_mib", _parse_float),
        ("RUNTIME_DIR", "runtime_dir", None),
        ("ALLOW_DOWNLOAD", "allow_download", _parse_bool),
        ("KEEP_WARM", "keep_warm", _parse_bool),
        ("HOST_CACHE_MIB", "host_cache_mib", _parse_float),
        ("WARM_SPARE", "warm_spare", _parse_bool),
    ):
        name = ENV_PREFIX + key
        raw = env.get(name)
        if raw is None or raw == "":
            continue
        out[field] = parse(name, raw) if parse is not None else raw
    return out


def getenv(name: str, default: str | None = None) -> str | None:
    """Read one environment variable, now. Every read of the environment goes through here or
    :func:`env_settings`, so the owner table in docs/architecture.md stays true."""
    return os.environ.get(name, default)


def child_environ(overrides: Mapping[str, str] | None = None, *, drop: Iterable[str] = ()) -> dict[str, str]:
    """The environment for a child process: this process's, less ``drop``, plus ``overrides``."""
    env = dict(os.environ)
    for name in drop:
        env.pop(name, None)
    env.update(overrides or {})
    return env


def visible_devices() -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as a list of entries (indices or UUIDs), ``None`` when unset."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


@contextlib.contextmanager
def patched_environ(
    values: Mapping[str, str], *, also_restore: Iterable[str] = (), drop: Iterable[str] = ()
) -> Iterator[None]:
    """Set environment variables for the ``with`` body and restore them after.

    Args:
        values: variables to set.
        also_restore: variables that code inside the body may set; they are put
            back to their value before the body as well.
        drop: variables unset for the body (and put back after).
    """
    dropped = set(drop) - set(values)
    keys = set(values) | set(also_restore) | dropped
    saved = {k: os.environ.get(k) for k in keys}
    try:
        for k in dropped:
            os.environ.pop(k, None)
        os.environ.update(values)
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
