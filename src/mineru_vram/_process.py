"""The operating-system layer: child processes, process groups, owner locks, private folders.

Every subprocess this library starts (isolated workers, engine servers, the
stand-in) and every file that must be private or must mark a live owner goes
through this module, so each subtle kernel behaviour is handled and explained
once. Linux is the platform that matters (NVML per-process figures, process
groups, ``PR_SET_PDEATHSIG``); elsewhere each primitive degrades to what the
platform has, and says so in its docstring.

**How a child dies with its parent.** One mechanism for every child: the
*keeper*. :func:`spawn` starts a small Python program (``_KEEPER``, the standard
library only, started with ``-I``) that leads a new session and process group,
starts the real command inside that group, and kills the whole group when the
parent dies, even by ``SIGKILL``:

* ``PR_SET_PDEATHSIG`` asks the kernel for ``SIGTERM`` when the parent dies. The
  signal fires when the *thread* that started the keeper exits, not the process
  (prctl(2)); sessions may be opened from executor threads that end first, so on
  that signal the keeper checks that its parent process is really gone before it
  acts.
* Because the signal fires at most once, the keeper also polls its parent's pid
  (every 0.25 s). Either way, the group is killed with ``SIGKILL``.

The command itself needs no code of ours, so the same mechanism serves a worker
written in Python, ``llama-server`` and ``sglang``. Closing the parent's ends of
pipes is not a substitute: a grandchild can hold them open.

**Which Python our own children run.** :func:`python_command` starts the
interpreter with ``-I`` (no ``PYTHON*`` variables, no user site, and neither the
current directory nor the script's folder on ``sys.path``) and hands it this
process's import path explicitly, minus the current directory. A ``json.py`` in
the folder a user ran us from cannot run inside our children.

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
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from ._exceptions import InsecurePathError

__all__ = [
    "OWNER_LOCK_NAME",
    "OwnerLock",
    "ProcessGroup",
    "check_private",
    "command_exitcode",
    "exclusive",
    "free_port",
    "kill_group",
    "listening_pids",
    "log_tail",
    "open_private",
    "owned_temp_dir",
    "owner_alive",
    "port_free",
    "private_dir",
    "private_file",
    "python_command",
    "signal_name",
    "spawn",
    "sweep_dead_owners",
    "trim_log",
]

logger = logging.getLogger("mineru_vram")

# How often the keeper checks that its parent is still there.
KEEPER_POLL_SECONDS = 0.25

# The keeper: leader of the command's process group (see the module docstring). Standard
# library only, run with ``-I``: it must start fast and import nothing from the caller's folder.
_KEEPER = r"""
import os, signal, subprocess, sys
parent = int(sys.argv[1])
pass_fds = tuple(int(f) for f in sys.argv[2].split(',') if f)
argv = sys.argv[3:]

def others():
    me, group, out = os.getpid(), os.getpgid(0), []
    try:
        names = os.listdir('/proc')
    except OSError:  # no /proc: the parent's kill of the group still reaches everyone
        names = []
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open('/proc/%s/stat' % name, 'rb') as fh:
                stat = fh.read()
            if int(stat[stat.rindex(b')') + 2:].split()[2]) == group:
                out.append(int(name))
        except (OSError, ValueError, IndexError):
            pass
    return out

def kill_others():
    for pid in others():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

def orphaned():
    return os.getppid() != parent

def on_term(signum, frame):
    if orphaned():
        kill_others()
        os._exit(128 + signum)
    # Otherwise the parent signalled the group on purpose (the command exits and the keeper
    # follows it), or the thread that started us exited while the parent process lives on.

signal.signal(signal.SIGTERM, on_term)
try:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
if orphaned():
    sys.exit(137)
try:
    child = subprocess.Popen(argv, pass_fds=pass_fds)
except OSError as exc:
    sys.stderr.write('mineru-vram keeper: cannot start %r: %s\n' % (argv[0], exc))
    sys.exit(127)
for fd in pass_fds:
    os.close(fd)
while True:
    try:
        code = child.wait(timeout=%(poll)s)
        break
    except subprocess.TimeoutExpired:
        if orphaned():
            kill_others()
            os._exit(137)
