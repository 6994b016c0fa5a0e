"""Files and locks: private folders and files, owner-alive locks, exclusive locks, owned temporary folders.

Every file that must be private or must mark a live owner goes through this module,
so each subtle kernel behaviour is handled and explained once.

**Owner-alive locks.** :class:`OwnerLock` holds an exclusive ``flock`` on a file
for its owner's life. The kernel drops the lock when the last descriptor closes,
so also when the owner dies by ``SIGKILL``: a lock that another process *can*
take marks a dead owner. This works across PID namespaces, where pids do not.
A lock file is locked before it is renamed into place, so no one sees it
unlocked while its owner lives.

**Private folders.** :func:`private_dir` creates a folder ``0700`` or, when it
exists, proves it is ours and that no one else can write to it, and refuses it
otherwise (:class:`~mineru_vram.InsecurePathError`). Anything a later read
trusts (a ledger entry, a queue payload, a worker's files) lives in such a folder.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from ._exceptions import InsecurePathError

__all__ = [
    "OWNER_LOCK_NAME",
    "OwnerLock",
    "check_private",
    "exclusive",
    "open_private",
    "owned_temp_dir",
    "owner_alive",
    "private_dir",
    "private_file",
    "sweep_dead_owners",
]


# --- private files and folders --------------------------------------------------------------------


def private_dir(
    path: str | os.PathLike[str], *, create: bool = True, within: str | os.PathLike[str] | None = None
) -> Path:
    """A folder only this user can write to: created ``0700``, or checked when it exists.

    A folder another local user created first (a predictable name in ``/tmp``) or
    can write to (mode ``0777``) is refused, never adopted: they could swap what we
    later read there. The same holds for every folder between ``within`` and
    ``path``: whoever owns a parent can rename what is in it.

    Args:
        path: the folder.
        create: create it (and missing parents, ``0700``) when absent.
        within: the outermost folder of ours on the way to ``path`` (default: ``path``
            alone is checked). Folders above it (``/tmp``) are not ours to judge.

    Raises:
        InsecurePathError: the folder (or one between ``within`` and it) is not ours,
            is a symbolic link, or others can write to it.
    """
    folder = Path(path)
    chain = [folder]
    if within is not None:
        top = Path(within)
        try:
            rel = folder.relative_to(top)
        except ValueError:
            raise ValueError(f"{folder} is not inside {top}") from None
        chain = [top]
        for part in rel.parts:
            chain.append(chain[-1] / part)
    for one in chain:
        _private_one(one, create=create)
    return folder


def _private_one(folder: Path, *, create: bool) -> None:
    if create:
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            pass  # a file or a dangling link with that name: reported below
        except PermissionError as exc:
            raise InsecurePathError(
                f"{folder}: cannot create this folder ({exc.strerror}); choose another runtime folder",
                path=str(folder),
            ) from None
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        raise InsecurePathError(f"{folder}: the folder does not exist", path=str(folder)) from None
    problem = _ownership_problem(info, want_dir=True)
    if problem:
        raise InsecurePathError(
            f"{folder}: refusing to use this folder: {problem}. Another local user may have created it; "
            "remove it or choose another folder (MINERU_VRAM_RUNTIME_DIR).",
            path=str(folder),
        )


def check_private(path: str | os.PathLike[str], *, folder: bool = False) -> bool:
    """Whether ``path`` exists, having checked that an existing one is safe to trust.

    Nothing is opened (closing a descriptor would drop this process's ``fcntl`` locks
    on the file, which SQLite relies on).

    Args:
        path: the file (or folder, with ``folder=True``).
        folder: whether a folder is expected.

    Raises:
        InsecurePathError: it exists but is a symbolic link, of the wrong kind, not
            ours, or others can write to it.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    problem = _ownership_problem(info, want_dir=folder)
    if problem:
        kind = "folder" if folder else "file"
        raise InsecurePathError(f"{path}: refusing to use this {kind}: {problem}", path=str(path))
    return True


def _ownership_problem(info: os.stat_result, *, want_dir: bool) -> str | None:
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if want_dir and not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if not want_dir and not stat.S_ISREG(info.st_mode):
        return "it is not a regular file"
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and info.st_uid != uid:
        return f"it belongs to uid {info.st_uid}, not to this user (uid {uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"others can write to it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def open_private(path: str | os.PathLike[str], mode: str = "rb") -> IO[bytes]:
    """Open a file ``0600``, never through a symbolic link, refusing one that is not ours.

    Modes: ``"rb"``, ``"wb"`` (truncate or create), ``"ab"``, ``"xb"`` (create, fail if
    it exists), ``"r+b"`` and ``"a+b"``. The caller closes the file (or uses
    :func:`private_file`).

    Raises:
        InsecurePathError: the path is a symbolic link, not a regular file, or not ours.
        OSError: the usual reasons (``FileNotFoundError`` for ``"rb"`` of a missing file).
    """
    flags = {
        "rb": os.O_RDONLY,
        "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL,
        "r+b": os.O_RDWR,
        "a+b": os.O_RDWR | os.O_CREAT | os.O_APPEND,
    }[mode]
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InsecurePathError(f"{path}: refusing to open a symbolic link", path=str(path)) from None
        raise
    try:
        problem = _ownership_problem(os.fstat(fd), want_dir=False)
        if problem:
            raise InsecurePathError(f"{path}: refusing to use this file: {problem}", path=str(path))
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def private_file(path: str | os.PathLike[str], mode: str = "rb") -> Iterator[IO[bytes]]:
    """:func:`open_private` as a context manager that closes the file."""
    with open_private(path, mode) as fh:
        yield fh


