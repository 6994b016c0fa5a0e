"""Everything that touches MinerU's internals lives here.

A MinerU upgrade should be a change to this module alone. What it relies on
(checked against MinerU 4.0.12):

* ``mineru.config.config``: the config object MinerU reads once at import; the
  fields ``model.base_dir``, ``model.source`` and ``model.small_backend`` are read
  again on every model load, so patching them on the object takes effect.
* ``MINERU_HOME`` / ``MINERU_CONFIG``: read at import; pointed at a folder the
  session owns so MinerU never reads or writes ``~/.mineru`` for us.
* ``MINERU_DEVICE_MODE``: read by ``get_device()`` on every call.
* The two process-wide model caches in ``mineru.model.runtime.hybrid``:
  ``AtomModelSingleton._models`` and ``HybridLocalModelContextSingleton._models``.
  MinerU never evicts from them; this module does, for the entries a session
  created, tracked in an ownership registry so concurrent sessions sharing a
  device share the models and user-created entries are never touched.
* Class-level ``functools`` caches in transformers' PP-DocLayoutV2 that keep small
  CUDA tensors alive (found by measurement, see MINERU_FACTS).
* ``MinerUParser``'s private steps, called with bytes instead of a path so a parse
  never writes the input to disk.
* How MinerU's PDF renderer (docvortex) starts its page-render workers: with
  multiprocessing's ``spawn``, whose children re-run the parent's ``__main__``
  script first. A user's unguarded ``example.py`` would run again inside every
  render worker (and fail: ``ConnectionResetError``). The workers' targets are
  docvortex functions that never need ``__main__``, so while this library runs a
  parse, processes spawned from that thread skip it (:func:`_main_free_spawn`).
* What sizes batches (for the retry after an OOM, :meth:`MineruRuntime.smaller_batches`):
  ``BATCH_RATIO`` as imported by ``mineru.backend.analysis.pdf.{window,ocr,tables}``,
  ``MINERU_PROCESSING_WINDOW_SIZE`` and ``MINERU_VIRTUAL_VRAM_SIZE``.
* MinerU's in-process VLM engines (:meth:`MineruRuntime.load_local_vlm`): a parse gets its
  predictor from ``mineru.model.vlm.client.get_vlm_predictor(vlm_config)``, which caches it in
  ``ModelSingleton._models`` under ``(backend, model_path, server_url, sha256(options))`` for
  the life of the process (``release_owner()`` skips the llama.cpp engine's plain
  ``MinerUClient``; ``shutdown()`` closes every cached client). A session calls the same
  function on open, so the parse finds its entry, and on close pops that one key under
  ``ModelSingleton._lock`` and hands the predictor to ``_shutdown_predictor_runtime``, which
  calls ``mineru_llama_cpp.Engine.close()`` and clears MinerU's references to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._documents import Document
from ._exceptions import ConfigurationError, OutOfMemoryError, ParseError
from ._process import OwnerLock, owned_temp_dir, sweep_dead_owners
from ._release import AliveTracker
from ._result import ParseResult

logger = logging.getLogger("mineru_vram")

__all__ = [
    "MineruRuntime",
    "TransformersVlm",
    "drop_http_vlm_clients",
    "environment_before_sessions",
    "is_oom",
    "mineru_version",
    "vlm_config",
]

# The handles of MinerU's VLM predictors that hold an engine's memory (runtime.py's names).
_VLM_HANDLES = ("llama_cpp_engine", "vllm_async_llm", "vllm_llm", "lmdeploy_engine", "model")

# Lazily loaded models that MinerU keeps on HybridLocalModelContext as cached properties.
_LAZY_MODELS = (
    "mfr_model",
    "wireless_table_model",
    "wired_table_model",
    "table_cls_model",
    "table_orientation_cls_model",
)

# The session's MinerU home (MINERU_HOME, config.yaml) is a temporary folder named so.
_HOME_PREFIX = "mineru-vram-home-"

# Environment variables MinerU sets for itself while loading or parsing; restored with ours.
# LOGURU_LEVEL: MinerU's configure_global_log_level writes it on every parse, so that the
# render processes it spawns log at its level.
_MINERU_SIDE_EFFECT_ENV = ("PYTORCH_ENABLE_MPS_FALLBACK", "TORCH_CUDNN_V8_API_DISABLED", "LOGURU_LEVEL")


def mineru_version() -> str | None:
    """The installed MinerU version, read from package metadata (no import)."""
    from importlib import metadata

    try:
        return metadata.version("mineru")
    except metadata.PackageNotFoundError:
        return None


def vlm_config(fields: dict[str, Any] | None) -> Any:
    """MinerU's ``VlmConfig`` from plain fields (how a VLM engine is reached), or ``None``."""
    if fields is None:
        return None
    from mineru.config import VlmConfig

    return VlmConfig(**fields)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause chain) is a device out-of-memory error.

    By type first (``torch.cuda.OutOfMemoryError``); the message test covers
    libraries that re-raise OOM as a plain ``RuntimeError`` (onnxruntime, cuDNN).
    """
    torch = sys.modules.get("torch")
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OutOfMemoryError):
            return True
        if torch is not None and isinstance(cur, getattr(torch.cuda, "OutOfMemoryError", ())):
            return True
        text = str(cur)
        if "CUDA out of memory" in text or "CUDNN_STATUS_ALLOC_FAILED" in text or "Failed to allocate memory" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# --- ownership of MinerU's cache entries, process-wide -------------------------------------

_registry_lock = threading.RLock()
# (cache name, key) -> ids of open runtimes that use the entry
_owners: dict[tuple[str, Any], set[int]] = {}


@dataclasses.dataclass
class _SharedEnvironment:
    """MinerU's process-wide configuration as applied for the open runtimes."""

    settings: dict[str, Any]
    stack: contextlib.ExitStack
    count: int
    before: dict[str, str | None] = dataclasses.field(default_factory=dict)  # what the variables were


# Applied by the first runtime to activate, restored by the last to deactivate.
_shared: _SharedEnvironment | None = None

# MinerU's VLM predictors (ModelSingleton keys) that open runtimes loaded -> ids of those runtimes.
_vlm_owners: dict[tuple[Any, ...], set[int]] = {}


def _caches() -> dict[str, dict[Any, Any]]:
    from mineru.model.runtime.hybrid import AtomModelSingleton, HybridLocalModelContextSingleton

    return {"atom": AtomModelSingleton._models, "context": HybridLocalModelContextSingleton._models}


def _all_keys() -> set[tuple[str, Any]]:
    if "mineru.model.runtime.hybrid" not in sys.modules:
        return set()
    return {(name, key) for name, cache in _caches().items() for key in list(cache)}


