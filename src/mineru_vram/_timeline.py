"""VRAM timelines: device and per-process memory sampled while work runs, with its phases.

A :class:`Timeline` samples, in a background thread (50 Hz by default):

* the whole device's used memory, by NVML (every process on the card);
* the memory of the processes it follows, by NVML, and their host RSS, by psutil.
  It follows this process by default, or the pids it is given, and their
  descendants (an isolated session's worker, an engine's server), re-read a few
  times a second.

Phases come from :mod:`mineru_vram._events`: sessions mark ``load``, ``parse``
(per document) and ``release``; ``mineru-vram timeline`` adds ``exit`` when its
command ends. In this process the timeline subscribes to them; another process
writes them to the file named by ``MINERU_VRAM_TIMELINE_EVENTS``, which the
timeline reads as it samples (``events_file=``).

Without a GPU the timeline still records host RSS, so it works (and is tested) on
CPU; the plot then says so. Plotting needs matplotlib (the ``plot`` extra), imported
only by :meth:`Timeline.plot`.
"""

from __future__ import annotations

import contextlib
import csv
import enum
import heapq
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ._events import Event, read_events, subscribe
from ._exceptions import ConfigurationError, SessionStateError
from ._probe import MIB

__all__ = ["Phase", "Sample", "Timeline", "TimelineState"]

logger = logging.getLogger("mineru_vram")

DEFAULT_HZ = 50.0
# Descendants (workers, servers) are looked up this often, not at every sample: finding
# them means reading every process's /proc entry.
CHILDREN_REFRESH_SECONDS = 0.2

SAMPLE_COLUMNS = (
    "time_s",
    "phase",
    "device_used_mib",
    "device_total_mib",
    "gpu_mib",
    "rss_mib",
    "gpu_by_pid",
    "rss_by_pid",
)
PHASE_COLUMNS = ("phase", "label", "start_s", "end_s", "seconds", "pid", "document", "ok", "error")

_PHASE_COLORS = {
    "load": "tab:orange",
    "parse": "tab:green",
    "release": "tab:blue",
    "exit": "0.55",
}
# Phases a program marks for itself (engine start, idle...) take these in order of appearance.
_OTHER_COLORS = ("tab:cyan", "tab:olive", "tab:pink", "tab:brown", "gold", "tab:purple", "0.8")


class TimelineState(enum.Enum):
    """Lifecycle of a :class:`Timeline`."""

    UNSTARTED = "unstarted"  # constructed; no thread, nothing sampled
    RUNNING = "running"  # a background thread samples; events are collected
    STOPPED = "stopped"  # sampling ended; read, plot and save; it cannot be restarted


@dataclass(frozen=True)
class Sample:
    """One reading. Times are seconds since the timeline started; memory in MiB.

    Attributes:
        time: seconds since the start.
        device_used_mib: the whole device's used memory by NVML (``None`` without a GPU).
        device_total_mib: the device's total memory.
        gpu_mib: the followed processes' device memory by NVML, summed.
        rss_mib: the followed processes' host RSS, summed.
        gpu_by_pid: device memory per followed process that holds any.
        rss_by_pid: host RSS per followed process.
    """

    time: float
    device_used_mib: float | None
    device_total_mib: float | None
    gpu_mib: float | None
    rss_mib: float
    gpu_by_pid: dict[int, float] = field(default_factory=dict)
    rss_by_pid: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Phase:
    """A span of the work: ``load``, ``parse`` (one document), ``release``, ``exit``...

    Attributes:
        name: the phase (the event name without ``.start`` / ``.end``).
        label: what the plot shows, e.g. ``"parse paper.pdf"``.
        start: seconds since the timeline started.
        end: when it ended; ``None`` if it had not when sampling stopped (``exit`` never does).
        pid: the process that emitted it.
        info: the rest of the start and end events (``document``, ``ok``, ``error``...).
    """

    name: str
    label: str
    start: float
    end: float | None
    pid: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else self.end - self.start


