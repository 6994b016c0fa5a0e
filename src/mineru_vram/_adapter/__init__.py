"""Everything that touches MinerU's internals lives here.

Nothing outside this package imports ``mineru``. Its modules: :mod:`.runtime`
(``MineruRuntime``: environment, config, models, parse, release, park/retarget),
:mod:`.state` (MinerU's caches, the ownership registry, the shared environment),
:mod:`.models` (model trees, download sizes, hub reachability, the missing-models
error), :mod:`.download` (a tier's model status, MinerU's downloader), :mod:`.spawn`
(MinerU's render workers), :mod:`.vlm` (MinerU's VLM engines) and :mod:`.model_code`
(MinerU's model code for the random-weight trees of :mod:`mineru_vram.testing`).

A MinerU upgrade should be a change to this package alone. What it relies on
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
  parse, processes spawned from that thread skip it (:func:`.spawn.main_free_spawn`).
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

from .download import download_models, tier_model_status
from .model_code import (
    LayoutConstants,
    layout_label_constants,
    mineru_resource,
    ocr_dictionary,
    pytorchocr_model,
    pytorchocr_resources,
)
from .models import COMPLETE_MARKER, HUB_CONNECT_TIMEOUT, MINERU_REPOS, default_models_dir, mineru_paths, mineru_version
from .runtime import MineruRuntime, is_oom
from .spawn import mineru_pdfium_lock
from .state import cache_summary, environment_before_sessions
from .vlm import TransformersVlm, drop_http_vlm_clients, vlm_config

__all__ = [
    "COMPLETE_MARKER",
    "HUB_CONNECT_TIMEOUT",
    "MINERU_REPOS",
    "LayoutConstants",
    "MineruRuntime",
    "TransformersVlm",
    "cache_summary",
    "default_models_dir",
    "download_models",
    "drop_http_vlm_clients",
    "environment_before_sessions",
    "is_oom",
    "layout_label_constants",
    "mineru_paths",
    "mineru_pdfium_lock",
    "mineru_resource",
    "mineru_version",
    "ocr_dictionary",
    "pytorchocr_model",
    "pytorchocr_resources",
    "tier_model_status",
    "vlm_config",
]
