"""Scale-out on Ray: every GPU of a host, then a cluster, with the same code and guarantees.

Installed with the ``ray`` extra (``pip install 'mineru-vram[ray]'``); importing
:mod:`mineru_vram` never imports Ray, this module does.

* :func:`parse_dataset` parses a Ray Dataset of PDFs with a pool of actors, one
  :class:`~mineru_vram.ModelSession` each on the GPU Ray assigned it (Ray Data's
  ``map_batches`` with the callable class :class:`DocumentParser`): models load once
  per actor, every document comes out as one row (a result, or the error's type and
  message), and the sessions are closed when the pool shuts down.
* :class:`JobReport` collects what the actors report (documents, memory, the release
  receipts) and :meth:`JobReport.summary` turns it into a :class:`JobSummary`:
  documents per second, the peak memory of each GPU, and whether each one is back at
  its baseline once the actors are gone.
* :func:`parser_actor` starts a long-lived :class:`ParserActor` (a session, or a
  session on a :class:`~mineru_vram.ResidentEngine`) for applications that run on Ray.
* :func:`gpu_share` turns a :class:`~mineru_vram.VramBudget` into a fractional
  ``num_gpus``: Ray places actors by it, and the session's admission on the node
  checks the memory is really free.

Fault tolerance is Ray's: an actor that dies is restarted (``max_restarts``) and the
documents it was working on are retried (``max_task_retries``), so each document
still appears once in the output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "mineru_vram.ray needs Ray Data, which is not installed: pip install 'mineru-vram[ray]' "
        "(the 'ray' extra, ray[data]>=2.40,<3)"
    ) from exc

import pyarrow as pa

from . import ConfigurationError, ModelSession, ReleaseReport, SessionStateError, VramBudget, vram_snapshot

__all__ = [
    "ActorRecord",
    "DocumentParser",
    "GpuRecord",
    "JobReport",
    "JobSummary",
    "ParserActor",
    "RESULT_SCHEMA",
    "gpu_share",
    "parse_dataset",
    "parser_actor",
]

logger = logging.getLogger("mineru_vram")

MIB = 1024 * 1024
# How often an actor reads NVML between documents for the peak figures: often enough for the
# peak of a steady job, rarely enough that a fast page does not pay for it.
_SAMPLE_INTERVAL = 1.0
# The columns parse_dataset adds (an input column of the same name is replaced).
RESULT_SCHEMA = pa.schema(
    [
        ("name", pa.string()),
        ("markdown", pa.string()),
        ("content_list", pa.string()),  # MinerU's structured content as JSON text
        ("page_count", pa.int64()),
        ("started", pa.float64()),  # when the parse began (time.time() on the actor's node)
        ("seconds", pa.float64()),
        ("timings", pa.string()),  # JSON text: {"mineru": s, "convert": s, ...}
        ("error_type", pa.string()),  # null for a parsed document
        ("error", pa.string()),
        ("backend", pa.string()),
        ("device", pa.string()),
        ("node", pa.string()),
        ("pid", pa.int64()),
        ("gpu", pa.string()),  # Ray's GPU id(s) on the node, "" on the CPU
    ]
)
_INPUT_ONLY = ("bytes",)  # read, not passed on: the output holds results, not the PDFs again


# --- where an actor runs -------------------------------------------------------------------------


def _where() -> dict[str, Any]:
    """This actor's node, process and the GPUs Ray assigned it (ids as Ray numbers them on the node)."""
    ctx = ray.get_runtime_context()
    gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
    actor_id = ctx.get_actor_id()  # None outside an actor
    return {
        "node": ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
        "node_id": ctx.get_node_id(),
        "pid": os.getpid(),
        "gpu": ",".join(gpus),
        "actor_id": actor_id or f"pid-{os.getpid()}",
    }


def _device_for(gpu: str, options: Mapping[str, Any]) -> Any:
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned, so the first one is cuda:0 here.
    if "device" in options:
        return options["device"]
    return "cuda:0" if gpu else "cpu"


