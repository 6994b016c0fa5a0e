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

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:
    import ray
    import ray.data
except ImportError as exc:  # the extra is not installed
    raise ImportError(
        "mineru_vram.ray needs Ray Data, which is not installed: pip install 'mineru-vram[ray]' "
        "(the 'ray' extra, ray[data]>=2.40,<3)"
    ) from exc

# Ray is there: the internals, which import it, can load.
from mineru_vram._ray.actor import RESULT_SCHEMA, DocumentParser, ParserActor
from mineru_vram._ray.placement import cluster_gpus, gpu_share, placement
from mineru_vram._ray.report import ActorRecord, GpuRecord, JobReport, JobSummary

from . import ConfigurationError, VramBudget

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
    ``write_parquet``, ...); Ray shows the progress. Each actor parses one document at a
    time on its task thread, the thread that opened its session. Each document gives one row with
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
    budget, num_gpus = placement(budget, num_gpus, gpu_memory_mib)
    if concurrency is None:
        gpus = cluster_gpus()
        concurrency = max(1, int(gpus // num_gpus)) if num_gpus and gpus else 1
    compute = _actor_pool(concurrency)
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


# Where an actor runs each call. True (the default): on the actor's task thread, the one that
# opened the session (Ray Data's ``enable_true_multi_threading``; Ray's ``max_concurrency`` stays
# 1, so still one call at a time). False: in the one-thread pool Ray Data puts beside it for a
# callable class by default. In that pool MinerU's parse kept fewer cores busy (1.2-1.4 of 2,
# against 1.6 on the task thread and 1.7 in a plain process) and ran 3-10 % slower than on the task
# thread in every alternating pair measured (docs/BENCHMARKS.md, "Ray's thread"); on an H200 host
# it kept 1.4 cores busy against 1.6 and ran at 0.94 of the loop (run J). Flipped only by
# benchmarks/bench_ray.py's "@pool" phases, to measure it again; not an API.
_PARSE_ON_OPEN_THREAD = True


def _actor_pool(concurrency: int | tuple[int, int]) -> Any:
    options: dict[str, Any] = (
        {"min_size": concurrency[0], "max_size": concurrency[1]}
        if isinstance(concurrency, tuple)
        else {"size": concurrency}
    )
    if _PARSE_ON_OPEN_THREAD:
        options["enable_true_multi_threading"] = True
    return ray.data.ActorPoolStrategy(**options)


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
    budget, num_gpus = placement(budget, num_gpus, gpu_memory_mib)
    actor_cls = ray.remote(ParserActor)
    return actor_cls.options(
        num_gpus=num_gpus,
        max_restarts=max_restarts,
        max_task_retries=max_task_retries,
        **ray_options,
    ).remote(backend, budget=budget, engine=engine, session_options=session_options)
