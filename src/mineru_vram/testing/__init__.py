"""Helpers for testing code that uses mineru_vram, offline and without weights.

* :func:`write_random_models` writes a MinerU-4 model tree with the true
  architectures and random weights: realistic memory and timing, noise as text.
* :func:`write_random_vlm` writes a tiny random Qwen2-VL that MinerU's
  transformers engine loads.
* :func:`make_pdf` writes a small valid text PDF with a table.
* :class:`StandinLauncher` runs the SGLang stand-in where ``ResidentEngine``
  would run SGLang.
* :func:`reset` returns the library's process-wide state to its defaults (the
  resident engine singleton), like structlog's ``reset_defaults()``.

The tooling behind them lives in this package's private modules (``_models``,
``_pdf``, ``_cache``, ``_plugin_support``), apart from the production code.
"""

from __future__ import annotations

import os
from pathlib import Path

from mineru_vram._standin import StandinLauncher

from ._pdf import make_pdf

__all__ = ["StandinLauncher", "make_pdf", "reset", "write_random_models", "write_random_vlm"]


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


def reset() -> None:
    """Stop and forget the process-wide resident engines (for test isolation)."""
    import sys

    engine = sys.modules.get("mineru_vram._engine")
    if engine is not None:
        engine._reset_for_tests()