class _Sampler:
    """Peak memory of one actor: this process by NVML and the whole device, read at most once a second."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_process_mib: float | None = None
        self.peak_device_mib: float | None = None
        self._last = 0.0

    def read(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < _SAMPLE_INTERVAL:
            return
        self._last = now
        snap = vram_snapshot(self.device)
        if snap.process_mib is not None:
            self.peak_process_mib = max(self.peak_process_mib or 0.0, snap.process_mib)
        if snap.device_info is not None:
            self.peak_device_mib = max(self.peak_device_mib or 0.0, snap.device_info.used_mib)


@dataclass
class _Counters:
    documents: int = 0
    failed: int = 0
    first_start: float | None = None
    last_end: float | None = None

    def add(self, start: float, end: float, *, ok: bool) -> None:
        self.documents += 1
        self.failed += 0 if ok else 1
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        self.last_end = end if self.last_end is None else max(self.last_end, end)


# --- the actor's work: one session, one row per document -------------------------------------------


class _SessionOwner:
    """A ModelSession opened on this actor's GPU, the rows it makes, and what it reports.

    Shared by the batch class (:class:`DocumentParser`) and the online actor (:class:`ParserActor`).
    """

    def __init__(
        self,
        backend: str,
        *,
        pages: Any = None,
        ocr_mode: str | None = None,
        budget: VramBudget | None = None,
        session_options: Mapping[str, Any] | None = None,
        engine: Mapping[str, Any] | None = None,
        report: Any = None,
    ) -> None:
        self.where = _where()
        options = dict(session_options or {})
        device = _device_for(self.where["gpu"], options)
        options.pop("device", None)
        self.pages = pages
        self.ocr_mode = ocr_mode
        self.backend = backend
        self.counters = _Counters()
        self._report = report
        self._pid = os.getpid()
        self.closed = False
        self.engine: Any = None
        if engine is not None:
            from . import ResidentEngine

            self.engine = ResidentEngine(**{"device": device, **dict(engine)})
        self.session = ModelSession(backend, device=device, budget=budget, engine=self.engine, **options)
        self.sampler = _Sampler(self.session.device)
        baseline = vram_snapshot(self.session.device)
        self.baseline_device_mib = None if baseline.device_info is None else baseline.device_info.used_mib
        t0 = time.perf_counter()
        try:
            self.session.open()
        except BaseException:
            if self.engine is not None:
                self.engine.stop()
            raise
        self.load_seconds = time.perf_counter() - t0
        self.started = time.time() - self.load_seconds
        self.sampler.read(force=True)
        self._send("started", self._info())

    def _info(self) -> dict[str, Any]:
        return {
            **self.where,
            "device": self.session.device,
            "backend": self.backend,
            "started": self.started,
            "load_seconds": self.load_seconds,
            "baseline_device_mib": self.baseline_device_mib,
        }

    def _progress(self) -> dict[str, Any]:
        c = self.counters
        return {
            "documents": c.documents,
            "failed": c.failed,
            "first_start": c.first_start,
            "last_end": c.last_end,
            "peak_process_mib": self.sampler.peak_process_mib,
            "peak_device_mib": self.sampler.peak_device_mib,
        }

    def _send(self, what: str, *args: Any, wait: bool = False) -> None:
        if self._report is None:
            return
        key = (self.where["actor_id"], self.where["pid"])
        ref = getattr(self._report, what).remote(key, *args)
        if wait:
            # Bounded: a collector that is gone must not keep the actor from exiting.
            ray.get(ref, timeout=30)

    def parse_one(
        self, source: Any, name: str | None, *, pages: Any = None, ocr_mode: str | None = None
    ) -> dict[str, Any]:
        """Parse one document into a row; any error of the document becomes the row's error."""
        start = time.time()
        row: dict[str, Any] = {
            "name": name,
            "markdown": "",
            "content_list": "null",
            "page_count": 0,
            "started": start,
            "seconds": 0.0,
            "timings": "{}",
            "error_type": None,
            "error": None,
            "backend": self.backend,
            "device": self.session.device,
            "node": self.where["node"],
            "pid": self.where["pid"],
            "gpu": self.where["gpu"],
        }
        try:
            result = self.session.parse(
                source,
                pages=self.pages if pages is None else pages,
                ocr_mode=ocr_mode or self.ocr_mode,  # type: ignore[arg-type]
                name=name,
            )
        except SessionStateError:
            raise  # the actor's session is gone: not this document's fault
        except Exception as exc:  # one bad document never fails the job
            row["error_type"] = type(exc).__name__
            row["error"] = str(exc)
            row["seconds"] = time.time() - start
            self.counters.add(start, time.time(), ok=False)
        else:
            row.update(
                name=result.document,
                markdown=result.markdown,
                content_list=json.dumps(result.content_list, ensure_ascii=False),
                page_count=result.page_count,
                seconds=result.seconds,
                timings=json.dumps(dict(result.timings)),
            )
            self.counters.add(start, time.time(), ok=True)
        self.sampler.read()
        return row

    def report_progress(self) -> None:
        # Fire and forget, once per batch: the collector keeps each actor's latest figures.
        self._send("progress", self._progress())

    def close(self) -> ReleaseReport | None:
        """Close the session (and stop the engine), then hand the receipt to the job report."""
        if self.closed or os.getpid() != self._pid:
            return self.session.release_report
        self.closed = True
        self.sampler.read(force=True)
        receipt = None
        try:
            receipt = self.session.close()
        finally:
            if self.engine is not None:
                self.engine.stop()
            self._send("closed", self._progress(), receipt, wait=True)
        return receipt