def environment_before_sessions() -> dict[str, str | None]:
    """The variables open in-process sessions set, with their values from before (``None``: unset).

    A process started while a session is open (a resident engine's server) takes these
    values, not the session's: the session's ``MINERU_HOME`` and ``MINERU_CONFIG`` are a
    temporary folder deleted when it closes, and its device and models are its own.
    """
    with _registry_lock:
        return {} if _shared is None else dict(_shared.before)


# MinerU 4.0's model repositories under model.base_dir (mineru/model/registry.py), and the
# marker its downloader writes into a complete one (mineru/model/download.py).
MINERU_REPOS = (
    "MinerU-4_models_torch",
    "MinerU-4_models_onnx",
    "MinerU2.5-Pro-2605-1.2B",
    "MinerU2.5-Pro-2605-1.2B-GGUF",
)
COMPLETE_MARKER = ".mineru_complete"


def mineru_paths() -> dict[str, Any]:
    """Where MinerU would look for its configuration and models, worked out without importing it.

    MinerU's import reads and writes its configuration, so this reads the same sources
    itself, with MinerU 4.0's precedence: ``MINERU_MODEL_BASE_DIR`` > the config file's
    ``model.base_dir`` (``MINERU_CONFIG`` or ``$MINERU_HOME/config.yaml``) >
    ``$MINERU_HOME/models`` (``~/.mineru``). MinerU's already-imported config wins when
    present (and no session has patched it).

    Returns:
        ``home``, ``config_file``, ``config_exists``, ``config_error``, ``models_dir``,
        ``models_dir_exists``, ``model_source`` and ``repos`` (name, path, complete, MiB).
    """
    from ._config import getenv

    home = Path(getenv("MINERU_HOME") or Path.home() / ".mineru").expanduser()
    config_file = Path(getenv("MINERU_CONFIG") or home / "config.yaml").expanduser()
    base_dir: str | None = getenv("MINERU_MODEL_BASE_DIR") or None
    source = getenv("MINERU_MODEL_SOURCE") or None
    config_error = None
    if config_file.is_file():
        try:
            import yaml

            data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
            model = (data.get("model") or {}) if isinstance(data, dict) else {}
            base_dir = base_dir or model.get("base_dir")
            source = source or model.get("source")
        except Exception as exc:  # unreadable YAML is worth reporting, not crashing over
            config_error = f"{type(exc).__name__}: {exc}"
    models = Path(base_dir).expanduser() if base_dir else home / "models"
    mconf = sys.modules.get("mineru.config")
    if mconf is not None and _shared is None:
        models = Path(str(mconf.config.model.base_dir)).expanduser()  # type: ignore[attr-defined]
    repos = []
    for name in MINERU_REPOS:
        root = models / name
        if not root.is_dir():
            continue
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        repos.append({"name": name, "path": str(root), "complete": _has_marker(root), "mib": size / 2**20})
    return {
        "home": str(home),
        "config_file": str(config_file),
        "config_exists": config_file.is_file(),
        "config_error": config_error,
        "models_dir": str(models),
        "models_dir_exists": models.is_dir(),
        "model_source": source or "auto",
        "repos": repos,
    }


def _has_marker(root: Path) -> bool:
    if (root / COMPLETE_MARKER).is_file():
        return True
    return any(p.name == COMPLETE_MARKER for p in root.rglob(COMPLETE_MARKER))


def default_models_dir() -> Path:
    """MinerU's own ``model.base_dir`` for this user (see :func:`mineru_paths`)."""
    return Path(mineru_paths()["models_dir"])


def tier_model_status(tier: str, *, models_dir: Path | None, small_backend: str = "torch") -> list[dict[str, Any]]:
    """The model repositories ``tier`` needs, and whether each is complete under ``models_dir``.

    Returns:
        One dict per repository: ``name``, ``path``, ``ready``, ``missing`` (paths), ``download_gb``.
    """
    runtime = MineruRuntime(device="cpu", models_dir=models_dir, small_backend=small_backend)
    runtime.activate()
    try:
        from mineru.model.download import verify_model_repo
        from mineru.model.registry import model_repos_for_tier

        out = []
        for repo in model_repos_for_tier(_model_tier(tier), small_backend=small_backend):
            result = verify_model_repo(repo)
            out.append(
                {
                    "name": repo.name,
                    "path": str(result.root),
                    "ready": bool(result.ready),
                    "missing": list(result.missing_paths),
                    "download_gb": _DOWNLOAD_GB.get(repo.name),
                }
            )
        return out
    finally:
        runtime.deactivate()


def download_models(
    tier: str, *, models_dir: Path | None, small_backend: str = "torch", source: str = "auto"
) -> list[str]:
    """Download what ``tier`` needs into ``models_dir`` with MinerU's own downloader.

    Args:
        source: ``auto`` (MinerU probes Hugging Face, else ModelScope), ``huggingface`` or
            ``modelscope``.

    Returns:
        The repositories now complete.

    Raises:
        ModelsNotAvailableError: the model hub cannot be reached (checked first, in seconds).
    """
    reason = _hub_unreachable(source)
    if reason is not None:
        raise _models_error(
            [r["name"] for r in tier_model_status(tier, models_dir=models_dir, small_backend=small_backend)],
            str(models_dir or default_models_dir()),
            reason,
            tier=tier,
        )
    runtime = MineruRuntime(device="cpu", models_dir=models_dir, small_backend=small_backend)
    runtime.activate()
    try:
        from mineru.model.download import download_model_repo
        from mineru.model.registry import model_repos_for_tier

        done = []
        for repo in model_repos_for_tier(_model_tier(tier), small_backend=small_backend):
            download_model_repo(repo, source=source, reuse_ready=True)
            done.append(repo.name)
        return done
    finally:
        runtime.deactivate()


def cache_summary() -> dict[str, list[str]]:
    """What MinerU's model caches hold now, for probes and tests (no import if MinerU is not loaded)."""
    if "mineru.model.runtime.hybrid" not in sys.modules:
        return {"atom": [], "context": []}
    return {name: [repr(k) for k in cache] for name, cache in _caches().items()}


