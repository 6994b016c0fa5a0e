"""The contract between the resident engine and one way of running a VLM server.

The engine owns the state (ready, asleep, crashed), the locks, admission and the
supervision; a backend only acts: launch, wait until ready, answer health and load
questions, release and resume memory, shut down. It is given what it needs in a
:class:`BackendContext` for each launch and never sees the engine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from mineru_vram._process import ProcessGroup

if TYPE_CHECKING:
    from mineru_vram._engine.settings import EngineSettings
    from mineru_vram._probe import DeviceMemory

__all__ = ["Backend", "BackendClass", "BackendContext", "EngineTraits", "Launcher", "MemoryMove"]


class Launcher(Protocol):
    """Starts a server command line; the seam tests use to run a stand-in instead of SGLang.

    The default is :func:`mineru_vram._process.spawn`: the command under the keeper, in
    its own process group, dying with this process.
    """

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path) -> ProcessGroup: ...


@dataclass(frozen=True)
class EngineTraits:
    """What the settings and admission must know about an engine before anything runs.

    Attributes:
        model: ``"path"`` (a folder or a hub id), ``"local"`` (a folder that must exist)
            or ``"none"`` (the engine takes no model).
        needs_url: the engine is a server someone else runs, at ``url=``.
        launched: the engine is started, restarted and stopped here.
        pool_fraction: the server sizes its memory pool from a fraction of the card
            (``vram_budget_gib`` and ``mem_fraction`` apply).
        default_fraction: the fraction the server takes when not told (for admission).
        needs_gpu: why the engine cannot run on CPU; ``""`` when it can.
        min_health_timeout: the shortest ``health_timeout`` the server's health check fits in.
        device_need: for an engine that sizes itself to a budget (llama.cpp's layers,
            context and slots): ``(settings, budget MiB or None) -> the device MiB it will
            take``; raises :class:`~mineru_vram.EngineStartError` when it cannot fit.
            ``None``: the budget (or the weights on disk) is what admission waits for.
    """

    model: Literal["path", "local", "none"] = "path"
    needs_url: bool = False
    launched: bool = True
    pool_fraction: bool = False
    default_fraction: float | None = None
    needs_gpu: str = ""
    min_health_timeout: float = 0.0
    device_need: Callable[[EngineSettings, float | None], float] | None = None


@dataclass(frozen=True)
class BackendContext:
    """What a backend gets from the engine for one launch.

    Attributes:
        settings: the engine's settings.
        launcher: starts the server's command line.
        runtime_dir: a folder only this user can read (``0700``): the server's key file,
            its log, and its working folder.
        api_key: the key the server must require (ours, new for each launch) or the
            attached server's.
        environ: the server's base environment.
        mem_fraction: the memory fraction admission sized (pool-fraction engines).
        virtual_vram_gb: MinerU's sizing hint from the engine's reservation.
        budget_mib: the device memory the engine's budget allows it (``None``: no budget).
    """

    settings: EngineSettings
    launcher: Launcher
    runtime_dir: Path
    api_key: str
    environ: Mapping[str, str]
    mem_fraction: float | None = None
    virtual_vram_gb: int | None = None
    budget_mib: float | None = None

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / "server.log"

    @property
    def config_path(self) -> Path:
        return self.runtime_dir / "server-config.yaml"

    @property
    def cwd(self) -> Path:
        """The server's working folder: a private one, never the caller's (``python -m`` imports from it)."""
        return self.runtime_dir


@dataclass(frozen=True)
class MemoryMove:
    """What a server said about a release or a resume.

    Attributes:
        note: anything worth telling the user (a release that did nothing).
        moved_mib: how far the server itself measured its memory move (``None``: it does not say).
    """

    note: str = ""
    moved_mib: float | None = None


class Backend(Protocol):
    """One way to run the engine; constructed from the settings, launched with a context."""

    traits: ClassVar[EngineTraits]
    name: str
    url: str  # the server's base URL, known before launch
    model_id: str  # the served model name

    def launch(self, ctx: BackendContext) -> None:
        """Start the server (or, for a server someone else runs, remember the key)."""

    def wait_ready(self, deadline: float, stop: threading.Event) -> None:
        """Block until the server serves.

        Raises:
            EngineStartError: it exited, or ``deadline`` (``time.monotonic()``) passed.
            EngineStateError: ``stop`` was set.
        """

    def exitcode(self) -> int | None:
        """The server's exit code once it exited, else ``None``."""

    def alive(self) -> bool:
        """Whether the server is still there (as far as this process can tell)."""

    def healthy(self, timeout: float, *, asleep: bool) -> bool:
        """One health check; ``asleep``: the server's memory is released."""

    def busy(self, timeout: float) -> bool:
        """Whether the server reports running or waiting requests (ours or anyone's)."""

    def release(self, timeout: float) -> MemoryMove:
        """Return the server's device memory; the process stays."""

    def resume(self, timeout: float) -> MemoryMove:
        """Take the memory back."""

    def shutdown(self, grace: float) -> None:
        """End the server's whole process group (``SIGTERM``, then ``SIGKILL`` after ``grace``)."""

    def pid(self) -> int | None:
        """The server process."""

    def pids(self) -> list[int]:
        """Every process of the server (for NVML and the ledger)."""

    def log_path(self) -> Path | None:
        """The server's log while it runs."""

    def log_tail(self) -> str:
        """The end of the server's log."""

    def memory_mib(self, info: DeviceMemory | None) -> float | None:
        """What the server's processes hold in one NVML reading."""


class BackendClass(Protocol):
    """A backend class, as the registry holds it: its traits, and its constructor."""

    traits: EngineTraits

    def __call__(self, settings: EngineSettings) -> Backend: ...
