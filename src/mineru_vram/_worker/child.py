"""The worker's side: one :class:`~mineru_vram._inprocess.InProcessRunner`, driven by messages.

Started by the runner as the equivalent of ``python -I -m mineru_vram._worker.child <fd>``
(:func:`mineru_vram._process.python_command`, under the keeper of
:func:`mineru_vram._process.spawn`, which kills it when the parent dies), with its
end of the socketpair as descriptor ``fd``. It waits for
:class:`~mineru_vram._worker.protocol.Init`, loads the models, says
:class:`~mineru_vram._worker.protocol.Ready` and then answers requests until
:class:`~mineru_vram._worker.protocol.Exit` or the end of the pipe.

Nothing here imports the parent's side (``runner.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import sys
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn

from mineru_vram._exceptions import MineruVramError, ParseError, WorkerStartError
from mineru_vram._inprocess import InProcessRunner, SessionSettings
from mineru_vram._probe import MIB, vram_snapshot
from mineru_vram._release import malloc_trim

from . import protocol

__all__ = ["WorkerLoop", "malloc_trim", "worker_main"]


class WorkerLoop:
    """One :class:`InProcessRunner` in this process, driven by the parent's messages."""

    def __init__(self, conn: Connection, init: protocol.Init, *, prepared: bool = False) -> None:
        self.conn = conn
        self.settings: SessionSettings = init.settings
        self.folder = Path(init.folder)
        self.inline_limit = init.inline_limit
        self.runner = InProcessRunner(self.settings)
        # A spare built the models on the CPU: the runner may move them to its device.
        self.runner.retarget_from_cpu = prepared
        self._ballast: list[Any] = []  # test hook: memory held on purpose

    def stats(self, seconds: float | None = None) -> protocol.Stats:
        snap = vram_snapshot(self.settings.device)
        device_mib = snap.process_mib
        if not device_mib and snap.torch_reserved_mib:
            # NVML hides pids in some containers (PID namespaces): fall back to torch's view.
            device_mib = snap.torch_reserved_mib
        return protocol.Stats(
            rss_mib=snap.rss_mib,
            device_mib=device_mib,
            torch_reserved_mib=snap.torch_reserved_mib,
            seconds=seconds,
            snapshot=snap,
        )

    def _send_error(
        self,
        exc: BaseException,
        document: str | None,
        seconds: float | None,
        *,
        tb_source: BaseException | None = None,
    ) -> None:
        src = exc if tb_source is None else tb_source
        tb_text = "".join(traceback.format_exception(type(src), src, src.__traceback__))
        del src, tb_source
        portable = protocol.portable_error(exc, document)
        del exc
        malloc_trim()
        self.conn.send(protocol.Error(error=portable, traceback=tb_text, stats=self.stats(seconds)))

    def serve(self) -> int:
        """Load the models, say Ready, answer requests. Returns the exit code."""
        try:
            self.runner.open()
        except MineruVramError as exc:
            self._send_error(exc, None, None)
            return 1
        except Exception as exc:
            # MinerU's own errors while loading (a missing model file...) do not pickle
            # reliably; the parent turns this into a WorkerStartError with the log tail.
            self._send_error(WorkerStartError(f"{type(exc).__name__}: {exc}"), None, None, tb_source=exc)
            return 1
        self.conn.send(protocol.Ready(pid=os.getpid(), stats=self.stats()))
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                return 0  # the parent is gone or closed the pipe
            if isinstance(message, protocol.Parse):
                self._parse(message)
            elif isinstance(message, protocol.Exit):
                runtime = self.runner.runtime
                models = len(runtime.owned_keys()) + len(runtime.owned_vlm_keys())
                self.conn.send(protocol.Bye(models=models, stats=self.stats()))
                return 0
            elif isinstance(message, protocol.Debug):
                self._debug(message)
            else:  # pragma: no cover - a protocol bug
                error = ParseError(f"unexpected message {type(message).__name__}", document="<worker>")
                self._send_error(error, None, None)

    def _parse(self, message: protocol.Parse) -> None:
        t0 = time.perf_counter()
        name = message.document.name
        try:
            doc = message.document.load()
            result = self.runner.parse(doc, message.options)
            del doc
        except Exception as exc:
            self._send_error(exc, name, time.perf_counter() - t0)
            return
        payload = protocol.pack(result, self.folder, protocol.next_stem("result"), self.inline_limit)
        del result
        malloc_trim()
        self.conn.send(protocol.Result(payload=payload, stats=self.stats(time.perf_counter() - t0)))

    def _debug(self, message: protocol.Debug) -> None:
        try:
            if message.command == "allocate_mib":
                mib, on_device = message.args
                self._ballast.append(_allocate(mib, on_device, self.settings.device))
                self.conn.send(protocol.DebugReply(value=self.stats()))
            elif message.command == "raise":
                raise message.args[0]
            else:
                raise ParseError(f"unknown debug command {message.command!r}", document="<debug>")
        except Exception as exc:
            self._send_error(exc, None, None)


