"""The operating-system layer for processes: children, process groups, ports, logs.

Every subprocess this library starts (isolated workers, engine servers, the
stand-in) goes through this module, so each subtle kernel behaviour is handled
and explained once (private files and owner-alive locks: :mod:`._files`). Linux
is the platform that matters (NVML per-process figures, process groups,
``PR_SET_PDEATHSIG``); elsewhere each primitive degrades to what the platform
has, and says so in its docstring.

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._files import open_private

__all__ = [
    "ProcessGroup",
    "command_exitcode",
    "free_port",
    "kill_group",
    "listening_pids",
    "log_tail",
    "port_free",
    "python_command",
    "signal_name",
    "spawn",
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