class MineruRuntime:
    """MinerU set up for one session: environment, config, models, parse, release.

    Args:
        device: ``"cpu"`` or ``"cuda:N"``.
        models_dir: MinerU's ``model.base_dir``; ``None`` keeps MinerU's configured one.
        model_source: MinerU's ``model.source`` (``"local"`` when ``models_dir`` is given).
        small_backend: MinerU's small-model backend (``"torch"`` runs the torch models on CPU too).
        virtual_vram_gb: ``MINERU_VIRTUAL_VRAM_SIZE`` while active (from the session's budget).
        allow_download: let MinerU download missing models (when its source is remote and the
            network answers); ``False`` makes missing models a :class:`ModelsNotAvailableError`.
    """

    def __init__(
        self,
        *,
        device: str,
        models_dir: Path | None,
        model_source: str | None = None,
        small_backend: str = "torch",
        virtual_vram_gb: int | None = None,
        allow_download: bool = True,
    ) -> None:
        self.device = device
        self.model_source = model_source or ("local" if models_dir is not None else None)
        # Without models_dir, use the tree MinerU itself would use (its downloads), worked out
        # here: MinerU derives base_dir from MINERU_HOME at import, and activate() points
        # MINERU_HOME at a temporary folder, which must never become the model location.
        self.models_dir = models_dir if models_dir is not None else default_models_dir()
        self.small_backend = small_backend
        self.virtual_vram_gb = virtual_vram_gb
        self.allow_download = allow_download
        self._user_keys: set[tuple[str, Any]] = set()
        self._vlm_keys: list[tuple[Any, ...]] = []  # ModelSingleton entries this runtime (co-)owns
        self._id = id(self)
        self._active = False

    # -- environment -------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "models_dir": None if self.models_dir is None else str(self.models_dir),
            "model_source": self.model_source,
            "small_backend": self.small_backend,
            "virtual_vram_gb": self.virtual_vram_gb,
        }

    def activate(self) -> None:
        """Point MinerU at this runtime's home, config, models and device.

        MinerU's configuration is process-wide, so it is applied once for all open
        runtimes and restored when the last one deactivates, whatever the order in
        which they close.

        Raises:
            ConfigurationError: another in-process session is open with other settings
                (device, models, budget): they cannot both hold MinerU's one configuration.
        """
        global _shared
        settings = self._settings()
        with _registry_lock:
            if _shared is not None:
                diffs = {k: (v, settings[k]) for k, v in _shared.settings.items() if v != settings[k]}
                if diffs:
                    what = ", ".join(f"{k}={old!r} (asked: {new!r})" for k, (old, new) in diffs.items())
                    raise ConfigurationError(
                        f"an in-process session is already open with {what}; MinerU's device and configuration "
                        "are process-wide, so a second in-process session with other settings cannot run beside "
                        "it. Use isolation='process' for sessions with different settings in one process.",
                        **{k: new for k, (old, new) in diffs.items()},
                    )
                _shared.count += 1
            else:
                stack, before = self._apply_environment()
                _shared = _SharedEnvironment(settings, stack, 1, before)
            keys = _all_keys()
            self._user_keys = {k for k in keys if k not in _owners}
            for k in keys - self._user_keys:
                _owners[k].add(self._id)
        self._active = True

    def _apply_environment(self) -> tuple[contextlib.ExitStack, dict[str, str | None]]:
        """Set MinerU's environment and configuration; returns the undo and the variables' old values."""
        stack = contextlib.ExitStack()
        try:
            # Homes of processes killed before they could remove theirs (SIGKILL) go first;
            # each home holds its owner's lock, so a live session's home is never touched.
            sweep_dead_owners(None, _HOME_PREFIX)
            home, lock = owned_temp_dir(_HOME_PREFIX)
            stack.callback(_remove_home, home, lock)
            config_file = home / "config.yaml"
            config_file.write_text(self._config_yaml(), encoding="utf-8")
            env = {
                "MINERU_HOME": str(home),
                "MINERU_CONFIG": str(config_file),
                "MINERU_DEVICE_MODE": self.device,
                "MINERU_MODEL_SMALL_BACKEND": self.small_backend,
            }
            if self.models_dir is not None:
                env["MINERU_MODEL_BASE_DIR"] = str(self.models_dir)
            if self.model_source is not None:
                env["MINERU_MODEL_SOURCE"] = self.model_source
            if self.virtual_vram_gb is not None:
                # MinerU's sizing hint (get_vram(): VLM batch sizes, vLLM utilisation), from the
                # session's budget; set only while the session is active, like the rest.
                env["MINERU_VIRTUAL_VRAM_SIZE"] = str(self.virtual_vram_gb)
            from ._config import getenv, patched_environ

            before = {name: getenv(name) for name in env}
            stack.enter_context(patched_environ(env, also_restore=_MINERU_SIDE_EFFECT_ENV))
            stack.enter_context(self._patched_config())
            stack.enter_context(_main_free_spawn())
        except BaseException:
            stack.close()
            raise
        return stack, before

    def deactivate(self) -> None:
        """Restore environment and config once the last open runtime deactivates. Idempotent."""
        global _shared
        if not self._active:
            return
        self._active = False
        stack = None
        with _registry_lock:
            if _shared is not None:
                _shared.count -= 1
                if _shared.count <= 0:
                    stack, _shared = _shared.stack, None
        if stack is not None:
            try:
                stack.close()
            finally:
                _stop_render_workers()

    def _config_yaml(self) -> str:
        import json

        model: dict[str, Any] = {"small_backend": self.small_backend}
        if self.models_dir is not None:
            model["base_dir"] = str(self.models_dir)
        if self.model_source is not None:
            model["source"] = self.model_source
        # JSON is valid YAML, and needs no YAML writer here.
        return json.dumps({"model": model})

    @contextlib.contextmanager
    def _patched_config(self) -> Iterator[None]:
        import mineru.config as mconf  # first import reads the env set just before

        cfg = mconf.config.model
        saved = {"base_dir": cfg.base_dir, "source": cfg.source, "small_backend": cfg.small_backend}
        try:
            if self.models_dir is not None:
                cfg.base_dir = str(self.models_dir)
            if self.model_source is not None:
                cfg.source = self.model_source
            cfg.small_backend = self.small_backend  # type: ignore[assignment]
            yield
        finally:
            for name, value in saved.items():
                setattr(cfg, name, value)

    # -- models --------------------------------------------------------------------------------

    def load(self, *, tier: str, preload: str, local_vlm: str | None = None) -> None:
        """Load the models ``tier`` needs now, instead of on the first document.

        Args:
            tier: MinerU's tier.
            preload: ``"core"`` or ``"all"`` (the lazily loaded small models too).
            local_vlm: MinerU's in-process VLM engine the session runs (``"llama-cpp"``): its
                weights are checked here with the small models; :meth:`load_local_vlm` loads it.

        Raises:
            ModelsNotAvailableError: the tier's models are missing and cannot be downloaded.
        """
        self.check_models(tier, local_vlm=local_vlm)
        if tier == "flash":
            return
        from mineru.model.runtime.hybrid import HybridLocalModelContextSingleton

        ctx = HybridLocalModelContextSingleton().get_model()  # OCR + layout load here
        if preload == "all":
            for name in _LAZY_MODELS:
                getattr(ctx, name)
        self.claim_new()

    def check_models(self, tier: str, *, local_vlm: str | None = None) -> list[str]:
        """Find the model repositories ``tier`` needs that are not on disk, before MinerU looks.

        MinerU downloads what is missing on first use, and without a network it retries
        for about half a minute before a raw network error. This asks first: when
        something is missing and cannot come (downloads off, a local source, no route to
        the model hub within a few seconds), the session fails at once with the place it
        looked, the size of the download and the ways out. For ``flash``, which needs OCR
        models only for scanned pages, a missing tree is not an error here; MinerU's
        source is set to local for the session so a later need fails at once too
        (:meth:`parse` reports it as :class:`ModelsNotAvailableError`).

        With ``local_vlm`` (MinerU's in-process VLM engine, e.g. ``"llama-cpp"``) its model
        repository is checked too: MinerU finds it under ``base_dir`` by its registry name
        (``MinerU2.5-Pro-2605-1.2B-GGUF`` for llama.cpp).

        Returns:
            The names of the missing repositories (MinerU will download them).
        """
        import mineru.config as mconf
        from mineru.model.download import verify_model_repo
        from mineru.model.registry import small_model_repo, vlm_model_repo

        cfg = mconf.config.model
        # The small models: every tier of a session needs them (flash for scanned pages). The VLM of the
        # vlm/hybrid tiers only when MinerU runs it in this process; a resident engine brings its own weights.
        repos: tuple[Any, ...] = (small_model_repo(self.small_backend),)
        if local_vlm is not None:
            repos += (vlm_model_repo(local_vlm),)
        missing = [repo.name for repo in repos if not verify_model_repo(repo).ready]
        if not missing:
            return []
        source = str(cfg.source or "auto").lower()
        reason: str | None
        if source == "local":
            reason = "MinerU's model source is 'local' (models_dir= was given, or MINERU_MODEL_SOURCE=local)"
        elif not self.allow_download:
            reason = "downloads are turned off (allow_download=False or MINERU_VRAM_ALLOW_DOWNLOAD=0)"
        else:
            reason = _hub_unreachable(source)
        if reason is None:
            logger.warning(
                "MinerU will now download its %s models (about %.1f GB) into %s; pass models_dir= to use a "
                "tree you already have",
                ", ".join(missing),
                _download_gb(missing),
                cfg.base_dir,
            )
            return missing
        if tier == "flash":
            cfg.source = "local"  # restored with the rest of the config when the last session closes
            self._flash_missing = (missing, reason)
            return missing
        raise _models_error(missing, str(cfg.base_dir), reason, tier=tier)

    def load_local_vlm(
        self, vlm_config: Any, *, environ: dict[str, str] | None = None, drop: tuple[str, ...] = ()
    ) -> str:
        """Load MinerU's in-process VLM engine for ``vlm_config``, where a parse will look for it.

        Calls MinerU's own ``get_vlm_predictor`` (what its parse and its preload call), so the
        entry lands in ``ModelSingleton`` under the key the session's parses compute. An entry
        the process already had before this runtime's first load (user code ran MinerU itself)
        is used but not owned: it is never released here.

        Args:
            vlm_config: MinerU's ``VlmConfig`` naming the engine (``engine="llama-cpp"``).
            environ: variables set while the engine loads (e.g. ``GGML_VK_VISIBLE_DEVICES``).
            drop: variables unset while it loads.

        Returns:
            MinerU's backend name of the engine (``"llama-cpp-engine"``).
        """
        from mineru.model.vlm.client import get_vlm_predictor
        from mineru.model.vlm.runtime import ModelSingleton

        from ._config import patched_environ

        with ModelSingleton._lock:
            existing = {key: id(value) for key, value in ModelSingleton._models.items()}
        with patched_environ(environ or {}, drop=drop):
            predictor, backend = get_vlm_predictor(vlm_config)
        with _registry_lock, ModelSingleton._lock:
            key = next((k for k, v in ModelSingleton._models.items() if v is predictor), None)
            if key is None:  # pragma: no cover - MinerU returned a predictor it did not cache
                return str(backend)
            if existing.get(key) == id(predictor) and key not in _vlm_owners:
                logger.warning(
                    "MinerU's %s engine was already loaded in this process (by code outside mineru-vram); "
                    "the session uses it and leaves it loaded",
                    backend,
                )
                return str(backend)
            _vlm_owners.setdefault(key, set()).add(self._id)
            if key not in self._vlm_keys:
                self._vlm_keys.append(key)
        return str(backend)

    def release_local_vlm(self, tracker: AliveTracker) -> int:
        """Close the in-process VLM engines this runtime loaded, unless another open runtime uses one.

        Each entry is popped from ``ModelSingleton._models`` under MinerU's lock (no parse can
        pick it up after that), then MinerU's ``_shutdown_predictor_runtime`` closes it
        (``mineru_llama_cpp.Engine.close()``) and clears MinerU's references to it. Other
        cached predictors (http-clients of resident engines) are untouched.

        Returns:
            The number of engines closed; each is tracked by weak reference.
        """
        if not self._vlm_keys or "mineru.model.vlm.runtime" not in sys.modules:
            return 0
        from mineru.model.vlm.runtime import ModelSingleton, _shutdown_predictor_runtime

        victims = []
        with _registry_lock:
            for key in self._vlm_keys:
                owners = _vlm_owners.get(key, set())
                owners.discard(self._id)
                if owners:
                    continue
                _vlm_owners.pop(key, None)
                with ModelSingleton._lock:
                    predictor = ModelSingleton._models.pop(key, None)
                if predictor is not None:
                    victims.append((key, predictor))
            self._vlm_keys.clear()
        for key, predictor in victims:
            handles = getattr(predictor, "_mineru_runtime_handles", None) or {}
            engine = next((handles[name] for name in _VLM_HANDLES if handles.get(name) is not None), predictor)
            tracker.track(f"vlm:{key[0]}:{type(engine).__module__}.{type(engine).__name__}", engine)
            del engine
            try:
                _shutdown_predictor_runtime(predictor)
            except Exception as exc:  # the rest of the release must still run; the receipt shows what lives
                logger.warning("closing MinerU's %s engine failed: %s: %s", key[0], type(exc).__name__, exc)
        released = len(victims)
        victims.clear()
        return released

    def claim_new(self) -> None:
        """Record cache entries that appeared since activation as (co-)owned by this runtime."""
        with _registry_lock:
            for k in _all_keys() - self._user_keys:
                _owners.setdefault(k, set()).add(self._id)

    def owned_keys(self) -> list[tuple[str, Any]]:
        with _registry_lock:
            return [k for k, ids in _owners.items() if self._id in ids]

    def owned_vlm_keys(self) -> list[tuple[Any, ...]]:
        """MinerU's ``ModelSingleton`` keys of the in-process VLM engines this runtime (co-)owns."""
        with _registry_lock:
            return list(self._vlm_keys)

    def take_models(self) -> dict[tuple[str, Any], Any]:
        """End this runtime's ownership: pop from MinerU's caches every entry no other open runtime uses.

        Returns:
            ``(cache name, key) -> model object`` for the entries taken; the caller drops
            them (release) or parks them (warm re-entry).
        """
        if "mineru.model.runtime.hybrid" not in sys.modules:
            return {}
        from mineru.model.runtime.hybrid import LOCAL_MODEL_INIT_LOCK

        taken: dict[tuple[str, Any], Any] = {}
        caches = _caches()
        with LOCAL_MODEL_INIT_LOCK, _registry_lock:
            self.claim_new()
            for k in self.owned_keys():
                owners = _owners[k]
                owners.discard(self._id)
                if owners:
                    continue
                del _owners[k]
                cache_name, key = k
                obj = caches[cache_name].pop(key, None)
                if obj is not None:
                    taken[k] = obj
        # Class-level caches in transformers' layout model hold CUDA tensors of their own.
        _clear_transformers_caches()
        return taken

    def release_models(self, tracker: AliveTracker) -> int:
        """Drop from MinerU's caches every entry no other open runtime uses.

        Returns:
            The number of model objects dropped; each is tracked by weak reference.
        """
        taken = self.take_models()
        for (cache_name, key), obj in taken.items():
            tracker.track(f"{cache_name}:{key!r}", obj)
        released = len(taken)
        taken.clear()
        return released

    def give_models(self, models: dict[tuple[str, Any], Any]) -> int:
        """Put models taken by :meth:`take_models` (and parked) back into MinerU's caches, as ours.

        Call after :meth:`activate`. An entry MinerU already holds again (another
        session loaded it meanwhile) is kept, and the parked one dropped.

        Returns:
            How many entries were put back.
        """
        from mineru.model.runtime.hybrid import LOCAL_MODEL_INIT_LOCK

        given = 0
        caches = _caches()
        with LOCAL_MODEL_INIT_LOCK, _registry_lock:
            for (cache_name, key), obj in models.items():
                cache = caches[cache_name]
                if key in cache:
                    continue
                cache[key] = obj
                _owners.setdefault((cache_name, key), set()).add(self._id)
                given += 1
        return given

    @staticmethod
    def retarget_models(models: dict[tuple[str, Any], Any], device: str) -> dict[tuple[str, Any], Any] | None:
        """Move models MinerU built on the CPU to ``device``, as if MinerU had built them there.

        A spare worker builds the models on the CPU (no CUDA context) and hands them to
        the session that takes it. What MinerU decides from the device at construction
        is redone here: every module and loose tensor moves (``_warm``'s walk); plain
        ``device`` attributes of MinerU's wrappers (strings or ``torch.device``) name the
        new device; the OCR networks get MinerU's own ``_apply_inference_precision`` (fp16
        on a GPU); the cache keys, which contain the device, are rewritten.

        Returns:
            The models under their new keys, or ``None`` when a parameter stayed on the CPU
            (the caller then drops them and loads as usual).
        """
        import torch

        from ._warm import _move_all, _walk

        target = torch.device(device)
        cpu = torch.device("cpu")
        _move_all(models.values(), device, pin=False)
        for value, _container, _slot, _kind in _walk(models.values()):
            attrs = getattr(value, "__dict__", None)
            if not isinstance(attrs, dict) or (isinstance(value, torch.nn.Module) and "device" not in attrs):
                continue
            current = attrs.get("device")
            if current == "cpu":
                attrs["device"] = device
            elif isinstance(current, torch.device) and current == cpu:
                attrs["device"] = target
            precision = getattr(value, "_apply_inference_precision", None)
            if callable(precision) and getattr(value, "net", None) is not None:
                precision(device)  # MinerU's OCR: the network to the device, fp16 on a GPU
        for value, _container, _slot, _kind in _walk(models.values()):
            if isinstance(value, torch.nn.Module):
                for tensor in (*value.parameters(recurse=False), *value.buffers(recurse=False)):
                    if tensor is not None and tensor.device.type == "cpu":
                        return None
        rekeyed: dict[tuple[str, Any], Any] = {}
        for (cache_name, key), obj in models.items():
            moved = (key[0], device, *key[2:]) if isinstance(key, tuple) and len(key) >= 2 and key[1] == "cpu" else key
            rekeyed[(cache_name, moved)] = obj
        torch.cuda.synchronize(target)
        return rekeyed

    def warm_key(self) -> Any:
        """The :class:`~mineru_vram._warm.WarmKey` of this runtime's models: what made them."""
        from ._warm import WarmKey

        return WarmKey(
            device=self.device,
            models_dir=None if self.models_dir is None else str(self.models_dir),
            model_source=self.model_source,
            small_backend=self.small_backend,
        )

    # -- parse ---------------------------------------------------------------------------------

    def parse(
        self,
        doc: Document,
        *,
        tier: str,
        ocr_mode: str,
        page_range: str,
        backend: str,
        keep_model_output: bool = False,
        vlm_config: Any = None,
    ) -> ParseResult:
        """Run MinerU on a validated document and return plain data.

        Raises:
            OutOfMemoryError: the device ran out of memory.
            ParseError: MinerU raised for any other reason.
        """
        import time

        t0 = time.perf_counter()
        _spawn_scope.depth = getattr(_spawn_scope, "depth", 0) + 1
        try:
            mres = self._run_mineru(doc, tier=tier, ocr_mode=ocr_mode, page_range=page_range, vlm_config=vlm_config)
            t1 = time.perf_counter()
            result = _to_result(mres, doc, backend=backend, device=self.device, keep_model_output=keep_model_output)
        except Exception as exc:
            flash_missing = getattr(self, "_flash_missing", None)
            if flash_missing is not None and _is_models_not_ready(exc):
                raise _models_error(
                    flash_missing[0],
                    str(self.models_dir),
                    flash_missing[1],
                    tier="flash (OCR for scanned pages)",
                    document=doc.name,
                ) from exc
            if is_oom(exc):
                raise OutOfMemoryError(
                    f"{doc.name}: the device {self.device} ran out of memory while parsing",
                    document=doc.name,
                    device=self.device,
                ) from exc
            message = f"{doc.name}: MinerU failed: {type(exc).__name__}: {exc}"
            if doc.doubt is not None:
                # What the library saw before parsing; MinerU's own text may carry pdfium's stale error code.
                message += f" (before parsing: {doc.doubt})"
            raise ParseError(message, document=doc.name) from exc
        finally:
            _spawn_scope.depth -= 1
            self.claim_new()
        t2 = time.perf_counter()
        return _replace_timing(result, {"mineru": t1 - t0, "convert": t2 - t1})

    @contextlib.contextmanager
    def smaller_batches(self) -> Iterator[dict[str, Any]]:
        """Halve MinerU's batch sizes for the body (a retry after an out-of-memory error).

        What sizes MinerU 4.0.12's work on the device:

        * basic tier: ``BATCH_RATIO`` (2) times per-model base sizes (layout 1, formula 16,
          OCR detection 8). ``ocr.py``, ``window.py`` and ``tables.py`` import the constant
          by name, so each module's own global is patched; ``get_vram()`` plays no part.
        * ``MINERU_PROCESSING_WINDOW_SIZE`` (default 64): pages rendered and analysed
          together, read per parse.
        * ``MINERU_VIRTUAL_VRAM_SIZE``: VLM batch sizes and vLLM's utilisation come from
          ``get_vram()``, which reads it first.

        All three are halved (at least 1) and restored on exit.

        Yields:
            The settings in force during the body.
        """
        import importlib

        from ._config import getenv, patched_environ

        window = _positive_int(getenv("MINERU_PROCESSING_WINDOW_SIZE"), 64)
        vram = _positive_int(getenv("MINERU_VIRTUAL_VRAM_SIZE"), 0) or self._device_total_gb()
        env = {"MINERU_PROCESSING_WINDOW_SIZE": str(max(1, window // 2))}
        if vram:
            env["MINERU_VIRTUAL_VRAM_SIZE"] = str(max(1, vram // 2))
        saved: list[tuple[Any, int]] = []
        ratio: int | None = None
        try:
            for name in _BATCH_RATIO_MODULES:
                try:
                    module = importlib.import_module(name)
                except ImportError:  # a MinerU without this stage: nothing to patch there
                    continue
                old = getattr(module, "BATCH_RATIO", None)
                if isinstance(old, int):
                    saved.append((module, old))
                    ratio = max(1, old // 2)
                    setattr(module, "BATCH_RATIO", ratio)  # noqa: B010 - a module global, by name
            with patched_environ(env):
                yield {"batch_ratio": ratio, **env}
        finally:
            for module, old in saved:
                setattr(module, "BATCH_RATIO", old)  # noqa: B010

    def _device_total_gb(self) -> int:
        if not self.device.startswith("cuda"):
            return 0
        from ._probe import vram_snapshot

        total = vram_snapshot(self.device).total_mib
        return 0 if total is None else round(total / 1024)

    def _run_mineru(self, doc: Document, *, tier: str, ocr_mode: str, page_range: str, vlm_config: Any) -> Any:
        from mineru.integrations.docvortex import read_source_properties
        from mineru.parser.mineru_parser import MinerUParser, _PreparedInput
        from mineru.parser.page_range import normalize_page_range_input

        parser = MinerUParser(tier=tier, parse_mode=ocr_mode, vlm_config=vlm_config)  # type: ignore[arg-type]
        properties = read_source_properties(doc.data, "pdf", None)
        data, retained, broken = parser._maybe_adjust_pdf_bytes(doc.data, "pdf", normalize_page_range_input(page_range))
        prepared = _PreparedInput(
            file_name=Path(doc.name).stem,
            file_bytes=data,
            file_suffix="pdf",
            retained_page_indices=retained,
            broken_page_indices=broken,
            source_properties=properties,
        )
        middle_json, model_output = parser._run_analysis(prepared)
        parser._insert_broken_pages(middle_json.pages, retained, broken)
        return parser._build_result(middle_json, model_output)


# Modules of MinerU's basic tier that size batches with their own copy of BATCH_RATIO.
_BATCH_RATIO_MODULES = (
    "mineru.backend.analysis.pdf.window",
    "mineru.backend.analysis.pdf.ocr",
    "mineru.backend.analysis.pdf.tables",
)


def _positive_int(raw: str | None, default: int) -> int:
    try:
        value = int(raw) if raw is not None else default
    except ValueError:
        return default
    return value if value > 0 else default


def _to_result(mres: Any, doc: Document, *, backend: str, device: str, keep_model_output: bool) -> ParseResult:
    from docvortex.export import materialize_middle, validate_materialized_assets
    from mineru.parser.base import ParseResult as MineruParseResult

    middle, assets = materialize_middle(mres.middle_json)
    validate_materialized_assets(middle, assets)
    exported = MineruParseResult(middle_json=middle)
    model_output = None
    if keep_model_output and mres._model_output is not None:
        model_output = mres._model_output.to_dict(skip_defaults=False)
    return ParseResult(
        document=doc.name,
        markdown=exported.markdown(),
        content_list=exported.structured_content(),
        middle_json=exported.to_dict(),
        images={str(k): bytes(v) for k, v in assets.items()},
        page_count=len(middle.pages),
        backend=backend,
        device=device,
        model_output=model_output,
    )


def _replace_timing(result: ParseResult, timings: dict[str, float]) -> ParseResult:
    import dataclasses

    return dataclasses.replace(result, timings={**result.timings, **timings})


# About how large MinerU 4.0's model repositories are to download (GB), for messages only:
# the basic-tier torch tree is measured from the true architectures (testing.write_random_models
# writes the same tensors), the VLM sizes from their parameter counts (1.2B at bf16, Q8_0 GGUF).
_DOWNLOAD_GB = {
    "MinerU-4_models_torch": 0.9,
    "MinerU-4_models_onnx": 0.9,
    "MinerU2.5-Pro-2605-1.2B": 2.4,
    "MinerU2.5-Pro-2605-1.2B-GGUF": 1.3,
}
# The hosts MinerU downloads from, per source.
_HUB_HOSTS = {"huggingface": ("huggingface.co",), "modelscope": ("modelscope.cn",)}
HUB_CONNECT_TIMEOUT = 3.0


def _model_tier(tier: str) -> str:
    """The tier MinerU's model registry knows (``basic`` or ``standard``) for a parse tier.

    ``flash`` needs the small models (OCR) for scanned pages; ``advanced`` the VLM, as ``standard``.
    """
    return {"flash": "basic", "advanced": "standard"}.get(tier, tier)


def _download_gb(names: list[str]) -> float:
    return sum(_DOWNLOAD_GB.get(name, 1.0) for name in names)


def _hub_unreachable(source: str) -> str | None:
    """Why MinerU could not download from ``source`` now, or ``None`` when a hub answers.

    A TCP connection to the hub (or to the HTTPS proxy, where one is set) within
    :data:`HUB_CONNECT_TIMEOUT` seconds; hosts are tried in parallel.
    """
    import concurrent.futures
    import socket
    import urllib.parse
    import urllib.request

    hosts = _HUB_HOSTS.get(source, _HUB_HOSTS["huggingface"] + _HUB_HOSTS["modelscope"])
    proxy = urllib.request.getproxies().get("https")
    if proxy:
        parsed = urllib.parse.urlsplit(proxy if "//" in proxy else f"//{proxy}")
        targets = [(parsed.hostname or "", parsed.port or 443)]
    else:
        targets = [(host, 443) for host in hosts]

    def attempt(target: tuple[str, int]) -> str | None:
        try:
            socket.create_connection(target, timeout=HUB_CONNECT_TIMEOUT).close()
        except OSError as exc:
            return f"{target[0]}:{target[1]}: {exc}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(targets)) as pool:
        errors = list(pool.map(attempt, targets))
    if any(e is None for e in errors):
        return None
    return "the model hub cannot be reached (" + "; ".join(e for e in errors if e) + ")"


def _models_error(missing: list[str], models_dir: str, reason: str, *, tier: str, document: str | None = None) -> Any:
    from ._exceptions import ModelsNotAvailableError

    size = _download_gb(missing)
    where = f"{document}: " if document else ""
    random = "mineru_vram.testing.write_random_models(path) writes a tree with random weights"
    gguf = next((name for name in missing if name.endswith("-GGUF")), None)
    if gguf is not None:
        random += f", and mineru_vram.testing.write_random_vlm_gguf(path / {gguf!r}) MinerU's llama.cpp model"
    return ModelsNotAvailableError(
        f"{where}MinerU's models for the {tier} tier are not in {models_dir} (missing: {', '.join(missing)}; "
        f"about {size:.1f} GB to download) and cannot be downloaded now: {reason}. Ways out: pass "
        "models_dir= (or set MINERU_VRAM_MODELS_DIR) to a complete MinerU model tree; download them ahead "
        "where the network is reachable with `mineru-vram models download` (or MinerU's "
        f"`mineru-models-download`); for tests and demos without weights, {random}.",
        models_dir=models_dir,
        missing=list(missing),
        download_gb=size,
        reason=reason,
        document=document,
    )


def _is_models_not_ready(exc: BaseException) -> bool:
    """MinerU's own "model repo ... is not ready under ..." error, anywhere in the cause chain."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, FileNotFoundError) and "is not ready under" in str(cur):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


# pypdfium2 logs "Explicitly closing <PdfBitmap ...>. This is a potentially unsafe operation!" at
# WARNING each time MinerU's renderer closes a page bitmap it made (pypdfium2 >= 5.14); nothing a
# user can act on. Quieted while sessions are open, here and in the render workers.
_PDFIUM_BITMAP_LOGGER = "pypdfium2._helpers.bitmap"

# Threads inside a parse of ours: processes they spawn do not re-run the user's __main__.
_spawn_scope = threading.local()


@contextlib.contextmanager
def _main_free_spawn() -> Iterator[None]:
    """While the body runs, ``spawn`` children started inside a parse skip the parent's ``__main__``.

    multiprocessing's ``spawn`` child first re-runs the parent's main script (or
    module) as ``__mp_main__``, so that functions defined there can be unpickled.
    An unguarded script (no ``if __name__ == "__main__":``) then runs again in the
    child: a second session, a second parse, and the render worker never answers.
    MinerU's render workers run docvortex functions only, so for processes started
    from a thread inside :meth:`MineruRuntime.parse` the preparation data leaves
    ``__main__`` out, exactly as it does for ``python -c``. Processes started
    anywhere else (the user's own) are untouched.

    The same children are started isolated (``python -I``): a plain ``python -c``
    puts the current folder first on ``sys.path`` while it imports
    ``multiprocessing``, so a ``multiprocessing.py`` or ``json.py`` in the folder the
    user ran from would run inside MinerU's render workers. They get the parent's
    import path from the preparation data instead, minus the current folder.
    """
    from multiprocessing import spawn, util

    from ._process import child_sys_path

    original = spawn.get_preparation_data
    original_flags = util._args_from_interpreter_flags  # type: ignore[attr-defined]

    def interpreter_flags() -> list[str]:
        # multiprocessing builds every child's command line from these flags: the spawn
        # children and its resource tracker, both started with ``-c``.
        flags: list[str] = original_flags()
        if getattr(_spawn_scope, "depth", 0) > 0 and "-I" not in flags:
            flags = ["-I", *flags]
        return flags

    def get_preparation_data(name: str) -> dict[str, Any]:
        data: dict[str, Any] = original(name)
        if getattr(_spawn_scope, "depth", 0) > 0:
            data.pop("init_main_from_path", None)
            # Instead of the user's __main__, the child runs a module of ours that only quiets
            # pypdfium2's per-bitmap "potentially unsafe operation" warning there (see below).
            data["init_main_from_name"] = "mineru_vram._render_child"
            data["sys_path"] = child_sys_path()
        return data

    spawn.get_preparation_data = get_preparation_data
    util._args_from_interpreter_flags = interpreter_flags  # type: ignore[attr-defined]
    bitmap_log = logging.getLogger(_PDFIUM_BITMAP_LOGGER)
    level = bitmap_log.level
    bitmap_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bitmap_log.setLevel(level)
        if spawn.get_preparation_data is get_preparation_data:
            spawn.get_preparation_data = original
        if util._args_from_interpreter_flags is interpreter_flags:  # type: ignore[attr-defined]
            util._args_from_interpreter_flags = original_flags  # type: ignore[attr-defined]


def mineru_pdfium_lock() -> Any:
    """The lock MinerU's PDF layer (docvortex) holds around its pdfium calls; ``None`` before it is loaded.

    pdfium is not thread-safe and keeps one last-error code for the whole process. The
    library's own pdfium calls (input verdicts) also take this lock once MinerU's PDF layer
    is loaded, so a parse in another thread cannot run pdfium between a failed load and
    the read of its error code. Looked up in ``sys.modules``, never imported: before
    MinerU's PDF layer is imported, none of its pdfium calls can run.
    """
    module = sys.modules.get("docvortex.document.pdf.pdfium")
    return getattr(module, "_pdfium_lock", None)


def _remove_home(home: Path, lock: OwnerLock) -> None:
    shutil.rmtree(home, ignore_errors=True)
    lock.release()


def _stop_render_workers() -> None:
    """Stop the PDF render worker processes MinerU (docvortex) started for parsing.

    They hold no device memory, but stay alive as children of this process until its
    atexit hook; with the last session closed nothing of ours should be left running.
    """
    module = sys.modules.get("docvortex.document.pdf.render_session")
    shutdown = getattr(module, "shutdown_pdf_render_sessions", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # cleanup must not mask the release; the atexit hook retries
            pass


def _clear_transformers_caches() -> None:
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


# --- resident engine support ---------------------------------------------------------------------
# The VLM engine is MinerU's too; what the engine needs from MinerU's internals lives here:
# building MinerU's in-process transformers VLM outside MinerU's never-evicted model cache,
# and dropping MinerU's cached http-client predictors for a server that is going away.


class TransformersVlm:
    """MinerU's in-process transformers VLM engine, owned by the caller.

    Built with ``ModelSingleton._create_model("transformers", ...)``, the very call
    ``ModelSingleton().get_model("transformers", ...)`` makes, but without putting the
    result into MinerU's cache (which is never evicted), so the resident engine owns
    the model and can move it off the device or drop it.

    Args:
        model_path: a MinerU 2.5 (Qwen2-VL) model directory.
        device: ``"cpu"`` or ``"cuda:N"``; MinerU reads it from ``MINERU_DEVICE_MODE``,
            which is set only while the model loads.
    """

    def __init__(self, model_path: str, *, device: str) -> None:
        from ._config import patched_environ

        with patched_environ({"MINERU_DEVICE_MODE": device}, also_restore=("OMP_NUM_THREADS",)):
            from mineru.model.vlm.runtime import ModelSingleton

            predictor = ModelSingleton()._create_model("transformers", model_path, None)
        self.device = device
        self._predictor: Any = predictor
        self._client: Any = predictor.client  # mineru_vl_utils' TransformersVlmClient
        self._client.use_tqdm = False  # no progress bar per batch in a server
        self.batch_size = max(1, int(getattr(self._client, "batch_size", 1) or 1))

    def predict(self, images: list[bytes | None], prompts: list[str], sampling: list[dict[str, Any]]) -> list[str]:
        """Run one batch: each image with its prompt and sampling parameters."""
        from mineru_vl_utils.vlm_client.base_client import SamplingParams

        params = [SamplingParams(**s) for s in sampling]
        return list(self._client.batch_predict(images, prompts, params))

    def to(self, device: str) -> None:
        """Move the weights (``"cpu"`` to sleep, the engine's device to wake)."""
        model = self._client.model
        if model is not None:
            model.to(device)

    def weights_device(self) -> str | None:
        """Where the model's first parameter lives (``"cpu"``, ``"cuda:0"``), or ``None`` without a model."""
        model = self.model_object()
        if model is None:
            return None
        for param in model.parameters():
            return str(param.device)
        return None

    def model_object(self) -> Any:
        return None if self._client is None else self._client.model

    def close(self) -> None:
        """Drop every reference this object and MinerU's client hold to the model."""
        from mineru.model.vlm.runtime import _clear_predictor_references

        if self._predictor is not None:
            _clear_predictor_references(self._predictor)
        self._predictor = None
        self._client = None


def drop_http_vlm_clients(server_url: str) -> int:
    """Shut down MinerU's cached http-client predictors for ``server_url``.

    MinerU caches one per server URL and headers for the life of the process; when a
    resident engine stops, its predictors (a thread and connection pools each) go too.

    Returns:
        How many were dropped.
    """
    if "mineru.model.vlm.runtime" not in sys.modules:
        return 0
    from mineru.model.vlm.runtime import ModelSingleton

    target = server_url.rstrip("/")
    with ModelSingleton._lock:
        keys = [k for k in ModelSingleton._models if k[0] == "http-client" and str(k[2] or "").rstrip("/") == target]
        victims = [ModelSingleton._models.pop(k) for k in keys]
    for predictor in victims:
        try:
            predictor.shutdown()
        except Exception as exc:  # a client that cannot close must not stop the engine's shutdown
            import logging

            logging.getLogger("mineru_vram").debug("closing MinerU's http client for %s: %s", target, exc)
    return len(victims)


# --- MinerU's model code and data files, for the random-weight model trees of mineru_vram.testing ---


@dataclasses.dataclass(frozen=True)
class LayoutConstants:
    """What MinerU's PP-DocLayoutV2 wrapper assumes about the layout model.

    Attributes:
        labels: the class labels, in the order of the model's outputs.
        class_thresholds: per-class score thresholds, in label order.
        class_order: per-class reading-order groups, in label order.
        image_size: ``(width, height)`` the page is resized to.
        rescale_factor: the pixel scale applied before the model.
    """

    labels: tuple[str, ...]
    class_thresholds: tuple[float, ...]
    class_order: tuple[int, ...]
    image_size: tuple[int, int]
    rescale_factor: float


def layout_label_constants() -> LayoutConstants:
    """PP-DocLayoutV2's labels, thresholds, reading-order classes and input size, as MinerU uses them.

    Read from ``mineru.model.layout.pp_doclayout_v2_base``, MinerU's torch-free
    constants module, so a model built from them stays in step with MinerU.
    Importing it does not import ``mineru.config``.
    """
    from mineru.model.layout.pp_doclayout_v2_base import (
        DEFAULT_CLASS_ORDER,
        DEFAULT_CLASS_THRESHOLDS,
        DEFAULT_IMAGE_SIZE,
        DEFAULT_RESCALE_FACTOR,
        PP_DOCLAYOUT_V2_LABELS,
    )

    width, height = DEFAULT_IMAGE_SIZE
    return LayoutConstants(
        labels=tuple(PP_DOCLAYOUT_V2_LABELS),
        class_thresholds=tuple(float(value) for value in DEFAULT_CLASS_THRESHOLDS),
        class_order=tuple(int(value) for value in DEFAULT_CLASS_ORDER),
        image_size=(int(width), int(height)),
        rescale_factor=float(DEFAULT_RESCALE_FACTOR),
    )


def pytorchocr_model(arch_config: dict[str, Any], **kwargs: Any) -> Any:
    """A new network of MinerU's pytorchocr ``BaseModel`` (random weights) for ``arch_config``.

    MinerU builds its OCR detectors, recognizers and PP-FormulaNet from these
    architecture configurations (see :func:`pytorchocr_resources`).
    """
    from mineru.model._internal.pytorchocr.modeling.architectures.base_model import BaseModel

    return BaseModel(arch_config, **kwargs)


def mineru_resource(package: str, *parts: str) -> Path:
    """A data file shipped inside one of MinerU's packages, found without importing ``mineru.config``."""
    from importlib import resources

    return Path(str(resources.files(package).joinpath(*parts)))


def pytorchocr_resources() -> Path:
    """MinerU's pytorchocr resource folder: ``arch_config.yaml``, ``models_config.yml``,
    ``pp_formulanet_arch_config.yaml``."""
    return mineru_resource("mineru.model._internal.pytorchocr.utils", "resources")


def ocr_dictionary() -> Path:
    """The character dictionary MinerU decodes its PP-OCRv6 recognizer's output with."""
    return mineru_resource("mineru.model.ocr", "data", "ppocrv6_dict.txt")
