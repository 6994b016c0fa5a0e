"""Scale-out on Ray, on the CPU: a real local Ray (two CPUs), real actors, real MinerU code.

``parse_dataset`` runs a pool of two actors, each with its own ModelSession: ``flash``
on the corpus (MinerU's model-free tier) and ``pipeline`` on random-weight models. One
bad document among good ones becomes an error row; an actor killed with SIGKILL in the
middle of a job is restarted by Ray and its documents retried, and every document still
comes out exactly once; after ``ray.shutdown()`` no process of the cluster, the actors or
their mineru-vram workers is left.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mineru_vram._worker.handle import CHILD_MODULE
from mineru_vram.testing import make_pdf
from support import alive, all_gone

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mineru-vram[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'mineru-vram[ray]')")

from mineru_vram.ray import JobReport, parse_dataset, parser_actor  # noqa: E402  (after the skip: it imports Ray)

pytestmark = [
    # Ray Data warns about its own deprecated settings when it builds a DataContext.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def ray_folder() -> Iterator[str]:
    """The folder of the module's Ray sessions; shuts down its local Ray at the end, whichever test started it last.

    A short private folder of /tmp (mkdtemp: mode 0700): Ray's sockets live under it, and
    AF_UNIX paths end at 107 bytes, which pytest-xdist's temporary folders come within a byte of
    (and pass with a second node's socket names).
    """
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield folder
    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def local_ray(ray_folder: str) -> Any:
    """A local Ray of two CPUs and no dashboard, started once for the module (again after a test shut it down)."""
    return _start_ray(ray_folder)


def _start_ray(folder: str) -> Any:
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=256 * 1024 * 1024,
            _temp_dir=folder,
        )
    return ray


def _pdfs(folder: Path, count: int, pages: int = 1) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"doc-{i:02d}.pdf"
        path.write_bytes(make_pdf(pages, paragraphs=(f"Document {i}", f"The body of document number {i}.")))
        paths.append(path)
    return paths


def test_flash_on_the_corpus_with_two_actors_and_a_bad_document(
    local_ray: Any, corpus_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pdf"
    bad.write_bytes(b"Meeting notes, not a PDF\n")
    # The corpus's text PDFs (the scanned one needs OCR models), first page of each.
    good = [p for p in sorted(corpus_dir.glob("*.pdf")) if p.name != "small_ocr.pdf"]
    docs = [*good[:2], bad, *good[2:]]
    report = JobReport()

    rows = parse_dataset(docs, backend="flash", concurrency=2, pages="1", report=report).take_all()

    names = collections.Counter(row["name"] for row in rows)
    assert names == collections.Counter(str(d) for d in docs), "every document exactly once"
    by_name = {row["name"]: row for row in rows}
    failed = by_name[str(bad)]
    assert failed["error_type"] == "NotAPdfError"
    assert "not a PDF" in failed["error"]
    assert failed["markdown"] == ""
    for doc in good:
        row = by_name[str(doc)]
        assert row["error_type"] is None, row["error"]
        assert row["page_count"] == 1
        assert row["markdown"].strip()
        content = json.loads(row["content_list"])  # MinerU's structured content
        assert len(content["pages"]) == 1
        assert content["pages"][0]["blocks"], f"{doc.name}: no blocks on its first page"
        assert json.loads(row["timings"])["mineru"] > 0
        assert row["backend"] == "flash"
        assert row["device"] == "cpu"
        assert row["path"] == str(doc)

    summary = report.summary()
    assert len(summary.actors) == 2, "two actors, models loaded once each"
    assert all(actor.status == "closed" for actor in summary.actors)
    assert all(actor.receipt is not None and actor.receipt.ok for actor in summary.actors)
    assert summary.documents == len(docs)
    assert summary.failed == 1
    assert summary.documents_per_s is not None
    assert summary.ok
    assert {row["pid"] for row in rows} <= {actor.pid for actor in summary.actors}


@pytest.mark.slow
def test_pipeline_on_random_models_with_two_actors(local_ray: Any, random_models_dir: Path) -> None:
    pdfs = [make_pdf(1, paragraphs=(f"Report {i}", f"Line one of report {i}.")) for i in range(3)]
    report = JobReport()

    dataset = parse_dataset(
        pdfs,
        backend="pipeline",
        concurrency=2,
        session_options={"models_dir": random_models_dir},
        report=report,
    )
    rows = dataset.take_all()

    assert sorted(row["name"] for row in rows) == ["document-0", "document-1", "document-2"]
    for row in rows:
        assert row["error_type"] is None, row["error"]
        assert row["page_count"] == 1
        assert len(json.loads(row["content_list"])["pages"]) == 1
        assert row["backend"] == "pipeline"
    summary = report.summary()
    assert len(summary.actors) == 2
    for actor in summary.actors:
        assert actor.status == "closed"
        assert actor.receipt is not None
        # Each actor loaded MinerU's layout and OCR models and released them on shutdown.
        assert actor.receipt.models_released > 0
        assert actor.receipt.models_alive == []
        assert actor.receipt.ok
    assert summary.documents == 3


def test_an_actor_killed_mid_run_is_restarted_and_every_document_comes_out_once(local_ray: Any, tmp_path: Path) -> None:
    docs = _pdfs(tmp_path, 12, pages=3)
    report = JobReport()
    dataset = parse_dataset(docs, backend="flash", concurrency=2, report=report)

    rows = []
    killed = None
    for row in dataset.iter_rows():
        rows.append(row)
        if killed is None:
            # The first result: its actor is in the middle of the job, with documents queued.
            killed = int(row["pid"])
            os.kill(killed, signal.SIGKILL)
    assert killed is not None
    assert not alive(killed)

    names = collections.Counter(row["name"] for row in rows)
    assert names == collections.Counter(str(d) for d in docs), "every document exactly once"
    assert all(row["error_type"] is None for row in rows), [row["error"] for row in rows if row["error"]]

    summary = report.summary()
    victim = next(a for a in summary.actors if a.pid == killed)
    assert victim.status == "died"
    assert victim.receipt is None
    # Ray restarted the same actor in a new process, which loaded the session again and closed it.
    restarted = [a for a in summary.actors if a.actor_id == victim.actor_id and a.pid != killed]
    assert len(restarted) == 1
    assert restarted[0].status == "closed"
    assert restarted[0].receipt is not None
    assert restarted[0].receipt.ok
    assert summary.deaths == 1
    assert summary.ok


def test_an_online_actor_parses_requests_and_returns_its_receipt(local_ray: Any) -> None:
    actor = parser_actor(backend="flash")
    try:
        where = ray.get(actor.where.remote(), timeout=120)
        assert where["device"] == "cpu"
        rows = ray.get([actor.parse.remote(make_pdf(2), name=f"request-{i}") for i in range(2)], timeout=120)
        assert [row["name"] for row in rows] == ["request-0", "request-1"]
        assert all(row["page_count"] == 2 and row["error_type"] is None for row in rows)
        assert {row["pid"] for row in rows} == {where["pid"]}, "one process, models loaded once"
        bad = ray.get(actor.parse.remote(b"%PDF-1.4 cut short"), timeout=120)
        assert bad["error_type"] is not None
        receipt = ray.get(actor.close.remote(), timeout=120)
        assert receipt.ok
        assert receipt.device == "cpu"
    finally:
        ray.kill(actor)
    assert all_gone([where["pid"]], timeout=30)


def test_nothing_is_left_running_after_shutdown(ray_folder: str, tmp_path: Path) -> None:
    # Processes this test process had before Ray started (multiprocessing's resource tracker,
    # started by an earlier test's parse) are not Ray's and live on.
    if ray.is_initialized():
        ray.shutdown()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    _start_ray(ray_folder)
    # isolation="process": each actor's session runs in a mineru-vram worker process of its own.
    docs = _pdfs(tmp_path, 2)
    dataset = parse_dataset(docs, backend="flash", concurrency=1, session_options={"isolation": "process"})
    # Every process below this one, sampled while the job runs: the actors may close their
    # sessions before the first row reaches this loop.
    seen: set[int] = set()
    workers: set[int] = set()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            for proc in psutil.Process().children(recursive=True):
                seen.add(proc.pid)
                with contextlib.suppress(psutil.Error):
                    if CHILD_MODULE in proc.cmdline():
                        workers.add(proc.pid)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        rows = list(dataset.iter_rows())
    finally:
        done.set()
        sampler.join()
    assert [row["error_type"] for row in rows] == [None, None]
    assert workers, "the actor's session runs in a worker process"
    assert len(seen - before) > len(workers) + 2, "the cluster's own processes (GCS, raylet, workers) were seen"
    seen -= before

    ray.shutdown()

    assert all_gone(sorted(seen), timeout=30), [" ".join(psutil.Process(p).cmdline()[:3]) for p in seen if alive(p)]


@pytest.mark.slow
def test_a_cluster_of_two_nodes_loses_one_mid_job_and_every_document_comes_out_once(
    ray_folder: str, tmp_path: Path
) -> None:
    # A real multi-node Ray: a head and a worker node (their own GCS and raylets, one CPU each, so
    # one actor lands on each), reached as docs/scale-out.md says, with ray.init(address=...).
    # Mid-job the worker node leaves the cluster (its raylet and processes are killed) and a new one
    # joins, as an autoscaler would bring: its actor is restarted (there, or on the head once the head is
    # free) and its documents retried.
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    node_args = {"num_cpus": 1, "num_gpus": 0, "object_store_memory": 128 * 1024 * 1024}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "include_dashboard": False, "temp_dir": ray_folder},
    )
    try:
        worker_node = cluster.add_node(**node_args)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        docs = _pdfs(tmp_path, 16, pages=3)
        report = JobReport()
        rows = []
        for row in parse_dataset(docs, backend="flash", concurrency=2, num_cpus=1, report=report).iter_rows():
            rows.append(row)
            if len(rows) == 3:
                cluster.remove_node(worker_node)
                cluster.add_node(**node_args)

        names = collections.Counter(row["name"] for row in rows)
        assert names == collections.Counter(str(d) for d in docs), "every document exactly once"
        assert all(row["error_type"] is None for row in rows), [row["error"] for row in rows if row["error"]]

        summary = report.summary()
        died = [a for a in summary.actors if a.status == "died"]
        assert len(died) == 1, str(summary)
        # Restarted on a node still there: the new one, or the head once the pool let its other actor go
        # (Ray places the restart wherever a CPU is free; both happened here).
        again = [a for a in summary.actors if a.actor_id == died[0].actor_id and a.status == "closed"]
        assert len(again) == 1, str(summary)
        assert again[0].node_id != died[0].node_id, str(summary)
        nodes = {a.node_id for a in summary.actors}
        assert len(nodes) in (2, 3), str(summary)
        assert all(a.receipt is not None and a.receipt.ok for a in summary.actors if a.status == "closed")
        assert summary.ok, str(summary)
        # The summary could not probe the node that left; it says so instead of failing.
        assert any(died[0].node_id[:8] in note and "left the cluster" in note for note in summary.notes)
        # The nodes share one address here: each device is keyed by its node too.
        assert len({g.key for g in summary.gpus}) == len(nodes)
        assert f"(node {died[0].node_id[:8]})" in str(summary)
    finally:
        ray.shutdown()
        cluster.shutdown()
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert all_gone(sorted(left), timeout=30), [" ".join(psutil.Process(p).cmdline()[:3]) for p in left if alive(p)]
