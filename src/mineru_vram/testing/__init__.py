"""Helpers for testing code that uses mineru_vram, offline and without weights.

* :func:`write_random_models` writes a MinerU-4 model tree with the true
  architectures and random weights: realistic memory and timing, noise as text.
* :func:`write_random_vlm` writes a tiny random Qwen2-VL that MinerU's
  transformers engine loads.
* :func:`write_random_vlm_gguf` writes MinerU's llama.cpp model (main GGUF +
  mmproj GGUF, the architecture MinerU's registry names) with random weights,
  tiny by default, at true size on request; ``llama-server`` and MinerU's
  in-process llama.cpp engine load it offline.
* :func:`make_pdf` writes a small valid text PDF with a table.
* :class:`StandinLauncher` runs the SGLang stand-in where ``ResidentEngine``
  would run SGLang.
* :func:`reset` returns the library's process-wide state to its defaults (the
  resident engine singleton), like structlog's ``reset_defaults()``.

The tooling behind them lives in this package's private modules (``_models``,
``_gguf``, ``_pdf``, ``_cache``, ``_standin``, ``_plugin_support``), apart from the
production code.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._pdf import make_pdf
from ._standin import StandinLauncher

__all__ = [
    "StandinLauncher",
    "make_pdf",
    "reset",
    "write_random_models",
    "write_random_vlm",
    "write_random_vlm_gguf",
]


def write_random_models(path: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write MinerU's small-model tree (basic tier) with random weights under ``path``.

    ``ModelSession(models_dir=path)`` then loads it offline. Idempotent: a complete
    tree with the same seed is reused.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from ._models import write_random_models as _write

    return _write(path, seed=seed, overwrite=overwrite)


def write_random_vlm(path: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL model directory that transformers loads offline."""
    from ._models import write_random_vlm as _write

    return _write(path, seed=seed)


def write_random_vlm_gguf(path: str | os.PathLike[str], *, seed: int = 0, size: str = "tiny") -> Path:
    """Write MinerU's llama.cpp VLM (main + mmproj GGUF) with random weights into the folder ``path``.

    Args:
        path: the model folder (usable as ``<models_dir>/MinerU2.5-Pro-2605-1.2B-GGUF``).
        seed: the same seed writes the same bytes; a complete folder is reused.
        size: ``"tiny"`` (under 1 MB, loads in a second on a CPU) or ``"full"`` (the true
            architecture, about 1.3 GB at Q8_0, for realistic GPU memory).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from ._gguf import write_random_vlm_gguf as _write

    return _write(path, seed=seed, size=size)  # type: ignore[arg-type]


def reset() -> None:
    """Stop and forget the process-wide resident engines (for test isolation)."""
    import sys

    engine = sys.modules.get("mineru_vram._engine")
    if engine is not None:
        engine._reset_for_tests()
