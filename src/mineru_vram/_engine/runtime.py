"""An engine's runtime folder: private, marked by its owner's lock, swept once the owner is dead.

Each engine keeps its server's key file and log in a folder of its own, made
``0700`` with an unpredictable name (``mineru-vram-engine-*`` in the system's
temporary folder, or in ``runtime_dir=``). The owning process holds an
:class:`~mineru_vram._files.OwnerLock` in it for its whole life. ``stop()``
removes the folder; a process killed by ``SIGKILL`` cannot, so every new engine
first sweeps the folders beside its own whose owner's lock can be taken: their
owner is dead. Folders of other users, and folders without a lock (being created
this moment), are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

from mineru_vram import _files

__all__ = ["OWNER_LOCK", "PREFIX", "RuntimeFolder", "sweep"]

logger = logging.getLogger("mineru_vram")

PREFIX = "mineru-vram-engine-"
OWNER_LOCK = "owner.lock"


def sweep(parent: Path) -> list[Path]:
    """Remove this user's engine folders in ``parent`` whose owner is dead.

    Returns:
        The folders removed.
    """
    removed = _files.sweep_dead_owners(parent, PREFIX, lock_name=OWNER_LOCK)
    if removed:
        logger.info("removed %d engine folder(s) of dead owners in %s", len(removed), parent)
    return removed


class RuntimeFolder:
    """One engine's private folder, created on first use.

    Args:
        parent: where to create it (made private if missing); default the system's temporary folder.
    """

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        self._parent = parent
        self._path: Path | None = None
        self._finalizer: weakref.finalize[[str, _files.OwnerLock, int], RuntimeFolder] | None = None

    def path(self) -> Path:
        """The folder, created (after a sweep of dead owners' folders) on the first call.

        Raises:
            InsecurePathError: ``parent`` (or the new folder) is not private to this user.
        """
        if self._path is None:
            parent = Path(tempfile.gettempdir()) if self._parent is None else _files.private_dir(self._parent)
            sweep(parent)
            path = _files.private_dir(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
            lock = _files.OwnerLock(path / OWNER_LOCK).acquire(f"{os.getpid()}\n".encode())
            # Removed by remove(), or when the engine is collected without ever having been stopped.
            self._finalizer = weakref.finalize(self, _remove, str(path), lock, os.getpid())
            self._path = path
        return self._path

    def remove(self) -> None:
        """Release the owner's lock and delete the folder. Idempotent."""
        finalizer, self._finalizer, self._path = self._finalizer, None, None
        if finalizer is not None:
            finalizer()


def _remove(path: str, lock: _files.OwnerLock, pid: int) -> None:
    if os.getpid() != pid:  # never from a forked child
        return
    with contextlib.suppress(OSError):
        lock.release()
    shutil.rmtree(path, ignore_errors=True)