def _allocate(mib: float, on_device: bool, device: str) -> Any:
    size = int(mib * MIB)
    if on_device and device.startswith("cuda"):
        import torch

        return torch.ones(size // 4, dtype=torch.float32, device=device)
    block = bytearray(size)
    # Touch every page, so the allocation is resident (calloc'd pages are not, until written).
    block[:: mmap.PAGESIZE] = b"\x01" * len(range(0, size, mmap.PAGESIZE))
    return block


def prepare(conn: Connection, message: protocol.Prepare) -> bool:
    """As a spare: build the models on the CPU, keep them in this process's warm cache, say Prepared.

    Returns:
        Whether it worked (else an :class:`~mineru_vram._worker.protocol.Error` was sent).
    """
    from mineru_vram._warm import warm_cache

    # MinerU's in-process VLM engine (llama.cpp) is not built here: it cannot move to another device
    # and MinerU's cache key does not name one, so the session that takes the spare loads it.
    backend = dataclasses.replace(message.settings.backend, local_engine=None)
    settings = dataclasses.replace(message.settings, device="cpu", keep_warm=False, backend=backend)
    runner = InProcessRunner(settings)
    try:
        runner.open()
        models = runner.runtime.take_models()
        report = warm_cache().park(runner.runtime.warm_key(), models, labels=[repr(k) for k in models])
        runner.runtime.deactivate()
    except Exception as exc:
        tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        error = exc if isinstance(exc, MineruVramError) else WorkerStartError(f"{type(exc).__name__}: {exc}")
        snap = vram_snapshot("cpu")
        stats = protocol.Stats(rss_mib=snap.rss_mib, device_mib=None, torch_reserved_mib=None, snapshot=snap)
        conn.send(protocol.Error(error=protocol.portable_error(error, None), traceback=tb_text, stats=stats))
        return False
    snap = vram_snapshot("cpu")
    stats = protocol.Stats(rss_mib=snap.rss_mib, device_mib=None, torch_reserved_mib=None, snapshot=snap)
    conn.send(protocol.Prepared(pid=os.getpid(), models=len(report.parked), mib=report.mib, stats=stats))
    return True


def worker_main(argv: list[str]) -> NoReturn:
    """Entry point of a worker process: ``<pipe fd>``. Does not return: exits without teardown."""
    fd = int(argv[0])
    os.set_inheritable(fd, False)  # anything MinerU starts must not hold the pipe open
    # Started with -I, which ignores PYTHONUNBUFFERED: write through, so a crash's log tail is current.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(fd)
    prepared = False
    try:
        first = conn.recv()
        if isinstance(first, protocol.Prepare):
            if not prepare(conn, first):
                os._exit(1)
            prepared = True
            first = conn.recv()  # the Init of the session that takes this spare (or Exit)
    except (EOFError, OSError):
        os._exit(1)
    if isinstance(first, protocol.Exit):
        os._exit(0)
    if not isinstance(first, protocol.Init):  # pragma: no cover - a protocol bug
        os._exit(2)
    code = WorkerLoop(conn, first, prepared=prepared).serve()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown: the process's end returns every byte it held,
    # and tearing down torch and MinerU module by module only costs time.
    os._exit(code)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
