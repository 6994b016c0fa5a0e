"""The parent's handle on one worker process: start it, talk to it, stop it.

A worker is started by :meth:`WorkerHandle.spawn` under the keeper of
:func:`mineru_vram._process.spawn` (its own process group, killed when this
process dies, even by ``SIGKILL``), as an isolated Python
(:func:`mineru_vram._process.python_command`) whose working folder is the
runner's private folder. It then waits for its settings
(:class:`~mineru_vram._worker.protocol.Init`), so a handle can be made ahead of the
session that will use it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mineru_vram import _process
from mineru_vram._config import child_environ
from mineru_vram._exceptions import WorkerStartError
from mineru_vram._probe import MIB

from . import protocol

__all__ = ["WorkerDied", "WorkerHandle", "WorkerTimedOut", "last_lines"]

logger = logging.getLogger("mineru_vram")

# The module the worker runs (``child.py``).
CHILD_MODULE = "mineru_vram._worker.child"
LOG_TAIL_CHARS = 8000
# Longest wait for the keeper to have started the worker's interpreter (it takes
# milliseconds; the bound only matters on a machine that is stalled).
COMMAND_PID_TIMEOUT = 30.0
# How often a wait for a message looks at the process too (a pipe held open by a
# grandchild would hide the worker's end).
POLL_SECONDS = 0.25


class WorkerDied(Exception):
    """Internal: the worker process ended while the parent waited for it."""


class WorkerTimedOut(Exception):
    """Internal: the worker did not answer within the deadline."""


class WorkerOverMemory(Exception):
    """Internal: the worker's process tree held more host memory than its bound; ``mib`` says how much."""

    def __init__(self, mib: float) -> None:
        super().__init__(f"{mib:.0f} MiB")
        self.mib = mib