class _Follower:
    """The processes a timeline follows: roots and (optionally) their descendants."""

    def __init__(self, roots: Iterable[int], children: bool) -> None:
        self.roots: list[int] = list(roots)
        self.children = children
        self._procs: dict[int, Any] = {}
        self.names: dict[int, str] = {}
        self._refreshed = -float("inf")

    def add(self, pid: int) -> None:
        self.roots.append(pid)
        self._refreshed = -float("inf")

    def processes(self) -> dict[int, Any]:
        import psutil

        now = time.monotonic()
        if now - self._refreshed >= CHILDREN_REFRESH_SECONDS:
            self._refreshed = now
            found: dict[int, Any] = {}
            for pid in self.roots:
                try:
                    proc = self._procs.get(pid) or psutil.Process(pid)
                except psutil.Error:
                    continue
                found[pid] = proc
                if self.children:
                    try:
                        for child in proc.children(recursive=True):
                            found.setdefault(child.pid, self._procs.get(child.pid, child))
                    except psutil.Error:
                        pass
            for pid, proc in found.items():
                if pid not in self.names:
                    try:
                        self.names[pid] = proc.name()
                    except psutil.Error:
                        self.names[pid] = ""
            self._procs = found
        return self._procs


class Timeline:
    """Device and per-process memory over time, with the work's phases marked.

    Example::

        with Timeline() as tl:
            with ModelSession(backend="flash") as s:
                s.parse("paper.pdf")
        tl.plot("timeline.png")      # a matplotlib Figure; in Jupyter it shows inline
        print(tl.to_csv())

    Args:
        device: the GPU whose memory is sampled (``"cuda:N"``); default the first GPU.
            Without one (or with ``"cpu"``) only host RSS is recorded.
        hz: samples per second (default 50).
        pids: the processes to follow; default this one.
        children: also follow their descendants (isolated workers, engine servers).
        events_file: a file of JSON-line phase events written by another process
            (``MINERU_VRAM_TIMELINE_EVENTS``), read as it grows.
        listen: collect phase events emitted in this process (sessions do).
        title: the plot's title.
    """

    def __init__(
        self,
        *,
        device: str | int | None = None,
        hz: float = DEFAULT_HZ,
        pids: Sequence[int] | None = None,
        children: bool = True,
        events_file: str | os.PathLike[str] | None = None,
        listen: bool = True,
        title: str | None = None,
    ) -> None:
        from ._probe import resolve_device

        if not 1.0 <= float(hz) <= 1000.0:
            raise ConfigurationError(f"hz={hz!r}: expected 1 to 1000 samples per second", hz=hz)
        self.device = resolve_device(device)
        self.hz = float(hz)
        self.title = title
        self.events_file = None if events_file is None else Path(events_file)
        self._listen = listen
        self._follower = _Follower([os.getpid()] if pids is None else pids, children)
        self._state = TimelineState.UNSTARTED
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._events: list[Event] = []
        self._events_offset = 0
        self._t0 = 0.0
        self._t_end: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None
        self._handle: Any = None
        self.gpu_name: str | None = None
        self.reason = ""

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def state(self) -> TimelineState:
        return self._state

    @property
    def gpu(self) -> bool:
        """Whether device memory is sampled (NVML sees the device)."""
        return self._handle is not None

    def start(self) -> Timeline:
        """Start sampling in a background thread.

        Raises:
            SessionStateError: the timeline was started before.
        """
        with self._lock:
            if self._state is not TimelineState.UNSTARTED:
                raise SessionStateError(f"this Timeline is {self._state.value}; a timeline runs once")
            self._state = TimelineState.RUNNING
        self._open_device()
        self._t0 = time.time()
        if self._listen:
            self._unsubscribe = subscribe(self._on_event)
        self._sample_once()
        self._thread = threading.Thread(target=self._run, name="mineru-vram-timeline", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Timeline:
        """Stop sampling (one last sample and event read first). Idempotent."""
        with self._lock:
            if self._state is not TimelineState.RUNNING:
                if self._state is TimelineState.UNSTARTED:
                    self._state = TimelineState.STOPPED
                return self
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._read_events_file()
        self._sample_once()
        with self._lock:
            self._t_end = time.time() - self._t0
            self._state = TimelineState.STOPPED
        return self

    def __enter__(self) -> Timeline:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def follow(self, pid: int) -> None:
        """Also follow ``pid`` (and, with ``children``, its descendants) from now on."""
        with self._lock:
            self._follower.add(pid)

    # -- marks -----------------------------------------------------------------------------------

    def mark(self, event: str, **info: Any) -> None:
        """Record an event on this timeline only (``"x.start"`` / ``"x.end"`` make a phase)."""
        self._on_event({"event": event, "time": time.time(), "pid": os.getpid(), **info})

    @contextlib.contextmanager
    def phase(self, name: str, **info: Any) -> Iterator[None]:
        """Mark the ``with`` body as phase ``name`` on this timeline."""
        self.mark(f"{name}.start", **info)
        try:
            yield
        finally:
            self.mark(f"{name}.end", **info)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            self._events.append(dict(event))

    # -- sampling --------------------------------------------------------------------------------

    def _open_device(self) -> None:
        from ._probe import _nvml, _nvml_error, _nvml_handle, device_index, nvml_device_count

        if not self.device.startswith("cuda"):
            gpus = nvml_device_count()
            self.reason = "cpu device selected" if gpus else (_nvml_error() or "no GPU visible to NVML")
            return
        handle = _nvml_handle(device_index(self.device))
        if handle is None:
            self.reason = _nvml_error() or f"NVML has no device for {self.device}"
            return
        self._handle = handle
        nvml = _nvml()
        try:
            name = nvml.nvmlDeviceGetName(handle) if nvml is not None else ""
            self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            self.gpu_name = None

    def _run(self) -> None:
        interval = 1.0 / self.hz
        next_at = time.monotonic() + interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            try:
                self._read_events_file()
                self._sample_once()
            except Exception:  # a sampler that dies silently would leave a flat line
                logger.warning("timeline sampling failed", exc_info=True)
            next_at += interval
            now = time.monotonic()
            if next_at < now:  # fell behind (a loaded machine): skip, do not burst
                next_at = now + interval

    def _read_events_file(self) -> None:
        if self.events_file is None:
            return
        events, self._events_offset = read_events(self.events_file, self._events_offset)
        if events:
            with self._lock:
                self._events.extend(events)

    def _sample_once(self) -> None:
        with self._lock:
            procs = dict(self._follower.processes())
        rss: dict[int, float] = {}
        for pid, proc in procs.items():
            # psutil.Error: the process ended since the last refresh; it simply has no reading.
            with contextlib.suppress(Exception):
                rss[pid] = proc.memory_info().rss / MIB
        used = total = gpu = None
        by_pid: dict[int, float] = {}
        if self._handle is not None:
            used, total, by_pid = self._read_device(set(procs))
            gpu = sum(by_pid.values()) if used is not None else None
        sample = Sample(
            time=time.time() - self._t0,
            device_used_mib=used,
            device_total_mib=total,
            gpu_mib=gpu,
            rss_mib=sum(rss.values()),
            gpu_by_pid=by_pid,
            rss_by_pid=rss,
        )
        with self._lock:
            self._samples.append(sample)

    def _read_device(self, pids: set[int]) -> tuple[float | None, float | None, dict[int, float]]:
        from ._probe import _nvml, _running_processes

        nvml = _nvml()
        if nvml is None:
            return None, None, {}
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except Exception:
            return None, None, {}
        by_pid: dict[int, float] = {}
        for proc in _running_processes(self._handle):
            pid = int(proc.pid)
            used = getattr(proc, "usedGpuMemory", None)
            if pid in pids and used:
                by_pid[pid] = used / MIB
        return info.used / MIB, info.total / MIB, by_pid

    # -- reading ---------------------------------------------------------------------------------

    @property
    def samples(self) -> list[Sample]:
        """The samples so far, oldest first."""
        with self._lock:
            return list(self._samples)

    @property
    def events(self) -> list[Event]:
        """The raw phase events so far, in time order (``time`` is seconds since the start)."""
        with self._lock:
            raw = list(self._events)
        return [{**e, "time": float(e["time"]) - self._t0} for e in sorted(raw, key=lambda e: float(e["time"]))]

    @property
    def duration(self) -> float:
        """Seconds from the start to the last sample."""
        samples = self.samples
        return samples[-1].time if samples else 0.0

    @property
    def rate_hz(self) -> float:
        """Samples per second actually achieved."""
        samples = self.samples
        if len(samples) < 2 or samples[-1].time <= samples[0].time:
            return 0.0
        return (len(samples) - 1) / (samples[-1].time - samples[0].time)

    @property
    def names(self) -> dict[int, str]:
        """Process names of the pids seen (for legends)."""
        with self._lock:
            return dict(self._follower.names)

    def phases(self) -> list[Phase]:
        """The phases, ordered by start: ``.start``/``.end`` pairs and ``exit``."""
        return _phases(self.events)

    def phase_at(self, t: float, phases: Sequence[Phase] | None = None) -> str:
        """The label of the innermost phase running at ``t`` seconds ("" if none)."""
        best: Phase | None = None
        for ph in self.phases() if phases is None else phases:
            end = float("inf") if ph.end is None else ph.end
            if ph.start <= t < end and (best is None or ph.start >= best.start):
                best = ph
        return "" if best is None else best.label

    def peak(self) -> tuple[float, float] | None:
        """``(time, MiB)`` of the highest followed memory (device memory with a GPU, else RSS)."""
        best: tuple[float, float] | None = None
        for s in self.samples:
            value = s.gpu_mib if self.gpu else s.rss_mib
            if value is not None and (best is None or value > best[1]):
                best = (s.time, value)
        return best

    # -- output ----------------------------------------------------------------------------------

    def to_csv(self, path: str | os.PathLike[str] | None = None, *, phases: bool = False) -> str:
        """The samples as CSV (one row per sample, with the phase running then).

        Args:
            path: also write the CSV there.
            phases: the phases instead (one row per phase: label, start, end, document...).

        Returns:
            The CSV text.
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        spans = self.phases()
        if phases:
            writer.writerow(PHASE_COLUMNS)
            for ph in spans:
                writer.writerow(
                    (
                        ph.name,
                        ph.label,
                        f"{ph.start:.3f}",
                        "" if ph.end is None else f"{ph.end:.3f}",
                        "" if ph.seconds is None else f"{ph.seconds:.3f}",
                        "" if ph.pid is None else ph.pid,
                        ph.info.get("document", ""),
                        "" if ph.info.get("ok") is None else ph.info["ok"],
                        ph.info.get("error", ""),
                    )
                )
        else:
            writer.writerow(SAMPLE_COLUMNS)
            samples = self.samples
            labels = _labels_at([s.time for s in samples], spans)
            for s, label in zip(samples, labels, strict=True):
                writer.writerow(
                    (
                        f"{s.time:.3f}",
                        label,
                        _num(s.device_used_mib),
                        _num(s.device_total_mib),
                        _num(s.gpu_mib),
                        _num(s.rss_mib),
                        _by_pid(s.gpu_by_pid),
                        _by_pid(s.rss_by_pid),
                    )
                )
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def plot(self, path: str | os.PathLike[str] | None = None, *, title: str | None = None) -> Any:
        """Draw the timeline: memory lines over shaded phases.

        With a GPU: device memory (whole device and followed processes, by NVML) above,
        host RSS below. Without one: host RSS, and the title says so.

        Args:
            path: also save a PNG there.
            title: overrides the timeline's title.

        Returns:
            A :class:`matplotlib.figure.Figure`. It is drawn without ``pyplot``, so Jupyter shows it
            inline only once matplotlib's inline backend is on (``%matplotlib inline``); the
            timeline itself, as a cell's last line, is always drawn (``_repr_png_``).

        Raises:
            ImportError: matplotlib is not installed (``pip install 'mineru-vram[plot]'``).
        """
        fig = _draw(self, title=title or self.title)
        if path is not None:
            fig.savefig(os.fspath(path), format="png")
        return fig

    def _repr_png_(self) -> bytes | None:
        if not self.samples:
            return None
        try:
            fig = _draw(self, title=self.title)
        except ImportError:
            return None
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def summary(self) -> str:
        """One line: samples, rate, duration, peak, phases."""
        samples = self.samples
        where = f"{self.device} {self.gpu_name}" if self.gpu else f"{self.device}, no GPU: host RSS"
        peak = self.peak()
        peak_text = "" if peak is None else f", peak {peak[1]:.0f} MiB at {peak[0]:.2f}s"
        counts: dict[str, int] = {}
        for ph in self.phases():
            counts[ph.name] = counts.get(ph.name, 0) + 1
        phase_text = ", ".join(f"{k}" if n == 1 else f"{k} x{n}" for k, n in counts.items()) or "none"
        return (
            f"Timeline({where}; {len(samples)} samples at {self.rate_hz:.0f} Hz over {self.duration:.1f}s"
            f"{peak_text}; phases: {phase_text}; {self._state.value})"
        )

    def __repr__(self) -> str:
        return self.summary()

    __str__ = __repr__


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _by_pid(values: dict[int, float]) -> str:
    return ";".join(f"{pid}:{mib:.1f}" for pid, mib in sorted(values.items()))


def _labels_at(times: Sequence[float], phases: Sequence[Phase]) -> list[str]:
    """:meth:`Timeline.phase_at` for many times in one sweep (hours of samples, thousands of phases).

    A heap holds the phases started so far, latest start on top; a phase that has ended by the
    time being labelled is dropped when it reaches the top (times are visited in order, so an
    ended phase stays ended).
    """
    order = sorted(range(len(phases)), key=lambda i: phases[i].start)
    heap: list[tuple[float, int, int]] = []
    labels = [""] * len(times)
    nxt = 0
    for ti in sorted(range(len(times)), key=lambda i: times[i]):
        t = times[ti]
        while nxt < len(order) and phases[order[nxt]].start <= t:
            i = order[nxt]
            heapq.heappush(heap, (-phases[i].start, -nxt, i))  # ties: the later one wins, as in phase_at
            nxt += 1
        while heap:
            end = phases[heap[0][2]].end
            if end is None or t < end:
                break
            heapq.heappop(heap)
        if heap:
            labels[ti] = phases[heap[0][2]].label
    return labels


def _phases(events: Sequence[Event]) -> list[Phase]:
    """Pair ``X.start`` with ``X.end`` (same process, session and document); ``exit`` spans to the end."""
    open_spans: dict[tuple[Any, ...], list[Event]] = {}
    out: list[Phase] = []
    for e in events:
        name = str(e["event"])
        if name.endswith((".start", ".end")):
            base, _, edge = name.rpartition(".")
            key = (base, e.get("pid"), e.get("session"), e.get("document"))
            if edge == "start":
                open_spans.setdefault(key, []).append(e)
                continue
            stack = open_spans.get(key)
            if not stack:  # an end whose start came before the timeline did
                continue
            start = stack.pop()
            out.append(_make_phase(base, start, e))
        elif name == "exit":
            out.append(_make_phase("exit", e, None))
    for key, stack in open_spans.items():
        for start in stack:
            out.append(_make_phase(key[0], start, None))
    out.sort(key=lambda p: p.start)
    return out


def _make_phase(name: str, start: Event, end: Event | None) -> Phase:
    skip = {"event", "time", "pid"}
    info = {k: v for k, v in start.items() if k not in skip}
    if end is not None:
        info.update({k: v for k, v in end.items() if k not in skip})
    label = name
    document = info.get("document")
    if document:
        label = f"{name} {Path(str(document)).name}"
    return Phase(
        name=name,
        label=label,
        start=float(start["time"]),
        end=None if end is None else float(end["time"]),
        pid=start.get("pid"),
        info=info,
    )


def _draw(tl: Timeline, *, title: str | None) -> Any:
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError("Timeline.plot() needs matplotlib: pip install 'mineru-vram[plot]' (or matplotlib)") from exc
    _register_notebook_display()
    samples = tl.samples
    phases = tl.phases()
    names = tl.names
    t = [s.time for s in samples]
    end = max([tl.duration, *(p.start for p in phases)]) if (samples or phases) else 1.0
    if tl.gpu:
        fig = Figure(figsize=(11, 6.5), dpi=100, layout="constrained")
        gpu_ax, rss_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        axes = [gpu_ax, rss_ax]
        gpu_ax.plot(t, [_nan(s.device_used_mib) for s in samples], color="black", lw=1.6, label="device used (all)")
        gpu_ax.plot(t, [_nan(s.gpu_mib) for s in samples], color="tab:red", lw=1.4, label="followed processes")
        pids = sorted({pid for s in samples for pid in s.gpu_by_pid})
        if len(pids) > 1:
            for pid in pids:
                gpu_ax.plot(
                    t,
                    [s.gpu_by_pid.get(pid, 0.0) for s in samples],
                    lw=0.9,
                    ls="--",
                    label=f"pid {pid} {names.get(pid, '')}".rstrip(),
                )
        gpu_ax.set_ylabel("GPU memory (MiB, NVML)")
        rss_ax.plot(t, [s.rss_mib for s in samples], color="tab:purple", lw=1.2, label="host RSS (followed)")
        rss_ax.set_ylabel("host RSS (MiB)")
        main = gpu_ax
        subtitle = f"{tl.device}: {tl.gpu_name or 'GPU'}"
        peak_values = [s.gpu_mib for s in samples]
    else:
        fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
        main = fig.subplots(1, 1)
        axes = [main]
        main.plot(t, [s.rss_mib for s in samples], color="tab:purple", lw=1.6, label="host RSS (followed)")
        pids = sorted({pid for s in samples for pid in s.rss_by_pid})
        if len(pids) > 1:
            for pid in pids:
                main.plot(
                    t,
                    [_nan(s.rss_by_pid.get(pid)) for s in samples],
                    lw=0.9,
                    ls="--",
                    label=f"pid {pid} {names.get(pid, '')}".rstrip(),
                )
        main.set_ylabel("host RSS (MiB)")
        subtitle = f"no GPU: host RSS shown ({tl.reason})" if tl.reason else "no GPU: host RSS shown"
        peak_values = [s.rss_mib for s in samples]
    kinds: dict[str, str] = {}
    for i, ph in enumerate(phases):
        if ph.name not in kinds:
            others = sum(1 for k in kinds if k not in _PHASE_COLORS)
            kinds[ph.name] = _PHASE_COLORS.get(ph.name) or _OTHER_COLORS[others % len(_OTHER_COLORS)]
        color = kinds[ph.name]
        stop = end if ph.end is None else ph.end
        alpha = 0.22 if ph.name != "parse" else (0.16 if i % 2 else 0.26)
        for ax in axes:
            ax.axvspan(ph.start, max(stop, ph.start + end * 0.002), color=color, alpha=alpha, lw=0)
        if (stop - ph.start) >= end * 0.04 or ph.name in ("load", "release", "exit"):
            main.text(
                ph.start,
                0.99,
                f" {ph.label}",
                transform=main.get_xaxis_transform(),
                va="top",
                ha="left",
                rotation=90 if (stop - ph.start) < end * 0.12 else 0,
                fontsize=8,
                clip_on=True,
            )
    valid = [(x, v) for x, v in zip(t, peak_values, strict=True) if v is not None]
    if valid:
        px, pv = max(valid, key=lambda item: item[1])
        right = px > 0.7 * end  # keep the label inside the axes
        main.annotate(
            f"peak {pv:.0f} MiB",
            (px, pv),
            xytext=(-6 if right else 6, -12),
            textcoords="offset points",
            ha="right" if right else "left",
            fontsize=8,
            color="tab:red" if tl.gpu else "tab:purple",
        )
    for ax in axes:
        ax.set_xlim(0, end if end > 0 else 1.0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("seconds")
    handles, labels = main.get_legend_handles_labels()
    handles += [Patch(color=c, alpha=0.35) for c in kinds.values()]
    labels += list(kinds)
    main.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(f"{title or 'mineru-vram timeline'}\n{subtitle}", fontsize=11)
    return fig


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _register_notebook_display() -> None:
    # Jupyter shows a returned Figure inline only once matplotlib's inline backend has
    # registered its formatter, which happens when pyplot is imported in the kernel.
    # Figures here are built without pyplot (no global figure registry, no double display),
    # so import it only where a kernel is running.
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return
    try:
        shell = ipython.get_ipython()
    except Exception:
        return
    if shell is not None and getattr(shell, "kernel", None) is not None:
        with contextlib.suppress(Exception):
            import matplotlib.pyplot  # noqa: F401
