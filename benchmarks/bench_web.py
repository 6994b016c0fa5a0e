"""The web-app example under load against a plain loop over ``parse``, with VRAM and RSS over the whole run.

One run, in this order, all on the same documents and pages:

1. ``baseline``: the device's used memory (NVML) before anything starts;
2. ``loop``: a child process opens a ModelSession, parses every document once (warm-up, not
   timed), then parses ``--loop-requests`` documents in a plain loop (documents/s, per-document time);
3. ``service``: one of ``examples/web_app*.py`` (``--shape``) on uvicorn, started by
   ``tests/web_host.py`` on a loopback port; every document once (warm-up), then ``--requests``
   multipart uploads from ``--clients`` concurrent httpx clients (requests/s, p50/p99 latency);
4. ``shutdown``: SIGTERM, as a service manager stops it; the receipt the lifespan wrote;
5. ``loop_after`` (unless ``--no-loop-after``): the loop again, to tell the machine's drift from
   the service's cost.

A :class:`mineru_vram.Timeline` samples the device (NVML) and every process of the run (this one,
the loop's, the server and its worker or engine), GPU memory and host RSS, from the baseline to
the end; its CSV and PNG are written beside the JSON. The JSON says: ``service_vs_loop`` (service
requests/s over the loops' mean documents/s; the target is at least 0.95), latency percentiles,
memory growth over the timed requests (least-squares slope in MiB per 100 requests, and the change
from the first to the last tenth, against ``--growth-tolerance-mib``), and after shutdown the
device against its baseline (``isolated`` and ``engine``: the worker or engine is gone) or, for the
in-process shape, the server process's memory after release against a bare CUDA context's floor.

Usage (GPU machine: the pipeline backend on random weights; 1,000 requests):

    python benchmarks/bench_web.py --models-dir /tmp/mv-models --corpus ../shared/corpus --shape isolated \\
        --requests 1000 --loop-requests 200 --max-pages 2 --out web-isolated.json
    python benchmarks/bench_web.py --models-dir /tmp/mv-models --corpus ../shared/corpus --shape session \\
        --requests 1000 --loop-requests 200 --max-pages 2 --out web-session.json
    python benchmarks/bench_web.py --backend flash --device cpu --requests 40 --corpus ../shared/corpus \
        --exclude small_ocr.pdf --max-pages 2 --shape session --out web-cpu.json      # CPU smoke run

(``flash`` reads text layers; a scanned PDF would need the OCR models, so the smoke run leaves it out.)

Needs fastapi, uvicorn, python-multipart and httpx (the test dependency group).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # web_host: the example apps on uvicorn

SHAPES = {"session": "web_app", "isolated": "web_app_isolated"}
MIB_TOLERANCE_AFTER = 32.0  # device back at baseline / process at the context floor, within this


# --- the loop (a child process) -----------------------------------------------------------------------


def loop_child(args: Any) -> None:
    """Warm up, then parse ``--loop-requests`` documents in a plain loop; JSON to ``--child-out``."""
    import mineru_vram as mv

    docs, pages = _documents(args)
    t0 = time.perf_counter()
    # The loop's session freezes the collector as both shapes' do (examples/web_app.py asks for it; the
    # isolated worker does by default), so the comparison does not measure the freeze.
    with mv.ModelSession(args.backend, device=args.device, models_dir=args.models_dir, gc_freeze=True) as session:
        opened = time.perf_counter() - t0
        for doc in docs:
            session.parse(doc, pages=pages[doc])
        times = []
        t0 = time.perf_counter()
        for i in range(args.loop_requests):
            doc = docs[i % len(docs)]
            t = time.perf_counter()
            session.parse(doc, pages=pages[doc])
            times.append(time.perf_counter() - t)
        seconds = time.perf_counter() - t0
    out = {
        "documents": args.loop_requests,
        "open_s": round(opened, 3),
        "seconds": round(seconds, 3),
        "documents_per_s": round(args.loop_requests / seconds, 4),
        "p50_s": round(_percentile(times, 50), 4),
        "p99_s": round(_percentile(times, 99), 4),
        "receipt": str(session.release_report),
    }
    Path(args.child_out).write_text(json.dumps(out), encoding="utf-8")


def _documents(args: Any) -> tuple[list[Path], dict[Path, str | None]]:
    from mineru_vram._documents import load_document

    docs = sorted(Path(args.corpus).glob("*.pdf"))
    if args.exclude:
        docs = [d for d in docs if d.name not in args.exclude]
    if not docs:
        sys.exit(f"no PDFs in {args.corpus}")
    pages: dict[Path, str | None] = dict.fromkeys(docs)
    if args.max_pages is not None:
        pages = {d: f"1-{min(args.max_pages, load_document(d).page_count or 1)}" for d in docs}
    return docs, pages


def _run_loop(args: Any, folder: Path, name: str, timeline: Any) -> dict[str, Any]:
    from mineru_vram._process import python_command, spawn

    out = folder / f"{name}.json"
    argv = python_command("-c", _CHILD, *_child_args(args), "--child-out", str(out))
    group = spawn(argv, env=dict(os.environ), log_path=folder / f"{name}.log", cwd=folder)
    timeline.follow(group.pid)
    code = group.wait(args.timeout)
    if code != 0 or not out.is_file():
        group.kill()
        sys.exit(f"the {name} child failed (exit {code}):\n{group.log_tail()}")
    return json.loads(out.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


_CHILD = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def _child_args(args: Any) -> list[str]:
    out = [str(Path(__file__).resolve()), "--loop-child", "--corpus", args.corpus, "--backend", args.backend]
    out += ["--device", args.device, "--loop-requests", str(args.loop_requests), "--shape", args.shape]
    if args.models_dir:
        out += ["--models-dir", args.models_dir]
    if args.max_pages is not None:
        out += ["--max-pages", str(args.max_pages)]
    for name in args.exclude or ():
        out += ["--exclude", name]
    return out


# --- the service ---------------------------------------------------------------------------------------


async def _drive(
    url: str,
    plan: list[tuple[Path, str | None]],
    clients: int,
    payloads: dict[Path, bytes],
    progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> Any:
    """``clients`` concurrent clients share ``plan``; returns (first send, last answer, records).

    ``progress`` is called with the records so far after each answer.
    """
    import httpx

    todo = iter(plan)
    records: list[dict[str, Any]] = []

    async def client() -> None:
        async with httpx.AsyncClient(timeout=3600.0, limits=httpx.Limits(max_connections=1)) as http:
            for doc, pages in todo:
                t = time.perf_counter()
                answer = await http.post(
                    f"{url}/parse",
                    files={"file": (doc.name, payloads[doc], "application/pdf")},
                    params={"pages": pages} if pages else None,
                )
                records.append(
                    {"done": time.perf_counter(), "seconds": time.perf_counter() - t, "status": answer.status_code}
                )
                if progress is not None:
                    progress(records)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return t0, time.perf_counter(), records


def _server_rss_mib(sample: Any) -> float:
    """The server's processes' host RSS in a timeline sample: this process is followed too and left out."""
    return float(sample.rss_mib - sample.rss_by_pid.get(os.getpid(), 0.0))


def _progress(args: Any, tl: Any, t0: float) -> Callable[[list[dict[str, Any]]], None]:
    """A line on stderr every ``--progress-every`` answers: a run cut off (a lent machine taken back)
    still tells how far it got and what the memory did on the way."""

    def report(records: list[dict[str, Any]]) -> None:
        n = len(records)
        if not args.progress_every or (n % args.progress_every and n != args.requests):
            return
        elapsed = time.perf_counter() - t0
        bad = sum(1 for r in records if r["status"] != 200)
        last = tl.samples[-1] if tl.samples else None
        memory = (
            ""
            if last is None
            else f"; device {last.device_used_mib} MiB, server GPU {last.gpu_mib} MiB, "
            f"server RSS {_server_rss_mib(last):.1f} MiB"
        )
        print(
            f"progress {time.strftime('%H:%M:%S')}: {n}/{args.requests} answered, {bad} not 200, "
            f"{elapsed:.1f} s, {n / elapsed:.3f} requests/s{memory}",
            file=sys.stderr,
            flush=True,
        )

    return report


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _slope_per_100(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (requests done, MiB), in MiB per 100 requests."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return 100.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def _growth(samples: list[Any], span: Any, done_at: list[float], read: Any, tolerance: float) -> dict[str, Any]:
    """Memory over the timed requests (the ``span`` phase): first/last tenth, min, max, slope per 100 requests."""
    import bisect

    ordered = sorted(done_at)
    n = len(ordered)
    during = [s for s in samples if span.start <= s.time <= (span.end if span.end is not None else s.time)]
    rows = [(bisect.bisect_right(ordered, s.time), read(s)) for s in during]
    rows = [(d, v) for d, v in rows if v is not None and 0 < d <= n]
    if len(rows) < 3:
        return {"samples": len(rows)}
    first = [v for d, v in rows if d <= max(1, n // 10)]
    last = [v for d, v in rows if d >= n - n // 10]
    change = (statistics.median(last) - statistics.median(first)) if first and last else None
    slope = _slope_per_100([(float(d), float(v)) for d, v in rows])
    return {
        "samples": len(rows),
        "first_tenth_mib": round(statistics.median(first), 1) if first else None,
        "last_tenth_mib": round(statistics.median(last), 1) if last else None,
        "min_mib": round(min(v for _, v in rows), 1),
        "max_mib": round(max(v for _, v in rows), 1),
        "change_mib": None if change is None else round(change, 1),
        "slope_mib_per_100_requests": None if slope is None else round(slope, 2),
        "tolerance_mib": tolerance,
        "ok": None if change is None else abs(change) <= tolerance,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="a folder of PDFs")
    ap.add_argument("--exclude", action="append", help="a corpus file to leave out (repeatable)")
    ap.add_argument("--models-dir", default=None, help="MinerU model tree (pipeline backend)")
    ap.add_argument("--backend", default="pipeline", choices=("pipeline", "flash"))
    ap.add_argument("--shape", default="isolated", choices=tuple(SHAPES))
    ap.add_argument("--device", default=None, help="default: cuda:0 where NVML sees a GPU, else cpu")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--loop-requests", type=int, default=None, help="documents per loop (default: --requests)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-pages", type=int, default=None, help="parse only the first N pages of each document")
    ap.add_argument("--hz", type=float, default=10.0, help="timeline samples per second")
    ap.add_argument("--growth-tolerance-mib", type=float, default=64.0)
    ap.add_argument("--no-loop-after", action="store_true")
    ap.add_argument(
        "--progress-every", type=int, default=50, help="a progress line on stderr every N answers (0: none)"
    )
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds any one phase may take")
    ap.add_argument("--out", default="bench_web.json")
    ap.add_argument("--loop-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import mineru_vram as mv
    from mineru_vram._probe import resolve_device

    args.device = resolve_device(args.device)
    args.corpus = str(Path(args.corpus).resolve())  # the children run in a folder of their own
    if args.models_dir:
        args.models_dir = str(Path(args.models_dir).expanduser().resolve())
    if args.loop_requests is None:
        args.loop_requests = args.requests
    if args.loop_child:
        loop_child(args)
        return

    from web_host import WebServer

    out_path = Path(args.out)
    stem = out_path.with_suffix("")
    docs, pages = _documents(args)
    payloads = {d: d.read_bytes() for d in docs}
    baseline = mv.vram_snapshot(args.device)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": str(baseline),
        "backend": args.backend,
        "shape": args.shape,
        "documents": [d.name for d in docs],
        "max_pages": args.max_pages,
        "requests": args.requests,
        "clients": args.clients,
        "baseline_device_used_mib": None if baseline.device_info is None else baseline.device_info.used_mib,
    }
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp, mv.Timeline(device=args.device, hz=args.hz) as tl:
        folder = Path(tmp)
        with tl.phase("loop"):
            result["loop"] = _run_loop(args, folder, "loop", tl)
        env = {
            "PARSER_BACKEND": args.backend,
            "PARSER_MAX_MB": str(max(50, 2 * max(len(p) for p in payloads.values()) // (1024 * 1024))),
            "PARSER_TIMEOUT": str(args.timeout),
            "MINERU_VRAM_DEVICE": args.device,
        }
        if args.models_dir:
            env["MINERU_VRAM_MODELS_DIR"] = args.models_dir
        (folder / "server").mkdir()
        server = WebServer(SHAPES[args.shape], folder / "server", env=env, ready_timeout=args.timeout)
        try:
            with tl.phase("service.start"):
                server.spawn()
                tl.follow(server.group.pid)
                server.wait_ready()
            warm = [(d, pages[d]) for d in docs]
            with tl.phase("service.warmup"):
                asyncio.run(_drive(server.url, warm, 1, payloads))
            plan = [(docs[i % len(docs)], pages[docs[i % len(docs)]]) for i in range(args.requests)]
            with tl.phase("service"):
                t_first, t_last, records = asyncio.run(
                    _drive(server.url, plan, args.clients, payloads, _progress(args, tl, time.perf_counter()))
                )
            with tl.phase("shutdown"):
                code = server.terminate(args.timeout)
        finally:
            server.kill()
        statuses: dict[str, int] = {}
        for r in records:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        latencies = [r["seconds"] for r in records]
        seconds = t_last - t_first
        result["service"] = {
            "requests": len(records),
            "statuses": statuses,
            "seconds": round(seconds, 3),
            "requests_per_s": round(len(records) / seconds, 4),
            "p50_s": round(_percentile(latencies, 50), 4),
            "p99_s": round(_percentile(latencies, 99), 4),
            "mean_s": round(statistics.fmean(latencies), 4),
            "exit_code": code,
            "all_200": statuses == {"200": len(records)},
        }
        receipt = server.receipt()
        result["receipt"] = receipt
        result["device_back_s"] = _wait_for_baseline(args.device, baseline)
        after = mv.vram_snapshot(args.device)
        if not args.no_loop_after:
            with tl.phase("loop_after"):
                result["loop_after"] = _run_loop(args, folder, "loop_after", tl)
    # Timeline times are seconds since its start; requests are timed with perf_counter: align them
    # through the service phase, which both clocks saw start.
    service_phase = next(p for p in tl.phases() if p.name == "service")
    offset = service_phase.start - t_first  # timeline seconds = perf_counter + offset
    done_at = [r["done"] + offset for r in records]
    readings = {  # the server's processes (this one holds no GPU memory; its RSS is left out)
        "device_used_mib": lambda s: s.device_used_mib,
        "server_gpu_mib": lambda s: s.gpu_mib,
        "server_rss_mib": _server_rss_mib,
    }
    result["memory"] = {
        name: _growth(tl.samples, service_phase, done_at, read, args.growth_tolerance_mib)
        for name, read in readings.items()
    }
    loops = [result["loop"]["documents_per_s"]] + (
        [result["loop_after"]["documents_per_s"]] if "loop_after" in result else []
    )
    loop_rate = statistics.fmean(loops)
    result["service_vs_loop"] = round(result["service"]["requests_per_s"] / loop_rate, 4)
    result["target_met"] = result["service_vs_loop"] >= 0.95
    result["after_shutdown"] = _after_shutdown(args, baseline, after, receipt)
    peak = tl.peak()
    result["timeline"] = {
        "summary": tl.summary(),
        "peak_mib": None if peak is None else round(peak[1], 1),
        "csv": str(stem) + "-timeline.csv",
        "png": str(stem) + "-timeline.png",
    }
    tl.to_csv(str(stem) + "-timeline.csv")
    try:
        tl.plot(str(stem) + "-timeline.png", title=f"bench_web: {args.shape}, {args.backend}, {args.requests} requests")
    except ImportError:
        result["timeline"]["png"] = None
    text = json.dumps(result, indent=2, default=str)
    out_path.write_text(text, encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "receipt"}, indent=2, default=str))


def _wait_for_baseline(device: str, baseline: Any, timeout: float = 60.0) -> float | None:
    """Seconds until the device is back within the tolerance of ``baseline`` (``None``: not within ``timeout``).

    The driver frees an exited process's memory a little after the exit, so a reading taken at
    the moment the server is gone can still show its worker or its context. The wait is the
    isolated session's own (``wait_device_back``), with the server's processes already gone.
    """
    from mineru_vram._worker.device import wait_device_back

    met, _, seconds, _ = wait_device_back(
        device, baseline.device_info, (), tolerance_mib=MIB_TOLERANCE_AFTER, timeout=timeout
    )
    return None if not met or seconds is None else round(seconds, 3)


def _after_shutdown(args: Any, baseline: Any, after: Any, receipt: dict[str, Any] | None) -> dict[str, Any]:
    """The device against its baseline (isolated), or the server's memory after release against the floor."""
    out: dict[str, Any] = {"receipt_ok": None if receipt is None else receipt.get("ok")}
    if baseline.device_info is None or after.device_info is None:
        out["note"] = "no GPU: NVML cannot tell; the receipt is the check"
        return out
    out["device_used_before_mib"] = baseline.device_info.used_mib
    out["device_used_after_mib"] = after.device_info.used_mib
    out["device_at_baseline"] = after.device_info.used_mib <= baseline.device_info.used_mib + MIB_TOLERANCE_AFTER
    if args.shape == "session" and receipt is not None:
        import mineru_vram as mv

        process_after = (receipt.get("receipt") or {}).get("after", {}).get("process_mib")
        floor = mv.measure_context_floor(args.device)
        out["server_process_after_release_mib"] = process_after
        out["context_floor_mib"] = floor
        out["at_context_floor"] = process_after is not None and process_after <= floor + MIB_TOLERANCE_AFTER
    return out


if __name__ == "__main__":
    main()