class WorkerHandle:
    """One worker process, its pipe and its log.

    Attributes:
        pid: the worker's own pid (the keeper's child), which NVML lists.
        group: its process group, led by the keeper.
        number: its place among the runner's workers (1, 2, ...), in its log's name.
        documents: documents it parsed.
        first: its memory sample after its first document (the reference for recycling).
        ready: its :class:`~mineru_vram._worker.protocol.Ready` message, once loaded.
        end: why it ended, once it has.
    """

    def __init__(self, group: _process.ProcessGroup, conn: Connection, pid: int, number: int) -> None:
        self.group = group
        self.conn = conn
        self.pid = pid
        self.number = number
        self.log_path = group.log_path
        self.started = time.monotonic()
        self.documents = 0
        self.first: dict[str, Any] | None = None
        self.ready: protocol.Ready | None = None
        self.end: str | None = None

    @classmethod
    def spawn(cls, folder: Path, number: int) -> WorkerHandle:
        """Start a worker whose files (log, temporary files, payloads) live in ``folder``.

        Raises:
            WorkerStartError: the process could not be started.
        """
        log_path = folder / f"worker-{number}.log"
        parent_sock, child_sock = socket.socketpair()
        fd = child_sock.fileno()
        # PYTHONUNBUFFERED for anything the worker starts; the worker itself runs with -I and
        # sets its own streams. TMPDIR: MinerU's home and whatever its libraries write go into
        # the runner's folder, which close removes even after a crash.
        env = child_environ({"PYTHONUNBUFFERED": "1", "TMPDIR": str(folder)})
        try:
            group = _process.spawn(
                _process.python_command(CHILD_MODULE, str(fd)), env=env, log_path=log_path, cwd=folder, pass_fds=(fd,)
            )
        except OSError as exc:
            parent_sock.close()
            raise WorkerStartError(f"could not start the worker process: {exc}") from exc
        finally:
            child_sock.close()
        conn = Connection(parent_sock.detach())
        pid = _command_pid(group)
        if pid is None:
            code = _process.command_exitcode(group.kill())
            conn.close()
            tail = group.log_tail(LOG_TAIL_CHARS)
            raise WorkerStartError(
                f"the worker's interpreter did not start (keeper pid {group.pid}, exit code {code}, "
                f"within {COMMAND_PID_TIMEOUT}s); last lines of its log:\n{last_lines(tail)}",
                pid=group.pid,
                exitcode=code,
                log_tail=tail,
            )
        return cls(group, conn, pid, number)

    def __repr__(self) -> str:
        return f"WorkerHandle(pid={self.pid}, number={self.number}, documents={self.documents}, end={self.end!r})"

    def alive(self) -> bool:
        """Whether the worker still runs, without reaping it.

        The keeper exits right after the worker; an exited but unreaped keeper keeps
        the group's id reserved, so a group kill that follows reaches no stranger.
        """
        return self.group.alive()

    def exitcode(self) -> int | None:
        """The worker's exit code once reaped (``-N`` for signal ``N``), else ``None``."""
        return _process.command_exitcode(self.group.popen.returncode)

    def idle_and_alive(self) -> bool:
        """Alive, with nothing unread on the pipe.

        An idle worker sends nothing, so a readable pipe means EOF: the worker is
        exiting, even if the kernel cannot report its exit status yet.
        """
        try:
            return self.alive() and not self.conn.poll(0)
        except (OSError, EOFError):
            return False

    def send(self, message: protocol.ToChild) -> None:
        try:
            self.conn.send(message)
        except (OSError, EOFError, ValueError) as exc:
            raise WorkerDied(str(exc)) from None

    def tree_rss_mib(self) -> float:
        """Host memory (RSS) of the worker and every process it started (MinerU's render workers)."""
        import psutil

        total = 0
        try:
            root = psutil.Process(self.pid)
            for proc in (root, *root.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        except psutil.Error:
            return 0.0
        return total / MIB

    def receive(self, timeout: float | None, *, memory_limit_mib: float | None = None) -> protocol.ToParent:
        """Wait for the next message, noticing death, the deadline and the memory bound.

        Raises:
            WorkerDied: the process ended (or closed its end of the pipe).
            WorkerTimedOut: no message before ``timeout`` seconds.
            WorkerOverMemory: the worker's process tree went over ``memory_limit_mib``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))
            try:
                if self.conn.poll(wait):
                    return self.conn.recv()  # type: ignore[no-any-return]
            except (OSError, EOFError) as exc:
                raise WorkerDied(str(exc)) from None
            if not self.alive():
                raise WorkerDied("the worker exited")
            if deadline is not None and time.monotonic() >= deadline:
                raise WorkerTimedOut
            if memory_limit_mib is not None:
                held = self.tree_rss_mib()
                if held > memory_limit_mib:
                    raise WorkerOverMemory(held)

    def request(
        self, message: protocol.ToChild, timeout: float | None, *, memory_limit_mib: float | None = None
    ) -> protocol.ToParent:
        self.send(message)
        return self.receive(timeout, memory_limit_mib=memory_limit_mib)

    def kill(self, wait: float = 5.0) -> int | None:
        """``SIGKILL`` the worker's whole process group and reap it. Returns the worker's exit code."""
        try:
            self.group.kill(wait=wait)
        finally:
            with contextlib.suppress(OSError):
                self.conn.close()
        return self.exitcode()

    def stop(self, grace: float) -> int | None:
        """Wait up to ``grace`` seconds for an exit already requested, then kill the group."""
        deadline = time.monotonic() + max(0.0, grace)
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.alive():
            logger.warning("worker pid %d did not exit within %.1fs; killing its process group", self.pid, grace)
        # Kill the group even after a clean exit: anything the worker started goes with it.
        return self.kill()

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.group.log_tail(chars)

    def summary(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "documents": self.documents,
            "seconds_alive": round(time.monotonic() - self.started, 3),
            "exitcode": self.exitcode(),
            "end": self.end,
        }


def _command_pid(group: _process.ProcessGroup) -> int | None:
    """The worker's pid once the keeper started it; ``None`` if the keeper ended first."""
    deadline = time.monotonic() + COMMAND_PID_TIMEOUT
    while True:
        pid = group.command_pid()
        if pid is not None or not group.alive() or time.monotonic() >= deadline:
            return pid
        time.sleep(0.005)


def last_lines(text: str, n: int = 15) -> str:
    """The last ``n`` lines of a log, indented for an error message."""
    lines = text.rstrip().splitlines()[-n:]
    return "\n".join("    " + line for line in lines) if lines else "    (the log is empty)"