kill_others()
sys.exit(code if code >= 0 else 128 - code)
""".replace("%(poll)s", repr(KEEPER_POLL_SECONDS))


# --- starting Python children -------------------------------------------------------------------


def child_sys_path() -> list[str]:
    """This process's import path for a child, without the current directory.

    ``""`` and ``"."`` (the current directory) are dropped, as is the folder this
    process was started from when it is the current directory: only folders the
    parent imports from on purpose travel.
    """
    cwd = os.getcwd()
    out: list[str] = []
    for entry in sys.path:
        if entry in ("", ".") or os.path.abspath(entry) == cwd:
            continue
        if entry not in out:
            out.append(entry)
    # The folder this package is imported from comes first, so the child runs the same code.
    here = str(Path(__file__).resolve().parents[1])
    return [here, *(p for p in out if p != here)]


# Run first in every Python child of ours: take the parent's import path (as multiprocessing's
# spawn does), then run the named module as __main__ (or, after "-c", the given code). Only
# ``sys`` is imported before the path is set, and with -I nothing comes from the current directory.
_BOOTSTRAP = (
    "import sys\n"
    "sys.path[:] = [p for p in __import__('json').loads(sys.argv[1]) if p] + sys.path\n"
    "target = sys.argv[2]\n"
    "if target == '-c':\n"
    "    code = sys.argv[3]\n"
    "    sys.argv = ['-c', *sys.argv[4:]]\n"
    "    exec(compile(code, '<mineru-vram child>', 'exec'), {'__name__': '__main__'})\n"
    "else:\n"
    "    sys.argv = [target, *sys.argv[3:]]\n"
    "    __import__('runpy').run_module(target, run_name='__main__', alter_sys=True)\n"
)


def python_command(module: str, *args: str) -> list[str]:
    """The command line that runs ``python -m module args...`` isolated from the current folder.

    Args:
        module: a module of this package or of the parent's import path
            (``mineru_vram.testing._standin``), or ``"-c"`` followed by code in ``args[0]``.
        args: its arguments.
    """
    return [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(child_sys_path()), module, *args]


# --- process groups -----------------------------------------------------------------------------


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group ``pgid``; a group that is gone is not an error."""
    killpg = getattr(os, "killpg", None)
    try:
        if killpg is not None:
            killpg(pgid, sig)
        else:  # pragma: no cover - platforms without process groups
            os.kill(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_name(exitcode: int | None) -> str | None:
    """``"SIGKILL"`` for an exit code of ``-9`` or ``137``, ``None`` for a normal exit."""
    if exitcode is None:
        return None
    number = -exitcode if exitcode < 0 else exitcode - 128 if exitcode > 128 else 0
    if number <= 0:
        return None
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def command_exitcode(code: int | None) -> int | None:
    """The command's exit code as :mod:`subprocess` gives it (``-N`` for signal ``N``), from its keeper's.

    The keeper exits ``128 + N`` when signal ``N`` killed its command, and shows ``-9`` when its group was.
    """
    if code is not None and code > 128:
        return 128 - code
    return code


class ProcessGroup:
    """A command running under the keeper, which leads the command's own process group.

    Attributes:
        pid: the keeper's pid, which is also the process group's id.
        log_path: where the command's stdout and stderr go (``None``: inherited).
        popen: the keeper's :class:`subprocess.Popen`.
    """

    def __init__(self, popen: subprocess.Popen[bytes], log_path: Path | None) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.pgid = popen.pid
        self.log_path = log_path

    def __repr__(self) -> str:
        return f"ProcessGroup(pid={self.pid}, returncode={self.popen.returncode})"

    def poll(self) -> int | None:
        """The exit code once the command (and so the keeper) has exited, else ``None``. Reaps."""
        return self.popen.poll()

    def alive(self) -> bool:
        """Whether the keeper still runs, without reaping it.

        An exited but unreaped keeper keeps the group's id reserved, so a group kill
        that follows cannot reach an unrelated process that reused the id.
        """
        if self.popen.returncode is not None:
            return False
        waitid = getattr(os, "waitid", None)
        if waitid is None:  # pragma: no cover - platforms without waitid
            return self.popen.poll() is None
        try:
            return waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        except ChildProcessError:  # reaped elsewhere
            return self.popen.poll() is None

    def command_pid(self, timeout: float = 0.0) -> int | None:
        """The command's own pid (the keeper's child), while it runs.

        Args:
            timeout: how long to wait for the keeper to have started it.
        """
        import psutil

        deadline = time.monotonic() + timeout
        while True:
            try:
                children = psutil.Process(self.pid).children()
            except psutil.Error:
                return None
            if children:
                return int(children[0].pid)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def pids(self) -> list[int]:
        """The keeper and every live descendant (also those that left the group)."""
        import psutil

        try:
            root = psutil.Process(self.pid)
            return [self.pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.Error:
            return []

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the keeper to exit; ``None`` if it is still running after ``timeout``."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self, *, wait: float = 10.0) -> int | None:
        """``SIGKILL`` the whole group and every descendant, and reap the keeper."""
        return self.terminate(grace=0.0, wait=wait)

    def terminate(self, *, grace: float = 10.0, wait: float = 10.0) -> int | None:
        """``SIGTERM`` the group, ``SIGKILL`` it after ``grace`` seconds, and reap.

        Descendants that left the group (a server that called ``setsid``) are killed
        too. Returns the keeper's exit code (``None`` if it survived ``SIGKILL``,
        which only a process stuck in the kernel does).
        """
        import psutil

        procs: list[psutil.Process] = []
        for pid in self.pids():
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
        if grace > 0 and self.alive():
            kill_group(self.pgid, signal.SIGTERM)
            self.wait(grace)
        # Kill the group even after a clean exit: anything the command started goes with it.
        kill_group(self.pgid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        code = self.wait(wait)
        if code is None:  # pragma: no cover - a process that survives SIGKILL
            logger.error("process group %s did not exit after SIGKILL", self.pgid)
        psutil.wait_procs(procs, timeout=min(wait, 5.0))
        return code

    def log_tail(self, chars: int = 8000) -> str:
        """The end of the command's log ("" when there is none)."""
        return "" if self.log_path is None else log_tail(self.log_path, chars)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path | None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> ProcessGroup:
    """Start ``argv`` under the keeper, in a new session and process group.

    The child dies with this process (see the module docstring); stdin is closed;
    stdout and stderr are appended to ``log_path``.

    Args:
        argv: the command.
        env: its whole environment.
        log_path: its log (created ``0600``), or ``None`` to inherit this process's streams.
        cwd: its working folder. Give a private one: ``python -m`` and many servers
            import from their working folder.
        pass_fds: descriptors the command inherits (a socket for its parent's pipe).

    Raises:
        OSError: the keeper could not be started.
    """
    keeper = [sys.executable, "-I", "-c", _KEEPER, str(os.getpid()), ",".join(str(f) for f in pass_fds), *argv]
    log = None if log_path is None else open_private(log_path, "ab")
    try:
        popen = subprocess.Popen(
            keeper,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT if log is not None else None,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            pass_fds=tuple(pass_fds),
        )
    finally:
        if log is not None:
            log.close()  # the keeper has its own copy
    return ProcessGroup(popen, log_path)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago.

    Another local user can bind it before the server we start does: a server
    started on it must prove it is ours (see :func:`listening_pids`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now (no one listens on it).

    ``SO_REUSEADDR`` lets a port in ``TIME_WAIT`` count as free, as it does for the
    servers we start on it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def listening_pids(port: int, host: str = "127.0.0.1") -> set[int] | None:
    """The pids of this user's processes with a socket listening on ``host:port``.

    Read from ``/proc/net/tcp`` (the socket's inode) and ``/proc/<pid>/fd`` (who
    holds that inode). Only this user's processes can be looked into, which is what
    is wanted: a socket held by another user's process is never reported as ours.

    Returns:
        The pids (empty when the listener is not one of ours), or ``None`` where
        ``/proc`` cannot tell (not Linux).
    """
    wanted = _listening_inodes(port, host)
    if wanted is None:
        return None
    if not wanted:
        return set()
    found: set[int] = set()
    uid = os.getuid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{name}/fd/{fd}") in wanted:
                        found.add(int(name))
                        break
        except OSError:
            continue
    return found


def _listening_inodes(port: int, host: str) -> set[str] | None:
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return None
    # /proc/net/tcp writes the address as the little-endian hex of the 32-bit value.
    local = "%08X:%04X" % (int.from_bytes(packed, "little"), port)  # noqa: UP031 - fixed-width hex
    wildcard = "00000000:%04X" % port  # noqa: UP031
    try:
        with open("/proc/net/tcp", encoding="ascii") as fh:
            lines = fh.read().splitlines()[1:]
    except OSError:
        return None
    inodes: set[str] = set()
    for line in lines:
        fields = line.split()
        # fields: sl, local_address, rem_address, st (0A = LISTEN), ..., inode at 9
        if len(fields) > 9 and fields[3] == "0A" and fields[1] in (local, wildcard):
            inodes.add(f"socket:[{fields[9]}]")
    return inodes


# --- logs -----------------------------------------------------------------------------------------


def log_tail(path: str | os.PathLike[str], chars: int = 8000) -> str:
    """The last ``chars`` characters of a log file ("" when it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars * 4))  # up to 4 bytes a character in UTF-8
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def trim_log(path: str | os.PathLike[str], limit: int, keep_chars: int = 64_000) -> None:
    """Cut a log that grew past ``limit`` bytes back to its last ``keep_chars`` characters.

    Safe while its writer is idle and writes with ``O_APPEND`` (its next line lands
    after the kept tail).
    """
    try:
        if os.stat(path).st_size <= limit:
            return
        tail = log_tail(path, keep_chars).encode("utf-8", errors="replace")
        with open(path, "r+b") as fh:
            fh.truncate(0)
            fh.write(b"[... earlier log cut by mineru-vram ...]\n" + tail)
    except OSError:
        pass


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


def sweep_dead_owners(base: str | os.PathLike[str] | None, prefix: str) -> list[Path]:
    """Remove this user's folders ``<base>/<prefix>*`` whose owner died (see :func:`owned_temp_dir`); returns them.

    A lock file that can be taken marks a dead owner (:class:`OwnerLock` puts it in place locked).
    Kept: folders without a lock file (the owner may be about to lock it), others' folders, links.
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
        if owner_alive(entry / OWNER_LOCK_NAME) is False:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
