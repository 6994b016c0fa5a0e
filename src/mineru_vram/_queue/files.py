"""The queue's folder beside its database, ``<path>.files/``, and the database file's safety.

* ``inputs/<task>.pdf``: the submitted bytes, deleted when the task ends.
* ``work/<task>-<token>.result``: one attempt's result being staged; renamed into
  ``results/`` or deleted when the attempt ends.
* ``results/<task>-<token>.result``: a completed task's result, kept until retrieved
  (``keep_results=False``) or forgotten; in the format of :mod:`.results`, which
  cannot run code when read.
* ``workers/<owner>.lock``: held by each running worker for its life
  (:class:`~mineru_vram._files.OwnerLock`).

Only this user can reach any of it: the folders are ``0700`` and the files
``0600``; a folder or file another user created first or can write to is refused
(:class:`~mineru_vram.InsecurePathError`), never adopted, and no file is opened
through a symbolic link. Every name built here from a value read from the database
(a task id, a lease token, a stored result name, a worker's owner id) is checked
first, so a row cannot point outside this folder.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mineru_vram._exceptions import InsecurePathError, QueueStorageError
from mineru_vram._files import check_private, open_private, owner_alive, private_dir, private_file

from .records import Claim, TaskStatus
from .results import decode_result, encode_result

if TYPE_CHECKING:
    from mineru_vram._result import ParseResult

__all__ = [
    "ORPHAN_AGE_SECONDS",
    "LiveRow",
    "Storage",
    "secure_database",
    "storage_error",
    "valid_owner",
    "valid_task_id",
    "write_file",
]

# Files older than this with no row that explains them are swept; younger ones may belong to a
# submit or a completion that is between writing its file and committing its row.
ORPHAN_AGE_SECONDS = 600.0

RESULT_SUFFIX = ".result"
_HEX32 = re.compile(r"[0-9a-f]{32}")
_RESULT_NAME = re.compile(r"([0-9a-f]{32})-([0-9a-f]{32})" + re.escape(RESULT_SUFFIX))
_OWNER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")


def valid_task_id(task_id: object) -> bool:
    """Whether ``task_id`` has the form ``submit`` gives ids (32 hex digits)."""
    return isinstance(task_id, str) and _HEX32.fullmatch(task_id) is not None


def valid_owner(owner: object) -> bool:
    """Whether ``owner`` is a worker id that names a file in ``workers/`` and nothing else."""
    return isinstance(owner, str) and _OWNER.fullmatch(owner) is not None


@dataclass(frozen=True)
class LiveRow:
    """What the sweep needs to know of one task row."""

    status: TaskStatus
    result_name: str | None
    token: str | None


class Storage:
    """The files of one queue. The folders are created by :meth:`create`."""

    SUBFOLDERS = ("inputs", "work", "results", "workers")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs = root / "inputs"
        self.work = root / "work"
        self.results = root / "results"
        self.workers = root / "workers"

    def create(self) -> None:
        """Create the folders (``0700``) where missing; check the ones that exist.

        Raises:
            InsecurePathError: a folder is not ours, is a link, or others can write to it.
            QueueStorageError: a folder cannot be created (read-only, no space, no permission).
        """
        for folder in (self.root, *(self.root / sub for sub in self.SUBFOLDERS)):
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            except FileExistsError:
                pass  # a file or a link with that name: private_dir says which
            except OSError as exc:
                raise storage_error(folder, "cannot create the queue's folder", exc) from None
            private_dir(folder, create=False)

    # -- names ---------------------------------------------------------------------------------

    def input_path(self, task_id: str) -> Path:
        _check_id(task_id)
        return self.inputs / f"{task_id}.pdf"

    def staging_path(self, claim: Claim) -> Path:
        return self.work / self.result_name(claim)

    @staticmethod
    def result_name(claim: Claim) -> str:
        _check_id(claim.id)
        _check_id(claim.token)
        return f"{claim.id}-{claim.token}{RESULT_SUFFIX}"

    def result_path(self, name: str) -> Path:
        """The stored result ``name`` (as the database records it), inside ``results/``.

        Raises:
            QueueStorageError: the name is not one this queue writes: it could point
                elsewhere (``../``), or be a pickle an older version stored.
        """
        if not isinstance(name, str) or _RESULT_NAME.fullmatch(name) is None:
            raise QueueStorageError(
                f"the queue's database names {name!r} as a result file, which is not a name this queue writes; "
                "it was not read",
                path=str(self.results),
            )
        return self.results / name

    def lock_path(self, owner: str) -> Path:
        if not valid_owner(owner):
            raise ValueError(f"{owner!r} is not a worker id of this queue")
        return self.workers / f"{owner}.lock"

    # -- inputs --------------------------------------------------------------------------------

    def write_input(self, task_id: str, data: bytes, *, sync: bool) -> Path:
        path = self.input_path(task_id)
        write_file(path, data, sync=sync)
        return path

    def remove_inputs(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            if valid_task_id(task_id):
                self.input_path(task_id).unlink(missing_ok=True)

    # -- results -------------------------------------------------------------------------------

    def stage_result(self, claim: Claim, result: ParseResult, *, sync: bool) -> Path:
        """Write an attempt's result into ``work/`` (synced when ``sync``); returns the staged file.

        Raises:
            QueueStorageError: it cannot be written (no space, read-only).
        """
        staged = self.staging_path(claim)
        write_file(staged, encode_result(result), move=False, sync=sync)
        return staged

    def publish_result(self, claim: Claim, staged: Path) -> str:
        """Move a staged result into ``results/``; returns the name the database records."""
        name = self.result_name(claim)
        try:
            os.replace(staged, self.results / name)
        except OSError as exc:
            raise storage_error(self.results / name, "cannot store the result", exc) from None
        return name

    def load_result(self, name: str) -> ParseResult:
        """Read a stored result.

        Raises:
            FileNotFoundError: it is gone.
            InsecurePathError: the file is a link, not ours, or others can write to it.
            QueueStorageError: ``name`` is not a result name of this queue, or the file
                is not a result in the queue's format (damaged, or replaced).
        """
        path = self.result_path(name)
        try:
            with private_file(path, "rb") as fh:
                data = fh.read()
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as exc:
            raise storage_error(path, "cannot read the result", exc) from None
        try:
            return decode_result(data)
        except ValueError as exc:
            raise QueueStorageError(
                f"{path}: not a result this queue wrote ({exc}); it was not loaded", path=str(path)
            ) from None

    def remove_result(self, name: str) -> None:
        with contextlib.suppress(QueueStorageError):
            self.result_path(name).unlink(missing_ok=True)

    # -- sweeping ------------------------------------------------------------------------------

    def sweep(self, rows: Mapping[str, LiveRow], *, busy: Iterable[str] = (), now: float | None = None) -> None:
        """Delete files no task row explains (a crash between writing a file and committing).

        Also the lock files of workers that died (killed, or a machine that rebooted)
        while they held no task; ``busy`` names the workers that hold tasks, whose files
        recovery reads (it removes them itself once it has recovered their tasks).
        """
        cutoff = (time.time() if now is None else now) - ORPHAN_AGE_SECONDS
        results = {r.result_name for r in rows.values() if r.result_name}

        def old(path: Path) -> bool:
            try:
                return path.stat().st_mtime < cutoff
            except OSError:
                return False

        for path in self.inputs.iterdir():
            row = rows.get(path.name.split(".", 1)[0])
            if (row is None and old(path)) or (row is not None and row.status.terminal):
                path.unlink(missing_ok=True)
        for path in self.results.iterdir():
            if path.name not in results and old(path):
                path.unlink(missing_ok=True)
        for path in self.work.iterdir():
            task_id, _, rest = path.name.partition("-")
            token = rest.split(".", 1)[0]
            row = rows.get(task_id)
            live = row is not None and row.status is TaskStatus.PROCESSING and row.token == token
            if not live:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        keep = {f"{owner}.lock" for owner in busy}
        for path in self.workers.iterdir():
            # A lock file whose lock can be taken belongs to a dead worker: a live one holds it from
            # before it is renamed into place. A ``.tmp-`` file is unlocked for a moment after its
            # creator opens it, so only an old one is judged.
            if path.name in keep or (path.name.startswith(".tmp-") and not old(path)):
                continue
            owner_alive(path, remove_if_dead=True)

    def owner_dead(self, owner: str | None) -> bool:
        """Whether ``owner``'s lock file exists and nobody holds it (its process is gone).

        The file is removed then. A missing file says nothing (another machine, or
        already cleaned): the lease decides.
        """
        if not owner or not valid_owner(owner):
            return False
        return owner_alive(self.lock_path(owner), remove_if_dead=True) is False


def _check_id(value: str) -> None:
    if not valid_task_id(value):
        raise QueueStorageError(f"{value!r} is not a task id or lease token of this queue; no file was touched")


def write_file(path: Path, data: bytes, *, move: bool = True, sync: bool = True) -> None:
    """Write ``data`` to a new ``0600`` file: a temporary name, fsync (when ``sync``), rename (when ``move``).

    Raises:
        QueueStorageError: it cannot be written (no space, read-only, quota); nothing is left behind.
    """
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}") if move else path
    try:
        with open_private(tmp, "xb" if move else "wb") as fh:
            fh.write(data)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
        if move:
            os.replace(tmp, path)
    except InsecurePathError:
        raise  # a link or another user's file where ours should be: not touched
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(path, "cannot write", exc) from None


def storage_error(path: Path, what: str, exc: BaseException) -> QueueStorageError:
    """A :class:`QueueStorageError` for ``what`` failing on ``path``, with the OS's reason."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return QueueStorageError(f"{path}: {what}: {reason}", path=str(path), errno=getattr(exc, "errno", None))


def secure_database(path: Path) -> None:
    """Make sure the database file is safe to open: create it ``0600`` when missing.

    An existing database, or its ``-wal``/``-shm``/``-journal`` files, must be ours,
    regular files, and not writable by others: another user's ``-wal`` would be
    replayed into our database when it opens. A database of ours that others can
    read (``0644``, as older versions made it) is tightened to ``0600``. Nothing is
    opened once the file exists: closing a descriptor would drop the ``fcntl`` locks
    SQLite holds on it for other connections of this process.

    Raises:
        InsecurePathError: the file or one of its companions is not safe.
        QueueStorageError: it cannot be created.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise storage_error(path, "cannot create the queue's database", exc) from None
    else:
        os.close(fd)  # a new file: no connection holds a lock on it yet
    for companion in ("", "-wal", "-shm", "-journal"):
        check_private(path.with_name(path.name + companion))
    mode = stat.S_IMODE(os.lstat(path).st_mode)
    if mode & 0o077:
        with contextlib.suppress(OSError):
            os.chmod(path, 0o600)
