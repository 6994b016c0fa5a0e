"""TaskQueue throughput against a plain loop over ``parse``, on the same session, with memory samples.

One process, one open ModelSession:

1. warm-up: every corpus document parsed once (not timed);
2. ``loop``: ``session.parse`` over the corpus repeated to ``--loop-tasks`` documents (default
   ``--tasks``; rates are compared, so a shorter loop fits a run into a time limit);
3. ``queue``: the same documents submitted to a fresh TaskQueue (submission timed on
   its own), then drained by ``queue.run(until_idle=True, session=session)``;
4. ``loop_after`` (unless ``--no-loop-after``): the loop again, to tell drift of the
   machine from cost of the queue.

A sampler thread reads this process's memory (NVML per-process MiB, torch allocated
and reserved, host RSS) every ``--sample-interval`` seconds through every phase.
The JSON says: throughput per phase, ``queue_vs_loop`` (queue tasks/s divided by the
mean of the loop phases; the target is at least 0.95), the per-task queue overhead,
and per phase the first, last, minimum and maximum of each memory figure plus the
least-squares slope in MiB per 100 tasks ("flat" means about zero).

Usage (GPU machine; 200 tasks of the five corpus files are about 1500 pages, so
``--max-pages`` keeps a run within minutes):

    python benchmarks/bench_queue.py --models-dir /tmp/models --corpus ../shared/corpus --tasks 200 \\
        --max-pages 2 --out queue.json
    python benchmarks/bench_queue.py --backend flash --corpus ../shared/corpus --tasks 50   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


class Sampler:
    """Memory of this process every ``interval`` seconds, tagged with the phase and its progress."""

    def __init__(self, device: str, interval: float) -> None:
        self.device = device
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self.phase = "idle"
        self.done = 0  # documents finished in the current phase
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._t0 = time.perf_counter()

    def _read(self) -> dict[str, Any]:
        from mineru_vram import vram_snapshot

        snap = vram_snapshot(self.device)
        return {
            "t": round(time.perf_counter() - self._t0, 3),
            "phase": self.phase,
            "done": self.done,
            "nvml_mib": snap.process_mib,
            "torch_allocated_mib": snap.torch_allocated_mib,
            "torch_reserved_mib": snap.torch_reserved_mib,
            "rss_mib": snap.rss_mib,
        }

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append(self._read())

    def mark(self, phase: str) -> None:
        self.samples.append(self._read())  # the end of the previous phase
        self.phase, self.done = phase, 0
        self.samples.append(self._read())  # the start of this one

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(self._read())


def _slope_per_100(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (documents done, MiB), in MiB per 100 documents."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return 100.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def _memory_summary(samples: list[dict[str, Any]], phase: str) -> dict[str, Any]:
    rows = [s for s in samples if s["phase"] == phase]
    out: dict[str, Any] = {"samples": len(rows)}
    for key in ("nvml_mib", "torch_allocated_mib", "torch_reserved_mib", "rss_mib"):
        values = [(s["done"], s[key]) for s in rows if s[key] is not None]
        if not values:
            out[key] = None
            continue
        ys = [v for _, v in values]
        out[key] = {
            "first": round(ys[0], 1),
            "last": round(ys[-1], 1),
            "min": round(min(ys), 1),
            "max": round(max(ys), 1),
            "slope_per_100_tasks": None if (s := _slope_per_100(values)) is None else round(s, 2),
        }
    return out


def _loop(session: Any, docs: list[Path], n: int, pages_of: dict[Path, str | None], sampler: Sampler) -> dict[str, Any]:
    t0 = time.perf_counter()
    per_doc = []
    for i in range(n):
        doc = docs[i % len(docs)]
        t = time.perf_counter()
        session.parse(doc, pages=pages_of[doc])
        per_doc.append(time.perf_counter() - t)
        sampler.done = i + 1
    seconds = time.perf_counter() - t0
    return {
        "tasks": n,
        "seconds": round(seconds, 3),
        "tasks_per_s": round(n / seconds, 4),
        "median_task_s": round(statistics.median(per_doc), 4),
    }


def _queue(
    session: Any,
    docs: list[Path],
    n: int,
    pages_of: dict[Path, str | None],
    sampler: Sampler,
    folder: Path,
    args: Any,
) -> dict[str, Any]:
    from mineru_vram._queue import TaskQueue, TaskStatus

    queue = TaskQueue(
        folder / "tasks.db",
        backend=args.backend,
        device=args.device,
        models_dir=args.models_dir,
        durable=not args.no_durable,
    )
    t0 = time.perf_counter()
    ids = [queue.submit(docs[i % len(docs)], pages=pages_of[docs[i % len(docs)]]) for i in range(n)]
    submit_s = time.perf_counter() - t0

    stop = threading.Event()

    def progress() -> None:  # feeds the sampler's "done" from the queue's own counts
        from mineru_vram._queue import TaskQueue as Reader

        reader = Reader(folder / "tasks.db")
        try:
            while not stop.wait(max(0.2, args.sample_interval / 2)):
                counts = reader.counts()
                sampler.done = counts[TaskStatus.COMPLETED] + counts[TaskStatus.FAILED]
        finally:
            reader.close()

    watcher = threading.Thread(target=progress, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    stats = queue.run(until_idle=True, session=session)
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    infos = [queue.status(t) for t in ids]
    statuses: dict[str, int] = {}
    for info in infos:
        statuses[info.status.value] = statuses.get(info.status.value, 0) + 1
    runs = [i.run_seconds for i in infos if i.run_seconds is not None]
    completed_once = sum(1 for e in queue.events() if e["event"] == "completed")
    leftovers = {sub: len(os.listdir(queue.storage / sub)) for sub in ("inputs", "work")}
    queue.close()
    return {
        "tasks": n,
        "submit_seconds": round(submit_s, 3),
        "submit_ms_per_task": round(1000 * submit_s / n, 3),
        "seconds": round(seconds, 3),
        "tasks_per_s": round(n / seconds, 4),
        "median_task_s": round(statistics.median(runs), 4) if runs else None,
        "statuses": statuses,
        "completed_events": completed_once,
        "stats": {"completed": stats.completed, "failed": stats.failed, "retried": stats.retried, "lost": stats.lost},
        "leftover_files": leftovers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=None, help="MinerU model tree (pipeline backend)")
    ap.add_argument("--corpus", required=True, help="a folder of PDFs")
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--loop-tasks", type=int, default=None, help="documents per loop phase (default: --tasks)")
    ap.add_argument("--backend", default="pipeline", choices=("pipeline", "flash"))
    ap.add_argument("--device", default=None, help="default: cuda:0 where NVML sees a GPU, else cpu")
    ap.add_argument("--max-pages", type=int, default=None, help="parse only the first N pages of each document")
    ap.add_argument("--sample-interval", type=float, default=0.5)
    ap.add_argument("--no-loop-after", action="store_true")
    ap.add_argument("--no-durable", action="store_true", help="TaskQueue(durable=False): no fsync per commit")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import mineru_vram as mv
    from mineru_vram._probe import resolve_device

    args.device = resolve_device(args.device)
    docs = sorted(Path(args.corpus).glob("*.pdf"))
    if not docs:
        sys.exit(f"no PDFs in {args.corpus}")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(mv.vram_snapshot(args.device)),
        "backend": args.backend,
        "documents": [d.name for d in docs],
        "tasks": args.tasks,
        "max_pages": args.max_pages,
        "durable": not args.no_durable,
    }
    # Each document's own range: ModelSession validates a range against the document's pages.
    pages_of: dict[Path, str | None] = dict.fromkeys(docs)
    if args.max_pages is not None:
        from mineru_vram._documents import load_document

        pages_of = {d: f"1-{min(args.max_pages, load_document(d).page_count)}" for d in docs}
    with (
        tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp,
        Sampler(args.device, args.sample_interval) as sampler,
    ):
        session = mv.ModelSession(args.backend, device=args.device, models_dir=args.models_dir)
        t0 = time.perf_counter()
        session.open()
        sampler.mark("warmup")
        for d in docs:
            session.parse(d, pages=pages_of[d])
        result["open_and_warmup_s"] = round(time.perf_counter() - t0, 3)
        sampler.mark("loop")
        loop_n = args.loop_tasks or args.tasks
        result["loop"] = _loop(session, docs, loop_n, pages_of, sampler)
        sampler.mark("queue")
        result["queue"] = _queue(session, docs, args.tasks, pages_of, sampler, Path(tmp), args)
        if not args.no_loop_after:
            sampler.mark("loop_after")
            result["loop_after"] = _loop(session, docs, loop_n, pages_of, sampler)
        sampler.mark("close")
        session.close()
        result["release"] = str(session.release_report)
    loops = [result["loop"]["tasks_per_s"]] + ([result["loop_after"]["tasks_per_s"]] if "loop_after" in result else [])
    loop_tps = statistics.fmean(loops)
    queue_tps = result["queue"]["tasks_per_s"]
    result["queue_vs_loop"] = round(queue_tps / loop_tps, 4)
    result["queue_overhead_ms_per_task"] = round(1000 * (1 / queue_tps - 1 / loop_tps), 2)
    result["target_met"] = result["queue_vs_loop"] >= 0.95
    result["memory"] = {p: _memory_summary(sampler.samples, p) for p in ("warmup", "loop", "queue", "loop_after")}
    result["samples"] = sampler.samples
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
        summary = {k: v for k, v in result.items() if k != "samples"}
        print(json.dumps(summary, indent=2))
    else:
        print(text)


if __name__ == "__main__":
    main()
