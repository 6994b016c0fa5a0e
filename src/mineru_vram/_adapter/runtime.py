"""MinerU set up for one session: environment, config, models, ownership, parse, release, park/retarget."""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mineru_vram._documents import Document
from mineru_vram._exceptions import ConfigurationError, OutOfMemoryError, ParseError
from mineru_vram._files import OwnerLock, owned_temp_dir, sweep_dead_owners
from mineru_vram._release import AliveTracker
from mineru_vram._result import ParseResult

from . import state
from .models import default_models_dir, download_gb, hub_unreachable, is_models_not_ready, models_error
from .spawn import main_free_spawn, spawn_scope, stop_render_workers
from .vlm import load_local_vlm, release_local_vlm

logger = logging.getLogger("mineru_vram")

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
        settings = self._settings()
        with state.registry_lock:
            if state.shared is not None:
                diffs = {k: (v, settings[k]) for k, v in state.shared.settings.items() if v != settings[k]}
                if diffs:
                    what = ", ".join(f"{k}={old!r} (asked: {new!r})" for k, (old, new) in diffs.items())
                    raise ConfigurationError(
                        f"an in-process session is already open with {what}; MinerU's device and configuration "
                        "are process-wide, so a second in-process session with other settings cannot run beside "
                        "it. Use isolation='process' for sessions with different settings in one process.",
                        **{k: new for k, (old, new) in diffs.items()},
                    )
                state.shared.count += 1
            else:
                stack, before = self._apply_environment()
                state.shared = state.SharedEnvironment(settings, stack, 1, before)
            keys = state.all_keys()
            self._user_keys = {k for k in keys if k not in state.owners}
            for k in keys - self._user_keys:
                state.owners[k].add(self._id)
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
            from mineru_vram._config import getenv, patched_environ

            before = {name: getenv(name) for name in env}
            stack.enter_context(patched_environ(env, also_restore=_MINERU_SIDE_EFFECT_ENV))
            stack.enter_context(self._patched_config())
            stack.enter_context(main_free_spawn())
        except BaseException:
            stack.close()
            raise
        return stack, before

    def deactivate(self) -> None:
        """Restore environment and config once the last open runtime deactivates. Idempotent."""
        if not self._active:
            return
        self._active = False
        stack = None
        with state.registry_lock:
            if state.shared is not None:
                state.shared.count -= 1
                if state.shared.count <= 0:
                    stack, state.shared = state.shared.stack, None
        if stack is not None:
            try:
                stack.close()
            finally:
                stop_render_workers()

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
            reason = hub_unreachable(source)
        if reason is None:
            logger.warning(
                "MinerU will now download its %s models (about %.1f GB) into %s; pass models_dir= to use a "
                "tree you already have",
                ", ".join(missing),
                download_gb(missing),
                cfg.base_dir,
            )
            return missing
        if tier == "flash":
            cfg.source = "local"  # restored with the rest of the config when the last session closes
            self._flash_missing = (missing, reason)
            return missing
        raise models_error(missing, str(cfg.base_dir), reason, tier=tier)

    def load_local_vlm(
        self, vlm_config: Any, *, environ: dict[str, str] | None = None, drop: tuple[str, ...] = ()
    ) -> str:
        """Load MinerU's in-process VLM engine for ``vlm_config`` (see :func:`.vlm.load_local_vlm`)."""
        return load_local_vlm(self._id, self._vlm_keys, vlm_config, environ=environ, drop=drop)

    def release_local_vlm(self, tracker: AliveTracker) -> int:
        """Close the in-process VLM engines this runtime loaded (see :func:`.vlm.release_local_vlm`)."""
        return release_local_vlm(self._id, self._vlm_keys, tracker)

    def claim_new(self) -> None:
        """Record cache entries that appeared since activation as (co-)owned by this runtime."""
        with state.registry_lock:
            for k in state.all_keys() - self._user_keys:
                state.owners.setdefault(k, set()).add(self._id)

    def owned_keys(self) -> list[tuple[str, Any]]:
        with state.registry_lock:
            return [k for k, ids in state.owners.items() if self._id in ids]

    def owned_vlm_keys(self) -> list[tuple[Any, ...]]:
        """MinerU's ``ModelSingleton`` keys of the in-process VLM engines this runtime (co-)owns."""
        with state.registry_lock:
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
        caches = state.caches()
        with LOCAL_MODEL_INIT_LOCK, state.registry_lock:
            self.claim_new()
            for k in self.owned_keys():
                owners = state.owners[k]
                owners.discard(self._id)
                if owners:
                    continue
                del state.owners[k]
                cache_name, key = k
                obj = caches[cache_name].pop(key, None)
                if obj is not None:
                    taken[k] = obj
        # Class-level caches in transformers' layout model hold CUDA tensors of their own.
        state.clear_transformers_caches()
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
        caches = state.caches()
        with LOCAL_MODEL_INIT_LOCK, state.registry_lock:
            for (cache_name, key), obj in models.items():
                cache = caches[cache_name]
                if key in cache:
                    continue
                cache[key] = obj
                state.owners.setdefault((cache_name, key), set()).add(self._id)
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

        from mineru_vram._warm import _move_all, _walk

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
        from mineru_vram._warm import WarmKey

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
        spawn_scope.depth = getattr(spawn_scope, "depth", 0) + 1
        try:
            mres = self._run_mineru(doc, tier=tier, ocr_mode=ocr_mode, page_range=page_range, vlm_config=vlm_config)
            t1 = time.perf_counter()
            result = _to_result(mres, doc, backend=backend, device=self.device, keep_model_output=keep_model_output)
        except Exception as exc:
            flash_missing = getattr(self, "_flash_missing", None)
            if flash_missing is not None and is_models_not_ready(exc):
                raise models_error(
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
            spawn_scope.depth -= 1
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

        from mineru_vram._config import getenv, patched_environ

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
        from mineru_vram._probe import vram_snapshot

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


def _remove_home(home: Path, lock: OwnerLock) -> None:
    shutil.rmtree(home, ignore_errors=True)
    lock.release()
