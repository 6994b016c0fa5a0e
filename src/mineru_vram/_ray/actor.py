"""The actor's side: one ModelSession on the GPU Ray assigned, one row per document, what it reports.

:class:`DocumentParser` (Ray Data's callable class) and :class:`ParserActor` (a long-lived
actor) share :class:`_SessionOwner`. Importing this module imports Ray; only
:mod:`mineru_vram.ray` imports it, after checking that Ray is installed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from mineru_vram import ConfigurationError, ModelSession, ReleaseReport, SessionStateError, VramBudget, vram_snapshot

if TYPE_CHECKING:
    from mineru_vram._ray.report import JobReport

__all__ = ["RESULT_SCHEMA", "DocumentParser", "ParserActor"]

logger = logging.getLogger("mineru_vram")

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
        options.setdefault("gc_freeze", True)  # the actor's process is ours, as an isolated worker's is
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
            from mineru_vram import ResidentEngine

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
                       compute=ray.data.ActorPoolStrategy(size=2, enable_true_multi_threading=True))

    ``enable_true_multi_threading=True`` runs each call on the actor's task thread (still one at
    a time), as :func:`~mineru_vram.ray.parse_dataset` does; in the pool thread Ray Data uses
    otherwise, the parse ran 3-10 % slower on 2 CPU cores and kept 1.4 cores busy against 1.6 on
    an H200 host (docs/BENCHMARKS.md, "Ray's thread" and run J).

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