# --- locks ----------------------------------------------------------------------------------------


def _fcntl() -> Any:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: locks are no-ops, documented per caller
        return None
    return fcntl


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str], *, timeout: float | None = 600.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created ``0600``) across processes and threads.

    ``flock`` belongs to an open file description, so two threads of one process
    that each open the file exclude each other too; a per-path thread lock keeps
    them from spinning on it.

    Args:
        path: the lock file.
        timeout: seconds to wait for it (``None``: for ever).

    Raises:
        TimeoutError: the lock was not free within ``timeout``; the message names the file.
    """
    key = os.path.abspath(path)
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(key, threading.Lock())
    deadline = None if timeout is None else time.monotonic() + timeout
    if not tlock.acquire(timeout=-1 if timeout is None else timeout):
        raise TimeoutError(f"{path}: lock not free after {timeout} s")
    try:
        fcntl = _fcntl()
        with private_file(path, "a+b") as fh:
            if fcntl is not None:
                while True:
                    try:
                        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError(
                                f"{path}: lock held by another process for more than {timeout} s"
                            ) from None
                        time.sleep(0.01)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        tlock.release()


class OwnerLock:
    """A file locked for its owner's whole life; others read a lock they can take as a dead owner.

    Example::

        lock = OwnerLock(folder / "worker-1.lock").acquire()
        ...
        lock.release()

    The file is written (with ``content``), locked, then renamed into place, so it
    is never visible unlocked while the owner lives.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fh: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self, content: bytes = b"") -> OwnerLock:
        """Create and lock the file. Returns ``self``.

        Raises:
            OSError: the folder cannot be written.
        """
        if self._fh is not None:
            return self
        tmp = self.path.with_name(f".tmp-{self.path.name}-{os.getpid()}-{threading.get_ident()}")
        fh = open_private(tmp, "wb")  # kept open (and so locked) for the owner's life
        try:
            fcntl = _fcntl()
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fh.write(content)
            fh.flush()
            os.replace(tmp, self.path)
        except BaseException:
            fh.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fh = fh
        return self

    def rewrite(self, content: bytes) -> None:
        """Replace the file's content in place; the lock stays on the same file.

        Raises:
            RuntimeError: the lock is not held.
        """
        fh = self._fh
        if fh is None:
            raise RuntimeError(f"{self.path}: the owner lock is not held")
        fh.seek(0)
        fh.truncate()
        fh.write(content)
        fh.flush()

    def release(self, *, remove: bool = True) -> None:
        """Drop the lock (and the file, unless ``remove=False``). Idempotent."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        if remove:
            with contextlib.suppress(OSError):
                self.path.unlink()
        fh.close()

    def __enter__(self) -> OwnerLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def owner_alive(path: str | os.PathLike[str], *, remove_if_dead: bool = False) -> bool | None:
    """Whether the owner of the lock file at ``path`` still lives.

    Returns:
        ``True`` while someone holds the lock, ``False`` when it can be taken (the
        owner died; the file is removed when ``remove_if_dead``), ``None`` when the
        file is missing or cannot be read (nothing can be said).
    """
    fcntl = _fcntl()
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        if remove_if_dead:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return False
    finally:
        os.close(fd)


# The owner lock inside a folder made by :func:`owned_temp_dir`.
OWNER_LOCK_NAME = ".owner.lock"


def owned_temp_dir(prefix: str, base: str | os.PathLike[str] | None = None) -> tuple[Path, OwnerLock]:
    """A new folder ``<base>/<prefix><random>`` (``0700``, ``mkdtemp``) holding its owner's lock.

    While the lock is held :func:`sweep_dead_owners` leaves the folder alone; once its owner
    died without removing it (``SIGKILL``), the next sweep removes it. ``base``: default the
    system's temporary folder.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        lock = OwnerLock(folder / OWNER_LOCK_NAME).acquire()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, lock


def sweep_dead_owners(
    base: str | os.PathLike[str] | None, prefix: str, *, lock_name: str = OWNER_LOCK_NAME
) -> list[Path]:
    """Remove this user's folders ``<base>/<prefix>*`` whose owner died (see :func:`owned_temp_dir`); returns them.

    A lock file (``lock_name`` in the folder) that can be taken marks a dead owner (:class:`OwnerLock`
    puts it in place locked). Kept: folders without a lock file (the owner may be about to lock it),
    others' folders, links.
    """
    root = Path(base if base is not None else tempfile.gettempdir())
    try:
        entries = sorted(root.glob(f"{prefix}*"))
    except OSError:
        return []
    uid = os.getuid() if hasattr(os, "getuid") else None
    removed: list[Path] = []
    for entry in entries:
        try:
            info = os.lstat(entry)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or (uid is not None and info.st_uid != uid):
            continue
        if owner_alive(entry / lock_name) is False:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
