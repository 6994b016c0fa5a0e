"""The resident engine's settings: the one list of its fields, their defaults and their checks.

:class:`EngineSettings` is the only place a setting is named with its default.
:class:`~mineru_vram.ResidentEngine`'s signature repeats the names for users (its
defaults are read from here), and everything else takes an ``EngineSettings``.
What depends on the engine (does it need a model, a URL, a GPU; is its memory
pool sized by a fraction) is asked of the engine's backend class
(:class:`~mineru_vram._engine.backends.base.EngineTraits`), so a new engine adds
no branch here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from mineru_vram._budget import VramBudget, resolve_budget
from mineru_vram._exceptions import BackendNotAvailableError, ConfigurationError
from mineru_vram._probe import resolve_device

__all__ = ["SETTING_NAMES", "EngineKind", "EngineSettings", "parse_keep_alive"]

EngineKind = Literal[
    "sglang", "vllm", "transformers", "llama-cpp", "llama-cpp-engine", "vlm-llama-cpp-engine", "attach"
]

# MinerU's names for vLLM inside the parsing process: refused, with the supported alternative.
_IN_PROCESS_VLLM = ("vllm-engine", "vllm-async-engine")


@dataclass(frozen=True)
class EngineSettings:
    """Everything :meth:`ResidentEngine.get` compares: all but the injected collaborators and the key.

    Build one with :meth:`resolve`, which validates and normalises; the field
    defaults are the engine's defaults. Each field is described in
    :class:`~mineru_vram.ResidentEngine`'s docstring.
    """

    engine: EngineKind = "sglang"
    model_path: str | None = None
    device: str = "auto"  # "auto": the first GPU NVML sees, else CPU
    vram_budget_gib: float | None = None
    mem_fraction: float | None = None
    budget: VramBudget | None = None
    keep_alive: float | None = None  # seconds; None never expires
    keep_alive_action: Literal["sleep", "stop"] = "sleep"
    url: str | None = None
    model_name: str | None = None
    extra_args: tuple[str, ...] = ()
    start_timeout: float = 600.0
    stop_timeout: float = 30.0
    idle_timeout: float = 120.0
    health_interval: float = 10.0
    health_timeout: float = 20.0
    health_failures: int = 3
    max_restarts: int = 3
    restart_backoff: float = 1.0
    http_timeout: int = 600
    max_concurrency: int = 100
    headroom_gib: float = 1.0
    max_new_tokens: int | None = None
    python: str | None = None
    runtime_dir: str | None = None

    @classmethod
    def resolve(cls, base: EngineSettings | None = None, /, **given: Any) -> EngineSettings:
        """Validate and normalise settings (no side effects).

        Args:
            base: settings to start from (default: the defaults). Resolving the
                result again gives the same settings, so ``get()`` can compare.
            given: fields to set, as a user passes them (``keep_alive="10m"``,
                ``budget="8GiB"``, ``device=0``).

        Raises:
            TypeError: a name that is not a setting.
            ConfigurationError: a value that cannot be used, or settings that contradict each other.
            BackendNotAvailableError: an engine name MinerU has but this library cannot manage.
        """
        unknown = sorted(set(given) - set(SETTING_NAMES))
        if unknown:
            raise TypeError(f"unexpected engine setting(s): {', '.join(unknown)}")
        start = {f.name: getattr(base, f.name) if base is not None else f.default for f in dataclasses.fields(cls)}
        merged = {**start, **given}
        return _checked(cls, merged)


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(EngineSettings))


def _checked(cls: type[EngineSettings], v: Mapping[str, Any]) -> EngineSettings:
    from .backends import BACKENDS, ENGINE_ALIASES  # the registry: what each engine needs

    raw_engine = v["engine"]
    kind = str(raw_engine).strip().lower()
    kind = ENGINE_ALIASES.get(kind, kind)
    if kind in _IN_PROCESS_VLLM:
        raise BackendNotAvailableError(
            f"engine={raw_engine!r} (vLLM inside this process) is not supported: its memory could only be returned "
            "by ending this process. Use engine='vllm', a supervised vLLM server with sleep mode",
            engine=raw_engine,
        )
    if kind not in BACKENDS:
        known = ", ".join([*BACKENDS, *ENGINE_ALIASES])
        raise ConfigurationError(f"engine={raw_engine!r}: expected one of {known}", engine=raw_engine)
    traits = BACKENDS[kind].traits

    model_path = v["model_path"]
    path: str | None = None
    if traits.model != "none":
        if model_path is None:
            raise ConfigurationError(f"the {kind} engine needs model_path=", engine=kind)
        candidate = Path(os.fspath(model_path)).expanduser()
        if candidate.exists():
            path = str(candidate.resolve())
        elif traits.model == "local":
            raise ConfigurationError(f"model_path={str(model_path)!r} does not exist", model_path=str(model_path))
        else:
            path = str(model_path)  # a hub id the server downloads

    url = v["url"]
    if traits.needs_url:
        if not url:
            raise ConfigurationError(f"the {kind} engine needs url=", engine=kind)
        if not re.match(r"^https?://[^/\s]+", url):
            raise ConfigurationError(f"url={url!r}: expected http(s)://host:port", url=url)
    elif url is not None:
        raise ConfigurationError(f"url= is for engine='attach', not {kind!r}", url=url)

    gib, fraction = v["vram_budget_gib"], v["mem_fraction"]
    if gib is not None and fraction is not None:
        raise ConfigurationError("pass vram_budget_gib= or mem_fraction=, not both")
    if gib is not None and (isinstance(gib, bool) or not gib > 0):
        raise ConfigurationError(f"vram_budget_gib={gib!r}: must be positive", vram_budget_gib=gib)
    if fraction is not None and not 0 < fraction < 1:
        raise ConfigurationError(f"mem_fraction={fraction!r}: must be between 0 and 1", mem_fraction=fraction)
    if (gib is not None or fraction is not None) and not traits.pool_fraction:
        raise ConfigurationError(
            f"vram_budget_gib / mem_fraction size SGLang's or vLLM's pool; not used by the {kind} engine"
            + (" (budget= is)" if traits.launched else "")
        )
    budget = resolve_budget(v["budget"])
    if budget is not None:
        if gib is not None or fraction is not None:
            raise ConfigurationError("pass budget=, vram_budget_gib= or mem_fraction=, one of them")
        if not traits.launched:
            raise ConfigurationError(
                "budget= sizes an engine mineru-vram starts; an attached server is not started here"
            )

    action = v["keep_alive_action"]
    if action not in ("sleep", "stop"):
        raise ConfigurationError(f"keep_alive_action={action!r}: expected 'sleep' or 'stop'", keep_alive_action=action)
    for name in ("start_timeout", "health_interval", "health_timeout"):
        if not v[name] > 0:
            raise ConfigurationError(f"{name}={v[name]!r}: must be positive", **{name: v[name]})
    if v["health_timeout"] < traits.min_health_timeout:
        raise ConfigurationError(
            f"health_timeout={v['health_timeout']!r}: the {kind} engine's health check takes longer by design; "
            f"give it at least {traits.min_health_timeout:g} s, or every check counts a healthy server as hung",
            health_timeout=v["health_timeout"],
        )
    if v["health_failures"] < 1 or v["max_restarts"] < 0:
        raise ConfigurationError("health_failures must be at least 1 and max_restarts at least 0")

    device = v["device"]
    if device in (None, "auto"):
        resolved = "cpu" if not traits.launched else resolve_device(None)
    else:
        resolved = resolve_device(device)
    if traits.needs_gpu and resolved == "cpu":
        raise ConfigurationError(f"the {kind} engine needs a GPU ({traits.needs_gpu})", device="cpu")
    if (gib is not None or budget is not None) and resolved == "cpu":
        raise ConfigurationError("a budget needs a GPU device; this engine runs on cpu", device=resolved)

    out = dict(v)
    for f in dataclasses.fields(cls):  # plain numbers as their default's type (a timeout given as 2 is 2.0)
        if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) and out[f.name] is not None:
            out[f.name] = type(f.default)(out[f.name])
    out.update(
        engine=kind,
        model_path=path,
        device=resolved,
        vram_budget_gib=None if gib is None else float(gib),
        mem_fraction=None if fraction is None else float(fraction),
        budget=budget,
        keep_alive=parse_keep_alive(v["keep_alive"]),
        extra_args=tuple(str(a) for a in v["extra_args"]),
        runtime_dir=None if v["runtime_dir"] is None else str(v["runtime_dir"]),
    )
    return cls(**out)


# --- keep_alive ------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_keep_alive(value: str | float | timedelta | None) -> float | None:
    """Turn a keep-alive spec into seconds; ``None`` means "never expire".

    Accepts seconds as a number, a :class:`~datetime.timedelta`, or a string such
    as ``"10m"``, ``"30s"``, ``"1h30m"``, ``"250ms"``, ``"90"``. A negative value,
    ``"never"`` or ``None`` never expires (as Ollama's ``keep_alive=-1``); ``0``
    expires as soon as the engine is idle.

    Raises:
        ConfigurationError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigurationError(f"keep_alive={value!r}: expected seconds or a duration like '10m'", keep_alive=value)
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
        return None if seconds < 0 else seconds
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise ConfigurationError("keep_alive=nan is not a duration", keep_alive=value)
        return None if value < 0 or math.isinf(value) else float(value)
    text = str(value).strip().lower()
    if text in ("", "never", "inf", "none", "forever"):
        return None
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return parse_keep_alive(number)
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ConfigurationError(
            f"keep_alive={value!r}: expected seconds or a duration like '30s', '10m', '1h30m', or 'never'",
            keep_alive=value,
        )
    return total
