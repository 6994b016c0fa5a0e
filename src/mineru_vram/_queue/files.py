"""The queue's folder beside its database, ``<path>.files/``.

* ``inputs/<task>.pdf``: the submitted bytes, deleted when the task ends.
* ``work/<task>-<token>.pickle``: one attempt's result being staged; renamed into
  ``results/`` or deleted when the attempt ends.
* ``results/<task>-<token>.pickle``: a completed task's result, kept until retrieved
  (``keep_results=False``) or forgotten.
* ``workers/<owner>.lock``: held by each running worker for its life
  (:class:`~mineru_vram._process.OwnerLock`).

Every name built here from a value read from the database (a task id, a lease
token, a stored result name, a worker's owner id) is checked first, so a row
cannot point outside this folder.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mineru_vram._process import owner_alive

from .records import Claim, TaskStatus

if TYPE_CHECKING:
    from mineru_vram._result import ParseResult

__all__ = ["ORPHAN_AGE_SECONDS", "LiveRow", "Storage", "valid_owner", "valid_task_id"]

# Files older than this with no row that explains them are swept; younger ones may belong to a
# submit or a completion that is between writing its file and committing its row.
ORPHAN_AGE_SECONDS = 600.0

RESULT_SUFFIX = ".pickle"
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
        """Create the folders (``0700``) where missing."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # results are unpickled from here
        for sub in self.SUBFOLDERS:
            (self.root / sub).mkdir(exist_ok=True, mode=0o700)

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
            ValueError: the name is not one this queue writes (it could point elsewhere).
        """
        if _RESULT_NAME.fullmatch(name) is None:
            raise ValueError(f"{name!r} is not a result name of this queue")
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
        """Write an attempt's result into ``work/`` (synced when ``sync``); returns the staged file."""
        staged = self.staging_path(claim)
        write_file(staged, pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL), move=False, sync=sync)
        return staged

    def publish_result(self, claim: Claim, staged: Path) -> str:
        """Move a staged result into ``results/``; returns the name the database records."""
        name = self.result_name(claim)
        os.replace(staged, self.results / name)
        return name

    def load_result(self, name: str) -> ParseResult:
        """Read a stored result.

        Raises:
            FileNotFoundError: it is gone.
            ValueError: ``name`` is not a result name of this queue.
        """
        with open(self.result_path(name), "rb") as fh:
            # The file was written by a worker of this queue into its private (0700) folder.
            result: ParseResult = pickle.load(fh)  # noqa: S301
        return result

    def remove_result(self, name: str) -> None:
        try:
            path = self.result_path(name)
        except ValueError:
            return
        path.unlink(missing_ok=True)

    # -- sweeping ------------------------------------------------------------------------------

    def sweep(self, rows: Mapping[str, LiveRow], *, now: float | None = None) -> None:
        """Delete files no task row explains (a crash between writing a file and committing)."""
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
        raise ValueError(f"{value!r} is not a task id or lease token of this queue")


def write_file(path: Path, data: bytes, *, move: bool = True, sync: bool = True) -> None:
    """Write ``data``: to a temporary name, fsync (when ``sync``), rename (when ``move``)."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}") if move else path
    with open(tmp, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    if move:
        os.replace(tmp, path)
