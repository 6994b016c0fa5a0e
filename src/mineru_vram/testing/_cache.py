"""The one place random-weight model trees are kept: shared by the demo, this project's tests and
the pytest plugin's ``mineru_vram_models`` fixture.

The default is ``$XDG_CACHE_HOME/mineru-vram/random-models`` (``~/.cache/...`` when the
variable is unset or not absolute, as the XDG specification asks). A tree is built
once there (about 880 MB) and reused by every later run, process and pytest-xdist
worker: :func:`~mineru_vram.testing.write_random_models` takes the tree's lock, builds
only when no complete tree with the seed is in place, and otherwise returns at once.
Each user of it can be pointed elsewhere (``mineru-vram demo --models-dir``,
``pytest --vram-models-dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

from mineru_vram._config import getenv

__all__ = ["default_models_dir", "random_models"]


def default_models_dir() -> Path:
    """Where random models are kept unless a caller names a folder: ``$XDG_CACHE_HOME/mineru-vram/random-models``."""
    base = getenv("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "mineru-vram" / "random-models"


def random_models(path: str | os.PathLike[str] | None = None, *, seed: int = 0) -> Path:
    """The random-weights model tree in ``path`` (default :func:`default_models_dir`), built if missing.

    Safe to call from several processes at once: one builds, the others wait for it
    under the tree's lock and reuse the result.

    Returns:
        The tree's folder (use it as ``ModelSession(models_dir=...)``).

    Raises:
        TimeoutError: Another process held the build lock too long (see ``BUILD_LOCK_TIMEOUT``).
        OSError: The tree cannot be written.
    """
    from ._models import write_random_models

    target = Path(path).expanduser() if path is not None else default_models_dir()
    return write_random_models(target, seed=seed)