class DocumentParser:
    """Ray Data callable class: one :class:`~mineru_vram.ModelSession` per actor, one row per document.

    :func:`parse_dataset` uses it; use it directly to put parsing into a pipeline of your own::

        ds.map_batches(DocumentParser, fn_constructor_kwargs={"backend": "pipeline"},
                       batch_format="pyarrow", batch_size=1, num_gpus=1,
                       compute=ray.data.ActorPoolStrategy(size=2))

    Each input row needs a ``path`` (readable on the actor's node) or ``bytes`` (the PDF;
    ``ray.data.read_binary_files(..., include_paths=True)`` makes both) and may carry a
    ``name``; its other columns are passed on. The session opens in the constructor, on
    the GPU Ray assigned (``cuda:0`` under the ``CUDA_VISIBLE_DEVICES`` Ray sets), and
    closes in :meth:`close`, which Ray Data calls (through ``__del__``) when the pool
    shuts down.

    Args:
        backend: the session's backend (``"pipeline"``, ``"flash"``, ...).
        pages: pages of every document to parse (``ModelSession.parse``'s ``pages``).
        ocr_mode: ``"auto"``, ``"txt"`` or ``"ocr"``; default the session's.
        budget: the session's :class:`~mineru_vram.VramBudget` (admission on the node).
        session_options: more :class:`~mineru_vram.ModelSession` arguments
            (``models_dir``, ``isolation``, ``device``, ...).
        report: a :class:`JobReport` to report to.
    """

    def __init__(
        self,
        backend: str = "pipeline",
        *,
        pages: Any = None,
        ocr_mode: str | None = None,
        budget: VramBudget | None = None,
        session_options: Mapping[str, Any] | None = None,
        report: JobReport | None = None,
    ) -> None:
        self._owner = _SessionOwner(
            backend,
            pages=pages,
            ocr_mode=ocr_mode,
            budget=budget,
            session_options=session_options,
            report=None if report is None else report.collector,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = batch.column_names
        if "path" not in columns and "bytes" not in columns:
            raise ConfigurationError(
                f"parse_dataset needs a 'path' or a 'bytes' column; the dataset has {columns}", columns=columns
            )
        paths = batch.column("path").to_pylist() if "path" in columns else [None] * batch.num_rows
        payloads = batch.column("bytes").to_pylist() if "bytes" in columns else [None] * batch.num_rows
        names = batch.column("name").to_pylist() if "name" in columns else [None] * batch.num_rows
        rows = []
        for path, payload, name in zip(paths, payloads, names, strict=True):
            source = payload if payload is not None else path
            rows.append(self._owner.parse_one(source, name or path or None))
        self._owner.report_progress()
        out = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
        for column in columns:  # the input's own columns travel with each row
            if column not in RESULT_SCHEMA.names and column not in _INPUT_ONLY:
                out = out.append_column(batch.schema.field(column), batch.column(column))
        return out

    def close(self) -> ReleaseReport | None:
        """Release the session's models and report the receipt; idempotent."""
        return self._owner.close()

    def __del__(self) -> None:
        # Ray Data's hook for a callable class: it drops the instance when the actor pool
        # shuts down (the actor then exits), and there is no other. Only in the actor that
        # opened the session, and never raising.
        _close_quietly(self)


def _close_quietly(actor: DocumentParser | ParserActor) -> None:
    try:
        owner = actor.__dict__.get("_owner")  # absent when the constructor failed
        if owner is not None:
            owner.close()
    except Exception as exc:
        logger.warning("closing the actor's session failed: %s", exc)


# --- the job ---------------------------------------------------------------------------------------


def gpu_share(budget: VramBudget, *, gpu_memory_mib: float | None = None) -> float:
    """The fraction of a GPU a budget needs, as Ray's ``num_gpus``.

    A fraction budget is its fraction; a MiB budget is divided by the card's memory
    (``gpu_memory_mib``, else what NVML reports for this machine's first GPU). The
    budget's ``headroom_mib`` counts too. Rounded up to a hundredth, so two actors of
    0.5 share a card and a card is never promised more than it has.

    Raises:
        ConfigurationError: a MiB budget where the card's size is unknown, or a budget
            above one card.
    """
    if gpu_memory_mib is None:
        gpu_memory_mib = vram_snapshot(0).total_mib if budget.mib is not None or budget.headroom_mib else None
    if budget.fraction is not None:
        share = budget.fraction + (budget.headroom_mib / gpu_memory_mib if gpu_memory_mib else 0.0)
    else:
        if not gpu_memory_mib:
            raise ConfigurationError(
                f"{budget} is in MiB and this machine sees no GPU to size it against: pass "
                "gpu_memory_mib= (the memory of the cluster's cards) or a fraction budget",
                budget=str(budget),
            )
        assert budget.mib is not None
        share = (budget.mib + budget.headroom_mib) / gpu_memory_mib
    share = math.ceil(round(share * 100, 6)) / 100
    if share > 1:
        raise ConfigurationError(
            f"{budget} needs {share:.2f} of a GPU: one session runs on one card", budget=str(budget)
        )
    return share


def _budget_of(value: VramBudget | int | float | str | None) -> VramBudget | None:
    """A ``budget=`` argument read by the rules of ModelSession's (MiB, fraction, ``"6GiB"``, ``"25%"``)."""
    if value is None or isinstance(value, VramBudget):
        return value
    # An unopened session loads nothing: it is only asked how it reads the argument.
    return ModelSession("flash", device="cpu", budget=value, trust_env=False).budget


def _cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]


def _as_dataset(source: Any) -> Any:
    if isinstance(source, ray.data.Dataset):
        return source
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        source = sorted(p for p in Path(source).iterdir() if p.suffix.lower() == ".pdf")
    elif isinstance(source, (str, os.PathLike, bytes)):
        source = [source]
    items: list[dict[str, Any]] = []
    for i, entry in enumerate(source):
        if isinstance(entry, (bytes, bytearray, memoryview)):
            items.append({"name": f"document-{i}", "bytes": bytes(entry)})
        else:
            # Absolute, so an actor started in another working folder finds it.
            items.append({"name": os.fspath(entry), "path": os.path.abspath(entry)})
    if not items:
        raise ConfigurationError("parse_dataset got no documents")
    # One document per block: blocks are what the pool hands out (and retries), so the
    # work spreads over the actors document by document.
    return ray.data.from_items(items, override_num_blocks=len(items))


def parse_dataset(
    source: Any,
    *,
    backend: str = "pipeline",
    concurrency: int | tuple[int, int] | None = None,
    num_gpus: float | None = None,
    budget: VramBudget | int | float | str | None = None,
    gpu_memory_mib: float | None = None,
    num_cpus: float = 1,
    pages: Any = None,
    ocr_mode: str | None = None,
    session_options: Mapping[str, Any] | None = None,
    report: JobReport | None = None,
    batch_size: int = 1,
    max_restarts: int | None = None,
    max_task_retries: int | None = None,
    ray_remote_args: Mapping[str, Any] | None = None,
) -> Any:
    """Parse PDFs with a pool of Ray actors, one ModelSession each, into a Dataset of rows.

    Nothing runs until the Dataset is consumed (``take_all``, ``iter_rows``,
    ``write_parquet``, ...); Ray shows the progress. Each document gives one row with
    the columns of :data:`RESULT_SCHEMA` (``name``, ``markdown``, ``content_list`` as
    JSON text, ``page_count``, ``started``, ``seconds``, ``timings``, ``error_type`` and ``error``
    for a document that failed, and where it ran) plus the input's own columns.

    Args:
        source: a Ray Dataset with a ``path`` or ``bytes`` column (``name`` optional), a
            folder (its ``*.pdf``), or an iterable of paths or PDF bytes. Paths must be
            readable on every node (a shared filesystem); otherwise read the files into
            a Dataset with ``ray.data.read_binary_files(..., include_paths=True)``.
        backend: the sessions' backend.
        concurrency: actors in the pool, or ``(min, max)`` for an autoscaling pool.
            Default: as many as the cluster's GPUs hold at ``num_gpus`` each (one on a
            cluster without GPUs).
        num_gpus: GPUs per actor. Default: :func:`gpu_share` of ``budget``, else 1 on
            a cluster with GPUs and 0 without.
        budget: each session's :class:`~mineru_vram.VramBudget` (or what ``ModelSession``
            takes: MiB as ``int``, a fraction, ``"6GiB"``, ``"25%"``): it sets ``num_gpus``
            (unless given), and each session waits on its node until the memory is free.
        gpu_memory_mib: the cards' memory, for a MiB budget (default this machine's).
        num_cpus: CPUs per actor.
        pages: pages of every document to parse (default all).
        ocr_mode: ``"auto"``, ``"txt"`` or ``"ocr"``.
        session_options: more :class:`~mineru_vram.ModelSession` arguments
            (``models_dir``, ``isolation="process"``, ``device``, ...).
        report: a :class:`JobReport` that collects the actors' figures and receipts.
        batch_size: documents per call of an actor.
        max_restarts: times Ray restarts an actor that died; default Ray Data's (always).
        max_task_retries: times Ray retries the documents of an actor that died;
            default Ray Data's (always). A document that kills its process every time is
            retried that often; ``session_options={"isolation": "process"}`` turns such a
            crash into that document's error row instead. (Ray 2.60 warns that these two,
            like all extra ``ray_remote_args`` of ``map_batches``, are deprecated; its
            defaults are the ones above.)
        ray_remote_args: more Ray actor options (``resources``, ``runtime_env``, ...).

    Returns:
        A ``ray.data.Dataset``.
    """
    if not ray.is_initialized():
        ray.init()
    budget = _budget_of(budget)
    if num_gpus is None:
        if budget is not None:
            num_gpus = gpu_share(budget, gpu_memory_mib=gpu_memory_mib)
        else:
            num_gpus = 1.0 if _cluster_gpus() > 0 else 0.0
    if concurrency is None:
        gpus = _cluster_gpus()
        concurrency = max(1, int(gpus // num_gpus)) if num_gpus and gpus else 1
    if isinstance(concurrency, tuple):
        compute = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    else:
        compute = ray.data.ActorPoolStrategy(size=concurrency)
    remote_args = dict(ray_remote_args or {})
    if max_restarts is not None:
        remote_args["max_restarts"] = max_restarts
    if max_task_retries is not None:
        remote_args["max_task_retries"] = max_task_retries
    dataset = _as_dataset(source)
    return dataset.map_batches(
        DocumentParser,
        fn_constructor_kwargs={
            "backend": backend,
            "pages": pages,
            "ocr_mode": ocr_mode,
            "budget": budget,
            "session_options": dict(session_options or {}),
            "report": report,
        },
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=compute,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        **remote_args,
    )


# --- the job report ----------------------------------------------------------------------------------


class _CollectorActor:
    """Holds what each actor incarnation (actor id, pid) reported: start, progress, close."""

    def __init__(self) -> None:
        self.actors: dict[tuple[str, int], dict[str, Any]] = {}

    def started(self, key: tuple[str, int], info: dict[str, Any]) -> None:
        self.actors[key] = {"info": info, "progress": {}, "closed": False, "receipt": None}

    def progress(self, key: tuple[str, int], progress: dict[str, Any]) -> None:
        if key in self.actors:
            self.actors[key]["progress"] = progress

    def closed(self, key: tuple[str, int], progress: dict[str, Any], receipt: ReleaseReport | None) -> None:
        if key in self.actors:
            self.actors[key].update(progress=progress, closed=True, receipt=receipt)

    def state(self) -> dict[tuple[str, int], dict[str, Any]]:
        return self.actors


_Collector: Any = ray.remote(num_cpus=0)(_CollectorActor)


@ray.remote(num_cpus=0)
def _node_probe(pids: list[int], gpus: list[str], wait: float) -> tuple[list[int], dict[str, float]]:
    """On one node: wait up to ``wait`` s for ``pids`` to exit; then each GPU's used memory by NVML."""
    import psutil

    def alive(pid: int) -> bool:
        try:
            return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    deadline = time.monotonic() + wait
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    used: dict[str, float] = {}
    if gpus:
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                # Ray's GPU ids are the CUDA_VISIBLE_DEVICES entries it gives actors, read
                # here as NVML indices (as vram_snapshot reads such entries).
                for gpu in gpus:
                    handle = pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
                    used[gpu] = float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / MIB
            finally:
                pynvml.nvmlShutdown()
        except Exception:
            pass
    return [p for p in pids if alive(p)], used


@dataclass(frozen=True)
class ActorRecord:
    """One actor process of the job, as it reported itself.

    Attributes:
        actor_id: Ray's actor id (a restarted actor keeps it, in a new process).
        pid: the process.
        node: the node's IP address.
        gpu: Ray's GPU id(s) on the node ("" on the CPU).
        device: the session's device in that process.
        status: ``"closed"`` (the session was released), ``"died"`` (the process is gone
            without closing: killed, out of memory, node lost), ``"running"`` (neither,
            when the summary gave up waiting).
        documents: documents it finished (failed ones included).
        failed: of those, the ones that became error rows.
        load_seconds: time to open the session.
        peak_process_mib: the process's peak GPU memory by NVML (sampled).
        receipt: the session's :class:`~mineru_vram.ReleaseReport` (``closed`` only).
    """

    actor_id: str
    pid: int
    node: str
    gpu: str
    device: str
    status: str
    documents: int = 0
    failed: int = 0
    load_seconds: float = 0.0
    peak_process_mib: float | None = None
    receipt: ReleaseReport | None = None


@dataclass(frozen=True)
class GpuRecord:
    """One GPU (or one node's CPU) of the job.

    Attributes:
        key: ``"<node>/GPU<id>"`` (``"<node>/cpu"`` for CPU actors).
        baseline_mib: device memory used before the job's first session on it loaded
            (NVML, the lowest reading of the actors that opened there).
        peak_mib: the highest device memory used while the job ran (sampled).
        after_mib: device memory used once the job's actors on it had exited.
        back_at_baseline: ``after_mib`` within the tolerance of ``baseline_mib``
            (``None`` where there is nothing to measure: a CPU, no NVML).
        actors: actor processes that ran on it.
    """

    key: str
    baseline_mib: float | None
    peak_mib: float | None
    after_mib: float | None
    back_at_baseline: bool | None
    actors: int


@dataclass(frozen=True)
class JobSummary:
    """What a :class:`JobReport` saw of one or more runs of a parse job.

    Attributes:
        documents: documents the actors finished (error rows included). After an actor
            died, a document it was parsing at that moment can be counted by it and by
            its retry; the Dataset itself holds each document once.
        failed: of those, the error rows.
        seconds: from the first document's start to the last one's end.
        actors: every actor process, restarted ones included.
        gpus: every device used, with its peak and whether it is back at its baseline.
    """

    documents: int
    failed: int
    seconds: float
    actors: tuple[ActorRecord, ...] = ()
    gpus: tuple[GpuRecord, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def documents_per_s(self) -> float | None:
        return self.documents / self.seconds if self.seconds > 0 else None

    @property
    def deaths(self) -> int:
        """Actor processes that died without closing their session."""
        return sum(1 for a in self.actors if a.status == "died")

    @property
    def ok(self) -> bool:
        """Every session closed or died (none left running), every receipt clean, every GPU back at baseline."""
        if any(a.status == "running" for a in self.actors):
            return False
        if any(a.receipt is not None and not a.receipt.ok for a in self.actors):
            return False
        return all(g.back_at_baseline is not False for g in self.gpus)

    def __str__(self) -> str:
        rate = self.documents_per_s
        lines = [
            f"{self.documents} documents ({self.failed} failed) in {self.seconds:.1f} s"
            + (f", {rate:.2f} documents/s" if rate is not None else "")
            + f"; {len(self.actors)} actor processes ({self.deaths} died); "
            + ("ok" if self.ok else "NOT OK")
        ]
        for g in self.gpus:
            if g.back_at_baseline is None:
                lines.append(f"  {g.key}: {g.actors} actor(s), no GPU memory to measure")
            else:
                lines.append(
                    f"  {g.key}: baseline {_mib(g.baseline_mib)}, peak {_mib(g.peak_mib)}, after {_mib(g.after_mib)}"
                    f" ({'back at baseline' if g.back_at_baseline else 'NOT back at baseline'}); {g.actors} actor(s)"
                )
        for a in self.actors:
            lines.append(
                f"  actor {a.actor_id[:8]} pid {a.pid} on {a.node} {a.device}: {a.status}, "
                f"{a.documents} documents, loaded in {a.load_seconds:.1f} s"
                + ("" if a.receipt is None else f"; receipt {'ok' if a.receipt.ok else 'NOT OK'}")
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


class JobReport:
    """Collects the figures and release receipts of a parse job's actors.

    Pass it to :func:`parse_dataset` (``report=``); after the Dataset was consumed,
    :meth:`summary` waits for the pool's actors to close their sessions and exit, and
    sums up. It starts a small Ray actor of its own (no CPU, no GPU) that lives as long
    as this object.

    Args:
        tolerance_mib: how far above its baseline a GPU may be after the job and still
            count as back at baseline.
    """

    def __init__(self, *, tolerance_mib: float = 64.0) -> None:
        self.collector = _Collector.remote()
        self.tolerance_mib = tolerance_mib

    def summary(self, *, timeout: float = 60.0, grace: float = 10.0) -> JobSummary:
        """Wait (at most ``timeout`` s) for every actor to close or die, then sum up.

        An actor process that has not closed its session within ``grace`` s is checked
        on its node: one that is gone died. Those still there when ``timeout`` passes are
        listed as ``"running"`` (and the summary is not ``ok``).
        """
        start = time.monotonic()
        deadline = start + timeout
        dead: set[tuple[str, int]] = set()
        while True:
            state: dict[tuple[str, int], dict[str, Any]] = ray.get(self.collector.state.remote(), timeout=timeout)
            latest = set(_latest_incarnations(state).values())
            # An incarnation replaced by a restart died; the latest one of each actor closes
            # its session when the pool shuts down, unless it died too.
            dead |= {key for key, entry in state.items() if key not in latest and not entry["closed"]}
            pending = [key for key in latest if not state[key]["closed"] and key not in dead]
            now = time.monotonic()
            if pending and now - start >= grace:
                dead |= self._gone(pending, state)
                pending = [key for key in pending if key not in dead]
            if not pending or now >= deadline:
                break
            time.sleep(0.2)
        return self._summarise(state, dead, max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _gone(keys: Sequence[tuple[str, int]], state: Mapping[tuple[str, int], dict[str, Any]]) -> set[tuple[str, int]]:
        """Of ``keys``, the incarnations whose process no longer exists on its node."""
        by_node: dict[str, list[int]] = {}
        for key in keys:
            by_node.setdefault(state[key]["info"]["node_id"], []).append(key[1])
        alive: set[int] = set()
        for node_id, pids in by_node.items():
            still, _ = ray.get(_probe_on(node_id).remote(pids, [], 0.0))
            alive.update(still)
        return {key for key in keys if key[1] not in alive}

    def _summarise(
        self, state: dict[tuple[str, int], dict[str, Any]], dead: set[tuple[str, int]], wait: float
    ) -> JobSummary:
        actors: list[ActorRecord] = []
        by_device: dict[str, list[dict[str, Any]]] = {}
        documents = failed = 0
        first: float | None = None
        last: float | None = None
        for key, entry in sorted(state.items(), key=lambda kv: kv[1]["info"]["started"]):
            info, progress = entry["info"], entry["progress"]
            status = "closed" if entry["closed"] else ("died" if key in dead else "running")
            actors.append(
                ActorRecord(
                    actor_id=info["actor_id"],
                    pid=info["pid"],
                    node=info["node"],
                    gpu=info["gpu"],
                    device=info["device"],
                    status=status,
                    documents=progress.get("documents", 0),
                    failed=progress.get("failed", 0),
                    load_seconds=info["load_seconds"],
                    peak_process_mib=progress.get("peak_process_mib"),
                    receipt=entry["receipt"],
                )
            )
            documents += progress.get("documents", 0)
            failed += progress.get("failed", 0)
            if progress.get("first_start") is not None:
                first = progress["first_start"] if first is None else min(first, progress["first_start"])
                last = progress["last_end"] if last is None else max(last, progress["last_end"])
            device_key = f"{info['node']}/" + (f"GPU{info['gpu']}" if info["gpu"] else "cpu")
            by_device.setdefault(device_key, []).append({**info, **progress})
        gpus = self._gpu_records(by_device, wait)
        return JobSummary(
            documents=documents,
            failed=failed,
            seconds=0.0 if first is None or last is None else last - first,
            actors=tuple(actors),
            gpus=tuple(gpus),
        )

    def _gpu_records(self, by_device: dict[str, list[dict[str, Any]]], wait: float) -> list[GpuRecord]:
        # After the job: one probe per node waits for the job's processes there to exit,
        # then reads each GPU's memory, so a CUDA context still held shows as not at baseline.
        nodes: dict[str, tuple[set[int], set[str]]] = {}
        for rows in by_device.values():
            for r in rows:
                pids, gpus = nodes.setdefault(r["node_id"], (set(), set()))
                pids.add(r["pid"])
                gpus.update(g for g in r["gpu"].split(",") if g)
        after: dict[tuple[str, str], float] = {}
        for node_id, (pids, gpus) in nodes.items():
            _, used = ray.get(_probe_on(node_id).remote(sorted(pids), sorted(gpus), wait))
            after.update({(node_id, g): mib for g, mib in used.items()})
        records = []
        for key, rows in sorted(by_device.items()):
            baselines = [r["baseline_device_mib"] for r in rows if r.get("baseline_device_mib") is not None]
            peaks = [r["peak_device_mib"] for r in rows if r.get("peak_device_mib") is not None]
            gpu_ids = rows[0]["gpu"].split(",") if rows[0]["gpu"] else []
            readings = [after[(rows[0]["node_id"], g)] for g in gpu_ids if (rows[0]["node_id"], g) in after]
            baseline = min(baselines) if baselines else None
            after_mib = max(readings) if readings else None
            back = None if baseline is None or after_mib is None else after_mib <= baseline + self.tolerance_mib
            records.append(
                GpuRecord(
                    key=key,
                    baseline_mib=baseline,
                    peak_mib=max(peaks) if peaks else None,
                    after_mib=after_mib,
                    back_at_baseline=back,
                    actors=len(rows),
                )
            )
        return records


def _latest_incarnations(state: Mapping[tuple[str, int], dict[str, Any]]) -> dict[str, tuple[str, int]]:
    latest: dict[str, tuple[str, int]] = {}
    for key, entry in state.items():
        current = latest.get(key[0])
        if current is None or entry["info"]["started"] > state[current]["info"]["started"]:
            latest[key[0]] = key
    return latest


def _probe_on(node_id: str) -> Any:
    return _node_probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False))


# --- online -------------------------------------------------------------------------------------------


class ParserActor:
    """A long-lived parser for applications on Ray: one session (and engine) on the GPU Ray assigned.

    Start it with :func:`parser_actor`; call ``parse.remote(...)`` from anywhere in the
    cluster. Requests run one at a time (MinerU's models are used from one thread).

    Args:
        backend: the session's backend.
        budget: the session's :class:`~mineru_vram.VramBudget`.
        engine: arguments of a :class:`~mineru_vram.ResidentEngine` to start in the actor
            (for the ``vlm`` and ``hybrid`` backends), e.g. ``{"engine": "transformers",
            "model_path": ...}``; its device is the actor's.
        session_options: more :class:`~mineru_vram.ModelSession` arguments.
    """

    def __init__(
        self,
        backend: str = "pipeline",
        *,
        budget: VramBudget | None = None,
        engine: Mapping[str, Any] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._owner = _SessionOwner(backend, budget=budget, engine=engine, session_options=session_options)

    def parse(
        self, source: bytes | str, *, name: str | None = None, pages: Any = None, ocr_mode: str | None = None
    ) -> dict[str, Any]:
        """Parse one PDF (its bytes, or a path on the actor's node) into a row like :func:`parse_dataset`'s."""
        if name is None and isinstance(source, str):
            name = source
        return self._owner.parse_one(source, name, pages=pages, ocr_mode=ocr_mode)

    def where(self) -> dict[str, Any]:
        """The node, pid, GPU and device of this actor."""
        return {**self._owner.where, "device": self._owner.session.device}

    def snapshot(self) -> Any:
        """A :class:`~mineru_vram.VramSnapshot` of the actor's device."""
        return self._owner.session.snapshot()

    def close(self) -> ReleaseReport | None:
        """Release the models (and stop the engine); the receipt. Then ``ray.kill`` the actor."""
        return self._owner.close()

    def __ray_shutdown__(self) -> None:
        # Ray's hook for an actor that exits gracefully (its last handle went away); ray.kill
        # skips it, so call close() before killing an actor whose receipt you want.
        _close_quietly(self)

    def __del__(self) -> None:
        # The same for Ray versions without __ray_shutdown__ (close is idempotent).
        _close_quietly(self)


def parser_actor(
    backend: str = "pipeline",
    *,
    num_gpus: float | None = None,
    budget: VramBudget | int | float | str | None = None,
    gpu_memory_mib: float | None = None,
    engine: Mapping[str, Any] | None = None,
    session_options: Mapping[str, Any] | None = None,
    max_restarts: int = -1,
    max_task_retries: int = 3,
    **ray_options: Any,
) -> Any:
    """Start a :class:`ParserActor` and return its handle.

    Args:
        backend: the session's backend.
        num_gpus: GPUs for the actor; default :func:`gpu_share` of ``budget``, else 1
            where the cluster has GPUs and 0 where it has none.
        budget: the session's :class:`~mineru_vram.VramBudget`.
        gpu_memory_mib: the cards' memory, for a MiB budget.
        engine: :class:`~mineru_vram.ResidentEngine` arguments (see :class:`ParserActor`).
        session_options: more :class:`~mineru_vram.ModelSession` arguments.
        max_restarts: times Ray restarts the actor after it died (-1: always).
        max_task_retries: times a call is retried on the restarted actor.
        ray_options: more Ray actor options (``name``, ``lifetime``, ``resources``, ...).
    """
    if not ray.is_initialized():
        ray.init()
    budget = _budget_of(budget)
    if num_gpus is None:
        if budget is not None:
            num_gpus = gpu_share(budget, gpu_memory_mib=gpu_memory_mib)
        else:
            num_gpus = 1.0 if _cluster_gpus() > 0 else 0.0
    actor_cls = ray.remote(ParserActor)
    return actor_cls.options(
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        max_task_retries=max_task_retries,
        **ray_options,
    ).remote(backend, budget=budget, engine=engine, session_options=session_options)
